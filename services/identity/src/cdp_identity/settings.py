"""Identity configuration: every variable, its default and meaning (also listed in the README)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cdp_kit.settings import ServiceSettings, env


@dataclass(frozen=True, kw_only=True)
class IdentitySettings(ServiceSettings):
    service_name: str = env("OTEL_SERVICE_NAME", "identity", help="service name in traces, metrics and logs")
    grpc_port: int = env("CDP_GRPC_PORT", 50052, help="gRPC port (IdentityService, health, reflection)")
    rules_file: Path | None = env(
        "CDP_IDENTITY_RULES_FILE",
        None,
        help="JSON merge rules (identifier types in priority order, limits, windows, blocked values, "
        "quarantine); unset: the built-in defaults",
    )
    matching_file: Path | None = env(
        "CDP_IDENTITY_MATCHING_FILE",
        None,
        help="JSON matching configuration (comparisons, blocking rules, thresholds); unset: the built-in "
        "person-record configuration",
    )
    batch_size: int = env("CDP_IDENTITY_BATCH_SIZE", 500, help="events fetched and applied per batch")
    ack_wait: float = env(
        "CDP_IDENTITY_ACK_WAIT",
        30.0,
        help="seconds before JetStream redelivers an unacknowledged batch (after a crash: the pause before "
        "the partition resumes, in order)",
    )
    pod_ordinal: int = env("CDP_POD_ORDINAL", 0, help="this replica's StatefulSet ordinal (which partitions it owns)")
    replicas: int = env("CDP_REPLICAS", 1, help="replicas sharing the partitions (p % replicas == ordinal)")
    retention_days: float = env("CDP_EVENTS_RETENTION_DAYS", 7.0, help="days events.resolved keeps events")

    def validate(self) -> list[str]:
        problems = super().validate()
        for name, path in (
            ("CDP_IDENTITY_RULES_FILE", self.rules_file),
            ("CDP_IDENTITY_MATCHING_FILE", self.matching_file),
        ):
            if path is not None and not path.is_file():
                problems.append(f"{name}={str(path)!r} is not a readable file")
        if self.batch_size < 1:
            problems.append(f"CDP_IDENTITY_BATCH_SIZE={self.batch_size} is invalid: must be positive")
        if self.replicas < 1:
            problems.append(f"CDP_REPLICAS={self.replicas} is invalid: must be at least 1")
        elif not 0 <= self.pod_ordinal < self.replicas:
            problems.append(f"CDP_POD_ORDINAL={self.pod_ordinal} is invalid: must be 0..{self.replicas - 1}")
        return problems
