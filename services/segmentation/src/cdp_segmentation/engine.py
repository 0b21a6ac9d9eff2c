"""The segmentation engine: profile fields and memberships in memory, transitions on the bus.

Real time, per `profiles.changed.<p>` message: each change updates the person's flat fields
("traits.plan" -> "pro"); the live segments reading a changed field (and those referring to them, in
dependency order) are evaluated for that person with the per-profile evaluator; every flip is a
transition published on `segments.entered.<p>` / `segments.exited.<p>`; the batch is acknowledged once
JetStream has them. Segments whose membership time alone can change (`traits.trial_ends_at < now`) give
each person a timer: the earliest instant one of their time comparisons flips, kept in a heap.

Whole population (a segment created or changed, `Estimate`): the vectorised evaluator over columns built
from the held fields, chunk by chunk with progress; the difference from the current membership is
published with the reason ("created", "updated") and the segment goes live.

Durability follows scoring: nothing is written per change. Fields, memberships and each person's stream
position are snapshotted every few seconds, then the partition positions they include; a restart loads
them and replays `profiles.changed` from there, publishing again what the replay finds. Every transition
has a stable id (segment, person and what caused it: a stream position, a timer instant or a definition
version), so a transition published before a crash is a JetStream duplicate after it, and a person's
stream position keeps a change from being applied twice. Memberships therefore never flip spuriously:
only a real change of the inputs, of time or of a definition moves them.

Computed traits on the profile service belong to the definitions that read them: a definition may need
at most `max_computed_traits` of them, and a trait is deleted on the profile service as soon as nothing
here reads it any more, that is no segment serving or being built with it and no `Estimate` under way
(a segment deleted, an update that dropped a condition, a create whose build failed, an estimate done).
The fields held for a deleted trait are forgotten with it, so a trait defined again later starts from
what the profile service publishes then, never from values that were current before.

A stored segment that cannot be loaded (a definition from an older release that the language now
refuses) is left out, logged with its id, and can still be deleted: one bad record never keeps the
service from starting or listing the others.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import heapq
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from google.protobuf.message import DecodeError
from opentelemetry.metrics import Observation

from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2
from cdp_kit.bus import Delivery, OutMessage, Partitioner
from cdp_kit.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from cdp_kit.profile_fields import change_fields
from cdp_kit.storage import Delete, Put, Store
from cdp_kit.telemetry import LATENCY_BUCKETS_MS, Telemetry
from cdp_segmentation.domain import (
    Columns,
    CompiledSegment,
    check_segment_graph,
    compile_segment,
    from_json,
    to_json,
    to_text,
)
from cdp_segmentation.domain.plan import NumberTest, Test
from cdp_segmentation.domain.values import number

log = logging.getLogger("cdp.segmentation.engine")

SEGMENTS = "segmentation_segments"
PERSONS = "segmentation_persons"
CHECKPOINTS = "segmentation_checkpoints"
ENTERED = "segments.entered"
EXITED = "segments.exited"
BUILDING, LIVE, FAILED = "building", "live", "failed"
BUILT = "$built"  # checkpoint key: the definition version each segment's held memberships are of
ANNOUNCE = "segmentation.segments.changed"
SEGMENT_ID = re.compile(r"[a-z][a-z0-9_-]{0,63}")
TIME = "$time"  # the pseudo-field every time-dependent segment reads
CHUNK = 65_536  # rows per step of a whole-population run
MAX_EVENTS_PER_MESSAGE = 1000
SAMPLE = 20
# Nesting accepted when loading a stored definition: more than the API accepts (MAX_DEPTH), so segments
# stored before that limit still load and can be deleted; protobuf could never have carried deeper ones.
STORED_MAX_DEPTH = 100

ProfileSource = Callable[[str], Awaitable[dict[str, Any] | None]]
TraitDefiner = Callable[[Sequence[Mapping[str, Any]]], Awaitable[None]]
TraitWaiter = Callable[[Sequence[str]], Awaitable[None]]
StreamEnds = Callable[[], Awaitable[dict[str, int]]]


@dataclass(slots=True)
class Segment:
    """One segment: its live definition, and the one being built when an update is under way."""

    id: str
    name: str
    description: str
    version: int
    compiled: CompiledSegment
    state: str = BUILDING
    created_at: float = 0.0
    updated_at: float = 0.0
    live_at: float = 0.0
    error: str = ""
    done: int = 0
    total: int = 0
    # An update being built: (version, compiled); the live definition above keeps serving meanwhile.
    pending: tuple[int, CompiledSegment] | None = None
    # Whether the live definition has ever gone live (a failed first build leaves nothing live).
    serving: bool = False
    # The last build's difference: entered, exited, and a sample of each.
    last_diff: tuple[int, int, list[str], list[str]] = (0, 0, [], [])
    # The live definition's per-profile predicate and whether time moves it (read per change: no lookups).
    predicate: Callable[..., bool] = field(init=False, repr=False)
    timed: bool = field(init=False, default=False)
    refs: frozenset[str] = field(init=False, default=frozenset())

    def __post_init__(self) -> None:
        self.serve(self.compiled, self.version)

    def serve(self, compiled: CompiledSegment, version: int) -> None:
        self.compiled, self.version = compiled, version
        self.predicate, self.timed, self.refs = compiled.predicate, compiled.time_dependent, compiled.segments

    def doc(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "version": self.version,
            "tree": orjson.dumps(to_json(self.compiled.node)).decode(),
            "state": self.state,
            "serving": self.serving,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "live_at": self.live_at,
            "error": self.error,
            "pending": None
            if self.pending is None
            else {"version": self.pending[0], "tree": orjson.dumps(to_json(self.pending[1].node)).decode()},
        }

    @property
    def definition(self) -> CompiledSegment:
        """The definition the next whole-population run is for."""
        return self.pending[1] if self.pending is not None else self.compiled

    @property
    def building_version(self) -> int:
        return self.pending[0] if self.pending is not None else self.version


@dataclass(slots=True)
class Transition:
    person: str
    segment: str
    entered: bool
    at: float
    reason: str
    version: int
    cause: str  # what makes the id stable: "s<partition>.<seq>.<change>", "t<due ms>", "v<version>"


@dataclass(slots=True)
class Estimate:
    size: int
    population: int
    sample: list[str]
    compiled: CompiledSegment
    evaluate_ms: float


@dataclass(slots=True)
class _Person:
    fields: dict[str, Any]
    members: dict[str, float] = field(default_factory=dict)  # segment id -> since (epoch seconds)
    seq: int = 0  # the last profiles.changed position applied to this person
    evaluated_at: float = 0.0  # timers are due from this instant's state


class SegmentationEngine:
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
        self.profile_source = profile_source
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
        # Standby replicas each hold every partition: their persons and positions are their own.
        self.persons_collection = PERSONS + namespace
        self.checkpoints_collection = CHECKPOINTS + namespace
        self.announce = announce
        self.segments: dict[str, Segment] = {}
        self.persons: dict[str, _Person] = {}
        self.members: dict[str, set[str]] = {}  # segment id -> persons (live definitions)
        # partition subject -> the last stream position the held state includes
        self.applied: dict[str, int] = {}
        self.snapshotted: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._gone: set[str] = set()
        self._order: list[str] = []  # live segment ids, dependencies first
        self._readers: dict[str, tuple[Segment, ...]] = {}  # field -> live segments to evaluate, in order
        self._affected_cache: dict[frozenset[str], tuple[Segment, ...]] = {}
        self._time_segments: tuple[tuple[Segment, bool], ...] = ()
        self._all: tuple[tuple[Segment, bool], ...] = ()
        self._direct: dict[str, set[str]] = {}
        # field -> (sorted thresholds, their segment ids, the set of them): segments comparing one field
        # with one number, where a change can move only those whose threshold it crosses
        self._thresholds: dict[str, tuple[list[float], list[tuple[Segment, bool]]]] = {}
        self._indexed: dict[str, frozenset[str]] = {}
        self._timers: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}
        # Transitions whose publish failed, by partition subject ("$timers" for timers): published first
        # next time, and no snapshot is taken while any wait (the held state is ahead of the bus).
        self._unpublished: dict[str, list[OutMessage]] = {}
        # Work that changes state and then publishes what it found runs inside `_mutating`; a snapshot
        # copies the state only when none is in flight, so it never holds a transition not yet published.
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._thawed = asyncio.Event()
        self._thawed.set()
        # One set per whole-population run under way: the persons changed meanwhile.
        self._touched: list[set[str]] = []
        self._sorted_members: dict[str, tuple[float, list[str]]] = {}
        self._builds: dict[str, asyncio.Task] = {}
        self._lifecycle_lock = asyncio.Lock()
        self._snapshot_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._built_dirty = False
        self._partition = Partitioner(partitions)
        meter = telemetry.meter
        self._m_transitions = meter.create_counter(
            "cdp_segmentation_transitions_total", description="membership transitions published, by direction"
        )
        self.evaluations = 0
        meter.create_observable_counter(
            "cdp_segmentation_evaluations_total",
            callbacks=[lambda _options: [Observation(self.evaluations)]],
            description="per-profile segment evaluations",
        )
        self._m_freshness = meter.create_histogram(
            "cdp_segmentation_freshness_ms",
            unit="ms",
            description="profile change to published transitions, per batch (its oldest change)",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self._m_population = meter.create_histogram(
            "cdp_segmentation_population_ms",
            unit="ms",
            description="whole-population evaluation of one definition",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        meter.create_observable_gauge(
            "cdp_segmentation_members",
            callbacks=[self._observe_members],
            description="members per live segment",
        )
        meter.create_observable_gauge(
            "cdp_segmentation_timers", callbacks=[self._observe_timers], description="persons with a timer pending"
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
                loaded[record.key] = self._segment_from_doc(record.key, record.doc)
            except Exception as exc:
                self.unreadable[record.key] = type(exc).__name__
                log.error(
                    "stored segment cannot be loaded; left out (DeleteSegment removes it)",
                    extra={"segment": record.key, "error": type(exc).__name__},
                )
        self.segments = loaded
        built: dict[str, int] = {}
        async for record in self.store.scan_all(self.checkpoints_collection):
            if record.key == BUILT:
                built = record.doc.get("versions", {})
                continue
            self.applied[record.key] = self.snapshotted[record.key] = record.doc.get("stream_seq", 0)
        for segment in self.segments.values():
            # Changed by another replica while this one was down: its memberships here are of another version.
            if segment.serving and built.get(segment.id) != segment.version and segment.state == LIVE:
                segment.pending = (segment.version, segment.compiled)
                segment.state = BUILDING
        async for record in self.store.scan_all(self.persons_collection, page_size=2000):
            if self._partition(record.key) not in self.owned:
                continue
            state = orjson.loads(record.doc["state"])
            person = _Person(
                fields=state["fields"],
                members={s: since for s, since in state.get("members", {}).items() if s in self.segments},
                seq=state.get("seq", 0),
                evaluated_at=state.get("t", 0.0),
            )
            self.persons[record.key] = person
            for segment_id in person.members:
                self.members.setdefault(segment_id, set()).add(record.key)
        self._reindex()
        for person_id, person in self.persons.items():
            self._schedule(person_id, person, person.evaluated_at or self.clock())
        self._tasks.append(asyncio.create_task(self._snapshot_loop(), name="segmentation snapshots"))
        self._tasks.append(asyncio.create_task(self._timer_loop(), name="segmentation timers"))

    def resume_builds(self) -> None:
        """Builds a crash interrupted start again (their transitions keep their ids: duplicates, not news)."""
        for segment in self.segments.values():
            if segment.state == BUILDING:
                self._start_build(segment, reason="created" if not segment.serving else "updated")

    def _segment_from_doc(self, segment_id: str, doc: Mapping[str, Any]) -> Segment:
        compiled = compile_segment(from_json(orjson.loads(doc["tree"]), max_depth=STORED_MAX_DEPTH))
        pending = None
        if doc.get("pending"):
            tree = from_json(orjson.loads(doc["pending"]["tree"]), max_depth=STORED_MAX_DEPTH)
            pending = (doc["pending"]["version"], compile_segment(tree))
        return Segment(
            id=segment_id,
            name=doc.get("name", ""),
            description=doc.get("description", ""),
            version=doc["version"],
            compiled=compiled,
            state=doc["state"],
            created_at=doc.get("created_at", 0.0),
            updated_at=doc.get("updated_at", 0.0),
            live_at=doc.get("live_at", 0.0),
            error=doc.get("error", ""),
            pending=pending,
            serving=doc.get("serving", False),
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

    # --- the index: which segments a field change can move ---------------------------------------

    def _serving(self) -> list[Segment]:
        return [s for s in self.segments.values() if s.serving]

    def _reindex(self) -> None:
        serving = {s.id: s for s in self._serving()}
        order = check_segment_graph({s.id: s.compiled.segments & serving.keys() for s in serving.values()})
        self._order = order
        position = {segment_id: i for i, segment_id in enumerate(order)}
        dependents: dict[str, set[str]] = {}
        for segment in serving.values():
            for ref in segment.compiled.segments:
                dependents.setdefault(ref, set()).add(segment.id)

        def closure(start: Iterable[str]) -> tuple[Segment, ...]:
            seen: set[str] = set()
            stack = list(start)
            while stack:
                segment_id = stack.pop()
                if segment_id in seen:
                    continue
                seen.add(segment_id)
                stack.extend(dependents.get(segment_id, ()))
            return tuple(serving[s] for s in sorted(seen, key=position.__getitem__))

        direct: dict[str, set[str]] = {}
        for segment in serving.values():
            for name in segment.compiled.fields:
                direct.setdefault(name, set()).add(segment.id)
            if segment.compiled.time_dependent:
                direct.setdefault(TIME, set()).add(segment.id)
        self._readers = {name: closure(ids) for name, ids in direct.items()}
        self._direct = direct
        by_field: dict[str, list[tuple[float, str]]] = {}
        for segment in serving.values():
            found = threshold(segment.compiled)
            if found is not None:
                by_field.setdefault(found[0], []).append((found[1], segment.id))
        self._thresholds = {
            name: ([t for t, _ in sorted(items)], [(serving[i], True) for _, i in sorted(items)])
            for name, items in by_field.items()
            if len(items) > 1
        }
        self._indexed = {name: frozenset(s.id for s, _ in index[1]) for name, index in self._thresholds.items()}
        self._affected_cache = {}
        self._time_segments = self._affected(frozenset({TIME})) if TIME in direct else ()
        self._all = tuple((serving[s], True) for s in order)
        self._built_dirty = True

    def _affected(self, changed: frozenset[str]) -> tuple[tuple[Segment, bool], ...]:
        """The segments a change of these fields can move, dependencies first, each with whether it reads
        one of them itself (else it only refers to one that does: evaluated only if that one flips)."""
        found = self._affected_cache.get(changed)
        if found is None:
            union: dict[str, Segment] = {}
            direct: set[str] = set()
            indexed: set[str] = set()
            for name in changed:
                for segment in self._readers.get(name, ()):
                    union[segment.id] = segment
                direct |= self._direct.get(name, set())
                indexed |= self._indexed.get(name, frozenset())
            for segment_id in indexed:  # evaluated through the threshold index (`_crossed`)
                union.pop(segment_id, None)
            position = {segment_id: i for i, segment_id in enumerate(self._order)}
            ordered = sorted(union.values(), key=lambda s: position[s.id])
            found = tuple((segment, segment.id in direct) for segment in ordered)
            if len(self._affected_cache) > 10_000:
                self._affected_cache.clear()
            self._affected_cache[changed] = found
        return found

    # --- per-person evaluation --------------------------------------------------------------------

    def _evaluate(
        self,
        person_id: str,
        person: _Person,
        segments: Sequence[tuple[Segment, bool]],
        *,
        now: float,
        at: float,
        reason: str,
        cause: str,
        out: list[Transition],
    ) -> None:
        """Evaluate `segments` (dependencies first) for one person; record the flips."""
        members = person.members
        fields = person.fields
        timed = False
        flipped: set[str] | None = None
        evaluated = 0
        for segment, direct in segments:
            if not direct and (flipped is None or flipped.isdisjoint(segment.refs)):
                continue  # it only refers to segments this change left as they were
            segment_id = segment.id
            evaluated += 1
            inside = segment.predicate(fields, members, now)
            if inside is not (segment_id in members):
                if inside:
                    members[segment_id] = at
                    self.members.setdefault(segment_id, set()).add(person_id)
                else:
                    del members[segment_id]
                    self.members.get(segment_id, set()).discard(person_id)
                out.append(Transition(person_id, segment_id, inside, at, reason, segment.version, cause))
                if flipped is None:
                    flipped = set()
                flipped.add(segment_id)
            if segment.timed:
                timed = True
        self.evaluations += evaluated
        person.evaluated_at = now
        self._dirty.add(person_id)
        if timed:
            self._schedule(person_id, person, now)

    def _schedule(self, person_id: str, person: _Person, now: float) -> None:
        """The person's next timer: the earliest instant after `now` one of its time comparisons flips."""
        pending = self._due.get(person_id)
        if pending is not None and pending <= now:
            return  # overdue: the timer round evaluates every time segment of the person, then reschedules
        due = math.inf
        for segment, _direct in self._time_segments:
            if segment.timed:
                t = segment.compiled.next_change(person.fields, person.members, now)
                if t is not None and t < due:
                    due = t
        if due == math.inf:
            self._due.pop(person_id, None)
            return
        if self._due.get(person_id) != due:
            self._due[person_id] = due
            heapq.heappush(self._timers, (due, person_id))

    async def _timer_loop(self) -> None:
        while True:
            try:
                await self.fire_timers()
            except Exception as exc:  # the timers stay due; the next tick publishes them
                log.warning("timer round failed: %r", exc)
            wait = self.timer_resolution
            if self._timers:
                wait = min(wait, max(0.0, self._timers[0][0] - self.clock()))
            await asyncio.sleep(wait)

    @contextlib.asynccontextmanager
    async def _mutating(self) -> AsyncIterator[None]:
        while not self._thawed.is_set():  # a snapshot is copying the state
            await self._thawed.wait()
        self._inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    async def fire_timers(self) -> int:
        """Evaluate every person whose timer is due; publish what flipped. Returns the persons evaluated."""
        async with self._mutating():
            waiting = self._unpublished.pop("$timers", None)
            if waiting:
                await self._publish_or_keep("$timers", waiting)
            return await self._fire_timers()

    async def _fire_timers(self) -> int:
        now = self.clock()
        transitions: dict[int, list[Transition]] = {}
        fired: list[tuple[float, str]] = []
        while self._timers and self._timers[0][0] <= now:
            due, person_id = heapq.heappop(self._timers)
            if self._due.get(person_id) != due:
                continue  # rescheduled or gone since
            del self._due[person_id]
            person = self.persons.get(person_id)
            if person is None:
                continue
            fired.append((due, person_id))
            out = transitions.setdefault(self._partition(person_id), [])
            self._evaluate(
                person_id,
                person,
                self._time_segments,
                now=now,
                at=due,
                reason="time",
                cause=f"t{round(due * 1000)}",
                out=out,
            )
        messages = [m for p, ts in transitions.items() for m in self._messages(p, ts)]
        if messages:
            await self._publish_or_keep("$timers", messages)
        return len(fired)

    # --- the stream path --------------------------------------------------------------------------

    async def handle(self, batch: Sequence[Delivery]) -> None:
        """Consumer handler for `profiles.changed.<p>`: apply, evaluate, publish; acknowledged after."""
        async with self._mutating():
            await self._handle(batch)

    async def _handle(self, batch: Sequence[Delivery]) -> None:
        subject = batch[0].subject
        partition = int(subject.rsplit(".", 1)[1])
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

    async def _apply_message(
        self,
        partition: int,
        seq: int,
        message: profile_pb2.ProfileChangedBatch,
        now: float,
        out: list[Transition],
    ) -> float:
        """Apply one stream message, evaluating what its changes move; the time of its oldest change
        applied (infinity: none)."""
        cause = f"s{partition}.{seq}"
        oldest = math.inf
        applying: set[str] = set()  # persons this message is being applied to (one may have several changes)
        for index, change in enumerate(message.changes):
            person_id = change.person_id
            if not person_id:
                continue
            person = self.persons.get(person_id)
            if person is not None and seq <= person.seq and person_id not in applying:
                continue  # this person's state already includes the message (snapshotted after it)
            applying.add(person_id)
            at = change.at.seconds + change.at.nanos / 1e9
            if at < oldest:
                oldest = at
            if change.removed:
                if person is not None:
                    self._remove(person_id, person, at=at, cause=f"{cause}.{index}", out=out)
                continue
            updates = change_fields(change)
            new = person is None
            if person is None:
                fetched = await self.profile_source(person_id) if self.profile_source is not None else None
                person = self.persons[person_id] = _Person(fields=fetched or {})
            changed = self._apply(person, updates)
            person.seq = seq
            self._dirty.add(person_id)
            for touched in self._touched:
                touched.add(person_id)
            if new or changed:
                # A person first seen: every live segment (`not traits.x exists` holds for an empty profile).
                if new:
                    segments = self._all
                else:
                    # Threshold segments first (they refer to no segment), then the rest, dependencies first.
                    segments = self._affected(frozenset(changed))
                    if self._thresholds:
                        crossed = self._crossed(changed, person.fields)
                        if crossed:
                            segments = crossed + list(segments)
                if segments:
                    self._evaluate(
                        person_id,
                        person,
                        segments,
                        now=now,
                        at=at,
                        reason=change.cause or "event",
                        cause=f"{cause}.{index}",
                        out=out,
                    )
        return oldest

    @staticmethod
    def _apply(person: _Person, updates: Mapping[str, Any]) -> dict[str, Any]:
        """Apply the updates; the changed paths with the value each had before (None: absent)."""
        fields = person.fields
        changed: dict[str, Any] = {}
        for path, value in updates.items():
            if value is None:
                old = fields.pop(path, None)
                if old is not None:
                    changed[path] = old
            else:
                old = fields.get(path, _ABSENT)
                if old != value:
                    fields[path] = value
                    changed[path] = None if old is _ABSENT else old
        return changed

    def _crossed(self, changed: Mapping[str, Any], fields: Mapping[str, Any]) -> list[tuple[Segment, bool]]:
        """Of the threshold segments (one field compared with one number) on the changed fields, those whose
        number lies in the range the field moved over: the others give the same outcome for the old and the
        new value, so their membership, equal to that outcome since their last evaluation, stays."""
        crossed: list[tuple[Segment, bool]] = []
        for path, old in changed.items():
            index = self._thresholds.get(path)
            if index is None:
                continue
            thresholds, segments = index
            before, after = number(old), number(fields.get(path))
            if before is None or after is None:
                crossed.extend(segments)  # appeared, vanished or not a number: every one of them
                continue
            low, high = (before, after) if before <= after else (after, before)
            crossed.extend(segments[bisect.bisect_left(thresholds, low) : bisect.bisect_right(thresholds, high)])
        return crossed

    def _remove(self, person_id: str, person: _Person, *, at: float, cause: str, out: list[Transition]) -> None:
        """The profile is gone (deleted, or merged into another): it leaves every segment."""
        for segment_id in list(person.members):
            self.members.get(segment_id, set()).discard(person_id)
            segment = self.segments.get(segment_id)
            out.append(
                Transition(person_id, segment_id, False, at, "removed", segment.version if segment else 0, cause)
            )
        del self.persons[person_id]
        self._due.pop(person_id, None)
        self._dirty.discard(person_id)
        self._gone.add(person_id)

    async def replay(self, messages: AsyncIterator[tuple[str, int, bytes]]) -> int:
        """Bring the snapshot up to where the consumers had got: apply (subject, stream position,
        payload) in stream order, evaluating and publishing as the stream path does (what was published
        before keeps its id: JetStream drops it as a duplicate). Returns the changes applied."""
        applied = 0
        now = self.clock()
        for_subject: dict[str, list[Transition]] = {}
        async for subject, seq, data in messages:
            if seq <= self.applied.get(subject, 0):
                continue
            partition = int(subject.rsplit(".", 1)[1])
            message = profile_pb2.ProfileChangedBatch.FromString(data)
            await self._apply_message(partition, seq, message, now, for_subject.setdefault(subject, []))
            applied += len(message.changes)
            self.applied[subject] = seq
        for subject, transitions in for_subject.items():
            if transitions:
                await self._publish(self._messages(int(subject.rsplit(".", 1)[1]), transitions))
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
            seconds, micros = divmod(round(t.at * 1e6), 1_000_000)
            stamp = event.at
            stamp.seconds = seconds
            stamp.nanos = micros * 1000
        return OutMessage(
            subject=f"{ENTERED if entered else EXITED}.{partition}",
            payload=batch.SerializeToString(),
            # From the events' ids, not the bytes: a standby replica's copy has the same ids.
            msg_id="sg_" + hashlib.blake2b("\n".join(ids).encode(), digest_size=16).hexdigest(),
        )

    async def _publish(self, messages: Sequence[OutMessage]) -> None:
        results = await self.publisher.publish_batch(messages)
        failed = [r for r in results if not r.ok]
        if failed:
            raise Unavailable(f"{len(failed)} segment event messages not stored by JetStream ({failed[0].error})")

    # --- lifecycle --------------------------------------------------------------------------------

    def compile(self, node, *, segment_id: str | None = None) -> CompiledSegment:
        """Compile a definition and check it against the other segments (known references, no cycles) and
        the number of computed traits one definition may have defined on the profile service."""
        compiled = compile_segment(node)
        if len(compiled.computed_traits) > self.max_computed_traits:
            raise InvalidArgument(
                "definition",
                f"needs {len(compiled.computed_traits)} computed traits on the profile service (one per distinct "
                f"event condition); at most {self.max_computed_traits} per definition "
                "(CDP_SEGMENTATION_MAX_COMPUTED_TRAITS)",
            )
        refs = {s.id: s.definition.segments for s in self.segments.values()}
        refs[segment_id or "$new"] = compiled.segments
        check_segment_graph(refs)
        return compiled

    async def create(self, segment_id: str, node, *, name: str = "", description: str = "") -> Segment:
        async with self._lifecycle_lock:
            if segment_id in self.segments:
                raise AlreadyExists(f"segment {segment_id!r} exists (UpdateSegment changes it)")
            compiled = self.compile(node, segment_id=segment_id)
            now = self.clock()
            segment = Segment(
                id=segment_id,
                name=name,
                description=description,
                version=1,
                compiled=compiled,
                state=BUILDING,
                created_at=now,
                updated_at=now,
            )
            await self.store.put(SEGMENTS, segment_id, segment.doc())
            self.segments[segment_id] = segment
        await self._announce({"segment": segment_id})
        log.info("segment created", extra={"segment": segment_id, "definition": to_text(compiled.node)})
        self._start_build(segment, reason="created")
        return segment

    async def update(
        self, segment_id: str, node=None, *, name: str | None = None, description: str | None = None
    ) -> Segment:
        async with self._lifecycle_lock:
            segment = self.get(segment_id)
            if name:
                segment.name = name
            if description:
                segment.description = description
            if node is not None:
                compiled = self.compile(node, segment_id=segment_id)
                task = self._builds.pop(segment_id, None)
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                replaced = segment.pending[1] if segment.pending is not None else None
                segment.pending = (segment.building_version + 1, compiled)
                segment.state, segment.error = BUILDING, ""
            segment.updated_at = self.clock()
            await self.store.put(SEGMENTS, segment_id, segment.doc())
            if node is not None and replaced is not None:
                await self._release_traits(replaced)  # a build this update cancelled
        await self._announce({"segment": segment_id})
        if node is not None:
            self._start_build(segment, reason="updated" if segment.serving else "created")
        return segment

    async def delete(self, segment_id: str) -> int:
        async with self._lifecycle_lock:
            if segment_id not in self.segments and segment_id in self.unreadable:
                await self.store.delete(SEGMENTS, segment_id)
                del self.unreadable[segment_id]
                log.info("unreadable stored segment deleted", extra={"segment": segment_id})
                return 0
            segment = self.get(segment_id)
            users = sorted(s.id for s in self.segments.values() if segment_id in s.definition.segments)
            if users:
                raise FailedPrecondition(
                    f"segment {segment_id!r} is referred to by {', '.join(users)}; change or delete those first",
                    reason="segment_in_use",
                )
            version, at = segment.building_version + 1, self.clock()
            exited = await self._drop(segment_id, version=version, at=at)
            await self.store.delete(SEGMENTS, segment_id)
            await self._release_traits(segment.compiled, segment.definition)
        await self._announce({"segment": segment_id, "deleted": {"version": version, "at": at}})
        log.info("segment deleted", extra={"segment": segment_id, "exited": exited})
        return exited

    async def _drop(self, segment_id: str, *, version: int, at: float) -> int:
        """Forget a segment: its members exit (reason "deleted"), published before anything is forgotten."""
        task = self._builds.pop(segment_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        by_partition: dict[int, list[Transition]] = {}
        for person_id in sorted(self.members.get(segment_id, ())):
            by_partition.setdefault(self._partition(person_id), []).append(
                Transition(person_id, segment_id, False, at, "deleted", version, f"v{version}")
            )
        await self._publish([m for p, ts in sorted(by_partition.items()) for m in self._messages(p, ts)])
        exited = 0
        for person_id in self.members.pop(segment_id, set()):
            person = self.persons.get(person_id)
            if person is not None and person.members.pop(segment_id, None) is not None:
                exited += 1
                self._dirty.add(person_id)
        self.segments.pop(segment_id, None)
        self._reindex()
        await self.snapshot()
        return exited

    def _traits_in_use(self) -> set[str]:
        """The computed traits something here reads: a segment's live definition (once it has served), the
        one being built, and every Estimate under way. A failed first build reads nothing."""
        names: set[str] = set()
        for segment in self.segments.values():
            if segment.serving:
                names.update(t["name"] for t in segment.compiled.computed_traits)
            if segment.state == BUILDING:
                names.update(t["name"] for t in segment.definition.computed_traits)
        for estimating in self._estimating:
            names |= estimating
        return names

    async def _release_traits(self, *definitions: CompiledSegment) -> None:
        """Delete on the profile service the computed traits of these definitions that nothing reads any
        more, and forget the values held for them (best effort: a trait left behind costs the profile
        service work, not correctness; the next release of the same trait tries again)."""
        names = {t["name"] for compiled in definitions for t in compiled.computed_traits} - self._traits_in_use()
        if not names or self.undefine_traits is None:
            return
        try:
            await self.undefine_traits(sorted(names))
        except Exception as exc:
            log.warning("could not delete computed traits %s on the profile service: %r", sorted(names), exc)
            return
        # The profile service publishes nothing when it deletes a trait: without this, a trait defined
        # again later would be read with the values it had before (a person it now counts 0 for keeps them).
        fields = {f"computed.{name}" for name in names}
        for person_id, person in self.persons.items():
            if not fields.isdisjoint(person.fields):
                for name in fields:
                    person.fields.pop(name, None)
                self._dirty.add(person_id)

    async def _announce(self, what: Mapping[str, Any]) -> None:
        if self.announce is not None:
            try:
                await self.announce(orjson.dumps(what).decode())
            except Exception as exc:  # the others pick it up from the store when they restart
                log.warning("could not announce a segment change to the other replicas: %r", exc)

    async def reload(self, announcement: str) -> None:
        """Another replica created, changed or deleted a segment: do the same here. Transitions carry the
        same ids (definition version, stored times), so JetStream keeps one copy of each."""
        what = orjson.loads(announcement)
        segment_id = what["segment"]
        record = await self.store.get(SEGMENTS, segment_id)
        async with self._lifecycle_lock:
            current = self.segments.get(segment_id)
            if record is None:
                deleted = what.get("deleted")
                if current is not None and deleted:
                    await self._drop(segment_id, version=deleted["version"], at=deleted["at"])
                return
            loaded = self._segment_from_doc(segment_id, record.doc)
            if current is None:
                self.segments[segment_id] = loaded
                if loaded.state == BUILDING:
                    self._start_build(loaded, reason="updated" if loaded.serving else "created")
                return
            current.name, current.description, current.updated_at = loaded.name, loaded.description, loaded.updated_at
            if loaded.building_version > current.building_version:
                task = self._builds.pop(segment_id, None)
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                current.pending = (loaded.building_version, loaded.definition)
                current.state, current.error = BUILDING, ""
                self._start_build(current, reason="updated" if current.serving else "created")

    def get(self, segment_id: str) -> Segment:
        segment = self.segments.get(segment_id)
        if segment is None:
            raise NotFound(f"no segment {segment_id!r}", reason="unknown_segment")
        return segment

    async def wait_live(self, segment_id: str) -> Segment:
        """The segment once it is no longer being built (live, or failed); across builds that replace
        one another (an update while the create's build runs)."""
        while True:
            segment = self.get(segment_id)
            if segment.state != BUILDING:
                return segment
            task = self._builds.get(segment_id)
            if task is None:
                await asyncio.sleep(0.02)  # the replacing build has not started yet
            else:
                await asyncio.wait({task})  # unlike awaiting it, does not raise when it is cancelled

    def _start_build(self, segment: Segment, *, reason: str) -> None:
        task = asyncio.create_task(self._build(segment, reason), name=f"build segment {segment.id}")
        self._builds[segment.id] = task
        task.add_done_callback(lambda t, s=segment.id: self._builds.pop(s, None) if self._builds.get(s) is t else None)

    async def _build(self, segment: Segment, reason: str) -> None:
        """Evaluate the definition being built over the whole population, publish the difference from the
        current membership, go live."""
        version, compiled = segment.building_version, segment.definition
        touched: set[str] = set()
        segment.last_diff = (0, 0, [], [])
        try:
            await self._prepare(compiled)
            await self._referenced_live(compiled)
            self._touched.append(touched)
            persons, inside = await self._population(compiled, progress=segment)
            async with self._lifecycle_lock:
                if self.segments.get(segment.id) is not segment or segment.building_version != version:
                    return  # replaced or deleted meanwhile
                now = self.clock()
                current = self.members.get(segment.id, set())
                new = {persons[i] for i in np.flatnonzero(inside)}
                entered, exited = sorted(new - current), sorted(current - new)
                by_partition: dict[int, list[Transition]] = {}
                for person_id, flag in [(p, False) for p in exited] + [(p, True) for p in entered]:
                    by_partition.setdefault(self._partition(person_id), []).append(
                        Transition(person_id, segment.id, flag, segment.updated_at, reason, version, f"v{version}")
                    )
                await self._publish([m for p, ts in sorted(by_partition.items()) for m in self._messages(p, ts)])
                for person_id in exited:
                    person = self.persons.get(person_id)
                    if person is not None:
                        person.members.pop(segment.id, None)
                        self._dirty.add(person_id)
                for person_id in entered:
                    person = self.persons.get(person_id)
                    if person is not None:
                        person.members[segment.id] = segment.updated_at
                        self._dirty.add(person_id)
                self.members[segment.id] = new
                replaced = segment.compiled
                segment.serve(compiled, version)
                segment.pending = None
                segment.state, segment.serving, segment.live_at, segment.error = LIVE, True, now, ""
                segment.last_diff = (len(entered), len(exited), entered[:SAMPLE], exited[:SAMPLE])
                self._reindex()
                # Persons changed while the population was evaluated, and those whose membership moved
                # segments referring to this one: evaluated again, as live.
                self._touched.remove(touched)
                await self._reevaluate(touched | set(entered) | set(exited), segment)
                await self.snapshot()
                await self.store.put(SEGMENTS, segment.id, segment.doc())
                if replaced is not compiled:
                    await self._release_traits(replaced)
            log.info(
                "segment live",
                extra={"segment": segment.id, "version": version, "entered": len(entered), "exited": len(exited)},
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("segment %s could not be built: %r", segment.id, exc)
            # FAILED; a definition that went live before keeps serving (`serving`).
            segment.state, segment.error, segment.pending = FAILED, str(getattr(exc, "message", exc)), None
            try:
                await self.store.put(SEGMENTS, segment.id, segment.doc())
            except Exception as store_exc:
                log.warning("could not store segment %s state: %r", segment.id, store_exc)
            # The traits the failed definition had defined (some of them, when the profile service refused
            # one): nothing reads them now.
            if self.segments.get(segment.id) is segment:
                async with self._lifecycle_lock:
                    await self._release_traits(compiled)
        finally:
            if touched in self._touched:
                self._touched.remove(touched)

    async def _reevaluate(self, persons: Iterable[str], segment: Segment) -> None:
        async with self._mutating():
            await self._reevaluate_now(persons, segment)

    async def _reevaluate_now(self, persons: Iterable[str], segment: Segment) -> None:
        segments = self._readers_of(segment)
        now = self.clock()
        by_partition: dict[int, list[Transition]] = {}
        for person_id in persons:
            person = self.persons.get(person_id)
            if person is not None:
                self._evaluate(
                    person_id,
                    person,
                    segments,
                    now=now,
                    at=now,
                    reason="updated",
                    cause=f"v{segment.version}r{person.seq}",
                    out=by_partition.setdefault(self._partition(person_id), []),
                )
        await self._publish([m for p, ts in sorted(by_partition.items()) for m in self._messages(p, ts)])

    async def _referenced_live(self, compiled: CompiledSegment) -> None:
        """A definition referring to segments still being built waits for them (their members are its input)."""
        while True:
            waiting = [ref for ref in compiled.segments if not self.get(ref).serving]
            if not waiting:
                return
            if all(self.get(ref).state == FAILED for ref in waiting):
                raise FailedPrecondition(f"segments {', '.join(sorted(waiting))} failed to build", reason="ref_failed")
            await asyncio.sleep(0.05)

    def _readers_of(self, segment: Segment) -> tuple[tuple[Segment, bool], ...]:
        """The segment and every live segment referring to it, dependencies first (all evaluated)."""
        found: dict[str, Segment] = {segment.id: segment}
        for segment_id in self._order:
            candidate = self.segments[segment_id]
            if candidate.compiled.segments & found.keys():
                found[segment_id] = candidate
        return tuple((s, True) for s in found.values())

    async def _prepare(self, compiled: CompiledSegment) -> None:
        """The computed traits the definition's event conditions need: defined on the profile service,
        backfilled there, and their values received here."""
        if not compiled.computed_traits:
            await self.caught_up()  # what profile published before the call counts
            return
        if self.define_traits is None:
            raise FailedPrecondition(
                "the definition has event conditions, which need the profile service (CDP_PROFILE_ADDRESS)",
                reason="no_profile_service",
            )
        await self.define_traits(compiled.computed_traits)
        if self.traits_ready is not None:
            await self.traits_ready([t["name"] for t in compiled.computed_traits])
        await self.caught_up()

    async def caught_up(self, timeout: float = 600.0) -> None:
        """Wait until every owned partition has been applied up to the PROFILES stream's end as of now."""
        if self.stream_ends is None:
            return
        ends = await self.stream_ends()
        deadline = self.clock() + timeout
        while any(self.applied.get(subject, 0) < seq for subject, seq in ends.items()):
            if self.clock() > deadline:
                raise Unavailable("profiles.changed is not consumed fast enough to evaluate the population")
            await asyncio.sleep(0.02)

    async def _population(
        self, compiled: CompiledSegment, *, progress: Segment | None = None
    ) -> tuple[list[str], np.ndarray]:
        """The vectorised evaluator over every held person, a chunk at a time (progress on the segment)."""
        started = time.perf_counter()
        persons = sorted(self.persons)
        total = len(persons)
        if progress is not None:
            progress.total, progress.done = total, 0
        now = self.clock()
        result = np.zeros(total, dtype=bool)
        refs = sorted(compiled.segments)
        for start in range(0, total, CHUNK):
            chunk = persons[start : start + CHUNK]
            rows = [self.persons[p] for p in chunk]
            columns = Columns.from_records([r.fields for r in rows])
            members = {ref: np.fromiter((ref in r.members for r in rows), dtype=bool, count=len(rows)) for ref in refs}
            result[start : start + len(chunk)] = compiled.evaluate_columns(columns, members, now)
            if progress is not None:
                progress.done = start + len(chunk)
            await asyncio.sleep(0)
        self._m_population.record((time.perf_counter() - started) * 1000)
        return persons, result

    async def estimate(self, node) -> Estimate:
        """The definition's size now. The computed traits it needs are defined for the call and deleted
        after it (those no segment reads): an estimate leaves nothing behind on the profile service."""
        compiled = self.compile(node)
        reading = frozenset(t["name"] for t in compiled.computed_traits)
        self._estimating.append(reading)
        try:
            await self._prepare(compiled)
            started = time.perf_counter()
            persons, inside = await self._population(compiled)
            elapsed = (time.perf_counter() - started) * 1000
        finally:
            self._estimating.remove(reading)
            if reading:
                async with self._lifecycle_lock:
                    await self._release_traits(compiled)
        hits = np.flatnonzero(inside)
        return Estimate(
            size=int(hits.size),
            population=len(persons),
            sample=[persons[i] for i in hits[:SAMPLE]],
            compiled=compiled,
            evaluate_ms=elapsed,
        )

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

    async def snapshot(self, chunk: int = 500) -> int:
        """Write the persons changed since the last snapshot, then the stream positions they include.

        Small chunks keep the event loop free; positions go last, so after a crash mid-way some persons
        are newer than the positions, and their own stream position makes the replay skip what they hold."""
        async with self._snapshot_lock:
            self._thawed.clear()
            try:
                while self._inflight:
                    await self._idle.wait()
                if any(self._unpublished.values()):
                    return 0  # the state is ahead of what the bus has: not until those are published
                dirty, gone = self._dirty, self._gone
                positions = {s: q for s, q in self.applied.items() if q != self.snapshotted.get(s)}
                if not dirty and not gone and not positions and not self._built_dirty:
                    return 0
                self._dirty, self._gone, self._built_dirty = set(), set(), False
                # Copies, not JSON, while nothing may change: a shallow copy is enough (values are replaced,
                # never changed in place) and costs a fraction of serialising, which happens below in chunks.
                copies = []
                for person_id in dirty:
                    person = self.persons.get(person_id)
                    if person is not None:
                        copies.append(
                            (person_id, person.fields.copy(), person.members.copy(), person.seq, person.evaluated_at)
                        )
                at = self.clock()
                built = {s.id: s.version for s in self.segments.values() if s.serving}
            finally:
                self._thawed.set()
            marks: list[Put | Delete] = [
                *(Put(self.checkpoints_collection, s, {"stream_seq": q, "at": at}) for s, q in positions.items()),
                Put(self.checkpoints_collection, BUILT, {"versions": built}),
            ]
            # Persons first, positions last: a crash mid-way leaves persons newer than the positions, and
            # each person's own stream position makes the replay skip what it holds.
            written = 0
            try:
                ops: list[Put | Delete] = [Delete(self.persons_collection, p) for p in gone - dirty]
                for start in range(0, len(copies), chunk):
                    for person_id, fields, members, seq, evaluated_at in copies[start : start + chunk]:
                        state = {"fields": fields, "members": members, "seq": seq, "t": evaluated_at}
                        ops.append(Put(self.persons_collection, person_id, {"state": orjson.dumps(state).decode()}))
                    await self.store.bulk_write(ops)
                    written += len(ops)
                    ops = []
                    await asyncio.sleep(0)
                if ops:
                    await self.store.bulk_write(ops)
                    written += len(ops)
                await self.store.bulk_write(marks)
            except BaseException:
                self._dirty |= {p for p in dirty if p in self.persons}
                self._gone |= gone - self._dirty
                self._built_dirty = True
                raise
            self.snapshotted.update(positions)
            if gone:  # removed (deleted or merged) persons leave no bytes in the store's files
                await self.store.erase()
            return written + len(marks)


class _Absent:
    __slots__ = ()


_ABSENT = _Absent()


def threshold(compiled: CompiledSegment) -> tuple[str, float] | None:
    """(field, number) when the whole definition compares one top-level field with one number."""
    plan = compiled.plan
    if isinstance(plan, NumberTest):
        return plan.field, plan.value
    if (
        isinstance(plan, Test)
        and not plan.sub
        and plan.op in ("=", "!=", "<", "<=", ">", ">=")
        and type(plan.literal) is float
    ):
        return plan.field, plan.literal
    return None


def check_segment_id(segment_id: str, field: str = "id") -> str:
    if not SEGMENT_ID.fullmatch(segment_id or ""):
        raise InvalidArgument(
            field, f"{segment_id!r} must be 1-64 characters: a lowercase letter, then lowercase letters, digits, _ or -"
        )
    return segment_id
