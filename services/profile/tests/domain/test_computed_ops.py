"""Computed traits: every operation, filters, windows that fall with time alone, backfill, definition changes."""

from __future__ import annotations

import pytest

from cdp_profile.domain import ComputedTrait, ComputedTraits, Profile
from cdp_profile.domain.aggregates import UNIQUE_LIMIT

DAY = 86400.0
NOW = 100 * DAY


def order(ev, event_id, at, **properties):
    return ev(event_id, "track", "Order Completed", at, properties=properties)


ORDERS = [  # arrival order is deliberately not time order
    ("o3", 30.0, {"total": 30, "category": "bags"}),
    ("o1", 10.0, {"total": 10.5, "category": "shoes"}),
    ("o4", 40.0, {"total": "12", "category": "shoes"}),  # a numeric string: not a number
    ("o2", 20.0, {"total": True, "category": "hats"}),  # a boolean: not a number
    ("o5", 50.0, {"total": -4, "category": "bags"}),
    ("o6", 50.0, {"category": None}),  # no total; a null category is no value
]


@pytest.mark.parametrize(
    ("op", "prop", "expected"),
    [
        ("count", None, 6),
        ("sum", "total", 36.5),
        ("avg", "total", 36.5 / 3),
        ("min", "total", -4),
        ("max", "total", 30),
        ("first", "total", 10.5),  # by event time, not arrival
        ("last", "total", -4),
        ("first", "category", "shoes"),
        ("last", "category", "bags"),  # o6 at the same time has no value
        ("most_frequent", "category", "bags"),  # bags 2, shoes 2: ties go to the smallest value
        ("unique", "category", ["bags", "hats", "shoes"]),
        ("unique_count", "category", 3),
        ("unique", "total", [True, -4, 10.5, 30, "12"]),  # any JSON value: null < booleans < numbers < strings
    ],
)
def test_every_operation_over_out_of_order_events(ev, op, prop, expected):
    trait = ComputedTrait("t", op, property=prop)
    profile = Profile.new("p")
    for event_id, at, properties in ORDERS:
        profile.apply(order(ev, event_id, at, **properties), ComputedTraits([trait]), now=NOW)
    value = profile.view(now=NOW).computed["t"]
    assert value == (pytest.approx(expected) if isinstance(expected, float) else expected)
    assert type(value) is type(expected)


def test_results_have_their_documented_types_when_nothing_contributed(ev):
    traits = [
        ComputedTrait(f"{op}_t", op, property="total")
        for op in ("sum", "avg", "min", "first", "most_frequent", "unique", "unique_count")
    ]
    profile = Profile.new("p")
    profile.apply(order(ev, "o1", 1.0, total="n/a"), ComputedTraits(traits), now=NOW)
    # Only the value-agnostic ones saw a contribution; the numeric ones have none and do not appear.
    assert profile.view(now=NOW).computed == {
        "first_t": "n/a",
        "most_frequent_t": "n/a",
        "unique_t": ["n/a"],
        "unique_count_t": 1,
    }
    windowed = ComputedTraits(
        [
            ComputedTrait(f"{op}_w", op, property="total", window="1d")
            for op in ("count", "sum", "avg", "min", "last", "most_frequent", "unique", "unique_count")
        ]
    )
    profile.apply(order(ev, "o2", NOW - 2 * DAY, total=5), windowed, now=NOW)  # already outside the window
    assert profile.view(now=NOW).computed == {
        "first_t": "n/a", "most_frequent_t": "n/a", "unique_t": ["n/a"], "unique_count_t": 1,
        "count_w": 0, "sum_w": 0.0, "avg_w": None, "min_w": None, "last_w": None, "most_frequent_w": None,
        "unique_w": [], "unique_count_w": 0,
    }  # fmt: skip


def test_filters_by_type_name_and_where(ev):
    defs = ComputedTraits(
        [
            ComputedTrait("shoe_orders", "count", event_names=("Order Completed",), where={"category": "shoes"}),
            ComputedTrait("big_or_bag", "sum", property="total", where={"category": ["bags", "boots"]}),
            ComputedTrait("pricing_views", "count", event_type="page", event_names=("Pricing",)),
            ComputedTrait("plans", "unique", event_type="identify", property="plan"),
            ComputedTrait("sources_seen", "unique_count", event_type="any", property="campaign"),
        ]
    )
    profile = Profile.new("p")
    for event in [
        order(ev, "o1", 1.0, total=10, category="shoes", campaign="x"),
        order(ev, "o2", 2.0, total=20, category="bags"),
        ev("v1", "track", "Product Viewed", 3.0, properties={"category": "shoes"}),
        ev("p1", "page", "Pricing", 4.0, properties={"campaign": "y"}),
        ev("p2", "page", "Home", 5.0),
        ev("i1", "identify", at=6.0, traits={"plan": "pro", "campaign": "x"}),
        ev("i2", "identify", at=7.0, traits={"plan": "free"}),
    ]:
        profile.apply(event, defs, now=NOW)
    assert profile.view(now=NOW).computed == {
        "shoe_orders": 1,
        "big_or_bag": 20.0,
        "sources_seen": 2,
        "pricing_views": 1,
        "plans": ["free", "pro"],
    }


def test_apply_reports_only_computed_values_that_changed(ev):
    defs = ComputedTraits(
        [
            ComputedTrait("revenue", "sum", property="total"),
            ComputedTrait("top", "max", property="total"),
            ComputedTrait("kinds", "unique", property="category"),
        ]
    )
    profile = Profile.new("p")
    assert profile.apply(order(ev, "o1", 1.0, total=10, category="a"), defs, now=NOW).computed == {
        "revenue": 10.0,
        "top": 10,
        "kinds": ["a"],
    }
    assert profile.apply(order(ev, "o2", 2.0, total=0, category="a"), defs, now=NOW).computed == {}
    assert profile.apply(order(ev, "o3", 3.0, total=5, category="b"), defs, now=NOW).computed == {
        "revenue": 15.0,
        "kinds": ["a", "b"],
    }


def test_a_windowed_count_falls_when_an_order_ages_out_with_no_new_event(ev):
    defs = ComputedTraits([ComputedTrait("orders_30d", "count", event_names=("Order Completed",), window="30d")])
    profile = Profile.new("p")
    profile.apply(order(ev, "o1", NOW - 20 * DAY), defs, now=NOW)
    profile.apply(order(ev, "o2", NOW - 5 * DAY), defs, now=NOW)
    assert profile.view(now=NOW).computed == {"orders_30d": 2}
    assert profile.next_expiry() == NOW + 10 * DAY
    assert not profile.expire(defs, now=NOW + 10 * DAY - 1)
    assert profile.view(now=NOW + 10 * DAY).computed == {"orders_30d": 1}  # views see time pass...
    assert profile.view(now=NOW).computed == {"orders_30d": 2}  # ...without changing the profile
    assert profile.expire(defs, now=NOW + 10 * DAY).computed == {"orders_30d": 1}
    assert profile.next_expiry() == NOW + 25 * DAY
    assert profile.expire(defs, now=NOW + 40 * DAY).computed == {"orders_30d": 0}
    assert profile.next_expiry() is None
    assert profile.view(now=NOW + 40 * DAY).computed == {"orders_30d": 0}


def test_windowed_min_first_and_most_frequent_are_exact_after_their_holder_leaves(ev):
    defs = ComputedTraits(
        [
            ComputedTrait("cheapest_7d", "min", property="total", window="7d"),
            ComputedTrait("first_7d", "first", property="category", window="7d"),
            ComputedTrait("usual_7d", "most_frequent", property="category", window="7d"),
            ComputedTrait("avg_7d", "avg", property="total", window="7d"),
        ]
    )
    profile = Profile.new("p")
    for event_id, days_ago, total, category in [
        ("o1", 6, 1, "x"),
        ("o2", 5, 9, "x"),
        ("o3", 4, 5, "y"),
        ("o4", 1, 7, "y"),
        ("o5", 1, 8, "y"),
    ]:
        profile.apply(order(ev, event_id, NOW - days_ago * DAY, total=total, category=category), defs, now=NOW)
    assert profile.view(now=NOW).computed == {"cheapest_7d": 1, "first_7d": "x", "usual_7d": "y", "avg_7d": 6.0}
    change = profile.expire(defs, now=NOW + 2.5 * DAY)  # o1 and o2 leave
    assert change.computed == {"cheapest_7d": 5, "first_7d": "y", "avg_7d": pytest.approx(20 / 3)}
    change = profile.expire(defs, now=NOW + 4 * DAY)  # o3 leaves too: only o4 and o5 are left
    assert change.computed == {"cheapest_7d": 7, "avg_7d": 7.5}


def test_an_out_of_order_event_lands_in_the_right_place_in_a_window(ev):
    defs = ComputedTraits([ComputedTrait("last_7d", "last", property="total", window="7d")])
    profile = Profile.new("p")
    profile.apply(order(ev, "late", NOW - 1 * DAY, total=2), defs, now=NOW)
    assert profile.apply(order(ev, "early", NOW - 6 * DAY, total=1), defs, now=NOW).computed == {}
    assert profile.next_expiry() == NOW + 1 * DAY
    assert profile.expire(defs, now=NOW + 1 * DAY).computed == {}  # "early" left; "late" is still last


def test_most_frequent_ties_go_to_the_smallest_value_and_unique_is_capped(ev):
    defs = ComputedTraits(
        [
            ComputedTrait("usual", "most_frequent", property="v"),
            ComputedTrait("values", "unique", property="v"),
            ComputedTrait("how_many", "unique_count", property="v"),
        ]
    )
    profile = Profile.new("p")
    for i, value in enumerate(["b", 2, "a", True, "b", "a", 2]):
        profile.apply(order(ev, f"o{i}", float(i), v=value), defs, now=NOW)
    assert profile.view(now=NOW).computed == {"usual": 2, "values": [True, 2, "a", "b"], "how_many": 4}
    for i in range(UNIQUE_LIMIT + 20):
        profile.apply(order(ev, f"n{i}", 100.0 + i, v=f"v{i:04d}"), defs, now=NOW)
    computed = profile.view(now=NOW).computed
    # the UNIQUE_LIMIT values seen last (the four early ones and the first 20 new ones are older), by value
    assert computed["values"] == [f"v{i:04d}" for i in range(20, UNIQUE_LIMIT + 20)]
    assert computed["how_many"] == 4 + UNIQUE_LIMIT + 20


def test_backfill_computes_a_new_trait_from_the_retained_timeline(ev):
    profile = Profile.new("p")
    for i, days_ago in enumerate([40, 20, 3, 1]):
        profile.apply(order(ev, f"o{i}", NOW - days_ago * DAY, total=10 * (i + 1)), ComputedTraits(), now=NOW)
    revenue = ComputedTrait("revenue_30d", "sum", property="total", window="30d")
    change = profile.backfill(revenue, now=NOW)
    assert change.computed == {"revenue_30d": 90.0}
    assert profile.next_expiry() == NOW + 10 * DAY
    assert not profile.backfill(revenue, now=NOW)  # backfilling again recomputes the same
    # From now on it updates incrementally like any other.
    defs = ComputedTraits([revenue])
    assert profile.apply(order(ev, "o9", NOW, total=1), defs, now=NOW).computed == {"revenue_30d": 91.0}
    # A trait nothing matches disappears (or never appears).
    assert profile.backfill(ComputedTrait("revenue_30d", "sum", property="nope"), now=NOW).computed == {
        "revenue_30d": None
    }


def test_backfill_sees_only_what_retention_kept(ev):
    from cdp_profile.domain import Retention

    profile = Profile.new("p", retention=Retention(max_events=2))
    for i in range(5):
        profile.apply(order(ev, f"o{i}", float(i)), ComputedTraits(), now=NOW)
    assert profile.backfill(ComputedTrait("orders", "count"), now=NOW).computed == {"orders": 2}


def test_a_changed_definition_restarts_and_a_dropped_one_disappears(ev):
    old = ComputedTraits([ComputedTrait("value", "sum", property="total")])
    new = ComputedTraits([ComputedTrait("value", "max", property="total")])
    profile = Profile.new("p")
    profile.apply(order(ev, "o1", 1.0, total=5), old, now=NOW)
    profile.apply(order(ev, "o2", 2.0, total=3), old, now=NOW)
    assert profile.view(now=NOW).computed == {"value": 8.0}
    # Contributions made under the old definition are never mixed with the new one.
    assert profile.apply(order(ev, "o3", 3.0, total=4), new, now=NOW).computed == {"value": 4}
    assert profile.drop_computed("value").computed == {"value": None}
    assert profile.view(now=NOW).computed == {}
    assert not profile.drop_computed("value")


def test_next_expiry_covers_every_windowed_trait(ev):
    defs = ComputedTraits(
        [
            ComputedTrait("orders_7d", "count", window="7d"),
            ComputedTrait("orders_1d", "count", window="1d"),
            ComputedTrait("orders", "count"),
        ]
    )
    profile = Profile.new("p")
    assert profile.next_expiry() is None
    profile.apply(order(ev, "o1", NOW - 0.5 * DAY), defs, now=NOW)
    assert profile.next_expiry() == NOW + 0.5 * DAY
    profile.expire(defs, now=NOW + 0.5 * DAY)
    assert profile.next_expiry() == NOW + 6.5 * DAY
