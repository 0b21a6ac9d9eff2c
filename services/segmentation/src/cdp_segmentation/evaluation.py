"""Per-person evaluation and timers: what one profile change, or the passing of time, does to one
person's memberships.

A change updates the person's flat fields ("traits.plan" -> "pro"); the live segments reading a changed
field (and those referring to them, in dependency order: index.py) are evaluated for that person with
the per-profile predicate; every flip is a `Transition`. A person first seen is read from the profile
service (cdp_kit.held) and evaluated against every live segment that can hold for them: those reading
one of their fields (less those needing a word of a field they do not hold: `traits.plan = "pro" and ...`),
those holding for an empty profile (`not traits.x exists`), and those referring to either (index.py,
`first_seen`); every other one is false for them. A removed person (deleted, or merged
into another) exits every segment.

Segments whose membership time alone can change (`traits.trial_ends_at < now`) give each person a
timer: the earliest instant one of their time comparisons flips, kept in a heap per partition. A
partition's due timers fire at the start of its next batch (`_fire_due`, so they go out in the
partition's order with the batch); the timer loop fires those of partitions without a batch for a
while (`fire_timers`, at a quiescent point of the stream: stream.py), a round recorded before it
publishes (engine.py, `timer_round`: a replay fires them there again, at the round's time, since what a
timer finds depends on when it fires). A build or an adoption that evaluates a time-based segment for
the whole population sets the timers of every person it evaluated (`_schedule_evaluated`); a
partition's start sets them from each person's `evaluated_at` (engine.py).

Every transition carries its cause, which makes its id stable: "s<partition>.<seq>.<change>" (a stream
position), "t<due ms>" (a timer instant), "v<version>" (a definition version). A person's stream
position (`Person.seq`) keeps a change from being applied to it twice.

`Evaluation` is the part of `SegmentationEngine` that does this; the state it reads is set up in the
engine's `__init__`.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cdp.profile.v1 import profile_pb2
from cdp_kit.held import apply_updates
from cdp_kit.profile_fields import change_fields
from cdp_kit.storage.model import MAX_KEY_CHARS
from cdp_kit.timestamps import to_seconds

if TYPE_CHECKING:
    from cdp_segmentation.catalogue import Segment

log = logging.getLogger("cdp.segmentation.engine")


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
class Person:
    """What segmentation holds for one person (snapshotted as one JSON document)."""

    fields: dict[str, Any]
    members: dict[str, float] = field(default_factory=dict)  # segment id -> since (epoch seconds)
    seq: int = 0  # the last profiles.changed position applied to this person
    evaluated_at: float = 0.0  # timers are due from this instant's state


class Evaluation:
    """Per-person evaluation of live segments, on a change and when a timer is due."""

    def _evaluate(
        self,
        person_id: str,
        person: Person,
        segments: Sequence[tuple[Segment, bool]],
        *,
        now: float,
        at: float,
        reason: str,
        cause: str,
        out: list[Transition],
        decided: Sequence[tuple[Segment, bool]] = (),
    ) -> None:
        """Evaluate `segments` (dependencies first) for one person; record the flips. `decided`: segments
        whose outcome for the person now is known without evaluating them (window segments a change crossed,
        index.py `crossed`), referring to no segment: applied first, their flips moving the segments of
        `segments` that refer to them as an evaluated flip does."""
        members = person.members
        fields = person.fields
        timed = False
        flipped: set[str] | None = None
        evaluated = 0
        if decided:
            timed = True  # (window segments compare with now)
            flipped = set()
            for segment, inside in decided:
                if inside is not (segment.id in members):
                    self._flip(person_id, members, segment, inside, at, reason, cause, out)
                    flipped.add(segment.id)
            self.decided += len(decided)
        for segment, direct in segments:
            if not direct and (flipped is None or flipped.isdisjoint(segment.refs)):
                continue  # it only refers to segments this change left as they were
            segment_id = segment.id
            evaluated += 1
            inside = segment.predicate(fields, members, now)
            if inside is not (segment_id in members):
                self._flip(person_id, members, segment, inside, at, reason, cause, out)
                if flipped is None:
                    flipped = set()
                flipped.add(segment_id)
            if segment.timed:
                timed = True
        self.evaluations += evaluated
        person.evaluated_at = now
        self.held.mark(person_id)
        if timed:
            self._schedule(person_id, person, now)

    def _flip(
        self,
        person_id: str,
        members: dict[str, float],
        segment: Segment,
        inside: bool,
        at: float,
        reason: str,
        cause: str,
        out: list[Transition],
    ) -> None:
        """The person enters (`inside`) or leaves `segment`: their memberships, the segment's members, and
        the transition recorded."""
        segment_id = segment.id
        if inside:
            members[segment_id] = at
            self.members.setdefault(segment_id, set()).add(person_id)
        else:
            del members[segment_id]
            self.members.get(segment_id, set()).discard(person_id)
        out.append(Transition(person_id, segment_id, inside, at, reason, segment.version, cause))

    def _schedule(self, person_id: str, person: Person, now: float) -> None:
        """The person's next timer: the earliest instant after `now` one of its time comparisons flips."""
        pending = self._due.get(person_id)
        if pending is not None and pending <= now:
            return  # overdue: the timer round evaluates every time segment of the person, then reschedules
        # The minimum of every time segment's `next_change`, from the comparisons whose flip can come first
        # (index.py, `TimeFlips`).
        due = self.index.flips.next_flip(person.fields, now)
        if due is None:
            self._due.pop(person_id, None)
            return
        if self._due.get(person_id) != due:
            self._due[person_id] = due
            heapq.heappush(self._timers.setdefault(self._partition(person_id), []), (due, person_id))

    def _schedule_evaluated(self, segment: Segment, persons: Iterable[str], since: float) -> None:
        """`segment` (time-dependent) was evaluated for `persons` as of `since` outside the per-person path
        (a build going live, an adoption): each one's timer comes forward to the earliest instant after
        `since` the segment's comparisons flip for them, the persons whose membership it left as it was
        included. A timer set earlier (another segment's, or this segment's previous version's) is kept
        when it comes first: when it fires every time segment is evaluated and the timer set again, so one
        that finds nothing to flip is harmless.

        `evaluated_at` is where a restart schedules from (engine.py, `_load`). It moves to `since` for a
        person with a flip to come when scheduling from where it was would go wrong: never evaluated
        (0: a restart would schedule from its own now and miss a flip before it), or a flip in between
        that the evaluation took in (a restart would flip the person at that instant, under another id).
        Only while no timer of theirs is overdue: a flip of another segment before `since` not yet
        evaluated must stay after `evaluated_at`."""
        next_change = segment.compiled.next_change
        due_of = self._due
        for person_id in persons:
            person = self.persons.get(person_id)
            if person is None:
                continue
            pending = due_of.get(person_id)
            if pending is not None and pending <= since:
                continue  # overdue: its round evaluates every time segment of the person, then reschedules
            due = next_change(person.fields, person.members, since)
            if due is None:
                continue
            if person.evaluated_at < since and (
                not person.evaluated_at or next_change(person.fields, person.members, person.evaluated_at) != due
            ):
                person.evaluated_at = since
                self.held.mark(person_id)
            if pending is None or due < pending:
                due_of[person_id] = due
                heapq.heappush(self._timers.setdefault(self._partition(person_id), []), (due, person_id))

    async def _timer_loop(self) -> None:
        while True:
            # A partition applying batches fires its timers itself; the loop takes the others.
            idle_for = self.timer_resolution if self.stream is not None else 0.0
            try:
                await self.fire_timers(idle_for=idle_for)
            except Exception as exc:  # the timers stay due; the next tick publishes them
                log.warning("timer round failed: %r", exc)
            # Until the next timer comes due (those due already belong to partitions applying batches).
            now = self.clock()
            wait = min([self.timer_resolution, *(heap[0][0] - now for heap in self._timers.values() if heap)])
            wait = wait if wait > 0 else self.timer_resolution
            await asyncio.sleep(wait)

    async def fire_timers(self, *, idle_for: float = 0.0) -> int:
        """Evaluate every person whose timer is due, in the served partitions that have applied no batch
        for `idle_for` seconds; publish what flipped (retrying until JetStream has it: the flips are
        held here only until the next snapshot). The round is recorded first (engine.py, `fire_recorded`):
        a replay fires them again at this round's time, not its own. Returns the persons evaluated."""
        now = self.clock()
        quiet_since = time.monotonic() - idle_for
        due = [
            partition
            for partition in sorted(self.active)
            if (heap := self._timers.get(partition))
            and heap[0][0] <= now
            and not (idle_for and self._last_apply.get(partition, 0.0) > quiet_since)
        ]
        if not due:
            return 0  # (a partition applying batches fires its own at the next one)
        async with self._quiet(), self.held.mutating():
            return await self.fire_recorded([p for p in due if p in self.active], self.clock())

    def _fire_due(self, partition: int, now: float, out: list[Transition]) -> int:
        """Evaluate the persons of `partition` whose timer is due at `now`; the flips go to `out`."""
        heap = self._timers.get(partition)
        fired = 0
        while heap and heap[0][0] <= now:
            due, person_id = heapq.heappop(heap)
            if self._due.get(person_id) != due:
                continue  # rescheduled or gone since
            del self._due[person_id]
            person = self.persons.get(person_id)
            if person is None:
                continue
            fired += 1
            self._evaluate(
                person_id,
                person,
                self.index.time_segments,
                now=now,
                at=due,
                reason="time",
                cause=f"t{round(due * 1000)}",
                out=out,
            )
        return fired

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
        deleted = self.deleted
        for index, change in enumerate(message.changes):
            person_id = change.person_id
            if not person_id or len(person_id) > MAX_KEY_CHARS or "\x00" in person_id:
                # A person the store cannot key (no service sends one; a NATS publisher can): held, every
                # snapshot of the process failed on their record from then on ("the next one writes what it
                # did not"), so each restart replayed from further back. Left out, as the stream's decode
                # dead-letters the change alone (stream.py); a replay leaves it out the same way.
                continue
            if deleted and person_id in deleted:
                # A deletion notice names the person (notices.py): a change from before it, replayed after a
                # store restored from then, brings nothing back and publishes nothing.
                continue
            person = self.persons.get(person_id)
            if person is not None and seq <= person.seq and person_id not in applying:
                continue  # this person's state already includes the message (snapshotted after it)
            applying.add(person_id)
            at = to_seconds(change.at)
            if at < oldest:
                oldest = at
            if change.removed:
                if person is not None:
                    self._remove(person_id, person, at=at, cause=f"{cause}.{index}", out=out)
                    if self.index.percentiles:
                        self.percentiles_stale = True  # one person fewer in the population
                continue
            updates = change_fields(change)
            new = person is None
            decided: list[tuple[Segment, bool]] = []
            if person is None:
                # A change that began the profile holds all of it; any other first sight reads the profile
                # (this replica's state began after the person's: a new replica, PROFILES aged out).
                fetched = None if change.created else await self.held.fetch(person_id)
                person = self.persons[person_id] = Person(fields=fetched or {})
            changed = apply_updates(person.fields, updates)
            person.seq = seq
            self.held.mark(person_id)
            for touched in self._touched:
                touched.add(person_id)
            if self.index.percentile_sources and (new or not self.index.percentile_sources.isdisjoint(changed)):
                self.percentiles_stale = True  # the population's values moved: recomputed at the next round
            if new or changed:
                # A person first seen: every live segment reading one of their fields, or holding for an empty
                # profile (`not traits.x exists`), and those referring to them (index.py, `first_seen`).
                if new:
                    segments = self.index.first_seen(person.fields)
                else:
                    # Threshold segments first (they refer to no segment), then the rest, dependencies first.
                    segments = self.index.affected(frozenset(changed))
                    if self.index.indexed:
                        # Window segments crossed are decided from the field's new time (index.py, `crossed`).
                        crossed = self.index.crossed(changed, person.fields, now, decided)
                        if crossed:
                            segments = crossed + list(segments)
                if segments or decided:
                    self._evaluate(
                        person_id,
                        person,
                        segments,
                        now=now,
                        at=at,
                        reason=change.cause or "event",
                        cause=f"{cause}.{index}",
                        out=out,
                        decided=decided,
                    )
                if not new and self.index.windows and not self.index.windows.keys().isdisjoint(changed):
                    # A field window segments compare with `now` moved: the person's next flip moved with
                    # it, whether or not a window was crossed and evaluated (`_evaluate` schedules then).
                    self._schedule(person_id, person, now)
        return oldest

    def forget_timer(self, person_id: str) -> None:
        """The person's pending timer, if any, finds nothing when due (`_fire_due`)."""
        self._due.pop(person_id, None)

    def _remove(self, person_id: str, person: Person, *, at: float, cause: str, out: list[Transition]) -> None:
        """The profile is gone (deleted, or merged into another): it leaves every segment."""
        for segment_id in list(person.members):
            self.members.get(segment_id, set()).discard(person_id)
            segment = self.segments.get(segment_id)
            out.append(
                Transition(person_id, segment_id, False, at, "removed", segment.version if segment else 0, cause)
            )
        self.held.remove(person_id)
        self._due.pop(person_id, None)
