"""The segmentation engine: the held state, the wiring of the parts that hold the rules, and what a
batch of `profiles.changed.<p>` does (the stream itself runs on the kit's engine: stream.py).

Where a rule lives:
- catalogue.py: segment definitions, their lifecycle states (building, live, failed), their storage,
  the computed traits they own on the profile service;
- index.py: which live segments a field change can move (the field index, the threshold index);
- evaluation.py: per-person evaluation of a change, removals, and the timers of time-dependent segments;
- builds.py: whole-population builds (a segment created or changed) with progress, and `Estimate`;
- percentiles.py: the population percentiles definitions compare with, kept current on a schedule;
- stream.py: the partitioned engine (consumer, checkpoint and outbox, publishing, ownership);
- this module: applying a batch (`apply_changes`), loading, replaying and dropping a partition's held
  state, snapshots, reads.

Real time, per `profiles.changed.<p>` message: each change updates the person's flat fields and the live
segments reading a changed field are evaluated for that person (evaluation.py); every flip is a
transition, returned as the batch's `segments.entered.<p>` / `segments.exited.<p>` messages, which the
kit commits with the batch's checkpoint (its outbox) and publishes before acknowledging.

Durability follows cdp_kit.held: nothing is written per person per change. Fields, memberships and each
person's stream position are snapshotted every few seconds at a quiescent point, then the partition
positions they include (`segmentation_snapshots`); a partition's start loads them and replays
`profiles.changed` from there up to where the engine had got, publishing again what the replay finds
after what is on the bus already: the engine's checkpoint (its outbox published first) and the newest
person loaded. A snapshot a crash cut short holds persons past its positions, which skip a message
the others apply again: the replay would find part of a message's transitions, a message of a new id.
The replay evaluates each message at the time its batch was evaluated (`batch_clock`, committed with the
checkpoint while a time-based segment is live), after the timers due by then: at the restart's time a
person could be found past a flip that had not come yet, and the timer that publishes it never set.
Timers fired where no batch clock records the time (the timer loop's rounds; a batch of messages
replayed already, redelivered after a restart; an arriving partition's, before it is brought to a
segment) are recorded too (`timer_round`: where they ran among the positions and logged moves, and when),
and the replay fires them there at that time: at its own, a timer finds what time has made of the person
since (out of `starts_at > now - 1m` again), not what was published.
Snapshots also record, per partition, the definition versions its memberships are of; a partition
arriving with another version of a live segment (or none) is brought to it before it is served. A
segment going live, or persons brought to it, between a snapshot and a crash is replayed where it
happened (a round log entry, builds.py): the changes before it are evaluated without it, those after
it with it (`index`, in the replaying task).
Every transition has a stable id (segment, person and what caused it: a stream position, a timer instant,
a definition version or a percentile round), so a transition published before a crash is a JetStream
duplicate after it, and a person's stream position keeps a change from being applied twice. Memberships
therefore never flip spuriously: only a real change of the inputs, of time or of a definition moves
them. Transitions found outside a batch (timers of an idle partition, builds, deletions, percentile
rounds) are published at a quiescent point, after everything the partitions applied before them and
before anything they apply next.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
from google.protobuf.message import DecodeError
from opentelemetry.metrics import Observation

from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2
from cdp_kit.bus import Delivery, OutMessage, Partitioner, subjects
from cdp_kit.bus.consumer import describe_error
from cdp_kit.engine import Reject
from cdp_kit.errors import Unavailable
from cdp_kit.held import Codec, HeldFields, ProfileSource
from cdp_kit.storage import Delete, Put, Store
from cdp_kit.telemetry import LATENCY_BUCKETS_MS, Telemetry
from cdp_kit.timestamps import set_ns

# Re-exported (`X as X`): callers and tests know these by the engine's name.
from cdp_segmentation.builds import Builds, as_live, live_entry
from cdp_segmentation.builds import Estimate as Estimate
from cdp_segmentation.cache import Cached
from cdp_segmentation.catalogue import ANNOUNCE as ANNOUNCE
from cdp_segmentation.catalogue import BUILDING as BUILDING
from cdp_segmentation.catalogue import FAILED as FAILED
from cdp_segmentation.catalogue import LIVE, Catalogue, Segment, TraitDefiner, segment_from_doc
from cdp_segmentation.catalogue import SEGMENTS as SEGMENTS
from cdp_segmentation.catalogue import check_segment_id as check_segment_id
from cdp_segmentation.domain import CompiledSegment
from cdp_segmentation.evaluation import Evaluation, Person, Transition
from cdp_segmentation.fields import FieldSource, ModelReaders
from cdp_segmentation.index import FieldIndex
from cdp_segmentation.journeys import LiveJourneys
from cdp_segmentation.notices import erase_noticed
from cdp_segmentation.percentiles import REPLAYED_INDEX, ROUNDS, Percentiles, PercentileValues, Replayed

if TYPE_CHECKING:
    from cdp_segmentation.stream import Changes, SegmentationStream
    from cdp_segmentation.summaries import SharedPercentiles

log = logging.getLogger("cdp.segmentation.engine")


PERSONS = "segmentation_persons"
# The stream positions each snapshot includes, and the definition versions its memberships are of.
SNAPSHOTS = "segmentation_snapshots"
# Before the partitioned engine, snapshots kept their positions in the collection the engine's
# checkpoints now use; read once, on the first start after the upgrade (`_migrate_snapshot_positions`).
CHECKPOINTS = subjects.checkpoints_collection("segmentation")
# Snapshot keys: the definition version each segment's held memberships are of, in each partition
# ("$built.<p>", written for the partitions served) and as of this replica's last snapshot ("$built").
BUILT = "$built"
MAX_EVENTS_PER_MESSAGE = 1000
PUBLISH_BACKOFF = (0.05, 0.2, 1.0, 2.0)
SNAPSHOT_CHUNK = 100  # persons per write of a snapshot
# The clock each batch was evaluated with, "<partition>:<its last position, 20 digits>" -> {first, now}:
# what a replay evaluates the positions after the snapshot with (`replay`), until a snapshot includes them.
# And each round of timers fired outside a batch, "<partition>:<position>:t<generation>.<place>.<µs>" ->
# {timers, position, place, generation} (`timer_round`): where the replay fires them again, and when.
CLOCKS = "segmentation_batch_clocks"

TraitWaiter = Callable[[Sequence[str]], Awaitable[None]]
StreamEnds = Callable[[], Awaitable[dict[str, int]]]
# A partition's messages after a position: (subject, stream position, payload), in stream order.
History = Callable[[int], AsyncIterator[tuple[str, int, bytes]]]


class SegmentationEngine(Catalogue, Evaluation, Builds, Percentiles):
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
        percentile_interval: float = 5.0,
        shared_percentiles: SharedPercentiles | None = None,
        known_fields: FieldSource | None = None,
        live_journeys: LiveJourneys | None = None,
        model_readers: ModelReaders | None = None,
        max_estimates: int = 2,
        estimate_seconds: float = 10.0,
        estimate_traits: int = 40,
        readers_cache_seconds: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.partitions = partitions
        # Partitions whose held state is loaded here, and those of them being served (arrived, replayed).
        # Standalone (no stream, tests and tools) every loaded partition is served from `start`.
        self.owned: set[int] = set(owned)
        self.active: set[int] = set()
        self.stream: SegmentationStream | None = None  # set by the stream that runs this engine
        self.define_traits = define_traits
        self.traits_ready = traits_ready
        self.undefine_traits = undefine_traits
        self.stream_ends = stream_ends
        self.snapshot_interval = snapshot_interval  # the stream's interval (stream.engine_spec)
        self.timer_resolution = timer_resolution
        self.clock = clock
        self.max_computed_traits = max_computed_traits
        # The scores and computed traits that exist, asked before a definition is accepted (fields.py).
        self.known_fields = known_fields
        # The live journeys orchestration has and what they use (journeys.py): asked before a segment is
        # deleted, and for the readers of a computed trait; None: orchestration is not configured.
        self.live_journeys = live_journeys
        # The model versions scoring keeps and the computed traits their features read (fields.py): asked
        # for the readers of a computed trait; None: scoring is not configured.
        self.model_readers = model_readers
        # The same two, kept `readers_cache_seconds` for ListComputedTraitReaders (any reader may call it
        # as often as it likes) and forgotten when either announces a change (cache.py).
        self.readers_journeys = Cached(live_journeys, readers_cache_seconds) if live_journeys else None
        self.readers_models = Cached(model_readers, readers_cache_seconds) if model_readers else None
        # Computed traits read by each Estimate under way (a list per call): not deleted meanwhile.
        self._estimating: list[frozenset[str]] = []
        # What a preview may take (builds.py, `estimate`): Estimates at once, the time budget of one, and
        # the computed traits they may define on profile at once that no segment reads (temporary ones).
        self.max_estimates = max_estimates
        self.estimate_seconds = estimate_seconds
        self.estimate_traits = estimate_traits
        self._estimates_running = 0
        self._estimate_temporary: list[frozenset[str]] = []
        # Stored segments that could not be loaded: id -> why. DeleteSegment still removes them.
        self.unreadable: dict[str, str] = {}
        self.announce = announce
        self.segments: dict[str, Segment] = {}
        # The population percentiles live definitions compare with (key -> value): every compiled
        # definition's per-profile predicate reads this one mapping (percentiles.py keeps it current).
        self.percentiles: dict[str, float | None] = PercentileValues()
        self.percentiles_stale = False  # something moved one since the last round
        self.percentile_interval = percentile_interval
        # The last move of the values: a round (its boundary, epoch ms: its id) or a build's (the last
        # move's + 1); snapshot marks and the round log are ordered by it. Its transitions' id and time.
        self.percentile_round = 0
        self.percentile_cause, self.percentile_at = "q0", 0.0
        # Replicas that split the partitions: one value per round over everyone (summaries.py).
        self.shared = shared_percentiles
        self._undecided = False  # summaries written here that no decided round has taken yet
        self.rounds = ROUNDS + namespace  # the round log (percentiles.py)
        # partition -> the versions of the snapshot its persons were loaded from: a live segment of another
        # version (or none) is adopted when it arrives (`_adopt_arrived`)
        self._built_base: dict[int, dict[str, int]] = {}
        # partition -> the stream position up to which every message's transitions are on the bus already
        # (or in the engine's outbox, published before the replay's): its replay applies them, publishes
        # none of them (`replay`). Set when the partition is loaded (`_load`), raised when it arrives.
        self._published: dict[int, int] = {}
        # partition -> (round, values) of the snapshot its persons were loaded from: where its replay starts
        self._percentile_base: dict[int, tuple[int, dict[str, float | None]]] = {}
        # partition -> the generation of the round log its held state includes: its snapshot's, or of the
        # records its replay ran (percentiles.py: what a replay runs is what was logged after its snapshot)
        self._generation: dict[int, int] = {}
        # The round and the partitions' generations the snapshot being written includes (its marks).
        self._cut: tuple[int, dict[int, int]] | None = None
        self._moved_persons = 0
        self._partition = Partitioner(partitions)
        self._namespace = namespace
        # Standby replicas each hold every partition: their persons and positions are their own.
        self.held: HeldFields[Person] = HeldFields(
            store,
            collection=PERSONS + namespace,
            checkpoints=SNAPSHOTS + namespace,
            owns=lambda person: self._partition(person) in self.owned,
            codec=Codec(copy=_copy_person, encode=_encode_person, decode=self._decode_person),
            fetch=profile_source,
            marks=lambda: {**self._built_marks(), **self.percentile_marks()},
            clock=clock,
            # The batches' commits share the store's writer with the snapshot's chunks and wait behind
            # the one being written: 100 persons is ~3 ms of SQLite, 500 is ~25-45 ms (measured).
            chunk=SNAPSHOT_CHUNK,
        )
        self.persons = self.held.persons
        self.members: dict[str, set[str]] = {}  # segment id -> persons (live definitions)
        # partition subject -> the last stream position the held state includes
        self.applied = self.held.applied
        self.snapshotted = self.held.snapshotted
        self._index = FieldIndex()
        self._timers: dict[int, list[tuple[float, str]]] = {}  # partition -> (due, person): a heap
        self._due: dict[str, float] = {}  # person -> its pending timer
        # The batch clocks (`batch_clock`) in the store: the collection, and partition -> their positions
        # not yet pruned (those a snapshot includes are deleted after it: `_prune_clocks`); the timer rounds'
        # (`timer_round`): partition -> (generation, key) of those not yet pruned.
        self.clocks = CLOCKS + namespace
        self._clock_records: dict[int, list[int]] = {}
        self._round_records: dict[int, list[tuple[int, str]]] = {}
        # The persons PRIVACY's privacy.deleted notices name (person -> request id), read at start, and the
        # same by partition: erased from each partition as it arrives, their changes skipped (notices.py).
        self.deleted: dict[str, str] = {}
        self.deleted_by_partition: dict[int, dict[str, str]] = {}
        self._last_apply: dict[int, float] = {}  # partition -> when it last applied a batch (monotonic)
        # One set per whole-population run under way: the persons changed meanwhile.
        self._touched: list[set[str]] = []
        self._sorted_members: dict[str, tuple[float, list[str]]] = {}
        self._builds: dict[str, asyncio.Task] = {}
        # Definitions a build that went live before a crash replaced (builds.py, `live_again`): their
        # computed traits are released when the builds resume.
        self._replaced_at_start: list[CompiledSegment] = []
        self._lifecycle_lock = asyncio.Lock()
        # Held by a partition's arrival (load, replay, brought to the live segments) and by a build going
        # live: a partition arrives wholly before or wholly after, never half-way through either.
        self._arrivals = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        meter = telemetry.meter
        self._m_transitions = meter.create_counter(
            "cdp.segmentation.transitions",
            unit="{transition}",
            description="membership transitions published, by direction",
        )
        self.evaluations = 0
        # Memberships decided without an evaluation (window segments a change crossed: evaluation.py)
        self.decided = 0
        meter.create_observable_counter(
            "cdp.segmentation.evaluations",
            callbacks=[lambda _options: [Observation(self.evaluations)]],
            unit="{evaluation}",
            description="per-profile segment evaluations",
        )
        self._m_freshness = meter.create_histogram(
            "cdp.segmentation.freshness",
            unit="ms",
            description="profile change to its batch applied here, per batch (its oldest change)",
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

    @property
    def index(self) -> FieldIndex:
        """The live segments' index; in a replay before a segment's logged go-live, the one without it."""
        replayed = REPLAYED_INDEX.get()
        return self._index if replayed is None else replayed

    @index.setter
    def index(self, index: FieldIndex) -> None:
        self._index = index

    def _observe_members(self, _options):
        return [Observation(len(m), {"segment": s}) for s, m in self.members.items()]

    def _observe_timers(self, _options):
        return [Observation(len(self._due))]

    # --- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """The segments, then the last snapshot of the owned partitions' persons (a stream brings each
        up to date when it arrives: `arrive`; standalone, `replay` does); unfinished builds resume."""
        loaded: dict[str, Segment] = {}
        async for record in self.store.scan_all(SEGMENTS):
            try:
                loaded[record.key] = segment_from_doc(record.key, record.doc, self.percentiles)
            except Exception as exc:
                self.unreadable[record.key] = type(exc).__name__
                log.error(
                    "stored segment cannot be loaded; left out (DeleteSegment removes it)",
                    extra={"segment": record.key, "error": type(exc).__name__},
                )
        self.segments = loaded
        await self._migrate_snapshot_positions()
        built_record = await self.store.get(self.held.checkpoints, BUILT)
        built: dict[str, int] = (built_record.doc if built_record is not None else {}).get("versions", {})
        went_live = await self.logged_live()
        for segment in self.segments.values():
            if segment.state == BUILDING and (
                (segment.id, segment.building_version) in went_live
                or (built.get(segment.id) == segment.building_version and (segment.pending or not segment.serving))
            ):
                # Its build went live before a crash (logged, or a snapshot holds it): live, as it was then;
                # the replays make it live where it went live (builds.py, `replay_live`).
                await self.live_again(segment)
            # Changed by another replica while this one was down: its memberships here are of another version.
            # (Unless this replica's adoption of it is logged: the replays bring the partitions to it.)
            elif (
                segment.serving
                and built.get(segment.id) != segment.version
                and segment.state == LIVE
                and (segment.id, segment.version) not in went_live
            ):
                segment.pending = (segment.version, segment.compiled)
                segment.state = BUILDING
        await self.load_percentiles()
        self._reindex()
        owned, self.owned = set(self.owned), set()
        await self._load(owned)
        if self.stream is None:
            self.active |= owned
        self._tasks.append(asyncio.create_task(self._timer_loop(), name="segmentation timers"))
        self._tasks.append(asyncio.create_task(self._percentile_loop(), name="segmentation percentiles"))

    async def _migrate_snapshot_positions(self) -> None:
        """The first start after the upgrade to the partitioned engine: the last snapshot's positions
        and built versions move from the checkpoints collection (which the engine now owns, and which
        still holds them: they are where its consumers resume) to `segmentation_snapshots`. Only the
        old snapshots wrote a "$built" record there; it is deleted last."""
        old = CHECKPOINTS + self._namespace
        marker = await self.store.get(old, BUILT)
        if marker is None or await self.store.get(self.held.checkpoints, BUILT) is not None:
            return
        ops: list[Put | Delete] = [Put(self.held.checkpoints, r.key, r.doc) async for r in self.store.scan_all(old)]
        await self.store.bulk_write(ops)
        await self.store.bulk_write([Delete(old, BUILT)])
        log.info("snapshot positions moved to %s", self.held.checkpoints, extra={"records": len(ops)})

    async def _load(self, partitions: set[int]) -> None:
        """The last snapshot of `partitions`: their positions and persons (one scan for all of them)."""
        if not partitions:
            return
        wanted = {subjects.profiles_changed(p) for p in partitions}
        built: dict[str, dict[str, int]] = {}
        async for record in self.store.scan_all(self.held.checkpoints):
            if record.key in wanted:
                self.applied[record.key] = self.snapshotted[record.key] = record.doc.get("stream_seq", 0)
            elif record.key.startswith(BUILT):
                built[record.key] = record.doc.get("versions", {})
        for partition in partitions:
            # A snapshot from before the marks per partition: the replica's own (one replica held everything).
            self._built_base[partition] = built.get(f"{BUILT}.{partition}", built.get(BUILT, {}))
        loaded: list[str] = []
        decode = self._decode_person
        # A snapshot writes its persons before the positions they include (cdp_kit.held): one a crash cut
        # short left persons newer than the positions, and the replay from there would find only some of
        # a message's transitions (`replay`). A person is written only by a snapshot taken once everything
        # up to its position was published, so the newest one loaded says how far that goes.
        published = {p: self.applied.get(subjects.profiles_changed(p), 0) for p in partitions}
        async for record in self.store.scan_all(self.held.collection, page_size=2000):
            partition = self._partition(record.key)
            if partition in partitions:
                person = self.persons[record.key] = decode(record.doc)
                self.held.versions[record.key] = record.version
                loaded.append(record.key)
                if person.seq > published[partition]:
                    published[partition] = person.seq
        for partition, seq in sorted(published.items()):
            position = self.applied.get(subjects.profiles_changed(partition), 0)
            if seq > position:
                log.info(
                    "snapshot cut short: persons past its position; the replay publishes nothing up to theirs",
                    extra={"partition": partition, "position": position, "persons_position": seq},
                )
        self._published.update(published)
        now = self.clock()
        for person_id in loaded:
            person = self.persons[person_id]
            for segment_id in person.members:
                self.members.setdefault(segment_id, set()).add(person_id)
            self._schedule(person_id, person, person.evaluated_at or now)
        await self.remember_base(partitions)
        self.owned |= partitions

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
            self.log_snapshot_failure(exc)

    def _serving(self) -> list[Segment]:
        return [s for s in self.segments.values() if s.serving]

    def _reindex(self) -> None:
        """The live segments changed: a new field index, and the built versions are due in a snapshot. One
        segment created: this one grown by it (index.py, `grown`); else built whole."""
        serving = self._serving()
        self.index = self._index.grown(serving) or FieldIndex(serving)
        self.held.marks_dirty = True

    # --- partitions: arrival, departure, recovery --------------------------------------------------

    async def arrive(self, partition: int, history: History) -> int:
        """Serve `partition`: its last snapshot (unless loaded at start) without the persons deletion notices
        name, then the stream after it (`history(position)`), applied and published as `replay` does.
        Returns the changes replayed.
        A build going live meanwhile waits for it, and then makes its persons live with the others."""
        async with self._arrivals, self.held.mutating():
            if partition not in self.owned:
                await self._load({partition})
            # Deleted persons a restored store file brings back: erased before the replay, the adoption and
            # the pipeline publish anything (notices.py).
            await erase_noticed(self, self.deleted_by_partition.get(partition, {}), partition)
            if self.stream is not None:
                # The engine's checkpoint: what a crash cut short of the snapshot deleted (a person gone
                # leaves no position behind) is below it; its outbox is published first, before what the
                # replay finds after it.
                published = await self.stream.published_through(partition, self._publish_durably)
                self._published[partition] = max(self._published.get(partition, 0), published)
            subject = subjects.profiles_changed(partition)
            replayed = await self.replay(history(self.applied.get(subject, 0)), partitions=(partition,))
            await self._adopt_arrived(partition)
            self.active.add(partition)
        if replayed:
            log.info(
                "partition brought up to date from the PROFILES stream",
                extra={"partition": partition, "changes": replayed},
            )
        return replayed

    async def _adopt_arrived(self, partition: int) -> None:
        """The live segments the snapshot `partition` was loaded from does not include at their version
        (built here or on another replica while another held it, or while this one was down): its persons
        brought to them as the build would have, under the build's ids (builds.py, `_adopt_now`).
        Published before the partition is served, as the replay's transitions are; a segment adopted
        meanwhile (an announcement while this publishes) is caught up with too.

        The partition's timers due by then fire first, a round recorded like the timer loop's
        (`fire_recorded`): the snapshot and the replay leave the persons as of the last batch's clock, and
        a flip due since (the partition elsewhere, the process down) is not in their memberships until
        its timer fires. A segment referring to a time-based one would be evaluated on the membership
        time has ended, and its persons entered (left) under the build's id, then left (entered) again
        when the timer fires: a pair of transitions for a membership that never held."""
        done = self._built_base.pop(partition, {})
        while True:
            stale = [s for s in self._serving() if done.get(s.id) != s.version]
            if not stale:
                return
            in_partition = sorted(p for p in self.persons if self._partition(p) == partition)
            now, order = self.clock(), {segment_id: n for n, segment_id in enumerate(self.index.order)}
            await self.fire_recorded([partition], now)
            # Logged first, in the order they are brought: a crash before the next snapshot replays the
            # partition's changes after this with them, and this here, under the same ids.
            logged = []
            for segment in sorted(stale, key=lambda s: order.get(s.id, len(order))):
                logged += await self.log_live(live_entry(*as_live(segment), golive=False, now=now), [partition])
            moved = self._adopt_now(stale, in_partition, now=now)
            done.update({s.id: s.version for s in stale})
            await self._publish_durably(self._messages(partition, moved.get(partition, [])))
            await self.live_published(logged)

    def _built_marks(self) -> dict[str, dict[str, Any]]:
        versions = {"versions": {s.id: s.version for s in self.segments.values() if s.serving}}
        # A partition arriving keeps the mark its persons were loaded with until it is adopted and served.
        return {BUILT: versions, **{f"{BUILT}.{partition}": versions for partition in sorted(self.active)}}

    def leave(self, partition: int) -> None:
        """Forget `partition` (another replica serves it now and this one snapshotted it first, or it is
        being reloaded): nothing of it is written or deleted by later snapshots."""
        self.active.discard(partition)
        self.owned.discard(partition)
        subject = subjects.profiles_changed(partition)
        self.applied.pop(subject, None)
        self.snapshotted.pop(subject, None)
        self._timers.pop(partition, None)
        self._last_apply.pop(partition, None)
        self._percentile_base.pop(partition, None)
        self._generation.pop(partition, None)
        self._built_base.pop(partition, None)
        self._published.pop(partition, None)
        self._clock_records.pop(partition, None)  # its next owner's replay reads them, a snapshot prunes them
        self._round_records.pop(partition, None)
        leaving = {p for p in self.persons if self._partition(p) == partition}
        for person_id in leaving:
            self._due.pop(person_id, None)
            for segment_id in self.persons[person_id].members:
                self.members.get(segment_id, set()).discard(person_id)
        self.held.forget(lambda person_id: person_id in leaving or self._partition(person_id) == partition)

    async def reload_partition(self, partition: int, history: History) -> None:
        """A batch of `partition` failed to commit: what is held for it may include changes whose
        transitions never became durable. Load it again from the snapshot and replay to the checkpoint."""
        self.leave(partition)
        await self.arrive(partition, history)

    # --- the stream path --------------------------------------------------------------------------

    async def apply_changes(
        self, partition: int, items: Sequence[Changes], writes: list[Put] | None = None
    ) -> list[OutMessage]:
        """Apply a batch of `profiles.changed.<partition>` (decoded, in stream order) after the
        partition's due timers; the transitions it finds, as the messages to publish. With `writes` (the
        stream's batch commit), the clock the batch was evaluated with goes in it while a time-based
        segment is live (`batch_clock`); a batch of messages the partition's replay applied already (their
        redelivery after a restart) that fired timers records them as a round (`timer_round`) instead:
        the replay applied those messages at their own clocks, and must fire these timers at this one."""
        subject = subjects.profiles_changed(partition)
        applied = self.applied.get(subject, 0)
        now = self.clock()
        transitions: list[Transition] = []
        fired = self._fire_due(partition, now, transitions)
        oldest = math.inf
        first = 0
        for item in items:
            if item.seq <= applied:
                continue  # applied by the replay when the partition arrived; published then
            first = first or item.seq
            applied_at = await self._apply_message(partition, item.seq, item.message, now, transitions)
            if applied_at < oldest:
                oldest = applied_at
        if items:
            self.applied[subject] = max(applied, items[-1].seq)
        if writes is not None and self.index.time_segments:
            if first:
                writes.append(self.batch_clock(partition, first, items[-1].seq, now))
            elif fired:
                writes.append(self.timer_round(partition, now))
        self._last_apply[partition] = time.monotonic()
        if oldest is not math.inf:
            self._m_freshness.record(max(0.0, (self.clock() - oldest) * 1000))
        return self._messages(partition, transitions) if transitions else []

    async def handle(self, batch: Sequence[Delivery]) -> None:
        """Apply one batch of deliveries and publish its transitions, without the partitioned engine (tests,
        tools and the in-process benchmark; the service's stream is stream.py's)."""
        from cdp_segmentation.stream import decode

        async with self.held.mutating():
            partition = subjects.partition_of(batch[0].subject)
            items = []
            for delivery in batch:
                try:
                    items.append(decode(delivery))
                except Reject as bad:
                    delivery.reject(bad.reason, str(bad))
            messages = await self.apply_changes(partition, items)
            if messages:
                await self._publish(messages)

    async def replay(self, messages: AsyncIterator[tuple[str, int, bytes]], partitions: Iterable[int] = ()) -> int:
        """Bring the snapshot up to where the stream had got: apply (subject, stream position, payload)
        in stream order, evaluating as the stream path did, and publish what it finds (what was
        published before keeps its id: JetStream drops it as a duplicate). Returns the changes applied.

        Except a message at or below the partition's published position (`_published`): its transitions
        are on the bus, and the replay may not find them all. A snapshot cut short holds some persons past
        the positions, which skip the message (their state includes it), and the persons it deleted, which
        it would evaluate as new, empty profiles; the others' transitions alone would be a message of
        another id (a message's id comes from all of its events: `_messages`), published twice.

        Each message is evaluated at the time its batch was (`batch_clock`), after the partition's timers
        due by then (as the batch fired them; published only past the published position, like the
        message's transitions): at the restart's time, a person would be found past a flip that had not
        come when the batch ran, and the timer that published it (an exit at a trial's end, an enter when
        "not seen for 30 days" comes true) would never be set. A message with no clock recorded is
        evaluated at the restart's time: past the published position it is published here first, as the
        stream path would have had it run now, and that time is recorded before it is published, so a
        later replay finds the same transitions (and timers); at or below it, it was applied while no
        time-based segment was live (nothing there reads the time) or before clocks were recorded.

        Percentile rounds logged after the snapshot run again where they ran (percentiles.py), so each
        change is evaluated with the values it was first evaluated with; then each partition replayed (and
        each of `partitions`) catches up with the live values. So do the rounds of timers fired outside a
        batch (`timer_round`), at the time they fired (`_replay_until`)."""
        now = self.clock()
        for_subject: dict[str, list[Transition]] = {}
        plans: dict[int, Replayed] = {}
        clocks: dict[int, _Clocks] = {}
        first_here: dict[int, tuple[int, int]] = {}  # partition -> the positions published here first
        published = self._published

        async def plan(partition: int) -> Replayed:
            if partition not in plans:
                base = self._generation.get(partition, 0)  # of the snapshot (replay_plan moves it on)
                replayed = plans[partition] = await self.replay_plan(partition)
                recorded = clocks[partition] = await self._batch_clocks(partition, base)
                # What is logged or recorded from here on comes after all of it: a later generation (as
                # replay_plan does for the log), and places past those it holds, so that a timer round
                # recorded here sorts after the moves the replay ran at its position, and a move logged
                # here after the timer rounds it ran (`_replay_until`; a start's count does the same:
                # load_percentiles).
                self._generation[partition] = max(
                    [self._generation.get(partition, 0), *(r.generation for r in recorded.rounds)]
                )
                self.percentile_round = max(
                    [
                        self.percentile_round,
                        *(r.round for r in replayed.rounds),
                        *(r.place + 1 for r in recorded.rounds),
                    ]
                )
            return plans[partition]

        async def apply(subject: str, seq: int, data: bytes) -> int:
            partition = subjects.partition_of(subject)
            out = for_subject.setdefault(subject, [])
            replayed = await plan(partition)
            self._replay_until(partition, replayed, clocks[partition], seq, out)
            try:
                message = profile_pb2.ProfileChangedBatch.FromString(data)
            except DecodeError:
                return 0  # dead-lettered when it came
            # On the bus already (a round's transitions above are published: each is its own message).
            found = out if seq > published.get(partition, 0) else []
            at = clocks[partition].at(seq)
            if at is None and found is out:
                at = now
                first_here[partition] = (first_here.get(partition, (seq, seq))[0], seq)
            with self.replaying(replayed):
                if at is not None:
                    self._fire_due(partition, at, found)
                await self._apply_message(partition, seq, message, now if at is None else at, found)
            return len(message.changes)

        applied = await self.held.replay(messages, apply)
        for partition in sorted({*plans, *partitions}):
            out = for_subject.setdefault(subjects.profiles_changed(partition), [])
            replayed = await plan(partition)
            self._replay_until(partition, replayed, clocks[partition], None, out)
            await self.catch_up(partition, replayed, out)
        if first_here:
            # Before anything it found is published: a replay after a crash from here on must find the same.
            records = [self.batch_clock(p, first, last, now) for p, (first, last) in sorted(first_here.items())]
            await self.store.bulk_write(records)
        for subject, transitions in for_subject.items():
            if transitions:
                await self._publish_durably(self._messages(subjects.partition_of(subject), transitions))
        return applied

    def _replay_until(
        self, partition: int, replayed: Replayed, recorded: _Clocks, before: int | None, out: list[Transition]
    ) -> None:
        """The logged moves and go-lives (percentiles.py, `replay_rounds`) and the timer rounds recorded
        (`timer_round`) that ran before stream position `before` (all: None), in the order they ran.

        A timer round ran after the moves logged at an earlier position, or at its own with a place not
        after its own (the replica's count of moves when it fired: what it logged next had a later place,
        `replay`'s plan keeps that true across replicas), and before the others. It fires the timers due
        at its time, as it did: what it publishes again is a duplicate of what it published (the same
        persons due, the same instant's state, so the same messages), past the published position only,
        like a message's transitions: below it a batch committed after it, once it was published."""
        published = self._published.get(partition, 0)
        for timers in recorded.rounds_before(before):
            ahead, n = replayed.rounds, 0
            while n < len(ahead) and (ahead[n].position, ahead[n].round) <= (timers.position, timers.place):
                n += 1
            replayed.rounds = ahead[:n]
            self.replay_rounds(partition, replayed, None, out)
            replayed.rounds = ahead[n:]
            with self.replaying(replayed):
                self._fire_due(partition, timers.at, out if timers.position >= published else [])
        self.replay_rounds(partition, replayed, before, out)

    def batch_clock(self, partition: int, first: int, last: int, now: float) -> Put:
        """The record of the clock positions `first`..`last` of `partition` were evaluated with (a batch's
        `now`, committed with its checkpoint; a replay's, for what it published first), read by the
        replays until a snapshot includes `last` (`_prune_clocks`). A batch's is written only while a
        time-based segment is live: nothing else reads the time."""
        self._clock_records.setdefault(partition, []).append(last)
        return Put(self.clocks, f"{partition}:{last:020d}", {"first": first, "now": now})

    def timer_round(self, partition: int, now: float) -> Put:
        """The record of a round of `partition`'s timers fired at `now` outside a batch (`fire_recorded`),
        written before anything of it is published: where it ran, after the partition's applied position
        and its moves logged up to the replica's count of them (the place: what is logged next has a later
        one), and of the generation of the snapshot that will include it (percentiles.py). No person is
        named: a replay from an earlier snapshot fires the timers due then again, at `now`, there
        (`_replay_until`), and finds what this round found. Fired at the replay's time instead, a timer
        finds what time has made of the person since: for `starts_at < now and starts_at > now - 1m`,
        outside again a minute later, the enter this round published left without its exit."""
        position = self.applied.get(subjects.profiles_changed(partition), 0)
        generation, place = self._generation.get(partition, 0) + 1, self.percentile_round
        key = f"{partition}:{position:020d}:t{generation:09d}.{place:015d}.{round(now * 1e6)}"
        self._round_records.setdefault(partition, []).append((generation, key))
        return Put(self.clocks, key, {"timers": now, "position": position, "place": place, "generation": generation})

    async def fire_recorded(self, partitions: Sequence[int], now: float) -> int:
        """Fire the timers of `partitions` due at `now` outside a batch (a quiet partition's, by the timer
        loop; an arriving partition's, before it is brought to a segment), at a quiescent point of theirs,
        inside `mutating`: recorded first (`timer_round`, one write), then evaluated, then published,
        retrying until JetStream has it. A failed write changes nothing: the timers stay due. Returns the
        persons evaluated."""
        due = [p for p in partitions if (heap := self._timers.get(p)) and heap[0][0] <= now]
        if not due:
            return 0
        await self.store.bulk_write([self.timer_round(partition, now) for partition in due])
        by_partition: dict[int, list[Transition]] = {}
        fired = 0
        for partition in due:
            fired += self._fire_due(partition, now, by_partition.setdefault(partition, []))
        await self._publish_durably([m for p, ts in by_partition.items() if ts for m in self._messages(p, ts)])
        return fired

    async def _batch_clocks(self, partition: int, generation: int) -> _Clocks:
        """The clocks recorded for `partition`'s positions after its snapshot (those a snapshot includes
        but whose records outlived it are pruned with the next one), and its timer rounds after it: those
        of a later generation than the snapshot's, `generation`."""
        ranges: list[tuple[int, int, float]] = []
        rounds: list[_TimerRound] = []
        records = self._round_records.setdefault(partition, [])
        known_rounds = {key for _generation, key in records}
        async for record in self.store.scan_all(self.clocks, prefix=f"{partition}:"):
            doc = record.doc
            if "timers" in doc:
                if record.key not in known_rounds:
                    records.append((doc["generation"], record.key))
                if doc["generation"] > generation:
                    rounds.append(_TimerRound(doc["generation"], doc["position"], doc["place"], doc["timers"]))
                continue
            last = int(record.key.partition(":")[2])
            ranges.append((last, doc["first"], doc["now"]))
        known = self._clock_records.setdefault(partition, [])
        known[:] = sorted({*known, *(last for last, _first, _now in ranges)})
        return _Clocks(ranges, rounds)

    async def _prune_clocks(self, cut: tuple[int, Mapping[int, int]] | None) -> None:
        """After a snapshot: the batch clocks of the positions it includes, and the timer rounds of the
        generations it includes (`cut`: the partitions' generations its marks hold), are read by no replay.
        Deleted `SNAPSHOT_CHUNK` at a time: the batches' commits wait behind each write on the store's
        writer."""
        for partition in sorted(self._clock_records):
            snapshotted = self.snapshotted.get(subjects.profiles_changed(partition), 0)
            while (lasts := self._clock_records.get(partition)) and lasts[0] <= snapshotted:
                done = [last for last in lasts[:SNAPSHOT_CHUNK] if last <= snapshotted]
                await self.store.bulk_write([Delete(self.clocks, f"{partition}:{last:020d}") for last in done])
                # (Those written meanwhile are past the snapshot; the partition may have left meanwhile.)
                if self._clock_records.get(partition) is lasts:
                    del lasts[: len(done)]
        generations = cut[1] if cut is not None else {}
        for partition, generation in sorted(generations.items()):
            records = self._round_records.get(partition, [])
            done = [key for of, key in records if of <= generation]
            for start in range(0, len(done), SNAPSHOT_CHUNK):
                await self.store.bulk_write([Delete(self.clocks, key) for key in done[start : start + SNAPSHOT_CHUNK]])
            if done and self._round_records.get(partition) is records:
                records[:] = [(of, key) for of, key in records if of > generation]

    @contextlib.asynccontextmanager
    async def _quiet(self) -> AsyncIterator[None]:
        """Around work outside a batch that publishes transitions (timers of idle partitions, builds,
        deletions): every batch applied before it is published first, none is applied meanwhile."""
        if self.stream is None:
            yield
        else:
            async with self.stream.quiescent():
                yield

    @contextlib.asynccontextmanager
    async def _snapshots_held(self) -> AsyncIterator[None]:
        """No snapshot starts within (one under way finishes first): around work that brings the served
        partitions to a state one quiescent point at a time, which a snapshot's marks must not record
        half-way (an adoption)."""
        if self.stream is None:
            yield
        else:
            async with self.stream.snapshots_held():
                yield

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
            # A percentile round's transitions one by one: each is published once by whichever replica or
            # restart finds it, even when they find different sets (percentiles.py).
            kind = t.cause[0]
            if kind == "s":
                key = t.cause.rsplit(".", 1)[0]
            elif kind == "t":
                key = f"{t.cause}:{t.person}"
            elif kind == "q":
                key = f"{t.cause}:{t.person}:{t.segment}"
            elif kind == "v":
                # A definition's: per segment, so a replay making several live finds each one's messages.
                key = f"{t.cause}:{t.segment}"
            else:
                key = t.cause
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

    async def _publish_durably(self, messages: Sequence[OutMessage]) -> None:
        """Publish, retrying until JetStream has every message (ones stored already are duplicates):
        for transitions found outside a batch, whose state change is held here only."""
        attempt = 0
        while messages:
            try:
                await self._publish(messages)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = PUBLISH_BACKOFF[min(attempt, len(PUBLISH_BACKOFF) - 1)]
                log.warning("segment events not published (%s); retrying in %.2fs", describe_error(exc), delay)
                await asyncio.sleep(delay)
                attempt += 1

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

    async def snapshot(self) -> int:
        """Write the persons changed since the last snapshot, then the stream positions they include and
        the definition versions the memberships are of (cdp_kit.held), at a quiescent point of the
        stream when there is one. After a crash mid-way some persons are newer than the positions, and
        their own stream position makes the replay skip what they hold."""
        if self.stream is not None:
            return await self.stream.snapshot()
        written = await self.held.snapshot()
        cut = self._cut  # (prune_rounds takes it)
        await self.prune_rounds()
        await self._prune_clocks(cut)
        return written

    async def snapshot_at(self, positions: Mapping[int, int], *, copied: Callable[[], None] | None = None) -> int:
        """The snapshot at a quiescent point, `positions` being each running partition's checkpoint:
        everything up to it is applied here and its transitions are published. A checkpoint past what
        the held state records moved over messages that changed nothing (rejected ones)."""
        for partition, seq in positions.items():
            subject = subjects.profiles_changed(partition)
            if partition in self.active and seq > self.applied.get(subject, 0):
                self.applied[subject] = seq
        written = await self.held.snapshot(copied=copied)
        cut = self._cut  # (prune_rounds takes it)
        await self.prune_rounds()
        await self._prune_clocks(cut)
        return written

    def log_snapshot_failure(self, exc: BaseException) -> None:
        log.warning("snapshot failed (%s); the next one writes what it did not", describe_error(exc))


def _copy_person(person: Person) -> tuple[dict[str, Any], dict[str, float], int, float]:
    # A shallow copy is enough: values are replaced, never changed in place.
    return person.fields.copy(), person.members.copy(), person.seq, person.evaluated_at


def _encode_person(copied: tuple[dict[str, Any], dict[str, float], int, float]) -> dict[str, Any]:
    fields, members, seq, evaluated_at = copied
    return {"state": orjson.dumps({"fields": fields, "members": members, "seq": seq, "t": evaluated_at}).decode()}


class _TimerRound(NamedTuple):
    """A round of timers fired outside a batch, as recorded (`timer_round`)."""

    generation: int
    position: int  # the partition's applied position: it ran before the change after it
    place: int  # the replica's count of logged moves then: after those up to it at its position
    at: float  # when it fired


class _Clocks:
    """A partition's recorded batch clocks, asked in stream order: the time position `seq` was evaluated
    with (None: not recorded); and its timer rounds, in the order they ran (`rounds_before`)."""

    __slots__ = ("_next", "_ranges", "rounds")

    def __init__(self, ranges: list[tuple[int, int, float]], rounds: Iterable[_TimerRound] = ()) -> None:
        self._ranges = sorted(ranges)  # (last, first, now)
        self._next = 0
        # A generation is one replica's, then the next one's (percentiles.py); in one, positions and places
        # only grow, and the rounds of one place one after the other.
        self.rounds = sorted(rounds)

    def rounds_before(self, seq: int | None) -> Iterable[_TimerRound]:
        """Take the timer rounds that ran before position `seq` (all: None), in the order they ran."""
        while self.rounds and (seq is None or self.rounds[0].position < seq):
            yield self.rounds.pop(0)

    def at(self, seq: int) -> float | None:
        ranges = self._ranges
        while self._next < len(ranges) and ranges[self._next][0] < seq:
            self._next += 1
        if self._next < len(ranges) and ranges[self._next][1] <= seq:
            return ranges[self._next][2]
        return None
