"""Population percentiles in real time: `scores.clv_value_365d >= percentile(scores.clv_value_365d, 90)`.

The population is every person this replica holds (its partitions; every partition in hot standby), and a
percentile is taken over those with a number in the field (cdp_lang.percentiles says how). Its value lives
in `percentiles` (key -> value), the mapping every compiled definition's per-profile predicate reads.

- Builds and `Estimate` compute it exactly over the population they evaluate (builds.py); a build going
  live sets the values it was built with (`move_for_build`), so its members and the value agree.
- In real time the exact value is not recomputed per change (a pass over the population): a change of a
  field some percentile is taken of, a person first seen and a person removed mark the percentiles stale,
  and stale ones are recomputed by a **round** (`recompute_percentiles`) at a quiescent point of the
  stream. Rounds run at the wall-clock boundaries, the multiples of `CDP_SEGMENTATION_PERCENTILE_SECONDS`
  since the epoch, at most one per boundary, and a round's id is its boundary (epoch ms). Between two
  rounds a person changed is evaluated against the value of the last round.
- When a value moves from a to b, only the persons whose compared value lies between a and b (inclusive)
  can change their answer (for a percentile inside arithmetic, `>= percentile(x, 90) / 2`, there is no one
  compared value: every person): those are evaluated again, with the segments referring to theirs, and every
  flip is a transition with reason `percentile` at the boundary's time, cause "q<round>". A round costs
  one pass over the held persons per percentile that changed (reading one field), plus the evaluations
  of those in range.

Exactly once. A percentile transition's id is (segment, person, direction, round), and each is published
as a message of its own whose JetStream message id comes from that id alone, so a second copy within the
SEGMENTS stream's duplicate window (10 minutes) is dropped, whoever publishes it:

- **A restart.** A round that moved a value is logged before anything changes (the round log,
  `segmentation_percentile_rounds`: per served partition, its position at the round, the new values, the
  transitions' id and time); a snapshot records per partition the values and the last move its
  memberships include ("$percentiles.<p>"). A
  partition's replay starts from those values and runs each round logged after them again where it ran
  (before the first change after its position), under its id; each change is evaluated with the values
  it was evaluated with the first time (`PercentileValues` gives the replaying task its own values; the
  other partitions' pipelines read the live ones meanwhile). So a restart across any number of
  boundaries finds the same transitions under the same ids, and the first round after it goes on from
  the last round's values. A partition whose replay ends on other values than the live ones (rounds ran
  here while it was elsewhere) is moved to the live values under the live round's id, and that is logged
  for it too. A snapshot deletes the log records it includes.
- **A segment going live** (a build, an adoption, a partition brought to one: builds.py) is an entry of
  the same log, in its place among the moves (the last one's + 1, `log_live`), moving no value: a
  replay from a snapshot before it makes the segment live at that position, after the moves before it
  and before those after it.
- **Generations: which records a replay runs.** Places are each replica's own count (a round's
  boundary, then + 1 per build move or go-live), so they cannot say whether a record is older than a
  snapshot another replica wrote. Each partition has a generation instead: a snapshot's cut moves it on
  and its mark records it ("generation"), and a record is of the generation of the snapshot that will
  include it (the current one + 1). A replay runs the records of a later generation than its
  snapshot's, in generation then place order, and the replica then logs after every record it ran (a
  partition handed over after a crash: the dead replica's records, then its own), so a replica whose
  count is behind the snapshot's never hides its records from the next replay. A replay also raises the
  replica's count past every place it ran (and past each timer round's, engine.py `timer_round`), so what
  it logs next sorts after them. A snapshot deletes the
  records of its generation and before (records from before generations: by round, as then).
- **Hot standby replicas** run the same boundary's round at nearly the same instant and each publishes
  its transitions under the same ids: JetStream keeps one. Each computes the values over its own copy of
  the population at its own quiescent point, so the two agree exactly when they had applied the same
  changes by then. When they disagree (one had applied a change the other had not yet), nothing real is
  dropped: what only one finds is published by it, and what the other finds at a later round is
  published then, under that round's id. The guarantee is: each transition is stored at most once per
  (segment, person, direction, round); a consumer may see the same direction twice in a row from two
  replicas that saw the population differently at a boundary, never a transition lost.
- **A build's move.** A build going live with values other than the live ones moves them like a round,
  at its quiescent point and before its definition goes live (`move_for_build`): logged first, in its
  place among the moves (the last one's + 1, so it sorts before the next boundary, whose round still
  runs), its transitions under "qb<that place>" at the build's instant. A crash anywhere after the log
  record (before, during or after its publish or the build's, before the snapshot that follows) is
  replayed like a round's: the move runs again where it ran, under its id, with the segments live again
  then (the one being built is not yet, as when it first ran), and the build resumed after the restart
  finds its values already live and moves nothing. Each of its transitions is published once.

One population across replicas. Hot standby (the prod values) holds every partition: each replica's
values are exact. Replicas that split the partitions (`shared`, given unless one replica holds every
partition by configuration) take one value per round over the whole population (summaries.py): at each
boundary a replica whose persons changed writes a summary of each percentile field per served partition
to NATS KV; the first replica with summaries no decided round has taken merges every partition's latest
one and writes the round's values with a compare-and-set; every replica runs that round with those
values (so it runs at every boundary, stale here or not, to take values others decided). The values are
exact while every partition holds at most 1001 numbers of a field, and otherwise never below the exact
percentile and at most 0.1 + 100 * partitions / (persons - 1) percentile points above it; a replica
serving every partition at the time decides with the exact values. A partition's summary is at most one
round old when another replica merges it, so a change moves the shared value within two boundaries. A
build goes live with the values over the persons held here (builds.py); the next round brings the
shared ones.

`Percentiles` is the part of `SegmentationEngine` that does this; its state is set up in the engine's
`__init__`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from cdp_kit.bus import subjects
from cdp_kit.bus.consumer import describe_error
from cdp_kit.storage import Delete, Put
from cdp_lang.percentiles import PercentileSpec, numbers_of, population_percentiles, value_at
from cdp_segmentation.evaluation import Transition
from cdp_segmentation.summaries import Decided, Summary, merged_percentile, summarise

if TYPE_CHECKING:
    from cdp_segmentation.catalogue import Segment
    from cdp_segmentation.index import FieldIndex

log = logging.getLogger("cdp.segmentation.engine")

# Snapshot marks, one per partition ("$percentiles.<p>": replicas that split the partitions share the
# collection): the values its memberships were evaluated with, and the round that set them. Snapshots
# before the round log wrote one for all ("$percentiles"), still read.
PERCENTILES = "$percentiles"
ROUNDS = "segmentation_percentile_rounds"  # the round log: "<round ms>.<partition>" -> position and values

# The values a replay evaluates with, in the replaying task only (every other task reads the live ones).
_REPLAYED: ContextVar[Mapping[str, float | None] | None] = ContextVar("segmentation_replayed_percentiles", default=None)
# The live segments a replay evaluates with where they differ from the live ones (a segment whose logged
# go-live is still ahead of the replayed position: builds.py), in the replaying task only.
REPLAYED_INDEX: ContextVar[FieldIndex | None] = ContextVar("segmentation_replayed_index", default=None)


class PercentileValues(dict):
    """The live values (key -> value) every compiled definition reads with `get`, except inside a replay,
    which reads those in force at the position it is replaying (the replaying task's own, see `_REPLAYED`)."""

    __slots__ = ()

    def get(self, key: str, default: Any = None) -> Any:
        replayed = _REPLAYED.get()
        if replayed is not None:
            return replayed.get(key, default)
        return dict.get(self, key, default)


class Logged(NamedTuple):
    """A move of the values in the round log, for one partition: a round's or a build's."""

    round: int  # its place among the moves: a round's boundary, or just after the move before a build's
    position: int  # the partition's stream position when it ran: it runs before the change after it
    values: dict[str, float | None]
    cause: str  # its transitions' id: "q<boundary>", or "qb<round>" for a build's
    at: float  # its transitions' time: the boundary, or the build's instant
    # Not a move: a segment going live, or the partition's persons brought to it, there (builds.py, `log_live`)
    live: Mapping[str, Any] | None = None


@dataclass(slots=True)
class Replayed:
    """A partition's replay: the values in force at the position reached, and the logged moves still ahead
    of it, in round order; the segments whose logged go-live is still ahead, as they were before it
    (segment id -> the definition then, or None: not live), and the index they make (None: the live one)."""

    values: dict[str, float | None]
    rounds: list[Logged] = field(default_factory=list)
    hidden: dict[str, Segment | None] = field(default_factory=dict)
    index: FieldIndex | None = None


class Percentiles:
    """Keeps the population percentiles the live segments compare with current, on a bounded schedule."""

    # --- the round's identity -------------------------------------------------------------------

    def round_at(self, now: float) -> int:
        """The round due at `now`: the last boundary (epoch ms, a multiple of the interval) at or before it."""
        step = max(1, round(self.percentile_interval * 1000))
        return math.floor(now * 1000) // step * step

    # --- snapshot marks and the round log ---------------------------------------------------------

    def percentile_marks(self) -> dict[str, dict[str, Any]]:
        # Called at a snapshot's cut: it includes every round up to this one, in the served partitions
        # (one arriving keeps the mark its persons were loaded with until its replay is done), and every
        # log record of theirs up to this generation; what is logged from here on is of the next one.
        generations = {p: self._generation.get(p, 0) + 1 for p in sorted(self.active)}
        self._generation.update(generations)
        self._cut = (self.percentile_round, generations)
        mark = {
            "values": dict(self.percentiles),
            "round": self.percentile_round,
            "cause": self.percentile_cause,
            "at": self.percentile_at,
        }
        return {f"{PERCENTILES}.{p}": {**mark, "generation": g} for p, g in generations.items()}

    async def load_percentiles(self) -> None:
        """The values of the latest round a snapshot or the round log holds (what the replays bring the
        held state to); stale, so the next round recomputes them."""
        latest: tuple[int, Mapping[str, Any]] = (-1, {})
        async for record in self.store.scan_all(self.held.checkpoints):
            if record.key.startswith(PERCENTILES):
                latest = max(latest, (_base(record.doc)[0], record.doc), key=lambda found: found[0])
        async for record in self.store.scan_all(self.rounds):
            latest = max(latest, (record.doc["round"], record.doc), key=lambda found: found[0])
        round_id, doc = latest
        if round_id > 0:
            self.percentile_round, self.percentile_cause, self.percentile_at = round_id, _cause(doc), _at(doc)
        self.percentiles.update(doc.get("values", {}))
        self.percentiles_stale = True

    async def _log_round(
        self, round_id: int, values: Mapping[str, float | None], partitions: Iterable[int], cause: str, at: float
    ) -> None:
        """Durably, before anything is published: the move `round_id` (a round, or a build's) set `values`
        at each partition's current position. A replay of the partition evaluates with them from that
        position on, and runs the move there again as it ran (transitions under `cause`, at `at`)."""
        ops = [
            self._logged(f"{round_id:015d}.{partition}", round_id, partition, values, cause, at)
            for partition in partitions
        ]
        if ops:
            await self.store.bulk_write(ops)

    async def log_live(self, live: Mapping[str, Any], partitions: Iterable[int]) -> list[Put]:
        """Durably, before anything is published: a segment went live, or the persons of `partitions` were
        brought to it (`live`, builds.py), at each partition's current position. Its place among the moves
        is just after the last one (`percentile_round` + 1, before the next boundary's round), so a snapshot
        after it includes it, and a replay from one before it makes it live there, as the move before it
        and the round after it were run. Returns the records, for `live_published`."""
        place = self.percentile_round + 1
        values, cause, at = dict(self.percentiles), self.percentile_cause, self.percentile_at
        # (A key of its own: a catch-up logs a move under the last place's key.)
        ops = [
            self._logged(f"{place:015d}.{partition}.live", place, partition, values, cause, at, live)
            for partition in partitions
        ]
        if ops:
            await self.store.bulk_write(ops)
            self.percentile_round = place
            self.held.marks_dirty = True  # the next snapshot's marks include it (and delete its records)
        return ops

    async def live_published(self, logged: Sequence[Put]) -> None:
        """What `log_live` logged has been published: said in its records, before the `mutating` block that
        logged and published it ends (so before any snapshot copies a person it moved).

        A replay of the entry then publishes nothing of it (builds.py, `replay_live`). A snapshot that a
        crash cut short holds some persons brought to it and not others: the replay would find only some
        of its transitions, a message of another id than the one published (its id comes from all of
        them). Without the mark no snapshot came after it, and the replay finds them all, under their ids.
        A failed write leaves the entry unmarked, as before it (logged, not raised: the go-live is done)."""
        if not logged:
            return
        ops = [Put(op.collection, op.key, {**op.doc, "live": {**op.doc["live"], "published": True}}) for op in logged]
        try:
            await self.store.bulk_write(ops)
        except Exception as exc:
            log.warning("go-live not marked published in the round log (%s)", describe_error(exc))

    def _logged(
        self,
        key: str,
        round_id: int,
        partition: int,
        values: Mapping[str, float | None],
        cause: str,
        at: float,
        live: Mapping[str, Any] | None = None,
    ) -> Put:
        generation = self._generation.get(partition, 0) + 1  # the snapshot that will include it
        doc = {
            "round": round_id,
            "cause": cause,
            "at": at,
            "partition": partition,
            "position": self.applied.get(subjects.profiles_changed(partition), 0),
            "values": dict(values),
            "generation": generation,
        }
        if live is not None:
            doc["live"] = dict(live)
        # Another replica may have logged the same place for the partition in an earlier generation.
        return Put(self.rounds, f"{generation:09d}.{key}", doc)

    async def prune_rounds(self) -> None:
        """After a snapshot: the log records of the partitions it marked, of the rounds it includes, are
        never replayed again (their round is not after the mark): deleted. A failure leaves them, harmless."""
        cut, self._cut = self._cut, None
        if cut is None:
            return
        round_id, generations = cut
        try:
            done = [
                Delete(self.rounds, record.key)
                async for record in self.store.scan_all(self.rounds)
                if (partition := record.doc["partition"]) in generations
                and _included(record.doc, round_id, generations[partition])
            ]
            if done:
                await self.store.bulk_write(done)
        except Exception as exc:
            log.warning("old percentile rounds not deleted: %r", exc)

    # --- replay -----------------------------------------------------------------------------------

    async def remember_base(self, partitions: Iterable[int]) -> None:
        """The persons of `partitions` were just loaded from the last snapshot: their replay starts from
        the values that snapshot's memberships were evaluated with, and runs what was logged after it."""
        legacy = await self.store.get(self.held.checkpoints, PERCENTILES)
        for partition in partitions:
            record = await self.store.get(self.held.checkpoints, f"{PERCENTILES}.{partition}") or legacy
            mark = record.doc if record is not None else None
            self._percentile_base[partition] = _base(mark)
            self._generation[partition] = int((mark or {}).get("generation", 0))

    async def replay_plan(self, partition: int) -> Replayed:
        """Where a replay of `partition` starts: the values of the snapshot its persons were loaded from,
        and what was logged for it after that snapshot, by whichever replica: the records of a later
        generation than the snapshot's (each replica's places are its own count, so one taking over a
        partition may log places below those of the snapshot it took it from). What this replica logs
        from here on is of a generation after every record the replay ran."""
        base, values = self._percentile_base.get(partition, (self.percentile_round, {}))
        generation = self._generation.get(partition, 0)
        docs = [
            doc
            async for record in self.store.scan_all(self.rounds)
            if (doc := record.doc)["partition"] == partition and not _included(doc, base, generation)
        ]
        # In the order they were logged: a generation is one replica's, in place order (a catch-up's move
        # logged in a go-live's place comes after it); the next replica's come after every one it replayed.
        docs.sort(key=lambda doc: (doc.get("generation", 0), doc["round"], doc["position"], "live" not in doc))
        rounds = [
            Logged(doc["round"], doc["position"], doc["values"], _cause(doc), _at(doc), doc.get("live")) for doc in docs
        ]
        self._generation[partition] = max([generation, *(doc.get("generation", 0) for doc in docs)])
        # A key the snapshot did not know (a segment built since) is read as it is now.
        replayed = Replayed({**self.percentiles, **values}, rounds, self.hidden_until_live(rounds))
        replayed.index = self.replay_index(replayed.hidden)
        return replayed

    @staticmethod
    @contextlib.contextmanager
    def replaying(replayed: Replayed):
        """Around a replayed change: this task's definitions read the values in force at its position, and
        the segments live there."""
        with _Replaying(replayed.values), _ReplayIndex(replayed.index):
            yield

    def replay_rounds(self, partition: int, replayed: Replayed, before: int | None, out: list[Transition]) -> None:
        """Apply to `partition` the logged moves (rounds and builds') that ran before stream position
        `before` (all: None), as they ran: the persons in range evaluated again under the move's id."""
        in_partition = self._in_partition(partition)
        while replayed.rounds and (before is None or replayed.rounds[0].position < before):
            logged = replayed.rounds.pop(0)
            if logged.live is not None:
                self.replay_live(partition, replayed, logged.live, out)
                continue
            new = {**replayed.values, **logged.values}
            with _ReplayIndex(replayed.index):
                moved = self._reevaluate_in_range(replayed.values, new, in_partition, at=logged.at, cause=logged.cause)
            out.extend(moved.get(partition, ()))
            replayed.values = new

    async def catch_up(self, partition: int, replayed: Replayed, out: list[Transition]) -> None:
        """The end of a partition's replay: the rounds logged after its last position, then, if the live
        values differ still (rounds ran here while it was away), a move to them under the live round's id,
        logged first like a round's (a round running meanwhile is caught up with too)."""
        self.replay_rounds(partition, replayed, None, out)
        while True:
            live, round_id = dict(self.percentiles), self.percentile_round
            cause, at = self.percentile_cause, self.percentile_at
            if all(replayed.values.get(key) == value for key, value in live.items()):
                return
            await self._log_round(round_id, live, [partition], cause, at)
            if dict(self.percentiles) != live:
                continue  # a round ran while the log was written
            moved = self._reevaluate_in_range(replayed.values, live, self._in_partition(partition), at=at, cause=cause)
            out.extend(moved.get(partition, ()))
            replayed.values = live

    def _in_partition(self, partition: int) -> Callable[[str], bool]:
        partition_of = self._partition
        return lambda person_id: partition_of(person_id) == partition

    # --- rounds -----------------------------------------------------------------------------------

    def exact_percentiles(self, keys: Any = None) -> dict[str, float | None]:
        """The exact value of the live segments' percentiles (or of these specs) over the held persons."""
        specs = list(self.index.percentiles.values()) if keys is None else list(keys)
        if not specs:
            return {}
        return population_percentiles(specs, [person.fields for person in self.persons.values()])

    async def _percentile_loop(self) -> None:
        step = self.percentile_interval
        while True:
            # Just past the next boundary, so that every replica's round there has the same id.
            now = self.clock()
            await asyncio.sleep(max(0.0, (self.round_at(now) / 1000 + step) - now) + 0.01)
            try:
                await self.recompute_percentiles()
            except Exception as exc:  # stale still: the next round tries again
                log.warning("percentile round failed: %r", exc)

    async def recompute_percentiles(self) -> int:
        """The round of the current boundary, unless it ran: with the values shared by the replicas that
        split the partitions (`shared`, summaries.py), or else, if anything moved a percentile since the
        last round, the exact values over the held persons. Logs the round, evaluates again the persons a
        moved value can change, publishes what flipped. Returns the persons evaluated."""
        if not self.index.percentiles:
            return 0
        if self.shared is not None:
            return await self._shared_round()
        if not self.percentiles_stale:
            return 0
        async with self._quiet(), self.held.mutating():
            round_id = self.round_at(self.clock())
            if round_id <= self.percentile_round:
                return 0  # this boundary's round ran: the next one takes what moved since
            return await self._run_round(round_id, self.exact_percentiles())

    async def _run_round(self, round_id: int, values: Mapping[str, float | None]) -> int:
        """Round `round_id` sets `values` (at a quiescent point, inside `mutating`)."""
        cause, at = f"q{round_id}", round_id / 1000
        if any(dict.get(self.percentiles, key) != value for key, value in values.items()):
            # Before anything changes here: a crash after it replays the round (same id, same place).
            await self._log_round(round_id, values, sorted(self.active), cause, at)
        self.percentiles_stale = False
        self.percentile_round, self.percentile_cause, self.percentile_at = round_id, cause, at
        by_partition = self._move_percentiles(values, at, cause=cause)
        await self._publish_durably([m for p, ts in sorted(by_partition.items()) for m in self._messages(p, ts)])
        return self._moved_persons

    async def move_for_build(self, values: Mapping[str, float | None], now: float) -> None:
        """A build going live at `now` serves with the values it was built with: at a quiescent point, before
        its definition goes live, a move like a round's, logged first. Its place among the moves is just
        after the last one (`percentile_round` + 1: before the next boundary, whose round still runs), and
        its transitions' id is "qb<that>", at `now`. A replay runs it again where it ran, under that id;
        the build resumed after a crash then finds the values it would set already live and moves nothing."""
        async with self.held.mutating():
            if all(dict.get(self.percentiles, key) == value for key, value in values.items()):
                return
            move = self.percentile_round + 1
            cause = f"qb{move}"
            await self._log_round(move, values, sorted(self.active), cause, now)
            self.percentile_round, self.percentile_cause, self.percentile_at = move, cause, now
            by_partition = self._move_percentiles(values, now, cause=cause)
            await self._publish_durably([m for p, ts in sorted(by_partition.items()) for m in self._messages(p, ts)])

    async def _shared_round(self) -> int:
        """A round with the values every replica uses (summaries.py): this replica's summaries written if
        its persons changed, the round's values decided here if none were since, or taken as written."""
        round_id = self.round_at(self.clock())
        if round_id <= self.percentile_round:
            return 0
        shared = self.shared
        specs = list(self.index.percentiles.values())
        if self.percentiles_stale:
            self.percentiles_stale = False
            try:
                await shared.put_summaries(self._summaries(specs, self.active))
            except BaseException:
                self.percentiles_stale = True
                raise
            self._undecided = True
        decided = await shared.decided()
        if self._undecided and (decided is None or decided.round < round_id):
            values = await self._merged(specs)
            if await shared.decide(round_id, values, decided):
                self._undecided = False
                decided = Decided(round_id, values)
            else:  # another replica decided first: its values (the next round takes these summaries)
                decided = await shared.decided()
        if decided is None or decided.round <= self.percentile_round:
            return 0
        async with self._quiet(), self.held.mutating():
            if decided.round <= self.percentile_round:
                return 0
            return await self._run_round(decided.round, {**self.percentiles, **decided.values})

    def _summaries(self, specs: list[PercentileSpec], partitions: Iterable[int]) -> dict[int, dict[str, Summary]]:
        """Each of `partitions`' summary of each spec's field, over the persons held here."""
        wanted = set(partitions)
        records: dict[int, list[dict[str, Any]]] = {p: [] for p in wanted}
        partition_of = self._partition
        for person_id, person in self.persons.items():
            partition = partition_of(person_id)
            if partition in wanted:
                records[partition].append(person.fields)
        return {p: {spec.key: summarise(numbers_of(rows, spec)) for spec in specs} for p, rows in records.items()}

    async def _merged(self, specs: list[PercentileSpec]) -> dict[str, float | None]:
        """The values over the whole population: exact when every partition is served here, else merged
        from the served partitions' summaries and the others' latest in the bucket."""
        if self.active >= set(range(self.partitions)):
            return self.exact_percentiles(specs)
        by_partition = await self.shared.summaries(p for p in range(self.partitions) if p not in self.active)
        by_partition.update(self._summaries(specs, self.active))
        return {
            spec.key: merged_percentile((s[spec.key] for s in by_partition.values() if spec.key in s), spec.percent)
            for spec in specs
        }

    def _move_percentiles(
        self, values: Mapping[str, float | None], now: float, *, cause: str
    ) -> dict[int, list[Transition]]:
        """Set the live percentiles to `values` and evaluate again, in the served partitions, the persons a
        moved value can change. The transitions, by partition."""
        old = dict(self.percentiles)
        self.percentiles.update(values)
        if any(old.get(key) != value for key, value in values.items()):
            self.held.marks_dirty = True
        active, partition_of = self.active, self._partition
        return self._reevaluate_in_range(
            old,
            {**old, **values},
            lambda person_id: partition_of(person_id) in active,  # one arriving catches up at its arrival
            at=now,
            cause=cause,
        )

    def _reevaluate_in_range(
        self,
        old: Mapping[str, float | None],
        new: Mapping[str, float | None],
        included: Callable[[str], bool],
        *,
        at: float,
        cause: str,
    ) -> dict[int, list[Transition]]:
        """The percentiles moved from `old` to `new`: evaluate again with `new`, for the live segments
        comparing with one that moved, the persons `included` whose compared value lies between its old and
        new value (all who have one, when either is no value). The transitions, by partition."""
        self._moved_persons = 0
        moved = {key: (old.get(key), value) for key, value in new.items() if old.get(key) != value}
        if not moved:
            return {}
        # (segment, compared field, sub-path, low, high) for each comparison with a moved percentile
        ranges = []
        everyone: dict[str, Segment] = {}
        for key, (before, after) in moved.items():
            if before is None or after is None:
                low, high = -math.inf, math.inf
            else:
                low, high = min(before, after), max(before, after)
            for segment, field_name, sub in self.index.percentile_readers.get(key, ()):
                ranges.append((segment, field_name, sub, low, high))
            # arithmetic with the percentile compares no one field a range could narrow down: every person
            everyone.update((segment.id, segment) for segment in self.index.percentile_everyone.get(key, ()))
        affected: dict[str, dict[str, Segment]] = {}
        if ranges or everyone:
            for person_id, person in self.persons.items():
                if not included(person_id):
                    continue
                if everyone:
                    affected.setdefault(person_id, {}).update(everyone)
                for segment, field_name, sub, low, high in ranges:
                    value = value_at(person.fields, field_name, sub)
                    if value is not None and low <= value <= high:
                        affected.setdefault(person_id, {})[segment.id] = segment
        by_partition: dict[int, list[Transition]] = {}
        with _Replaying(new):
            for person_id, segments in affected.items():
                self._evaluate(
                    person_id,
                    self.persons[person_id],
                    self.index.readers_of_all(segments.values()),
                    now=at,
                    at=at,
                    reason="percentile",
                    cause=cause,
                    out=by_partition.setdefault(self._partition(person_id), []),
                )
        self._moved_persons = len(affected)
        if affected:
            log.info("percentiles moved", extra={"percentiles": sorted(moved), "persons": len(affected)})
        return by_partition


class _Replaying:
    """Within it, this task's definitions read `values` (contextvars: other tasks are unaffected)."""

    __slots__ = ("token", "values")

    def __init__(self, values: Mapping[str, float | None]) -> None:
        self.values = values

    def __enter__(self) -> None:
        self.token = _REPLAYED.set(self.values)

    def __exit__(self, *exc: object) -> None:
        _REPLAYED.reset(self.token)


class _ReplayIndex:
    """Within it, this task evaluates the live segments of `index` (None: the live ones)."""

    __slots__ = ("index", "token")

    def __init__(self, index: FieldIndex | None) -> None:
        self.index = index

    def __enter__(self) -> None:
        self.token = REPLAYED_INDEX.set(self.index)

    def __exit__(self, *exc: object) -> None:
        REPLAYED_INDEX.reset(self.token)


def _cause(record: Mapping[str, Any]) -> str:
    """The id of the move a snapshot's mark or a round log record holds (a round's unless it says so)."""
    return record.get("cause") or f"q{int(record.get('round', 0))}"


def _at(record: Mapping[str, Any]) -> float:
    """The time of that move's transitions (a round's boundary unless it says so)."""
    at = record.get("at")
    return float(at) if at is not None else int(record.get("round", 0)) / 1000


def _included(record: Mapping[str, Any], round_id: int, generation: int) -> bool:
    """Whether a snapshot whose mark is (`round_id`, `generation`) includes a round log record of its
    partition: one of its generation or before (a record from before generations: of its round or before)."""
    if "generation" in record:
        return record["generation"] <= generation
    return record["round"] <= round_id


def _base(mark: Mapping[str, Any] | None) -> tuple[int, dict[str, float | None]]:
    """(round, values) of a snapshot's mark."""
    if not mark:
        return 0, {}
    return int(mark.get("round", 0)), dict(mark.get("values", {}))
