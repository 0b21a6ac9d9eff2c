"""A condition on one person, for callers that decide about one person at a time (orchestration).

`compile_condition(text or JSON tree)` gives a `CompiledCondition`; `evaluate(view, now)` answers it for one
`ProfileView`: the person's flat fields (traits, computed traits, consent, scores), the segments they are in
and, optionally, their recent events. `reads` says what the answer depends on, so a caller re-evaluates only
when one of those changes, and `next_change` says when time alone may change it.

Event conditions (`count(...)`, `sum(...)`, `performed(...)`) have two sources, and the view picks one:

- `view.events is None`: the aggregate is read from the computed trait the profile service keeps for it,
  `computed.seg_<hash>` (its definition is in `computed_traits`; segmentation registers the same ones). This
  is the only source that covers a person's whole history.
- `view.events` given: the aggregate is computed here from those events (the caller's own window of them,
  e.g. everything since a journey began), under the profile service's rules: an event matches when its type
  is the predicate's (or that is `any`), its name is one of the names (or none are given) and every `where`
  condition holds on its payload (`properties`; `traits` for identify and group events) or `context`; it
  is inside `within` while `at + within > now`; sum, avg, min and max skip values that are not finite
  numbers; count and sum of nothing are 0, avg, min and max of nothing are no value.

Both sources run the same compiled plan: the events only supply the value of `computed.seg_<hash>`, so a
condition means the same thing whichever source answers it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cdp_kit.errors import InvalidArgument
from cdp_kit.profile_fields import COMPUTED, CONSENT, ROOTS, SCORES, TRAITS, field_key
from cdp_lang.compiler import CompiledSegment, compile_segment, computed_trait, event_test
from cdp_lang.nodes import Aggregate, And, EventPredicate, Node, Not, Or, Performed, percent_text, percentiles_in
from cdp_lang.row import row_predicate
from cdp_lang.text import parse, to_text
from cdp_lang.tree import from_json, to_json
from cdp_lang.values import epoch, number

# identify and group events carry their data in `traits`, the others in `properties` (the profile service's
# "payload"); a condition's `properties.<path>` reads the payload either way.
TRAIT_PAYLOAD_TYPES = frozenset({"identify", "group"})


@dataclass(frozen=True, slots=True)
class Event:
    """One event as conditions read it: `name` is a track event's name, a page or screen name, else ""."""

    type: str
    name: str
    at: float  # epoch seconds
    payload: Mapping[str, Any] = field(default_factory=dict)  # properties (traits for identify and group events)
    context: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The evaluators step into JSON objects, which are dicts; any other mapping is copied into one once
        # here rather than read as "not an object" (no value) by every condition.
        for name in ("payload", "context"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                object.__setattr__(self, name, dict(value))

    @classmethod
    def from_json(cls, event: Mapping[str, Any], field: str = "event") -> Event:
        """An event in Segment's JSON shape (`type`, `event` or `name`, `properties` or `traits`, `context`,
        `timestamp` as ISO-8601 or epoch seconds or milliseconds). InvalidArgument names the bad key."""
        if not isinstance(event, Mapping):
            raise InvalidArgument(field, "must be a JSON object")
        kind = event.get("type", "track")
        if not isinstance(kind, str) or not kind:
            raise InvalidArgument(f"{field}.type", "must be an event type such as track, page or identify")
        at = epoch(event.get("timestamp"))
        if at is None:
            raise InvalidArgument(f"{field}.timestamp", "must be an ISO-8601 time or epoch seconds")
        name = event.get("event") if kind == "track" else event.get("name") if kind in ("page", "screen") else ""
        payload = event.get("traits" if kind in TRAIT_PAYLOAD_TYPES else "properties")
        context = event.get("context")
        return cls(
            type=kind,
            name=name if isinstance(name, str) else "",
            at=at,
            payload=payload if isinstance(payload, Mapping) else {},
            context=context if isinstance(context, Mapping) else {},
        )


@dataclass(frozen=True, slots=True)
class ProfileView:
    """One person as a condition sees them.

    `fields`: flat field keys to plain values ("traits.plan" -> "pro", "consent.purpose:email" -> True), as
    `cdp_kit.profile_fields.profile_fields` reads them from a profile. `segments`: the ids of the segments the
    person is in. `events`: None to read event conditions from computed traits, or the events to compute
    them from (see the module docstring).
    """

    fields: Mapping[str, Any] = field(default_factory=dict)
    segments: Container[str] = frozenset()
    events: Sequence[Event] | None = None

    @classmethod
    def of(
        cls,
        *,
        traits: Mapping[str, Any] | None = None,
        computed: Mapping[str, Any] | None = None,
        consent: Mapping[str, bool] | None = None,
        scores: Mapping[str, float] | None = None,
        segments: Iterable[str] = (),
        events: Iterable[Event] | None = None,
    ) -> ProfileView:
        """A view from the parts of a profile by name: `of(traits={"plan": "pro"}, consent={"purpose:email": True})`."""
        fields: dict[str, Any] = {}
        for root, values in ((TRAITS, traits), (COMPUTED, computed), (CONSENT, consent), (SCORES, scores)):
            for name, value in (values or {}).items():
                fields[field_key(root, name)] = value
        return cls(fields, frozenset(segments), None if events is None else tuple(events))


EventMatcher = Callable[[Event], bool]


@dataclass(frozen=True, slots=True)
class Reads:
    """What a condition's answer depends on; when none of it changes, neither does the answer.

    `fields`: the flat field keys it reads (the `computed.seg_<hash>` keys among them are its event
    conditions, read only when the view carries no events). `segments`: the segment ids whose membership it
    reads. `events`: the event predicates of its event conditions (`matches(event)` tests one event against
    them). `time`: whether the answer can change as time passes alone (a comparison with `now`, or an event
    condition with `within`); `CompiledCondition.next_change` says when.
    """

    fields: frozenset[str]
    segments: frozenset[str]
    events: tuple[EventPredicate, ...]
    time: bool
    _matchers: tuple[EventMatcher, ...] = field(default=(), repr=False, compare=False)

    def matches(self, event: Event) -> bool:
        """Whether an event is one the condition counts (a new one may change the answer)."""
        return any(matches(event) for matches in self._matchers)


def event_matcher(predicate: EventPredicate) -> EventMatcher:
    """The test of one event against an aggregate's event predicate (type, names, `where`)."""
    kind, names = predicate.type, frozenset(predicate.names)
    # Each `where` condition runs as the per-profile evaluator's test on a record of the event's two roots,
    # so `properties.total > 50` means here what `traits.total > 50` means on a profile (arithmetic too).
    tests = tuple(row_predicate(event_test(c)) for c in predicate.where)

    def matches(event: Event) -> bool:
        if kind != "any" and event.type != kind:
            return False
        if names and event.name not in names:
            return False
        if not tests:
            return True
        record = {"properties": event.payload, "context": event.context}
        return all(test(record, (), event.at) for test in tests)

    return matches


def _total(values: list[float]) -> float:
    """The sum of finite doubles; past the largest double an infinity (no value to the evaluators, as the
    profile service's running total is then), where `math.fsum` would raise."""
    try:
        return math.fsum(values)
    except OverflowError:
        return sum(values)


@dataclass(frozen=True, slots=True)
class _EventAggregate:
    """One event condition computed from a view's events: the value of its `computed.seg_<hash>` field."""

    key: str
    op: str  # count sum avg min max
    matches: EventMatcher
    property: tuple[str, ...]  # below the payload; empty for count
    within: float | None

    def value(self, events: Sequence[Event], now: float) -> float | None:
        count, found = 0, []
        for event in events:
            if self.within is not None and not event.at + self.within > now:
                continue
            if not self.matches(event):
                continue
            if self.op == "count":
                count += 1
                continue
            value: Any = event.payload
            for key in self.property:
                value = value.get(key) if isinstance(value, dict) else None
            if (as_number := number(value)) is not None:
                found.append(as_number)
        if self.op == "count":
            return float(count)
        if self.op == "sum":
            return _total(found)
        if not found:
            return None
        if self.op == "avg":
            return _total(found) / len(found)
        return min(found) if self.op == "min" else max(found)

    def leaves_window(self, events: Sequence[Event], now: float) -> float | None:
        """The earliest instant after `now` at which a matching event leaves the window, None if none will."""
        if self.within is None:
            return None
        instants = [at for event in events if (at := event.at + self.within) > now and self.matches(event)]
        return min(instants, default=None)


def _event_aggregates(node: Node) -> dict[str, _EventAggregate]:
    found: dict[str, _EventAggregate] = {}
    pending = [node]
    while pending:
        current = pending.pop()
        if isinstance(current, Not):
            pending.append(current.operand)
        elif isinstance(current, And | Or):
            pending.extend(current.operands)
        elif isinstance(current, Aggregate | Performed):
            if isinstance(current, Performed):
                op, path = "count", None
            else:
                op, path = current.op, current.property
            key = field_key(COMPUTED, computed_trait(op, current.event, path, current.within)["name"])
            if key not in found:
                below = path[1:] if path is not None else ()
                found[key] = _EventAggregate(key, op, event_matcher(current.event), below, current.within)
    return found


@dataclass(frozen=True, eq=False)
class CompiledCondition:
    """A condition ready to answer for one person at a time. Build it with `compile_condition`."""

    node: Node
    reads: Reads
    computed_traits: tuple[dict[str, Any], ...]  # profile computed-trait definitions its event conditions read
    _segment: CompiledSegment = field(repr=False)
    _aggregates: tuple[_EventAggregate, ...] = field(repr=False)

    @property
    def text(self) -> str:
        """The canonical text form (what `compile_condition` reads back to the same condition)."""
        return to_text(self.node)

    def to_json(self) -> dict[str, Any]:
        """The JSON tree form."""
        return to_json(self.node)

    def _record(self, view: ProfileView, now: float) -> Mapping[str, Any]:
        if view.events is None or not self._aggregates:
            return view.fields
        record = dict(view.fields)
        for aggregate in self._aggregates:
            record[aggregate.key] = aggregate.value(view.events, now)
        return record

    def evaluate(self, view: ProfileView, now: float) -> bool:
        """Whether the condition holds for this person at `now` (epoch seconds)."""
        return self._segment.predicate(self._record(view, now), view.segments, now)

    def next_change(self, view: ProfileView, now: float) -> float | None:
        """The earliest instant after `now` at which the answer may change with nothing but time passing (a
        comparison with `now` flips, or a counted event leaves its window), or None when it never will. A
        caller waiting on the condition sets a timer for it and re-evaluates then. Without events in the view
        the profile service ages the computed traits itself, and that arrives as a change of `reads.fields`."""
        instants = []
        if (moving := self._segment.next_change(self._record(view, now), view.segments, now)) is not None:
            instants.append(moving)
        if view.events is not None:
            for aggregate in self._aggregates:
                if (leaves := aggregate.leaves_window(view.events, now)) is not None:
                    instants.append(leaves)
        return min(instants, default=None)


def compile_condition(
    source: str | Mapping[str, Any],
    field: str = "condition",
    *,
    roots: tuple[str, ...] = ROOTS,
    counted: Container[str] = frozenset(),
) -> CompiledCondition:
    """The compiled form of a condition written as text (`traits.plan = "pro" and scores.churn > 0.8`) or as
    a JSON tree (`{"field": "traits.plan", "op": "=", "value": "pro"}`).

    Raises InvalidArgument on `field`: for text a SegmentSyntaxError ("line L, column C: expected X, found Y",
    with `line` and `column` attributes), for a tree the JSON path below `field` (`condition.and[1].op`).

    Field paths start with one of `roots`: the profile's four unless the caller's view carries more flat
    fields under roots of its own (a journey's `entry.<name>`, the properties its instance started with).

    `counted`: the field keys of named computed traits of kind count or sum ("computed.orders", as the
    profile service's ListComputedTraits gives their `op`): a person without a number there has 0, as an
    event condition's count does (`computed.orders < 1` holds for someone who never ordered). Other fields
    without a value have none.
    """
    if isinstance(source, str):
        node = parse(source, field, roots=roots)
    elif isinstance(source, Mapping):
        node = from_json(source, field, roots=roots)
    else:
        raise InvalidArgument(field, "must be the condition's text or its JSON tree (an object)")
    return compile_node(node, field, counted=counted)


def compile_node(node: Node, field: str = "condition", *, counted: Container[str] = frozenset()) -> CompiledCondition:
    """The compiled form of a node built by `parse` or `from_json`. A node comparing with `percentile(...)`
    is refused (InvalidArgument on `field`): a condition on one person has no population to take it over."""
    if found := percentiles_in(node):
        raise InvalidArgument(
            field,
            f"percentile({'.'.join(found[0].path)}, {percent_text(found[0].percent)}) is a percentile of the "
            "population, which a condition on one person cannot know: define a segment with it and test "
            'in_segment("<its id>") here',
        )
    segment = compile_segment(node, counted=counted)
    aggregates = _event_aggregates(node)
    predicates = tuple(dict.fromkeys(_event_predicates(node)))
    return CompiledCondition(
        node=node,
        reads=Reads(
            fields=segment.fields,
            segments=segment.segments,
            events=predicates,
            time=segment.time_dependent or any(a.within is not None for a in aggregates.values()),
            _matchers=tuple(event_matcher(predicate) for predicate in predicates),
        ),
        computed_traits=segment.computed_traits,
        _segment=segment,
        _aggregates=tuple(aggregates.values()),
    )


def _event_predicates(node: Node) -> list[EventPredicate]:
    if isinstance(node, Not):
        return _event_predicates(node.operand)
    if isinstance(node, And | Or):
        return [predicate for operand in node.operands for predicate in _event_predicates(operand)]
    if isinstance(node, Aggregate | Performed):
        return [node.event]
    return []
