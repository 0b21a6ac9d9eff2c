"""Which of a person's live instances an input can move: the person's wake index.

A person in many journeys (a customer's onboarding, cart, win-back, digest and price-drop journeys at once)
has one live instance per journey, and every event of theirs was offered to each (`instance.step` with
`EventArrived`), every profile or segment change to each running one (`ProfileChanged`): about 10 us an
instance, 3 to 6 ms an input at 300 instances, though nearly all of them wait on something else. Now an
input is offered only to the instances it can move; every other one would come back from `step` unchanged,
with no command.

What a stimulus can do to an instance (`domain/instance.py`):

- an event: convert its goal (running, or ended and still watching it), end it by an event exit rule, end
  the wait it is at; and, as any stimulus, end it by an exit condition or end its wait by the wait's
  condition, decided again on the view it is stepped with;
- a profile or segment change: those conditions, and a wait, delay or branch held for lagging fields
  (`held`), once the fields caught up (`PersonView.behind` is None).

A condition's answer changes only with what it reads (`cdp_lang.Reads`: the flat field keys and segment ids,
its event conditions being computed-trait fields here), with time (at the latest at `next_change`, where the
instance's recheck timer is set: `Instance.rearm`), and, for an exit condition on the person, with the fields'
lag when the instance entered at or after the event they lag behind (`exits_held`). So an input is offered
(`WakeIndex.pick`, in `person.live`'s order, as before: the arbiter rules their proposals in that order) to:

1. those whose filters name its event (the goal's, the event exit rules', the current wait's), or any event;
2. those reading a field or segment it changed (the exit conditions and the current wait's condition);
3. for a profile or segment change, those at a wait on a condition time makes true that has no recheck
   timer: an event stepping it after that instant, before the recheck fired, decided its exit conditions but
   not the wait's, and dropped the recheck (nothing is due any more), so only a change ends that wait;
4. for a profile or segment change while the fields are caught up, those held for lagging fields;
5. those whose recheck timer is due (time alone may have moved them; the timer has not fired yet);
6. when the fields' lag moved since the last input (an event starts it, the change listing it ends it), those
   with exit conditions on the person that entered at or after the earlier of the two lags;
7. those changed since the last input (entered, stepped, migrated, adopted in a merge, read from the store):
   a changed instance is offered the next input whatever it is, once;
8. after any journey changed (`Journeys.generation`: published, paused, archived; the fields kept, which
   `reads.bring_up` fills in, change only then), every instance once; and on every input those of an
   archived journey (any stimulus ends them, should the archive's sweep have missed one) or of a version not
   loaded (`Applier.step` says why).

A person gets an index once they have more than `INDEXED_ABOVE` live instances (offering an input to a few
costs less than the index's memory, about 1 KB an instance, in a hot cache of 100,000 persons); what a
journey step waits on is worked out once per version and step and shared by every instance there.

The index is kept up to date lazily: `Live`, the person's live-instance map, notes the ids set or removed
since the index last looked (an instance is immutable: a step that changes it puts a new object), and `pick`
takes those in first. It also lists the ended instances still watching their goal, which every input looks
at (`engine._after` lets them go when the window closes). `tests/test_person_in_many_journeys.py` counts the
instances offered per input, and drives random inputs through an engine with the index and one offering
everything (`OFFER_ALL`), comparing every write and message input after input; leaving out any of rules 3
to 6 makes it fail.

Measured in process (CPU per input, memory store; a person in 10, 100 and 300 journeys, each at a wait on
its own event with an event exit, an exit condition on traits.plan and a goal; 3 alternating pairs against
the build before): an event no instance waits on 146-159 / 1,427-2,317 / 6,511-6,846 us -> 21.6-28.2 us at
each count; a profile change moving a field no condition reads 120-126 / 934-1,198 / 3,559-4,801 us ->
35-64 / 49-65 / 92-105 us, what is left growing with the instances being the person record (its list of live
instances and its last entry per journey), written and checked by the store on such a change.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from cdp_orchestration.domain.instance import BRANCH, FIELDS, RECHECK, Instance, Status, reads_person
from cdp_orchestration.domain.journey import Wait
from cdp_orchestration.domain.lifecycle import State

if TYPE_CHECKING:
    from cdp_orchestration.journeys import Journeys

_ENTRY = "entry."  # an instance's own entry fields: no input changes them

#: Offer every input to every live instance, as before the index: what the index is compared with in tests.
OFFER_ALL = False
#: A person gets a wake index once they have more live instances than this: offering an input to a few costs
#: less than the index's memory (2 to 3 KB a person) in a hot cache of 100,000 persons.
INDEXED_ABOVE = 4


class Live(dict):  # type: ignore[type-arg]  # dict[str, Instance]
    """A person's live instances by id (`Person.live`). Once a wake index follows it (`follow`), it notes which
    ids were set to another object or removed since the index last looked (`moved`), and each id's place in
    the map (`seq`): instances are offered in the map's order. Until then it is a dict and a few empty slots:
    most persons are in a journey or two, and the hot cache holds 100,000 of them.

    It counts the running instances of each journey as they are set and removed (`running`): an entry checks
    the journey's `max_concurrent` by it, not by a walk over every instance the person has (a person in 300
    journeys walked 300 on each trigger). An instance is immutable (a step that changes it puts a new
    object), so what is set or removed is all that moves the count."""

    __slots__ = ("_count", "_running", "moved", "seq")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.moved: set[str] | None = None
        self.seq: dict[str, int] | None = None
        self._count = 0
        self._running: dict[str, int] | None = None  # journey id -> its running instances (None: none yet)
        if args or kwargs:
            self.update(*args, **kwargs)

    def running(self, journey_id: str) -> int:
        """The person's running instances of `journey_id` (`Status.RUNNING`)."""
        running = self._running
        return running.get(journey_id, 0) if running else 0

    def _counted(self, old: Instance | None, new: Instance | None) -> None:
        if old is not None and old.status is Status.RUNNING:
            running = self._running
            assert running is not None
            left = running[old.journey_id] - 1
            if left:
                running[old.journey_id] = left
            else:
                del running[old.journey_id]
        if new is not None and new.status is Status.RUNNING:
            running = self._running
            if running is None:
                running = self._running = {}
            running[new.journey_id] = running.get(new.journey_id, 0) + 1

    def follow(self) -> None:
        """Start noting changes: every id present counts as moved (the index takes them all in)."""
        self.moved = set(self)
        self.seq = {key: n for n, key in enumerate(self)}
        self._count = len(self.seq)

    def __setitem__(self, key: str, value: Instance) -> None:
        old = dict.get(self, key)
        if old is value:
            return  # a step that changed nothing puts the same object back
        self._counted(old, value)
        dict.__setitem__(self, key, value)
        if self.moved is None:
            return
        if old is None:
            self.seq[key] = self._count  # type: ignore[index]
            self._count += 1
        self.moved.add(key)

    def __delitem__(self, key: str) -> None:
        self._counted(dict.__getitem__(self, key), None)
        dict.__delitem__(self, key)
        if self.moved is not None:
            del self.seq[key]  # type: ignore[union-attr]
            self.moved.add(key)

    def pop(self, key: str, *default: Any) -> Any:
        if key in self:
            self._counted(dict.__getitem__(self, key), None)
            if self.moved is not None:
                del self.seq[key]  # type: ignore[union-attr]
                self.moved.add(key)
        return dict.pop(self, key, *default)

    def popitem(self) -> tuple[str, Instance]:
        key, value = dict.popitem(self)
        self._counted(value, None)
        if self.moved is not None:
            del self.seq[key]  # type: ignore[union-attr]
            self.moved.add(key)
        return key, value

    def clear(self) -> None:
        if self.moved is not None:
            self.moved.update(self)
            self.seq.clear()  # type: ignore[union-attr]
        self._running = None
        dict.clear(self)

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return dict.__getitem__(self, key)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other: Any) -> Live:  # type: ignore[override]
        self.update(other)
        return self


class _Wakers:
    """What can move one instance (see the module docstring)."""

    __slots__ = ("always", "changes", "ended", "events", "fields", "held", "lag", "recheck", "segments")

    def __init__(self) -> None:
        self.events: frozenset[str] | None = frozenset()  # None: any event
        self.fields: frozenset[str] = frozenset()
        self.segments: frozenset[str] = frozenset()
        self.held = False  # a wait, delay or branch waiting for lagging fields
        self.changes = False  # offered every profile and segment change (see `_wakers`)
        self.lag: float | None = None  # its entry time, when it has exit conditions on the person
        self.recheck: float | None = None  # its recheck timer's time
        self.always = False  # archived journey, version not loaded
        self.ended = False  # ended, kept while it watches its goal


def _wakers(instance: Instance, journeys: Journeys) -> _Wakers:
    wakers = _Wakers()
    wakers.ended = instance.status is Status.ENDED
    journey = journeys.version(instance.journey_id, instance.version)
    record = journeys.records.get(instance.journey_id)
    if journey is None or (record is not None and record.state is State.ARCHIVED):
        wakers.always = True
        return wakers
    running = instance.status is Status.RUNNING
    watching = instance.converted_at is None and instance.goal_until is not None
    key = (id(journey), instance.node if running else None, running, watching)
    cached = _SHAPES.get(key)
    if cached is None or cached[0] is not journey:
        if len(_SHAPES) >= _MAX_SHAPES:
            _SHAPES.clear()
        cached = _SHAPES[key] = (journey, _shape(journey, instance.node if running else None, running, watching))
    wakers.events, wakers.fields, wakers.segments, person_exits, time_wait = cached[1]
    if not running:
        return wakers
    if person_exits and instance.entered_at is not None:
        wakers.lag = instance.entered_at
    for timer in instance.timers:
        if timer.kind == RECHECK:
            wakers.recheck = timer.at
        elif timer.kind in (FIELDS, BRANCH):
            wakers.held = True
    if wakers.recheck is None and time_wait:
        # A wait on a condition time makes true, with no recheck: time may have made it true already. An event
        # reaching the instance after that instant, before its recheck fired, decides the exit conditions but not
        # the wait's (only a change or the recheck does), and drops the recheck (`rearm`: nothing is due any
        # more); any change then ends the wait. It is offered every one.
        wakers.changes = True
    return wakers


# What a journey version's instances at one step wait on, shared by them all: (the parsed version's id(), node,
# running, watching its goal) -> (that version, which the entry keeps alive so its id() is not reused; event
# names or None for any, fields, segments, whether an exit condition reads the person, whether the step is a
# wait on a condition time moves).
_Shape = tuple[frozenset[str] | None, frozenset[str], frozenset[str], bool, bool]
_SHAPES: dict[tuple[int, str | None, bool, bool], tuple[Any, _Shape]] = {}
_MAX_SHAPES = 20_000


def _shape(journey: Any, node_id: str | None, running: bool, watching: bool) -> _Shape:
    names: set[str] = set()
    filters = []
    goal = journey.goal
    if goal is not None and watching:
        filters.append(goal.event)
    if not running:
        return _names(filters, names), frozenset(), frozenset(), False, False
    conditions = []
    person_exits = False
    for rule in journey.exits:
        if rule.event is not None:
            filters.append(rule.event)
        if rule.condition is not None:
            conditions.append(rule.condition)
            person_exits = person_exits or reads_person(rule.condition)
    node = journey.nodes.get(node_id or "")
    time_wait = False
    if isinstance(node, Wait):
        if node.event is not None:
            filters.append(node.event)
        if node.condition is not None:
            conditions.append(node.condition)
            time_wait = node.condition.compiled.reads.time
    fields: set[str] = set()
    segments: set[str] = set()
    for condition in conditions:
        reads = condition.compiled.reads
        fields.update(f for f in reads.fields if not f.startswith(_ENTRY))
        segments.update(reads.segments)
    return _names(filters, names), frozenset(fields), frozenset(segments), person_exits, time_wait


def _names(filters: list[Any], names: set[str]) -> frozenset[str] | None:
    for event_filter in filters:
        if not event_filter.names:
            return None
        names.update(event_filter.names)
    return frozenset(names)


_NOT_YET = object()  # the lag before the first pick: every instance is offered that one anyway


class WakeIndex:
    """One person's live instances by what can move them (see the module docstring)."""

    __slots__ = (
        "_always",
        "_any_event",
        "_behind",
        "_by_event",
        "_by_field",
        "_by_segment",
        "_changes",
        "_ended",
        "_entries",
        "_generation",
        "_held",
        "_lagging",
        "_rechecks",
        "_unsettled",
    )

    def __init__(self) -> None:
        self._entries: dict[str, _Wakers] = {}
        self._by_event: dict[str, set[str]] = {}
        self._any_event: set[str] = set()
        self._by_field: dict[str, set[str]] = {}
        self._by_segment: dict[str, set[str]] = {}
        self._held: set[str] = set()
        self._changes: set[str] = set()
        self._ended: set[str] = set()
        self._always: set[str] = set()
        self._lagging: list[tuple[float, str]] = []  # (entry time, id), sorted
        self._rechecks: list[tuple[float, str]] = []  # a heap; entries no longer current are dropped when met
        self._unsettled: set[str] = set()
        self._generation = -1
        self._behind: Any = _NOT_YET

    def pick(
        self,
        live: Live,
        journeys: Journeys,
        now: float,
        behind: float | None,
        *,
        event: str | None = None,
        fields: Iterable[str] = (),
        segments: Iterable[str] = (),
    ) -> list[Instance]:
        """The live instances an input can move, in `live`'s order: an event called `event`, else a profile or
        segment change moving `fields` / `segments`. `behind`: the fields' lag now (`Person.behind`)."""
        if OFFER_ALL:
            return list(live.values())
        self._sync(live, journeys)
        ids = self._unsettled
        self._unsettled = set()
        ids |= self._always
        if event is not None:
            ids |= self._any_event
            ids.update(self._by_event.get(event, ()))
        else:
            for key in fields:
                ids.update(self._by_field.get(key, ()))
            for segment in segments:
                ids.update(self._by_segment.get(segment, ()))
            ids |= self._changes
            if behind is None:
                ids |= self._held
        if behind != self._behind:
            lags = [b for b in (behind, self._behind) if b is not None and b is not _NOT_YET]
            if lags:
                lagging = self._lagging
                ids.update(i for _, i in lagging[bisect.bisect_left(lagging, (min(lags), "")) :])
            self._behind = behind
        rechecks = self._rechecks
        due = set()
        while rechecks and rechecks[0][0] <= now:
            at, instance_id = heapq.heappop(rechecks)
            entry = self._entries.get(instance_id)
            if entry is not None and entry.recheck == at:
                due.add((at, instance_id))
                ids.add(instance_id)
        for item in due:  # still due until its timer fires or a step moves it
            heapq.heappush(rechecks, item)
        seq: dict[str, int] = live.seq  # type: ignore[assignment]
        return [live[i] for i in sorted(ids, key=seq.__getitem__)]

    def ended(self, live: Live, journeys: Journeys) -> list[Instance]:
        """The ended instances `live` holds (still watching their goal, or no longer: `engine._after` lets
        those go), without a look at the running ones."""
        self._sync(live, journeys)
        return [live[i] for i in self._ended]

    def _sync(self, live: Live, journeys: Journeys) -> None:
        if live.moved is None:
            live.follow()
        moved: set[str] = live.moved  # type: ignore[assignment]
        if journeys.generation != self._generation:
            moved = moved | self._entries.keys() | live.keys()
            self._generation = journeys.generation
        elif not moved:
            return
        for instance_id in moved:
            self._drop(instance_id)
            instance = live.get(instance_id)
            if instance is not None:
                self._add(instance_id, _wakers(instance, journeys))
        live.moved = set()

    def _add(self, instance_id: str, wakers: _Wakers) -> None:
        self._entries[instance_id] = wakers
        self._unsettled.add(instance_id)
        if wakers.ended:
            self._ended.add(instance_id)
        if wakers.always:
            self._always.add(instance_id)
            return
        if wakers.events is None:
            self._any_event.add(instance_id)
        else:
            for name in wakers.events:
                self._by_event.setdefault(name, set()).add(instance_id)
        for key in wakers.fields:
            self._by_field.setdefault(key, set()).add(instance_id)
        for segment in wakers.segments:
            self._by_segment.setdefault(segment, set()).add(instance_id)
        if wakers.held:
            self._held.add(instance_id)
        if wakers.changes:
            self._changes.add(instance_id)
        if wakers.lag is not None:
            bisect.insort(self._lagging, (wakers.lag, instance_id))
        if wakers.recheck is not None:
            heapq.heappush(self._rechecks, (wakers.recheck, instance_id))

    def _drop(self, instance_id: str) -> None:
        wakers = self._entries.pop(instance_id, None)
        if wakers is None:
            return
        self._unsettled.discard(instance_id)
        self._ended.discard(instance_id)
        if wakers.always:
            self._always.discard(instance_id)
            return
        if wakers.events is None:
            self._any_event.discard(instance_id)
        else:
            for name in wakers.events:
                _discard(self._by_event, name, instance_id)
        for key in wakers.fields:
            _discard(self._by_field, key, instance_id)
        for segment in wakers.segments:
            _discard(self._by_segment, segment, instance_id)
        self._held.discard(instance_id)
        self._changes.discard(instance_id)
        if wakers.lag is not None:
            lagging = self._lagging
            at = bisect.bisect_left(lagging, (wakers.lag, instance_id))
            if at < len(lagging) and lagging[at] == (wakers.lag, instance_id):
                del lagging[at]
        # A recheck left in the heap is dropped when met (`pick` checks it against the entry).
        if len(self._rechecks) > 2 * len(self._entries) + 16:
            current = {(at, i) for at, i in self._rechecks if (e := self._entries.get(i)) and e.recheck == at}
            self._rechecks = list(current)
            heapq.heapify(self._rechecks)


def _discard(index: dict[str, set[str]], key: str, instance_id: str) -> None:
    ids = index.get(key)
    if ids is not None:
        ids.discard(instance_id)
        if not ids:
            del index[key]
