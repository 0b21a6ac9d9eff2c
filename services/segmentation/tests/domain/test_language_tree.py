"""The JSON tree form: the documented shapes mean what the text means, and errors name the JSON path."""

from __future__ import annotations

import pytest

from cdp_kit.errors import InvalidArgument
from cdp_segmentation.domain import from_json, parse, to_json


@pytest.mark.parametrize(
    ("tree", "text"),
    [
        (
            {"and": [{"field": "traits.plan", "op": "=", "value": "pro"}, {"not": {"segment": "churned"}}]},
            'traits.plan = "pro" and not in_segment("churned")',
        ),
        ({"field": "traits.created_at", "op": "<", "value": {"now": "-30d"}}, "traits.created_at < now - 30d"),
        ({"field": "traits.trial_ends_at", "op": "<=", "value": {"now": "+3d"}}, "traits.trial_ends_at <= now + 3d"),
        ({"field": "traits.t", "op": ">", "value": {"now": 0}}, "traits.t > now"),
        ({"field": "traits.t", "op": ">", "value": {"now": -3600}}, "traits.t > now - 1h"),
        (
            {"field": "traits.signup_date", "op": ">", "value": {"date": "2026-01-01T00:00:00Z"}},
            'traits.signup_date > date("2026-01-01T00:00:00Z")',
        ),
        (
            {
                "aggregate": "count",
                "event": {
                    "name": "Order Completed",
                    "type": "track",
                    "where": [{"path": "properties.total", "op": ">", "value": 50}],
                },
                "within": "30d",
                "op": ">=",
                "value": 3,
            },
            'count(event = "Order Completed" and properties.total > 50, within 30d) >= 3',
        ),
        ({"performed": {"name": "Login"}, "within": "14d"}, 'performed("Login", within 14d)'),
        (
            {"aggregate": "sum", "property": "properties.total", "event": {"names": ["B", "A"]}, "op": ">", "value": 5},
            'sum(properties.total, event in ["A", "B"]) > 5',
        ),
        ({"aggregate": "avg", "property": "properties.total", "op": ">", "value": 5}, "avg(properties.total) > 5"),
        ({"field": "traits.country", "op": "in", "value": ["DE", 1, True]}, 'traits.country in ["DE", 1, true]'),
        ({"field": "traits.phone", "op": "exists"}, "traits.phone exists"),
        ({"or": [{"field": "traits.a", "op": "exists"}]}, "traits.a exists"),  # one operand is that operand
        (
            {
                "performed": {
                    "type": "page",
                    "where": [{"path": "context.page.path", "op": "starts_with", "value": "/"}],
                }
            },
            'performed(type = "page" and context.page.path starts_with "/")',
        ),
    ],
)
def test_tree_means_what_the_text_means(tree, text):
    assert from_json(tree) == parse(text)
    assert from_json(to_json(parse(text))) == parse(text)


def test_to_json_writes_the_documented_shapes():
    assert to_json(parse('count(event = "Order Completed" and properties.total > 50, within 30d) >= 3')) == {
        "aggregate": "count",
        "event": {
            "name": "Order Completed",
            "type": "track",
            "where": [{"path": "properties.total", "op": ">", "value": 50}],
        },
        "within": "30d",
        "op": ">=",
        "value": 3,
    }
    assert to_json(parse("traits.created_at < now - 30d")) == {
        "field": "traits.created_at",
        "op": "<",
        "value": {"now": "-30d"},
    }
    assert to_json(parse('performed("Login", within 14d)')) == {
        "performed": {"name": "Login", "type": "track"},
        "within": "2w",
    }


def _error(tree, field="definition"):
    with pytest.raises(InvalidArgument) as caught:
        from_json(tree, field=field)
    return caught.value


PRO = {"field": "traits.plan", "op": "=", "value": "pro"}


@pytest.mark.parametrize(
    ("tree", "path", "words"),
    [
        ({"and": [PRO, {"field": "traits.x", "op": "~", "value": 1}]}, "definition.and[1].op", "not an operator"),
        ({"or": [PRO, {"not": {"field": "foo.bar", "op": "exists"}}]}, "definition.or[1].not.field", "not a field"),
        ({"field": "traits", "op": "exists"}, "definition.field", "not a field"),
        ({"field": "traits..x", "op": "exists"}, "definition.field", "empty step"),
        ({"field": "traits.x", "op": "=", "value": None}, "definition.value", "exists"),
        ({"field": "traits.x", "op": "="}, "definition.value", "is required"),
        ({"field": "traits.x", "op": "exists", "value": 1}, "definition.value", "takes no value"),
        ({"field": "traits.x", "op": "in", "value": []}, "definition.value", "non-empty list"),
        ({"field": "traits.x", "op": "in", "value": ["a", [1]]}, "definition.value[1]", "not a string"),
        ({"field": "traits.x", "op": "starts_with", "value": 1}, "definition.value", "must be a string"),
        ({"field": "traits.x", "op": "=", "value": float("nan")}, "definition.value", "finite"),
        ({"field": "traits.x", "op": "=", "value": {"now": "-30d"}}, "definition.op", "cannot compare with now"),
        ({"field": "traits.x", "op": "<", "value": {"now": "-30x"}}, "definition.value.now", "not a duration"),
        ({"field": "traits.x", "op": "<", "value": {"date": "nope"}}, "definition.value.date", "ISO-8601"),
        ({"field": "traits.x", "op": "<", "value": {"when": 1}}, "definition.value", "not a time"),
        ({"field": "traits.x", "op": "=", "value": 1, "extra": 1}, "definition.extra", "unknown key"),
        ({"field": "traits.x", "op": "exists", "segment": "s"}, "definition", "exactly one of"),
        ({"and": []}, "definition.and", "non-empty list"),
        ({"not": {"segment": ""}}, "definition.not.segment", "segment id"),
        ([PRO], "definition", "not a condition"),
        ({"aggregate": "median", "op": ">", "value": 1}, "definition.aggregate", "not an aggregate"),
        ({"aggregate": "sum", "event": {}, "op": ">", "value": 1}, "definition.property", "is required"),
        ({"aggregate": "sum", "property": "traits.x", "op": ">", "value": 1}, "definition.property", "properties"),
        ({"aggregate": "count", "property": "properties.x", "op": ">", "value": 1}, "definition.property", "remove"),
        ({"aggregate": "count", "op": "in", "value": 1}, "definition.op", "not a comparison"),
        ({"aggregate": "count", "op": ">", "value": "3"}, "definition.value", "must be a number"),
        ({"aggregate": "count", "op": ">", "value": 1, "within": "0d"}, "definition.within", "longer than zero"),
        ({"aggregate": "count", "op": ">", "value": 1, "within": "1.5s"}, "definition.within", "whole number"),
        ({"performed": {"name": "A", "type": "web"}}, "definition.performed.type", "not an event type"),
        ({"performed": {"name": "A", "names": ["B"]}}, "definition.performed", "not both"),
        ({"performed": {"name": ""}}, "definition.performed.name", "event name"),
        ({"performed": {"names": "A"}}, "definition.performed.names", "list of event names"),
        ({"performed": {"name": "A", "nmae": "B"}}, "definition.performed.nmae", "unknown key"),
        (
            {
                "aggregate": "count",
                "event": {
                    "name": "A",
                    "where": [
                        {"path": "properties.a", "op": ">", "value": 1},
                        {"path": "properties.a", "op": ">", "value": 2},
                    ],
                },
                "op": ">=",
                "value": 1,
            },
            "definition.event.where[1]",
            "different values",
        ),
        (
            {"performed": {"where": [{"path": "traits.a", "op": "exists"}]}},
            "definition.performed.where[0].path",
            "properties, context",
        ),
        (
            {"performed": {"where": [{"path": "properties.a", "op": "<", "value": {"now": "-1d"}}]}},
            "definition.performed.where[0].value",
            "not a string",
        ),
    ],
)
def test_errors_name_the_json_path(tree, path, words):
    error = _error(tree)
    assert error.field == path, error
    assert words in error.description, error


def test_errors_start_from_the_callers_root_name():
    error = _error({"and": [PRO, {"field": "traits.x", "op": "~"}]}, field="segment.definition")
    assert error.field == "segment.definition.and[1].op"
