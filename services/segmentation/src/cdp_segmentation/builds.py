"""Whole-population builds: a segment created or changed, and `Estimate`.

The vectorised evaluator runs over columns built from the held fields, a step of persons at a time in a
worker thread (the event loop serves the stream and calls meanwhile), with progress on the segment; the
difference from the current membership is published with the reason ("created",
"updated") under the definition version's ids, and the segment goes live. The go-live yields to the event
loop between slices of persons (`GOLIVE_SLICE`), its messages made in a worker thread and published a
partition at a time, each durable before the next is made: calls are answered meanwhile; the stream waits
(`_quiet`) and no partition arrives (`_arrivals`). Persons evaluated since the
population was (a change, a timer, a round) and those of a partition that arrived meanwhile are
evaluated one by one, so the answer for every person is the definition's as of the population's instant,
which is what bringing a partition's persons to it one by one finds (`_adopt_now`); the segments
referring to this one are evaluated again for the persons it moved. A
time-based definition sets every held person's timer as it goes live, members or not, moved or not
(evaluation.py, `_schedule_evaluated`): time alone moves persons the build left as they were, and a timer
of the previous version may come too late for the new one.

Before a build or an estimate, the computed traits its event conditions need are defined on the profile
service, backfilled there, and their values received here (`caught_up`: every owned partition applied
up to the PROFILES stream's end as of the call). A build a crash interrupted before it went live starts again on the next
start (`resume_builds`): its transitions keep their ids, so JetStream drops what was published before.
A build that goes live with population percentiles other than the live ones moves them first, as a
logged round does (percentiles.py, `move_for_build`): a replay runs that move again under its id, and
the resumed build finds the values live.
A partition that arrives while a build runs (its persons were not in the population) goes live with it:
its persons are evaluated one by one as the build goes live. An arrival and a go-live never overlap
(`_arrivals`): an arrival half-way (persons loaded, not yet served nor in the go-live's entry) would be
left out of both. A go-live waits for an arrival under way; one starting meanwhile waits, then brings its
persons to the live segment (`_adopt_arrived`).

Going live is durable before anything of it is published: an entry of the round log (`log_live`,
percentiles.py) with each served partition's position, the segment and version, the instants it was
evaluated as of and the definition live before. So is an adoption: its going live here, and each
partition's turn; and a partition arriving brought to a segment. A crash before the snapshot that
includes it (changes applied in between) starts from a snapshot before it: the start finds the segment
live (`live_again`: no rebuild), and each partition's replay evaluates the changes before that position
with the segment as it was then (`hidden_until_live`: its previous definition, or none), brings the
partition's persons to it there as it did (`replay_live`: `_adopt_now` under the build's ids, as of
the same instants), and evaluates the changes after it with it live. Each transition is found again
under its id: a person who entered through a change after the go-live is not found entering again
under the build's. Once its transitions are published the entry says so (`live_published`, before any
snapshot can copy a person it moved), and its replay publishes none of them: a snapshot a crash cut short
holds some of its persons moved and not others, and the rest alone would be a message of another id.
An entry holds the definition it made live: when a segment went live twice after the
snapshot (two updates, the snapshot between them failed), the replay serves the first entry's
definition until the second (`replay_live`), so each update's difference is found again under its ids.
Which entries a replay runs does not depend on which replica logged them (percentiles.py, generations).
A build that went live before a crash releases the computed traits of the definition it replaced when
the builds resume (`resume_builds`), as its end would have.

A segment another replica built is adopted (`adopt`: the announcement came once its build was done):
the persons of every served partition are brought to the live definition as the build would have
brought them (`_adopt_now`, under the build's ids), a partition at a time while the others flow, and so
is each partition arriving later whose snapshot does not include that version (engine.py, `arrive`).

`Builds` is the part of `SegmentationEngine` that does this; the state it reads is set up in the
engine's `__init__`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from cdp_kit.bus.consumer import describe_error
from cdp_kit.errors import FailedPrecondition, ResourceExhausted, Unavailable
from cdp_segmentation.catalogue import BUILDING, FAILED, LIVE, SEGMENTS, Segment, segment_from_doc
from cdp_segmentation.domain import Columns, CompiledSegment, to_json
from cdp_segmentation.evaluation import Transition
from cdp_segmentation.index import FieldIndex

if TYPE_CHECKING:
    from cdp_segmentation.percentiles import Logged, Replayed

log = logging.getLogger("cdp.segmentation.engine")

SAMPLE = 20
# A whole-population evaluation (a build, an estimate) steps in a worker thread: persons of the first step,
# the work each aims at after it, and the fewest and most persons in one.
FIRST_STEP = 1024
STEP_SECONDS = 0.05
MIN_STEP = 64
CHUNK = 65_536
# Persons a build's go-live handles between two yields to the event loop (a few ms to a few tens of ms).
GOLIVE_SLICE = 4096


@dataclass(slots=True)
class Estimate:
    size: int
    population: int
    sample: list[str]
    compiled: CompiledSegment
    evaluate_ms: float
    warnings: list[str]


class Builds:
    """Whole-population evaluation of a definition: builds that make segments live, and estimates."""

    def resume_builds(self) -> None:
        """Builds a crash interrupted start again (their transitions keep their ids: duplicates, not news),
        and the end of those that went live before it is done: the computed traits the definitions they
        replaced read are released (`live_again`)."""
        for segment in self.segments.values():
            if segment.state == BUILDING:
                self._start_build(segment, reason="created" if not segment.serving else "updated")
        replaced, self._replaced_at_start = self._replaced_at_start, []
        if replaced:
            self._tasks.append(asyncio.create_task(self._release_replaced(replaced), name="release computed traits"))

    async def _release_replaced(self, replaced: Sequence[CompiledSegment]) -> None:
        # Once the owned partitions are replayed (the changes before a go-live read the traits of the
        # definition it replaced), in the background: the profile service may be slow to answer.
        async with self._lifecycle_lock:
            await self._release_traits(*replaced)

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
            persons, inside, percentiles, evaluated_at = await self._population(compiled, progress=segment)
            async with self._lifecycle_lock:
                if self.segments.get(segment.id) is not segment or segment.building_version != version:
                    return  # replaced or deleted meanwhile
                # Published after every batch applied so far, before any applied next (stream.py). A
                # partition arriving finishes first (its persons go live with the others, as the held ones
                # not in the population), or waits until this is live (it is then brought to it).
                async with self._quiet(), self._arrivals, self.held.mutating():
                    now = self.clock()
                    if percentiles:
                        # The values it was built with serve from now on. Moved first, with the segments
                        # live until now (this one as it served before, if it did), as a round moves them:
                        # logged, so a replay after a crash runs the move again where it ran, under its id,
                        # with the segments that are live again then. Those comparing with a moved value
                        # follow (persons in range evaluated again); the next round catches up with changes
                        # applied while the population was evaluated.
                        await self.move_for_build(percentiles, now)
                        self.percentiles_stale = True
                    # The definition's answer for each person held, as of the instant the population was
                    # evaluated: the vectorised one, except for the persons evaluated since (a change, a timer,
                    # a round: their inputs may have moved) and those of a partition that arrived meanwhile
                    # (not in the population), evaluated one by one. That is what bringing each partition's
                    # persons to it one by one finds (`_adopt_now`), which is how a replay makes it live.
                    # A slice of persons at a time (`GOLIVE_SLICE`), yielding between two: the calls (a
                    # Health check, a GetMembership) are answered meanwhile. Nothing else changes the held
                    # state in between: no batch is applied (`_quiet`), no partition arrives (`_arrivals`),
                    # no other build goes live (`_lifecycle_lock`); no snapshot copies it (`mutating`).
                    held = self.persons
                    hits = np.flatnonzero(inside).tolist()
                    new: set[str] = set()
                    for start in range(0, len(hits), GOLIVE_SLICE):
                        new.update(p for i in hits[start : start + GOLIVE_SLICE] if (p := persons[i]) in held)
                        await asyncio.sleep(0)
                    evaluated = set(persons)
                    again = set(touched)
                    listed = list(held)
                    for start in range(0, len(listed), GOLIVE_SLICE):
                        for p in listed[start : start + GOLIVE_SLICE]:
                            if p not in evaluated or held[p].evaluated_at >= evaluated_at:
                                again.add(p)
                        await asyncio.sleep(0)
                    for n, person_id in enumerate(again, 1):
                        person = held.get(person_id)
                        if person is not None and compiled.predicate(person.fields, person.members, evaluated_at):
                            new.add(person_id)
                        else:
                            new.discard(person_id)
                        if not n % GOLIVE_SLICE:
                            await asyncio.sleep(0)
                    current = self.members.get(segment.id, set())
                    entered, exited = sorted(new - current), sorted(current - new)
                    # Logged first, with each partition's position: a crash before the snapshot that follows
                    # replays the changes after it with the segment live, and this there, under its ids.
                    before = segment if segment.serving else None
                    logged = await self.log_live(
                        live_entry(
                            segment.id,
                            version,
                            compiled,
                            segment.updated_at,
                            now=evaluated_at,
                            readers_now=now,
                            reason=reason,
                            before=before,
                        ),
                        sorted(self.active),
                    )
                    by_partition: dict[int, list[Transition]] = {}
                    partition_of, at = self._partition, segment.updated_at
                    for flag, moved in ((False, exited), (True, entered)):
                        for start in range(0, len(moved), GOLIVE_SLICE):
                            for person_id in moved[start : start + GOLIVE_SLICE]:
                                by_partition.setdefault(partition_of(person_id), []).append(
                                    Transition(person_id, segment.id, flag, at, reason, version, f"v{version}")
                                )
                                person = held.get(person_id)
                                if person is not None:
                                    if flag:
                                        person.members[segment.id] = at
                                    else:
                                        person.members.pop(segment.id, None)
                                    self.held.mark(person_id)
                            await asyncio.sleep(0)
                    self.members[segment.id] = new
                    replaced = segment.compiled
                    segment.serve(compiled, version)
                    segment.pending = None
                    segment.state, segment.serving, segment.live_at, segment.error = LIVE, True, now, ""
                    segment.last_diff = (len(entered), len(exited), entered[:SAMPLE], exited[:SAMPLE])
                    self._reindex()
                    if segment.timed:
                        # Every person's timer, members or not, changed or not: time alone may move any of
                        # them, and a timer of the previous version may come too late for this one.
                        for start in range(0, len(listed), GOLIVE_SLICE):
                            self._schedule_evaluated(segment, listed[start : start + GOLIVE_SLICE], evaluated_at)
                            await asyncio.sleep(0)
                    # The segments referring to this one, for the persons it moved (as `_adopt_now` does).
                    moved = sorted(entered + exited)
                    for start in range(0, len(moved), GOLIVE_SLICE):
                        self._readers_after(segment, moved[start : start + GOLIVE_SLICE], now, by_partition)
                        await asyncio.sleep(0)
                    self._forget_touched(touched)
                    # A partition's messages at a time, each durable before the next is made: made in a worker
                    # thread (encoding them is most of the go-live's work), the same messages as made at once,
                    # so a go-live a crash cut short is found again under the same ids by the replay.
                    for partition, transitions in sorted(by_partition.items()):
                        messages = await asyncio.to_thread(self._messages, partition, transitions)
                        await self._publish_durably(messages)
                    await self.live_published(logged)
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
            # The error's text is the caller's answer (`error`): it may quote the definition's values.
            log.error(
                "segment could not be built",
                extra={"segment": segment.id, "version": segment.building_version, "error": describe_error(exc)},
            )
            # FAILED; a definition that went live before keeps serving (`serving`).
            segment.state, segment.error, segment.pending = FAILED, str(getattr(exc, "message", exc)), None
            try:
                await self.store.put(SEGMENTS, segment.id, segment.doc())
            except Exception as store_exc:
                log.warning(
                    "could not store segment state", extra={"segment": segment.id, "error": describe_error(store_exc)}
                )
            # The traits the failed definition had defined (some of them, when the profile service refused
            # one): nothing reads them now.
            if self.segments.get(segment.id) is segment:
                async with self._lifecycle_lock:
                    await self._release_traits(compiled)
        finally:
            self._forget_touched(touched)

    def _forget_touched(self, touched: set[str]) -> None:
        """Stop adding changed persons to this build's set. By identity: `list.remove` takes the first
        *equal* set, and two builds running at once (an import) often have equal ones (both empty), so it
        took the other build's, which then went on missing changes and failed to go live."""
        for index, held in enumerate(self._touched):
            if held is touched:
                del self._touched[index]
                return

    async def adopt(self, segment: Segment) -> None:
        """A live segment another replica built (its announcement came after the build was done): the
        persons of every partition served here are brought to its definition (`_adopt_now`), one partition
        at a time, each at a quiescent point of its own: the pipelines go on between two (a pause the
        length of one partition's evaluation, not of all of them). A partition arriving later catches up
        at its arrival (engine.py, `arrive`). Each turn fires the partition's due timers first, a recorded
        round at the turn's time, as an arrival does (engine.py, `_adopt_arrived`): a membership of a
        time-based segment whose flip came due since the timer loop's last round would be read stale, and a
        segment referring to it entered (left) under the build's id, then left (entered) again when the
        timer fires: a pair of transitions for a membership that never held.

        Meanwhile the segment is live: a change of a person of a partition not reached yet is evaluated
        against it like any other (what it flips is published then, and that partition's turn finds it
        done). No snapshot is taken until every partition is done, since its marks would say of each served
        partition that its memberships are of this version. Its going live here and each partition's turn
        are logged first (`log_live`): a crash before that snapshot starts with the segment live, replays
        each partition's changes with it live from where it went live, and brings the partition's persons
        to it where its turn did (a partition not reached yet: after its replay, as it arrives)."""
        async with self._snapshots_held():
            async with self._quiet(), self.held.mutating():
                self._reindex()
                # Live from here in every served partition (logged: a replay makes it live there).
                await self.log_live(live_entry(*as_live(segment), adopt=False), sorted(self.active))
                # Values its percentiles compare with, until the next round (due: stale) sets the shared ones.
                missing = [spec for spec in segment.compiled.percentiles if spec.key not in self.percentiles]
                if missing:
                    self.percentiles.update(self.exact_percentiles(missing))
                    self.percentiles_stale = True
                by_partition: dict[int, list[str]] = {p: [] for p in self.active}
                partition_of = self._partition
                for person_id in self.persons:
                    held = by_partition.get(partition_of(person_id))
                    if held is not None:
                        held.append(person_id)
            # A person first seen from here on is evaluated against the live segments, this one too (those
            # that can hold for them: index.py, `first_seen`); one gone is passed over; a partition arriving
            # is brought to the segment as it arrives.
            for partition, persons in sorted(by_partition.items()):
                async with self._quiet(), self.held.mutating():
                    if partition not in self.active:
                        continue
                    now = self.clock()
                    # Its due timers first, as an arriving partition's (engine.py, `_adopt_arrived`): the
                    # persons are brought to the segment on memberships time has not ended. A recorded
                    # round, before the turn's entry: a replay fires them there, at `now`, then runs it.
                    await self.fire_recorded([partition], now)
                    # Logged too: a replay brings the partition's persons to it there, as now.
                    logged = await self.log_live(live_entry(*as_live(segment), golive=False, now=now), [partition])
                    moved = self._adopt_now([segment], sorted(persons), now=now)
                    await self._publish_durably(self._messages(partition, moved.get(partition, [])))
                    await self.live_published(logged)
        await self.snapshot()
        log.info("segment adopted", extra={"segment": segment.id, "version": segment.version})

    def _adopt_now(
        self,
        segments: Iterable[Segment],
        persons: Sequence[str],
        *,
        now: float,
        readers_now: float | None = None,
        reason: str | None = None,
    ) -> dict[int, list[Transition]]:
        """Bring `persons` (sorted) to live `segments` they were never evaluated for here: another replica
        built them, or the snapshot they were loaded from is of an earlier version. What the build would
        have done for them: each flip is a transition under the build's id (segment, person, `v<version>`,
        exits then entries, each in person order), so a copy the builder published already is a JetStream
        duplicate; then the segments referring to one that flipped are evaluated again as after a build
        (`v<version>r<seq>`, as of `readers_now`: `now` unless given). The transitions, by partition."""
        order = {segment_id: n for n, segment_id in enumerate(self.index.order)}
        by_partition: dict[int, list[Transition]] = {}
        for segment in sorted(segments, key=lambda s: order.get(s.id, len(order))):
            segment_id, cause = segment.id, f"v{segment.version}"
            why = reason or ("created" if segment.version == 1 else "updated")
            flips: dict[bool, list[str]] = {False: [], True: []}
            for person_id in persons:
                person = self.persons.get(person_id)
                if person is None:
                    continue
                inside = segment.predicate(person.fields, person.members, now)
                if inside is not (segment_id in person.members):
                    flips[inside].append(person_id)
            members = self.members.setdefault(segment_id, set())
            for inside in (False, True):
                for person_id in flips[inside]:
                    person = self.persons[person_id]
                    if inside:
                        person.members[segment_id] = segment.updated_at
                        members.add(person_id)
                    else:
                        person.members.pop(segment_id, None)
                        members.discard(person_id)
                    self.held.mark(person_id)
                    by_partition.setdefault(self._partition(person_id), []).append(
                        Transition(person_id, segment_id, inside, segment.updated_at, why, segment.version, cause)
                    )
            if segment.timed:
                self._schedule_evaluated(segment, persons, now)
            self._readers_after(
                segment, sorted(flips[False] + flips[True]), now if readers_now is None else readers_now, by_partition
            )
        return by_partition

    def _readers_after(
        self, segment: Segment, moved: Sequence[str], now: float, by_partition: dict[int, list[Transition]]
    ) -> None:
        """The live segments referring to `segment`, evaluated again at `now` for the persons it `moved`
        (sorted) as it went live or they were brought to it: under `v<version>r<seq>`."""
        readers = tuple(r for r in self.index.readers_of(segment) if r[0].id != segment.id)
        if not readers:
            return
        for person_id in moved:
            person = self.persons.get(person_id)
            if person is None:
                continue
            self._evaluate(
                person_id,
                person,
                readers,
                now=now,
                at=now,
                reason="updated",
                cause=f"v{segment.version}r{person.seq}",
                out=by_partition.setdefault(self._partition(person_id), []),
            )

    # --- go-lives in the round log: a crash before the snapshot after them ---------------------------

    async def logged_live(self) -> set[tuple[str, int]]:
        """(segment, version) of every go-live the round log holds (no snapshot included it everywhere yet)."""
        found: set[tuple[str, int]] = set()
        async for record in self.store.scan_all(self.rounds):
            live = record.doc.get("live")
            if live is not None and live.get("golive"):
                found.add((live["segment"], live["version"]))
        return found

    async def live_again(self, segment: Segment) -> None:
        """At start: the build of `segment` went live before a crash, and it is live again as it was (the
        stored state says building: a crash came before the build's end stored it). The replays make it
        live where it went live, and the persons of a partition no replay brings to it are brought to it
        as it arrives (`_adopt_arrived`): nothing is built again."""
        version, compiled = segment.building_version, segment.definition
        replaced = segment.compiled
        segment.serve(compiled, version)
        segment.pending = None
        segment.state, segment.serving, segment.error = LIVE, True, ""
        await self.store.put(SEGMENTS, segment.id, segment.doc())
        if replaced is not compiled:
            # The build released them once stored live; the crash came first. Released as the builds resume.
            self._replaced_at_start.append(replaced)
        log.info("segment live again after a restart", extra={"segment": segment.id, "version": version})

    def hidden_until_live(self, logged: Sequence[Logged]) -> dict[str, Segment | None]:
        """The segments a replay must not evaluate as live until it reaches their logged go-lives: those
        live at a logged version now, each as it was before the first of them (its definition then, or
        None). A segment updated twice before one snapshot has two: the replay serves the first's
        definition between them (`replay_live`)."""
        first: dict[str, Mapping[str, Any]] = {}
        current: set[str] = set()
        for entry in logged:  # in place order
            live = entry.live
            if live is None or not live.get("golive"):
                continue
            segment = self.segments.get(live["segment"])
            if segment is None or not segment.serving:
                continue  # deleted since
            first.setdefault(segment.id, live)
            if segment.version == live["version"]:
                current.add(segment.id)
        # A segment none of whose logged go-lives is of its live version was replaced since by one that
        # went live without an entry here: what replaced it is made live on its own.
        return {segment_id: self._as_logged(segment_id, first[segment_id].get("before")) for segment_id in current}

    def _as_logged(self, segment_id: str, logged: Mapping[str, Any] | None) -> Segment | None:
        """A definition of `segment_id` a log entry holds ({version, tree, updated_at}), as a live segment."""
        if not logged:
            return None
        doc = {
            "version": logged["version"],
            "tree": logged["tree"],
            "counted": logged.get("counted") or [],
            "state": LIVE,
            "serving": True,
        }
        return segment_from_doc(segment_id, {**doc, "updated_at": logged.get("updated_at", 0.0)}, self.percentiles)

    def replay_index(self, hidden: Mapping[str, Segment | None]) -> FieldIndex | None:
        """The index of the live segments with `hidden` as they were before going live (None: the live one)."""
        if not hidden:
            return None
        serving = [hidden.get(s.id) if s.id in hidden else s for s in self._serving()]
        return FieldIndex([s for s in serving if s is not None])

    def replay_live(self, partition: int, replayed: Replayed, live: Mapping[str, Any], out: list[Transition]) -> None:
        """A replay of `partition` reached a logged go-live: the segment is live from here on, and, when it
        was brought to them there (a build, an adoption's turn), the partition's persons are, under the
        build's ids, as of the same instants. An entry of a version replaced since whose replacement is
        logged further on (two updates before one snapshot) does the same with the definition it logged:
        the replay serves it until the next one."""
        segment = self.segments.get(live["segment"])
        if segment is None or not segment.serving:
            return  # deleted since
        if segment.version == live["version"]:
            going = segment
            if live.get("golive") and segment.id in replayed.hidden:
                del replayed.hidden[segment.id]
                replayed.index = self.replay_index(replayed.hidden)
        elif segment.id in replayed.hidden and live.get("tree"):
            going = self._as_logged(segment.id, live)
            if live.get("golive"):
                replayed.hidden[segment.id] = going
                replayed.index = self.replay_index(replayed.hidden)
        else:
            return  # replaced since by a version logged nowhere ahead: made live on its own
        if not live.get("adopt"):
            return
        persons = sorted(p for p in self.persons if self._partition(p) == partition)
        with self.replaying(replayed):
            moved = self._adopt_now(
                [going], persons, now=live["now"], readers_now=live.get("readers_now"), reason=live.get("reason")
            )
        if not live.get("published"):
            # (Published: on the bus already, and a snapshot a crash cut short may hide some of it from
            # this replay: percentiles.py, `live_published`.)
            out.extend(moved.get(partition, ()))
        if going is segment:
            self._built_base.setdefault(partition, {})[segment.id] = segment.version

    async def _referenced_live(self, compiled: CompiledSegment) -> None:
        """A definition referring to segments still being built waits for them (their members are its input)."""
        while True:
            waiting = [ref for ref in compiled.segments if not self.get(ref).serving]
            if not waiting:
                return
            if all(self.get(ref).state == FAILED for ref in waiting):
                raise FailedPrecondition(f"segments {', '.join(sorted(waiting))} failed to build", reason="ref_failed")
            await asyncio.sleep(0.05)

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
    ) -> tuple[list[str], np.ndarray, dict[str, float | None], float]:
        """The vectorised evaluator over every held person (progress on the segment); the population
        percentiles it compared with, computed exactly over every held person first; and the instant it
        evaluated them as of.

        Off the event loop, a step of persons at a time: each step's fields are copied here (a shallow copy
        of each person's: the loop goes on changing them), then turned into columns and evaluated in a worker
        thread while the loop serves the stream and other calls. A step aims at ~`STEP_SECONDS` of that work.
        A person removed (deleted, merged away) between the listing and their step is not a member; a person
        changed meanwhile was evaluated since `now`, which a build's go-live evaluates again one by one."""
        started = time.perf_counter()
        persons = sorted(self.persons)
        total = len(persons)
        percentiles = self.exact_percentiles(compiled.percentiles) if compiled.percentiles else None
        if progress is not None:
            progress.total, progress.done = total, 0
        now = self.clock()
        result = np.zeros(total, dtype=bool)
        refs = sorted(compiled.segments)
        step, start = min(FIRST_STEP, CHUNK), 0
        while start < total:
            began = time.perf_counter()
            listed = persons[start : start + step]
            held = self.persons
            rows = [(p, held[p]) for p in listed if p in held]
            records = [dict(row.fields) for _p, row in rows]
            members = {
                ref: np.fromiter((ref in row.members for _p, row in rows), dtype=bool, count=len(rows)) for ref in refs
            }
            found = await asyncio.to_thread(_evaluate_step, compiled, records, percentiles, members, now)
            took = time.perf_counter() - began  # the copies here too: neither part holds the loop long
            if len(rows) == len(listed):
                result[start : start + len(listed)] = found
            else:
                inside = {p: bool(flag) for (p, _row), flag in zip(rows, found, strict=True)}
                result[start : start + len(listed)] = [inside.get(p, False) for p in listed]
            start += len(listed)
            if progress is not None:
                progress.done = start
            step = min(CHUNK, max(MIN_STEP, int(len(listed) * STEP_SECONDS / max(took, 1e-4))))
        self._m_population.record((time.perf_counter() - started) * 1000)
        return persons, result, percentiles or {}, now

    async def estimate(self, node) -> Estimate:
        """The definition's size now. The computed traits it needs are defined for the call and deleted
        after it (those no segment reads): an estimate leaves nothing behind on the profile service.

        A preview never holds up the live work: at most `max_estimates` run at once (more are refused,
        RESOURCE_EXHAUSTED with a retry hint), the computed traits they define that no segment reads count
        against `estimate_traits` together, one takes at most `estimate_seconds` from its start (then
        RESOURCE_EXHAUSTED naming the budget, its traits deleted), and its evaluation runs in a worker
        thread a step of rows at a time (`_population`), so the event loop answers meanwhile."""
        if self._estimates_running >= self.max_estimates:
            raise ResourceExhausted(
                f"{self._estimates_running} estimates are under way, the most this replica runs at once "
                f"(CDP_SEGMENTATION_MAX_ESTIMATES={self.max_estimates}); try again shortly",
                retry_after=2.0,
                reason="estimates_busy",
            )
        self._estimates_running += 1
        try:
            async with asyncio.timeout(self.estimate_seconds):
                return await self._estimate(node)
        except TimeoutError:
            raise ResourceExhausted(
                f"the estimate took longer than its budget (CDP_SEGMENTATION_ESTIMATE_SECONDS="
                f"{self.estimate_seconds:g} s) and was stopped; nothing it defined is left on the profile "
                "service. Estimate a narrower definition, or try again when the service is less busy",
                retry_after=5.0,
                reason="estimate_budget",
            ) from None
        finally:
            self._estimates_running -= 1

    async def _estimate(self, node) -> Estimate:
        compiled = self.compile(node, known=await self.known())
        warnings = await self.warnings(compiled)
        reading = frozenset(t["name"] for t in compiled.computed_traits)
        temporary = self._temporary_traits(reading)
        self._estimating.append(reading)
        self._estimate_temporary.append(temporary)
        try:
            await self._prepare(compiled)
            started = time.perf_counter()
            persons, inside, _percentiles, _now = await self._population(compiled)
            elapsed = (time.perf_counter() - started) * 1000
        finally:
            self._estimating.remove(reading)
            self._estimate_temporary.remove(temporary)
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
            warnings=warnings,
        )

    def _temporary_traits(self, reading: frozenset[str]) -> frozenset[str]:
        """The computed traits of `reading` no segment reads (an estimate defines them for itself), once
        checked against the budget Estimates under way share: those of every one count once."""
        if not reading:
            return frozenset()
        segments_read: set[str] = set()
        for segment in self.segments.values():
            if segment.serving:
                segments_read.update(t["name"] for t in segment.compiled.computed_traits)
            if segment.state == BUILDING:
                segments_read.update(t["name"] for t in segment.definition.computed_traits)
        temporary = reading - segments_read
        under_way = frozenset().union(*self._estimate_temporary)
        if len(under_way | temporary) > self.estimate_traits:
            raise ResourceExhausted(
                f"the estimate needs {len(temporary)} computed traits no segment reads, and estimates under way "
                f"hold {len(under_way)} of the {self.estimate_traits} they may define on the profile service at "
                f"once (CDP_SEGMENTATION_ESTIMATE_TRAITS); try again shortly",
                retry_after=2.0,
                reason="estimate_traits_busy",
            )
        return temporary


def _evaluate_step(
    compiled: CompiledSegment,
    records: list[dict[str, Any]],
    percentiles: dict[str, float | None] | None,
    members: dict[str, np.ndarray],
    now: float,
) -> np.ndarray:
    """One step of `_population`, in a worker thread: its own copies only."""
    return compiled.evaluate_columns(Columns.from_records(records, percentiles), members, now)


def live_entry(
    segment_id: str,
    version: int,
    definition: CompiledSegment,
    updated_at: float,
    *,
    golive: bool = True,
    adopt: bool = True,
    now: float = 0.0,
    readers_now: float | None = None,
    reason: str | None = None,
    before: Segment | None = None,
) -> dict[str, Any]:
    """A round log entry's go-live (percentiles.py, `log_live`): `definition` (version `version`, changed
    at `updated_at`) goes live there (`golive`), and the partition's persons are brought to it as of `now`
    (`adopt`), the segments referring to it as of `readers_now`; `before`: the definition live until then.
    The definition is kept so that a replay can serve it even once a later version replaced it."""
    return {
        "segment": segment_id,
        "version": version,
        "tree": orjson.dumps(to_json(definition.node)).decode(),
        "counted": sorted(definition.counted),
        "updated_at": updated_at,
        "golive": golive,
        "adopt": adopt,
        "now": now,
        "readers_now": now if readers_now is None else readers_now,
        "reason": reason,
        "before": None
        if before is None
        else {
            "version": before.version,
            "tree": orjson.dumps(to_json(before.compiled.node)).decode(),
            "counted": sorted(before.compiled.counted),
            "updated_at": before.updated_at,
        },
    }


def as_live(segment: Segment) -> tuple[str, int, CompiledSegment, float]:
    """`live_entry`'s first arguments for a segment's live definition."""
    return segment.id, segment.version, segment.compiled, segment.updated_at
