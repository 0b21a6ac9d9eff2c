"""What reaches orchestration.in.<p> is read by where it came from; what can never be applied is rejected
(dead-lettered with a reason naming the header or stream, never a value)."""

from __future__ import annotations

import random
import re

import orjson
import pytest
from google.protobuf import json_format, struct_pb2

from cdp.events.v1 import events_pb2
from cdp.profile.v1 import profile_pb2
from cdp_kit.engine import Reject
from cdp_kit.profile_fields import change_fields
from cdp_orchestration import inputs, streams
from cdp_orchestration.inputs import decode


def source(stream: str, subject: str) -> dict[str, str]:
    return {streams.SOURCE_HEADER: f"{stream} 7 x.* orchestration.in.{{{{wildcard(1)}}}} {subject} abc"}


def test_a_sourced_event_batch_becomes_one_input_per_person_event():
    batch = events_pb2.ResolvedEventBatch(
        events=[
            events_pb2.ResolvedEvent(
                event=events_pb2.Event(message_id="m1", type=events_pb2.EVENT_TYPE_TRACK, event="Cart Abandoned"),
                person_id="p1",
            )
        ]
    )
    stream, what = streams.kind_of(source("EVENTS_RESOLVED", "events.resolved.3"))
    assert (stream, what) == ("EVENTS_RESOLVED", "events.resolved.3")
    [one] = decode(stream, what, batch.SerializeToString(), 10.0)
    assert (one.kind, one.person_id, one.at, one.data.name, one.data.type) == (
        "event",
        "p1",
        10.0,
        "Cart Abandoned",
        "track",
    )


def test_an_events_identifiers_are_kept_only_when_identity_linked_them_to_the_person():
    def resolved(*dropped: tuple[str, str, str], previous_id: str = "") -> events_pb2.ResolvedEvent:
        event = events_pb2.Event(
            message_id="m", event="Viewed", user_id="u1", anonymous_id="shared-device", previous_id=previous_id
        )
        return events_pb2.ResolvedEvent(
            event=event,
            person_id="p1",
            dropped=[events_pb2.DroppedIdentifier(type=t, value=v, reason=r) for t, v, r in dropped],
        )

    batch = events_pb2.ResolvedEventBatch(
        events=[
            resolved(),
            resolved(("anonymous_id", "shared-device", "quarantined")),
            # An alias of a known user id to a new one: identity refuses the previous id (one user id a
            # person) and links the new one, which outcome events must still carry.
            resolved(("user_id", "u0", "limit:user_id"), previous_id="u0"),
        ]
    )
    linked, quarantined, aliased = decode("EVENTS_RESOLVED", "events.resolved.0", batch.SerializeToString(), 1.0)
    assert (linked.data.user_id, linked.data.anonymous_id) == ("u1", "shared-device")
    # Identity left the quarantined anonymous id out: an outcome event sent under it would not reach p1.
    assert (quarantined.data.user_id, quarantined.data.anonymous_id) == ("u1", "")
    assert (quarantined.data.event().user_id, quarantined.data.event().anonymous_id) == ("u1", "")
    assert (aliased.data.user_id, aliased.data.anonymous_id) == ("u1", "shared-device")
    assert (aliased.data.event().user_id, aliased.data.event().anonymous_id) == ("u1", "shared-device")


def test_fired_timers_say_whose_and_which_kind():
    stream, what = streams.kind_of(
        {"Nats-Scheduler": "orchestration.timers.1.t", **source("ORCHESTRATION_TIMERS", "orchestration.fired.1")}
    )
    kinds = [
        decode(stream, what, orjson.dumps(body), 1.0)[0].kind
        for body in ({"t": "t", "i": "i", "p": "p"}, {"w": "w", "p": "p"}, {"s": "j", "p": "p", "at": 1.0})
    ]
    assert kinds == ["timer", "wake", "slot"]


@pytest.mark.parametrize(
    ("headers", "payload", "reason", "field"),
    [
        ({streams.COMMAND_HEADER: "drop_table"}, b"{}", "unknown_command", "Cdp-Command"),
        ({streams.COMMAND_HEADER: "exit"}, b"not json", "invalid_payload", "command"),
        (source("SEGMENTS", "segments.entered.0"), b"\xff\xff\xff", "invalid_payload", "SEGMENTS"),
        ({}, b"{}", "unknown_input", "headers"),
    ],
)
def test_what_can_never_be_applied_is_rejected_naming_where_it_came_from(headers, payload, reason, field):
    stream, what = streams.kind_of(headers)
    with pytest.raises(Reject) as rejected:
        decode(stream, what, payload, 1.0)
    assert (rejected.value.reason, rejected.value.field) == (reason, field)


def test_an_events_properties_are_read_as_sent_nested_values_and_all():
    properties = {
        "sku": "s-1",
        "price": 19.5,
        "quantity": 2,
        "gift": False,
        "coupon": None,
        "tags": ["a", 1, True, None, {"deep": [2.5]}],
        "shipping": {"city": "Oslo", "express": True, "legs": []},
    }
    message = events_pb2.Event(message_id="m1", type=events_pb2.EVENT_TYPE_TRACK, event="Order Completed")
    message.properties.update(properties)
    batch = events_pb2.ResolvedEventBatch(events=[events_pb2.ResolvedEvent(event=message, person_id="p1")])
    [one] = decode("EVENTS_RESOLVED", "events.resolved.0", batch.SerializeToString(), 10.0)
    assert (
        one.data.properties
        == json_format.MessageToDict(message.properties)
        == {
            **properties,
            "quantity": 2.0,
            "tags": ["a", 1.0, True, None, {"deep": [2.5]}],
        }
    )
    assert isinstance(one.data.properties["quantity"], float)  # JSON numbers, as the language compares them


def test_an_events_context_is_read_as_json_format_reads_it():
    # The context is read field by field (json_format's printer was the largest cost of decoding an event);
    # conditions read it by proto field names, so it must stay exactly what json_format gives.
    message = events_pb2.Event(message_id="m1", type=events_pb2.EVENT_TYPE_TRACK, event="Viewed")
    context = message.context
    context.ip, context.user_agent, context.locale = "192.0.2.1", "Mozilla/5.0", "nb-NO"
    context.page.url, context.page.title = "https://shop.example/p/1", "Shoes"
    context.device.SetInParent()  # present and empty: {}
    context.location.latitude, context.location.longitude = float("nan"), float("-inf")
    context.location.city = "Oslo"
    context.screen.width, context.screen.density = 390, 3.0
    context.network.wifi = True
    context.consent.category_preferences["Marketing"] = True
    context.consent.channel_preferences["sms"] = False
    context.traits.update({"plan": "pro", "seats": 3, "tags": ["a", None, {"deep": [1.5]}]})
    context.extra.update({"experiment": {"arm": "b"}})
    batch = events_pb2.ResolvedEventBatch(events=[events_pb2.ResolvedEvent(event=message, person_id="p1")])
    [one] = decode("EVENTS_RESOLVED", "events.resolved.0", batch.SerializeToString(), 10.0)
    expected = json_format.MessageToDict(context, preserving_proto_field_name=True)
    assert one.data.context == expected
    assert expected["location"] == {"city": "Oslo", "latitude": "NaN", "longitude": "-Infinity"}
    assert expected["device"] == {} and expected["screen"] == {"width": 390, "density": 3.0}
    assert isinstance(one.data.context["traits"]["seats"], float)


def test_an_event_whose_context_holds_a_number_json_cannot_carry_is_rejected_as_before():
    message = events_pb2.Event(message_id="m1", type=events_pb2.EVENT_TYPE_TRACK, event="Viewed")
    message.context.extra.update({"ratio": 1.0})
    message.context.extra.fields["ratio"].number_value = float("nan")
    batch = events_pb2.ResolvedEventBatch(events=[events_pb2.ResolvedEvent(event=message, person_id="p1")])
    with pytest.raises(Reject) as rejected:
        decode("EVENTS_RESOLVED", "events.resolved.0", batch.SerializeToString(), 10.0)
    assert (rejected.value.reason, rejected.value.field) == ("invalid_payload", "EVENTS_RESOLVED")
    assert "SerializeToJsonError" in str(rejected.value)


def test_an_events_properties_and_context_are_read_only_when_asked_for(monkeypatch):
    # Most events reach persons nothing waits on: reading their properties and context was most of what
    # decoding them cost, for nothing (the engine asks only when an instance, a journey's entry or the
    # arbiter may read them).
    read = []
    monkeypatch.setattr(inputs, "struct_dict", lambda struct: read.append("properties") or {"sku": "s-1"})
    monkeypatch.setattr(inputs, "context_dict", lambda context: read.append("context") or {"ip": "192.0.2.1"})
    message = events_pb2.Event(message_id="m1", type=events_pb2.EVENT_TYPE_PAGE, event="Viewed", user_id="u1")
    message.properties.update({"sku": "s-1"})
    message.context.ip = "192.0.2.1"
    message.timestamp.FromMicroseconds(10_500_000)
    batch = events_pb2.ResolvedEventBatch(events=[events_pb2.ResolvedEvent(event=message, person_id="p1")])
    [one] = decode("EVENTS_RESOLVED", "events.resolved.0", batch.SerializeToString(), 10.0)
    assert (one.data.event_id, one.data.name, one.data.type, one.data.at, one.data.user_id) == (
        "m1",
        "Viewed",
        "page",
        10.5,
        "u1",
    )
    assert read == []
    assert (one.data.properties, one.data.context) == ({"sku": "s-1"}, {"ip": "192.0.2.1"})
    assert one.data.event() is one.data.event()  # read once, then kept
    assert read == ["properties", "context"]


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf"), -float("nan")])
@pytest.mark.parametrize("where", ["properties", "context"])
def test_an_event_holding_a_number_that_is_not_finite_anywhere_is_rejected_though_nothing_read_it_yet(number, where):
    message = events_pb2.Event(message_id="m1", type=events_pb2.EVENT_TYPE_TRACK, event="Viewed")
    message.properties.update({"title": "Schuhe \U0001f45f", "nested": {"ok": 1.5}})
    struct = message.properties if where == "properties" else message.context.traits
    struct.update({"deep": {"list": [1.0, "x"]}})
    struct.fields["deep"].struct_value.fields["list"].list_value.values.add().number_value = number
    batch = events_pb2.ResolvedEventBatch(events=[events_pb2.ResolvedEvent(event=message, person_id="p1")])
    with pytest.raises(Reject) as rejected:
        decode("EVENTS_RESOLVED", "events.resolved.0", batch.SerializeToString(), 10.0)
    assert (rejected.value.reason, rejected.value.field) == ("invalid_payload", "EVENTS_RESOLVED")


def test_the_check_for_numbers_that_are_not_finite_finds_every_one_and_no_text():
    # The bytes a double that is not finite is stored as, whatever its sign and payload, and none that text
    # (UTF-8) can hold: a message of text and finite numbers is read lazily, one that may hold such a
    # number at once.
    for bits in (0x7FF0000000000000, 0xFFF0000000000000, 0x7FF8000000000000, 0x7FFFFFFFFFFFFFFF, 0xFFF0000000000001):
        assert inputs._maybe_non_finite(b"\x11" + bits.to_bytes(8, "little"))
    text = "".join(chr(c) for c in range(0x20, 0x3000)) + "\U0001f45f\U0010ffff"
    assert not inputs._maybe_non_finite(text.encode())


def test_the_check_for_numbers_that_are_not_finite_finds_the_byte_pair_wherever_it_is():
    # What it looks for: a byte 0xF0-0xFF followed by 0x7F or 0xFF, anywhere (the regular expression below
    # says it), in bytes holding many of either byte alone.
    pair = re.compile(rb"[\xf0-\xff][\x7f\xff]")
    rng = random.Random(3)
    alphabet = b"\x00\x11\x7e\x7f\xef\xf0\xf7\xfe\xff"
    for size in (0, 1, 2, 3, 8, 40):
        for _ in range(2000):
            data = bytes(rng.choice(alphabet) for _ in range(size))
            assert inputs._maybe_non_finite(data) == (pair.search(data) is not None), data


def test_a_profile_change_is_read_as_the_kit_reads_it_every_kind_of_value_in_the_same_order():
    # `change_updates` reads every profile change orchestration gets; what it gives is the platform's reading
    # (`cdp_kit.profile_fields.change_fields`), key for key and value for value.
    full = profile_pb2.ProfileChanged(person_id="p1", cause="event")
    full.traits["plan"].string_value = "pro"
    full.traits["seats"].number_value = 3.0
    full.traits["vip"].bool_value = True
    full.traits["gone"].null_value = struct_pb2.NULL_VALUE
    full.traits["address"].struct_value.update({"city": "Berlin", "zip": 10115.0, "tags": ["a", 1.0, None]})
    full.traits["pets"].list_value.extend(["cat", 2.0, True])
    full.computed["orders_90d"].number_value = 2.0
    full.computed["last_channel"].string_value = "email"
    full.computed["active"].bool_value = False
    full.consent.update({"purpose:Marketing": True, "purpose:Sales": False})
    full.scores.update({"churn_risk": 0.25, "clv": 120.5})
    only_scores = profile_pb2.ProfileChanged(person_id="p1", cause="score", scores={"churn_risk": 0.5})
    only_ids = profile_pb2.ProfileChanged(person_id="p1", cause="event", event_ids=["src:m1"])
    for change in (full, only_scores, only_ids):
        read = inputs.change_updates(change)
        assert read == change_fields(change)
        assert list(read) == list(change_fields(change))
    assert inputs.change_updates(full)["traits.gone"] is None
    assert inputs.change_updates(full)["traits.address"] == {"city": "Berlin", "zip": 10115.0, "tags": ["a", 1.0, None]}
