"""Segmentation configuration: every variable, its default and meaning (also listed in the README)."""

from __future__ import annotations

from dataclasses import dataclass

from cdp_kit.ownership import OwnershipSettings
from cdp_kit.settings import ServiceSettings, env


@dataclass(frozen=True, kw_only=True)
class SegmentationSettings(OwnershipSettings, ServiceSettings):
    """Which partitions this replica works on comes from `OwnershipSettings` (`CDP_OWNERSHIP`): static
    (p % CDP_REPLICAS == CDP_POD_ORDINAL), or leases that follow the live replicas (nats, kubernetes);
    a hot standby replica (`CDP_SEGMENTATION_STANDBY`) works on every partition whatever it says."""

    service_name: str = env("OTEL_SERVICE_NAME", "segmentation", help="service name in traces, metrics and logs")
    grpc_port: int = env("CDP_GRPC_PORT", 50055, help="gRPC port (SegmentationService, health, reflection)")
    profile_address: str = env(
        "CDP_PROFILE_ADDRESS",
        "",
        help="profile gRPC address (host:port): event conditions are defined there as computed traits, and "
        "persons not yet seen on profiles.changed are read there; empty: definitions with event conditions "
        "are refused",
    )
    profile_token: str = env(
        "CDP_PROFILE_TOKEN",
        "",
        help="bearer token for the profile service (profile:read, and profile:admin to define computed traits)",
        secret=True,
    )
    scoring_address: str = env(
        "CDP_SCORING_ADDRESS",
        "",
        help="scoring gRPC address (host:port): a new definition's scores.<name> must be a score a deployed "
        "model writes (ListModels), or it is refused with INVALID_ARGUMENT; empty, unreachable, or listing no "
        "model yet: scores are not checked. The readers of a computed trait (ListComputedTraitReaders) include "
        "the deployed model versions whose features read it (UNAVAILABLE while scoring cannot be asked); "
        "empty: models are not asked",
    )
    scoring_token: str = env(
        "CDP_SCORING_TOKEN", "", help="bearer token for the scoring service (scoring:read)", secret=True
    )
    orchestration_address: str = env(
        "CDP_ORCHESTRATION_ADDRESS",
        "",
        help="orchestration gRPC address (host:port): DeleteSegment is refused while a live journey uses the "
        "segment, and the readers of a computed trait (ListComputedTraitReaders) include live journeys, as "
        "ListJourneys gives them (UNAVAILABLE while it cannot be asked); empty: journeys are not asked",
    )
    orchestration_token: str = env(
        "CDP_ORCHESTRATION_TOKEN",
        "",
        help="bearer token for the orchestration service (orchestration:read)",
        secret=True,
    )
    batch_size: int = env("CDP_SEGMENTATION_BATCH_SIZE", 64, help="profiles.changed messages fetched per batch")
    ack_wait: float = env(
        "CDP_SEGMENTATION_ACK_WAIT", 30.0, help="seconds before JetStream redelivers an unacknowledged batch"
    )
    snapshot_interval: float = env(
        "CDP_SEGMENTATION_SNAPSHOT_SECONDS",
        10.0,
        help="seconds between snapshots of fields and memberships (a restart replays profiles.changed from the "
        "last one; keep it far below the SEGMENTS stream's 10-minute duplicate window)",
    )
    timer_resolution: float = env(
        "CDP_SEGMENTATION_TIMER_SECONDS",
        0.25,
        help="longest sleep of the timer loop (a time condition fires at most this late, and no earlier than due)",
    )
    standby: bool = env(
        "CDP_SEGMENTATION_STANDBY",
        False,
        help="every replica holds every partition (its own consumers, checkpoints and snapshots, whatever "
        "CDP_OWNERSHIP says) and repeats the others' lifecycle calls: any replica answers any call, and both "
        "publish each transition under the same id, which JetStream keeps once; CDP_POD_ORDINAL names its own "
        "consumers",
    )
    peers: str = env(
        "CDP_SEGMENTATION_PEERS",
        "",
        help="static ownership with several replicas: the replicas' gRPC addresses in ordinal order, "
        "comma-separated; empty: derived from CDP_POD_NAME (<set>-<i>.<set>-headless:<CDP_GRPC_PORT>). An "
        "export of a person of another replica's partition asks that replica",
    )
    max_computed_traits: int = env(
        "CDP_SEGMENTATION_MAX_COMPUTED_TRAITS",
        20,
        help="computed traits one definition may need on the profile service (one per distinct event "
        "condition); a definition needing more is refused with INVALID_ARGUMENT",
    )
    max_estimates: int = env(
        "CDP_SEGMENTATION_MAX_ESTIMATES",
        2,
        help="Estimates one replica evaluates at once (a preview of a definition, segmentation:read); more are "
        "refused with RESOURCE_EXHAUSTED and a retry hint",
    )
    estimate_seconds: float = env(
        "CDP_SEGMENTATION_ESTIMATE_SECONDS",
        10.0,
        help="time budget of one Estimate (computed traits defined and backfilled, the population evaluated); "
        "past it the estimate is stopped, its computed traits deleted, and it answers RESOURCE_EXHAUSTED naming "
        "this budget",
    )
    estimate_traits: int = env(
        "CDP_SEGMENTATION_ESTIMATE_TRAITS",
        40,
        help="computed traits the Estimates under way may define on the profile service at once that no segment "
        "reads (temporary ones, deleted after each); an Estimate that would pass it is refused with "
        "RESOURCE_EXHAUSTED. Keep it far below the profile service's CDP_PROFILE_MAX_COMPUTED_TRAITS (500)",
    )
    readers_cache_seconds: float = env(
        "CDP_SEGMENTATION_READERS_CACHE_SECONDS",
        0.0,
        help="seconds ListComputedTraitReaders keeps orchestration's live journeys and scoring's models (one call "
        "of each at a time, whoever asks); an announced change (a journey published or archived, a model "
        "deployed or promoted) is seen at once; 0: asked on every call",
    )
    percentile_interval: float = env(
        "CDP_SEGMENTATION_PERCENTILE_SECONDS",
        5.0,
        help="seconds between recomputations of the population percentiles definitions compare with "
        "(percentile(...)), when a change moved them: rounds run at the multiples of it since the epoch, "
        "which are their ids (give every replica the same value); each costs one pass over the held persons",
    )
    segments_retention_days: float = env(
        "CDP_SEGMENTATION_RETENTION_DAYS", 7.0, help="days segments.entered/exited keep transitions"
    )

    def validate(self) -> list[str]:
        problems = ServiceSettings.validate(self)
        if not self.standby:
            problems += OwnershipSettings.validate(self)
            peers = [a for a in self.peers.split(",") if a.strip()]
            if peers and self.ownership == "static" and len(peers) != self.replicas:
                problems.append(
                    f"CDP_SEGMENTATION_PEERS lists {len(peers)} addresses for CDP_REPLICAS={self.replicas}: "
                    "give every replica's, in ordinal order"
                )
        if self.batch_size < 1:
            problems.append(f"CDP_SEGMENTATION_BATCH_SIZE={self.batch_size} is invalid: must be positive")
        if not 0 < self.snapshot_interval <= 300:
            problems.append(
                f"CDP_SEGMENTATION_SNAPSHOT_SECONDS={self.snapshot_interval} is invalid: must be in (0, 300] "
                "(the duplicate window is 600 s)"
            )
        if not 0 < self.timer_resolution <= 60:
            problems.append(f"CDP_SEGMENTATION_TIMER_SECONDS={self.timer_resolution} is invalid: must be in (0, 60]")
        if not 0 < self.percentile_interval <= 3600:
            problems.append(
                f"CDP_SEGMENTATION_PERCENTILE_SECONDS={self.percentile_interval} is invalid: must be in (0, 3600]"
            )
        if self.max_estimates < 1:
            problems.append(f"CDP_SEGMENTATION_MAX_ESTIMATES={self.max_estimates} is invalid: must be 1 or more")
        if not 0 < self.estimate_seconds <= 3600:
            problems.append(
                f"CDP_SEGMENTATION_ESTIMATE_SECONDS={self.estimate_seconds} is invalid: must be in (0, 3600]"
            )
        if self.estimate_traits < 0:
            problems.append(f"CDP_SEGMENTATION_ESTIMATE_TRAITS={self.estimate_traits} is invalid: must be 0 or more")
        if not 0 <= self.readers_cache_seconds <= 60:
            problems.append(
                f"CDP_SEGMENTATION_READERS_CACHE_SECONDS={self.readers_cache_seconds} is invalid: must be in [0, 60]"
            )
        if self.max_computed_traits < 0:
            problems.append(
                f"CDP_SEGMENTATION_MAX_COMPUTED_TRAITS={self.max_computed_traits} is invalid: must be 0 or more"
            )
        return problems
