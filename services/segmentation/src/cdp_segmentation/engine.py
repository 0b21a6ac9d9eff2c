"""The segmentation engine: the stream in and out, and the wiring of the parts that hold the rules.

Where a rule lives:
- catalogue.py: segment definitions, their lifecycle states (building, live, failed), their storage,
  the computed traits they own on the profile service;
- index.py: which live segments a field change can move (the field index, the threshold index);
- evaluation.py: per-person evaluation of a change, removals, and the timers of time-dependent segments;
- builds.py: whole-population builds (a segment created or changed) with progress, and `Estimate`;
- this module: `profiles.changed.<p>` in, `segments.entered.<p>` / `segments.exited.<p>` out, replay,
  snapshots, reads.

Real time, per `profiles.changed.<p>` message: each change updates the person's flat fields and the live
segments reading a changed field are evaluated for that person (evaluation.py); every flip is a
transition published on `segments.entered.<p>` / `segments.exited.<p>`; the batch is acknowledged once
JetStream has them. A publish that fails is kept and published first on the partition's next attempt.

Durability follows scoring (cdp_kit.held): nothing is written per change. Fields, memberships and each
person's stream position are snapshotted every few seconds, then the partition positions they include;
a restart loads them and replays `profiles.changed` from there, publishing again what the replay finds.
Every transition has a stable id (segment, person and what caused it: a stream position, a timer instant
or a definition version), so a transition published before a crash is a JetStream duplicate after it,
and a person's stream position keeps a change from being applied twice. Memberships therefore never flip
spuriously: only a real change of the inputs, of time or of a definition moves them. No snapshot is taken
while a transition waits to be published: the held state would be ahead of the bus.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import orjson
from google.protobuf.message import DecodeError
from opentelemetry.metrics import Observation

from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2
from cdp_kit.bus import Delivery, OutMessage, Partitioner, subjects
from cdp_kit.errors import Unavailable
from cdp_kit.held import Codec, HeldFields, ProfileSource
from cdp_kit.storage import Store
from cdp_kit.telemetry import LATENCY_BUCKETS_MS, Telemetry
from cdp_kit.timestamps import set_ns

# Re-exported (`X as X`): callers and tests know these by the engine's name.
from cdp_segmentation.builds import Builds
from cdp_segmentation.builds import Estimate as Estimate
from cdp_segmentation.catalogue import ANNOUNCE as ANNOUNCE
from cdp_segmentation.catalogue import BUILDING as BUILDING
from cdp_segmentation.catalogue import FAILED as FAILED
from cdp_segmentation.catalogue import LIVE, Catalogue, Segment, TraitDefiner, segment_from_doc
from cdp_segmentation.catalogue import SEGMENTS as SEGMENTS
from cdp_segmentation.catalogue import check_segment_id as check_segment_id
from cdp_segmentation.evaluation import Evaluation, Person, Transition
from cdp_segmentation.index import FieldIndex

log = logging.getLogger("cdp.segmentation.engine")


PERSONS = "segmentation_persons"
CHECKPOINTS = subjects.checkpoints_collection("segmentation")
BUILT = "$built"  # checkpoint key: the definition version each segment's held memberships are of
MAX_EVENTS_PER_MESSAGE = 1000

TraitWaiter = Callable[[Sequence[str]], Awaitable[None]]
StreamEnds = Callable[[], Awaitable[dict[str, int]]]


class SegmentationEngine(Catalogue, Evaluation, Builds):
    def __init__(
        self,
        store: Store,
        publisher,
        *,
        partitions: int,
        owned: Iterable[int],
        telemetry: Telemetry,
        profile_source: ProfileSource | None = None,
        define_traits: TraitDefiner | None = None,
        traits_ready: TraitWaiter | None = None,
        undefine_traits: Callable[[Sequence[str]], Awaitable[None]] | None = None,
        stream_ends: StreamEnds | None = None,
        snapshot_interval: float = 10.0,
        timer_resolution: float = 0.25,
        namespace: str = "",
        announce: Callable[[str], Awaitable[None]] | None = None,
        max_computed_traits: int = 20,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.partitions = partitions
        self.owned = frozenset(owned)
        self.define_traits = define_traits
        self.traits_ready = traits_ready
        self.undefine_traits = undefine_traits
        self.stream_ends = stream_ends
        self.snapshot_interval = snapshot_interval
        self.timer_resolution = timer_resolution
        self.clock = clock
        self.max_computed_traits = max_computed_traits
        # Computed traits read by each Estimate under way (a list per call): not deleted meanwhile.
        self._estimating: list[frozenset[str]] = []
        # Stored segments that could not be loaded: id -> why. DeleteSegment still removes them.
        self.unreadable: dict[str, str] = {}
        self.announce = announce
        self.segments: dict[str, Segment] = {}
        self._partition = Partitioner(partitions)
        # Standby replicas each hold every partition: their persons and positions are their own.
        self.held: HeldFields[Person] = HeldFields(
            store,
            collection=PERSONS + namespace,
            checkpoints=CHECKPOINTS + namespace,
            owns=lambda person: self._partition(person) in self.owned,
            codec=Codec(copy=_copy_person, encode=_encode_person, decode=self._decode_person),
            fetch=profile_source,
            # Transitions waiting to be published: the held state is ahead of the bus.
            behind=lambda: any(self._unpublished.values()),
            marks=lambda: {BUILT: {"versions": {s.id: s.version for s in self.segments.values() if s.serving}}},
            clock=clock,
        )
        self.persons = self.held.persons
        self.members: dict[str, set[str]] = {}  # segment id -> persons (live definitions)
        # partition subject -> the last stream position the held state includes
        self.applied = self.held.applied
        self.snapshotted = self.held.snapshotted
        self.index = FieldIndex()
        self._timers: list[tuple[float, str]] = []  # (due, person): a heap
        self._due: dict[str, float] = {}  # person -> its pending timer
        # Transitions whose publish failed, by partition subject ("$timers" for timers): published first
        # next time, and no snapshot is taken while any wait (the held state is ahead of the bus).
        self._unpublished: dict[str, list[OutMessage]] = {}
        # One set per whole-population run under way: the persons changed meanwhile.
        self._touched: list[set[str]] = []
        self._sorted_members: dict[str, tuple[float, list[str]]] = {}
        self._builds: dict[str, asyncio.Task] = {}
        self._lifecycle_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        meter = telemetry.meter
        self._m_transitions = meter.create_counter(
            "cdp.segmentation.transitions",
            unit="{transition}",
            description="membership transitions published, by direction",
        )
        self.evaluations = 0
        meter.create_observable_counter(
            "cdp.segmentation.evaluations",
            callbacks=[lambda _options: [Observation(self.evaluations)]],
            unit="{evaluation}",
            description="per-profile segment evaluations",
        )
        self._m_freshness = meter.create_histogram(
            "cdp.segmentation.freshness",
            unit="ms",
            description="profile change to published transitions, per batch (its oldest change)",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self._m_population = meter.create_histogram(
            "cdp.segmentation.population.duration",
            unit="ms",
            description="whole-population evaluation of one definition",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        meter.create_observable_gauge(
            "cdp.segmentation.members",
            callbacks=[self._observe_members],
            unit="{person}",
            description="members per live segment",
        )
        meter.create_observable_gauge(
            "cdp.segmentation.timers",
            callbacks=[self._observe_timers],
            unit="{person}",
            description="persons with a timer pending",
        )

    def _observe_members(self, _options):
        return [Observation(len(m), {"segment": s}) for s, m in self.members.items()]

    def _observe_timers(self, _options):
        return [Observation(len(self._due))]

    # --- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """The segments, then the last snapshot of persons (see `replay`); unfinished builds resume."""
        loaded: dict[str, Segment] = {}
        async for record in self.store.scan_all(SEGMENTS):
            try:
                loaded[record.key] = segment_from_doc(record.key, record.doc)
            except Exception as exc:
                self.unreadable[record.key] = type(exc).__name__
                log.error(
                    "stored segment cannot be loaded; left out (DeleteSegment removes it)",
                    extra={"segment": record.key, "error": type(exc).__name__},
                )
        self.segments = loaded
        await self.held.load()
        built: dict[str, int] = self.held.loaded_marks.get(BUILT, {}).get("versions", {})
        for segment in self.segments.values():
            # Changed by another replica while this one was down: its memberships here are of another version.
            if segment.serving and built.get(segment.id) != segment.version and segment.state == LIVE:
                segment.pending = (segment.version, segment.compiled)
                segment.state = BUILDING
        for person_id, person in self.persons.items():
            for segment_id in person.members:
                self.members.setdefault(segment_id, set()).add(person_id)
        self._reindex()
        for person_id, person in self.persons.items():
            self._schedule(person_id, person, person.evaluated_at or self.clock())
        self._tasks.append(asyncio.create_task(self._snapshot_loop(), name="segmentation snapshots"))
        self._tasks.append(asyncio.create_task(self._timer_loop(), name="segmentation timers"))

    def _decode_person(self, doc: Mapping[str, Any]) -> Person:
        state = orjson.loads(doc["state"])
        return Person(
            fields=state["fields"],
            members={s: since for s, since in state.get("members", {}).items() if s in self.segments},
            seq=state.get("seq", 0),
            evaluated_at=state.get("t", 0.0),
        )

    async def stop(self) -> None:
        for task in [*self._tasks, *self._builds.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._builds.values(), return_exceptions=True)
        self._tasks.clear()
        self._builds.clear()
        try:
            await self.snapshot()
        except Exception as exc:  # the next start replays further back instead; nothing is lost
            log.warning("final snapshot failed: %r", exc)

    def _serving(self) -> list[Segment]:
        return [s for s in self.segments.values() if s.serving]

    def _reindex(self) -> None:
        """The live segments changed: a new field index, and the built versions are due in a snapshot."""
        self.index = FieldIndex(self._serving())
        self.held.marks_dirty = True

    # --- the stream path --------------------------------------------------------------------------

    async def handle(self, batch: Sequence[Delivery]) -> None:
        """Consumer handler for `profiles.changed.<p>`: apply, evaluate, publish; acknowledged after."""
        async with self.held.mutating():
            await self._handle(batch)

    async def _handle(self, batch: Sequence[Delivery]) -> None:
        subject = batch[0].subject
        partition = subjects.partition_of(subject)
        waiting = self._unpublished.pop(subject, None)
        if waiting:
            await self._publish_or_keep(subject, waiting)
        applied = self.applied.get(subject, 0)
        now = self.clock()
        oldest = math.inf
        transitions: list[Transition] = []
        for delivery in batch:
            if delivery.stream_seq <= applied:
                continue  # applied by the replay; what it found was published then
            message = profile_pb2.ProfileChangedBatch()
            try:
                message.ParseFromString(delivery.data)
            except DecodeError as exc:
                delivery.reject("invalid_message", f"not a cdp.profile.v1.ProfileChangedBatch: {exc}")
                continue
            applied_at = await self._apply_message(partition, delivery.stream_seq, message, now, transitions)
            if applied_at < oldest:
                oldest = applied_at
        self.applied[subject] = max(self.applied.get(subject, 0), batch[-1].stream_seq)
        if transitions:
            await self._publish_or_keep(subject, self._messages(partition, transitions))
        if oldest is not math.inf:
            self._m_freshness.record(max(0.0, (self.clock() - oldest) * 1000))

    async def _publish_or_keep(self, subject: str, messages: list[OutMessage]) -> None:
        """Publish; on failure keep them for the partition's next attempt (its changes are applied by then,
        so only these messages still carry what they found)."""
        try:
            await self._publish(messages)
        except BaseException:
            self._unpublished.setdefault(subject, [])[:0] = messages
            raise

    async def replay(self, messages: AsyncIterator[tuple[str, int, bytes]]) -> int:
        """Bring the snapshot up to where the consumers had got: apply (subject, stream position,
        payload) in stream order, evaluating and publishing as the stream path does (what was published
        before keeps its id: JetStream drops it as a duplicate). Returns the changes applied."""
        now = self.clock()
        for_subject: dict[str, list[Transition]] = {}

        async def apply(subject: str, seq: int, data: bytes) -> int:
            partition = subjects.partition_of(subject)
            message = profile_pb2.ProfileChangedBatch.FromString(data)
            await self._apply_message(partition, seq, message, now, for_subject.setdefault(subject, []))
            return len(message.changes)

        applied = await self.held.replay(messages, apply)
        for subject, transitions in for_subject.items():
            if transitions:
                await self._publish(self._messages(subjects.partition_of(subject), transitions))
        return applied

    # --- publishing -------------------------------------------------------------------------------

    def _messages(self, partition: int, transitions: Sequence[Transition]) -> list[OutMessage]:
        """Transitions as SegmentEventBatch messages: one group per cause (a stream message, a person's
        timer instant, a definition version), exited and entered apart, each in its order.

        A message's id comes from its events' ids, and a group holds the same events however the work
        was batched (a replay after a crash regroups nothing), so a message published before a crash is
        a duplicate JetStream drops when published again."""
        groups: dict[str, list[Transition]] = {}
        for t in transitions:
            # A stream message's changes ("s<p>.<seq>.<change>") travel together; timers per person.
            kind = t.cause[0]
            key = t.cause.rsplit(".", 1)[0] if kind == "s" else f"{t.cause}:{t.person}" if kind == "t" else t.cause
            groups.setdefault(key, []).append(t)
        out: list[OutMessage] = []
        counts = {True: 0, False: 0}
        for group in groups.values():
            # Order matters only between the transitions of one person in one segment: the n-th transition
            # of each goes out in phase n (usually there is one phase), exits and entries apart within it.
            phases: list[tuple[list[Transition], list[Transition]]] = []
            seen: dict[tuple[str, str], int] = {}
            for t in group:
                key = (t.person, t.segment)
                phase = seen.get(key, 0)
                seen[key] = phase + 1
                if phase == len(phases):
                    phases.append(([], []))
                phases[phase][t.entered].append(t)
            for phase in phases:
                for entered in (False, True):
                    events = phase[entered]
                    counts[entered] += len(events)
                    for start in range(0, len(events), MAX_EVENTS_PER_MESSAGE):
                        out.append(self._message(partition, entered, events[start : start + MAX_EVENTS_PER_MESSAGE]))
        for entered, count in counts.items():
            if count:
                self._m_transitions.add(count, {"direction": "entered" if entered else "exited"})
        return out

    @staticmethod
    def _message(partition: int, entered: bool, events: Sequence[Transition]) -> OutMessage:
        batch = segmentation_pb2.SegmentEventBatch()
        add = batch.events.add
        mark = ":e" if entered else ":x"
        ids = []
        for t in events:
            event_id = f"{t.segment}:{t.person}:{t.cause}{mark}"
            ids.append(event_id)
            # Field by field: about half the cost of keyword arguments on this path.
            event = add()
            event.id = event_id
            event.person_id = t.person
            event.segment_id = t.segment
            event.entered = entered
            event.reason = t.reason
            event.segment_version = t.version
            # Rounded to the microsecond the profile change had (a float of epoch seconds holds about that).
            set_ns(event.at, round(t.at * 1e6) * 1000)
        return OutMessage(
            subject=subjects.segments_entered(partition) if entered else subjects.segments_exited(partition),
            payload=batch.SerializeToString(),
            # From the events' ids, not the bytes: a standby replica's copy has the same ids.
            msg_id="sg_" + hashlib.blake2b("\n".join(ids).encode(), digest_size=16).hexdigest(),
        )

    async def _publish(self, messages: Sequence[OutMessage]) -> None:
        results = await self.publisher.publish_batch(messages)
        failed = [r for r in results if not r.ok]
        if failed:
            raise Unavailable(f"{len(failed)} segment event messages not stored by JetStream ({failed[0].error})")

    # --- reads ------------------------------------------------------------------------------------

    def list_members(self, segment_id: str, *, after: str, limit: int) -> tuple[list[tuple[str, float]], bool, int]:
        """A page of members in person id order, after `after`: (person, since) pairs, whether more follow,
        and the members in all. Pages come from a sorted copy at most a second old, so paging a large
        segment costs one sort, not one per page."""
        segment = self.get(segment_id)
        members = self.members.get(segment.id, set())
        cached = self._sorted_members.get(segment.id)
        now = time.monotonic()
        if cached is None or now - cached[0] > 1.0 or not after:
            cached = self._sorted_members[segment.id] = (now, sorted(members))
        ordered = cached[1]
        start = bisect.bisect_right(ordered, after) if after else 0
        page: list[tuple[str, float]] = []
        position = start
        while position < len(ordered) and len(page) < limit:
            person_id = ordered[position]
            position += 1
            person = self.persons.get(person_id)
            since = person.members.get(segment.id) if person is not None else None
            if since is not None:  # left since the copy was taken
                page.append((person_id, since))
        return page, position < len(ordered), len(members)

    def membership(self, person_id: str) -> dict[str, float]:
        person = self.persons.get(person_id)
        return dict(person.members) if person is not None else {}

    # --- snapshots --------------------------------------------------------------------------------

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(self.snapshot_interval)
            try:
                await self.snapshot()
            except Exception as exc:  # kept dirty: the next round writes them; a restart replays further
                log.warning("snapshot failed (%r); retrying in %.0fs", exc, self.snapshot_interval)

    async def snapshot(self) -> int:
        """Write the persons changed since the last snapshot, then the stream positions they include and
        the definition versions the memberships are of (cdp_kit.held). After a crash mid-way some persons
        are newer than the positions, and their own stream position makes the replay skip what they hold."""
        return await self.held.snapshot()


def _copy_person(person: Person) -> tuple[dict[str, Any], dict[str, float], int, float]:
    # A shallow copy is enough: values are replaced, never changed in place.
    return person.fields.copy(), person.members.copy(), person.seq, person.evaluated_at


def _encode_person(copied: tuple[dict[str, Any], dict[str, float], int, float]) -> dict[str, Any]:
    fields, members, seq, evaluated_at = copied
    return {"state": orjson.dumps({"fields": fields, "members": members, "seq": seq, "t": evaluated_at}).decode()}
