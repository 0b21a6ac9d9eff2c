"""The wire vocabulary: every JetStream stream name, subject and durable consumer name cdp uses.

Nothing outside this module spells a stream or subject name (`tests/test_wire_vocabulary.py` in
cdp-kit greps the repository for strays). A name changed here changes for every producer and consumer
at once; a name written out twice drifts.

Partitioned subjects end in the partition number, `<prefix>.<p>`, where p = `partition_for(key, n)`
(user id or anonymous id for raw events, person id after identity). One partition has exactly one
consumer at a time, so one person's messages are applied in order.

| stream            | subject                               | published by        | consumed by                         |
|-------------------|---------------------------------------|---------------------|-------------------------------------|
| `EVENTS_RAW`      | `events.raw.<p(user)>`                | collector           | identity (`identity-p<p>`)          |
| `EVENTS_RESOLVED` | `events.resolved.<p(person)>`         | identity            | profile (`profile-p<p>`); scoring (`scoring-quality-labels`, shared by its replicas: label events) |
| `IDENTITY`        | `identity.merged.<p(survivor)>`, `identity.unmerged.<p(survivor)>` | identity | profile (`profile-merges-p<p>`: both, filter `identity.*.<p>`) |
|                   | `identity.merged`, `identity.unmerged` (before partitioning; no longer published) | identity | profile (`profile-identity-<ordinal>`, drained if it exists) |
|                   | `identity.quarantined`                | identity            | (none yet)                          |
| `PROFILES`        | `profiles.changed.<p(person)>`        | profile             | scoring (`scoring-p<p>`), segmentation (`segmentation-p<p>`) |
| `SCORES`          | `scores.updated.<p(person)>`          | scoring             | profile (`profile-scores-p<p>`)     |
| `SEGMENTS`        | `segments.entered.<p>`, `segments.exited.<p>` | segmentation | orchestration, crm-connector     |
| `PRIVACY`         | `privacy.deleted`                     | profile (DeleteProfile) | identity (`identity-privacy-<ordinal>`), orchestration (`orchestration-privacy`), collector (reads it whole at start) |
| `ORCHESTRATION`   | `orchestration.in.<p(person)>`        | orchestration's API (commands); sourced server-side from `events.resolved`, `segments.*`, `profiles.changed`, `orchestration.fired` | orchestration (`orchestration-p<p>`) |
| `ORCHESTRATION_TIMERS` | `orchestration.timers.<p>.<timer id>` (message schedules), `orchestration.fired.<p>` (what they fire) | orchestration | `ORCHESTRATION` (sourced) |
| `ACTIONS`         | `actions.<channel>.<p(person)>`       | orchestration (arbiter) | channel dispatchers, crm-connector (`actions.crm`) |
| `CRM`             | `crm.in.<p(person)>`                  | sourced server-side from `profiles.changed`, `segments.*`, `actions.crm` | crm (`crm-p<p>`) |
|                   | `privacy.deleted` (of `PRIVACY`)      | profile             | crm (`crm-privacy`: one durable shared by the replicas) |
| `DLQ`             | `dlq.<stream>.<durable>`              | any consumer (kit)  | operators (`cdpctl dlq`)            |
| (core NATS)       | `scoring.models.changed`              | scoring             | every scoring replica               |
| (core NATS)       | `models.drift`                        | scoring (drift checks) | operators, alerting (not kept)   |
| (core NATS)       | `segmentation.segments.changed`       | segmentation        | every segmentation replica          |
| (core NATS)       | `orchestration.journeys.changed`      | orchestration       | every orchestration replica         |

The core-NATS subjects are announcements between replicas of one service (a model or a segment
definition changed: reload it); they are not kept, since each replica also reloads from its store.
"""

from __future__ import annotations

from collections.abc import Iterable

# Streams.
EVENTS_RAW = "EVENTS_RAW"
EVENTS_RESOLVED = "EVENTS_RESOLVED"
IDENTITY = "IDENTITY"
PROFILES = "PROFILES"
SCORES = "SCORES"
SEGMENTS = "SEGMENTS"
PRIVACY = "PRIVACY"
ORCHESTRATION = "ORCHESTRATION"
ORCHESTRATION_TIMERS = "ORCHESTRATION_TIMERS"
ACTIONS = "ACTIONS"
CRM = "CRM"
DLQ = "DLQ"

# Prefixes of partitioned subjects: `<prefix>.<p>`.
EVENTS_RAW_PREFIX = "events.raw"
EVENTS_RESOLVED_PREFIX = "events.resolved"
PROFILES_CHANGED_PREFIX = "profiles.changed"
SCORES_UPDATED_PREFIX = "scores.updated"
SEGMENTS_ENTERED_PREFIX = "segments.entered"
SEGMENTS_EXITED_PREFIX = "segments.exited"
# A merge's and an unmerge's notification go to the partition of the survivor (the merge's winner), so
# they reach whoever owns that person's partition, in order: `identity.merged.<p>`, `identity.unmerged.<p>`.
IDENTITY_MERGED_PREFIX = "identity.merged"
IDENTITY_UNMERGED_PREFIX = "identity.unmerged"
# Both kinds of one partition, as one consumer reads them: `identity.*.<p>`.
IDENTITY_MERGES_PREFIX = "identity.*"
ORCHESTRATION_IN_PREFIX = "orchestration.in"
ORCHESTRATION_FIRED_PREFIX = "orchestration.fired"
ORCHESTRATION_TIMERS_PREFIX = "orchestration.timers"  # `<prefix>.<p>.<timer id>`: one schedule per subject
ACTIONS_PREFIX = "actions"  # `actions.<channel>.<p>`
CRM_CHANNEL = "crm"  # the channel of CRM tasks and cases: `actions.crm.<p>`
CRM_IN_PREFIX = "crm.in"  # the CRM connector's one input: what it follows about a person, sourced
DLQ_PREFIX = "dlq"

# Subjects without partitions.
# Merge notifications as identity published them before they were partitioned: profile drains what is
# left of them on its existing per-replica durables (`profile-identity-<ordinal>`); nothing new comes.
IDENTITY_MERGED = "identity.merged"
IDENTITY_UNMERGED = "identity.unmerged"
IDENTITY_QUARANTINED = "identity.quarantined"
PRIVACY_DELETED = "privacy.deleted"
SCORING_MODELS_CHANGED = "scoring.models.changed"
# A model version's drift check found a feature or score past the threshold (scoring's DriftAlert).
MODELS_DRIFT = "models.drift"
SEGMENTATION_SEGMENTS_CHANGED = "segmentation.segments.changed"
ORCHESTRATION_JOURNEYS_CHANGED = "orchestration.journeys.changed"


# Headers nats-server puts on a direct get's answer (`$JS.API.DIRECT.GET.<stream>`), which no publisher of
# a core subject sends; and how every other JetStream API answer begins.
_ANSWER_HEADERS = ("Nats-Stream", "Nats-Sequence")
_API_ANSWER = b'{"type":"io.nats.jetstream.api.v1.'


def published_on(msg, subject: str) -> bool:
    """Whether a core NATS message came by a publish on `subject`, the subject its subscriber asked for.

    A service's NATS user may publish only its own subjects, but nats-server publishes for it elsewhere:
    - a push consumer of a stream it reads may deliver onto any subject (the permission to create a
      consumer does not look at the deliver subject in the request's body). Such a message keeps its stream
      subject (with a `$JS.ACK` reply);
    - a JetStream API request is answered on the reply subject the requester names, whatever it is, and
      permissions look at the request's subject only. A direct get's answer arrives on `subject` itself,
      carrying the message's bytes and the stream's `Nats-Stream` / `Nats-Sequence` headers (no role may
      direct-get any more, `cdp_kit.natsauth`, but a server still running an earlier version's users does
      let it); any other API answer is JSON.
    Receivers of core subjects take only what was published on theirs, and no such answer."""
    if msg.subject != subject:
        return False
    headers = msg.headers
    if headers and any(name in headers for name in _ANSWER_HEADERS):
        return False
    return not msg.data.startswith(_API_ANSWER)


# What each stream stores (its subject filter).
STREAM_SUBJECTS: dict[str, tuple[str, ...]] = {
    EVENTS_RAW: (f"{EVENTS_RAW_PREFIX}.>",),
    EVENTS_RESOLVED: (f"{EVENTS_RESOLVED_PREFIX}.>",),
    IDENTITY: ("identity.>",),
    PROFILES: ("profiles.>",),
    SCORES: ("scores.>",),
    SEGMENTS: ("segments.>",),
    PRIVACY: ("privacy.>",),
    ORCHESTRATION: (f"{ORCHESTRATION_IN_PREFIX}.*",),
    ORCHESTRATION_TIMERS: (f"{ORCHESTRATION_TIMERS_PREFIX}.>", f"{ORCHESTRATION_FIRED_PREFIX}.*"),
    ACTIONS: (f"{ACTIONS_PREFIX}.>",),
    CRM: (f"{CRM_IN_PREFIX}.*",),
    DLQ: (f"{DLQ_PREFIX}.>",),
}


def partitioned(prefix: str, partition: int) -> str:
    """`events.raw` + 3 → `events.raw.3`."""
    return f"{prefix}.{partition}"


def every_partition(prefix: str) -> str:
    """`events.raw` → `events.raw.>`: a filter matching all partitions of a partitioned subject."""
    return f"{prefix}.>"


def partition_of(subject: str) -> int:
    """`profiles.changed.3` → 3. Raises ValueError on a subject without a partition number."""
    head, _, tail = subject.rpartition(".")
    if not head or not tail.isdigit():
        raise ValueError(f"subject {subject!r} does not end in a partition number")
    return int(tail)


def events_raw(partition: int) -> str:
    return f"{EVENTS_RAW_PREFIX}.{partition}"


def events_resolved(partition: int) -> str:
    return f"{EVENTS_RESOLVED_PREFIX}.{partition}"


def identity_merged(partition: int) -> str:
    return f"{IDENTITY_MERGED_PREFIX}.{partition}"


def identity_unmerged(partition: int) -> str:
    return f"{IDENTITY_UNMERGED_PREFIX}.{partition}"


def profiles_changed(partition: int) -> str:
    return f"{PROFILES_CHANGED_PREFIX}.{partition}"


def scores_updated(partition: int) -> str:
    return f"{SCORES_UPDATED_PREFIX}.{partition}"


def segments_entered(partition: int) -> str:
    return f"{SEGMENTS_ENTERED_PREFIX}.{partition}"


def segments_exited(partition: int) -> str:
    return f"{SEGMENTS_EXITED_PREFIX}.{partition}"


def orchestration_in(partition: int) -> str:
    return f"{ORCHESTRATION_IN_PREFIX}.{partition}"


def orchestration_fired(partition: int) -> str:
    return f"{ORCHESTRATION_FIRED_PREFIX}.{partition}"


def orchestration_timer(partition: int, timer_id: str) -> str:
    """The schedule subject of one durable timer: purging (or rolling up) it cancels the timer."""
    return f"{ORCHESTRATION_TIMERS_PREFIX}.{partition}.{timer_id}"


def actions(channel: str, partition: int) -> str:
    """`email`, 3 → `actions.email.3`."""
    return f"{ACTIONS_PREFIX}.{channel}.{partition}"


def actions_of(channel: str) -> str:
    """Every partition of one channel's actions: `actions.email.>`."""
    return f"{ACTIONS_PREFIX}.{channel}.>"


def crm_in(partition: int) -> str:
    return f"{CRM_IN_PREFIX}.{partition}"


def dead_letter(stream: str, durable: str) -> str:
    """Where the kit's consumer puts what durable `durable` of `stream` gave up on."""
    return f"{DLQ_PREFIX}.{stream}.{durable}"


def dead_letter_filter(stream: str | None = None, durable: str | None = None) -> str:
    """A filter over dead letters: all of them, one stream's, or one consumer's."""
    if not stream:
        return f"{DLQ_PREFIX}.>"
    return dead_letter(stream, durable or "*")


# Durable consumer names. A partition's consumer is named after its partition, not after a replica, so
# the partition keeps its position when it moves to another replica; a consumer every replica needs for
# itself (a broadcast such as privacy.deleted) is named after the replica's ordinal.


def partition_durable(service: str, partition: int, *, input: str | None = None) -> str:
    """`identity`, 3 → `identity-p3`; with input `scores` → `profile-scores-p3` (a second partitioned input)."""
    return f"{service}-{input}-p{partition}" if input else f"{service}-p{partition}"


def shared_durable(service: str, input: str) -> str:
    """`crm`, `privacy` → `crm-privacy`: one consumer every replica of a service shares (work split among them)."""
    return f"{service}-{input}"


def replica_durable(service: str, input: str, ordinal: int) -> str:
    """`identity`, `privacy`, 0 → `identity-privacy-0`: one consumer per replica of a broadcast input."""
    return f"{service}-{input}-{ordinal}"


# The services that follow `privacy.deleted` with a durable consumer and acknowledge a deletion only once
# their purge is durable: each replica with its own (`replica_durable`: every replica holds the person in
# memory) or the replicas sharing one (`shared_durable`: each request handled once). A deletion is done
# when every one of them has acknowledged it (`cdpctl delete --wait`). The collector follows the stream
# without a consumer; profile publishes it.
PRIVACY_FOLLOWERS: dict[str, str] = {"identity": "replica", "orchestration": "shared", "crm": "shared"}


def privacy_durables(services: Iterable[str]) -> list[str]:
    """The durable consumers of `privacy.deleted` a platform running `services` has: `identity`, `crm` →
    `crm-privacy`, `identity-privacy-0` (a per-replica consumer by its first replica's; more replicas add
    theirs)."""
    names = []
    for service in services:
        kind = PRIVACY_FOLLOWERS.get(service)
        if kind == "shared":
            names.append(shared_durable(service, "privacy"))
        elif kind == "replica":
            names.append(replica_durable(service, "privacy", 0))
    return sorted(names)


def checkpoints_collection(service: str) -> str:
    """Where a service stores its stream positions: `identity` → `identity_checkpoints`."""
    return f"{service}_checkpoints"
