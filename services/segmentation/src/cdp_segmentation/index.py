"""Which live segments a change of a profile field can move: the field index.

Built once per change of the live segments (`FieldIndex(serving)`), read on every profile change. For
a set of changed fields it gives the segments to evaluate, dependencies first, each with whether it
reads one of the fields itself (else it only refers to a segment that does, and is evaluated only if
that one flips). `TIME` is the pseudo-field time-dependent segments read (the timers' segments).

A comparison of one field with another (`traits.last_order_total > traits.avg_order_total`, `traits.country
in traits.allowed_countries`) reads both fields, so a change of either evaluates it; it is never a
threshold. So does a comparison with arithmetic (`traits.ltv > 2 * traits.avg_order`): it reads every field
on either side. Nor is a comparison with a population percentile: the percentile index (`percentiles`) says,
per percentile, which segments compare which field with it, so that when the percentile moves only the
persons whose value lies between its old and new value are evaluated again (percentiles.py). A percentile
inside arithmetic (`scores.clv >= percentile(scores.clv, 90) / 2`) has no such range: its segments are in
`percentile_everyone`, evaluated again for every person when it moves.

The threshold index: several segments comparing one field with one number (`computed.orders_90d >= 3`,
`>= 5`, `>= 10`) are not evaluated on every change of the field but only those whose number lies in the
range the field moved over (`crossed`); the others give the same outcome for the old and the new value.

The equality index: several segments comparing one field with text (`traits.country = "DE"`, `traits.plan
in ["pro", "team"]`, one per country or plan: a customer's hundreds of them) are evaluated on a change of
the field only when the old or the new value is one of their words; for every other value each of them is
false before and after. Without it a change of `traits.country` evaluated every such segment: 544 of 3,000
segments, 4 times the cost of a change read by one.

The window index: several segments comparing one field with `now` and an offset (`traits.last_seen_at <
now - 12d`, one per inactivity window) are evaluated on a change of the field only when `now + offset`
lies in the range it moved over (`crossed`). Every other one holds for the new value, at this instant,
what it holds for the old one, which is its membership: a batch fires the partition's due timers before
its changes, so every flip up to now is in. The person's timer is set again from the new value whether or
not one was crossed (evaluation.py). A change of last_seen_at (every event's) evaluated all 200 windows of
1,000 segments: 80-110 µs, now 17-19. The windows crossed are decided, not evaluated (`crossed` with
`decided`): each one's whole definition is `field op now + offset`, so its outcome is the field's new time
against `now + offset` (`epoch`, as the predicate reads it), one comparison.

What a person first seen needs (`first_seen`): such a person is evaluated against the segments reading one
of their fields, those an empty profile is in, and those referring to either; but a segment that can hold
only when a field holds one of a few words (`traits.plan in ["p2", "q2"] and traits.age > 40`: one per plan;
`traits.city = "X3" or traits.tier = "T8"`; `requirement`) is a candidate only for a person holding one of
them, found by field and word. With 3,000 segments, 600 of them one per plan and age, a visitor with a plan
and an age evaluated the 600, of which one could hold.

The time flips (`flips`): a person's timer is the earliest instant one of their time comparisons flips
(evaluation.py, `_schedule`, after every evaluation of a time-based segment). That instant depends on the
comparison alone (`traits.last_seen_at < now - 30d` flips at last_seen_at + 30d), not on the rest of the
definition, so it is taken over the distinct comparisons, not the segments (hundreds of segments share a
few recency windows), and per field from the one window whose flip comes next (a bisection over the sorted
offsets): with 200 segments on `traits.last_seen_at`, one window each, scheduling was three quarters of
what a change of it cost.

Plain data, no I/O: never changed in place. A create going live grows a new index from the last one
(`grown`: only what the created segment reads is built again, the rest shared, and it takes the place
building whole gives it in the order); anything else builds it whole. Built whole at every create, it cost
about 10 µs per live segment: 30 ms of the 3,000th create.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Mapping

from cdp_lang.percentiles import PercentileSpec
from cdp_lang.row import flip_time
from cdp_segmentation.catalogue import Segment
from cdp_segmentation.domain import CompiledSegment, check_segment_graph
from cdp_segmentation.domain.plan import (
    COMPARE,
    AllOf,
    AnyOf,
    NumberTest,
    OneOf,
    Plan,
    Test,
    TimeTest,
    expression_tests,
    moving_tests,
    percentile_tests,
    percentiles_of,
)
from cdp_segmentation.domain.values import epoch, number

TIME = "$time"  # the pseudo-field every time-dependent segment reads

# (segment, whether it reads a changed field itself): what an evaluation walks, dependencies first
Affected = tuple[tuple[Segment, bool], ...]


class FieldIndex:
    def __init__(self, serving: Iterable[Segment] = ()) -> None:
        serving = {s.id: s for s in serving}
        self.serving = serving
        # each segment's definition as indexed: `grown` tells an added segment from a changed one by it
        self._compiled = {segment_id: segment.compiled for segment_id, segment in serving.items()}
        order = check_segment_graph({s.id: s.compiled.segments & serving.keys() for s in serving.values()})
        self.order: list[str] = order  # live segment ids, dependencies first
        position = {segment_id: i for i, segment_id in enumerate(order)}
        self._position = position
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
        # field -> live segments to evaluate, in order (those reading it and those referring to them)
        self.readers: dict[str, tuple[Segment, ...]] = {name: closure(ids) for name, ids in direct.items()}
        self.direct = direct
        by_field: dict[str, list[tuple[float, str]]] = {}
        for segment in serving.values():
            found = threshold(segment.compiled)
            if found is not None:
                by_field.setdefault(found[0], []).append((found[1], segment.id))
        # field -> (sorted thresholds, their segments): segments comparing one field with one number,
        # where a change can move only those whose threshold it crosses
        self._by_threshold = by_field
        self.thresholds: dict[str, tuple[list[float], list[tuple[Segment, bool]]]] = {
            name: _threshold_index(items, serving) for name, items in by_field.items() if len(items) > 1
        }
        by_words: dict[str, list[tuple[frozenset[str], str]]] = {}
        for segment in serving.values():
            found_words = equality(segment.compiled)
            if found_words is not None:
                by_words.setdefault(found_words[0], []).append((found_words[1], segment.id))
        # field -> word -> its segments (`= "word"`, `in [... "word" ...]`): a change can move only those
        # holding its old or its new value
        self._by_words = by_words
        self.equalities: dict[str, dict[str, tuple[tuple[Segment, bool], ...]]] = {
            name: _equality_index(items, serving, position) for name, items in by_words.items() if len(items) > 1
        }
        by_window: dict[str, list[tuple[float, str, Segment]]] = {}
        for segment in serving.values():
            found_window = window(segment.compiled)
            if found_window is not None:
                by_window.setdefault(found_window[0], []).append((found_window[1], segment.id, segment))
        # field -> (offsets ascending, their segments): segments comparing one field with `now` and an offset
        # (`traits.last_seen_at < now - 30d`, one per window), where a change can move only those whose
        # `now + offset` lies in the range the field moved over: the others had the same outcome at `now` for
        # the old value, which is their membership (their flips up to `now` fired as timers first: a batch
        # fires the partition's due timers before its changes), as for the new one
        self._by_window = by_window
        self.windows: dict[str, tuple[list[float], list[tuple[Segment, bool]]]] = {
            name: _window_index(items) for name, items in by_window.items() if len(items) > 1
        }
        # field -> each window segment's comparison (`<`, `>=`...), in the order of `windows`
        self._window_tests = {name: _window_tests(segments) for name, (_, segments) in self.windows.items()}
        self.indexed: dict[str, frozenset[str]] = {}
        for name in {*self.thresholds, *self.windows, *self.equalities}:
            self.indexed[name] = self._indexed_of(name)
        # percentile key -> its spec, and the segments comparing a field (and sub-path) with it
        self.percentiles: dict[str, PercentileSpec] = {}
        self.percentile_readers: dict[str, list[tuple[Segment, str, tuple[str, ...]]]] = {}
        for segment in serving.values():
            for test in percentile_tests(segment.compiled.plan):
                self.percentiles[test.key] = PercentileSpec(test.key, test.source, test.source_sub, test.percent)
                self.percentile_readers.setdefault(test.key, []).append((segment, test.field, test.sub))
        # percentile key -> the segments comparing arithmetic with it: every person is evaluated again when it
        # moves (the compared value is no one field that a range of values could narrow down)
        self.percentile_everyone: dict[str, list[Segment]] = {}
        for segment in serving.values():
            for expression in expression_tests(segment.compiled.plan):
                for found in (*percentiles_of(expression.left), *percentiles_of(expression.right)):
                    self.percentiles[found.key] = PercentileSpec(
                        found.key, found.source, found.source_sub, found.percent
                    )
                    readers = self.percentile_everyone.setdefault(found.key, [])
                    if not readers or readers[-1] is not segment:  # once per segment
                        readers.append(segment)
        # the fields whose change can move a percentile
        self.percentile_sources = frozenset(spec.field for spec in self.percentiles.values())
        self._affected_cache: dict[frozenset[str], Affected] = {}
        self.time_segments: Affected = self.affected(frozenset({TIME})) if TIME in direct else ()
        self.flips = TimeFlips(segment for segment, _ in self.time_segments if segment.timed)
        self.all: Affected = tuple((serving[s], True) for s in order)
        # The segments an empty profile is in (`not traits.email exists`, `computed.orders < 1` of a counted
        # trait, `not in_segment(...)` of one), found as a first evaluation finds them, dependencies first;
        # with those referring to them, what a person first seen is evaluated against besides the readers
        # of their fields (`first_seen`). Missing fields make every comparison false whatever the time; not
        # whatever the population: `percentile(scores.a, 90) > 5` reads no field of the person, and holds
        # for an empty profile once the percentile passes 5, so a segment comparing with a percentile is
        # always evaluated.
        on_empty: set[str] = set()
        for segment_id in order:
            if serving[segment_id].predicate({}, on_empty, 0.0):
                on_empty.add(segment_id)
        self.on_empty = frozenset(on_empty)
        moving = {segment.id for segment in serving.values() if segment.compiled.percentiles}
        self._from_empty = frozenset(s.id for s in closure(on_empty | moving))
        # What a segment needs to hold for a person first seen (`requirement`): a segment that can hold only
        # when one of a few fields holds one of a few words (`traits.plan in ["pro", "team"] and traits.age >
        # 40`, `traits.city = "X3" or traits.tier = "T8"`) is a candidate only for a person whose value is one
        # of them, found by field and word; the other readers of a field, for anyone with it.
        self._dependents = dependents
        needs: dict[str, dict[str, set[str]]] = {}
        needing: set[str] = set()
        for segment in serving.values():
            found_needs = requirement(segment.compiled.plan)
            if found_needs is None:
                continue
            needing.add(segment.id)
            for name, values in found_needs:
                by_word = needs.setdefault(name, {})
                for word in values:
                    by_word.setdefault(word, set()).add(segment.id)
        self._needs = needs
        self._needing = needing
        # field -> the segments reading it that need nothing of a word: a candidate for anyone with the field
        self._unconditional = {name: frozenset(ids - needing) for name, ids in direct.items() if name != TIME}

    def _indexed_of(self, name: str) -> frozenset[str]:
        """The segments on `name` the threshold, window and word indexes evaluate (`crossed`), not `affected`."""
        ids: set[str] = set()
        if name in self.thresholds:
            ids.update(s.id for s, _ in self.thresholds[name][1])
        if name in self.windows:
            ids.update(s.id for s, _ in self.windows[name][1])
        if name in self.equalities:
            ids.update(s.id for segments in self.equalities[name].values() for s, _ in segments)
        return frozenset(ids)

    def grown(self, serving: Iterable[Segment]) -> FieldIndex | None:
        """The index of `serving` built from this one, when `serving` is this index's segments with the same
        definitions and one more (a create going live) that refers to no segment, that no segment refers to,
        and that compares with no percentile: only what the added segment reads is built again, so creating
        the 3,000th segment does not index the other 2,999 (about 10 µs each). None otherwise (an update, a
        deletion, a reference either way, a percentile): build `FieldIndex(serving)`. Nothing of this index
        is changed (a replay may still read it): what the new one changes is copied first."""
        serving = list(serving)
        if len(serving) != len(self.serving) + 1:
            return None
        compiled_of = self._compiled
        added: Segment | None = None
        for segment in serving:
            if compiled_of.get(segment.id) is not segment.compiled:
                if added is not None or segment.id in compiled_of:
                    return None
                added = segment
        if added is None:
            return None
        compiled = added.compiled
        if compiled.segments or compiled.percentiles or added.id in self._dependents:
            return None
        added_id = added.id
        new = object.__new__(FieldIndex)
        new.serving = {**self.serving, added_id: added}
        new._compiled = {**compiled_of, added_id: compiled}
        # Where building whole puts it (`check_segment_graph`: each id in order, after what it refers to),
        # since the order is that of a change's transitions, and so of its messages' ids: a replica or a
        # restart that built the index whole must publish the same messages. Referring to none, referred to
        # by none, it comes right after the last segment an id before its own brought in.
        position = self._position
        at = max((p for segment_id, p in position.items() if segment_id < added_id), default=-1) + 1
        new.order = [*self.order[:at], added_id, *self.order[at:]]
        new._position = {
            **position,
            **{segment_id: p + 1 for segment_id, p in position.items() if p >= at},
            added_id: at,
        }
        new._dependents = self._dependents
        place = new._position.__getitem__

        def inserted(ordered: tuple, item: object, key: Callable[[object], int]) -> tuple:
            """`item` into a tuple in dependency order (the others keep theirs: it moves none of them)."""
            i = bisect.bisect_left(ordered, at, key=key)
            return (*ordered[:i], item, *ordered[i:])

        by_id: Callable[[object], int] = lambda segment: place(segment.id)  # noqa: E731
        by_pair: Callable[[object], int] = lambda pair: place(pair[0].id)  # noqa: E731
        names = set(compiled.fields) | ({TIME} if compiled.time_dependent else set())
        new.direct = dict(self.direct)
        new.readers = dict(self.readers)
        for name in names:
            new.direct[name] = self.direct.get(name, set()) | {added_id}
            new.readers[name] = inserted(self.readers.get(name, ()), added, by_id)
        touched: set[str] = set()
        new._by_threshold, new.thresholds = self._by_threshold, self.thresholds
        found = threshold(compiled)
        if found is not None:
            name, value = found
            items = [*self._by_threshold.get(name, ()), (value, added_id)]
            new._by_threshold = {**self._by_threshold, name: items}
            if len(items) > 1:
                new.thresholds = {**self.thresholds, name: _threshold_index(items, new.serving)}
                touched.add(name)
        new._by_window, new.windows, new._window_tests = self._by_window, self.windows, self._window_tests
        found_window = window(compiled)
        if found_window is not None:
            name, offset = found_window
            items_w = [*self._by_window.get(name, ()), (offset, added_id, added)]
            new._by_window = {**self._by_window, name: items_w}
            if len(items_w) > 1:
                new.windows = {**self.windows, name: _window_index(items_w)}
                new._window_tests = {**self._window_tests, name: _window_tests(new.windows[name][1])}
                touched.add(name)
        new._by_words, new.equalities = self._by_words, self.equalities
        found_words = equality(compiled)
        if found_words is not None:
            name, values = found_words
            items_e = [*self._by_words.get(name, ()), (values, added_id)]
            new._by_words = {**self._by_words, name: items_e}
            if len(items_e) > 2:  # into its words' segments, in order
                words = dict(self.equalities[name])
                for word in values:
                    words[word] = inserted(words.get(word, ()), (added, True), by_pair)
                new.equalities = {**self.equalities, name: words}
                touched.add(name)
            elif len(items_e) == 2:
                new.equalities = {**self.equalities, name: _equality_index(items_e, new.serving, new._position)}
                touched.add(name)
        new.indexed = self.indexed
        if touched:
            new.indexed = dict(self.indexed)
            for name in touched:
                new.indexed[name] = new._indexed_of(name)
        new.percentiles = self.percentiles
        new.percentile_readers = self.percentile_readers
        new.percentile_everyone = self.percentile_everyone
        new.percentile_sources = self.percentile_sources
        new._affected_cache = {}
        if compiled.time_dependent:
            new.time_segments = inserted(self.time_segments, (added, True), by_pair)
            new.flips = self.flips.adding(added) if added.timed else self.flips
        else:
            new.time_segments, new.flips = self.time_segments, self.flips
        new.all = (*self.all[:at], (added, True), *self.all[at:])
        new.on_empty, new._from_empty = self.on_empty, self._from_empty
        if added.predicate({}, self.on_empty, 0.0):
            new.on_empty = self.on_empty | {added_id}
            new._from_empty = self._from_empty | {added_id}
        found_needs = requirement(compiled.plan)
        new._needs, new._needing = self._needs, self._needing
        new._unconditional = dict(self._unconditional)
        if found_needs is not None:
            new._needing = self._needing | {added_id}
            new._needs = dict(self._needs)
            for name, values in found_needs:
                by_word = new._needs[name] = dict(self._needs.get(name, {}))
                for word in values:
                    by_word[word] = by_word.get(word, set()) | {added_id}
        for name in names - {TIME}:
            unconditional = self._unconditional.get(name, frozenset())
            new._unconditional[name] = unconditional if found_needs is not None else unconditional | {added_id}
        return new

    def affected(self, changed: frozenset[str]) -> Affected:
        """The segments a change of these fields can move, dependencies first, each with whether it reads
        one of them itself (else it only refers to one that does: evaluated only if that one flips).
        Threshold-indexed segments are left to `crossed`."""
        found = self._affected_cache.get(changed)
        if found is None:
            union: dict[str, Segment] = {}
            direct: set[str] = set()
            indexed: set[str] = set()
            for name in changed:
                for segment in self.readers.get(name, ()):
                    union[segment.id] = segment
                direct |= self.direct.get(name, set())
                indexed |= self.indexed.get(name, frozenset())
            for segment_id in indexed:  # evaluated through the threshold index (`crossed`)
                union.pop(segment_id, None)
            position = self._position
            ordered = sorted(union.values(), key=lambda s: position[s.id])
            found = tuple((segment, segment.id in direct) for segment in ordered)
            if len(self._affected_cache) > 10_000:
                self._affected_cache.clear()
            self._affected_cache[changed] = found
        return found

    def first_seen(self, fields: Mapping[str, object]) -> Affected:
        """What a person first seen with these fields (path -> value) is evaluated against, dependencies
        first: the segments reading one of the fields, less those needing a word of a field (`requirement`)
        the person does not hold, with those needing one they hold, those an empty profile is in, and the
        segments referring to any of them. Every other segment either reads only fields the person lacks
        and refers only to segments the person is not in (were they in one, it would be among these), so it
        holds for them what it holds for an empty profile: false; or needs a word the person does not hold:
        false too. With 3,000 segments a visitor's first change evaluated all of them, then the 600 reading
        one of their two fields, of which one could hold."""
        found = set(self._from_empty)
        unconditional = self._unconditional
        needs = self._needs
        for name, value in fields.items():
            readers = unconditional.get(name)
            if readers:
                found |= readers
            if needs and isinstance(value, str):
                by_word = needs.get(name)
                if by_word is not None:
                    needing = by_word.get(value)
                    if needing:
                        found |= needing
        dependents = self._dependents
        if dependents:
            stack = [segment_id for segment_id in found if segment_id in dependents]
            while stack:
                for referring in dependents.get(stack.pop(), ()):
                    if referring not in found:
                        found.add(referring)
                        stack.append(referring)
        if len(found) == len(self.order):
            return self.all
        position = self._position
        return tuple((self.serving[s], True) for s in sorted(found, key=position.__getitem__))

    def crossed(
        self,
        changed: Mapping[str, object],
        fields: Mapping[str, object],
        now: float = 0.0,
        decided: list[tuple[Segment, bool]] | None = None,
    ) -> list[tuple[Segment, bool]]:
        """Of the threshold segments (one field compared with one number) on the changed fields (path ->
        value before), those whose number lies in the range the field moved over, and of the equality
        segments (one field compared with words), those holding the old or the new value: the others give
        the same outcome for the old and the new value, so their membership, equal to that outcome since
        their last evaluation, stays.

        Of the window segments, those whose `now + offset` lies in the range the field moved over (every one
        when the field held no time before or after); with `decided`, those are not returned but put in
        `decided` with their outcome for the new value, `epoch(value) op now + offset` as their predicate
        computes it (the whole definition is that comparison; no time: false): no evaluation needed."""
        crossed: list[tuple[Segment, bool]] = []
        equalities = self.equalities
        windows = self.windows
        for path, old in changed.items():
            indexed_windows = windows.get(path)
            if indexed_windows is not None:
                offsets, segments = indexed_windows
                before, after = epoch(old), epoch(fields.get(path))
                if before is None or after is None:
                    # Appeared, vanished or no time: every one of them, decided from the new time (none: false).
                    if decided is None:
                        crossed.extend(segments)
                    elif after is None:
                        decided.extend((segment, False) for segment, _ in segments)
                    else:
                        tests = self._window_tests[path]
                        decided.extend(
                            (segments[i][0], tests[i](after, now + offsets[i])) for i in range(len(segments))
                        )
                else:
                    low, high = (before, after) if before <= after else (after, before)
                    # `now + offset` as the predicate computes it (float addition keeps the order).
                    start = bisect.bisect_left(offsets, low, key=lambda offset: now + offset)
                    end = bisect.bisect_right(offsets, high, key=lambda offset: now + offset)
                    if decided is None:
                        crossed.extend(segments[start:end])
                    else:
                        tests = self._window_tests[path]
                        for i in range(start, end):
                            decided.append((segments[i][0], tests[i](after, now + offsets[i])))
            words = equalities.get(path)
            if words is not None:
                new = fields.get(path)
                # A value that is no text is outside every one of them (`=` and `in` with words hold only
                # for text), so only a word the field left or took can have moved one.
                before = words.get(old, ()) if isinstance(old, str) else ()
                after = words.get(new, ()) if isinstance(new, str) and new != old else ()
                if before and after:
                    seen = {s.id for s, _ in before}
                    crossed.extend(before)
                    crossed.extend(item for item in after if item[0].id not in seen)  # `in` holding both
                else:
                    crossed.extend(before or after)
            index = self.thresholds.get(path)
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

    def readers_of_all(self, segments: Iterable[Segment]) -> Affected:
        """These segments and every live segment referring to one of them, dependencies first."""
        found = {s.id for s in segments}
        for segment_id in self.order:
            if self.serving[segment_id].compiled.segments & found:
                found.add(segment_id)
        return tuple((self.serving[s], True) for s in self.order if s in found)

    def readers_of(self, segment: Segment) -> Affected:
        """The segment and every live segment referring to it, dependencies first (all evaluated)."""
        found: dict[str, Segment] = {segment.id: segment}
        for segment_id in self.order:
            candidate = self.serving[segment_id]
            if candidate.compiled.segments & found.keys():
                found[segment_id] = candidate
        return tuple((s, True) for s in found.values())


class TimeFlips:
    """The distinct comparisons of a field with `now` the live time-based segments make, by field (and
    sub-path), sorted by offset: `next_flip` is the earliest instant one of them flips for a person, what the
    minimum of every segment's `next_change` is, found from the few comparisons whose flip can come first."""

    def __init__(self, segments: Iterable[Segment] = ()) -> None:
        distinct: dict[TimeTest, None] = {}
        for segment in segments:
            for test in moving_tests(segment.compiled.plan):
                distinct[test] = None
        groups: dict[tuple[str, tuple[str, ...]], list[TimeTest]] = {}
        for test in distinct:
            groups.setdefault((test.field, test.sub), []).append(test)
        self._distinct = distinct
        self.tests = len(distinct)
        # (field, sub-path, the offsets ascending, their comparisons in that order)
        self.groups: list[tuple[str, tuple[str, ...], list[float], list[TimeTest]]] = [
            _flip_group(name, sub, tests) for (name, sub), tests in groups.items()
        ]

    def adding(self, segment: Segment) -> TimeFlips:
        """These comparisons with the added segment's: its fields' groups built again, the others shared."""
        tests = [test for test in moving_tests(segment.compiled.plan) if test not in self._distinct]
        if not tests:
            return self
        new = object.__new__(TimeFlips)
        new._distinct = {**self._distinct, **dict.fromkeys(tests)}
        new.tests = len(new._distinct)
        keys = {(test.field, test.sub) for test in tests}
        kept = [group for group in self.groups if (group[0], group[1]) not in keys]
        grouped: dict[tuple[str, tuple[str, ...]], list[TimeTest]] = {key: [] for key in keys}
        for test in new._distinct:
            key = (test.field, test.sub)
            if key in grouped:
                grouped[key].append(test)
        new.groups = kept + [_flip_group(name, sub, group) for (name, sub), group in grouped.items()]
        return new

    def next_flip(self, fields: Mapping[str, object], now: float) -> float | None:
        """The earliest instant after `now` one of the comparisons flips for a person with these fields.

        `field op now + offset` flips once, at about `field - offset`, and only when that is after `now`
        (`flip_time`): so only the comparisons with an offset below about `field - now` flip at all, and
        of those the one with the largest offset first. They are tried from there down, each with
        `flip_time` itself (exact to the float), while one could still come first: `margin` covers the few
        ulps its bisection may place a flip from `field - offset`."""
        best = math.inf
        for name, sub, offsets, tests in self.groups:
            value: object = fields.get(name)
            for key in sub:
                value = value.get(key) if isinstance(value, dict) else None
            seconds = epoch(value)
            if seconds is None:
                continue
            margin = 1e-3 + abs(seconds) * 2.0**-40
            i = bisect.bisect_right(offsets, seconds - now + margin)
            while i:
                i -= 1
                if seconds - offsets[i] > best + margin:
                    break  # this one and every one below it flip later than one found
                found = flip_time(tests[i], fields, now)
                if found is not None and found < best:
                    best = found
        return None if best == math.inf else best


def window(compiled: CompiledSegment) -> tuple[str, float] | None:
    """(field, offset) when the whole definition compares a top-level field with `now` and an offset."""
    plan = compiled.plan
    if isinstance(plan, TimeTest) and not plan.sub and plan.offset is not None and plan.op in ("<", "<=", ">", ">="):
        return plan.field, plan.offset
    return None


def _flip_group(
    name: str, sub: tuple[str, ...], tests: list[TimeTest]
) -> tuple[str, tuple[str, ...], list[float], list[TimeTest]]:
    """One field's comparisons with `now`, sorted by offset, with the offsets (`TimeFlips.groups`)."""
    offset = {test: float(test.offset or 0.0) for test in tests}  # (a moving test has one)
    tests = sorted(tests, key=offset.__getitem__)
    return (name, sub, [offset[test] for test in tests], tests)


def _threshold_index(
    items: list[tuple[float, str]], serving: Mapping[str, Segment]
) -> tuple[list[float], list[tuple[Segment, bool]]]:
    """A field's thresholds ascending, and their segments in that order (`FieldIndex.thresholds`)."""
    ordered = sorted(items)
    return [t for t, _ in ordered], [(serving[i], True) for _, i in ordered]


def _window_index(items: list[tuple[float, str, Segment]]) -> tuple[list[float], list[tuple[Segment, bool]]]:
    """A field's window offsets ascending, and their segments in that order (`FieldIndex.windows`)."""
    ordered = sorted(items, key=lambda item: item[:2])
    return [o for o, _, _ in ordered], [(segment, True) for _, _, segment in ordered]


def _window_tests(segments: list[tuple[Segment, bool]]) -> list[Callable[[float, float], bool]]:
    """Each window segment's comparison of the field's time with `now + offset` (`window`: its whole plan)."""
    tests = []
    for segment, _ in segments:
        plan = segment.compiled.plan
        assert isinstance(plan, TimeTest)
        tests.append(COMPARE[plan.op])
    return tests


def _equality_index(
    items: list[tuple[frozenset[str], str]], serving: Mapping[str, Segment], position: Mapping[str, int]
) -> dict[str, tuple[tuple[Segment, bool], ...]]:
    """A field's words, each with its segments in dependency order (`FieldIndex.equalities`)."""
    words: dict[str, list[tuple[Segment, bool]]] = {}
    for values, segment_id in sorted(items, key=lambda item: position[item[1]]):
        for word in values:
            words.setdefault(word, []).append((serving[segment_id], True))
    return {word: tuple(segments) for word, segments in words.items()}


def requirement(plan: Plan) -> tuple[tuple[str, frozenset[str]], ...] | None:
    """What the plan needs to hold, as alternatives (field, words): it can hold only for a person whose value
    of one of those top-level fields is text among its words (`=` and `in` with words hold for nothing
    else). None: no such need is found. A conjunction needs what any one of its parts needs (the one with
    the fewest alternatives is kept); a disjunction, one of what each part needs (when each needs one)."""
    if isinstance(plan, Test):
        if plan.sub:
            return None
        literal = plan.literal
        if plan.op == "=" and type(literal) is str:
            return ((plan.field, frozenset((literal,))),)
        if plan.op == "in" and isinstance(literal, OneOf) and not literal.numbers and not literal.bools:
            return ((plan.field, literal.strings),)
        return None
    if isinstance(plan, AllOf):
        best, narrowest = None, (math.inf, math.inf)
        for part in plan.parts:
            found = requirement(part)
            if found is not None:
                width = (len(found), sum(len(words) for _, words in found))
                if width < narrowest:
                    best, narrowest = found, width
        return best
    if isinstance(plan, AnyOf):
        alternatives: list[tuple[str, frozenset[str]]] = []
        for part in plan.parts:
            found = requirement(part)
            if found is None:
                return None
            alternatives.extend(found)
        return tuple(alternatives)
    return None


def equality(compiled: CompiledSegment) -> tuple[str, frozenset[str]] | None:
    """(field, words) when the whole definition holds for a top-level field's text among those words and
    for nothing else (`= "word"`, `in` a list of words only)."""
    plan = compiled.plan
    if not isinstance(plan, Test) or plan.sub:
        return None
    if plan.op == "=" and type(plan.literal) is str:
        return plan.field, frozenset((plan.literal,))
    literal = plan.literal
    if plan.op == "in" and isinstance(literal, OneOf) and not literal.numbers and not literal.bools:
        return plan.field, literal.strings
    return None


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
