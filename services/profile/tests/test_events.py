"""From protobuf to the domain and back: the event context as `$context` reads it, and `compare` over gRPC."""

from __future__ import annotations

from dataclasses import replace

from cdp.events.v1 import events_pb2
from cdp.profile.v1 import profile_pb2
from cdp_profile.api import definition_from_message, status_message
from cdp_profile.domain import ComputedTrait, ComputedTraits, Profile
from cdp_profile.domain.events import CONTEXT_FIELDS, context_subset
from cdp_profile.engine import Backfill
from cdp_profile.events import context_to_dict, to_profile_event


def full_context() -> events_pb2.Context:
    context = events_pb2.Context(
        ip="203.0.113.7", user_agent="Mozilla/5.0", locale="de-DE", timezone="Europe/Berlin", group_id="g1"
    )
    context.device.MergeFrom(
        events_pb2.Device(
            id="d1",
            advertising_id="ad1",
            ad_tracking_enabled=True,
            manufacturer="Google",
            model="Pixel 8",
            name="pixel",
            type="android",
            token="push-token",
        )
    )
    context.location.MergeFrom(
        events_pb2.Location(city="Berlin", country="DE", latitude=52.52, longitude=13.405, region="BE", speed=3.0)
    )
    context.os.MergeFrom(events_pb2.OperatingSystem(name="Android", version="14"))
    context.campaign.MergeFrom(
        events_pb2.Campaign(name="spring", source="newsletter", medium="email", term="shoes", content="a")
    )
    context.page.MergeFrom(
        events_pb2.Page(path="/p", referrer="https://r/", search="?q=1", title="Shoes", url="https://s/p")
    )
    context.app.MergeFrom(events_pb2.App(name="shop", version="1.2", build="7", namespace="com.shop"))
    context.library.MergeFrom(events_pb2.Library(name="analytics-android", version="4"))
    return context


def test_the_context_uses_segments_key_names_and_covers_exactly_what_definitions_may_read():
    converted = context_to_dict(full_context())
    shape = {key: set(value) if isinstance(value, dict) else None for key, value in converted.items()}
    assert shape == {key: None if fields is None else set(fields) for key, fields in CONTEXT_FIELDS.items()}
    assert converted["userAgent"] == "Mozilla/5.0"
    assert converted["device"]["advertisingId"] == "ad1"
    assert converted["location"] == {
        "city": "Berlin",
        "country": "DE",
        "region": "BE",
        "latitude": 52.52,
        "longitude": 13.405,
    }


def test_only_non_empty_fields_are_in_the_context():
    assert context_to_dict(events_pb2.Context()) == {}
    context = events_pb2.Context(ip="203.0.113.7")
    context.device.SetInParent()
    context.location.longitude = 13.405  # on the equator: a zero latitude of a pair is a real one
    assert context_to_dict(context) == {"ip": "203.0.113.7", "location": {"latitude": 0.0, "longitude": 13.405}}
    context.location.longitude = 0.0  # (0, 0): proto3 cannot tell it from "not sent"
    assert context_to_dict(context) == {"ip": "203.0.113.7"}


def test_the_context_is_converted_only_when_a_definition_reads_it():
    event = events_pb2.Event(
        message_id="m1",
        source_id="web",
        type=events_pb2.EVENT_TYPE_TRACK,
        event="Order Completed",
        user_id="u1",
        anonymous_id="a1",
        context=full_context(),
    )
    event.context.consent.category_preferences["Advertising"] = False
    resolved = events_pb2.ResolvedEvent(event=event, person_id="p1", identifiers=["user_id:u1"])
    cheap = to_profile_event(resolved)
    assert cheap.context == {}
    assert (cheap.user_id, cheap.anonymous_id) == ("u1", "a1")
    assert cheap.consent == {"purpose:Advertising": False}
    full = to_profile_event(resolved, needs_context=True)
    assert full.context == context_to_dict(full_context())
    assert full.consent == cheap.consent
    assert to_profile_event(events_pb2.ResolvedEvent(event=events_pb2.Event(message_id="m2"))).user_id == ""


def test_only_the_context_fields_definitions_read_and_timeline_entries_keep_are_converted():
    defs = ComputedTraits(
        ComputedTrait.from_dict(item)
        for item in (
            {"name": "paths", "op": "unique", "event_type": "any", "property": "$context.page.path"},
            {"name": "speed", "op": "max_speed", "event_type": "any", "property": "$context.location"},
        )
    )
    partial = events_pb2.Context(ip="203.0.113.7", user_agent="Mozilla/5.0")
    partial.location.longitude = 13.405
    partial.page.title = "Shoes"  # no path: nothing of the page is read
    for context in (full_context(), partial, events_pb2.Context()):
        event = events_pb2.Event(message_id="m1", type=events_pb2.EVENT_TYPE_TRACK, event="Viewed", context=context)
        resolved = events_pb2.ResolvedEvent(event=event, person_id="p1")
        whole = to_profile_event(resolved, needs_context=True)
        kept = to_profile_event(resolved, needs_context=True, context_keep=defs.context_keep)
        assert kept.context == context_subset(context_to_dict(context), defs.context_keep)
        assert kept == replace(whole, context=kept.context)
    assert kept.context == {}
    assert to_profile_event(resolved, needs_context=True, context_keep=defs.context_keep).context == {}
    # what the timeline entry keeps of it is the same
    event = events_pb2.Event(message_id="m2", type=events_pb2.EVENT_TYPE_TRACK, event="Viewed", context=full_context())
    resolved = events_pb2.ResolvedEvent(event=event, person_id="p1")
    entries = []
    for context_keep in (None, defs.context_keep):
        profile = Profile.new("p1")
        profile.apply(to_profile_event(resolved, needs_context=True, context_keep=context_keep), defs, now=1e9)
        entries.append(profile.timeline()[0].to_doc())
    assert entries[0] == entries[1]
    assert entries[1]["context"]["page"] == {"path": "/p"}


def test_identitys_counts_of_other_persons_on_the_events_identifiers_reach_the_domain_event():
    event = events_pb2.Event(message_id="m1", type=events_pb2.EVENT_TYPE_TRACK, event="Order Completed")
    resolved = events_pb2.ResolvedEvent(event=event, person_id="p1", shared_with={"device_id": 3})
    assert to_profile_event(resolved).shared == {"device_id": 3}
    assert to_profile_event(events_pb2.ResolvedEvent(event=event, person_id="p1")).shared == {}


def test_compare_goes_through_grpc_both_ways():
    message = profile_pb2.ComputedTraitDefinition(
        name="geo_mismatch_24h",
        op="mismatch_count",
        event_names=["Order Completed"],
        property="card_country",
        compare="$context.location.country",
        window="24h",
    )
    trait = definition_from_message(message)
    assert trait.compare == "$context.location.country"
    status = status_message(Backfill(trait=trait, defined_at=1.0))
    assert status.definition.compare == "$context.location.country"
    assert definition_from_message(status.definition) == trait
    plain = definition_from_message(profile_pb2.ComputedTraitDefinition(name="orders", op="count"))
    assert plain.compare is None
    assert status_message(Backfill(trait=plain, defined_at=1.0)).definition.compare == ""


def test_an_event_dated_after_its_arrival_happened_when_it_arrived():
    # Events stored before the collector capped `timestamp` at `received_at` (or replayed by a backfill)
    # may still carry a time from the future; the profile takes the earlier of the two.
    received, future, past = 1_714_564_800, 253_402_300_799, 1_546_300_800  # 2024-05-01, 9999-12-31, 2019-01-01
    event = events_pb2.Event(message_id="m1", type=events_pb2.EVENT_TYPE_TRACK, event="Order Completed")
    event.received_at.seconds = received
    event.timestamp.seconds = future
    assert to_profile_event(events_pb2.ResolvedEvent(event=event, person_id="p1")).at == received
    event.timestamp.seconds = past  # a historical import keeps its date
    assert to_profile_event(events_pb2.ResolvedEvent(event=event, person_id="p1")).at == past
    event.ClearField("received_at")  # nothing to compare with (not written by the collector): as given
    assert to_profile_event(events_pb2.ResolvedEvent(event=event, person_id="p1")).at == past


def test_an_event_from_the_future_does_not_pin_last_seen_windows_or_the_timeline():
    from cdp_profile.domain import ComputedTrait, ComputedTraits, Profile

    day, received = 86_400, 1_714_564_800
    defs = ComputedTraits([ComputedTrait("orders_30d", "count", event_names=("Order Completed",), window="30d")])

    def arriving(message_id: str, at: int, timestamp: int) -> events_pb2.ResolvedEvent:
        event = events_pb2.Event(message_id=message_id, type=events_pb2.EVENT_TYPE_TRACK, event="Order Completed")
        event.received_at.seconds, event.timestamp.seconds = at, timestamp
        return events_pb2.ResolvedEvent(event=event, person_id="p1")

    profile = Profile.new("p1")
    profile.apply(to_profile_event(arriving("forged", received, 253_402_300_799)), defs, now=received)
    profile.apply(to_profile_event(arriving("real", received + 60, received + 60)), defs, now=received + 60)
    assert profile.view(now=received + 60).last_seen == received + 60
    assert [entry.event_id for entry in profile.events(limit=2)[0]] == [
        ":real",
        ":forged",
    ]  # newest first (source:message ids)
    assert profile.expire(defs, now=received + 31 * day).computed == {"orders_30d": 0}  # both aged out
