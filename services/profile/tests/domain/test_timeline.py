"""The timeline: every event once, in event-time order, bounded by retention, read newest first in pages."""

from __future__ import annotations

import pytest

from cdp_kit.errors import InvalidArgument
from cdp_profile.domain import ComputedTrait, ComputedTraits, Profile, Retention

NO_DEFS = ComputedTraits()
DAY = 86400.0
NOW = 100 * DAY


def ids(entries):
    return [e.event_id for e in entries]


def test_every_call_leaves_an_entry_in_event_time_order_once(ev):
    profile = Profile.new("p")
    events = [
        ev("e3", "track", "Order Completed", 30.0, properties={"total": 5}),
        ev("e1", "identify", at=10.0, traits={"plan": "pro"}),
        ev("e2", "page", "Pricing", 20.0),
        ev("e4", "group", at=30.0, group_id="acme", traits={"size": 5}),
        ev("e0", "alias", at=5.0, identifiers=("anonymous_id:a1",)),
        ev("e5", "screen", "Home", 40.0),
    ]
    for event in events:
        assert profile.apply(event, NO_DEFS, now=NOW).timeline_added[0].event_id == event.event_id
    assert not profile.apply(events[0], NO_DEFS, now=NOW)  # a duplicate leaves nothing
    timeline = profile.timeline()
    assert ids(timeline) == ["e0", "e1", "e2", "e3", "e4", "e5"]  # ties on time: event id
    identify = timeline[1]
    assert (identify.type, identify.properties, identify.source, identify.origin) == (
        "identify",
        {"plan": "pro"},
        "web",
        "p",
    )
    assert timeline[4].properties == {"size": 5}


def test_retention_by_count_drops_the_oldest_and_says_so(ev):
    profile = Profile.new("p", retention=Retention(max_events=3))
    for i in (1, 2, 3):
        profile.apply(ev(f"e{i}", at=i * 10.0), NO_DEFS, now=NOW)
    change = profile.apply(ev("e4", at=40.0), NO_DEFS, now=NOW)
    assert ids(change.timeline_added) == ["e4"] and ids(change.timeline_removed) == ["e1"]
    # Out of order, in the middle: it enters and the oldest leaves.
    change = profile.apply(ev("e2b", at=25.0), NO_DEFS, now=NOW)
    assert ids(change.timeline_removed) == ["e2"]
    assert ids(profile.timeline()) == ["e2b", "e3", "e4"]


def test_an_event_older_than_a_full_timeline_still_counts_but_leaves_no_entry(ev):
    orders = ComputedTraits([ComputedTrait("orders", "count")])
    profile = Profile.new("p", retention=Retention(max_events=2))
    for i in (5, 6):
        profile.apply(ev(f"e{i}", at=i * 10.0), orders, now=NOW)
    change = profile.apply(ev("old", at=1.0), orders, now=NOW)
    assert change.timeline_added == [] and change.timeline_removed == []
    assert change.computed == {"orders": 3}
    assert not profile.apply(ev("old", at=1.0), orders, now=NOW)  # still remembered as applied


def test_retention_by_age_applies_on_arrival_and_as_time_passes(ev):
    profile = Profile.new("p", retention=Retention(max_events=100, max_age_seconds=10 * DAY))
    assert not profile.apply(ev("ancient", at=NOW - 11 * DAY), NO_DEFS, now=NOW).timeline_added
    profile.apply(ev("e1", at=NOW - 9 * DAY), NO_DEFS, now=NOW)
    profile.apply(ev("e2", at=NOW - 1 * DAY), NO_DEFS, now=NOW)
    assert ids(profile.timeline()) == ["e1", "e2"]
    change = profile.expire(NO_DEFS, now=NOW + 1 * DAY)
    assert ids(change.timeline_removed) == ["e1"]
    change = profile.apply(ev("e3", at=NOW + 5 * DAY), NO_DEFS, now=NOW + 9 * DAY)
    assert ids(change.timeline_removed) == ["e2"]
    assert ids(profile.timeline()) == ["e3"]


def test_events_pages_newest_first_with_a_cursor(ev):
    profile = Profile.new("p")
    for i in range(7):
        profile.apply(ev(f"e{i}", at=float(i // 2)), NO_DEFS, now=NOW)  # pairs share a time
    page, cursor = profile.events(limit=3)
    assert ids(page) == ["e6", "e5", "e4"]
    page, cursor = profile.events(limit=3, before=cursor)
    assert ids(page) == ["e3", "e2", "e1"]
    page, cursor = profile.events(limit=3, before=list(cursor))  # a cursor that went through JSON
    assert ids(page) == ["e0"] and cursor is None
    page, cursor = profile.events(limit=7)
    assert len(page) == 7 and cursor is None  # no empty last page


def test_events_filter_by_type_and_name(ev):
    profile = Profile.new("p")
    profile.apply(ev("o1", "track", "Order Completed", 1.0), NO_DEFS, now=NOW)
    profile.apply(ev("v1", "track", "Product Viewed", 2.0), NO_DEFS, now=NOW)
    profile.apply(ev("p1", "page", "Pricing", 3.0), NO_DEFS, now=NOW)
    profile.apply(ev("o2", "track", "Order Completed", 4.0), NO_DEFS, now=NOW)
    assert ids(profile.events(limit=10, types=["page"])[0]) == ["p1"]
    page, cursor = profile.events(limit=1, names=["Order Completed"])
    assert ids(page) == ["o2"]
    assert ids(profile.events(limit=1, names=["Order Completed"], before=cursor)[0]) == ["o1"]
    assert ids(profile.events(limit=10, types=["track"], names=["Pricing"])[0]) == []


@pytest.mark.parametrize(("kwargs", "field"), [({"limit": 0}, "limit"), ({"limit": 5, "before": 7}, "before")])
def test_bad_paging_names_the_field(kwargs, field):
    with pytest.raises(InvalidArgument) as caught:
        Profile.new("p").events(**kwargs)
    assert caught.value.field == field


def test_identifiers_are_every_key_seen_on_the_persons_events(ev):
    profile = Profile.new("p")
    profile.apply(ev("e1", identifiers=("user_id:u1", "anonymous_id:a1")), NO_DEFS, now=NOW)
    profile.apply(ev("e2", identifiers=("email:a@x.io",)), NO_DEFS, now=NOW)
    assert profile.identifiers() == {"user_id:u1", "anonymous_id:a1", "email:a@x.io"}
    assert profile.view(now=NOW).identifiers == profile.identifiers()


def test_retention_settings_are_validated():
    with pytest.raises(InvalidArgument) as caught:
        Retention(max_events=0)
    assert caught.value.field == "retention.max_events"
    with pytest.raises(InvalidArgument) as caught:
        Retention(max_age_seconds=-1)
    assert caught.value.field == "retention.max_age_seconds"


def test_applied_ids_are_remembered_for_the_newest_events_and_always_for_the_timeline(ev):
    from cdp_profile.domain.profile import MIN_SEEN_IDS

    profile = Profile.new("p", retention=Retention(max_events=10))
    for i in range(MIN_SEEN_IDS * 2):
        profile.apply(ev(f"e{i:05d}", at=float(i)), NO_DEFS, now=NOW)
    assert len(profile.to_doc()["parts"][0]["seen"]) <= MIN_SEEN_IDS * 5 // 4  # bounded
    newest = MIN_SEEN_IDS * 2 - 1
    for i in range(newest - MIN_SEEN_IDS + 1, newest + 1, 97):  # the newest MIN_SEEN_IDS: duplicates
        assert not profile.apply(ev(f"e{i:05d}", at=float(i)), NO_DEFS, now=NOW)
    # Far older than the remembered ids: applied again (the engine's checkpoints prevent such redeliveries).
    assert profile.apply(ev("e00000", at=0.0), NO_DEFS, now=NOW).event_ids == ["e00000"]


def test_an_import_dated_year_1_is_the_first_seen_outside_every_window_and_first_to_age_out(ev):
    year_1 = -62_135_596_800.0  # 0001-01-01, the earliest time the collector accepts
    defs = ComputedTraits([ComputedTrait("orders_30d", "count", event_names=("Order Completed",), window="30d")])
    kept = Profile.new("p")  # no age limit: kept, and the first to go by count
    change = kept.apply(ev("ancient", at=year_1), defs, now=NOW)
    assert ids(change.timeline_added) == ["ancient"] and change.computed == {"orders_30d": 0}
    kept.apply(ev("recent", at=NOW - DAY), defs, now=NOW)
    view = kept.view(now=NOW)
    assert (view.first_seen, view.last_seen, view.computed["orders_30d"]) == (year_1, NOW - DAY, 1)
    aged = Profile.new("p", retention=Retention(max_age_seconds=365 * DAY))  # an age limit: never enters
    assert not aged.apply(ev("ancient", at=year_1), defs, now=NOW).timeline_added
    assert aged.view(now=NOW).first_seen == year_1
