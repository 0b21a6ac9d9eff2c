"""Pseudo-paths: computed traits over the event itself ($at, $hour, $context.<path>, $user_id, $anonymous_id,
$shared.<type>),
what the timeline keeps for them, and the errors a bad one gives."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from cdp_kit.errors import InvalidArgument
from cdp_profile.domain import ComputedTrait, ComputedTraits, Profile, TimelineEntry
from cdp_profile.domain.computed import local_hour

DAY = 86400.0
HOUR = 3600.0
WINTER = datetime(2024, 1, 15, 22, 30, tzinfo=UTC).timestamp()  # 23:30 in Berlin (UTC+1), 17:30 in New York
SUMMER = datetime(2024, 7, 15, 22, 30, tzinfo=UTC).timestamp()  # 00:30 next day in Berlin (UTC+2)
NOW = SUMMER + DAY


def value_of(profile: Profile, name: str, now: float = NOW):
    return profile.view(now=now).computed.get(name, "absent")


@pytest.mark.parametrize(
    ("at", "timezone", "hour"),
    [
        (WINTER, "Europe/Berlin", 23),
        (SUMMER, "Europe/Berlin", 0),  # daylight saving time
        (WINTER, "America/New_York", 17),
        (WINTER, None, 22),  # no time zone: UTC
        (WINTER, "Not/AZone", 22),  # not a zone: UTC
        (WINTER, "../../etc/passwd", 22),
        (WINTER, "", 22),
        (WINTER, 5, 22),
        (-1.0, None, 23),  # one second before the epoch
    ],
)
def test_hour_is_local_to_the_events_time_zone_when_it_names_one(at, timezone, hour):
    assert local_hour(at, timezone) == hour


def test_the_best_send_hour_is_the_most_frequent_local_hour(ev, profile_of, defs_of):
    defs = defs_of({"name": "send_hour", "op": "most_frequent", "event_type": "any", "property": "$hour"})
    berlin = {"timezone": "Europe/Berlin"}
    profile = profile_of(
        [
            ev("o1", "track", at=WINTER, context=berlin),  # 23 local
            ev("o2", "page", at=WINTER + DAY, context=berlin),  # 23 local
            ev("o3", "track", at=WINTER + 2 * DAY),  # 22 UTC
            ev("o4", "identify", at=WINTER + 3 * DAY, context={"timezone": "America/New_York"}),  # 17 local
        ],
        defs,
        now=NOW,
    )
    assert value_of(profile, "send_hour") == 23


def test_at_gives_the_time_of_the_last_order(ev, profile_of, defs_of):
    defs = defs_of(
        {"name": "last_order_at", "op": "max", "event_names": ["Order Completed"], "property": "$at"},
        {"name": "last_order_at_2", "op": "last", "event_names": ["Order Completed"], "property": "$at"},
        {"name": "first_seen_at", "op": "min", "event_type": "any", "property": "$at"},
    )
    profile = profile_of(
        [
            ev("o2", "track", "Order Completed", 200.0),
            ev("o1", "track", "Order Completed", 100.0),  # late, older
            ev("v1", "track", "Product Viewed", 300.0),
            ev("p1", "page", "Home", 50.0),
        ],
        defs,
    )
    computed = profile.view(now=NOW).computed
    assert computed == {"last_order_at": 200.0, "last_order_at_2": 200.0, "first_seen_at": 50.0}


def test_distinct_devices_in_a_day_fall_as_time_passes(ev, defs_of):
    defs = defs_of(
        {
            "name": "devices_24h",
            "op": "unique_count",
            "event_type": "any",
            "property": "$context.device.id",
            "window": "24h",
        }
    )
    profile = Profile.new("p")
    t0 = NOW - 20 * HOUR
    for event_id, at, device in [("e1", t0, "d1"), ("e2", t0 + HOUR, "d2"), ("e3", t0 + 10 * HOUR, "d2")]:
        profile.apply(ev(event_id, "track", at=at, context={"device": {"id": device}}), defs, now=NOW)
    profile.apply(ev("e4", "page", at=t0 + 11 * HOUR), defs, now=NOW)  # no device: no value
    assert value_of(profile, "devices_24h") == 2
    assert profile.next_expiry() == t0 + 24 * HOUR
    assert profile.expire(defs, now=t0 + 24 * HOUR).computed == {"devices_24h": 1}  # d1 left
    assert profile.expire(defs, now=t0 + 25 * HOUR).computed == {}  # one d2 left, the other is still there
    assert profile.expire(defs, now=t0 + 34 * HOUR).computed == {"devices_24h": 0}
    assert profile.next_expiry() is None


def test_user_ids_joined_into_a_person_are_counted_and_empty_ids_are_no_value(ev, profile_of, defs_of):
    defs = defs_of(
        {
            "name": "accounts_24h",
            "op": "unique_count",
            "event_names": ["Signed Up"],
            "property": "$user_id",
            "window": "24h",
        },
        {"name": "anonymous_ids", "op": "unique", "event_type": "any", "property": "$anonymous_id"},
        {"name": "signups_without_user", "op": "count", "event_names": ["Signed Up"], "where": {"$user_id": None}},
    )
    profile = profile_of(
        [
            ev("s1", "track", "Signed Up", NOW - HOUR, user_id="u1", anonymous_id="a1"),
            ev("s2", "track", "Signed Up", NOW - 2 * HOUR, user_id="u2", anonymous_id="a1"),
            ev("s3", "track", "Signed Up", NOW - 3 * HOUR, user_id="u2"),
            ev("s4", "track", "Signed Up", NOW - 4 * HOUR, anonymous_id="a2"),
            ev("s5", "track", "Signed Up", NOW - 2 * DAY, user_id="u3"),  # outside the day
        ],
        defs,
    )
    assert profile.view(now=NOW).computed == {
        "accounts_24h": 2,
        "anonymous_ids": ["a1", "a2"],
        "signups_without_user": 1,
    }


SHARED_DEVICE = {
    "name": "shared_device_accounts_24h",
    "op": "max",
    "event_type": "any",
    "property": "$shared.device_id",
    "window": "24h",
}


def test_the_most_other_accounts_seen_on_the_persons_device_in_a_day(ev, profile_of, defs_of):
    """Identity counts, on each event, the other persons seen with its device in the day before it; the
    profile keeps the highest count of the last 24 hours."""
    defs = defs_of(SHARED_DEVICE, {"name": "shared_anything", "op": "max", "property": "$shared.phone"})
    profile = profile_of(
        [
            ev("s1", "track", "Signed Up", NOW - 3 * HOUR, user_id="ring-3"),
            ev("v1", "track", "Product Viewed", NOW - 2 * HOUR, shared={"device_id": 2, "anonymous_id": 2}),
            ev("o1", "track", "Order Completed", NOW - HOUR, shared={"device_id": 3}),
            ev("o0", "track", "Order Completed", NOW - 2 * DAY, shared={"device_id": 7}),  # outside the day
        ],
        defs,
    )
    assert profile.view(now=NOW).computed == {"shared_device_accounts_24h": 3}
    assert profile.view(now=NOW + DAY).computed.get("shared_device_accounts_24h") is None  # the day has passed
    (entry, *_rest) = [e for e in profile.timeline() if e.event_id == "o1"]
    assert TimelineEntry.from_doc(json.loads(json.dumps(entry.to_doc()))).shared == {"device_id": 3}


def test_a_person_whose_events_carry_no_sharing_has_no_value(ev, profile_of, defs_of):
    profile = profile_of([ev("o1", "track", "Order Completed", NOW - HOUR)], defs_of(SHARED_DEVICE))
    assert profile.view(now=NOW).computed == {}
    assert set(profile.timeline()[0].to_doc()) == {"at", "event_id", "type", "name", "properties", "source", "origin"}


def test_where_filters_read_pseudo_paths_too(ev, profile_of, defs_of):
    defs = defs_of(
        {
            "name": "night_orders_in_germany",
            "op": "count",
            "where": {"$context.location.country": "DE", "$hour": [22, 23, 0, 1]},
        },
        {"name": "revenue_from_ips", "op": "unique", "property": "$context.ip", "where": {"currency": "EUR"}},
    )
    germany = {"location": {"country": "DE"}, "timezone": "Europe/Berlin", "ip": "203.0.113.9"}
    profile = profile_of(
        [
            ev("o1", "track", at=WINTER, context=germany, properties={"currency": "EUR"}),  # 23 local
            ev("o2", "track", at=WINTER - 6 * HOUR, context=germany, properties={"currency": "USD"}),  # 17 local
            ev("o3", "track", at=WINTER, context={"location": {"country": "FR"}}),
        ],
        defs,
    )
    assert profile.view(now=NOW).computed == {"night_orders_in_germany": 1, "revenue_from_ips": ["203.0.113.9"]}


def test_the_timeline_keeps_only_what_pseudo_paths_read_and_old_entries_still_load(ev, defs_of):
    defs = defs_of({"name": "locales", "op": "unique", "event_type": "any", "property": "$context.locale"})
    context = {
        "ip": "203.0.113.9",
        "timezone": "Europe/Berlin",
        "locale": "de-DE",
        "userAgent": "Mozilla/5.0",
        "device": {"id": "d1", "model": "Pixel", "advertisingId": "ad-1"},
        "location": {"city": "Berlin", "country": "DE", "latitude": 52.52, "longitude": 13.405, "region": "BE"},
        "page": {"url": "https://shop.example/"},
    }
    profile = Profile.new("p")
    profile.apply(ev("e1", "track", at=1.0, context=context, user_id="u1", anonymous_id="a1"), defs, now=NOW)
    (entry,) = profile.timeline()
    assert entry.context == {
        "ip": "203.0.113.9",
        "timezone": "Europe/Berlin",
        "locale": "de-DE",  # a definition reads it
        "device": {"id": "d1"},
        "location": {"city": "Berlin", "country": "DE", "latitude": 52.52, "longitude": 13.405},
    }
    assert (entry.user_id, entry.anonymous_id) == ("u1", "a1")
    assert TimelineEntry.from_doc(json.loads(json.dumps(entry.to_doc()))) == entry
    # Entries of events without any of it store nothing more than before, and old entries load.
    profile.apply(ev("e2", "track", at=2.0), defs, now=NOW)
    bare = profile.timeline()[-1].to_doc()
    assert set(bare) == {"at", "event_id", "type", "name", "properties", "source", "origin"}
    old = TimelineEntry.from_doc(bare)
    assert (old.context, old.user_id, old.anonymous_id) == ({}, "", "")


def test_backfill_of_a_pseudo_path_definition_equals_live_application(ev, defs_of):
    definitions = [
        {"name": "devices", "op": "unique_count", "event_type": "any", "property": "$context.device.id"},
        {"name": "send_hour", "op": "most_frequent", "event_type": "any", "property": "$hour"},
        {"name": "accounts", "op": "unique_count", "event_type": "any", "property": "$user_id", "window": "7d"},
        {"name": "speed", "op": "max_speed", "event_type": "any", "property": "$context.location"},
        {"name": "geo", "op": "mismatch_count", "property": "card", "compare": "$context.location.country"},
        {"name": "shared", "op": "max", "event_type": "any", "property": "$shared.device_id", "window": "2d"},
    ]
    defs = defs_of(*definitions)
    live = Profile.new("p")
    places = [("DE", 52.52, 13.405, "Europe/Berlin"), ("US", 40.7128, -74.006, "America/New_York")]
    for i in range(12):
        country, lat, lon, zone = places[i % 2]
        context = {
            "device": {"id": f"d{i % 3}"},
            "location": {"country": country, "latitude": lat, "longitude": lon},
            "timezone": zone,
        }
        card = {"card": "de" if i % 3 else "US"}
        shared = {"device_id": i} if i % 2 else {}
        event = ev(
            f"e{i}",
            "track",
            at=NOW - i * 5 * HOUR,
            context=context,
            user_id=f"u{i % 4}",
            properties=card,
            shared=shared,
        )
        live.apply(event, defs, now=NOW)
    expected = live.view(now=NOW).computed
    assert expected["speed"] > 1000 and expected["geo"] > 0 and expected["shared"] == 9
    entries = [TimelineEntry.from_doc(json.loads(json.dumps(e.to_doc()))) for e in live.timeline()]
    replayed = Profile.from_doc(json.loads(json.dumps(live.to_doc())), entries)
    for trait in defs:
        replayed.drop_computed(trait.name)
        replayed.backfill(trait, now=NOW)
    assert replayed.view(now=NOW).computed == expected


@pytest.mark.parametrize(
    ("document", "field", "hint"),
    [
        ({"name": "t", "op": "last", "property": "$foo"}, "property", "not a pseudo-path"),
        ({"name": "t", "op": "last", "property": "$set.plan"}, "property", "reserved"),
        ({"name": "t", "op": "last", "property": "$context."}, "property", "names no context field"),
        ({"name": "t", "op": "last", "property": "$context"}, "property", "names no context field"),
        ({"name": "t", "op": "last", "property": "$context.nope"}, "property", "userAgent"),
        ({"name": "t", "op": "last", "property": "$context.device.ID"}, "property", "advertisingId"),
        ({"name": "t", "op": "last", "property": "$context.device.id.x"}, "property", "not a field"),
        ({"name": "t", "op": "last", "property": "$context.ip.v4"}, "property", "one value"),
        ({"name": "t", "op": "last", "property": "$at.seconds"}, "property", "one value"),
        ({"name": "t", "op": "count", "where": {"$hours": 3}}, "where.$hours", "$hour"),
        ({"name": "t", "op": "max", "property": "$shared"}, "property", "$shared.device_id"),
        ({"name": "t", "op": "max", "property": "$shared.device_id.x"}, "property", "one identifier type"),
        ({"name": "t", "op": "max", "property": "$shared.Device"}, "property", "one identifier type"),
        ({"name": "t", "op": "max_speed", "property": "$shared.device_id"}, "property", "latitude"),
        ({"name": "t", "op": "count", "where": {"$context..ip": 3}}, "where.$context..ip", "names no context"),
    ],
)
def test_a_bad_pseudo_path_names_the_field_and_what_is_valid(document, field, hint):
    with pytest.raises(InvalidArgument) as caught:
        ComputedTrait.from_dict(document)
    assert caught.value.field == field
    assert hint in caught.value.description


def test_the_registry_knows_which_context_fields_events_and_the_timeline_need(defs_of):
    plain = defs_of({"name": "orders", "op": "count"}, {"name": "at", "op": "max", "property": "$at"})
    assert not plain.needs_context
    assert plain.context_keep == (
        ("device", "id"),
        ("ip",),
        ("location", "city"),
        ("location", "country"),
        ("location", "latitude"),
        ("location", "longitude"),
        ("timezone",),
    )
    assert defs_of({"name": "h", "op": "most_frequent", "property": "$hour"}).needs_context
    wide = defs_of(
        {"name": "s", "op": "max_speed", "property": "$context.location"},
        {"name": "m", "op": "unique", "property": "$context.device.model"},
        {"name": "c", "op": "count", "where": {"$context.campaign.source": "ads"}},
    )
    assert wide.needs_context
    assert wide.context_keep == (
        ("campaign", "source"),
        ("device", "id"),
        ("device", "model"),
        ("ip",),
        ("location",),  # kept whole: its fields are not listed again
        ("timezone",),
    )
    assert not ComputedTraits().needs_context
