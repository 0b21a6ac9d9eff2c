"""Scoring configuration: every variable, its default and meaning (also listed in the README)."""

from __future__ import annotations

from dataclasses import dataclass

from cdp_kit.errors import InvalidArgument
from cdp_kit.ownership import OwnershipSettings
from cdp_kit.settings import ServiceSettings, env
from cdp_scoring.modelstore import parse_model_store
from cdp_scoring.schedule import Cron, parse_schedule


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
    peers: str = env(
        "CDP_SCORING_PEERS",
        "",
        help="static ownership with several replicas: the replicas' gRPC addresses in ordinal order, "
        "comma-separated; empty: derived from CDP_POD_NAME (<set>-<i>.<set>-headless:<CDP_GRPC_PORT>). An "
        "export of a person of another replica's partition asks that replica",
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
    resolution: str = env(
        "CDP_SCORING_RESOLUTION",
        "",
        help="decimal places published scores are rounded to (4: probabilities to 0.0001, CLV to 0.0001 "
        "currency units), so a move below it is not published; empty: scores as the model gives them "
        "(an update whose values are bitwise the last published ones is never published)",
    )
    scores_retention_days: float = env(
        "CDP_SCORING_SCORES_RETENTION_DAYS", 7.0, help="days scores.updated keeps score updates"
    )

    drift_check_seconds: float = env(
        "CDP_SCORING_DRIFT_CHECK_SECONDS",
        3600.0,
        help="seconds between drift checks: each compares the rows scored since the previous check with the "
        "version's training reference (population stability index per feature and score)",
    )
    drift_threshold: float = env(
        "CDP_SCORING_DRIFT_THRESHOLD",
        0.2,
        help="a feature or score whose population stability index passes this marks its version drifted: "
        "an alert on models.drift (and a retrain with CDP_SCORING_DRIFT_RETRAIN)",
    )
    drift_min_rows: int = env(
        "CDP_SCORING_DRIFT_MIN_ROWS",
        500,
        help="rows a version must have scored since its last check to be checked (fewer: it keeps counting)",
    )
    drift_retrain: bool = env(
        "CDP_SCORING_DRIFT_RETRAIN",
        False,
        help="start a training run of a model whose live version drifted (needs CDP_SCORING_TRAINING_STORE)",
    )
    training_store: str = env(
        "CDP_SCORING_TRAINING_STORE",
        "",
        help="the profile service's store URL (its CDP_STORE_URL), read only: training runs (TrainModel, the "
        "schedule) and realised quality read their point-in-time sets there; empty: neither is available",
    )
    train_schedule: str = env(
        "CDP_SCORING_TRAIN_SCHEDULE",
        "",
        help="scheduled training runs, 'model=cron' separated by ';' (cron: five fields in UTC, or @hourly, "
        "@daily, @weekly), e.g. 'churn_risk=0 3 * * 1;fraud_risk=@daily'; empty: none",
    )
    quality_schedule: str = env(
        "CDP_SCORING_QUALITY_SCHEDULE",
        "@daily",
        help="when every live model's realised quality is computed on the latest closed label window (cron, "
        "UTC; needs CDP_SCORING_TRAINING_STORE; empty: only when labels arrive and on request, GetModelQuality "
        "refresh)",
    )
    quality_settle_seconds: float = env(
        "CDP_SCORING_QUALITY_SETTLE_SECONDS",
        30.0,
        help="seconds from a label's arrival (a label event of a live model's spec on events.resolved, a label "
        "window closing at a UTC day boundary) to its model's realised quality being computed again, so the "
        "profile service has stored it",
    )
    quality_debounce_seconds: float = env(
        "CDP_SCORING_QUALITY_DEBOUNCE_SECONDS",
        600.0,
        help="a model's realised quality is computed for arriving labels at most once in this many seconds "
        "(a flood of labels costs one computation per period)",
    )

    @property
    def resolution_decimals(self) -> int | None:
        """CDP_SCORING_RESOLUTION as decimal places (None: off); `validate` has checked it."""
        return int(self.resolution) if self.resolution.strip() else None

    def validate(self) -> list[str]:
        problems = ServiceSettings.validate(self) + OwnershipSettings.validate(self)
        try:
            parse_model_store(self.model_store)
        except InvalidArgument as exc:
            problems.append(f"CDP_SCORING_MODEL_STORE={self.model_store!r} is invalid: {exc.description}")
        peers = [a for a in self.peers.split(",") if a.strip()]
        if peers and self.ownership == "static" and len(peers) != self.replicas:
            problems.append(
                f"CDP_SCORING_PEERS lists {len(peers)} addresses for CDP_REPLICAS={self.replicas}: "
                "give every replica's, in ordinal order"
            )
        if self.batch_size < 1:
            problems.append(f"CDP_SCORING_BATCH_SIZE={self.batch_size} is invalid: must be positive")
        if not 0 < self.snapshot_interval <= 3600:
            problems.append(f"CDP_SCORING_SNAPSHOT_SECONDS={self.snapshot_interval} is invalid: must be in (0, 3600]")
        if not 0 <= self.round_linger_ms <= 1000:
            problems.append(f"CDP_SCORING_ROUND_LINGER_MS={self.round_linger_ms} is invalid: must be in [0, 1000]")
        if not 0 < self.drift_check_seconds <= 7 * 86_400:
            problems.append(
                f"CDP_SCORING_DRIFT_CHECK_SECONDS={self.drift_check_seconds} is invalid: must be in (0, 604800]"
            )
        if not self.drift_threshold > 0:
            problems.append(f"CDP_SCORING_DRIFT_THRESHOLD={self.drift_threshold} is invalid: must be positive")
        for variable, value in (
            ("CDP_SCORING_QUALITY_SETTLE_SECONDS", self.quality_settle_seconds),
            ("CDP_SCORING_QUALITY_DEBOUNCE_SECONDS", self.quality_debounce_seconds),
        ):
            if not 0 <= value <= 7 * 86_400:
                problems.append(f"{variable}={value} is invalid: must be in [0, 604800]")
        if self.drift_min_rows < 1:
            problems.append(f"CDP_SCORING_DRIFT_MIN_ROWS={self.drift_min_rows} is invalid: must be at least 1")
        for variable, value, parse in (
            ("CDP_SCORING_TRAIN_SCHEDULE", self.train_schedule, parse_schedule),
            ("CDP_SCORING_QUALITY_SCHEDULE", self.quality_schedule, Cron.parse),
        ):
            if value:
                try:
                    parse(value)
                except InvalidArgument as exc:
                    problems.append(f"{variable}={value!r} is invalid: {exc.description}")
        if self.resolution.strip():
            try:
                decimals = int(self.resolution)
            except ValueError:
                decimals = -1
            if not 0 <= decimals <= 12:
                problems.append(
                    f"CDP_SCORING_RESOLUTION={self.resolution!r} is invalid: decimal places from 0 to 12, or empty"
                )
        if self.threads < 1:
            problems.append(f"CDP_SCORING_THREADS={self.threads} is invalid: must be at least 1")
        return problems
