"""The segment language as a JSON tree, for builders and APIs that would rather not write text.

    {"and": [<node>, ...]}                  {"or": [<node>, ...]}                  {"not": <node>}
    {"field": "traits.plan", "op": "=", "value": "pro"}         ops: = != < <= > >= in contains starts_with
    {"field": ["consent", "purpose:ads.personalised"], "op": "=", "value": true}   (a path as a list of its
                                      steps, where a step holds a dot; "consent.purpose:ads.personalised" is
                                      the key purpose:ads, then a step personalised into its value)
    {"field": "traits.country", "op": "in", "value": ["DE", "AT"]}
    {"field": "traits.phone", "op": "exists"}                    (no "value")
    {"field": "traits.created_at", "op": "<", "value": {"now": "-30d"}}    {"now": "+3d"}, {"now": 0}
    {"field": "traits.signup_date", "op": ">", "value": {"date": "2026-01-01T00:00:00Z"}}
    {"field": "traits.last_order_total", "op": ">", "value": {"field": "traits.avg_order_total"}}   (another field)
    {"field": "scores.clv", "op": ">=", "value": {"percentile": "scores.clv", "percent": 90}}   (< <= > >= only)
    {"field": "traits.tags", "op": "contains", "value": {"field": "traits.favourite_tag"}}    (in, starts_with: the same)
    {"field": "traits.ltv", "op": ">", "value": {"*": [2, {"field": "traits.avg_order"}]}}    (arithmetic)
    {"left": {"-": [{"field": "computed.orders_30d"}, {"/": [{"field": "computed.orders_90d"}, 3]}]},
     "op": "<", "right": 0}                              (arithmetic on the left: `left`, `op`, `right`)

    <operand> = a number, {"field": ...}, {"percentile": ..., "percent": ...}, or {"+" | "-" | "*" | "/":
                [<operand>, <operand>]}; a comparison with arithmetic compares numbers, = != < <= > >=
    {"segment": "vip"}                                           (in_segment)
    {"aggregate": "count", "event": <event>, "within": "30d", "op": ">=", "value": 3}
    {"aggregate": "sum", "property": "properties.total", "event": <event>, "op": ">", "value": 500}
    {"performed": <event>, "within": "14d"}

    <event> = {"name": "Order Completed"} or {"names": ["A", "B"]} (neither: any name),
              "type": "track" (default; page, screen, identify, group, any),
              "where": [{"path": "properties.total", "op": ">", "value": 50}, {"path": "context.ip", "op": "exists"}]
    an event's arithmetic is the same, its fields {"path": ...} (properties.<path>, context.<path>):
              {"path": "properties.total", "op": ">", "value": {"*": [{"path": "properties.shipping"}, 2]}}
              {"left": {"+": [{"path": "properties.a"}, {"path": "properties.b"}]}, "op": ">", "right": 100}

A field path (`field`, `path`, `property`, `percentile`) is a string, split at its dots, or a list of its
steps; `to_json` writes the list only for a path with a dot inside a step (the text form puts such a step
between backticks: `` consent.`purpose:ads.personalised` ``). An event field's steps hold no dot
(`nodes.check_event_path`).

"within" is optional (no key: the person's whole history); an aggregate's "event" is optional ({} = every
track event). Errors are InvalidArgument on the JSON path of the offending value, below the caller's root
name: `definition.and[1].op`. "and", "or", "not" and arithmetic nest at most `max_depth` levels
(nodes.MAX_DEPTH unless the caller says otherwise); the reader stops at the first object deeper than that.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from cdp_kit.errors import InvalidArgument
from cdp_lang.nodes import (
    AGGREGATES,
    ARITHMETIC,
    COMPARISONS,
    CONDITION_OPS,
    EVENT_ROOTS,
    MAX_DEPTH,
    ORDERINGS,
    ROOTS,
    VALUE_AGGREGATES,
    Aggregate,
    And,
    Arithmetic,
    Comparison,
    Condition,
    Date,
    EventCondition,
    EventPredicate,
    FieldRef,
    InSegment,
    Invalid,
    Node,
    Not,
    Now,
    Or,
    Percentile,
    Performed,
    Scalar,
    check_date,
    check_event_path,
    check_event_type,
    comparison,
    duration,
    duration_text,
    leaves,
    percent_of,
    where_document,
)

_KINDS = ("and", "or", "not", "field", "left", "segment", "aggregate", "performed")
_KEYS = {
    "and": ("and",),
    "or": ("or",),
    "not": ("not",),
    "field": ("field", "op", "value"),
    "left": ("left", "op", "right"),
    "segment": ("segment",),
    "aggregate": ("aggregate", "property", "event", "within", "op", "value"),
    "performed": ("performed", "within"),
}
_EVENT_KEYS = ("name", "names", "type", "where")
_EXAMPLE = '{"field": "traits.plan", "op": "=", "value": "pro"}'


def from_json(
    tree: Any, field: str = "definition", *, max_depth: int = MAX_DEPTH, roots: tuple[str, ...] = ROOTS
) -> Node:
    """The node a JSON tree describes; InvalidArgument naming the JSON path (below `field`) if it is not one.
    "and", "or" and "not" nest at most `max_depth` levels. A field path starts with one of `roots` (a caller
    with more to offer than the profile, like a journey's entry properties, passes its own)."""
    return _node(tree, field, 0, max_depth, roots)


def _object(tree: Any, at: str, what: str) -> Mapping[str, Any]:
    if not isinstance(tree, Mapping):
        raise InvalidArgument(at, f"{tree!r} is not {what}")
    return tree


def _known_keys(tree: Mapping[str, Any], allowed: tuple[str, ...], at: str) -> None:
    for key in tree:
        if key not in allowed:
            raise InvalidArgument(f"{at}.{key}", f"unknown key here; known: {', '.join(allowed)}")


def _node(tree: Any, at: str, level: int, max_depth: int, roots: tuple[str, ...]) -> Node:
    tree = _object(tree, at, f"a condition: use an object like {_EXAMPLE}")
    if level > max_depth:
        raise InvalidArgument(
            at, f"and, or and not nest more than {max_depth} levels deep here; at most {max_depth}: flatten it"
        )
    kinds = [kind for kind in _KINDS if kind in tree]
    if len(kinds) != 1:
        raise InvalidArgument(
            at,
            f"needs exactly one of the keys {', '.join(_KINDS)}, found {', '.join(map(str, tree)) or 'none'}",
        )
    kind = kinds[0]
    _known_keys(tree, _KEYS[kind], at)
    if kind in ("and", "or"):
        items = tree[kind]
        if not isinstance(items, list) or not items:
            raise InvalidArgument(f"{at}.{kind}", f"{items!r} must be a non-empty list of conditions")
        operands = tuple(_node(item, f"{at}.{kind}[{i}]", level + 1, max_depth, roots) for i, item in enumerate(items))
        if len(operands) == 1:
            return operands[0]
        return And(operands) if kind == "and" else Or(operands)
    if kind == "not":
        return Not(_node(tree["not"], f"{at}.not", level + 1, max_depth, roots))
    if kind == "segment":
        segment = tree["segment"]
        if not isinstance(segment, str) or not segment:
            raise InvalidArgument(f"{at}.segment", f"{segment!r} must be a segment id (a non-empty string)")
        return InSegment(segment)
    if kind == "field":
        return _condition(tree, at, roots, level, max_depth)
    if kind == "left":
        return _comparison(tree, at, roots, level, max_depth)
    if kind == "aggregate":
        return _aggregate(tree, at, level, max_depth)
    event = _event(tree["performed"], f"{at}.performed", level, max_depth)
    return Performed(event, _within(tree, at))


def _path(value: Any, at: str, roots: tuple[str, ...]) -> tuple[str, ...]:
    """A field path: a string, its steps split at the dots, or a list of the steps, for a step that holds a
    dot itself (`["consent", "purpose:ads.personalised"]`; `_path_json` writes a path so only then)."""
    events = roots[0] in EVENT_ROOTS
    example = "properties.total" if events else f"{roots[0]}.plan"
    if isinstance(value, list) and all(isinstance(step, str) for step in value):
        steps = tuple(value)
    elif isinstance(value, str):
        steps = tuple(value.split("."))
    else:
        raise InvalidArgument(at, f"{value!r} is not a field path: use e.g. {example!r}")
    if not steps or steps[0] not in roots or len(steps) < 2:
        raise InvalidArgument(at, f"{value!r} is not a field of {', '.join(roots)}: use e.g. {example!r}")
    if any(not step or "`" in step or "\n" in step for step in steps):
        raise InvalidArgument(at, f"{value!r} has an empty step or one with a backtick or a line break")
    if events:
        try:
            check_event_path(steps)
        except Invalid as error:
            raise InvalidArgument(at, str(error)) from None
    return steps


def _path_json(path: tuple[str, ...]) -> str | list[str]:
    """A path as `_path` reads it back: its steps joined by dots, or, when a step holds a dot itself, the
    list of its steps (the string would split it)."""
    return list(path) if any("." in step for step in path) else ".".join(path)


def _scalar(value: Any, at: str) -> Scalar:
    if isinstance(value, str | bool):
        return value
    if isinstance(value, int | float):
        try:
            finite = math.isfinite(value)
        except OverflowError:
            finite = False
        if not finite:
            raise InvalidArgument(at, f"{value!r} is not a finite number")
        return 0.0 if value == 0 and isinstance(value, float) else value
    if value is None:
        raise InvalidArgument(at, "null is not a value: test for a missing value with op 'exists'")
    raise InvalidArgument(at, f"{value!r} is not a string, a number, true or false")


def _operand(
    tree: Mapping[str, Any],
    at: str,
    op: str,
    times: bool,
    roots: tuple[str, ...] = ROOTS,
    level: int = 0,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """The "value" an operator takes (a scalar, a list for `in`, nothing for `exists`, a time, another field
    or arithmetic; `times`: on a profile field, where all of those are allowed)."""
    if op == "exists":
        if "value" in tree:
            raise InvalidArgument(f"{at}.value", "op 'exists' takes no value; remove it")
        return None
    if "value" not in tree:
        raise InvalidArgument(f"{at}.value", f"is required for op {op!r}")
    value = tree["value"]
    if times and op in ("in", "contains", "starts_with") and isinstance(value, Mapping):
        _known_keys(value, ("field",), f"{at}.value")
        if "field" not in value:
            raise InvalidArgument(f"{at}.value", f'{value!r} is not a value: another field is {{"field": "traits.x"}}')
        return FieldRef(_path(value["field"], f"{at}.value.field", roots))
    if op == "in":
        if not isinstance(value, list) or not value:
            raise InvalidArgument(f"{at}.value", f"{value!r} must be a non-empty list for op 'in'")
        return tuple(_scalar(item, f"{at}.value[{i}]") for i, item in enumerate(value))
    if op == "starts_with" and not isinstance(value, str):
        raise InvalidArgument(f"{at}.value", f"{value!r} must be a string for op 'starts_with'")
    if isinstance(value, Mapping) and times and op in COMPARISONS:
        if "field" in value or "percentile" in value:
            return _reference(value, f"{at}.value", op, at, roots)
        if any(key in value for key in ARITHMETIC):
            return _arithmetic(value, f"{at}.value", level + 1, max_depth, roots)
        return _time(value, f"{at}.value", op, at)
    return _scalar(value, f"{at}.value")


def _reference(
    value: Mapping[str, Any], at: str, op: str, condition_at: str, roots: tuple[str, ...]
) -> FieldRef | Percentile:
    """{"field": "traits.b"} (another field) or {"percentile": "scores.clv", "percent": 90}."""
    if "field" in value:
        _known_keys(value, ("field",), at)
        return FieldRef(_path(value["field"], f"{at}.field", roots))
    _known_keys(value, ("percentile", "percent"), at)
    path = _path(value["percentile"], f"{at}.percentile", roots)
    if "percent" not in value:
        raise InvalidArgument(f"{at}.percent", "is required: a number from 0 to 100, like 90")
    try:
        percent = percent_of(value["percent"])
    except Invalid as error:
        raise InvalidArgument(f"{at}.percent", str(error)) from None
    if op not in ORDERINGS:
        raise InvalidArgument(f"{condition_at}.op", f"{op!r} cannot compare with a percentile: use <, <=, > or >=")
    return Percentile(path, percent)


def _number_operand(value: Any, at: str, level: int, max_depth: int, roots: tuple[str, ...]) -> Any:
    """A side of a comparison of numbers: a number, {"field": ...}, {"percentile": ...} or arithmetic; the
    percentile's operator is checked by the caller. Inside an event predicate (`roots` are the event's) a
    field is {"path": ...} and there is no percentile."""
    event = roots == EVENT_ROOTS
    if isinstance(value, Mapping):
        if any(key in value for key in ARITHMETIC):
            return _arithmetic(value, at, level + 1, max_depth, roots)
        if event and "path" in value:
            _known_keys(value, ("path",), at)
            return FieldRef(_path(value["path"], f"{at}.path", roots))
        if not event and ("field" in value or "percentile" in value):
            return _reference(value, at, "<", at, roots)
    if isinstance(value, bool) or not isinstance(value, int | float):
        if event:
            raise InvalidArgument(
                at,
                f'{value!r} is not a number, an event field {{"path": "properties.<path>"}} or arithmetic like '
                '{"*": [2, {"path": "properties.x"}]} (arithmetic works on numbers)',
            )
        raise InvalidArgument(
            at,
            f'{value!r} is not a number, {{"field": ...}}, {{"percentile": ..., "percent": ...}} or arithmetic '
            'like {"*": [2, {"field": "traits.x"}]} (arithmetic works on numbers)',
        )
    return _scalar(value, at)


def _arithmetic(value: Mapping[str, Any], at: str, level: int, max_depth: int, roots: tuple[str, ...]) -> Arithmetic:
    """{"*": [<operand>, <operand>]} at `level` levels of and, or, not and arithmetic (`roots`: whose fields
    its operands read, the profile's or, inside an event predicate, the event's)."""
    if level > max_depth:
        raise InvalidArgument(
            at,
            f"and, or, not and arithmetic nest more than {max_depth} levels deep here; at most {max_depth}: flatten it",
        )
    if len(value) != 1:
        raise InvalidArgument(
            at, f"arithmetic is one key, + - * or /, with a list of two operands; found {', '.join(map(str, value))}"
        )
    [(op, items)] = value.items()
    if op not in ARITHMETIC:
        raise InvalidArgument(f"{at}.{op}", f"unknown key here; known: {', '.join(ARITHMETIC)}")
    if not isinstance(items, list) or len(items) != 2:
        raise InvalidArgument(
            f"{at}.{op}", f'{items!r} must be a list of two operands, like [2, {{"field": "traits.x"}}]'
        )
    left = _number_operand(items[0], f"{at}.{op}[0]", level, max_depth, roots)
    right = _number_operand(items[1], f"{at}.{op}[1]", level, max_depth, roots)
    return Arithmetic(op, left, right)


def _comparison(
    tree: Mapping[str, Any], at: str, roots: tuple[str, ...], level: int, max_depth: int
) -> Condition | Comparison:
    """{"left": <operand>, "op": ..., "right": <operand>}: a comparison of numbers."""
    op = tree.get("op")
    if op not in COMPARISONS:
        raise InvalidArgument(f"{at}.op", f"{op!r} is not a comparison; use one of {', '.join(COMPARISONS)}")
    for key in ("left", "right"):
        if key not in tree:
            raise InvalidArgument(f"{at}.{key}", "is required: a number, a field, a percentile or arithmetic")
    left = _number_operand(tree["left"], f"{at}.left", level, max_depth, roots)
    right = _number_operand(tree["right"], f"{at}.right", level, max_depth, roots)
    return _compared(left, op, right, at)


def _compared(left: Any, op: str, right: Any, at: str) -> Condition | Comparison:
    if op not in ORDERINGS and any(isinstance(leaf, Percentile) for leaf in (*leaves(left), *leaves(right))):
        raise InvalidArgument(f"{at}.op", f"{op!r} cannot compare with a percentile: use <, <=, > or >=")
    try:
        return comparison(left, op, right)
    except Invalid as error:
        raise InvalidArgument(at, str(error)) from None


def _time(value: Mapping[str, Any], at: str, op: str, condition_at: str) -> Now | Date:
    if list(value) == ["date"]:
        try:
            return Date(check_date(value["date"]))
        except Invalid as error:
            raise InvalidArgument(f"{at}.date", str(error)) from None
    if list(value) != ["now"]:
        raise InvalidArgument(at, f'{value!r} is not a time: use {{"now": "-30d"}} or {{"date": "2026-01-01"}}')
    if op not in ORDERINGS:
        raise InvalidArgument(f"{condition_at}.op", f"{op!r} cannot compare with now (it moves): use <, <=, > or >=")
    offset = value["now"]
    try:
        if isinstance(offset, int | float) and not isinstance(offset, bool):
            seconds = 0.0 if offset == 0 else math.copysign(duration(abs(offset)), offset)
        elif isinstance(offset, str) and offset[:1] in ("-", "+"):
            seconds = math.copysign(duration(offset[1:]), -1.0 if offset[0] == "-" else 1.0)
        else:
            seconds = duration(offset)
    except Invalid as error:
        raise InvalidArgument(
            f"{at}.now", f"{error}; write the offset from now like '-30d' or '+3d' (or 0 for now itself)"
        ) from None
    return Now(seconds)


def _condition(
    tree: Mapping[str, Any], at: str, roots: tuple[str, ...], level: int = 0, max_depth: int = MAX_DEPTH
) -> Condition | Comparison:
    path = _path(tree["field"], f"{at}.field", roots)
    op = tree.get("op")
    if op not in CONDITION_OPS:
        raise InvalidArgument(f"{at}.op", f"{op!r} is not an operator; use one of {', '.join(CONDITION_OPS)}")
    value = _operand(tree, at, op, times=True, roots=roots, level=level, max_depth=max_depth)
    if isinstance(value, Arithmetic):
        return _compared(FieldRef(path), op, value, at)
    return Condition(path, op, value)


def _within(tree: Mapping[str, Any], at: str) -> float | None:
    if "within" not in tree:
        return None
    try:
        return duration(tree["within"])
    except Invalid as error:
        raise InvalidArgument(f"{at}.within", str(error)) from None


def _event_comparison(item: Mapping[str, Any], at: str, level: int, max_depth: int) -> EventCondition | Comparison:
    """A `where` item with arithmetic: {"path": ..., "op": ..., "value": <arithmetic>} or {"left": ..., "op":
    ..., "right": ...}. A plain event field against a number is the `EventCondition` it always was; two
    plain event fields are refused (the profile service compares a field with another only in arithmetic)."""
    op = item.get("op")
    if op not in COMPARISONS:
        raise InvalidArgument(f"{at}.op", f"{op!r} is not a comparison; use one of {', '.join(COMPARISONS)}")
    if "left" in item:
        _known_keys(item, ("left", "op", "right"), at)
        for key in ("left", "right"):
            if key not in item:
                raise InvalidArgument(f"{at}.{key}", "is required: a number, an event field or arithmetic")
        left = _number_operand(item["left"], f"{at}.left", level, max_depth, EVENT_ROOTS)
        right = _number_operand(item["right"], f"{at}.right", level, max_depth, EVENT_ROOTS)
    else:
        left = FieldRef(_path(item.get("path"), f"{at}.path", EVENT_ROOTS))
        right = _arithmetic(item["value"], f"{at}.value", level + 1, max_depth, EVENT_ROOTS)
    try:
        node = comparison(left, op, right)
    except Invalid as error:
        raise InvalidArgument(at, str(error)) from None
    if isinstance(node, Comparison):
        return node
    if isinstance(node.value, FieldRef):
        raise InvalidArgument(at, _FIELD_ONLY_IN_ARITHMETIC)
    return EventCondition(node.path, node.op, node.value)


_FIELD_ONLY_IN_ARITHMETIC = (
    "an event field is compared with another only in arithmetic, like "
    '{"path": "properties.total", "op": ">", "value": {"*": [{"path": "properties.shipping"}, 2]}}'
)


def _event(tree: Any, at: str, level: int = 0, max_depth: int = MAX_DEPTH) -> EventPredicate:
    tree = _object(tree, at, 'an event predicate: use an object like {"name": "Order Completed"}')
    _known_keys(tree, _EVENT_KEYS, at)
    if "name" in tree and "names" in tree:
        raise InvalidArgument(at, "give 'name' or 'names', not both")
    names: tuple[str, ...] = ()
    if "name" in tree:
        names = (tree["name"],)
        if not isinstance(tree["name"], str) or not tree["name"]:
            raise InvalidArgument(f"{at}.name", f"{tree['name']!r} must be an event name (a non-empty string)")
    elif "names" in tree:
        listed = tree["names"]
        if not isinstance(listed, list) or not listed or not all(isinstance(n, str) and n for n in listed):
            raise InvalidArgument(f"{at}.names", f"{listed!r} must be a non-empty list of event names")
        names = tuple(listed)
    try:
        event_type = check_event_type(tree.get("type", "track"))
    except Invalid as error:
        raise InvalidArgument(f"{at}.type", str(error)) from None
    raw_where = tree.get("where", [])
    if not isinstance(raw_where, list):
        raise InvalidArgument(f"{at}.where", f"{raw_where!r} must be a list of conditions on event fields")
    where: list[EventCondition | Comparison] = []
    for i, item in enumerate(raw_where):
        item_at = f"{at}.where[{i}]"
        item = _object(item, item_at, 'a condition like {"path": "properties.total", "op": ">", "value": 50}')
        if "left" in item:
            where.append(_event_comparison(item, item_at, level, max_depth))
            _check_where(where, item_at)
            continue
        _known_keys(item, ("path", "op", "value"), item_at)
        path = _path(item.get("path"), f"{item_at}.path", EVENT_ROOTS)
        op = item.get("op")
        if op not in CONDITION_OPS:
            raise InvalidArgument(f"{item_at}.op", f"{op!r} is not an operator; use one of {', '.join(CONDITION_OPS)}")
        value = item.get("value")
        if op in COMPARISONS and isinstance(value, Mapping) and any(key in value for key in ARITHMETIC):
            where.append(_event_comparison(item, item_at, level, max_depth))
        elif op in COMPARISONS and isinstance(value, Mapping) and "path" in value:
            raise InvalidArgument(f"{item_at}.value", _FIELD_ONLY_IN_ARITHMETIC)
        else:
            where.append(EventCondition(path, op, _operand(item, item_at, op, times=False)))
        _check_where(where, item_at)
    return EventPredicate(tuple(sorted(set(names))), event_type, tuple(where))


def _check_where(where: list[EventCondition | Comparison], at: str) -> None:
    """The profile service's `where` can hold these conditions together (see `nodes.where_document`)."""
    try:
        where_document(tuple(where))
    except Invalid as error:
        raise InvalidArgument(at, str(error)) from None


def _aggregate(tree: Mapping[str, Any], at: str, level: int = 0, max_depth: int = MAX_DEPTH) -> Aggregate:
    op = tree["aggregate"]
    if op not in AGGREGATES:
        raise InvalidArgument(f"{at}.aggregate", f"{op!r} is not an aggregate; use one of {', '.join(AGGREGATES)}")
    property_path = None
    if op in VALUE_AGGREGATES:
        if "property" not in tree:
            raise InvalidArgument(f"{at}.property", f"is required for {op!r}: name it like 'properties.total'")
        property_path = _path(tree["property"], f"{at}.property", ("properties",))
    elif "property" in tree:
        raise InvalidArgument(f"{at}.property", "count reads no property; remove it")
    event = _event(tree.get("event", {}), f"{at}.event", level, max_depth)
    comparison = tree.get("op")
    if comparison not in COMPARISONS:
        raise InvalidArgument(f"{at}.op", f"{comparison!r} is not a comparison; use one of {', '.join(COMPARISONS)}")
    value = tree.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{at}.value", f"{value!r} must be a number")
    return Aggregate(op, event, property_path, _within(tree, at), comparison, _scalar(value, f"{at}.value"))  # type: ignore[arg-type]


# --- writing ---------------------------------------------------------------------------------------------------


def _value_json(value: Any, field_key: str = "field") -> Any:
    """A value's JSON; `field_key` names a field operand ("path" inside an event predicate)."""
    if isinstance(value, Now):
        if value.offset == 0:
            return {"now": 0}
        return {"now": ("-" if value.offset < 0 else "+") + duration_text(abs(value.offset))}
    if isinstance(value, Date):
        return {"date": value.text}
    if isinstance(value, FieldRef):
        return {field_key: _path_json(value.path)}
    if isinstance(value, Percentile):
        percent = int(value.percent) if value.percent == int(value.percent) else value.percent
        return {"percentile": _path_json(value.path), "percent": percent}
    if isinstance(value, Arithmetic):
        return {value.op: [_value_json(value.left, field_key), _value_json(value.right, field_key)]}
    if isinstance(value, tuple):
        return list(value)
    return value


def _event_json(event: EventPredicate) -> dict[str, Any]:
    document: dict[str, Any] = {}
    if len(event.names) == 1:
        document["name"] = event.names[0]
    elif event.names:
        document["names"] = list(event.names)
    document["type"] = event.type
    if event.where:
        document["where"] = [_where_json(c) for c in event.where]
    return document


def _where_json(condition: EventCondition | Comparison) -> dict[str, Any]:
    if isinstance(condition, EventCondition):
        return _condition_json("path", condition.path, condition.op, condition.value)
    if isinstance(condition.left, FieldRef):
        return _condition_json("path", condition.left.path, condition.op, condition.right, "path")
    return {
        "left": _value_json(condition.left, "path"),
        "op": condition.op,
        "right": _value_json(condition.right, "path"),
    }


def _condition_json(key: str, path: tuple[str, ...], op: str, value: Any, field_key: str = "field") -> dict[str, Any]:
    document: dict[str, Any] = {key: _path_json(path), "op": op}
    if op != "exists":
        document["value"] = _value_json(value, field_key)
    return document


def to_json(node: Node) -> dict[str, Any]:
    """The JSON tree of a node: from_json(to_json(node)) == node."""
    if isinstance(node, Condition):
        return _condition_json("field", node.path, node.op, node.value)
    if isinstance(node, Comparison):
        if isinstance(node.left, FieldRef):
            return _condition_json("field", node.left.path, node.op, node.right)
        return {"left": _value_json(node.left), "op": node.op, "right": _value_json(node.right)}
    if isinstance(node, InSegment):
        return {"segment": node.segment}
    if isinstance(node, Performed):
        document: dict[str, Any] = {"performed": _event_json(node.event)}
        if node.within is not None:
            document["within"] = duration_text(node.within)
        return document
    if isinstance(node, Aggregate):
        document = {"aggregate": node.op}
        if node.property is not None:
            document["property"] = _path_json(node.property)
        document["event"] = _event_json(node.event)
        if node.within is not None:
            document["within"] = duration_text(node.within)
        document["op"] = node.comparison
        document["value"] = node.value
        return document
    if isinstance(node, Not):
        return {"not": to_json(node.operand)}
    if isinstance(node, And):
        return {"and": [to_json(operand) for operand in node.operands]}
    if isinstance(node, Or):
        return {"or": [to_json(operand) for operand in node.operands]}
    raise TypeError(f"not a segment node: {node!r}")
