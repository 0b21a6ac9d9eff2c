"""Conditions in journeys and arbiter rules: the segment language (`cdp_lang`) and nothing else.

This is the one module of orchestration that imports the language, so a change to it lands here once.

- `ProfileCondition`: a segment-language condition on the person (text like
  `scores.churn_risk > 0.8 and traits.open_tickets > 0`, or its JSON tree), evaluated on a `PersonView`
  by the language's own per-profile evaluator. Aggregates (`performed(...)`, `count(...)`) read profile
  computed traits; `computed_traits` lists their definitions so the service can register them with the
  profile service, as segmentation does.
- `EventFilter`: which events a rule means: names (or any), a type and `and`-ed conditions on
  `properties.<path>` / `context.<path>`. It is the language's event predicate (the `events` of
  `performed(...)`), written as text (`properties.total > 50`) or as the JSON `where` list, and it is
  evaluated here on one event under the language's value rules (`cdp_lang.values`: missing values never
  match, numbers compare as doubles, bools only equal).

Errors are InvalidArgument naming the caller's field (and, for text, the line and column in that text).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cdp_kit.errors import InvalidArgument
from cdp_kit.profile_fields import COMPUTED
from cdp_lang.compiler import CompiledSegment, compile_segment
from cdp_lang.nodes import EventCondition, EventPredicate, Performed
from cdp_lang.plan import COMPARE
from cdp_lang.text import SegmentSyntaxError, parse
from cdp_lang.tree import from_json
from cdp_lang.values import element_equals, is_list, number, present
from cdp_orchestration.domain.view import Event, PersonView

# Names the language gives the computed traits behind aggregates; they are generated, never catalogued.
_GENERATED_PREFIX = f"{COMPUTED}.seg_"


@dataclass(frozen=True, eq=False)
class ProfileCondition:
    """A compiled condition on a person; `holds(view, now)`."""

    source: Any  # as written (text or JSON tree), kept for the journey's document
    compiled: CompiledSegment

    def holds(self, view: PersonView, now: float) -> bool:
        return self.compiled.predicate(view.fields, view.segments, now)

    @property
    def fields(self) -> frozenset[str]:
        """The profile fields it reads that an author wrote ("traits.plan"), not generated computed traits."""
        return frozenset(f for f in self.compiled.fields if not f.startswith(_GENERATED_PREFIX))

    @property
    def segments(self) -> frozenset[str]:
        return self.compiled.segments

    @property
    def computed_traits(self) -> tuple[dict[str, Any], ...]:
        return self.compiled.computed_traits

    @property
    def time_dependent(self) -> bool:
        return self.compiled.time_dependent


def profile_condition(source: Any, field: str) -> ProfileCondition:
    """A condition from its text or JSON tree; InvalidArgument on `field` (or below it) if it is not one."""
    node = parse(source, field) if isinstance(source, str) else from_json(source, field)
    return ProfileCondition(source, compile_segment(node))


@dataclass(frozen=True, eq=False)
class EventFilter:
    """Events with one of `names` (empty: any name) of `type` whose properties/context meet every `where`."""

    names: frozenset[str]
    type: str
    where: tuple[EventCondition, ...]

    def matches(self, event: Event) -> bool:
        if self.names and event.name not in self.names:
            return False
        if self.type != "any" and event.type != self.type:
            return False
        return all(_event_condition(condition, event) for condition in self.where)


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
        return _from_predicate(node.event)
    if not isinstance(where, str):
        raise InvalidArgument(f"{field}.where", f"{where!r} must be text like 'properties.total > 50' or a list")
    # The language writes event conditions inside performed(...): parse them there, then report positions
    # in the author's own text.
    try:
        node = parse(f"{_WRAP}{where})", f"{field}.where")
    except SegmentSyntaxError as error:
        column = error.column - len(_WRAP) if error.line == 1 else error.column
        raise InvalidArgument(
            f"{field}.where",
            f"line {error.line}, column {max(column, 1)}: expected {error.expected}, found {error.found}",
        ) from None
    if not isinstance(node, Performed) or node.within is not None:
        raise InvalidArgument(f"{field}.where", "write only conditions on the event, like 'properties.total > 50'")
    # Text may name events itself (`event = "X"`); the names given beside it still apply.
    base = event_filter(names, None, field, event_type=event_type)
    own = node.event
    if own.type != "track" and event_type == "track":
        base = EventFilter(base.names, own.type, base.where)
    names_set = base.names & frozenset(own.names) if base.names and own.names else base.names | frozenset(own.names)
    return EventFilter(names_set, base.type, own.where)


def _rename(path: str, field: str) -> str:
    """`<field>.performed.name` -> `<field>.event`: the author wrote "event", not the language's wrapper."""
    inner = f"{field}.performed"
    if path.startswith(inner):
        rest = path[len(inner) :]
        if rest.startswith(".name") or rest.startswith(".names"):
            return f"{field}.event" + rest[len(".names") if rest.startswith(".names") else len(".name") :]
        return field + rest
    return path


def _from_predicate(predicate: EventPredicate) -> EventFilter:
    return EventFilter(frozenset(predicate.names), predicate.type, predicate.where)


def _lookup(event: Event, path: tuple[str, ...]) -> Any:
    value: Any = event.properties if path[0] == "properties" else event.context
    for step in path[1:]:
        if not isinstance(value, Mapping):
            return None
        value = value.get(step)
    return value


def _event_condition(condition: EventCondition, event: Event) -> bool:
    value = _lookup(event, condition.path)
    op, literal = condition.op, condition.value
    if op == "exists":
        return present(value)
    if not present(value):
        return False
    if op == "in":
        assert isinstance(literal, tuple)
        return any(_equals(value, item) for item in literal)
    if op == "contains":
        if isinstance(value, str):
            return isinstance(literal, str) and literal in value
        return is_list(value) and any(_equals(element, literal) for element in value)
    if op == "starts_with":
        return isinstance(value, str) and isinstance(literal, str) and value.startswith(literal)
    if op == "=":
        return _equals(value, literal)
    if op == "!=":
        return not _equals(value, literal)
    if isinstance(literal, bool):
        return False  # bools have no order
    if isinstance(literal, str):
        return isinstance(value, str) and COMPARE[op](value, literal)
    as_number = number(value)
    return as_number is not None and COMPARE[op](as_number, float(literal))  # type: ignore[arg-type]


def _equals(value: Any, literal: Any) -> bool:
    if isinstance(literal, int | float) and not isinstance(literal, bool):
        literal = float(literal)
    return element_equals(value, literal)
