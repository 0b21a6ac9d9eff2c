"""`unique` keeps the values seen most recently: a journey asking `entry.product_id in
computed.viewed_skus_30d` must find the product the person just viewed, however many they viewed and
whatever the product's id sorts like."""

from __future__ import annotations

import random

import orjson

from cdp_profile.domain import ComputedTrait, ComputedTraits, Profile
from cdp_profile.domain.aggregates import UNIQUE_LIMIT, ComputedState, UniqueAgg

DAY = 86400.0
NOW = 1_700_000_000.0
VIEWED_30D = ComputedTrait(
    "viewed_skus_30d", "unique", event_names=("Product Viewed",), property="product_id", window="30d"
)
VIEWED = ComputedTrait("viewed_skus", "unique", event_names=("Product Viewed",), property="product_id")
DEFS = ComputedTraits([VIEWED_30D, VIEWED])


def view(ev, event_id: str, at: float, sku: str):
    return ev(event_id, "track", "Product Viewed", at, properties={"product_id": sku})


def _views(ev, count: int, *, start: float = NOW - 10 * DAY, step: float = 60.0):
    """One product a minute, each new: the one viewed last has the highest id (the last by value)."""
    return [view(ev, f"e{i:04d}", start + i * step, f"sku-{i:04d}") for i in range(count)]


def test_the_product_viewed_last_is_in_the_trait_past_a_hundred_products(ev):
    profile = Profile.new("p")
    views = _views(ev, 150)  # sku-0149, the highest id, is the one viewed last
    for event in views:
        profile.apply(event, DEFS, now=NOW)
    computed = profile.view(now=NOW).computed
    for name in ("viewed_skus_30d", "viewed_skus"):
        assert "sku-0149" in computed[name]
        assert computed[name] == [f"sku-{i:04d}" for i in range(50, 150)]  # the 100 seen last, by value
    # seeing an old product again brings it back in, and the oldest of the hundred leaves
    profile.apply(view(ev, "again", NOW - DAY, "sku-0003"), DEFS, now=NOW)
    computed = profile.view(now=NOW).computed
    assert "sku-0003" in computed["viewed_skus_30d"] and "sku-0050" not in computed["viewed_skus_30d"]
    assert len(computed["viewed_skus_30d"]) == UNIQUE_LIMIT


def test_the_result_does_not_depend_on_arrival_order_or_replays(ev):
    views = _views(ev, 180) + [view(ev, f"r{i}", NOW - 5 * DAY + i, f"sku-{i:04d}") for i in range(0, 180, 7)]
    in_order = Profile.new("p")
    for event in views:
        in_order.apply(event, DEFS, now=NOW)
    shuffled = list(views)
    random.Random(5).shuffle(shuffled)
    late = Profile.new("p")
    for event in shuffled + shuffled[:40]:  # and some redelivered
        late.apply(event, DEFS, now=NOW)
    assert late.view(now=NOW).computed == in_order.view(now=NOW).computed
    # the same from a rebuild out of the timeline, and from two halves merged
    rebuilt = Profile.from_doc(orjson.loads(in_order.to_json()), in_order.timeline())
    for trait in DEFS:
        rebuilt.backfill(trait, now=NOW)
    assert rebuilt.view(now=NOW).computed == in_order.view(now=NOW).computed
    a, b = Profile.new("a"), Profile.new("b")
    for index, event in enumerate(views):
        (a if index % 2 else b).apply(event, DEFS, now=NOW)
    a.merge(b, merge_id="m1", at=NOW, defs=DEFS, now=NOW)
    assert a.view(now=NOW).computed == in_order.view(now=NOW).computed


def test_a_window_drops_the_views_that_age_out_and_the_older_ones_come_back_in_rank(ev):
    profile = Profile.new("p")
    old = [view(ev, f"o{i}", NOW - 40 * DAY + i, f"old-{i:03d}") for i in range(30)]  # out of the window
    recent = [view(ev, f"n{i}", NOW - 20 * DAY + i * 3600, f"new-{i:03d}") for i in range(120)]
    for event in old + recent:
        profile.apply(event, DEFS, now=NOW - 25 * DAY)
    later = NOW - 20 * DAY + 60 * 3600 + 30 * DAY  # the first 61 recent views have aged out too
    profile.expire(DEFS, now=later)
    computed = profile.view(now=later).computed
    assert computed["viewed_skus_30d"] == [f"new-{i:03d}" for i in range(61, 120)]
    assert computed["viewed_skus"] == [f"new-{i:03d}" for i in range(20, 120)]
    # the same as a state built from the views still in the window
    state = ComputedState.for_trait(VIEWED_30D)
    for event in recent[61:]:
        state.add(event.at, event.event_id, event.properties["product_id"], later)
    assert state.result() == computed["viewed_skus_30d"]


def test_a_value_seen_again_among_the_hundred_changes_nothing_to_publish(ev):
    profile = Profile.new("p")
    for event in _views(ev, 120):
        profile.apply(event, DEFS, now=NOW)
    assert profile.apply(view(ev, "x", NOW - DAY, "sku-0100"), DEFS, now=NOW).computed == {}


def test_a_state_stored_before_values_had_times_loads_and_shows_what_it_showed(ev):
    """[value, count] rows: the values rank after every value seen since, by value among themselves, so
    the state reads as before (the first hundred by value) until new views give them times."""
    rows = [[f"sku-{i:04d}", 1] for i in range(150)]
    state = ComputedState.from_doc({"op": "unique", "window": None, "sig": VIEWED.signature, "agg": rows})
    assert state.result() == [f"sku-{i:04d}" for i in range(100)]
    assert state.to_doc()["agg"] == rows  # stored back as it was while nothing changed
    state.add(NOW, "e1", "sku-0149", NOW)  # seen again: it has a time now, and ranks first
    assert "sku-0149" in state.result() and "sku-0099" not in state.result()
    assert ["sku-0149", 2, NOW, "e1"] in state.to_doc()["agg"]
    agg = state.agg
    assert isinstance(agg, UniqueAgg) and agg.copy().result("unique") == state.result()


def test_the_kept_ranking_is_what_ranking_from_scratch_gives_whatever_comes():
    """The state keeps its hundred in recency order while contributions come in time order; late ones,
    leaving values and values stored without times must leave it as a ranking made from scratch."""
    rng = random.Random(7)
    for _ in range(60):
        values = rng.choice([5, 120, 300])
        agg = UniqueAgg.from_doc([[f"v{i:04d}", 1] for i in range(0, values, rng.choice([1, 3, values + 1]))])
        for step in range(300):
            if rng.random() < 0.1 and agg.values:
                agg.remove(0.0, "gone", agg.values[rng.choice(list(agg.values))])
            else:
                at = float(rng.randint(0, 500)) if rng.random() < 0.3 else 1000.0 + step
                agg.add(at, f"e{rng.randint(0, 10**6)}", f"v{rng.randint(0, values):04d}")
            if rng.random() < 0.5:
                fresh = UniqueAgg(dict(agg.values), dict(agg.counts), dict(agg.at), dict(agg.ids))
                assert agg.result("unique") == fresh.result("unique")
