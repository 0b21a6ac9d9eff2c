"""JetStream streams cdp uses, and idempotent provisioning.

Stream names and subjects come from `cdp_kit.bus.subjects`, which says who publishes and consumes what.
The provisioner (`cdp_kit.provision`, from the table in `cdp_kit.streamtable`) creates every stream with
an operator identity; a service connected as its own NATS user may not, and verifies each at start
instead (`verify_stream`, through `Bus.ensure_*`). Without NATS users (a bare nats-server) a service
calls `ensure_stream` itself: creating a stream that exists with the same configuration is a no-op; a
changed configuration (say a longer retention) is applied with an update; two replicas racing to create
the same stream both succeed. An update keeps the partition count a stream records
(`cdp_kit.bus.partition_count`: the provisioner records it, every partitioned engine checks it at start).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError

from cdp_kit.bus import partition_count, subjects
from cdp_kit.bus.setup import answered

log = logging.getLogger("cdp.bus")

DAY = 86_400.0


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    max_age: float = 7 * DAY
    # JetStream drops a publish whose Nats-Msg-Id it has seen within this window, so a producer that
    # retries after a lost ack stores each event once. Beyond the window, consumers are idempotent.
    duplicate_window: float = 600.0
    max_bytes: int = -1
    max_msg_size: int = -1
    replicas: int = 1
    storage: api.StorageType = api.StorageType.FILE
    discard: api.DiscardPolicy = api.DiscardPolicy.OLD
    description: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    def config(self) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.name,
            description=self.description or None,
            subjects=list(self.subjects),
            retention=api.RetentionPolicy.LIMITS,
            max_age=self.max_age,
            max_bytes=self.max_bytes,
            max_msg_size=self.max_msg_size,
            duplicate_window=self.duplicate_window,
            num_replicas=self.replicas,
            storage=self.storage,
            discard=self.discard,
            allow_direct=True,
            metadata=self.metadata or None,
        )


def events_raw_stream(*, max_age: float = 7 * DAY, duplicate_window: float = 600.0, replicas: int = 1) -> StreamSpec:
    """Everything the collector accepted, partitioned by user (`events.raw.<p>`)."""
    return StreamSpec(
        name=subjects.EVENTS_RAW,
        subjects=subjects.STREAM_SUBJECTS[subjects.EVENTS_RAW],
        max_age=max_age,
        duplicate_window=duplicate_window,
        replicas=replicas,
        description="events accepted at the edge, one message per event, partitioned by user",
    )


def events_resolved_stream(
    *, max_age: float = 7 * DAY, duplicate_window: float = 600.0, replicas: int = 1
) -> StreamSpec:
    """Events with their person (`events.resolved.<p(person)>`), published by identity."""
    return StreamSpec(
        name=subjects.EVENTS_RESOLVED,
        subjects=subjects.STREAM_SUBJECTS[subjects.EVENTS_RESOLVED],
        max_age=max_age,
        duplicate_window=duplicate_window,
        replicas=replicas,
        description="events after identity resolution, partitioned by person",
    )


def identity_stream(*, max_age: float = 30 * DAY, replicas: int = 1) -> StreamSpec:
    """Graph changes other services follow: `identity.merged`, `identity.unmerged`, `identity.quarantined`."""
    return StreamSpec(
        name=subjects.IDENTITY,
        subjects=subjects.STREAM_SUBJECTS[subjects.IDENTITY],
        max_age=max_age,
        duplicate_window=600.0,
        replicas=replicas,
        description="identity graph changes: merges, unmerges, quarantined identifiers",
    )


def profiles_stream(*, max_age: float = 7 * DAY, replicas: int = 1) -> StreamSpec:
    """What changed in each profile (`profiles.changed.<p(person)>`), published by profile."""
    return StreamSpec(
        name=subjects.PROFILES,
        subjects=subjects.STREAM_SUBJECTS[subjects.PROFILES],
        max_age=max_age,
        duplicate_window=600.0,
        replicas=replicas,
        description="profile changes (traits, computed traits, consent, scores), partitioned by person",
    )


def scores_stream(*, max_age: float = 7 * DAY, replicas: int = 1) -> StreamSpec:
    """Model scores of persons (`scores.updated.<p(person)>`), published by scoring; profile stores them."""
    return StreamSpec(
        name=subjects.SCORES,
        subjects=subjects.STREAM_SUBJECTS[subjects.SCORES],
        max_age=max_age,
        duplicate_window=600.0,
        replicas=replicas,
        description="model scores per person (model, version, scores), partitioned by person",
    )


def segments_stream(*, max_age: float = 7 * DAY, replicas: int = 1) -> StreamSpec:
    """Segment membership transitions (`segments.entered.<p(person)>`, `segments.exited.<p(person)>`),
    published by segmentation; orchestration and crm-connector consume them."""
    return StreamSpec(
        name=subjects.SEGMENTS,
        subjects=subjects.STREAM_SUBJECTS[subjects.SEGMENTS],
        max_age=max_age,
        duplicate_window=600.0,
        replicas=replicas,
        description="segment membership transitions (person, segment, time, reason), partitioned by person",
    )


def privacy_stream(*, replicas: int = 1) -> StreamSpec:
    """Privacy requests every service acts on (`privacy.deleted`). Kept without an age limit: a
    suppression lasts until lifted, and a service that was down must still purge when it returns.
    The messages carry hashed identifiers only."""
    return StreamSpec(
        name=subjects.PRIVACY,
        subjects=subjects.STREAM_SUBJECTS[subjects.PRIVACY],
        max_age=0,
        duplicate_window=600.0,
        replicas=replicas,
        description="privacy requests: deletions and suppressions for every service and CRM",
    )


def dead_letter_stream(*, max_age: float = 30 * DAY, replicas: int = 1) -> StreamSpec:
    """Messages a consumer gave up on, with the reason in headers (`dlq.<stream>.<consumer>`)."""
    return StreamSpec(
        name=subjects.DLQ,
        subjects=subjects.STREAM_SUBJECTS[subjects.DLQ],
        max_age=max_age,
        duplicate_window=120.0,
        replicas=replicas,
        description="dead letters: the original message plus why it could not be handled",
    )


def actions_stream(*, max_age: float = 7 * DAY, replicas: int = 1) -> StreamSpec:
    """Actions the orchestration arbiter let through (`actions.<channel>.<p(person)>`): channel
    dispatchers and the CRM connector consume them. One definition, whichever service starts first."""
    return StreamSpec(
        name=subjects.ACTIONS,
        subjects=subjects.STREAM_SUBJECTS[subjects.ACTIONS],
        max_age=max_age,
        duplicate_window=600.0,
        replicas=replicas,
        description="actions the arbiter let through, per channel and person partition",
    )


# --- a service's partitioned input, sourced server-side from the streams it follows ---------------------

SOURCE_HEADER = "Nats-Stream-Source"


def sourced_input_stream(
    name: str,
    *,
    into_prefix: str,
    sources: dict[str, tuple[str, ...]],
    description: str,
    max_age: float = 7 * DAY,
    duplicate_window: float = 600.0,
) -> api.StreamConfig:
    """One input stream per consuming service holding `<into_prefix>.<p>`: each source stream's
    `<prefix>.<p>` subjects (for every prefix listed under its name) are copied into partition p by
    the server (stream sources with subject transforms). Everything the service follows about a person
    then reaches one partition in one order, so one engine applies it. A sourced message keeps its
    payload and `Nats-Msg-Id` and says where it came from in `Nats-Stream-Source` (`source_of`)."""

    def transform(prefix: str) -> api.SubjectTransform:
        return api.SubjectTransform(src=f"{prefix}.*", dest=f"{into_prefix}.{{{{wildcard(1)}}}}")

    return api.StreamConfig(
        name=name,
        description=description,
        subjects=list(subjects.STREAM_SUBJECTS[name]),
        retention=api.RetentionPolicy.LIMITS,
        max_age=max_age,
        duplicate_window=duplicate_window,
        storage=api.StorageType.FILE,
        allow_direct=True,
        sources=[
            api.StreamSource(name=stream, subject_transforms=[transform(p) for p in prefixes])
            for stream, prefixes in sources.items()
        ],
    )


async def ensure_created(js: JetStreamContext, *configs: api.StreamConfig) -> None:
    """Create each stream when missing, in order. An existing one is left as it is: a sourced stream's
    source start positions must not move, and an operator's change stays."""
    for config in configs:
        await answered(js, f"stream {config.name}", lambda config=config: _create_if_missing(js, config))


async def _create_if_missing(js: JetStreamContext, config: api.StreamConfig) -> None:
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        try:
            await js.add_stream(config)
            log.info("created stream %s", config.name)
        except Exception:
            await js.stream_info(config.name)  # another replica created it in between


def source_of(headers: dict[str, str] | None) -> tuple[str, str]:
    """(source stream, original subject) of a message a stream sourced; ("", "") for anything else.
    The header reads `<stream> <seq> <filter> <transform> <original subject>`."""
    source = (headers or {}).get(SOURCE_HEADER)
    if not source:
        return "", ""
    parts = source.split(" ")
    return parts[0], parts[4] if len(parts) > 4 else ""


# Fields an update may change; anything else differing is a deliberate operator change we leave alone.
# The last four move messages between streams and subjects inside the account, where nats-server checks
# no user's permissions: a stream given a source, a mirror, a republish or a subject transform its spec
# does not have is always found (and fails a service's start, `verify_stream`).
ROUTING = ("sources", "mirror", "republish", "subject_transform")
_COMPARED = (
    "subjects",
    "max_age",
    "duplicate_window",
    "max_bytes",
    "max_msg_size",
    "description",
    "discard",
    *ROUTING,
)
# What a reader of another service's stream checks: where the stream's messages come from and go. Its
# retention and limits are the owner's (the reader's spec carries defaults).
ROUTED = ("subjects", *ROUTING)


def _source(source: api.StreamSource | dict | None) -> tuple | None:
    """A source or mirror as compared: the stream, its filter and its transforms (start positions and
    the server's bookkeeping left out)."""
    if source is None:
        return None
    if not isinstance(source, dict):
        source = source.as_dict()
    transforms = source.get("subject_transforms") or []
    return (
        source.get("name"),
        source.get("filter_subject") or None,
        tuple(
            sorted(
                (t.get("src"), t.get("dest")) for t in (x if isinstance(x, dict) else x.as_dict() for x in transforms)
            )
        ),
        bool(source.get("external")),
    )


def _setting(config: api.StreamConfig, name: str):
    value = getattr(config, name)
    if name == "subjects":
        return sorted(value or [])
    if name in ("max_age", "duplicate_window"):
        return round(float(value or 0), 3)
    if name in ("max_bytes", "max_msg_size"):
        return -1 if value is None else value  # unset: no limit, as the server reports it
    if name == "description":
        return value or ""
    if name == "discard":
        return value or api.DiscardPolicy.OLD
    if name == "sources":
        return sorted((_source(s) for s in value or []), key=repr)
    if name == "mirror":
        return _source(value)
    if name in ("republish", "subject_transform"):
        if value is None:
            return None
        value = value if isinstance(value, dict) else value.as_dict()
        return tuple(sorted((k, v) for k, v in value.items() if v not in (None, False)))
    return value


def _differs(current: api.StreamConfig, wanted: api.StreamConfig, fields: tuple[str, ...] = _COMPARED) -> list[str]:
    return [name for name in fields if _setting(current, name) != _setting(wanted, name)]


class StreamMismatch(RuntimeError):
    """A stream a service needs is missing or configured otherwise than its spec: the service does not start."""


FIX = (
    "streams are created and configured by the provisioner with an operator identity (`cdpctl up` runs it "
    "before the services; under Kubernetes the chart's provisioning Job, `python -m cdp_kit.provision`): run "
    "it again, then start this service"
)


async def verify_stream(js: JetStreamContext, wanted: api.StreamConfig, fields: tuple[str, ...] = _COMPARED):
    """The stream as it is, when it exists and `fields` of its configuration are `wanted`'s; otherwise
    StreamMismatch naming the stream, each setting that differs (as it is and as the spec has it) and the fix.
    What a service whose NATS user may not create or update streams does at start instead of ensuring them."""
    try:
        info = await answered(js, f"stream {wanted.name}", lambda: js.stream_info(wanted.name))
    except NotFoundError:
        raise StreamMismatch(f"stream {wanted.name} does not exist: {FIX}") from None
    changed = _differs(info.config, wanted, fields)
    if changed:
        what = "; ".join(
            f"{name} is {_shown(info.config, name)}, the spec has {_shown(wanted, name)}" for name in changed
        )
        raise StreamMismatch(f"stream {wanted.name} is not configured as cdp specifies it ({what}): {FIX}")
    return info


def _shown(config: api.StreamConfig, name: str) -> str:
    value = _setting(config, name)
    return "none" if value in (None, []) else repr(value)


async def ensure_stream(js: JetStreamContext, spec: StreamSpec, *, update: bool = True) -> api.StreamInfo:
    """Create the stream if it is missing; if it exists and differs, bring it to `spec` - unless
    `update` is False: a service that reads (or writes into) a stream another service owns and
    configures creates it with defaults when it starts first, and never overwrites the owner's
    settings (retention, de-duplication window) afterwards. A server that does not answer in time is
    asked again (`cdp_kit.bus.setup`): each step is idempotent."""
    return await answered(js, f"stream {spec.name}", lambda: _ensure_stream(js, spec, update=update))


async def _ensure_stream(js: JetStreamContext, spec: StreamSpec, *, update: bool) -> api.StreamInfo:
    wanted = spec.config()
    for _attempt in range(3):
        try:
            info = await js.stream_info(spec.name)
        except NotFoundError:
            try:
                info = await js.add_stream(wanted)
                log.info("created stream %s", spec.name, extra={"subjects": list(spec.subjects)})
                return info
            except BadRequestError as exc:
                # Another replica created it between our lookup and our create: look again.
                if exc.err_code == 10058:
                    continue
                raise
        changed = _differs(info.config, wanted)
        if not changed or not update:
            return info
        # The partition count the stream records stays (an update without it would erase it).
        info = await js.update_stream(partition_count.carried(info.config, wanted))
        log.info("updated stream %s", spec.name, extra={"changed": changed})
        return info
    raise RuntimeError(f"could not create or read stream {spec.name}")
