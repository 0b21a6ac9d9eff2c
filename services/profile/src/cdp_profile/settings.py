"""Profile configuration: every variable, its default and meaning (also listed in the README)."""

from __future__ import annotations

from dataclasses import dataclass

from cdp_kit.identifier_hash import IdentifierHashSettings
from cdp_kit.ownership import OwnershipSettings
from cdp_kit.settings import ServiceSettings, env


@dataclass(frozen=True, kw_only=True)
class ProfileSettings(IdentifierHashSettings, OwnershipSettings, ServiceSettings):
    """Which partitions this replica works on comes from `OwnershipSettings` (`CDP_OWNERSHIP`): static
    (p % CDP_REPLICAS == CDP_POD_ORDINAL, requests forwarded to the owner by ordinal), or leases that
    follow the live replicas (nats, kubernetes), where CDP_REPLICAS plays no part."""

    service_name: str = env("OTEL_SERVICE_NAME", "profile", help="service name in traces, metrics and logs")
    grpc_port: int = env("CDP_GRPC_PORT", 50053, help="gRPC port (ProfileService, health, reflection)")
    identity_address: str = env(
        "CDP_IDENTITY_ADDRESS", "localhost:50052", help="identity gRPC address, for LookupProfile (host:port)"
    )
    identity_token: str = env(
        "CDP_IDENTITY_TOKEN", "", help="bearer token with identity:read for LookupProfile (empty: none)", secret=True
    )
    segmentation_address: str = env(
        "CDP_SEGMENTATION_ADDRESS",
        "",
        help="segmentation gRPC address (host:port): DeleteComputedTrait asks it which segments, live journeys "
        "and deployed models read the trait (ListComputedTraitReaders) and is refused while any does, unless forced (UNAVAILABLE "
        "while it cannot be asked); empty: deletions are not checked",
    )
    segmentation_token: str = env(
        "CDP_SEGMENTATION_TOKEN", "", help="bearer token for the segmentation service (segmentation:read)", secret=True
    )
    batch_size: int = env(
        "CDP_PROFILE_BATCH_SIZE", 64, help="events.resolved messages (each a batch of events) fetched per batch"
    )
    ack_wait: float = env(
        "CDP_PROFILE_ACK_WAIT", 30.0, help="seconds before JetStream redelivers an unacknowledged batch"
    )
    timeline_max_events: int = env(
        "CDP_PROFILE_TIMELINE_MAX_EVENTS", 1000, help="events kept per person's timeline (oldest dropped first)"
    )
    timeline_max_age_days: float = env(
        "CDP_PROFILE_TIMELINE_MAX_AGE_DAYS", 365.0, help="days an event stays in a person's timeline (0: no limit)"
    )
    timeline_pages: bool = env(
        "CDP_PROFILE_TIMELINE_PAGES",
        True,
        help="keep each person's newest timeline entries in its record and write the rest as pages of 16; "
        "false: a row per entry, as releases before pages did (set it while a rolling upgrade from such a "
        "release still runs replicas of it: they neither read pages nor keep a record's entries)",
    )
    peers: str = env(
        "CDP_PROFILE_PEERS",
        "",
        help="gRPC addresses of all replicas in ordinal order, comma-separated; empty: derived from "
        "CDP_POD_NAME (<set>-<i>.<set>-headless:<CDP_GRPC_PORT>). Requests about another replica's "
        "persons are forwarded there",
    )
    max_computed_traits: int = env(
        "CDP_PROFILE_MAX_COMPUTED_TRAITS",
        500,
        help="computed traits the deployment may hold (each costs every matching event and every profile); "
        "DefineComputedTrait answers RESOURCE_EXHAUSTED past it",
    )
    changes_retention_days: float = env(
        "CDP_PROFILE_CHANGES_RETENTION_DAYS", 7.0, help="days profiles.changed keeps changes"
    )

    def validate(self) -> list[str]:
        problems = ServiceSettings.validate(self) + OwnershipSettings.validate(self)
        problems += IdentifierHashSettings.validate(self)
        if self.batch_size < 1:
            problems.append(f"CDP_PROFILE_BATCH_SIZE={self.batch_size} is invalid: must be positive")
        if self.timeline_max_events < 1:
            problems.append(f"CDP_PROFILE_TIMELINE_MAX_EVENTS={self.timeline_max_events} is invalid: must be positive")
        if self.max_computed_traits < 0:
            problems.append(f"CDP_PROFILE_MAX_COMPUTED_TRAITS={self.max_computed_traits} is invalid: must be 0 or more")
        if self.timeline_max_age_days < 0:
            problems.append(
                f"CDP_PROFILE_TIMELINE_MAX_AGE_DAYS={self.timeline_max_age_days} is invalid: must be 0 or more"
            )
        static = self.ownership == "static"
        if static and self.replicas > 1 and not self.peers and "-" not in self.pod_name:
            problems.append(
                f"CDP_REPLICAS={self.replicas} needs CDP_PROFILE_PEERS or CDP_POD_NAME (a StatefulSet pod name) "
                "to forward requests to the replica owning a person"
            )
        return problems
