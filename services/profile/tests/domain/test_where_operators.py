"""`where` operator objects ({"total": {"$gt": 50, "$lte": 100}}): what each operator matches, on missing,
null and wrongly typed values too; conjunctions; pseudo-path keys; the errors a bad one gives; how a
definition with them reads back and keeps its identity; and a windowed count through a profile."""

from __future__ import annotations

import json
import math
import operator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_kit.errors import InvalidArgument
from cdp_profile.domain import ComputedTrait, ComputedTraits, Profile
from cdp_profile.domain.computed import MISSING, WHERE_OPERATORS

DAY = 86400.0
NOW = 100 * DAY
ABSENT = object()  # the event has no value at the path at all


def matches(condition: Any, value: Any) -> bool:
    trait = ComputedTrait("t", "count", where={"v": condition})
    return trait.extract({} if value is ABSENT else {"v": value}) is not MISSING


# (operator object, value at the path, matches?)
CASES = [
    # $eq: numbers with numbers (1 == 1.0), strings with strings, booleans with booleans only
    ({"$eq": 50}, 50, True),
    ({"$eq": 50}, 50.0, True),
    ({"$eq": 50.5}, 50.5, True),
    ({"$eq": 50}, 51, False),
    ({"$eq": 50}, "50", False),
    ({"$eq": 1}, True, False),
    ({"$eq": True}, 1, False),
    ({"$eq": True}, True, True),
    ({"$eq": False}, False, True),
    ({"$eq": False}, 0, False),
    ({"$eq": "pro"}, "pro", True),
    ({"$eq": "pro"}, "Pro", False),
    ({"$eq": "pro"}, ["pro"], False),
    ({"$eq": 50}, ABSENT, False),
    ({"$eq": 50}, None, False),
    ({"$eq": 50}, {"v": 50}, False),
    # $ne: true only for a present value that is not equal under the same rules
    ({"$ne": "free"}, "pro", True),
    ({"$ne": "free"}, "free", False),
    ({"$ne": "free"}, 3, True),
    ({"$ne": 1}, "1", True),
    ({"$ne": 1}, True, True),
    ({"$ne": 1}, 1.0, False),
    ({"$ne": True}, True, False),
    ({"$ne": "free"}, ["free"], True),
    ({"$ne": "free"}, ABSENT, False),
    ({"$ne": "free"}, None, False),
    ({"$ne": 1}, math.nan, False),  # a non-finite number in an event is no value
    ({"$ne": 1}, math.inf, False),
    # ordering: numbers with numbers, strings with strings by code point; never across types or on booleans
    ({"$gt": 50}, 50.01, True),
    ({"$gt": 50}, 50, False),
    ({"$gte": 50}, 50.0, True),
    ({"$gte": 50}, 49.99, False),
    ({"$lt": 50}, -3, True),
    ({"$lt": 50}, 50, False),
    ({"$lte": 50.5}, 50, True),
    ({"$lte": 50.5}, 51, False),
    ({"$gt": 50}, 10**30, True),
    ({"$eq": 2**53}, 2**53 + 1, True),  # numbers compare as doubles, as JSON numbers are
    ({"$gt": 50}, 10**400, False),  # an integer too large for a double is no value
    ({"$ne": 50}, 10**400, False),
    ({"$exists": True}, 10**400, False),
    ({"$in": [2**53]}, 2**53 + 1, True),
    ({"$gt": 50}, "60", False),
    ({"$lt": "m"}, 5, False),
    ({"$gt": 0}, True, False),
    ({"$lt": 2}, False, False),
    ({"$gt": False}, True, False),
    ({"$gte": True}, True, False),
    ({"$gt": "b"}, "c", True),
    ({"$gt": "b"}, "b", False),
    ({"$gte": "b"}, "b", True),
    ({"$lt": "b"}, "B", True),  # code points: upper case sorts first
    ({"$lt": "é"}, "z", True),
    ({"$gt": 50}, ABSENT, False),
    ({"$gt": 50}, None, False),
    ({"$gt": 50}, math.inf, False),
    ({"$lt": 50}, -math.inf, False),
    ({"$lt": 50}, math.nan, False),
    ({"$gt": 50}, [60], False),
    # $in: equal to one of the operands
    ({"$in": ["pro", "team"]}, "team", True),
    ({"$in": ["pro", "team"]}, "free", False),
    ({"$in": [1, "1"]}, 1.0, True),
    ({"$in": [1, 2]}, True, False),
    ({"$in": [True]}, 1, False),
    ({"$in": [True, 0]}, True, True),
    ({"$in": [1, 2]}, "1", False),
    ({"$in": ["pro"]}, ["pro"], False),
    ({"$in": ["pro"]}, ABSENT, False),
    ({"$in": ["pro"]}, None, False),
    # $contains: a substring of a string value, or an element of a list value
    ({"$contains": "vip"}, "a vip customer", True),
    ({"$contains": "vip"}, "VIP", False),
    ({"$contains": "vip"}, ["new", "vip"], True),
    ({"$contains": "vip"}, ["a vip"], False),  # elements are compared whole
    ({"$contains": 3}, [1, 3.0], True),
    ({"$contains": 1}, [True], False),
    ({"$contains": True}, [1, True], True),
    ({"$contains": 3}, "123", False),
    ({"$contains": "vip"}, {"vip": True}, False),
    ({"$contains": "vip"}, [], False),
    ({"$contains": "vip"}, ABSENT, False),
    ({"$contains": "vip"}, None, False),
    # $starts_with: strings only
    ({"$starts_with": "/pricing"}, "/pricing/teams", True),
    ({"$starts_with": "/pricing"}, "/docs/pricing", False),
    ({"$starts_with": "1"}, 10, False),
    ({"$starts_with": "/p"}, ["/p"], False),
    ({"$starts_with": "/p"}, ABSENT, False),
    ({"$starts_with": "/p"}, None, False),
    # $exists: present and not null (and, for a number, finite)
    ({"$exists": True}, "X", True),
    ({"$exists": True}, False, True),
    ({"$exists": True}, 0, True),
    ({"$exists": True}, "", True),
    ({"$exists": True}, [], True),
    ({"$exists": True}, ABSENT, False),
    ({"$exists": True}, None, False),
    ({"$exists": True}, math.nan, False),
    ({"$exists": False}, ABSENT, True),
    ({"$exists": False}, None, True),
    ({"$exists": False}, -math.inf, True),
    ({"$exists": False}, "X", False),
    ({"$exists": False}, 0, False),
    # conjunctions: every operator must hold
    ({"$gt": 50, "$lte": 100}, 75.5, True),
    ({"$gt": 50, "$lte": 100}, 100, True),
    ({"$gt": 50, "$lte": 100}, 50, False),
    ({"$gt": 50, "$lte": 100}, 101, False),
    ({"$gt": 50, "$lte": 100}, ABSENT, False),
    ({"$exists": True, "$ne": ""}, "x", True),
    ({"$exists": True, "$ne": ""}, "", False),
    ({"$starts_with": "/p", "$ne": "/p"}, "/p", False),
    ({"$in": ["a", "b", "c"], "$ne": "b"}, "c", True),
    ({"$in": ["a", "b", "c"], "$ne": "b"}, "b", False),
    ({"$exists": False, "$ne": 1}, ABSENT, False),  # $ne needs a value, $exists: false needs none
]


@pytest.mark.parametrize(("condition", "value", "expected"), CASES, ids=lambda x: "absent" if x is ABSENT else None)
def test_each_operator_on_matching_other_missing_null_and_wrongly_typed_values(condition, value, expected):
    assert matches(condition, value) is expected


def test_plain_values_keep_their_meaning_next_to_operator_objects():
    trait = ComputedTrait(
        "t", "count", where={"plan": ["pro", "team"], "coupon": None, "total": {"$gt": 50}, "seats": 1}
    )
    assert trait.extract({"plan": "pro", "total": 51, "seats": 1.0}) is None
    assert trait.extract({"plan": "pro", "total": 51, "seats": 1, "coupon": None}) is None
    assert trait.extract({"plan": "pro", "total": 51, "seats": 1, "coupon": "X"}) is MISSING
    assert trait.extract({"plan": "pro", "total": 50, "seats": 1}) is MISSING
    assert trait.extract({"plan": "free", "total": 51, "seats": 1}) is MISSING
    assert trait.extract({"plan": "pro", "total": 51, "seats": True}) is MISSING
    nested = ComputedTrait("t", "sum", property="cart.total", where={"cart.items": {"$gte": 2}})
    assert nested.extract({"cart": {"items": 2, "total": 30}}) == 30
    assert nested.extract({"cart": {"items": 1, "total": 30}}) is MISSING
    assert nested.extract({"cart": "full"}) is MISSING


def test_operator_objects_read_pseudo_paths_as_where_keys(ev, profile_of, defs_of):
    night = 1_700_000_000.0 - 1_700_000_000.0 % DAY + 23 * 3600  # 23:00 UTC
    page_path, country = "$context.page.path", "$context.location.country"
    defs = defs_of(
        {"name": "pricing_views", "op": "count", "event_type": "page",
         "where": {page_path: {"$starts_with": "/pricing"}}},
        {"name": "daytime", "op": "count", "event_type": "any", "where": {"$hour": {"$gte": 8, "$lt": 20}}},
        {"name": "recent", "op": "count", "event_type": "any", "where": {"$at": {"$gte": night - 3600}}},
        {"name": "known_users", "op": "unique", "event_type": "any", "property": "$anonymous_id",
         "where": {"$user_id": {"$exists": True}}},
        {"name": "anonymous_only", "op": "count", "event_type": "any", "where": {"$user_id": {"$exists": False}}},
        {"name": "not_germany", "op": "count", "event_type": "any", "where": {country: {"$ne": "DE"}}},
    )  # fmt: skip
    assert defs.needs_context and ("page", "path") in defs.context_keep
    profile = profile_of(
        [
            ev("p1", "page", "Pricing", night - 12 * 3600, context={"page": {"path": "/pricing/teams"}}, user_id="u1",
               anonymous_id="a1"),
            ev("p2", "page", "Docs", night, context={"page": {"path": "/docs/pricing"}, "location": {"country": "DE"}},
               anonymous_id="a2"),
            ev("t1", "track", "Signed Up", night - 1800, context={"location": {"country": "FR"}}, user_id="u2",
               anonymous_id="a3"),
        ],
        defs,
        now=night + DAY,
    )  # fmt: skip
    assert profile.view(now=night + DAY).computed == {
        "pricing_views": 1,
        "daytime": 1,  # p1 at 11:00 UTC
        "recent": 2,
        "known_users": ["a1", "a3"],
        "anonymous_only": 1,
        "not_germany": 1,  # p1 has no country: $ne needs a value
    }


def test_a_windowed_count_over_big_orders_through_the_profile(ev):
    defs = ComputedTraits(
        [ComputedTrait.from_dict({"name": "big_orders_30d", "op": "count", "event_names": ["Order Completed"],
                                  "where": {"total": {"$gt": 50}}, "window": "30d"})]
    )  # fmt: skip
    profile = Profile.new("p")
    for event_id, days_ago, total in [
        ("o1", 40, 80),  # outside the window from the start
        ("o2", 20, 120),
        ("o3", 10, 50),  # not more than 50
        ("o4", 5, 50.5),
        ("o5", 4, "99"),  # a string is not a number
        ("o6", 3, None),
        ("o7", 2, 75),
    ]:
        properties = {} if total is None else {"total": total}
        profile.apply(
            ev(event_id, "track", "Order Completed", NOW - days_ago * DAY, properties=properties), defs, now=NOW
        )
    profile.apply(ev("v1", "track", "Product Viewed", NOW - DAY, properties={"total": 500}), defs, now=NOW)
    assert profile.view(now=NOW).computed == {"big_orders_30d": 3}
    assert profile.view(now=NOW + 11 * DAY).computed == {"big_orders_30d": 2}  # o2 has aged out


@pytest.mark.parametrize(
    ("where", "field", "hint"),
    [
        ({"total": {}}, "where.total", "empty operator object"),
        ({"total": {"$gt": 50, "$between": [1, 2]}}, "where.total.$between", "$eq, $ne, $gt"),
        ({"address": {"city": "Berlin"}}, "where.address.city", "'address.city'"),
        ({"total": {"$gt": None}}, "where.total.$gt", '{"$exists": false}'),
        ({"total": {"$eq": None}}, "where.total.$eq", '{"$exists": false}'),
        ({"total": {"$gt": [50]}}, "where.total.$gt", "string, a finite number or a boolean"),
        ({"total": {"$lte": {"n": 1}}}, "where.total.$lte", "string, a finite number or a boolean"),
        ({"total": {"$gt": math.inf}}, "where.total.$gt", "finite"),
        ({"total": {"$ne": math.nan}}, "where.total.$ne", "finite"),
        ({"total": {"$lt": -(10**400)}}, "where.total.$lt", "finite"),
        ({"plan": {"$in": []}}, "where.plan.$in", "non-empty list"),
        ({"plan": {"$in": "pro"}}, "where.plan.$in", "non-empty list"),
        ({"plan": {"$in": ["pro", None]}}, "where.plan.$in", "non-empty list"),
        ({"plan": {"$in": [["pro"]]}}, "where.plan.$in", "non-empty list"),
        ({"plan": {"$in": [1, math.inf]}}, "where.plan.$in", "finite"),
        ({"coupon": {"$exists": 1}}, "where.coupon.$exists", "true or false"),
        ({"coupon": {"$exists": None}}, "where.coupon.$exists", "true or false"),
        ({"path": {"$starts_with": 1}}, "where.path.$starts_with", "must be a string"),
        ({"tags": {"$contains": ["vip"]}}, "where.tags.$contains", "string, a finite number or a boolean"),
        ({"$context.page.nope": {"$exists": True}}, "where.$context.page.nope", "not a field"),
        ({"total": [{"$gt": 50}]}, "where.total", "object of operators"),
    ],
)
def test_a_bad_operator_object_names_the_field_and_what_is_valid(where, field, hint):
    with pytest.raises(InvalidArgument) as caught:
        ComputedTrait.from_dict({"name": "t", "op": "count", "where": where})
    assert caught.value.field == field
    assert hint in caught.value.description
    with pytest.raises(InvalidArgument) as listed:
        ComputedTraits.from_dicts([{"name": "t", "op": "count", "where": where}])
    assert listed.value.field == f"computed_traits[0].{field}"


def test_an_operator_object_reads_back_canonically_and_keeps_the_definitions_identity():
    written = {
        "name": "mid_orders",
        "op": "count",
        "event_names": ["Order Completed"],
        "where": {"total": {"$lte": 100, "$gt": 50}, "plan": {"$in": ["team", "pro"]}, "test": False},
        "window": "30d",
    }
    trait = ComputedTrait.from_dict(written)
    document = trait.to_dict()
    assert document["where"] == {"plan": {"$in": ["team", "pro"]}, "test": False, "total": {"$gt": 50, "$lte": 100}}
    assert list(document["where"]["total"]) == ["$gt", "$lte"]  # keys sorted
    stored = json.loads(json.dumps(document))
    again = ComputedTrait.from_dict(stored)
    assert again == trait and hash(again) == hash(trait) and again.signature == trait.signature
    assert again.to_dict() == document
    # Written in another key order, it is the same definition.
    shuffled = ComputedTrait.from_dict({**written, "where": {"test": False, "plan": {"$in": ["team", "pro"]},
                                                            "total": {"$gt": 50, "$lte": 100}}})  # fmt: skip
    assert shuffled == trait and shuffled.signature == trait.signature
    # A changed operand is a changed definition, even where Python's == would mix the values up.
    for other in ({"$gt": 50.0, "$lte": 100}, {"$gt": 51, "$lte": 100}, {"$gt": 50}):
        changed = ComputedTrait.from_dict({**written, "where": {**written["where"], "total": other}})
        assert changed != trait and changed.signature != trait.signature
    assert ComputedTrait("t", "count", where={"f": {"$eq": True}}) != ComputedTrait(
        "t", "count", where={"f": {"$eq": 1}}
    )
    # An already normalised definition (as dataclasses.replace passes it) is taken as it is.
    assert (
        ComputedTrait("mid_orders", "count", event_names=trait.event_names, where=trait.where, window=trait.window)
        == trait
    )


def test_definitions_without_operators_keep_the_signature_stored_states_remember():
    # A changed signature would throw away every stored computed state of the definition.
    trait = ComputedTrait.from_dict(
        {"name": "shoe_revenue_30d", "op": "sum", "event_type": "track",
         "event_names": ["Order Completed", "Order Updated"], "property": "cart.total",
         "where": {"category": ["shoes", "boots"], "test": False, "coupon": None}, "window": "30d"}
    )  # fmt: skip
    assert trait.signature == "8675a25db28019b2"
    assert trait.where == (("category", ("shoes", "boots")), ("coupon", (None,)), ("test", (False,)))


# A reference written straight from the rules, to compare the compiled predicates with.
ORDERINGS = {"$gt": operator.gt, "$gte": operator.ge, "$lt": operator.lt, "$lte": operator.le}


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "string" if isinstance(value, str) else "other"


def _double(value: Any) -> Any:
    """Numbers as the doubles JSON has (NaN for those that are none), anything else unchanged."""
    if _kind(value) != "number":
        return value
    try:
        number = float(value)
    except OverflowError:
        return math.nan
    return number if math.isfinite(number) else math.nan


def _equal(a: Any, b: Any) -> bool:
    return _kind(a) == _kind(b) != "other" and _double(a) == _double(b)


def reference(operators: dict[str, Any], value: Any) -> bool:
    present = value is not ABSENT and value is not None and _double(value) == _double(value)  # NaN: none
    for name, operand in operators.items():
        if name == "$exists":
            holds = present is operand
        elif not present:
            holds = False
        elif name == "$eq":
            holds = _equal(value, operand)
        elif name == "$ne":
            holds = not _equal(value, operand)
        elif name in ORDERINGS:
            kind = _kind(value)
            holds = kind == _kind(operand) in ("number", "string") and ORDERINGS[name](_double(value), operand)
        elif name == "$in":
            holds = any(_equal(value, o) for o in operand)
        elif name == "$contains":
            holds = (_kind(value) == _kind(operand) == "string" and operand in value) or (
                isinstance(value, list) and any(_equal(item, operand) for item in value)
            )
        else:
            holds = isinstance(value, str) and value.startswith(operand)
        if not holds:
            return False
    return True


SCALARS = [True, False, 0, 1, 1.0, 2, 2.5, -1, 2**53, "", "a", "ab", "b", "1", "B"]
VALUES = [ABSENT, None, math.nan, math.inf, -math.inf, 10**400, 2**53 + 1, [], ["a", 1], [True, 2.0], {"a": 1}]
VALUES += SCALARS
OPERANDS = {
    "$in": st.lists(st.sampled_from(SCALARS), min_size=1, max_size=3),
    "$exists": st.booleans(),
    "$starts_with": st.sampled_from(["", "a", "b", "1"]),
}


@st.composite
def operator_objects(draw: Any) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(WHERE_OPERATORS), min_size=1, max_size=3, unique=True))
    return {name: draw(OPERANDS.get(name, st.sampled_from(SCALARS))) for name in names}


@settings(max_examples=100, deadline=None)
@given(operator_objects())
def test_compiled_operator_objects_agree_with_the_rules_as_written(operators):
    for value in VALUES:
        assert matches(operators, value) is reference(operators, value), value
