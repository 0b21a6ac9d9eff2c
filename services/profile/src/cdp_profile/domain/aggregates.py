"""The state behind one computed trait for one part of a profile, updated one contribution at a time.

Every aggregate is a *mergeable summary*: combining the summaries of two disjoint event sets gives the
summary of their union (sums add, counters add, min of mins, first by event time, ...). That is what lets a
merged profile show exactly what one profile built from both event sets would, and a split give each side
back its own.

Lifetime traits keep only the summary. Windowed traits also keep one entry (at, event_id, value) per
contribution still inside the window, sorted by event time, so that expiry is exact: when the oldest
entry ages out it is taken out of the summary (or the summary is rebuilt from the remaining entries when
the aggregate cannot subtract, as min/max/first/last). An entry is inside the window while
`at + window > now`.

Windowed traits are bounded whatever the event rate. Past MAX_WINDOW_ENTRIES entries, or WINDOW_ENTRY_BYTES
of values that are no number, boolean or null, the oldest entries are coalesced, leaving the newest half
exact: each goes into the *bucket* of its cell on an aligned grid window / WINDOW_BUCKETS wide (so about
that many buckets span a window), a summary of the cell's contributions of the op's own kind (a count; a
count and total; a min; a first; a count per distinct value with its latest time; max_speed's first and last
points with the highest speed between neighbours inside as its floor). A bucket is an item of the entries,
(its oldest contribution's time, BUCKET, [cell width, its summary as stored]), sorted among them: it leaves
the window when its oldest contribution does, taking the rest of its cell along. So a person with at most
MAX_WINDOW_ENTRIES contributions in the window is exact as before, and a busier one's value is over a set of
contributions that holds every one younger than window - width and none older than the window: it errs
only by leaving out contributions early, by less than the width (1h24m for 30 days) - a count or sum of
positives *at most* the window's, a min at least, a max at most, a unique_count at most (at least where its
values were refused, above). Nothing leaves late, and coalescing never moves a state's expiry earlier
(an expiry schedule relies on it). Until something leaves, buckets are exact: they combine like any summary.

Buckets together take at most WINDOW_BUCKET_BYTES: past it the cells double in width (neighbours
combine; the error bound doubles), up to window / COARSEST_BUCKETS, as long as that shrinks them (a cell
per distinct value does not: a bot's random ids); past it then, the oldest buckets leave early, and those of
most_frequent, unique and unique_count may take WINDOW_VALUE_BUCKET_BYTES first (10,000 short values, so a
window of 10,000 distinct values still reads 10,000). A windowed state is so at most ~1,000 entries of at most
~200 bytes (the event id: the collector's 100-character message id) plus 64 KiB of values, plus 64 KiB of
buckets (256 KiB for distinct values), plus its summary: 49 KB for a count of 30,000 events a month, where
one entry per contribution was 1.05 MB. The record holds each state twice (the timeline base), per part.

These bounds are per state. A record holding many of them is bounded as a whole (profile.py:
COMPUTED_MAX_BYTES), by asking its largest states to take less (`ComputedState.shrink`): a windowed one
coalesces all but its newest contribution and keeps to narrower bounds (fewer exact entries, fewer bytes of
buckets) while it stays in memory; an all-time one of distinct values or points keeps those that matter to
its answer. The loss is of the kinds above, larger.

Merges combine the parts' summaries (buckets included) as before: a merged person is the person built from
the union of its events while no part-state is past the bound, and past it, until something leaves a
window; after that both are within the bound above, but they may differ by what left early (their cells
were coalesced apart). A split gives each side back its own states, as before.

Taking one contribution out (`ComputedState.remove`, a merge finding the same event on both sides): an
exact entry leaves as before; a coalesced one leaves its bucket - counts, sums and a value's count exactly,
while a bucket's min, max, first, last, a value's latest time or max_speed's points stay as they were
(harmless: the other side holds the very same contribution, as for all-time min/max/first/last). Taken
out by event id alone (`remove_entry`, no timeline entry to say its time and value), a coalesced one stays
until its bucket leaves.

Results: count -> int; sum -> float; avg -> float or None; min/max -> number or None; first/last -> the
value of the earliest/latest contribution by (event time, event id); most_frequent -> the value with the
highest count, ties going to the smallest value in `sort_key` order (null < booleans < numbers < strings <
lists/objects), a rule that does not depend on arrival order; unique -> the UNIQUE_LIMIT distinct values
seen most recently (each ranked by its latest contribution's (event time, event id), a total order, so
neither arrival order nor replays change which), in `sort_key` order; unique_count -> the number of
distinct values; max_speed -> float km/h or None; mismatch_count -> int.

Distinct-value aggregates hold one counter per distinct value, at most MAX_DISTINCT_VALUES (a bot's random
ids must not grow a profile without bound). Past it:
- `unique` forgets the values seen least recently, a tenth of the bound at a time (one selection per
  thousand new values, not one per value), so it still holds the UNIQUE_LIMIT values seen last. A value
  forgotten and seen again starts counting afresh; a window whose count of it then runs out before its
  latest contribution has left asks for a rebuild from its entries (`remove` says False).
- most_frequent and unique_count stop taking new values: unique_count is then a lower bound (the bound
  itself for all-time traits, documented as "at least"). In a window, once values have been refused and a
  tenth of the bound has left, the aggregate asks for a rebuild from the entries, which counts the values
  refused meanwhile: never an answer frozen at the values seen first.
Merges of such profiles are no longer exact. `unique` also keeps each value's latest (event time, event
id). A state stored before it did ([value, count] rows) loads with no time for its values: they rank
after every value seen since, among themselves by `sort_key` (so such a state shows what it showed
before), until a new contribution of the value gives it a time or a backfill rebuilds the trait. None of
this changes the stored form: a state says nothing of what it refused or forgot (a loaded state at the
bound is taken to have refused some).

max_speed keeps its located points (the speed between two points depends on which points lie between
them, so no smaller summary merges exactly), at most MAX_SPEED_POINTS: beyond that the oldest point
leaves and the speed of its pair is kept as a floor, and merges of such profiles are no longer exact.
"""

from __future__ import annotations

import heapq
import json
import math
import sys
from bisect import bisect_left, insort
from collections.abc import Iterable
from operator import itemgetter
from typing import Any

import orjson

from cdp_profile.domain.computed import MISSING, ComputedTrait

UNIQUE_LIMIT = 100
MAX_DISTINCT_VALUES = 10_000
# Past the bound `unique` forgets down to this many, and a windowed most_frequent / unique_count that refused
# values rebuilds once it is back under it: a tenth of the bound per selection or rebuild.
REFILL_BELOW = MAX_DISTINCT_VALUES * 9 // 10
# And at most this many characters of them (a string's own, another value's canonical JSON): 10,000 values
# of up to 32 KB each (a search query, a URL: the collector's event limit) are 320 MB, and 300 searches of
# 30 KB took a person's record past the store's 8 MiB, after which every event of theirs failed its
# partition's batch. Past it, as past the count: `unique` forgets, the others take no new value.
MAX_DISTINCT_CHARS = 256 * 1024
REFILL_CHARS = MAX_DISTINCT_CHARS * 9 // 10


def _chars(key: Any) -> int:
    """What a distinct value's key (`value_key`) counts against MAX_DISTINCT_CHARS."""
    return len(key) if type(key) is str else len(key[1])


MAX_SPEED_POINTS = 1000
EARTH_RADIUS_KM = 6371.0
MIN_SPEED_SECONDS = 60.0

_entry_key = itemgetter(0, 1)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def value_key(value: Any) -> Any:
    """A hashable identity for a JSON value that tells True from 1 and 1 from 1.0 (strings are their own key)."""
    if type(value) is str:
        return value
    return ("\x00json", _canonical(value))


def sort_key(value: Any) -> tuple[int, Any, str]:
    kind = type(value)
    if kind is str:
        return (3, value, "")
    if value is None:
        return (0, 0, "")
    if kind is bool:
        return (1, value, "")
    if (kind is int or kind is float) and math.isfinite(value):
        return (2, value, _canonical(value))
    return (4, 0, _canonical(value))


class CountAgg:
    __slots__ = ("n",)

    def __init__(self, n: int = 0) -> None:
        self.n = n

    def add(self, at: float, event_id: str, value: Any) -> None:
        self.n += 1

    def remove(self, at: float, event_id: str, value: Any) -> bool:
        self.n -= 1
        return True

    def combine(self, other: CountAgg) -> None:
        self.n += other.n

    def subtract(self, other: CountAgg) -> bool:
        """Take out a coalesced bucket's contributions (`combine` undone)."""
        self.n -= other.n
        return True

    def result(self, op: str) -> Any:
        return self.n

    def copy(self) -> CountAgg:
        return CountAgg(self.n)

    def to_doc(self) -> list[Any]:
        return [self.n]


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_FLOAT_MAX = sys.float_info.max


def _bounded(total: float) -> float:
    """A total as a state can be stored and a profile shown: an int within 64 bits, else a finite double,
    saturating at the largest one. Every value is finite, but two of 1.7e308 summed to infinity, which no
    JSON answer could show and the store wrote as null, and 2,050 of 2**53 to an int past 64 bits, which it
    could not write: either failed the person's next batch (after a restart, for the null) and dead-lettered
    the event, while a client sending such numbers was answered "stored"."""
    if type(total) is int:
        if _INT64_MIN <= total <= _INT64_MAX:
            return total
        try:
            return _bounded(float(total))
        except OverflowError:
            return _FLOAT_MAX if total > 0 else -_FLOAT_MAX
    if -_FLOAT_MAX <= total <= _FLOAT_MAX:
        return total
    return _FLOAT_MAX if total > 0 else -_FLOAT_MAX  # an overflow (NaN cannot come of finite values)


class SumAgg:
    """sum and avg: the total and how many values made it (an average is re-weighted by those counts).

    The total stays an int while every value is and it fits in 64 bits (integer sums are exact in any
    order), else it is a double; past the largest double it saturates there (`_bounded`), so a sum that
    overflowed shows 1.8e308 and stays that large, less what leaves, until every contribution has left."""

    __slots__ = ("n", "total")

    def __init__(self, n: int = 0, total: float | None = 0) -> None:
        self.n = n
        # null: an overflowed total stored before totals were bounded (its sign is lost; most are upward).
        self.total = _FLOAT_MAX if total is None else total

    def add(self, at: float, event_id: str, value: Any) -> None:
        self.n += 1
        self.total = _bounded(self.total + value)

    def remove(self, at: float, event_id: str, value: Any) -> bool:
        self.n -= 1
        # Reset when empty so float residue (0.1 + 0.2 - 0.1 - 0.2) never shows as a sum of nothing.
        self.total = _bounded(self.total - value) if self.n else 0
        return True

    def combine(self, other: SumAgg) -> None:
        self.n += other.n
        self.total = _bounded(self.total + other.total)

    def subtract(self, other: SumAgg) -> bool:
        self.n -= other.n
        self.total = _bounded(self.total - other.total) if self.n else 0
        return True

    def result(self, op: str) -> Any:
        if op == "sum":
            return float(self.total)
        return self.total / self.n if self.n else None

    def copy(self) -> SumAgg:
        return SumAgg(self.n, self.total)

    def to_doc(self) -> list[Any]:
        return [self.n, self.total]


class MinAgg:
    __slots__ = ("best",)

    def __init__(self, best: Any = None) -> None:
        self.best = best

    def add(self, at: float, event_id: str, value: Any) -> bool:
        if self.best is None or value < self.best:
            self.best = value
            return True
        return False  # unchanged: the state keeps its encoding (`ComputedState.add`)

    def remove(self, at: float, event_id: str, value: Any) -> bool:
        return value != self.best  # removing the minimum needs a rebuild from the remaining entries

    def combine(self, other: MinAgg) -> None:
        if other.best is not None:
            self.add(0, "", other.best)

    def result(self, op: str) -> Any:
        return self.best

    def copy(self) -> MinAgg:
        return type(self)(self.best)

    def to_doc(self) -> list[Any]:
        return [self.best]


class MaxAgg(MinAgg):
    __slots__ = ()

    def add(self, at: float, event_id: str, value: Any) -> bool:
        if self.best is None or value > self.best:
            self.best = value
            return True
        return False


class FirstAgg:
    """first/last by event time (ties: event id), whatever order the events arrive in."""

    __slots__ = ("at", "event_id", "value")

    def __init__(self, at: float | None = None, event_id: str = "", value: Any = None) -> None:
        self.at = at
        self.event_id = event_id
        self.value = value

    def _wins(self, at: float, event_id: str) -> bool:
        return self.at is None or (at, event_id) < (self.at, self.event_id)

    def add(self, at: float, event_id: str, value: Any) -> bool:
        if self._wins(at, event_id):
            self.at, self.event_id, self.value = at, event_id, value
            return True
        return False

    def remove(self, at: float, event_id: str, value: Any) -> bool:
        return event_id != self.event_id

    def combine(self, other: FirstAgg) -> None:
        if other.at is not None:
            self.add(other.at, other.event_id, other.value)

    def result(self, op: str) -> Any:
        return self.value

    def copy(self) -> FirstAgg:
        return type(self)(self.at, self.event_id, self.value)

    def to_doc(self) -> list[Any]:
        return [] if self.at is None else [self.at, self.event_id, self.value]


class LastAgg(FirstAgg):
    __slots__ = ()

    def _wins(self, at: float, event_id: str) -> bool:
        return self.at is None or (at, event_id) > (self.at, self.event_id)


class ValuesAgg:
    """most_frequent, unique_count: a counter per distinct value, the most frequent cached between changes.

    Two flat dicts (key -> value, key -> count) rather than a [value, count] pair per value: scalar-only
    dicts are not tracked by the garbage collector, and profiles hold many of these. At the bound new
    values are refused (`refused`, not stored: a state loaded at the bound is taken to have refused some).
    """

    __slots__ = ("_best", "chars", "counts", "refused", "values")

    def __init__(self, values: dict[Any, Any] | None = None, counts: dict[Any, int] | None = None) -> None:
        self.values: dict[Any, Any] = values if values is not None else {}  # key -> first value seen
        self.counts: dict[Any, int] = counts if counts is not None else {}
        self._best: Any = None  # key of the most frequent value; None = not known, compute on demand
        self.chars = sum(map(_chars, self.counts))  # of the distinct values held (MAX_DISTINCT_CHARS)
        # some value went uncounted (maybe)
        self.refused = len(self.counts) >= MAX_DISTINCT_VALUES or self.chars >= REFILL_CHARS

    def add(self, at: float, event_id: str, value: Any) -> None:
        key = value_key(value)
        counts = self.counts
        count = counts.get(key)
        if count is None:
            size = _chars(key)
            if len(counts) >= MAX_DISTINCT_VALUES or self.chars + size > MAX_DISTINCT_CHARS:
                self.refused = True
                return
            self.values[key] = value
            self.chars += size
            count = 0
        count = counts[key] = count + 1
        best = self._best
        if best is not None and best != key:
            best_count = counts[best]
            if count > best_count or (count == best_count and sort_key(value) < sort_key(self.values[best])):
                self._best = key

    def remove(self, at: float, event_id: str, value: Any) -> bool:
        key = value_key(value)
        count = self.counts.get(key)
        if count is not None:
            if count > 1:
                self.counts[key] = count - 1
            else:
                del self.counts[key], self.values[key]
                self.chars -= _chars(key)
            if key == self._best:
                self._best = None
            # Values were refused at the bound and a tenth of it has left since: a window rebuilds from its
            # entries, counting the refused ones that are still inside it.
            if self.refused and len(self.counts) < REFILL_BELOW and self.chars < REFILL_CHARS:
                return False
        return True

    def combine(self, other: ValuesAgg) -> None:
        counts, values = self.counts, self.values
        for key, count in other.counts.items():
            if key in counts:
                counts[key] += count
            elif len(counts) < MAX_DISTINCT_VALUES and self.chars + (size := _chars(key)) <= MAX_DISTINCT_CHARS:
                counts[key] = count
                values[key] = other.values[key]
                self.chars += size
            else:
                self.refused = True
        self.refused = self.refused or other.refused
        self._best = None

    def subtract(self, other: ValuesAgg) -> bool:
        """Take out a coalesced bucket's counts; False when this summary does not hold them all (it refused
        some) or values were refused and a tenth of the bound has left since: the caller rebuilds."""
        counts, values = self.counts, self.values
        self._best = None
        for key, count in other.counts.items():
            held = counts.get(key)
            if held is None or held < count:
                return False
            if held > count:
                counts[key] = held - count
            else:
                del counts[key], values[key]
                self.chars -= _chars(key)
        return not (self.refused and len(counts) < REFILL_BELOW and self.chars < REFILL_CHARS)

    def result(self, op: str) -> Any:
        if op == "unique_count":
            return len(self.counts)
        if not self.counts:
            return None
        if self._best is None:
            counts, values = self.counts, self.values
            self._best = min(counts, key=lambda k: (-counts[k], sort_key(values[k])))
        return self.values[self._best]

    def copy(self) -> ValuesAgg:
        agg = ValuesAgg(dict(self.values), dict(self.counts))
        agg.refused = self.refused
        return agg

    def to_doc(self) -> list[Any]:
        return [[value, self.counts[key]] for key, value in self.values.items()]


class UniqueAgg:
    """unique: a counter and the latest (event time, event id) per distinct value; the result is the
    UNIQUE_LIMIT values whose latest contributions are the most recent, in `sort_key` order (cached).

    The result is in value order, not recency order, so that a value seen again while it is already
    among them changes nothing (no change to publish), and a person with at most UNIQUE_LIMIT values
    reads exactly as before values had times. Flat scalar dicts, like ValuesAgg. A value loaded from a
    state stored without times (`at` None) ranks after every timed one, by `sort_key` among themselves.
    The latest of a value only moves forward on `add` and `combine` (a max, so order does not matter);
    `remove` of a value's latest contribution while others remain cannot know the one before, so it asks
    for a rebuild from the window's entries.
    """

    __slots__ = ("_top", "_unique", "at", "chars", "counts", "ids", "values")

    def __init__(
        self,
        values: dict[Any, Any] | None = None,
        counts: dict[Any, int] | None = None,
        at: dict[Any, float | None] | None = None,
        ids: dict[Any, str] | None = None,
    ) -> None:
        self.values: dict[Any, Any] = values if values is not None else {}  # key -> the value
        self.counts: dict[Any, int] = counts if counts is not None else {}
        self.at: dict[Any, float | None] = at if at is not None else {}  # key -> its latest event time
        self.ids: dict[Any, str] = ids if ids is not None else {}  # key -> its latest event id
        self._top: dict[Any, None] | None = None  # the result's keys; None = compute on demand
        self._unique: list[Any] | None = None  # the result; None = sort `_top` on demand
        self.chars = sum(map(_chars, self.counts))  # of the distinct values held (MAX_DISTINCT_CHARS)

    def _later(self, key: Any, at: float, event_id: str) -> bool:
        """Whether (at, event_id) is later than `key`'s latest (every time is later than none)."""
        latest = self.at.get(key)
        return latest is None or (at, event_id) > (latest, self.ids[key])

    def add(self, at: float, event_id: str, value: Any) -> None:
        key = value_key(value)
        counts = self.counts
        count = counts.get(key)
        if count is None:
            size = _chars(key)
            if len(counts) >= MAX_DISTINCT_VALUES or self.chars + size > MAX_DISTINCT_CHARS:
                self._forget(REFILL_BELOW, REFILL_CHARS - size)
            self.values[key] = value
            self.chars += size
            counts[key] = 1
        else:
            counts[key] = count + 1
            if not self._later(key, at, event_id):
                return  # an older contribution (a late event, a replay): the ranking stays
        self.at[key] = at
        self.ids[key] = event_id
        top = self._top
        if top is None:
            self._unique = None
            return
        # `_top` is kept in order of recency, oldest first, while contributions come in time order (the
        # common case): a value seen again moves to the end, the oldest is the first. One that comes
        # out of order has the ranking made again on the next read.
        if top:
            last = next(reversed(top))
            if last != key and not self._later(last, at, event_id):
                if key in top or len(top) < UNIQUE_LIMIT or not self._older_than_all(at, event_id):
                    self._top = self._unique = None
                return
        if key in top:
            del top[key]
            top[key] = None  # still among them: the result stays
            return
        unique = self._unique
        if len(top) < UNIQUE_LIMIT:
            top[key] = None  # fewer than the limit: every value is in
            if unique is not None:
                self._unique = unique = list(unique)  # a new list: a caller may hold the one before
                insort(unique, value, key=sort_key)
            return
        oldest = next(iter(top))
        del top[oldest]
        top[key] = None
        if unique is not None:
            self._unique = unique = list(unique)
            gone = self.values[oldest]
            del unique[bisect_left(unique, sort_key(gone), key=sort_key)]
            insort(unique, value, key=sort_key)

    def _forget(self, keep: int, chars: int = MAX_DISTINCT_CHARS) -> None:
        """Forget the values seen least recently until at most `keep` are left, of at most `chars`
        characters: untimed ones first (the last by value first, as they leave `_ranked`), then by their
        latest (event time, event id). The values seen last stay, so the result is what it was."""
        excess = len(self.counts) - keep
        if excess <= 0 and self.chars <= chars:
            return
        at, ids, values = self.at, self.ids, self.values
        untimed = [key for key, latest in at.items() if latest is None]
        if self.chars <= chars and len(untimed) >= excess:
            gone = sorted(untimed, key=lambda k: sort_key(values[k]), reverse=True)[:excess]
        elif self.chars <= chars:
            timed = (key for key, latest in at.items() if latest is not None)
            gone = untimed + heapq.nsmallest(excess - len(untimed), timed, key=lambda k: (at[k], ids[k]))
        else:  # past the characters too: the least recent first until both hold
            untimed.sort(key=lambda k: sort_key(values[k]), reverse=True)
            timed = sorted((key for key, latest in at.items() if latest is not None), key=lambda k: (at[k], ids[k]))
            gone, left, size = [], len(self.counts), self.chars
            for key in (*untimed, *timed):
                if left <= keep and size <= chars:
                    break
                gone.append(key)
                left -= 1
                size -= _chars(key)
        top = self._top
        for key in gone:
            del self.counts[key], values[key], at[key], ids[key]
            self.chars -= _chars(key)
            if top is not None and key in top:
                self._top = self._unique = None

    def _older_than_all(self, at: float, event_id: str) -> bool:
        """Whether (at, event_id) is older than every value in a full `_top` (then nothing changes)."""
        return not any(self._later(other, at, event_id) for other in self._top or ())

    def remove(self, at: float, event_id: str, value: Any) -> bool:
        key = value_key(value)
        count = self.counts.get(key)
        if count is None:
            return True
        latest = self.at[key] == at and self.ids[key] == event_id
        if count > 1:
            self.counts[key] = count - 1
            # Its latest contribution leaving: the one before is not known here (windows rebuild).
            return not latest
        if not latest and self.at[key] is not None:
            # Its one counted contribution is a later one: the value was forgotten at the bound and seen
            # again, so this one went uncounted and others may be left (windows rebuild).
            return False
        del self.counts[key], self.values[key], self.at[key], self.ids[key]
        self.chars -= _chars(key)
        if self._top is not None and key in self._top:
            self._top = self._unique = None  # another value may take its place
        return True

    def take_out(self, value: Any) -> None:
        """Take one contribution of `value` out by its count alone: a bucket's (`_retract_coalesced`), whose
        counts are exact and whose latest times stay as they were. `remove` would keep a value whose one
        counted contribution is not its recorded latest (forgotten at the bound and seen again), which in a
        bucket is a latest that a take-out before this one left behind: the value stayed for ever."""
        key = value_key(value)
        count = self.counts.get(key)
        if count is None:
            return
        if count > 1:
            self.counts[key] = count - 1
            return
        del self.counts[key], self.values[key], self.at[key], self.ids[key]
        self.chars -= _chars(key)
        self._top = self._unique = None

    def combine(self, other: UniqueAgg) -> None:
        counts, values = self.counts, self.values
        for key, count in other.counts.items():
            if key in counts:
                counts[key] += count
                theirs = other.at[key]
                if theirs is not None and self._later(key, theirs, other.ids[key]):
                    self.at[key], self.ids[key] = theirs, other.ids[key]
            else:
                counts[key] = count
                values[key] = other.values[key]
                self.at[key], self.ids[key] = other.at[key], other.ids[key]
                self.chars += _chars(key)
        self._forget(MAX_DISTINCT_VALUES)  # the values seen last of both stay
        self._top = self._unique = None

    def subtract(self, other: UniqueAgg) -> bool:
        """Take out a coalesced bucket's counts; False when this summary does not hold them all (it forgot
        some) or a value's latest contribution leaves while others remain (the one before is not known
        here): the caller rebuilds."""
        counts, at, ids = self.counts, self.at, self.ids
        self._top = self._unique = None
        for key, count in other.counts.items():
            held = counts.get(key)
            if held is None or held < count:
                return False
            if held == count:
                del counts[key], self.values[key], at[key], ids[key]
                self.chars -= _chars(key)
            elif at[key] is None or (at[key] == other.at[key] and ids[key] == other.ids[key]):
                return False
            else:
                counts[key] = held - count
        return True

    def result(self, op: str) -> Any:
        unique = self._unique
        if unique is None:
            top = self._top
            if top is None:
                top = self._top = dict.fromkeys(self._ranked())
            values = self.values
            unique = self._unique = sorted((values[key] for key in top), key=sort_key)
        return unique

    def _ranked(self) -> list[Any]:
        """The keys of the UNIQUE_LIMIT most recent values, oldest first: untimed ones before every timed
        one, the one last by value first among them (it is the first to leave)."""
        at, ids = self.at, self.ids
        timed = [key for key, latest in at.items() if latest is not None]
        keys = heapq.nlargest(UNIQUE_LIMIT, timed, key=lambda k: (at[k], ids[k]))
        if len(keys) < UNIQUE_LIMIT:
            values = self.values
            untimed = sorted((k for k, latest in at.items() if latest is None), key=lambda k: sort_key(values[k]))
            keys += untimed[: UNIQUE_LIMIT - len(keys)]
        keys.reverse()
        return keys

    def copy(self) -> UniqueAgg:
        agg = UniqueAgg(dict(self.values), dict(self.counts), dict(self.at), dict(self.ids))
        if self._top is not None:
            agg._top = dict(self._top)
            agg._unique = self._unique  # replaced on a change, never changed in place
        return agg

    def to_doc(self) -> list[Any]:
        at, ids, counts = self.at, self.ids, self.counts
        return [
            [value, counts[key]] if at[key] is None else [value, counts[key], at[key], ids[key]]
            for key, value in self.values.items()
        ]

    @classmethod
    def from_doc(cls, doc: list[Any]) -> UniqueAgg:
        agg = cls()
        for row in doc:
            key = value_key(row[0])
            agg.values[key] = row[0]
            agg.counts[key] = row[1]
            if len(row) >= 4:  # a state stored before values had times has [value, count] rows
                agg.at[key], agg.ids[key] = row[2], row[3]
            else:
                agg.at[key], agg.ids[key] = None, ""
            agg.chars += _chars(key)
        return agg


class TrueCountAgg:
    """mismatch_count: every event that compared contributes True (differ) or False; the Trues are counted."""

    __slots__ = ("n",)

    def __init__(self, n: int = 0) -> None:
        self.n = n

    def add(self, at: float, event_id: str, value: Any) -> bool:
        if value:
            self.n += 1
            return True
        return False

    def remove(self, at: float, event_id: str, value: Any) -> bool:
        if value:
            self.n -= 1
        return True

    def combine(self, other: TrueCountAgg) -> None:
        self.n += other.n

    def subtract(self, other: TrueCountAgg) -> bool:
        self.n -= other.n
        return True

    def result(self, op: str) -> Any:
        return self.n

    def copy(self) -> TrueCountAgg:
        return TrueCountAgg(self.n)

    def to_doc(self) -> list[Any]:
        return [self.n]


def speed_kmh(a: tuple[float, str, float, float], b: tuple[float, str, float, float]) -> float:
    """Ground speed from point a to the later point b: haversine km over at least MIN_SPEED_SECONDS."""
    lat1, lon1, lat2, lon2 = a[2], a[3], b[2], b[3]
    if lat1 == lat2 and lon1 == lon2:
        return 0.0
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    h = (
        math.sin((phi2 - phi1) / 2) ** 2
        + math.cos(phi1) * math.cos(phi2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    )
    km = 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))
    return km * 3600 / max(b[0] - a[0], MIN_SPEED_SECONDS)


class MaxSpeedAgg:
    """max_speed: the located points sorted by (event time, event id); the highest speed between neighbours.

    The result is cached: appending the newest point or dropping the oldest (a window moving on) updates it
    in constant time; a point landing between two others recomputes it on the next read.
    """

    __slots__ = ("_best", "points", "retired")

    def __init__(self, retired: float | None = None, points: list[tuple[float, str, float, float]] | None = None):
        self.points: list[tuple[float, str, float, float]] = points if points is not None else []
        self.retired = retired  # highest speed of the pairs whose older point left beyond MAX_SPEED_POINTS
        self._best: Any = MISSING  # the result, MISSING = compute on the next read

    def add(self, at: float, event_id: str, value: Any) -> None:
        points = self.points
        point = (at, event_id, value[0], value[1])
        if not points or point[:2] > points[-1][:2]:
            points.append(point)
            if self._best is not MISSING and len(points) > 1:
                self._best = _max(self._best, speed_kmh(points[-2], point))
        else:
            points.insert(bisect_left(points, point[:2], key=_entry_key), point)
            self._best = MISSING
        if len(points) > MAX_SPEED_POINTS:
            self.retired = _max(self.retired, speed_kmh(points[0], points[1]))
            del points[0]  # its pair's speed is in `retired`, so a cached result stays right

    def remove(self, at: float, event_id: str, value: Any) -> bool:
        points = self.points
        index = bisect_left(points, (at, event_id), key=_entry_key)
        if index < len(points) and points[index][1] == event_id:
            best = self._best
            if index == 0 and best is not MISSING and len(points) > 1:
                # The oldest leaves (a window moved on): only its pair goes.
                if speed_kmh(points[0], points[1]) >= best:
                    self._best = MISSING
            else:
                self._best = MISSING
            del points[index]
            if self._best is not MISSING and len(points) < 2 and self.retired is None:
                self._best = None
        # Once points were dropped beyond the limit, a window's remaining entries must rebuild the summary.
        return self.retired is None

    def combine(self, other: MaxSpeedAgg) -> None:
        points = list(heapq.merge(self.points, other.points, key=_entry_key))
        retired = _max(self.retired, other.retired)
        excess = len(points) - MAX_SPEED_POINTS
        for index in range(max(0, excess)):
            retired = _max(retired, speed_kmh(points[index], points[index + 1]))
        self.points = points[excess:] if excess > 0 else points
        self.retired = retired
        self._best = MISSING

    def result(self, op: str) -> Any:
        best = self._best
        if best is MISSING:
            best = self.retired
            points = self.points
            for index in range(1, len(points)):
                best = _max(best, speed_kmh(points[index - 1], points[index]))
            self._best = best
        return best

    def copy(self) -> MaxSpeedAgg:
        agg = MaxSpeedAgg(self.retired, list(self.points))
        agg._best = self._best
        return agg

    def to_doc(self) -> list[Any]:
        return [self.retired, [list(point) for point in self.points]]


def _max(a: float | None, b: float) -> float:
    return b if a is None or b > a else a


AGGREGATES: dict[str, type] = {
    "count": CountAgg,
    "sum": SumAgg,
    "avg": SumAgg,
    "min": MinAgg,
    "max": MaxAgg,
    "first": FirstAgg,
    "last": LastAgg,
    "most_frequent": ValuesAgg,
    "unique": UniqueAgg,
    "unique_count": ValuesAgg,
    "max_speed": MaxSpeedAgg,
    "mismatch_count": TrueCountAgg,
}


def _agg_from_doc(op: str, doc: list[Any]) -> Any:
    kind = AGGREGATES[op]
    if kind is ValuesAgg:
        keys = [value_key(value) for value, _ in doc]
        return ValuesAgg(
            dict(zip(keys, (v for v, _ in doc), strict=True)), dict(zip(keys, (c for _, c in doc), strict=True))
        )
    if kind is UniqueAgg:
        return UniqueAgg.from_doc(doc)
    if kind is MaxSpeedAgg:
        retired, points = doc
        return MaxSpeedAgg(retired, [tuple(point) for point in points])
    return kind(*doc)


# Below this many entries a windowed state is encoded whole, its bytes not kept: orjson writes a few entries
# as fast as the kept array's bytes are cut and joined (~1 us either way; 100 entries: 6.2 us whole, 2.4 kept).
_KEPT_ENTRIES_MIN = 16

# The bound of a windowed state (module docstring): its contributions one by one up to this many of them and
# this many bytes of their values that are no number, boolean or null (`_value_bytes`: strings, lists,
# objects; an entry is otherwise at most ~200 bytes, its event id at most ~140 characters); past either, the
# oldest are coalesced into buckets until half of each is left. 200,000 pings in a month under one user id
# made a 4.9 MB state, and as much again in the timeline base: a 9.8 MB record, past the store's 8 MiB,
# after which every event of the person failed its partition's batch.
MAX_WINDOW_ENTRIES = 1000
WINDOW_ENTRY_BYTES = 64 * 1024
# Buckets are cells of an aligned grid, window / WINDOW_BUCKETS seconds wide to start with (so at most
# WINDOW_BUCKETS + 1 of them are inside a window). Past WINDOW_BUCKET_BYTES of them as stored the cells
# double in width (neighbours combine), up to window / COARSEST_BUCKETS; past it still, the oldest leave
# early. A bucket of most_frequent, unique or unique_count holds a row per distinct value of its cell: at the
# coarsest width theirs may take WINDOW_VALUE_BUCKET_BYTES, about what their summary may (10,000 short
# values), so that a window of 10,000 distinct values still reads 10,000.
WINDOW_BUCKETS = 512
COARSEST_BUCKETS = 32
WINDOW_BUCKET_BYTES = 64 * 1024
WINDOW_VALUE_BUCKET_BYTES = 256 * 1024
_VALUE_OPS = frozenset({"most_frequent", "unique", "unique_count"})
_FIXED_SIZE = frozenset({int, float, bool, type(None)})  # values `_value_bytes` counts as 0
# A bucket's event id: no event's (an event id is "<source id>:<message id>"), and the first of its time.
BUCKET = ""


def _value_bytes(value: Any) -> int:
    """What an exact entry's value takes stored beyond a number's: 0 for numbers, booleans and null; strings
    by their UTF-8 length (`isascii` saves measuring most); lists and objects as JSON."""
    kind = type(value)
    if kind is str:
        return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    if kind is int or kind is float or kind is bool or value is None:
        return 0
    return len(orjson.dumps(value))


def _cell(at: float, width: float) -> float:
    """The start of the grid cell holding `at` (widths are the window over a power of two: cells of twice the
    width are unions of two, and whole-second windows make every product exact)."""
    return (at // width) * width


def _bucket_doc(agg: Any) -> list[Any]:
    """A bucket's summary as stored. max_speed keeps its first and last points and, as its floor, the highest
    speed between neighbours inside it: with the points around it that gives the window's answer exactly (the
    speed from its first point to its last is at most the highest between its neighbours)."""
    if type(agg) is MaxSpeedAgg and len(agg.points) > 2:
        agg = MaxSpeedAgg(agg.result("max_speed"), [agg.points[0], agg.points[-1]])
    return agg.to_doc()


def _buckets(cells: dict[float, list[Any]], width: float) -> list[tuple[float, str, Any]]:
    """Cells ([oldest time, summary as stored or None, aggregate or None]) as bucket items, oldest first."""
    items = [
        (cell[0], BUCKET, [width, cell[1] if cell[2] is None else _bucket_doc(cell[2])]) for cell in cells.values()
    ]
    items.sort(key=_entry_key)
    return items


# The start of a state's encoding up to its aggregate ('{"op":...,"window":...,"sig":...,"agg":'), by
# (op, window, signature): one per definition met.
_HEADS: dict[tuple[str, float | None, str, type], bytes] = {}


class ComputedState:
    """One computed trait's summary for one part; windowed ones also keep their in-window entries.

    The state keeps its own stored form (`encoded`), made on the first write after it changed: a profile
    is written whole on every change, and most changes (a score, an event feeding a few of the traits)
    leave most states as they were, whose encoding is then reused rather than made again. Every change
    goes through the methods below, each of which forgets the encoding (an all-time `add` only when the
    aggregate's `add` does not answer False: it kept its summary as it was); nothing outside this class
    changes `agg` or `entries` (they are read only).

    A windowed state's entries are most of its encoding, and an event adds one at their end: such an add
    keeps the last encoding (`_raw`, whose entries array starts at `_raw_at` and holds the first `_raw_n`
    entries), and the next `encoded()` reuses that array's bytes, encoding only the entries added since.
    Every other change of the entries (an insertion before the end, a prune, a removal, a coalescing)
    drops it.

    `entries` also holds the buckets (`_coalesce`), as (its oldest contribution's time, BUCKET, [cell width,
    its aggregate as stored]), in the same (time, event id) order: the first item's time plus the window is
    still the state's next expiry, and a prune takes out buckets and entries alike. A state stored before
    there were buckets reads as it did, and coalesces on its next add if it is past the bound.
    """

    __slots__ = (
        "_bucket_budget",
        "_buckets",
        "_bytes",
        "_data",
        "_encoded",
        "_limit",
        "_narrow",
        "_raw",
        "_raw_at",
        "_raw_n",
        "_size",
        "agg",
        "entries",
        "op",
        "signature",
        "window",
    )

    def __init__(self, op: str, window: float | None, signature: str, agg: Any = None, entries: Any = None) -> None:
        self._encoded: orjson.Fragment | None = None
        self._raw: bytes | None = None
        self._raw_at = 0
        self._raw_n = 0
        # How many of the entries are buckets, and the `_value_bytes` of the others: None = count when needed.
        self._buckets: int | None = None if entries else 0
        self._bytes: int | None = None if entries else 0
        self._narrow = 0  # coalescings to go before wider cells are tried again (they did not shrink them)
        # The stored size of `_encoded` (`stored_bytes`), and the tighter bounds the record's bound set
        # (`shrink`): exact entries kept before coalescing, bytes of buckets. None: the module's. Not stored:
        # a state loaded is bounded by the module's until the record's bound meets it again.
        self._size = 0
        self._data = b""  # the bytes of `_encoded`, for `_size` when it is asked for (-1: not measured yet)
        self._limit: int | None = None
        self._bucket_budget: int | None = None
        self.op = op
        self.window = window
        self.signature = signature
        self.agg = agg if agg is not None else AGGREGATES[op]()
        self.entries: list[tuple[float, str, Any]] | None = (
            (entries if entries is not None else []) if window is not None else None
        )

    @classmethod
    def for_trait(cls, trait: ComputedTrait) -> ComputedState:
        return cls(trait.op, trait.window, trait.signature)

    def result(self) -> Any:
        """The value as of the last add/prune (the engine prunes on every touch and on `expire`)."""
        return self.agg.result(self.op)

    def add(self, at: float, event_id: str, value: Any, now: float) -> None:
        if self.window is None:
            # An aggregate whose `add` says False kept its summary (a `first` that a later event does not
            # displace, a `max` not beaten): its stored form is as it was, and so is its encoding (most
            # orders of a returning customer leave their `first_order_*` and `max_order` traits alone).
            if self.agg.add(at, event_id, value) is not False:
                self._encoded = None
            return
        if at + self.window <= now:
            # Already aged out: it only proves the trait exists (its value is the empty one). The state is
            # as it was, and so is its encoding.
            return
        self._encoded = None
        entries = self.entries
        entry = (at, event_id, value)
        if not entries or (at, event_id) > _entry_key(entries[-1]):
            entries.append(entry)  # the entries encoded last (`_raw`) stay as they were, in front
        else:
            self._raw = None
            insort(entries, entry, key=_entry_key)
        self.agg.add(at, event_id, value)
        kind = type(value)
        if kind not in _FIXED_SIZE:
            size = self._bytes
            if size is None:
                size = self._exact_bytes()
            else:  # `_value_bytes`, inline for the common ASCII string
                size += len(value) if kind is str and value.isascii() else _value_bytes(value)
            self._bytes = size
            if size > WINDOW_ENTRY_BYTES:
                self._coalesce()
                return
        limit = MAX_WINDOW_ENTRIES if self._limit is None else self._limit
        if len(entries) > limit and len(entries) - self._bucket_count() > limit:
            self._coalesce()

    def _bucket_count(self) -> int:
        count = self._buckets
        if count is None:
            count = self._buckets = sum(1 for entry in self.entries or () if entry[1] == BUCKET)
        return count

    def _exact_bytes(self) -> int:
        return sum(_value_bytes(entry[2]) for entry in self.entries if entry[1] != BUCKET)

    def _width(self) -> float:
        """The buckets' width (all have the same); the finest when there are none."""
        if self._bucket_count():
            for entry in self.entries:
                if entry[1] == BUCKET:
                    return entry[2][0]
        return self.window / WINDOW_BUCKETS

    def _coalesce(self, keep_n: int | None = None, keep_bytes: int | None = None, widen: bool = False) -> None:
        """Fold the oldest exact entries into the buckets of their cells, keeping the newest up to half of
        each bound (the newest one at least; `keep_n` and `keep_bytes` when given); past the buckets' bytes,
        double their width (`widen`: even where that did not shrink them lately), then let the oldest leave
        (and rebuild the summary). The summary does not change otherwise: the same contributions are in it.

        A bucket's time is that of its oldest contribution: it leaves the window with it, taking the rest
        of its cell (younger by less than the cell's width) along, and the state's expiry (its first
        item's) never moves earlier, which an expiry schedule relies on (`Profile.take_added_due`)."""
        entries = self.entries
        width = self._width()
        if keep_n is None:
            keep_n = (MAX_WINDOW_ENTRIES if self._limit is None else self._limit) // 2
        if keep_bytes is None:
            keep_bytes = WINDOW_ENTRY_BYTES // 2
        kept = kept_bytes = 0
        cut: tuple[float, str] | None = None  # the oldest exact entry kept
        for entry in reversed(entries):
            if entry[1] == BUCKET:
                continue
            size = _value_bytes(entry[2])
            if kept and (kept >= keep_n or kept_bytes + size > keep_bytes):
                break
            kept += 1
            kept_bytes += size
            cut = _entry_key(entry)
        op = self.op
        # cell start -> [its oldest contribution's time, its summary as stored, its aggregate when fed now]
        cells: dict[float, list[Any]] = {
            _cell(entry[0], width): [entry[0], entry[2][1], None] for entry in entries if entry[1] == BUCKET
        }
        out: list[tuple[float, str, Any]] = []
        for entry in entries:
            at, event_id = entry[0], entry[1]
            if event_id == BUCKET:
                continue
            if (at, event_id) >= cut:
                out.append(entry)
                continue
            cell = cells.get(start := _cell(at, width))
            if cell is None:
                cell = cells[start] = [at, None, AGGREGATES[op]()]
            elif cell[2] is None:
                cell[2] = _agg_from_doc(op, cell[1])
            if at < cell[0]:
                cell[0] = at
            cell[2].add(*entry)
        buckets = _buckets(cells, width)
        # One encoding of them all is the check (numbers: ~513 buckets of ~40 bytes, far below).
        size = len(orjson.dumps(buckets))
        budget = WINDOW_VALUE_BUCKET_BYTES if op in _VALUE_OPS else WINDOW_BUCKET_BYTES
        if self._bucket_budget is not None:
            budget = min(budget, self._bucket_budget)
        if widen:
            self._narrow = 0
        while size > min(WINDOW_BUCKET_BYTES, budget) and width * COARSEST_BUCKETS < self.window and not self._narrow:
            coarser: dict[float, list[Any]] = {}
            for at, _, (_, doc) in buckets:
                agg = _agg_from_doc(op, doc)
                cell = coarser.get(start := _cell(at, width * 2))
                if cell is None:
                    coarser[start] = [at, None, agg]
                else:
                    cell[2].combine(agg)  # the older first: its time is the cell's
            wider = _buckets(coarser, width * 2)
            smaller = len(orjson.dumps(wider))
            if smaller > size * 3 // 4:
                # Distinct values (a bot's ids): wider cells would only blur the expiry. Trying costs a
                # pass over every bucket: not again for the next 15 coalescings (7,500 contributions).
                self._narrow = 16
                break
            buckets, size, width = wider, smaller, width * 2
        if self._narrow:
            self._narrow -= 1
        dropped = 0
        if size > budget:
            sizes = [len(orjson.dumps(bucket)) for bucket in buckets]
            total = sum(sizes)
            while total > budget and dropped < len(sizes):
                total -= sizes[dropped]
                dropped += 1
        out.extend(buckets[dropped:])
        out.sort(key=_entry_key)
        self.entries = out
        self._buckets = len(buckets) - dropped
        self._bytes = kept_bytes
        self._encoded = self._raw = None
        subtract = getattr(self.agg, "subtract", None)
        for bucket in buckets[:dropped]:
            if subtract is None or not subtract(_agg_from_doc(op, bucket[2][1])):
                self._rebuild()
                break

    def remove(self, event_id: str, at: float, value: Any) -> None:
        """Take one contribution back out (a merge found the same event on both sides)."""
        self._encoded = self._raw = None
        if self.window is not None:
            if not self.remove_entry(event_id):
                self._retract_coalesced(event_id, at, value)
            return
        # min/max/first/last cannot subtract (remove says False): harmless here, because the other side
        # holds the very same contribution, so the combined value does not change.
        self.agg.remove(at, event_id, value)

    def _retract_coalesced(self, event_id: str, at: float, value: Any) -> None:
        """Take a contribution out of its bucket: counts, sums and a value's count exactly; a bucket's min,
        max, first, last, a value's latest time and max_speed's points stay as they were (harmless for the
        same reason as in `remove`: the other side holds the very same contribution).

        The bucket of its cell holds it if it is no older than the bucket's oldest contribution: the
        bucket is still inside the window, so this one was when it came (time only moves on), was added,
        and being no exact entry now, was coalesced."""
        if not self._bucket_count():
            return
        width = self._width()
        start = _cell(at, width)
        entries = self.entries
        index = bisect_left(entries, (start, BUCKET), key=_entry_key)
        while index < len(entries) and entries[index][1] != BUCKET and entries[index][0] < start + width:
            index += 1  # exact entries of the cell older than its bucket (late ones, or not yet coalesced)
        if index == len(entries) or _cell(entries[index][0], width) != start or entries[index][0] > at:
            return  # aged out, came after it aged out, or its bucket left early (the buckets' bytes)
        bucket = _agg_from_doc(self.op, entries[index][2][1])
        if (type(bucket) in (CountAgg, SumAgg) or (type(bucket) is TrueCountAgg and value)) and bucket.n < 1:
            return  # never below nothing
        if type(bucket) is UniqueAgg:
            bucket.take_out(value)
        else:
            bucket.remove(at, event_id, value)
        entries[index] = (entries[index][0], BUCKET, [width, _bucket_doc(bucket)])
        if not self.agg.remove(at, event_id, value):
            self._rebuild()

    def remove_entry(self, event_id: str) -> bool:
        """Take a windowed contribution out by event id (no-op when it already aged out or was coalesced);
        True when it was there."""
        if event_id == BUCKET:
            return False
        for index, entry in enumerate(self.entries or ()):
            if entry[1] == event_id:
                self._encoded = self._raw = None
                del self.entries[index]
                if self._bytes:
                    self._bytes -= _value_bytes(entry[2])
                if not self.agg.remove(*entry):
                    self._rebuild()
                return True
        return False

    def needs_prune(self, now: float) -> bool:
        return bool(self.entries) and self.entries[0][0] + self.window <= now

    def prune(self, now: float) -> bool:
        """Drop entries (and buckets) that aged out by `now`; True when any did."""
        entries = self.entries
        if not entries:
            return False
        window = self.window
        count = 0
        for entry in entries:
            if entry[0] + window > now:
                break
            count += 1
        if not count:
            return False
        self._encoded = self._raw = None
        removed = entries[:count]
        buckets = self._buckets
        if buckets is None:
            buckets = self._bucket_count()  # counted before the removal (a loaded state's first need)
        if buckets:
            self._buckets = buckets - sum(1 for entry in removed if entry[1] == BUCKET)
        del entries[:count]
        size = self._bytes
        if size:
            for entry in removed:  # most often one
                if entry[1] != BUCKET:
                    size -= _value_bytes(entry[2])
            self._bytes = size
        if not entries:
            self.agg = AGGREGATES[self.op]()
            return True
        agg = self.agg
        for entry in removed:
            if buckets and entry[1] == BUCKET:
                subtract = getattr(agg, "subtract", None)
                done = subtract is not None and subtract(_agg_from_doc(self.op, entry[2][1]))
            else:
                done = agg.remove(*entry)
            if not done:
                self._rebuild()
                break
        return True

    def _rebuild(self) -> None:
        self._encoded = self._raw = None
        op = self.op
        agg = self.agg = AGGREGATES[op]()
        for entry in self.entries:
            if entry[1] == BUCKET:
                agg.combine(_agg_from_doc(op, entry[2][1]))
            else:
                agg.add(*entry)

    def summary(self, now: float | None) -> Any:
        """The aggregate as of `now` without changing this state (a view must not mutate the profile)."""
        if now is None or self.window is None or not self.needs_prune(now):
            return self.agg
        pruned = self.copy()
        pruned.prune(now)
        return pruned.agg

    def expires_at(self) -> float | None:
        return self.entries[0][0] + self.window if self.entries else None

    def copy(self) -> ComputedState:
        entries = list(self.entries) if self.entries is not None else None
        state = ComputedState(self.op, self.window, self.signature, self.agg.copy(), entries)
        state._buckets, state._bytes = self._buckets, self._bytes  # buckets are replaced, never changed in place
        return state

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"op": self.op, "window": self.window, "sig": self.signature, "agg": self.agg.to_doc()}
        if self.entries is not None:
            # (at, event_id, value) tuples, copied as a list: JSON writes a tuple as an array, and
            # `from_doc` takes either (a list each was made of every entry on every write of the state).
            doc["entries"] = list(self.entries)
        return doc

    def encoded(self) -> orjson.Fragment:
        """`to_doc()` as JSON, for a writer that embeds it (orjson): made once per change of the state."""
        encoded = self._encoded
        if encoded is None:
            raw = self._data = self._encode()
            # Measured when asked (`stored_bytes`): only a record past COMPUTED_MAX_BYTES / 2 asks, and two
            # passes over every state an event changed, for every write, were 1 % of the service's CPU.
            self._size = -1
            encoded = self._encoded = orjson.Fragment(raw)
        return encoded

    def stored_bytes(self) -> int:
        """What the state's encoding takes in the store's document, where the profile's JSON is a string:
        each quote and backslash of it is escaped (`stored_size`)."""
        if self._encoded is None:
            self.encoded()
        size = self._size
        if size < 0:
            size = self._size = stored_size(self._data)
        return size

    def shrink(self, cap: int) -> bool:
        """Coarsen the state until its stored form takes at most about `cap` bytes, or as near as it can
        come; True when it changed. The record's bound (`Profile`, "A record within the store's limit")
        asks the largest states of a record past COMPUTED_MAX_BYTES for it, in this order of loss:

        - a windowed state coalesces every exact entry but the newest into its buckets (`compact`), and
          keeps to fewer exact entries from then on; past `cap` still, the buckets of distinct values keep
          a share of their rows (the most frequent; unique: the latest), and then any buckets widen up to
          window / COARSEST_BUCKETS and the oldest leave early, as past WINDOW_BUCKET_BYTES;
        - an all-time most_frequent or unique_count keeps its most frequent values (unique_count then
          reads *at least*, as past MAX_DISTINCT_VALUES), a unique those seen last, a max_speed its newest
          points (the pairs dropped kept as its floor, as past MAX_SPEED_POINTS).

        The other all-time summaries are a few numbers or one value: nothing to take."""
        size = self.stored_bytes()
        if size <= cap:
            return False
        if self.entries is not None:
            self._shrink_window(cap, size)
            return self.stored_bytes() < size
        agg = self.agg
        room = max(0, cap - (size - stored_size(orjson.dumps(agg.to_doc()))))
        if type(agg) is ValuesAgg:
            counts, values = agg.counts, agg.values
            order = sorted(counts, key=lambda k: (-counts[k], sort_key(values[k])))
            kept = _fitting([[values[key], counts[key]] for key in order], room)
            for key in order[kept:]:
                del counts[key], values[key]
                agg.chars -= _chars(key)
            agg.refused = True
            agg._best = None
        elif type(agg) is UniqueAgg:
            at, ids, values, counts = agg.at, agg.ids, agg.values, agg.counts
            order = sorted(counts, key=lambda k: (at[k] is not None, at[k] or 0.0, ids[k]), reverse=True)
            kept = _fitting([[values[key], counts[key], at[key], ids[key]] for key in order], room)
            agg._forget(kept)
        elif type(agg) is MaxSpeedAgg:
            kept = _fitting(list(reversed(agg.points)), room)
            excess = len(agg.points) - kept
            if excess > 0 and len(agg.points) > 1:
                points = agg.points
                for index in range(min(excess, len(points) - 1)):
                    agg.retired = _max(agg.retired, speed_kmh(points[index], points[index + 1]))
                del points[: min(excess, len(points) - 1)]
                agg._best = MISSING
        else:
            return False
        self._encoded = self._raw = None
        return self.stored_bytes() < size

    def compact(self) -> bool:
        """A windowed state's exact entries but the newest into their buckets (and max_speed's summary down
        to the buckets' points): the value stays exact until something leaves the window, so this loses
        nothing yet. The record's bound asks for it before any `shrink`; True when it took less after."""
        entries = self.entries
        if entries is None or len(entries) - self._bucket_count() <= 1:
            return False
        size = self.stored_bytes()
        self._coalesce(keep_n=1, keep_bytes=0)
        if self.op == "max_speed":
            self._rebuild()  # the buckets keep their first and last points, and the speed between
        return self.stored_bytes() < size

    def cleared(self) -> ComputedState:
        """The state without a contribution (the record's last resort: `Profile.fit_computed`)."""
        return ComputedState(self.op, self.window, self.signature)

    def _shrink_window(self, cap: int, size: int) -> None:
        """`shrink` of a windowed state: every exact entry but the newest into the buckets, then narrower
        bounds for the buckets and the exact entries to come."""
        entries = self.entries
        exact = [entry for entry in entries if entry[1] != BUCKET]
        per_entry = stored_size(orjson.dumps(exact)) // max(1, len(exact))
        if self.compact():
            size = self.stored_bytes()
        if size > cap and self.op in _VALUE_OPS:
            # A bucket of distinct values may hold every contribution (a burst inside one cell): its rows
            # thin out instead, the least frequent (unique: least recent) first, and the summary, which
            # holds what the buckets do, with them: half of what is left for each.
            buckets = [entry for entry in self.entries if entry[1] == BUCKET]
            held = stored_size(orjson.dumps(buckets))
            self._thin_values(held, max(0, (cap - (size - held)) // 2))
            size = self.stored_bytes()
        if size > cap:
            buckets = [entry for entry in self.entries if entry[1] == BUCKET]
            held = stored_size(orjson.dumps(buckets))
            share = 2 if self.op in _VALUE_OPS else 1
            self._bucket_budget = max(0, (cap - (size - held)) // share)
            self._coalesce(keep_n=1, keep_bytes=0, widen=True)
            size = self.stored_bytes()
        # From here on the state coalesces when its exact entries would take what is left of `cap`.
        self._limit = max(2, min(MAX_WINDOW_ENTRIES, (cap - size) // max(1, per_entry)))

    def _thin_values(self, held: int, room: int) -> None:
        """Keep the same share of every bucket's rows (of distinct values) so that they take about `room`
        of the `held` bytes; what goes leaves the summary too (its contributions left early)."""
        if held <= room:
            return
        share = room / held
        op, entries, agg = self.op, self.entries, self.agg
        rebuild = False
        for index, (at, event_id, bucket) in enumerate(entries):
            if event_id != BUCKET:
                continue
            width, doc = bucket
            if op == "unique":  # [value, count, at, id]: the latest first (rows without a time last)
                rows = sorted(doc, key=lambda row: (len(row) >= 4, row[2] if len(row) >= 4 else 0.0), reverse=True)
            else:  # [value, count]: the most frequent first
                rows = sorted(doc, key=lambda row: row[1], reverse=True)
            keep = int(len(rows) * share)
            if keep >= len(rows):
                continue
            entries[index] = (at, BUCKET, [width, rows[:keep]])
            if not rebuild and not agg.subtract(_agg_from_doc(op, rows[keep:])):
                rebuild = True
        self._encoded = self._raw = None
        if rebuild:
            self._rebuild()

    def _encode(self) -> bytes:
        # The same bytes as `to_doc()`'s, written in parts: the head (op, window, sig) made once per
        # definition, then the aggregate, then the entries ("entries" is the last key). Joined into bytes of
        # their own: the bytes orjson returns keep its whole output buffer (4 KiB at least), and profiles hold
        # thousands of these.
        key = (self.op, self.window, self.signature, type(self.window))  # 30 and 30.0 are written apart
        head = _HEADS.get(key)
        if head is None:
            head = _HEADS[key] = orjson.dumps(
                {"op": self.op, "window": self.window, "sig": self.signature, "agg": None}
            )[:-5]  # without 'null}'
        agg = orjson.dumps(self.agg.to_doc())
        entries = self.entries
        if entries is None:
            raw = b"".join((head, agg, b"}"))
        elif len(entries) < _KEPT_ENTRIES_MIN:
            self._raw = None
            raw = b"".join((head, agg, b',"entries":', orjson.dumps(entries), b"}"))
        else:
            # The entries array kept (`_raw`) for the next encoding after entries added at the end.
            raw, done, total = self._raw, self._raw_n, len(entries)
            if raw is None or not _KEPT_ENTRIES_MIN <= done <= total:
                parts = (head, agg, b',"entries":', orjson.dumps(entries), b"}")
            elif done == total:
                parts = (head, agg, memoryview(raw)[self._raw_at - 11 : -1], b"}")
            else:
                # The kept array without its "]", then the entries added since without their "[".
                added = memoryview(orjson.dumps(entries[done:]))[1:]
                parts = (head, agg, memoryview(raw)[self._raw_at - 11 : -2], b",", added, b"}")
            raw = self._raw = b"".join(parts)
            self._raw_at, self._raw_n = len(head) + len(agg) + 11, total  # the array starts after ',"entries":'
        return raw

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> ComputedState:
        entries = [tuple(entry) for entry in doc["entries"]] if "entries" in doc else None
        return cls(doc["op"], doc["window"], doc["sig"], _agg_from_doc(doc["op"], doc["agg"]), entries)


def stored_size(data: bytes) -> int:
    """The length of `data` (JSON) once written as a JSON string: the profile record keeps its JSON as one
    string (records.py), in which every quote and backslash takes two bytes."""
    return len(data) + data.count(b'"') + data.count(b"\\")


def _fitting(rows: list[Any], room: int) -> int:
    """How many of `rows` (as stored in an array) fit in `room` bytes, from the first."""
    used = 0
    for index, row in enumerate(rows):
        used += stored_size(orjson.dumps(row)) + 1
        if used > room:
            return index
    return len(rows)


def combined_result(op: str, aggs: Iterable[Any]) -> Any:
    """The value over several parts' summaries of one trait (a merged profile)."""
    total = None
    for agg in aggs:
        if total is None:
            total = agg.copy()
        else:
            total.combine(agg)
    return None if total is None else total.result(op)
