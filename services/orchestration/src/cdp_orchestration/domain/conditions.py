"""Conditions in journeys and arbiter rules: the condition language (`cdp_lang`) and nothing else.

This is the one module of orchestration that imports the language, through its one-person API
(`compile_condition`, `ProfileView`, `Event`), so a change to it lands here once.

- `ProfileCondition`: a condition on the person (text like
  `scores.churn_risk > 0.8 and not performed("Support Ticket Opened", within 1d)`, or its JSON tree),
  answered for a `PersonView`. Everything the language has for one person is accepted: arithmetic
  (`entry.total > 2 * traits.avg_order`), `in` / `contains` against another field (`entry.sku in
  traits.wishlist`); a population percentile (`percentile(...)`, also inside arithmetic) is refused naming
  the field, since one person has no population. A journey's conditions may also read the instance's entry properties as
  `entry.<name>` (`profile_condition(..., entry=True)`; `holds(view, now, entry)`): the language reads
  them as flat fields under one more root, so `entry.total > 100` means what `traits.total > 100` means. Event conditions (`performed`, `count`, ...) are answered from the view's
  recent events when it carries them, else from the computed traits the profile service keeps
  (`computed_traits` lists their definitions so the service can register them). `next_change` is when time
  alone may change the answer (a `now` comparison flips, a counted event leaves its window). A named
  computed trait of kind count or sum (`computed.orders`, as the profile service's ListComputedTraits gives
  its op) that a person lacks reads as 0, as in a segment: `computed.orders < 1` holds for someone who
  never ordered. Its kind is not in its name, so the caller names those fields (`counted`, from
  `counted_fields`); `ProfileCondition.counted` is those it reads, what a journey stores with its version to
  compile it the same way again.
- `EventFilter`: which events a rule means: names (or any), a type and `and`-ed conditions on
  `properties.<path>` / `context.<path>`, arithmetic over them included (`properties.total >
  properties.shipping * 2`). It is the language's event predicate (the events of
  `performed(...)`), written as text (`properties.total > 50`) or as the JSON `where` list, and one event
  is tested by the language's own matcher, so a filter means what the same words mean in a segment.

Errors are InvalidArgument naming the caller's field (and, for text, the line and column in that text).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cdp_kit.errors import InvalidArgument
from cdp_kit.profile_fields import COMPUTED, ROOTS, field_key
from cdp_lang import (
    CompiledCondition,
    ProfileView,
    SegmentSyntaxError,
    compile_condition,
    compile_node,
    from_json,
    parse,
)
from cdp_lang import Event as LangEvent
from cdp_lang.nodes import ZERO_WHEN_MISSING, EventCondition, EventPredicate, Performed
from cdp_orchestration.domain.view import ENTRY, Event, PersonView

# Names the language gives the computed traits behind event conditions; generated, never catalogued.
_GENERATED_PREFIX = f"{COMPUTED}.seg_"
_ENTRY_PREFIX = f"{ENTRY}."
_WITH_ENTRY = (*ROOTS, ENTRY)


def _lang_event(event: Event) -> LangEvent:
    return LangEvent(event.type, event.name, event.at, event.properties, event.context)


def _lang_view(
    view: PersonView, entry: Mapping[str, Any] | None = None, read: frozenset[str] = frozenset()
) -> ProfileView:
    """The person as the language reads them; with `entry`, the entry fields in `read` beside the profile's."""
    events = None if view.events is None else tuple(_lang_event(e) for e in view.events)
    fields: Mapping[str, Any] = view.fields
    if read and entry:
        fields = dict(fields)
        for key in read:
            name = key[len(_ENTRY_PREFIX) :]
            if name in entry:
                fields[key] = entry[name]
    return ProfileView(fields, view.segments, events)


@dataclass(frozen=True, eq=False)
class ProfileCondition:
    """A compiled condition on a person; `holds(view, now)`."""

    source: Any  # as written (text or JSON tree)
    compiled: CompiledCondition
    entry_fields: frozenset[str]  # the entry fields it reads ("entry.total")
    # the counted fields (`profile_condition`'s `counted`) it reads, as 0 where a person has no number
    counted: frozenset[str] = frozenset()

    def holds(self, view: PersonView, now: float, entry: Mapping[str, Any] | None = None) -> bool:
        """Whether it holds for the person at `now`; `entry`: the instance's entry properties, if it has any."""
        return self.compiled.evaluate(_lang_view(view, entry, self.entry_fields), now)

    def next_change(self, view: PersonView, now: float, entry: Mapping[str, Any] | None = None) -> float | None:
        """When time alone may change the answer (None: never); re-evaluate then."""
        if not self.compiled.reads.time:
            return None
        return self.compiled.next_change(_lang_view(view, entry, self.entry_fields), now)

    @property
    def fields(self) -> frozenset[str]:
        """The profile fields an author wrote ("traits.plan"), not the generated computed traits nor the
        entry fields."""
        return frozenset(
            f
            for f in self.compiled.reads.fields
            if not f.startswith(_GENERATED_PREFIX) and not f.startswith(_ENTRY_PREFIX)
        )

    @property
    def event_names(self) -> frozenset[str]:
        """The event names its event conditions count (`performed("X")`, `count("Y") > 1`)."""
        return frozenset(name for predicate in self.compiled.reads.events for name in predicate.names)

    @property
    def segments(self) -> frozenset[str]:
        return self.compiled.reads.segments

    @property
    def computed_traits(self) -> tuple[dict[str, Any], ...]:
        return self.compiled.computed_traits


def profile_condition(
    source: Any, field: str, *, entry: bool = False, counted: frozenset[str] = frozenset()
) -> ProfileCondition:
    """A condition from its text or JSON tree; InvalidArgument on `field` (or below it) if it is not one.
    `entry`: it may read `entry.<name>` (a journey's conditions; an instance passes its entry to `holds`).
    `counted`: the field keys of computed traits of kind count or sum (`counted_fields`), 0 where missing."""
    compiled = compile_condition(source, field, roots=_WITH_ENTRY if entry else ROOTS, counted=counted)
    read = frozenset(f for f in compiled.reads.fields if f.startswith(_ENTRY_PREFIX))
    return ProfileCondition(source, compiled, read, frozenset(counted) & compiled.reads.fields)


def counted_fields(ops: Mapping[str, str]) -> frozenset[str]:
    """The field keys ("computed.orders") of the computed traits of kind count or sum among `ops` (name -> op,
    as ListComputedTraits gives them): a condition reads them as 0 where a person has none."""
    return frozenset(field_key(COMPUTED, name) for name, op in ops.items() if op in ZERO_WHEN_MISSING)


@dataclass(frozen=True, eq=False)
class EventFilter:
    """Events with one of `names` (empty: any name) of `type` whose properties/context meet every `where`."""

    predicate: EventPredicate
    compiled: CompiledCondition  # performed(<predicate>): its matcher tests one event

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.predicate.names)

    @property
    def field_conditions(self) -> tuple[EventCondition, ...]:
        """Its `where` conditions of one event field against a value (`properties.category = "shoes"`), not
        the comparisons with arithmetic (`properties.total > properties.shipping * 2`)."""
        return tuple(c for c in self.predicate.where if isinstance(c, EventCondition))

    def matches(self, event: Event) -> bool:
        return self.compiled.reads.matches(_lang_event(event))

    def matches_converted(self, event: LangEvent) -> bool:
        """`matches` on an event `converted` once for several filters."""
        return self.compiled.reads.matches(event)


def converted(event: Event) -> LangEvent:
    """The event as the filters read it: convert it once to test it against many (`matches_converted`)."""
    return _lang_event(event)


_WRAP = "performed("


def event_filter(names: Any, where: Any, field: str, *, event_type: Any = "track") -> EventFilter:
    """An event filter from a name (or list of names; None for any) and a `where` in text or JSON.

    `field` names the object holding them: errors come out on `<field>.event`, `<field>.where` and so on.
    """
    tree: dict[str, Any] = {"type": event_type}
    if isinstance(names, list):
        tree["names"] = names
    elif names is not None:
        tree["name"] = names
    if where is None or isinstance(where, list):
        if where is not None:
            tree["where"] = where
        try:
            node = from_json({"performed": tree}, field)
        except InvalidArgument as error:
            raise InvalidArgument(_rename(error.field, field), error.description) from None
        assert isinstance(node, Performed)
        return _filter(node.event)
    if not isinstance(where, str):
        raise InvalidArgument(f"{field}.where", f"{where!r} must be text like 'properties.total > 50' or a list")
    # The language writes event conditions inside performed(...): parse them there, then report positions
    # in the author's own text.
    try:
        node = parse(f"{_WRAP}{where})", f"{field}.where")
    except SegmentSyntaxError as error:
        column = error.column - len(_WRAP) if error.line == 1 else error.column
        hint = f"; {error.hint}" if error.hint else ""
        raise InvalidArgument(
            f"{field}.where",
            f"line {error.line}, column {max(column, 1)}: expected {error.expected}, found {error.found}{hint}",
        ) from None
    if not isinstance(node, Performed) or node.within is not None:
        raise InvalidArgument(f"{field}.where", "write only conditions on the event, like 'properties.total > 50'")
    # Names given beside the text and names the text gives itself (`event = "X"`) must both hold.
    base = event_filter(names, None, field, event_type=event_type).predicate
    own = node.event
    if base.names and own.names:
        chosen = tuple(sorted(set(base.names) & set(own.names)))
        if not chosen:
            raise InvalidArgument(f"{field}.where", "names events that the filter's event names exclude")
    else:
        chosen = base.names or own.names
    kind = own.type if own.type != "track" else base.type
    return _filter(EventPredicate(chosen, kind, own.where))


def _filter(predicate: EventPredicate) -> EventFilter:
    return EventFilter(predicate, compile_node(Performed(predicate)))


def _rename(path: str, field: str) -> str:
    """`<field>.performed.name` -> `<field>.event`: the author wrote "event", not the language's wrapper."""
    inner = f"{field}.performed"
    if not path.startswith(inner):
        return path
    rest = path[len(inner) :]
    for key in (".names", ".name"):
        if rest.startswith(key):
            return f"{field}.event{rest[len(key) :]}"
    return field + rest
