"""Events the platform publishes on a person's behalf (identity's "Identifier Shared": source `identity`,
no user or anonymous id) are not the person's doing: they stay in the timeline and feed the computed
traits that name them, but `last_seen`, `event_count`, `first_seen` and traits over any event ignore them.
A fraud ring's dormant first account must not look active again because a new account joined its phone."""

from __future__ import annotations

from cdp_profile.domain import ComputedTraits, Profile, TimelineEntry

DAY = 86400.0
HOUR = 3600.0
NOW = 100 * DAY
SHARED = {"device_id": 3, "anonymous_id": 3}


def _told(ev, event_id: str = "identity:sh1", at: float = NOW - HOUR):
    """Identity's event, as its codec publishes it (what profile's decoder makes of it)."""
    return ev(
        event_id,
        "track",
        "Identifier Shared",
        at,
        source="identity",
        properties={"identifier_types": ["anonymous_id", "device_id"], "persons": 3},
        shared=SHARED,
    )


def test_a_dormant_account_told_of_a_newcomer_keeps_its_last_seen_and_event_count(ev, profile_of):
    profile = profile_of([ev("o1", "track", "Order Completed", NOW - 40 * DAY, user_id="u1")])
    before = profile.view(now=NOW)
    change = profile.apply(_told(ev), ComputedTraits(), now=NOW)
    after = profile.view(now=NOW)
    assert (after.last_seen, after.first_seen, after.event_count) == (before.last_seen, before.first_seen, 1)
    # still in the timeline, marked as the platform's, and reported (the change lists it)
    assert [entry.event_id for entry in profile.timeline()] == ["o1", "identity:sh1"]
    assert profile.timeline()[-1].platform and not profile.timeline()[0].platform
    assert change.event_ids == ["identity:sh1"] and change.timeline_added
    # a second delivery changes nothing, as for any event
    assert not profile.apply(_told(ev), ComputedTraits(), now=NOW)
    # a stored and reloaded profile says the same
    again = Profile.from_doc(profile.to_doc(), [entry.to_doc() for entry in profile.timeline()])
    assert again.view(now=NOW).last_seen == before.last_seen and again.timeline()[-1].platform


def test_a_client_source_named_identity_is_still_the_persons_activity(ev, profile_of):
    # the collector refuses any event with neither id: one from a source an operator called "identity" has one
    profile = profile_of([ev("identity:m1", "track", "Login", NOW - HOUR, source="identity", user_id="u1")])
    view = profile.view(now=NOW)
    assert (view.last_seen, view.event_count) == (NOW - HOUR, 1)
    assert not profile.timeline()[0].platform


def test_traits_that_name_the_event_read_it_and_traits_over_any_event_do_not(ev, defs_of, profile_of):
    defs = defs_of(
        {
            "name": "shared",
            "op": "max",
            "event_type": "any",
            "event_names": ["Login", "Identifier Shared"],
            "property": "$shared.device_id",
            "window": "24h",
        },
        {"name": "events_30d", "op": "count", "event_type": "any", "window": "30d"},
        {"name": "last_event_at", "op": "max", "event_type": "any", "property": "$at"},
        {"name": "tracks", "op": "count"},
    )
    login = ev("l1", "track", "Login", NOW - 2 * HOUR, user_id="u1")
    profile = profile_of([login, _told(ev)], defs, now=NOW)
    assert profile.view(now=NOW).computed == {
        "shared": 3,
        "events_30d": 1,
        "last_event_at": NOW - 2 * HOUR,
        "tracks": 1,
    }
    # a backfill replays the timeline the same way
    for trait in defs:
        profile.backfill(trait, now=NOW)
    assert profile.view(now=NOW).computed["events_30d"] == 1 and profile.view(now=NOW).computed["shared"] == 3


def test_merged_profiles_ignore_platform_events_in_their_activity_too(ev, profile_of):
    first = profile_of([ev("a1", "track", "Login", NOW - 40 * DAY, user_id="u1"), _told(ev)], person="a")
    second = profile_of([ev("b1", "track", "Login", NOW - 50 * DAY, user_id="u2")], person="b")
    first.merge(second, merge_id="m1", at=NOW, defs=ComputedTraits(), now=NOW)
    view = first.view(now=NOW)
    assert (view.last_seen, view.first_seen, view.event_count) == (NOW - 40 * DAY, NOW - 50 * DAY, 2)
    assert len(first.timeline()) == 3


def test_platform_marker_on_timeline_entries_follows_source_and_ids():
    entry = TimelineEntry(1.0, "identity:x", "track", "Identifier Shared", {}, "identity", "p")
    assert entry.platform
    assert not entry._replace(user_id="u1").platform
    assert not entry._replace(anonymous_id="a1").platform
    assert not entry._replace(source="web").platform
