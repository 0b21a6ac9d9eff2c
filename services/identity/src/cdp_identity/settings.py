"""Identity configuration: every variable, its default and meaning (also listed in the README)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cdp_kit.identifier_hash import IdentifierHashSettings
from cdp_kit.ownership import OwnershipSettings
from cdp_kit.settings import ServiceSettings, env


@dataclass(frozen=True, kw_only=True)
class IdentitySettings(IdentifierHashSettings, OwnershipSettings, ServiceSettings):
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
    retention_days: float = env("CDP_EVENTS_RETENTION_DAYS", 7.0, help="days events.resolved keeps events")
    shared_notify_max: int = env(
        "CDP_IDENTITY_SHARED_NOTIFY_MAX",
        10,
        help="persons already seen with an identifier are sent an 'Identifier Shared' event when a new person "
        "joins it, while they then share it with at most this many others (0: never)",
    )

    def validate(self) -> list[str]:
        problems = ServiceSettings.validate(self) + OwnershipSettings.validate(self)
        # As for profile and the collector: required under tokens, or identity could not match a keyed
        # suppression and would let a deleted person's late events make them again.
        problems += IdentifierHashSettings.validate(self)
        for name, path in (
            ("CDP_IDENTITY_RULES_FILE", self.rules_file),
            ("CDP_IDENTITY_MATCHING_FILE", self.matching_file),
        ):
            if path is not None and not path.is_file():
                problems.append(f"{name}={str(path)!r} is not a readable file")
        if self.batch_size < 1:
            problems.append(f"CDP_IDENTITY_BATCH_SIZE={self.batch_size} is invalid: must be positive")
        if self.shared_notify_max < 0:
            problems.append(
                f"CDP_IDENTITY_SHARED_NOTIFY_MAX={self.shared_notify_max} is invalid: must be 0 (tell nobody) or more"
            )
        if self.ownership == "static" and self.replicas > 1:
            # writer.py: the graph spans partitions and every replica caches it, so replicas splitting
            # the partitions would resolve events on each other's stale records.
            problems.append(
                f"CDP_REPLICAS={self.replicas} is invalid for identity: one replica writes the graph. Run one "
                "replica, or set CDP_OWNERSHIP=nats or kubernetes: further replicas then wait as standbys"
            )
        return problems
