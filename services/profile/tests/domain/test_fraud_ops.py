"""max_speed (impossible travel) and mismatch_count (e.g. card country against IP country): values, windows
that fall with time, out-of-order and repeated events, merges and splits, definitions and their errors."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_kit.errors import InvalidArgument
from cdp_profile.domain import ComputedTrait, ComputedTraits, Profile, ProfileEvent
from cdp_profile.domain.aggregates import MAX_SPEED_POINTS, MaxSpeedAgg

DAY = 86400.0
HOUR = 3600.0
NOW = 1000 * DAY
BERLIN = {"city": "Berlin", "country": "DE", "latitude": 52.52, "longitude": 13.405}
NEW_YORK = {"city": "New York", "country": "US", "latitude": 40.7128, "longitude": -74.006}
ONE_KM_NORTH = math.degrees(1 / 6371)  # degrees of latitude for 1 km on the 6371 km sphere
BERLIN_NEW_YORK_KM = 6385.0

SPEED = ComputedTrait("speed", "max_speed", event_type="any", property="$context.location")
SPEED_1D = ComputedTrait("speed_1d", "max_speed", event_type="any", property="$context.location", window="1d")
GEO_MISMATCH = ComputedTrait(
    "geo_mismatch_24h",
    "mismatch_count",
    event_names=("Order Completed",),
    property="card_country",
    compare="$context.location.country",
    window="24h",
)


def seen(ev, event_id: str, at: float, location: dict | None = None, **properties):
    context = {"location": location} if location is not None else {}
    return ev(event_id, "track", "Order Completed", at, context=context, properties=properties)


def speed_of(profile: Profile, name: str = "speed", now: float = NOW):
    return profile.view(now=now).computed.get(name, "absent")


def test_berlin_then_new_york_an_hour_later_is_impossible_travel(ev):
    profile = Profile.new("p")
    defs = ComputedTraits([SPEED])
    change = profile.apply(seen(ev, "e1", NOW - 2 * HOUR, BERLIN), defs, now=NOW)
    assert change.computed == {"speed": None}  # one located event: no speed yet
    change = profile.apply(seen(ev, "e2", NOW - HOUR, NEW_YORK), defs, now=NOW)
    assert change.computed["speed"] == pytest.approx(BERLIN_NEW_YORK_KM, abs=1)
    # Back in Berlin a day later is a plausible flight (266 km/h); the maximum stays.
    assert not profile.apply(seen(ev, "e3", NOW + 23 * HOUR, BERLIN), defs, now=NOW).computed


def test_under_a_minute_counts_as_a_minute_and_the_same_place_is_zero(ev):
    north = {"latitude": 10.0 + ONE_KM_NORTH, "longitude": 0.0}
    profile = Profile.new("p")
    defs = ComputedTraits([SPEED])
    profile.apply(seen(ev, "e1", 100.0, {"latitude": 10.0, "longitude": 0.0}), defs, now=NOW)
    profile.apply(seen(ev, "e2", 101.0, north), defs, now=NOW)  # 1 km in 1 s: noise, counted over 60 s
    assert speed_of(profile) == pytest.approx(60.0)
    same = Profile.new("q")
    for i in range(3):
        same.apply(seen(ev, f"s{i}", 100.0 + i, north), defs, now=NOW)  # the same place, even at once
    assert speed_of(same) == 0.0


def test_only_located_events_count_and_fewer_than_two_is_null(ev):
    profile = Profile.new("p")
    defs = ComputedTraits([SPEED])
    for event_id, location in [
        ("e1", None),
        ("e2", {"country": "DE"}),
        ("e3", {"latitude": "52.5", "longitude": 13.4}),  # text is not a number
        ("e4", {"latitude": True, "longitude": 13.4}),
        ("e5", {"latitude": 95.0, "longitude": 13.4}),  # no such latitude
        ("e6", {"latitude": 52.5, "longitude": 181.0}),
    ]:
        profile.apply(seen(ev, event_id, 1.0, location), defs, now=NOW)
    assert speed_of(profile) == "absent"
    profile.apply(seen(ev, "e7", 2.0, BERLIN), defs, now=NOW)
    assert speed_of(profile) is None
    # Any payload path holding an object with latitude and longitude works too.
    store = ComputedTraits([ComputedTrait("store_speed", "max_speed", property="store")])
    other = Profile.new("q")
    other.apply(ev("o1", "track", at=0.0, properties={"store": BERLIN}), store, now=NOW)
    other.apply(ev("o2", "track", at=HOUR, properties={"store": NEW_YORK}), store, now=NOW)
    assert speed_of(other, "store_speed") == pytest.approx(BERLIN_NEW_YORK_KM, abs=1)


def test_a_late_event_between_two_others_changes_which_events_are_consecutive(ev):
    profile = Profile.new("p")
    defs = ComputedTraits([SPEED])
    profile.apply(seen(ev, "e1", 0.0, BERLIN), defs, now=NOW)
    profile.apply(seen(ev, "e3", 10 * HOUR, BERLIN), defs, now=NOW)
    assert speed_of(profile) == 0.0
    # Seen in New York in between, reported late: Berlin -> New York in 1 h.
    change = profile.apply(seen(ev, "e2", HOUR, NEW_YORK), defs, now=NOW)
    assert change.computed["speed"] == pytest.approx(BERLIN_NEW_YORK_KM, abs=1)
    # Redelivered: nothing changes.
    assert not profile.apply(seen(ev, "e2", HOUR, NEW_YORK), defs, now=NOW)
    assert speed_of(profile) == pytest.approx(BERLIN_NEW_YORK_KM, abs=1)


def test_a_windowed_speed_needs_both_events_in_the_window_and_falls_with_time(ev):
    profile = Profile.new("p")
    defs = ComputedTraits([SPEED_1D])
    t0 = NOW - 20 * HOUR
    profile.apply(seen(ev, "e1", t0, BERLIN), defs, now=NOW)
    profile.apply(seen(ev, "e2", t0 + HOUR, NEW_YORK), defs, now=NOW)
    profile.apply(seen(ev, "e3", t0 + 12 * HOUR, NEW_YORK), defs, now=NOW)
    assert speed_of(profile, "speed_1d") == pytest.approx(BERLIN_NEW_YORK_KM, abs=1)
    # Outside the window already: no pair with it.
    profile.apply(seen(ev, "e0", NOW - 2 * DAY, {"latitude": 0.0, "longitude": 0.0}), defs, now=NOW)
    assert speed_of(profile, "speed_1d") == pytest.approx(BERLIN_NEW_YORK_KM, abs=1)
    assert profile.next_expiry() == t0 + DAY
    assert profile.view(now=t0 + DAY).computed["speed_1d"] == 0.0  # a view sees time pass
    assert profile.expire(defs, now=t0 + DAY).computed == {"speed_1d": 0.0}  # Berlin left: NY -> NY
    assert profile.expire(defs, now=t0 + DAY + HOUR).computed == {"speed_1d": None}  # one point left
    assert profile.expire(defs, now=t0 + DAY + 12 * HOUR).computed == {}  # none left: still null
    assert profile.next_expiry() is None


def test_a_merge_pairs_events_of_both_persons_and_a_split_takes_it_back(ev):
    defs = ComputedTraits([SPEED, SPEED_1D])
    a, b = Profile.new("a"), Profile.new("b")
    a.apply(seen(ev, "a1", NOW - 3 * HOUR, BERLIN), defs, now=NOW)
    a.apply(seen(ev, "a2", NOW - HOUR, BERLIN), defs, now=NOW)
    b.apply(seen(ev, "b1", NOW - 2 * HOUR, NEW_YORK), defs, now=NOW)
    change = a.merge(b, merge_id="m1", at=NOW, defs=defs, now=NOW)
    assert change.computed["speed"] == pytest.approx(BERLIN_NEW_YORK_KM, abs=1)
    assert change.computed["speed_1d"] == change.computed["speed"]
    restored, mine, theirs = a.split("b", merge_id="m1", defs=defs, now=NOW)
    assert mine.computed == {"speed": 0.0, "speed_1d": 0.0}
    assert theirs.computed == {"speed": None, "speed_1d": None}
    assert restored.view(now=NOW).computed == {"speed": None, "speed_1d": None}


def test_an_event_applied_to_both_persons_before_their_merge_counts_once(ev):
    defs = ComputedTraits([SPEED])
    a, b = Profile.new("a"), Profile.new("b")
    a.apply(seen(ev, "a1", 0.0, BERLIN), defs, now=NOW)
    for profile in (a, b):
        profile.apply(seen(ev, "both", DAY, NEW_YORK), defs, now=NOW)
    a.merge(b, merge_id="m1", at=NOW, defs=defs, now=NOW)
    single = Profile.new("s")
    single.apply(seen(ev, "a1", 0.0, BERLIN), defs, now=NOW)
    single.apply(seen(ev, "both", DAY, NEW_YORK), defs, now=NOW)
    assert a.view(now=NOW).computed == single.view(now=NOW).computed
    assert [p for part in a.parts.values() for p in part.computed["speed"].agg.points] == [
        (0.0, "a1", 52.52, 13.405),
        (DAY, "both", 40.7128, -74.006),
    ]


def test_the_point_limit_keeps_the_newest_and_remembers_the_speeds_it_dropped():
    agg = MaxSpeedAgg()
    agg.add(0.0, "e0", [52.52, 13.405])
    agg.add(HOUR, "e1", [40.7128, -74.006])  # the fast pair, about to be dropped
    for i in range(2, MAX_SPEED_POINTS + 5):
        agg.add(i * HOUR, f"e{i}", [40.7128, -74.006])
    assert len(agg.points) == MAX_SPEED_POINTS and agg.points[0][1] == "e5"
    assert agg.result("max_speed") == pytest.approx(BERLIN_NEW_YORK_KM, abs=1)
    fresh = MaxSpeedAgg(*json.loads(json.dumps(agg.to_doc())))
    assert fresh.result("max_speed") == agg.result("max_speed")
    assert not agg.remove(5 * HOUR, "e5", [40.7128, -74.006])  # a window must rebuild from its entries


def test_mismatches_compare_strings_case_insensitively_and_skip_events_without_both(ev):
    defs = ComputedTraits([GEO_MISMATCH])
    profile = Profile.new("p")
    at = NOW - HOUR
    cases = [
        ("o1", " de ", BERLIN, False),  # the same country: compared, not a mismatch
        ("o2", "US", BERLIN, True),
        ("o3", "us", NEW_YORK, False),
        ("o4", "FR", None, None),  # no location: not compared
        ("o5", None, BERLIN, None),  # null: no value
        ("o6", "  ", BERLIN, None),  # blank: no value
        ("o7", ["DE"], BERLIN, None),  # not a scalar
        ("o8", 49, BERLIN, True),  # a number is not the string "DE"
    ]
    for event_id, card, location, _ in cases:
        properties = {} if card is None else {"card_country": card}
        profile.apply(seen(ev, event_id, at, location, **properties), defs, now=NOW)
    assert profile.view(now=NOW).computed == {"geo_mismatch_24h": 2}
    state = profile.parts["p"].computed["geo_mismatch_24h"]
    assert [value for _, _, value in state.entries] == [c[3] for c in cases if c[3] is not None]
    assert profile.next_expiry() == at + DAY
    # A later mismatch and a later match; then the first ones age out and only the later ones count.
    profile.apply(seen(ev, "o9", at + HOUR, NEW_YORK, card_country="DE"), defs, now=NOW)
    profile.apply(seen(ev, "o10", at + HOUR, BERLIN, card_country="DE"), defs, now=NOW)
    assert profile.view(now=NOW).computed == {"geo_mismatch_24h": 3}
    assert profile.expire(defs, now=at + DAY).computed == {"geo_mismatch_24h": 1}
    assert profile.expire(defs, now=at + DAY + HOUR).computed == {"geo_mismatch_24h": 0}


@pytest.mark.parametrize(
    ("a", "b", "mismatch"),
    [("DE", "de", False), (" Straße", "STRASSE ", False), ("DE", "AT", True), (1, 1.0, False), (True, 1, True),
     (True, True, False), (False, "false", True), ("12", 12, True)],
)  # fmt: skip
def test_mismatch_rule(a, b, mismatch):
    trait = ComputedTrait("m", "mismatch_count", property="a", compare="b")
    assert trait.extract({"a": a, "b": b}) is mismatch


def test_a_trait_with_nothing_compared_yet_is_absent_and_a_match_shows_zero(ev):
    defs = ComputedTraits([ComputedTrait("m", "mismatch_count", property="card_country", compare="ip_country")])
    profile = Profile.new("p")
    profile.apply(seen(ev, "o1", 1.0, card_country="DE"), defs, now=NOW)
    assert profile.view(now=NOW).computed == {}
    assert profile.apply(seen(ev, "o2", 2.0, card_country="DE", ip_country="de"), defs, now=NOW).computed == {"m": 0}
    assert profile.apply(seen(ev, "o3", 3.0, card_country="DE", ip_country="NL"), defs, now=NOW).computed == {"m": 1}


def test_definitions_with_compare_read_back_and_others_keep_their_signature():
    written = {
        "name": "geo_mismatch_24h",
        "op": "mismatch_count",
        "event_type": "track",
        "event_names": ["Order Completed"],
        "property": "card_country",
        "where": {},
        "window": "1d",  # "24h" reads back in the shortest exact form
        "compare": "$context.location.country",
    }
    trait = ComputedTrait.from_dict(written)
    assert trait.to_dict() == written
    assert ComputedTrait.from_dict(trait.to_dict()) == trait
    assert trait != ComputedTrait.from_dict({**written, "compare": "ip_country"})
    assert trait.signature != ComputedTrait.from_dict({**written, "compare": "ip_country"}).signature
    # Definitions stored before `compare` existed keep their signatures (and so their computed states).
    assert "compare" not in ComputedTrait("orders", "count").to_dict()
    assert ComputedTrait("orders", "count").signature == "0461451444e1ab47"


@pytest.mark.parametrize(
    ("document", "field", "hint"),
    [
        ({"name": "t", "op": "mismatch_count", "property": "card"}, "compare", "required"),
        ({"name": "t", "op": "mismatch_count", "compare": "ip_country"}, "property", "required"),
        ({"name": "t", "op": "count", "compare": "ip_country"}, "compare", "only op 'mismatch_count'"),
        ({"name": "t", "op": "last", "property": "a", "compare": "b"}, "compare", "remove 'compare'"),
        ({"name": "t", "op": "mismatch_count", "property": "a", "compare": "b..c"}, "compare", "dots"),
        ({"name": "t", "op": "mismatch_count", "property": "a", "compare": "$ctx.ip"}, "compare", "pseudo-path"),
        ({"name": "t", "op": "mismatch_count", "property": "$context.location", "compare": "b"}, "property",
         "is an object"),
        ({"name": "t", "op": "max_speed"}, "property", "required"),
        ({"name": "t", "op": "max_speed", "property": "$at"}, "property", "latitude and longitude"),
        ({"name": "t", "op": "max_speed", "property": "$context.device"}, "property", "'$context.location'"),
        ({"name": "t", "op": "max_speed", "property": "$context.location.latitude"}, "property", "latitude"),
        ({"name": "t", "op": "speed"}, "op", "max_speed, mismatch_count"),
    ],
)  # fmt: skip
def test_a_bad_definition_of_the_new_operations_names_the_field(document, field, hint):
    with pytest.raises(InvalidArgument) as caught:
        ComputedTrait.from_dict(document)
    assert caught.value.field == field
    assert hint in caught.value.description


PLACES = [BERLIN, NEW_YORK, {"latitude": 48.8566, "longitude": 2.3522}, {"latitude": 52.53, "longitude": 13.41}]


def reference_speed(points: list[tuple[float, str, dict]], now: float, window: float | None) -> float | None:
    """max_speed written plainly: the points inside the window in time order, every neighbouring pair."""
    inside = sorted((at, event_id, place) for at, event_id, place in points if window is None or at + window > now)
    best = None
    for (at1, _, p1), (at2, _, p2) in itertools.pairwise(inside):
        phi1, phi2 = math.radians(p1["latitude"]), math.radians(p2["latitude"])
        dphi, dlambda = phi2 - phi1, math.radians(p2["longitude"] - p1["longitude"])
        h = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlambda / 2) ** 2
        km = 2 * 6371 * math.asin(math.sqrt(h))
        speed = km / (max(at2 - at1, 60) / 3600)
        best = speed if best is None else max(best, speed)
    return best


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_max_speed_is_the_plain_definition_whatever_the_order_merges_and_time_passing(data):
    window = data.draw(st.sampled_from([None, DAY]))
    trait = ComputedTrait("s", "max_speed", event_type="any", property="$context.location", window=window)
    defs = ComputedTraits([trait])
    # Quarter hours over three days, some 30 s apart (under the one-minute floor), ties common.
    times = st.builds(lambda q, s: NOW - 3 * DAY + q * 900 + s, st.integers(0, 3 * 24 * 4), st.sampled_from([0, 30]))
    points = [
        (data.draw(times), f"e{i:02d}", data.draw(st.sampled_from(PLACES)))
        for i in range(data.draw(st.integers(0, 12)))
    ]
    owners = [data.draw(st.sampled_from("ab")) for _ in points]
    a, b = Profile.new("a"), Profile.new("b")
    for (at, event_id, place), owner in data.draw(st.permutations(list(zip(points, owners, strict=True)))):
        event = ProfileEvent(event_id, "track", "Order Completed", at, "web", context={"location": place})
        (a if owner == "a" else b).apply(event, defs, now=NOW)
    if data.draw(st.booleans()):
        a.merge(b, merge_id="m", at=NOW, defs=defs, now=NOW)
        mine = points
    else:
        mine = [point for point, owner in zip(points, owners, strict=True) if owner == "a"]

    def check(now: float) -> None:
        value = a.view(now=now).computed.get("s", "absent")
        expected = reference_speed(mine, now, window)
        if not mine:
            assert value == "absent"
        elif expected is None:
            assert value is None
        else:
            assert math.isclose(value, expected), (value, expected)

    for step in sorted(data.draw(st.lists(st.floats(0, 2 * DAY), max_size=4))):
        check(NOW + step)  # a view evaluates the window at `now`...
        a.expire(defs, now=NOW + step)  # ...and expiring changes the profile to the same
        check(NOW + step)
