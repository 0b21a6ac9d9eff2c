"""The partition count a platform's streams were made with, recorded in each partitioned stream.

Every partitioned service keeps its stream positions, snapshots and state per partition, and the
collector and identity route each event by `partition_for(key, CDP_PARTITIONS)`: a platform whose
services run with another count than its data was made with splits persons another way (two owners of
one person, or none), silently. So the count is recorded where every service can read it with the
permissions it has: in the `metadata` of each partitioned stream (`KEY`, e.g. `"cdp.partitions": "8"`;
nats-server keeps a stream's metadata since 2.10), which a service looks up at start anyway.

- The provisioner (`cdp_kit.provision`) writes it when it makes a stream, and refuses to provision
  streams that record another count than its CDP_PARTITIONS, naming both, before it changes anything.
- A partitioned engine (`cdp_kit.engine`) checks the streams it reads when it starts (`check`): a
  service whose CDP_PARTITIONS differs stops (`PartitionsMismatch`, one log line naming both counts).
  Without NATS users (a bare nats-server, tests) the first engine to find a stream without a record
  writes its own count; under a service's own NATS user, which may not update a stream, a stream
  without a record stops it until the provisioner has run.
- A stream made before the count was recorded (an existing platform) has none. Whoever records it
  first (the provisioner, or a service on a bare server) infers what it can from the stream itself
  (`Evidence`): its durable consumers are named after their partitions (`identity-p7`) and its stored
  subjects end in one (`events.raw.7`). It refuses when they show the data was made with more
  partitions, or with fewer when a service's whole set of partition consumers (`-p0` … `-p<n-1>`) says
  exactly how many; otherwise (nothing stored, nothing consumed yet) it records the count it has.

Updating a stream without the key would erase the record (nats-server replaces a stream's metadata with
the update's): whoever updates a partitioned stream keeps it (`carried`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from cdp_kit.bus import subjects
from cdp_kit.bus.setup import answered
from cdp_kit.errors import Unavailable

log = logging.getLogger("cdp.bus")

KEY = "cdp.partitions"
_SERVER_KEYS = "_nats."  # nats-server's own metadata (its version, the API level): not ours to send back

# Each partitioned stream, with filters over its subjects that end in a partition number (what `Evidence`
# reads). PRIVACY and DLQ have no partitions.
PARTITIONED: dict[str, tuple[str, ...]] = {
    subjects.EVENTS_RAW: (f"{subjects.EVENTS_RAW_PREFIX}.*",),
    subjects.EVENTS_RESOLVED: (f"{subjects.EVENTS_RESOLVED_PREFIX}.*",),
    subjects.IDENTITY: (f"{subjects.IDENTITY_MERGED_PREFIX}.*", f"{subjects.IDENTITY_UNMERGED_PREFIX}.*"),
    subjects.PROFILES: (f"{subjects.PROFILES_CHANGED_PREFIX}.*",),
    subjects.SCORES: (f"{subjects.SCORES_UPDATED_PREFIX}.*",),
    subjects.SEGMENTS: (f"{subjects.SEGMENTS_ENTERED_PREFIX}.*", f"{subjects.SEGMENTS_EXITED_PREFIX}.*"),
    subjects.ORCHESTRATION: (f"{subjects.ORCHESTRATION_IN_PREFIX}.*",),
    # Its timers' subjects (`orchestration.timers.<p>.<timer id>`) are one per timer: what they fire says it.
    subjects.ORCHESTRATION_TIMERS: (f"{subjects.ORCHESTRATION_FIRED_PREFIX}.*",),
    subjects.ACTIONS: (f"{subjects.ACTIONS_PREFIX}.*.*",),
    subjects.CRM: (f"{subjects.CRM_IN_PREFIX}.*",),
}

WAY_OUT = (
    "every service of a platform runs with the count its streams were made with (the chart's "
    "global.partitions; `cdpctl up` keeps its home's count); another count needs a platform of its own "
    "(new streams: a new home, --home or CDP_HOME, or a release with its own NATS)"
)


class PartitionsMismatch(Unavailable):
    """The streams were made with another partition count than this process has, or record none where
    one is needed: the process does not start (the provisioner does not provision)."""


def recorded(config: api.StreamConfig) -> int | None:
    """The partition count a stream's configuration records (None: none recorded)."""
    raw = (config.metadata or {}).get(KEY)
    if raw is None:
        return None
    try:
        count = int(raw)
    except ValueError:
        count = 0
    if count < 1:
        raise PartitionsMismatch(
            f"stream {config.name} records partitions {raw!r} in its metadata ({KEY}), which is not a count: "
            f"write the count its data was made with (nats stream edit {config.name} --metadata {KEY}=N)"
        )
    return count


def recording(config: api.StreamConfig, partitions: int) -> api.StreamConfig:
    """`config` recording `partitions` (its other metadata kept, the server's own left out)."""
    metadata = {k: v for k, v in (config.metadata or {}).items() if not k.startswith(_SERVER_KEYS)}
    return dataclasses.replace(config, metadata={**metadata, KEY: str(partitions)})


def carried(current: api.StreamConfig, wanted: api.StreamConfig) -> api.StreamConfig:
    """`wanted` keeping the count `current` records: an update without it would erase the record."""
    count = recorded(current)
    return wanted if count is None else recording(wanted, count)


def mismatch(stream: str, made: int, partitions: int, *, who: str = "this service") -> PartitionsMismatch:
    return PartitionsMismatch(
        f"stream {stream} was made with CDP_PARTITIONS={made} (recorded in its metadata, {KEY}), but "
        f"{who} has CDP_PARTITIONS={partitions}: services keep their positions and state per partition, so "
        f"this platform runs with {made} (set CDP_PARTITIONS={made}); {WAY_OUT}"
    )


@dataclass(frozen=True)
class Evidence:
    """What a stream without a record shows of the count its data was made with: `at_least` (the highest
    partition among its stored subjects and its durable consumers' names, plus one), `exactly` when one
    service's consumers are `-p0` … `-p<n-1>`, and `shown`, what says so (for a refusal)."""

    at_least: int | None = None
    exactly: int | None = None
    shown: str = ""

    def refuses(self, partitions: int) -> bool:
        if self.at_least is not None and self.at_least > partitions:
            return True
        return self.exactly is not None and self.exactly != partitions


_PARTITION_CONSUMER = re.compile(r"(.+)-p(\d+)")


async def evidence(js: JetStreamContext, stream: str) -> Evidence:
    """What `stream`'s stored subjects and durable consumers show of its partition count."""
    top_subject: str | None = None
    at_least = 0
    for pattern in PARTITIONED.get(stream, ()):
        info = await js.stream_info(stream, subjects_filter=pattern)
        for subject in info.state.subjects or {}:
            try:
                partition = subjects.partition_of(subject)
            except ValueError:
                continue
            if partition + 1 > at_least:
                at_least, top_subject = partition + 1, subject
    families: dict[str, set[int]] = {}
    offset = 0
    while True:
        page = await js.consumers_info(stream, offset=offset)
        if not page:
            break
        for consumer in page:
            found = _PARTITION_CONSUMER.fullmatch(consumer.name or "")
            if found:
                families.setdefault(found[1], set()).add(int(found[2]))
        offset += len(page)
    shown = [f"messages on {top_subject}"] if top_subject else []
    exactly = None
    for family, partitions in sorted(families.items()):
        count = max(partitions) + 1
        at_least = max(at_least, count)
        complete = partitions == set(range(count))
        if complete and (exactly is None or count > exactly):
            exactly = count
        first = f"{family}-p0" if complete else f"some of {family}-p0"
        shown.append(f"consumers {first} … {family}-p{count - 1}")
    if not at_least:
        return Evidence()
    return Evidence(at_least=at_least, exactly=exactly, shown=", ".join(shown))


def unrecorded(stream: str, seen: Evidence, partitions: int, *, who: str = "this service") -> PartitionsMismatch:
    made = f"{seen.exactly}" if seen.exactly is not None else f"at least {seen.at_least}"
    return PartitionsMismatch(
        f"stream {stream} records no partition count (made before cdp recorded it) and its data was made with "
        f"{made} partitions ({seen.shown}), but {who} has CDP_PARTITIONS={partitions}: run this platform "
        f"with the count it was made with (CDP_PARTITIONS={seen.exactly or seen.at_least}); {WAY_OUT}"
    )


async def check(
    js: JetStreamContext, partitions: int, streams: Iterable[str], *, record: bool, wait: float = 0.0
) -> None:
    """At a service's start: each of `streams` that is partitioned records `partitions`, or
    PartitionsMismatch naming both counts. A stream without a record gets `partitions` when `record`
    (a bare nats-server: the first service records it, after `evidence` agrees); under a service's own
    NATS user (`record` False) the provisioner must have recorded it, within `wait` seconds
    (CDP_NATS_PROVISION_WAIT: the chart's Job may run beside the services)."""
    deadline = time.monotonic() + wait
    for stream in dict.fromkeys(streams):
        if stream not in PARTITIONED:
            continue
        # Idempotent (a look-up, then at most the same record written again): asked again when a stalled
        # server does not answer in time.
        await answered(
            js,
            f"stream {stream}",
            lambda stream=stream: _check(js, stream, partitions, record=record, deadline=deadline),
        )


async def _check(js: JetStreamContext, stream: str, partitions: int, *, record: bool, deadline: float) -> None:
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        # Not made yet (a test's engine on a stream it never creates): nothing holds another split. A
        # service's own streams are verified before (`Bus.ensure_*`); the provisioner records new ones.
        return
    made = recorded(info.config)
    while made is None and not record and time.monotonic() < deadline:
        await asyncio.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))
        info = await js.stream_info(stream)
        made = recorded(info.config)
    if made == partitions:
        return
    if made is not None:
        raise mismatch(stream, made, partitions)
    if not record:
        raise PartitionsMismatch(
            f"stream {stream} records no partition count ({KEY} in its metadata): the provisioner records "
            "it (`cdpctl up` runs it before the services; under Kubernetes the chart's provisioning Job, "
            "`python -m cdp_kit.provision`): run it again, then start this service"
        )
    seen = await evidence(js, stream)
    if seen.refuses(partitions):
        raise unrecorded(stream, seen, partitions)
    await js.update_stream(recording(info.config, partitions))
    # Two services recording at once: the later update wins, and the other finds it here.
    made = recorded((await js.stream_info(stream)).config)
    if made != partitions:
        raise mismatch(stream, made or 0, partitions)
    log.info("recorded the partition count in stream %s", stream, extra={"partitions": partitions})
