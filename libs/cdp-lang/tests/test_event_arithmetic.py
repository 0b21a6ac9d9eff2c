"""Arithmetic inside an event predicate (`count(event = "Order Completed" and properties.total >
properties.shipping * 2, within 30d) >= 1`): what it means for one event, the computed trait it becomes, how
it is written back, and how bad input is refused where it is."""

from __future__ import annotations

import pytest

from cdp_lang import (
    Event,
    InvalidArgument,
    ProfileView,
    SegmentSyntaxError,
    compile_condition,
    from_json,
    parse,
    to_json,
)
from cdp_lang.compiler import compile_segment
from cdp_lang.condition import event_matcher
from cdp_lang.nodes import MAX_DEPTH, Arithmetic, Comparison, EventCondition, FieldRef, Performed
from cdp_lang.text import to_text

NOW = 1_790_000_000.0
DAY = 86_400.0


def matched(text: str, payloads: list[object], context: dict | None = None) -> list[bool]:
    """Whether each payload's event matches the predicate of `performed(<text>)`."""
    node = parse(f"performed({text})")
    assert isinstance(node, Performed)
    matches = event_matcher(node.event)
    return [matches(Event("track", "Order Completed", NOW, payload, context or {})) for payload in payloads]


def test_the_briefs_example_counts_the_orders_it_says():
    condition = compile_condition(
        'count(event = "Order Completed" and properties.total > properties.shipping * 2, within 30d) >= 1'
    )
    big = Event("track", "Order Completed", NOW - DAY, {"total": 21, "shipping": 10})
    small = Event("track", "Order Completed", NOW - DAY, {"total": 20, "shipping": 10})
    other = Event("track", "Order Refunded", NOW - DAY, {"total": 21, "shipping": 10})
    old = Event("track", "Order Completed", NOW - 31 * DAY, {"total": 21, "shipping": 10})
    assert condition.evaluate(ProfileView(events=[big]), NOW)
    assert not condition.evaluate(ProfileView(events=[small, other, old]), NOW)
    assert condition.reads.matches(big) and not condition.reads.matches(small)
    assert condition.next_change(ProfileView(events=[big]), NOW) == NOW - DAY + 30 * DAY


def test_precedence_parentheses_and_either_side():
    payload = [{"a": 2, "b": 3, "c": 4}]
    assert matched("properties.a + properties.b * properties.c = 14", payload) == [True]  # 2 + 12
    assert matched("(properties.a + properties.b) * properties.c = 20", payload) == [True]
    assert matched("properties.c - properties.b - properties.a = -1", payload) == [True]  # left to right
    assert matched("properties.c - (properties.b - properties.a) = 3", payload) == [True]
    assert matched("properties.c / properties.a / properties.a = 1", payload) == [True]
    assert matched("5 < properties.a * properties.b", payload) == [True]
    assert matched('"Order Completed" and properties.a * 2 > properties.b and type = "track"', payload) == [True]
    assert matched("properties.a > 1 and properties.a * properties.b < 0", payload) == [False]


def test_no_number_a_division_by_zero_or_an_overflow_is_false_and_nan_never_matches():
    payloads = [
        {"total": 10},  # shipping missing
        {"total": 10, "shipping": None},
        {"total": 10, "shipping": "2"},  # a string is not a number
        {"total": 10, "shipping": True},  # nor is a bool
        {"total": 10, "shipping": [2]},
        {"total": 10, "shipping": float("nan")},
        {"total": 10, "shipping": float("inf")},
        {"total": 10, "shipping": 2**1100},  # too large for a double
        {"total": 10, "shipping": 0},  # 10 / 0
        {"total": 1e308, "shipping": 1e-308},  # overflows to infinity
        {"total": 10, "shipping": {"n": 2}},  # an object is not a number
    ]
    for op in ("=", "!=", "<", "<=", ">", ">="):
        assert matched(f"properties.total / properties.shipping {op} 1", payloads) == [False] * len(payloads), op
    assert matched("properties.total * properties.total > 0", [{"total": 1e200}]) == [False]
    assert matched("properties.total / properties.shipping != 1", [{"total": 10, "shipping": 2}]) == [True]
    assert matched("properties.a.b * 2 = 4", [{"a": {"b": 2}}, {"a": 2}]) == [True, False]  # sub-paths
    assert matched("context.page.n * 2 = 4", [{}], {"page": {"n": 2}}) == [True]


def test_it_becomes_the_computed_trait_the_profile_service_evaluates():
    condition = compile_condition(
        'count(event = "Order Completed" and properties.total > properties.shipping * 2'
        ' and properties.currency = "EUR" and (context.page.n + 1) / 2 >= properties.total, within 30d) >= 1'
    )
    [definition] = condition.computed_traits
    assert definition["where"] == {
        "currency": "EUR",
        "$expr": [
            {"$gt": [{"path": "total"}, {"$multiply": [{"path": "shipping"}, 2]}]},
            {"$gte": [{"$divide": [{"$add": [{"path": "$context.page.n"}, 1]}, 2]}, {"path": "total"}]},
        ],
    }
    # segments evaluate the computed trait as any other
    segment = compile_segment(condition.node)
    assert segment.fields == {f"computed.{definition['name']}"}
    assert segment.evaluate({f"computed.{definition['name']}": 1.0})
    # a different expression is a different trait
    other = compile_condition(
        'count(event = "Order Completed" and properties.total > properties.shipping * 3, within 30d) >= 1'
    )
    assert other.computed_traits[0]["name"] != definition["name"]


def test_both_written_forms_round_trip():
    texts = [
        'performed(event = "Order Completed" and properties.total > properties.shipping * 2)',
        'performed(type = "page" and properties.a - (properties.b - 1) > -2.5, within 3d)',
        'count(event = "A" and (properties.a + 1) * 2 > 3 and properties.x = "y", within 30d) >= 2',
        "sum(properties.total, properties.total / properties.items != 1.5) > 100",
        'performed(event = "A" and 5 < properties.x + context.y)',
        "performed(properties.`unit price` * properties.qty >= properties.total)",
    ]
    for text in texts:
        node = parse(text)
        assert to_text(node) == text
        assert from_json(to_json(node)) == node
    # no arithmetic: the event condition it always was
    assert parse('performed("A" and (properties.a) > 2)') == parse('performed("A" and properties.a > 2)')
    assert parse('performed("A" and properties.a > 2)').event.where == (EventCondition(("properties", "a"), ">", 2),)
    node = parse('performed("A" and properties.total > properties.shipping * 2)')
    assert node.event.where == (
        Comparison(FieldRef(("properties", "total")), ">", Arithmetic("*", FieldRef(("properties", "shipping")), 2)),
    )
    assert to_json(node)["performed"]["where"] == [
        {"path": "properties.total", "op": ">", "value": {"*": [{"path": "properties.shipping"}, 2]}}
    ]
    assert to_json(parse('performed("A" and properties.a - 1 < 0)'))["performed"]["where"] == [
        {"left": {"-": [{"path": "properties.a"}, 1]}, "op": "<", "right": 0}
    ]
    # the "left" form of a plain comparison is that comparison
    tree = {"performed": {"name": "A", "where": [{"left": {"path": "properties.a"}, "op": ">", "right": 2}]}}
    assert from_json(tree) == parse('performed("A" and properties.a > 2)')


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('performed("A" and properties.a * )', "line 1, column 34: expected a number, an event field"),
        ('performed("A" and properties.a * "x" > 1)', "column 34: expected a number, an event field"),
        (
            'performed("A" and properties.a * traits.b > 1)',
            "column 34: expected a number, an event field (properties.<path> or context.<path>), or '(', found "
            "'traits.b'; an event condition reads the event's own fields",
        ),
        (
            'performed("A" and properties.a > percentile(properties.a, 9) * 2)',
            "column 34: expected a value (a string, a number, true or false) or a",
        ),
        ('performed("A" and properties.a > "x" + 1)', "column 38: expected 'and' or ')', found '+'"),
        ('performed("A" and 1 + 1 > 1)', "column 19: expected a field on one side of the comparison"),
        ('performed("A" and properties.a + 1 in [1])', "column 36: expected a comparison operator"),
        ('performed("A" and properties.a + 1)', "column 35: expected a comparison operator"),
        (
            'performed("A" and properties.a > properties.b)',
            "column 34: expected a value (a string, a number, true or false) or arithmetic, found 'properties.b'; "
            "an event field is compared with another only in arithmetic",
        ),
        ('performed("A" and (properties.a) = (properties.b))', "column 36: expected a value"),
        ('performed("A" and (properties.a > 1 or properties.b > 1))', "column 19: expected an event condition"),
        ('performed("A" and properties.a > (properties.b + 1)', "column 52: expected ',', 'and' or ')'"),
        ('performed("A"\n  and properties.a *\n 2 > now)', "line 3, column 6: expected a number, an event field"),
    ],
)
def test_bad_text_is_refused_at_its_position(text, message):
    with pytest.raises(SegmentSyntaxError) as error:
        parse(text, "definition.text")
    assert error.value.field == "definition.text"
    assert message in str(error.value.description), error.value.description


def where(*items):
    return {"performed": {"name": "A", "where": list(items)}}


@pytest.mark.parametrize(
    ("tree", "field", "message"),
    [
        (where({"path": "properties.a", "op": ">", "value": {"*": [2]}}), ".where[0].value.*", "two operands"),
        (where({"path": "properties.a", "op": ">", "value": {"*": [2, "x"]}}), ".where[0].value.*[1]", "not a number"),
        (
            where({"path": "properties.a", "op": ">", "value": {"*": [2, {"field": "traits.x"}]}}),
            ".where[0].value.*[1]",
            "not a number",
        ),
        (
            where({"path": "properties.a", "op": ">", "value": {"*": [2, {"path": "traits.x"}]}}),
            ".where[0].value.*[1].path",
            "is not a field of properties, context",
        ),
        (
            where({"path": "properties.a", "op": ">", "value": {"path": "properties.b"}}),
            ".where[0].value",
            "compared with another only in arithmetic",
        ),
        (
            where({"path": "properties.a", "op": "in", "value": {"+": [1, 2]}}),
            ".where[0].value",
            "must be a non-empty list",
        ),
        (where({"left": {"path": "properties.a"}, "op": "in", "right": 1}), ".where[0].op", "is not a comparison"),
        (where({"left": {"path": "properties.a"}, "op": ">"}), ".where[0].right", "is required"),
        (where({"left": 1, "op": ">", "right": 2}), ".where[0]", "compare a field"),
        (
            where({"left": {"path": "properties.a"}, "op": ">", "right": {"path": "properties.b"}}),
            ".where[0]",
            "compared with another only in arithmetic",
        ),
        (where({"left": {"path": "properties.a"}, "op": ">", "right": 1, "value": 1}), ".where[0].value", "unknown"),
        (
            where({"left": {"percentile": "properties.a", "percent": 9}, "op": ">", "right": 1}),
            ".where[0].left",
            "not a number",
        ),
    ],
)
def test_a_bad_tree_names_its_json_path(tree, field, message):
    with pytest.raises(InvalidArgument) as error:
        from_json(tree)
    assert error.value.field == "definition.performed" + field
    assert message in error.value.description, error.value.description


def sum_of(terms: int) -> str:
    return " + ".join(["properties.a"] * terms)


def test_event_arithmetic_counts_towards_the_nesting_limit():
    assert parse(f'performed("A" and {sum_of(MAX_DEPTH + 1)} > 1)')
    with pytest.raises(InvalidArgument, match=f"at most {MAX_DEPTH}"):
        parse(f'performed("A" and {sum_of(MAX_DEPTH + 2)} > 1)')
    # with and/or around the aggregate the levels add up
    with pytest.raises(InvalidArgument, match=f"at most {MAX_DEPTH}"):
        parse(f'traits.x > 1 and (traits.y > 1 or count("A" and {sum_of(MAX_DEPTH)} > 1) > 1)')
    assert parse(f'traits.x > 1 and (traits.y > 1 or count("A" and {sum_of(MAX_DEPTH - 1)} > 1) > 1)')
    deep: object = {"path": "properties.a"}
    for _ in range(MAX_DEPTH + 1):
        deep = {"+": [deep, 1]}
    with pytest.raises(InvalidArgument) as error:
        from_json(where({"left": deep, "op": ">", "right": 1}))
    assert f"at most {MAX_DEPTH}" in error.value.description
    assert error.value.field == "definition.performed.where[0].left" + ".+[0]" * MAX_DEPTH
    with pytest.raises(InvalidArgument, match=f"at most {MAX_DEPTH}"):
        from_json({"not": {"not": from_json_shallow(deep)}})


def from_json_shallow(deep: object) -> dict:
    """A performed(...) whose where arithmetic is as deep as `deep` less one level."""
    return where({"left": deep["+"][0], "op": ">", "right": 1})  # type: ignore[index]
