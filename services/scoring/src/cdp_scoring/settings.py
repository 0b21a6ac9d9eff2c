"""Scoring configuration: every variable, its default and meaning (also listed in the README)."""

from __future__ import annotations

from dataclasses import dataclass

from cdp_kit.errors import InvalidArgument
from cdp_kit.ownership import OwnershipSettings
from cdp_kit.settings import ServiceSettings, env
from cdp_scoring.modelstore import parse_model_store


@dataclass(frozen=True, kw_only=True)
class ScoringSettings(OwnershipSettings, ServiceSettings):
    """Which partitions this replica scores comes from `OwnershipSettings` (`CDP_OWNERSHIP`): static
    (p % CDP_REPLICAS == CDP_POD_ORDINAL), or leases that follow the live replicas (nats, kubernetes);
    a partition's held fields move with it (restored from the snapshot plus the stream)."""

    service_name: str = env("OTEL_SERVICE_NAME", "scoring", help="service name in traces, metrics and logs")
    grpc_port: int = env("CDP_GRPC_PORT", 50054, help="gRPC port (ScoringService, health, reflection)")
    model_store: str = env(
        "CDP_SCORING_MODEL_STORE",
        ".cdp/models",
        help="where ONNX files are kept: a folder (a volume; file:///path works too) or nats://<bucket> "
        "(a JetStream object store every replica shares)",
    )
    ship_models: bool = env(
        "CDP_SCORING_SHIP_MODELS",
        True,
        help="on start, deploy live the models shipped with the service that have no version registered yet",
    )
    profile_address: str = env(
        "CDP_PROFILE_ADDRESS",
        "",
        help="profile gRPC address (host:port): persons not yet seen on profiles.changed are read there, and "
        "a deployed model's computed traits are defined there; empty: neither",
    )
    profile_token: str = env(
        "CDP_PROFILE_TOKEN",
        "",
        help="bearer token for the profile service (profile:read, and profile:admin to define computed traits)",
        secret=True,
    )
    batch_size: int = env("CDP_SCORING_BATCH_SIZE", 64, help="profiles.changed messages fetched per batch")
    ack_wait: float = env(
        "CDP_SCORING_ACK_WAIT", 30.0, help="seconds before JetStream redelivers an unacknowledged batch"
    )
    snapshot_interval: float = env(
        "CDP_SCORING_SNAPSHOT_SECONDS",
        10.0,
        help="seconds between snapshots of the profile fields held (a restart, or a partition moving here, "
        "replays profiles.changed from the last one; keep it far below the PROFILES stream's retention)",
    )
    round_linger_ms: float = env(
        "CDP_SCORING_ROUND_LINGER_MS",
        5.0,
        help="milliseconds a scoring round waits for the other partitions' changes before it runs (a round "
        "costs each model one onnxruntime call whatever its size)",
    )
    threads: int = env("CDP_SCORING_THREADS", 1, help="onnxruntime intra-op threads per session")
    scores_retention_days: float = env(
        "CDP_SCORING_SCORES_RETENTION_DAYS", 7.0, help="days scores.updated keeps score updates"
    )

    def validate(self) -> list[str]:
        problems = ServiceSettings.validate(self) + OwnershipSettings.validate(self)
        try:
            parse_model_store(self.model_store)
        except InvalidArgument as exc:
            problems.append(f"CDP_SCORING_MODEL_STORE={self.model_store!r} is invalid: {exc.description}")
        if self.batch_size < 1:
            problems.append(f"CDP_SCORING_BATCH_SIZE={self.batch_size} is invalid: must be positive")
        if not 0 < self.snapshot_interval <= 3600:
            problems.append(f"CDP_SCORING_SNAPSHOT_SECONDS={self.snapshot_interval} is invalid: must be in (0, 3600]")
        if not 0 <= self.round_linger_ms <= 1000:
            problems.append(f"CDP_SCORING_ROUND_LINGER_MS={self.round_linger_ms} is invalid: must be in [0, 1000]")
        if self.threads < 1:
            problems.append(f"CDP_SCORING_THREADS={self.threads} is invalid: must be at least 1")
        return problems
