"""The timeline base: what retention drops from a timeline is folded into the part's all-time computed traits'
states, so a trait rebuilt from the base plus the retained entries is what the whole history gives, for the
most active customers too (the ones the cap cuts)."""

from __future__ import annotations

import orjson

from cdp_profile.domain import ComputedTrait, Profile, Retention
from cdp_profile.records import decode_profile, encode_profile

DAY = 86400.0
HOUR = 3600.0
START = 1_700_000_000.0

ALL_TIME = [
    {"name": "orders", "op": "count", "event_names": ["Order Completed"]},
    {"name": "revenue", "op": "sum", "event_names": ["Order Completed"], "property": "total"},
    {"name": "aov", "op": "avg", "event_names": ["Order Completed"], "property": "total"},
    {"name": "smallest", "op": "min", "event_names": ["Order Completed"], "property": "total"},
    {"name": "largest", "op": "max", "event_names": ["Order Completed"], "property": "total"},
    {"name": "first_sku", "op": "first", "event_names": ["Product Viewed"], "property": "sku"},
    {"name": "last_sku", "op": "last", "event_names": ["Product Viewed"], "property": "sku"},
    {"name": "top_sku", "op": "most_frequent", "event_names": ["Product Viewed"], "property": "sku"},
    {"name": "skus", "op": "unique", "event_names": ["Product Viewed"], "property": "sku"},
    {"name": "sku_count", "op": "unique_count", "event_names": ["Product Viewed"], "property": "sku"},
    {"name": "first_seen_at", "op": "min", "event_type": "any", "property": "$at"},
    {"name": "speed", "op": "max_speed", "event_type": "any", "property": "$context.location"},
    {"name": "mismatches", "op": "mismatch_count", "event_names": ["Order Completed"], "property": "country",
     "compare": "$context.location.country"},
]  # fmt: skip
WINDOWED = {"name": "views_2d", "op": "count", "event_names": ["Product Viewed"], "window": "2d"}
LONG_WINDOWS = [  # over 1,500 hourly events these reach back past the cut: the base holds their dropped entries
    {"name": "orders_90d", "op": "count", "event_names": ["Order Completed"], "window": "90d"},
    {"name": "skus_90d", "op": "unique", "event_names": ["Product Viewed"], "property": "sku", "window": "90d"},
    {"name": "largest_40d", "op": "max", "event_names": ["Order Completed"], "property": "total", "window": "40d"},
]
PLACES = [(52.52, 13.40, "DE"), (48.86, 2.35, "FR"), (40.71, -74.0, "US")]


def _events(ev, person: str, count: int, *, start: float = START, step: float = HOUR):
    """A busy customer: product views, orders and pages, located, one an hour."""
    out = []
    for i in range(count):
        lat, lon, country = PLACES[(i * 7) % 3]
        context = {"location": {"latitude": lat, "longitude": lon, "country": country}}
        at = start + i * step
        if i % 5 == 0:
            props = {"total": float(1 + (i * 37) % 200), "country": PLACES[i % 3][2]}
            out.append(ev(f"{person}-o{i}", "track", "Order Completed", at, properties=props, context=context))
        elif i % 5 == 4:
            out.append(ev(f"{person}-p{i}", "page", "Home", at, context=context))
        else:
            sku = f"sku-{(i * 13) % 180:03d}"
            out.append(ev(f"{person}-v{i}", "track", "Product Viewed", at, properties={"sku": sku}, context=context))
    return out


def _apply(profile: Profile, events, defs) -> None:
    for event in events:
        profile.apply(event, defs, now=event.at)


def _rebuilt(profile: Profile, defs, now: float) -> dict:
    """Every trait recomputed the way a backfill (and a point-in-time training set) does."""
    copy = Profile.from_doc(orjson.loads(profile.to_json()), profile.timeline(), retention=profile.retention)
    for trait in defs:
        copy.backfill(trait, now=now)
    return copy.view(now=now).computed


def test_base_plus_the_retained_timeline_rebuilds_every_all_time_trait_of_a_person_past_the_cap(ev, defs_of):
    defs = defs_of(*ALL_TIME, WINDOWED, *LONG_WINDOWS)
    profile = Profile.new("busy", retention=Retention(max_events=1000))
    events = _events(ev, "busy", 1500)
    _apply(profile, events, defs)
    now = events[-1].at
    assert len(profile.timeline()) == 1000
    live = profile.view(now=now).computed
    assert live["orders"] == 300  # every event counted, not only the kept ones

    assert _rebuilt(profile, defs, now) == live
    assert live["orders_90d"] == 300
    for later in (now + 20 * DAY, now + 50 * DAY):  # as the windows move on past the dropped events
        assert _rebuilt(profile, defs, later) == profile.view(now=later).computed
    base = profile.parts["busy"].base
    dropped = events[499]  # the 500 oldest left the timeline: the cut is the newest of them
    assert (base.at, base.event_id) == (dropped.at, dropped.event_id)
    assert profile.timeline()[0].at > base.at


def test_a_late_event_older_than_a_full_timeline_and_the_age_limit_are_folded_too(ev, defs_of):
    defs = defs_of(*ALL_TIME)
    profile = Profile.new("p", retention=Retention(max_events=50, max_age_seconds=30 * DAY))
    events = _events(ev, "p", 120, step=6 * HOUR)  # 30 days: some leave by age, most by count
    _apply(profile, events, defs)
    now = events[-1].at
    late = ev("late", "track", "Order Completed", START - DAY, properties={"total": 999.0, "country": "DE"})
    profile.apply(late, defs, now=now)  # older than everything kept, and past the age limit
    profile.expire(defs, now=now + 25 * DAY)  # more leave by age as time passes
    assert len(profile.timeline()) < 50
    live = profile.view(now=now + 25 * DAY).computed
    assert live["largest"] == 999.0
    assert _rebuilt(profile, defs, now + 25 * DAY) == live


def test_merged_and_split_persons_past_the_cap_rebuild_from_their_bases(ev, defs_of):
    defs = defs_of(*ALL_TIME)
    ann, bob = Profile.new("ann", retention=Retention(max_events=300)), Profile.new("bob", retention=Retention(300))
    ann_events, bob_events = _events(ev, "ann", 400), _events(ev, "bob", 400, start=START + 30 * 60)
    _apply(ann, ann_events, defs)
    _apply(bob, bob_events, defs)
    now = START + 500 * HOUR
    ann.merge(bob, merge_id="m1", at=now, defs=defs, now=now)  # 600 entries: 300 more leave, from both
    _apply(ann, _events(ev, "more", 50, start=now), defs)
    later = now + 60 * HOUR
    assert _rebuilt(ann, defs, later) == ann.view(now=later).computed
    bob_again, _, _ = ann.split("bob", merge_id="m1", defs=defs, now=later)
    assert _rebuilt(ann, defs, later) == ann.view(now=later).computed
    assert _rebuilt(bob_again, defs, later) == bob_again.view(now=later).computed


def test_the_base_covers_only_traits_held_since_the_first_drop_and_forgets_removed_ones(ev, defs_of):
    orders = ComputedTrait.from_dict(ALL_TIME[0])
    defs = defs_of(orders)
    profile = Profile.new("p", retention=Retention(max_events=10))
    _apply(profile, _events(ev, "p", 30), defs)
    base = profile.parts["p"].base
    assert base.covers(orders)
    later = ComputedTrait.from_dict(ALL_TIME[1])  # defined after events were dropped: they never reached it
    assert not base.covers(later)
    assert not base.covers(ComputedTrait.from_dict(WINDOWED))
    profile.drop_computed("orders")
    assert not base.covers(orders) and "orders" not in base.computed


def test_a_profile_that_lost_events_before_it_had_a_base_gets_one_that_covers_nothing(ev, defs_of):
    defs = defs_of(*ALL_TIME[:2])
    profile = Profile.new("p", retention=Retention(max_events=10))
    _apply(profile, _events(ev, "p", 30), defs)
    doc = orjson.loads(profile.to_json())
    del doc["parts"][0]["base"]  # as an older release stored it: 20 events gone, nothing folded
    old = Profile.from_doc(doc, profile.timeline(), retention=profile.retention)
    _apply(old, _events(ev, "q", 1, start=START + 100 * HOUR), defs)
    base = old.parts["p"].base
    assert base is not None and base.sigs == {}
    assert not any(base.covers(trait) for trait in defs)


def test_the_base_is_stored_exported_and_a_write_that_folds_nothing_reencodes_none_of_it(ev, defs_of, monkeypatch):
    defs = defs_of(*ALL_TIME)
    profile = Profile.new("p", retention=Retention(max_events=20))
    _apply(profile, _events(ev, "p", 60), defs)
    loaded = decode_profile(encode_profile(profile), profile.timeline(), profile.retention)
    assert loaded.to_doc() == profile.to_doc()
    assert orjson.loads(profile.to_json()) == orjson.loads(orjson.dumps(profile.to_doc()))
    export = profile.export(now=START + 60 * HOUR)
    (part,) = export["timeline_base"]
    assert part["origin"] == "p" and part["computed"]["orders"] == 8  # 12 orders, the last 4 kept

    from cdp_profile.domain.aggregates import ComputedState

    encoded: list[str] = []
    to_doc = ComputedState.to_doc
    monkeypatch.setattr(ComputedState, "to_doc", lambda self: encoded.append(self.op) or to_doc(self))
    profile.set_scores({"churn": 0.4}, model="m", version="1", at=START + 61 * HOUR)
    profile.to_json()
    assert encoded == []
