"""Compiling: the profile computed traits event aggregates become, what a segment reads, and the segment graph."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from cdp_kit.errors import InvalidArgument
from cdp_segmentation.domain import check_segment_graph, compile_segment, parse

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def traits_of(text):
    return compile_segment(parse(text)).computed_traits


def only_trait(text):
    (definition,) = traits_of(text)
    return definition


def test_an_aggregate_becomes_a_named_profile_definition():
    definition = only_trait('count(event = "Order Completed" and properties.total > 50, within 30d) >= 3')
    body = {k: v for k, v in definition.items() if k != "name"}
    assert body == {
        "op": "count",
        "event_type": "track",
        "event_names": ["Order Completed"],
        "where": {"total": {"$gt": 50}},
        "window": "30d",
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    assert definition["name"] == "seg_" + hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert NAME_RE.match(definition["name"])
    assert next(iter(definition)) == "name"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'sum(properties.cart.total, event in ["B", "A"], within 90d) > 500',
            {"op": "sum", "event_type": "track", "event_names": ["A", "B"], "property": "cart.total", "where": {}},
        ),
        ("avg(properties.total) > 5", {"op": "avg", "event_type": "track", "event_names": [], "property": "total"}),
        ('min(properties.x, type = "any") < 1', {"op": "min", "event_type": "any", "event_names": [], "property": "x"}),
        ('max(properties.x, "A") < 1', {"op": "max", "event_type": "track", "event_names": ["A"], "property": "x"}),
        ('performed(type = "page")', {"op": "count", "event_type": "page", "event_names": []}),
    ],
)
def test_definition_fields(text, expected):
    definition = only_trait(text)
    assert {k: definition[k] for k in expected} == expected
    assert ("property" in definition) == (definition["op"] != "count")
    assert "window" not in definition or "within" in text


@pytest.mark.parametrize(
    ("conditions", "where"),
    [
        ('properties.plan = "pro"', {"plan": "pro"}),
        ('properties.plan in ["pro", "team"]', {"plan": ["pro", "team"]}),
        ("properties.total > 50", {"total": {"$gt": 50}}),
        ("properties.total > 50 and properties.total <= 100", {"total": {"$gt": 50, "$lte": 100}}),
        ('properties.plan = "pro" and properties.plan != "x"', {"plan": {"$eq": "pro", "$ne": "x"}}),
        ('properties.plan in ["a"] and properties.plan starts_with "a"', {"plan": {"$in": ["a"], "$starts_with": "a"}}),
        ("properties.coupon exists", {"coupon": {"$exists": True}}),
        ('properties.tags contains "sale"', {"tags": {"$contains": "sale"}}),
        ("properties.n >= 1 and properties.n < 2.5", {"n": {"$gte": 1, "$lt": 2.5}}),
        ("properties.flag = true and properties.n != 0", {"flag": True, "n": {"$ne": 0}}),
        ('context.device.type = "ios"', {"$context.device.type": "ios"}),
        ('context.location.country in ["DE"] and properties.a.b = 1', {"$context.location.country": ["DE"], "a.b": 1}),
        ("properties.total > 50 and properties.total > 50", {"total": {"$gt": 50}}),  # a repeat adds nothing
    ],
)
def test_where_conditions_become_the_profile_filter(conditions, where):
    assert only_trait(f'count(event = "A" and {conditions}) > 0')["where"] == where


def test_identical_conditions_share_one_computed_trait():
    names = {
        only_trait(text)["name"]
        for text in (
            'performed("Login", within 14d)',
            'count("Login", within 2w) >= 1',
            'count(event = "Login" and type = "track", within 336h) > 5',
            'not performed(event in ["Login"], within 14d)',
        )
    }
    assert len(names) == 1
    both = compile_segment(parse('performed("Login", within 14d) and count("Login", within 14d) < 5'))
    assert len(both.computed_traits) == 1
    assert both.fields == {f"computed.{both.computed_traits[0]['name']}"}


def test_different_conditions_get_different_traits():
    texts = [
        'performed("Login")',
        'performed("Login", within 14d)',
        'performed("Login" and type = "page")',
        'performed(event = "Login" and properties.x = 1)',
        'performed(event = "Login" and properties.x = 1.0)',
        'performed(event = "Login" and properties.x = true)',
        'sum(properties.x, "Login") > 0',
        'avg(properties.x, "Login") > 0',
    ]
    assert len({only_trait(text)["name"] for text in texts}) == len(texts)


def test_what_a_segment_reads():
    segment = compile_segment(
        parse(
            'traits.plan = "pro" and traits.address.city = "Berlin" and consent.purpose:email = true '
            'and (scores.clv > 1 or in_segment("vip")) and not in_segment("churned") '
            'and performed("Login", within 14d) and traits.signup_date > date("2026-01-01")'
        )
    )
    name = segment.computed_traits[0]["name"]
    assert segment.fields == {
        "traits.plan",
        "traits.address",
        "consent.purpose:email",
        "scores.clv",
        f"computed.{name}",
        "traits.signup_date",
    }
    assert segment.segments == {"vip", "churned"}
    assert segment.time_dependent is False  # fixed dates and windows (the profile service expires those) do not move
    assert compile_segment(parse("traits.created_at < now - 30d")).time_dependent is True
    assert compile_segment(parse("traits.a = 1 or not traits.b >= now")).time_dependent is True


def test_count_and_sum_without_a_value_are_zero_the_others_are_missing():
    empty = {}
    assert compile_segment(parse('count("Order") < 1')).evaluate(empty, now=0)
    assert compile_segment(parse('sum(properties.total, "Order") = 0')).evaluate(empty, now=0)
    assert compile_segment(parse('not performed("Login")')).evaluate(empty, now=0)
    assert not compile_segment(parse('avg(properties.total, "Order") < 1')).evaluate(empty, now=0)
    assert not compile_segment(parse('min(properties.total, "Order") != 1')).evaluate(empty, now=0)
    segment = compile_segment(parse('count("Order", within 30d) >= 3'))
    key = next(iter(segment.fields))
    assert segment.evaluate({key: 3}, now=0)
    assert not segment.evaluate({key: 2}, now=0)


def test_segment_graph_orders_dependencies_first():
    refs = {
        "a": frozenset({"b", "c"}),
        "b": frozenset({"c"}),
        "c": frozenset(),
        "d": frozenset(),
        "e": frozenset({"a"}),
    }
    order = check_segment_graph(refs)
    assert sorted(order) == sorted(refs)
    for segment, targets in refs.items():
        assert all(order.index(target) < order.index(segment) for target in targets)
    assert check_segment_graph({}) == []


@pytest.mark.parametrize(
    ("refs", "cycle"),
    [
        ({"a": frozenset({"a"})}, "a → a"),
        ({"a": frozenset({"b"}), "b": frozenset({"a"})}, "a → b → a"),
        ({"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}), "d": frozenset({"a"})}, "a → b → c → a"),
        ({"x": frozenset(), "m": frozenset({"n", "x"}), "n": frozenset({"m"})}, "m → n → m"),
    ],
)
def test_segment_graph_rejects_cycles_naming_them(refs, cycle):
    with pytest.raises(InvalidArgument) as caught:
        check_segment_graph(refs)
    assert caught.value.field == "definition"
    assert f"cycle: {cycle}" in caught.value.description


def test_segment_graph_rejects_unknown_references_naming_them():
    with pytest.raises(InvalidArgument) as caught:
        check_segment_graph({"a": frozenset({"ghost", "b"}), "b": frozenset({"phantom"})})
    message = caught.value.description
    assert "'a' references 'ghost'" in message
    assert "'b' references 'phantom'" in message
    assert caught.value.field == "definition"


def test_a_definition_not_yet_named_is_called_the_definition_not_by_its_placeholder():
    # An estimate (no segment id yet) said "segment '$new' references 'nope'" (found by a marketer trial).
    from cdp_segmentation.domain.graph import UNNAMED

    with pytest.raises(InvalidArgument) as caught:
        check_segment_graph({UNNAMED: frozenset({"nope"}), "a": frozenset()})
    message = caught.value.description
    assert message.startswith("the definition references 'nope'") and "$new" not in message
