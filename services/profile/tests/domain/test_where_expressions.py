"""`where`'s "$expr": comparisons of numbers computed from an event's own paths ({"$gt": [{"path": "total"},
{"$multiply": [{"path": "shipping"}, 2]}]}), what the segment language's arithmetic inside an event condition
compiles to. What they match (no number, a division by zero or an overflow is false), pseudo-paths in them,
the errors a bad one gives, how a definition with them reads back and keeps its identity, and a windowed
count through a profile."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from cdp_kit.errors import InvalidArgument
from cdp_profile.domain import ComputedTrait, ComputedTraits, Profile
from cdp_profile.domain.computed import MISSING

DAY = 86400.0
NOW = 100 * DAY
TWICE_SHIPPING = {"$gt": [{"path": "total"}, {"$multiply": [{"path": "shipping"}, 2]}]}


def matches(expressions: list[Any], payload: Any) -> bool:
    trait = ComputedTrait("t", "count", where={"$expr": expressions})
    return trait.extract(payload) is not MISSING


def test_a_comparison_of_computed_numbers():
    assert matches([TWICE_SHIPPING], {"total": 21, "shipping": 10})
    assert not matches([TWICE_SHIPPING], {"total": 20, "shipping": 10})
    assert matches([TWICE_SHIPPING], {"total": 20.5, "shipping": 10.25}) is False  # 20.5 > 20.5 no
    # every comparison of the list must hold, and the plain filters beside it too
    both = [TWICE_SHIPPING, {"$lt": [{"path": "total"}, 100]}]
    assert matches(both, {"total": 50, "shipping": 10})
    assert not matches(both, {"total": 150, "shipping": 10})
    trait = ComputedTrait("t", "count", where={"$expr": [TWICE_SHIPPING], "currency": "EUR"})
    assert trait.extract({"total": 50, "shipping": 10, "currency": "EUR"}) is not MISSING
    assert trait.extract({"total": 50, "shipping": 10, "currency": "USD"}) is MISSING


@pytest.mark.parametrize(
    ("name", "left", "right", "expected"),
    [
        ("$add", 2, 3, 5.0),
        ("$subtract", 2, 3, -1.0),
        ("$multiply", 2, 3, 6.0),
        ("$divide", 3, 2, 1.5),
    ],
)
def test_each_arithmetic_operator(name, left, right, expected):
    expression = {name: [{"path": "a"}, {"path": "b"}]}
    for comparison, holds in (("$eq", True), ("$ne", False), ("$gte", True), ("$lte", True), ("$gt", False)):
        assert matches([{comparison: [expression, expected]}], {"a": left, "b": right}) is holds, comparison


def test_precedence_is_the_trees_and_numbers_are_doubles():
    # (a - b) - c and a - (b - c) are different trees
    left_first = {"$subtract": [{"$subtract": [{"path": "a"}, {"path": "b"}]}, {"path": "c"}]}
    right_first = {"$subtract": [{"path": "a"}, {"$subtract": [{"path": "b"}, {"path": "c"}]}]}
    payload = {"a": 4, "b": 3, "c": 2}
    assert matches([{"$eq": [left_first, -1]}], payload) and matches([{"$eq": [right_first, 3]}], payload)
    assert not matches([{"$eq": [{"$add": [{"path": "a"}, {"path": "b"}]}, 0.3]}], {"a": 0.1, "b": 0.2})
    assert matches([{"$eq": [{"$multiply": [{"path": "a"}, 1]}, {"path": "b"}]}], {"a": 1, "b": 1.0})


@pytest.mark.parametrize(
    "payload",
    [
        {"total": 10},  # shipping missing
        {"total": 10, "shipping": None},
        {"total": 10, "shipping": "2"},  # a string is not a number
        {"total": 10, "shipping": True},  # nor is a boolean
        {"total": 10, "shipping": [2]},
        {"total": 10, "shipping": {"n": 2}},
        {"total": 10, "shipping": math.nan},
        {"total": 10, "shipping": math.inf},
        {"total": 10, "shipping": 2**1100},  # too large for a double
        {"total": 10, "shipping": 0},  # a division by zero
        {"total": 10, "shipping": -0.0},
        {"total": 1e308, "shipping": 1e-308},  # overflows to infinity
        "not an object",
    ],
)
def test_no_number_a_division_by_zero_or_an_overflow_matches_nothing(payload):
    ratio = {"$divide": [{"path": "total"}, {"path": "shipping"}]}
    for comparison in ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte"):
        assert not matches([{comparison: [ratio, 1]}], payload), comparison
        assert not matches([{comparison: [1, ratio]}], payload), comparison


def test_nested_paths_and_pseudo_paths(ev, profile_of, defs_of):
    assert matches([{"$eq": [{"$multiply": [{"path": "cart.items"}, 2]}, 4]}], {"cart": {"items": 2}})
    defs = defs_of(
        {"name": "north_of_home", "op": "count", "event_type": "page",
         "where": {"$expr": [{"$gt": [{"path": "$context.location.latitude"}, {"$add": [{"path": "home"}, 1]}]}]}},
    )  # fmt: skip
    assert defs.needs_context and ("location", "latitude") in defs.context_keep
    [trait] = defs
    assert trait.reads_event and trait.context_paths == (("location", "latitude"),)
    plain = ComputedTrait("t", "count", where={"$expr": [TWICE_SHIPPING]})
    assert not plain.reads_event and plain.context_paths == ()  # no pseudo-path: the bare payload
    profile = profile_of(
        [
            ev("p1", "page", "Docs", NOW - DAY, properties={"home": 50}, context={"location": {"latitude": 52.5}}),
            ev("p2", "page", "Docs", NOW - DAY, properties={"home": 52}, context={"location": {"latitude": 52.5}}),
            ev("p3", "page", "Docs", NOW - DAY, properties={"home": 50}),
        ],
        defs,
        now=NOW,
    )
    assert profile.view(now=NOW).computed == {"north_of_home": 1}


def test_a_windowed_count_through_the_profile(ev):
    defs = ComputedTraits(
        [ComputedTrait.from_dict({"name": "big_orders_30d", "op": "count", "event_names": ["Order Completed"],
                                  "where": {"$expr": [TWICE_SHIPPING]}, "window": "30d"})]
    )  # fmt: skip
    profile = Profile.new("p")
    for event_id, days_ago, total, shipping in [
        ("o1", 40, 80, 5),  # outside the window from the start
        ("o2", 20, 120, 10),
        ("o3", 10, 20, 10),  # not more than twice
        ("o4", 5, 21, 10),
        ("o5", 4, 99, "5"),  # a string is not a number
        ("o6", 3, 99, None),
    ]:
        profile.apply(
            ev(event_id, "track", "Order Completed", NOW - days_ago * DAY,
               properties={"total": total, "shipping": shipping}),
            defs,
            now=NOW,
        )  # fmt: skip
    assert profile.view(now=NOW).computed == {"big_orders_30d": 2}
    assert profile.view(now=NOW + 11 * DAY).computed == {"big_orders_30d": 1}  # o2 has aged out


def test_it_reads_back_canonically_and_keeps_the_definitions_identity():
    written = {
        "name": "big_orders",
        "op": "count",
        "event_names": ["Order Completed"],
        "where": {"currency": "EUR", "$expr": [TWICE_SHIPPING, {"$lte": [{"path": "total"}, 1000]}]},
        "window": "30d",
    }
    trait = ComputedTrait.from_dict(written)
    document = trait.to_dict()
    assert document["where"] == written["where"]
    again = ComputedTrait.from_dict(json.loads(json.dumps(document)))
    assert again == trait and hash(again) == hash(trait) and again.signature == trait.signature
    assert again.to_dict() == document
    # the order of the comparisons is kept (it is the order written), and a changed operand is a change
    reordered = {**written, "where": {**written["where"], "$expr": written["where"]["$expr"][::-1]}}
    assert ComputedTrait.from_dict(reordered).signature != trait.signature
    for other in (
        {"$gt": [{"path": "total"}, {"$multiply": [{"path": "shipping"}, 2.0]}]},
        {"$gte": [{"path": "total"}, {"$multiply": [{"path": "shipping"}, 2]}]},
        {"$gt": [{"path": "total"}, {"$add": [{"path": "shipping"}, 2]}]},
    ):
        changed = ComputedTrait.from_dict({**written, "where": {"$expr": [other]}})
        assert changed != trait and changed.signature != trait.signature


def deep(levels: int) -> Any:
    operand: Any = {"path": "a"}
    for _ in range(levels):
        operand = {"$add": [operand, 1]}
    return operand


@pytest.mark.parametrize(
    ("expressions", "field", "hint"),
    [
        ([], "where.$expr", "non-empty list"),
        ({"$gt": [1, 2]}, "where.$expr", "non-empty list"),
        ([{"$gt": [{"path": "a"}, 1], "$lt": [{"path": "a"}, 2]}], "where.$expr[0]", "one comparison"),
        (["a > 1"], "where.$expr[0]", "one comparison"),
        ([{"$between": [{"path": "a"}, 1]}], "where.$expr[0].$between", "$eq, $ne, $gt, $gte, $lt, $lte"),
        ([{"$gt": [{"path": "a"}]}], "where.$expr[0].$gt", "a list of two operands"),
        ([{"$gt": [{"path": "a"}, "1"]}], "where.$expr[0].$gt[1]", 'a finite number, {"path": ...}'),
        ([{"$gt": [{"path": "a"}, True]}], "where.$expr[0].$gt[1]", "a finite number"),
        ([{"$gt": [{"path": "a"}, math.inf]}], "where.$expr[0].$gt[1]", "a finite number"),
        ([{"$gt": [{"path": "a"}, None]}], "where.$expr[0].$gt[1]", "a finite number"),
        ([{"$gt": [{"path": ""}, 1]}], "where.$expr[0].$gt[0].path", "not a property path"),
        ([{"$gt": [{"path": "$nope"}, 1]}], "where.$expr[0].$gt[0].path", "not a pseudo-path"),
        ([{"$gt": [{"path": "a", "x": 1}, 1]}], "where.$expr[0].$gt[0]", "a finite number"),
        ([{"$gt": [{"$pow": [{"path": "a"}, 2]}, 1]}], "where.$expr[0].$gt[0]", "$add, $subtract"),
        ([{"$gt": [{"$add": [{"path": "a"}]}, 1]}], "where.$expr[0].$gt[0].$add", "a list of two operands"),
        ([{"$gt": [{"path": "a"}, 1]}], None, None),  # valid: the case the others break
        ([{"$gt": [deep(32), 1]}], None, None),
        ([{"$gt": [deep(33), 1]}], "where.$expr[0].$gt[0]" + ".$add[0]" * 32, "at most 32"),
    ],
)
def test_a_bad_expression_names_the_field_and_what_is_valid(expressions, field, hint):
    definition = {"name": "t", "op": "count", "where": {"$expr": expressions}}
    if field is None:
        assert ComputedTrait.from_dict(definition)
        return
    with pytest.raises(InvalidArgument) as caught:
        ComputedTrait.from_dict(definition)
    assert caught.value.field == field
    assert hint in caught.value.description, caught.value.description
    with pytest.raises(InvalidArgument) as listed:
        ComputedTraits.from_dicts([definition])
    assert listed.value.field == f"computed_traits[0].{field}"
