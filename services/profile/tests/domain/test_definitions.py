"""Computed trait definitions: the JSON an operator writes, how it reads back, and every way it can be wrong."""

from __future__ import annotations

import math

import pytest

from cdp_kit.errors import InvalidArgument
from cdp_profile.domain import OPS, ComputedTrait, ComputedTraits, parse_window
from cdp_profile.domain.computed import MAX_DEFINITION_BYTES, MISSING


def test_a_definition_reads_back_the_way_it_was_written():
    written = {
        "name": "shoe_revenue_30d",
        "op": "sum",
        "event_type": "track",
        "event_names": ["Order Completed", "Order Updated"],
        "property": "cart.total",
        "where": {"category": ["shoes", "boots"], "test": False},
        "window": "30d",
    }
    trait = ComputedTrait.from_dict(written)
    assert trait.window == 30 * 86400
    assert trait.where == (("category", ("shoes", "boots")), ("test", (False,)))
    assert trait.to_dict() == written
    assert ComputedTrait.from_dict(trait.to_dict()) == trait
    assert hash(trait) == hash(ComputedTrait.from_dict(written))


def test_defaults_are_a_lifetime_trait_over_any_track_event():
    trait = ComputedTrait.from_dict({"name": "events", "op": "count"})
    assert (trait.event_type, trait.event_names, trait.property, trait.where, trait.window) == (
        "track",
        (),
        None,
        (),
        None,
    )


@pytest.mark.parametrize(
    ("given", "seconds", "written"),
    [("90s", 90, "90s"), ("15m", 900, "15m"), ("12h", 43200, "12h"), ("30d", 2592000, "30d"), ("2w", 1209600, "2w"),
     (3600, 3600, "1h"), (45, 45, "45s"), (1.5, 1.5, 1.5), (None, None, None)],
)  # fmt: skip
def test_windows_are_seconds_or_text_and_read_back_in_the_shortest_exact_form(given, seconds, written):
    trait = ComputedTrait("t", "count", window=given)
    assert trait.window == seconds
    assert trait.to_dict()["window"] == written


@pytest.mark.parametrize(
    ("document", "field", "hint"),
    [
        ({"name": "Orders", "op": "count"}, "name", "lower-case"),
        ({"name": "9lives", "op": "count"}, "name", "lower-case"),
        ({"name": "x" * 65, "op": "count"}, "name", "64"),
        ({"name": "t", "op": "median"}, "op", "most_frequent"),
        ({"name": "t", "op": "count", "event_type": "click"}, "event_type", "identify"),
        ({"name": "t", "op": "sum"}, "property", "required"),
        ({"name": "t", "op": "first", "property": "a..b"}, "property", "dots"),
        ({"name": "t", "op": "count", "event_names": [""]}, "event_names", "non-empty"),
        ({"name": "t", "op": "count", "where": ["plan"]}, "where", "object"),
        ({"name": "t", "op": "count", "where": {"plan": {"a": 1}}}, "where.plan.a", "not an operator"),
        ({"name": "t", "op": "count", "where": {"plan": [{"a": 1}]}}, "where.plan", "string, number"),
        ({"name": "t", "op": "count", "where": {"plan": []}}, "where.plan", "non-empty list"),
        ({"name": "t", "op": "count", "window": "30 days"}, "window", "'30d'"),
        ({"name": "t", "op": "count", "window": 0}, "window", "longer than zero"),
        ({"name": "t", "op": "count", "window": True}, "window", "not a duration"),
        ({"name": "t", "op": "count", "windw": "30d"}, "windw", "unknown setting"),
        ({"op": "count"}, "name", "required"),
        ("count", "computed_trait", "object"),
    ],
)
def test_a_bad_definition_names_the_field_the_value_and_what_is_valid(document, field, hint):
    with pytest.raises(InvalidArgument) as caught:
        ComputedTrait.from_dict(document)
    assert caught.value.field == field
    assert hint in caught.value.description
    if isinstance(document, dict) and field in document and hint != "unknown setting":
        assert repr(document[field])[:20] in caught.value.description


def test_the_registry_refuses_duplicates_and_says_which_definition_is_wrong():
    with pytest.raises(InvalidArgument, match="declared twice"):
        ComputedTraits([ComputedTrait("t", "count"), ComputedTrait("t", "sum", property="x")])
    with pytest.raises(InvalidArgument) as caught:
        ComputedTraits.from_dicts([{"name": "ok", "op": "count"}, {"name": "bad", "op": "sum"}])
    assert caught.value.field == "computed_traits[1].property"


def test_the_registry_hands_an_event_only_the_definitions_it_feeds():
    orders = ComputedTrait("orders", "count", event_names=("Order Completed",))
    tracks = ComputedTrait("tracks", "count")
    pricing = ComputedTrait("pricing", "count", event_type="page", event_names=("Pricing",))
    anything = ComputedTrait("anything", "count", event_type="any")
    named_anywhere = ComputedTrait("named", "count", event_type="any", event_names=("Pricing",))
    defs = ComputedTraits([orders, tracks, pricing, anything, named_anywhere])
    assert defs.matching("track", "Order Completed") == (orders, tracks, anything)
    assert defs.matching("track", "Cart Viewed") == (tracks, anything)
    assert defs.matching("page", "Pricing") == (pricing, anything, named_anywhere)
    assert defs.matching("identify", "") == (anything,)
    assert len(defs) == 5 and "orders" in defs and defs.get("nope") is None
    assert ComputedTraits.from_dicts(defs.to_dicts()).to_dicts() == defs.to_dicts()


def test_the_match_cache_stays_bounded_whatever_names_clients_send():
    defs = ComputedTraits([ComputedTrait("t", "count")])
    for i in range(10_000):
        assert defs.matching("track", f"event {i}")
    assert len(defs._cache) <= 4096


def test_values_that_do_not_fit_the_operation_do_not_contribute():
    total = ComputedTrait("t", "sum", property="total")
    assert total.extract({"total": 3}) == 3
    assert total.extract({"total": 2.5}) == 2.5
    for bad in ("12", True, None, math.nan, math.inf, [1], {"v": 1}):
        assert total.extract({"total": bad}) is MISSING, bad
    assert total.extract({}) is MISSING
    assert total.extract({"total": {"nested": 1}}) is MISSING
    # first/last remember any JSON value; nulls are absences.
    assert ComputedTrait("t", "last", property="cart").extract({"cart": {"items": 2}}) == {"items": 2}
    assert ComputedTrait("t", "last", property="cart").extract({"cart": None}) is MISSING
    assert ComputedTrait("t", "first", property="cart.items").extract({"cart": {"items": [1]}}) == [1]


def test_where_is_equality_with_lists_meaning_one_of_and_booleans_apart_from_numbers():
    trait = ComputedTrait("t", "count", where={"plan": ["pro", "team"], "seats": 1})
    assert trait.extract({"plan": "pro", "seats": 1}) is None  # count: the event itself contributes
    assert trait.extract({"plan": "team", "seats": 1.0}) is None
    assert trait.extract({"plan": "free", "seats": 1}) is MISSING
    assert trait.extract({"plan": "pro", "seats": True}) is MISSING
    assert trait.extract({"plan": "pro"}) is MISSING
    missing_ok = ComputedTrait("t", "count", where={"coupon": None})
    assert missing_ok.extract({}) is None
    assert missing_ok.extract({"coupon": None}) is None
    assert missing_ok.extract({"coupon": "X"}) is MISSING
    # count with a property counts only events that carry it
    counted = ComputedTrait("t", "count", property="coupon")
    assert counted.extract({"coupon": "X"}) is None
    assert counted.extract({}) is MISSING


def test_every_operation_is_known_and_windows_parse_alone():
    assert OPS == (
        "count",
        "sum",
        "avg",
        "min",
        "max",
        "first",
        "last",
        "most_frequent",
        "unique",
        "unique_count",
        "max_speed",
        "mismatch_count",
    )
    assert parse_window("1w") == 604800
    with pytest.raises(InvalidArgument) as caught:
        parse_window(-5, "retention")
    assert caught.value.field == "retention"


@pytest.mark.parametrize(
    "where, field",
    [
        ({"total": "deep"}, "where.total"),
        ({"total": {"$in": "deep"}}, "where.total.$in"),
        ({"total": {"$eq": {"x": "deep"}}}, "where.total.$eq"),
    ],
)
def test_a_where_value_nested_a_thousand_levels_is_refused_naming_its_field(where, field):
    deep: object = 1
    for _ in range(3000):
        deep = [deep]

    def put(value):
        return deep if value == "deep" else {k: put(v) for k, v in value.items()} if isinstance(value, dict) else value

    with pytest.raises(InvalidArgument) as caught:
        ComputedTrait.from_dict({"name": "nested", "op": "count", "where": put(where)})
    assert caught.value.field == field
    assert len(caught.value.description) < 500  # the value is quoted shortened, not whole


def test_a_definition_larger_than_the_limit_is_refused_naming_it():
    plans = [f"plan-{i:08d}" for i in range(MAX_DEFINITION_BYTES // 12)]
    with pytest.raises(InvalidArgument) as caught:
        ComputedTrait.from_dict({"name": "wide", "op": "count", "where": {"plan": {"$in": plans}}})
    assert caught.value.field == "definition" and f"at most {MAX_DEFINITION_BYTES}" in caught.value.description
    ComputedTrait.from_dict({"name": "wide", "op": "count", "where": {"plan": {"$in": plans[:1000]}}})
