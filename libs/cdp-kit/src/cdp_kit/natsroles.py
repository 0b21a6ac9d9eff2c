"""The NATS roles table: per service, what it does on the bus (`ROLES`), and the names it is granted.

`cdp_kit.natsauth` turns a role into nats-server permissions and the server's `authorization` block;
this module only says which streams take each service's settings, which others it uses, and what it
consumes, reads, erases, publishes and follows. Everything here is re-exported by `cdp_kit.natsauth`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cdp_kit.bus import subjects

# The KV bucket of partition ownership (cdp_kit.ownership.nats_kv); keys are `<group>.…`.
OWNERSHIP_BUCKET = "CDP_OWNERSHIP"
# The object store scoring may keep its models in (CDP_SCORING_MODEL_STORE=nats://cdp-models).
MODEL_BUCKET = "cdp-models"
# The user cdpctl (and tests) connect as under `cdpctl up`: no limits. The chart has no such user.
OPERATOR = "cdpctl"


# Placeholders in a consumer's name: one name per partition (`identity-p{partition}`) or per replica
# (`identity-privacy-{ordinal}`). `expand` spells them out for a platform's partition and replica counts
# (`cdpctl up` here, the chart's templates/_nats.tpl from its values: the same rule in both places).
PARTITION = "{partition}"
ORDINAL = "{ordinal}"
# A consumer name granted whatever it is: only for a stream no other role consumes (a test holds this).
# No role uses it today: every consumer, orchestration's dispatchers included, is granted by name.
ANY = "*"


# The channels orchestration dispatches actions on (`actions.<channel>.<p>`), each with one durable
# consumer of ACTIONS named by `dispatch_durable` (a test holds both to cdp_orchestration's own).
ACTION_CHANNELS = ("email", "sms", "push", "webpush", "webhook", "inapp", "crm")


def dispatch_durable(channel: str) -> str:
    """The durable consumer of ACTIONS that sends `channel`'s actions."""
    return f"orchestration-dispatch-{channel}"


@dataclass(frozen=True)
class Consumer:
    """One durable consumer a role keeps: `stream` and its name (which may hold `PARTITION` or `ORDINAL`)."""

    stream: str
    name: str


def _per_partition(stream: str, service: str, input: str | None = None) -> Consumer:
    return Consumer(stream, subjects.partition_durable(service, PARTITION, input=input))  # type: ignore[arg-type]


def _per_replica(stream: str, service: str, input: str) -> Consumer:
    return Consumer(stream, subjects.replica_durable(service, input, ORDINAL))  # type: ignore[arg-type]


def _shared(stream: str, service: str, input: str) -> Consumer:
    return Consumer(stream, subjects.shared_durable(service, input))


@dataclass(frozen=True)
class BusRole:
    """What one service does on NATS. Stream names and subjects come from `cdp_kit.bus.subjects`."""

    name: str
    # Streams whose settings are its own (its retention variables; `Bus.ensure_streams` checks them all).
    # Neither list grants a create or an update: the provisioner (cdp_kit.provision) makes every stream.
    configures: tuple[str, ...] = ()
    # Other services' streams it uses (`Bus.ensure_read_streams`, `Bus.ensure_created`: verified, their
    # routing included) and whose lookup it is granted.
    creates: tuple[str, ...] = ()
    # The durable consumers it keeps, by name: consumer management, fetch, ack, dead letters of each.
    consumers: tuple[Consumer, ...] = ()
    # Streams it reads single messages from (get by sequence, last by subject).
    reads: tuple[str, ...] = ()
    # Streams it removes single messages from (an erased action).
    erases: tuple[str, ...] = ()
    # Subjects it publishes (stream subjects it owns and core-NATS announcements).
    publishes: tuple[str, ...] = ()
    # Core-NATS subjects it subscribes to.
    subscribes: tuple[str, ...] = ()
    # Object stores it keeps files in.
    object_stores: tuple[str, ...] = ()

    @property
    def consumes(self) -> tuple[str, ...]:
        """The streams it consumes."""
        return tuple(_unique(c.stream for c in self.consumers))


def _each(prefix: str) -> str:
    return subjects.every_partition(prefix)


# Every service may announce on / follow its own core subjects and keep its ownership leases.
ROLES: dict[str, BusRole] = {
    role.name: role
    for role in (
        BusRole(
            "collector",
            configures=(subjects.EVENTS_RAW,),  # it consumes nothing: no dead letters of its own
            creates=(subjects.PRIVACY,),
            # The suppression list: privacy.deleted read message by message, woken by the core subject.
            # No consumer rights on PRIVACY: the edge could otherwise rewrite or drain identity's consumer
            # of deletions (a consumer is known by its name alone).
            reads=(subjects.PRIVACY,),
            publishes=(_each(subjects.EVENTS_RAW_PREFIX),),
            subscribes=(subjects.PRIVACY_DELETED,),
        ),
        BusRole(
            "identity",
            # The dead letters' stream is identity's to configure (every deployment runs it); the other
            # consumers write into it and create it when missing, and none may shrink or redirect it.
            configures=(subjects.EVENTS_RESOLVED, subjects.IDENTITY, subjects.DLQ),
            creates=(subjects.EVENTS_RAW, subjects.PRIVACY),
            consumers=(
                _per_partition(subjects.EVENTS_RAW, "identity"),
                _per_replica(subjects.PRIVACY, "identity", "privacy"),
            ),
            publishes=(
                *subjects.STREAM_SUBJECTS[subjects.EVENTS_RESOLVED],
                *subjects.STREAM_SUBJECTS[subjects.IDENTITY],
            ),
        ),
        BusRole(
            "profile",
            configures=(subjects.PROFILES, subjects.PRIVACY),
            creates=(subjects.EVENTS_RESOLVED, subjects.IDENTITY, subjects.SCORES, subjects.DLQ),
            consumers=(
                _per_partition(subjects.EVENTS_RESOLVED, "profile"),
                _per_partition(subjects.IDENTITY, "profile", "merges"),
                _per_replica(subjects.IDENTITY, "profile", "identity"),  # drained, never created anew
                _per_partition(subjects.SCORES, "profile", "scores"),
            ),
            # Deletions applied again at start (services/profile notices.py): read message by message, no
            # consumer.
            reads=(subjects.PRIVACY,),
            publishes=(_each(subjects.PROFILES_CHANGED_PREFIX), subjects.PRIVACY_DELETED),
        ),
        BusRole(
            "scoring",
            configures=(subjects.SCORES,),
            creates=(subjects.PROFILES, subjects.EVENTS_RESOLVED, subjects.DLQ),
            consumers=(
                _per_partition(subjects.PROFILES, "scoring"),
                # Label events on events.resolved make realised quality stale (one durable the replicas
                # share, so that one arriving while scoring is down is not missed).
                _shared(subjects.EVENTS_RESOLVED, "scoring", "quality-labels"),
            ),
            # PRIVACY: deletions applied again at start (cdp_scoring.notices), read message by message.
            reads=(subjects.PROFILES, subjects.PRIVACY),
            publishes=(_each(subjects.SCORES_UPDATED_PREFIX), subjects.SCORING_MODELS_CHANGED, subjects.MODELS_DRIFT),
            subscribes=(subjects.SCORING_MODELS_CHANGED,),
            object_stores=(MODEL_BUCKET,),
        ),
        BusRole(
            "segmentation",
            configures=(subjects.SEGMENTS,),
            creates=(subjects.PROFILES, subjects.DLQ),
            consumers=(_per_partition(subjects.PROFILES, "segmentation"),),
            # PRIVACY: deletions applied again where a partition arrives (cdp_segmentation.notices).
            reads=(subjects.PROFILES, subjects.PRIVACY),
            publishes=(
                _each(subjects.SEGMENTS_ENTERED_PREFIX),
                _each(subjects.SEGMENTS_EXITED_PREFIX),
                subjects.SEGMENTATION_SEGMENTS_CHANGED,
            ),
            subscribes=(
                subjects.SEGMENTATION_SEGMENTS_CHANGED,
                # ListComputedTraitReaders' kept answers are forgotten on these (segmentation's cache.py)
                subjects.ORCHESTRATION_JOURNEYS_CHANGED,
                subjects.SCORING_MODELS_CHANGED,
            ),
        ),
        BusRole(
            "orchestration",
            creates=(
                subjects.PRIVACY,
                subjects.ORCHESTRATION,
                subjects.ORCHESTRATION_TIMERS,
                subjects.ACTIONS,
                subjects.DLQ,
            ),
            consumers=(
                _per_partition(subjects.ORCHESTRATION, "orchestration"),
                _shared(subjects.PRIVACY, "orchestration", "privacy"),
                # `orchestration-dispatch-<channel>`, one per channel it can run (the CRM connector
                # sources actions.crm server-side): by name, like every other consumer.
                *(Consumer(subjects.ACTIONS, dispatch_durable(channel)) for channel in ACTION_CHANNELS),
            ),
            reads=(subjects.ACTIONS,),
            erases=(subjects.ACTIONS,),
            publishes=(
                _each(subjects.ORCHESTRATION_IN_PREFIX),
                _each(subjects.ORCHESTRATION_TIMERS_PREFIX),
                _each(subjects.ACTIONS_PREFIX),
                subjects.ORCHESTRATION_JOURNEYS_CHANGED,
            ),
            subscribes=(subjects.ORCHESTRATION_JOURNEYS_CHANGED,),
        ),
        BusRole(
            "crm",
            # The connector makes sure the streams it sources exist, with their owners' configuration,
            # and never changes them.
            creates=(
                subjects.PROFILES,
                subjects.SEGMENTS,
                subjects.PRIVACY,
                subjects.ACTIONS,
                subjects.CRM,
                subjects.DLQ,
            ),
            consumers=(_per_partition(subjects.CRM, "crm"), _shared(subjects.PRIVACY, "crm", "privacy")),
            # PRIVACY: deletions applied again at start (cdp_crm.notices), read message by message.
            reads=(subjects.PRIVACY,),
        ),
    )
}


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def inbox_prefix(service: str) -> str:
    """Where a service's replies arrive (JetStream API answers, publish acks, fetched messages)."""
    return f"_INBOX.{service}"


def role_of(user: str) -> str:
    """`profile` and `profile.2` (a rotated generation) are both the profile service's users."""
    return user.split(".", 1)[0]
