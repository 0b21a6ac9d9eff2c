"""What downstream services cannot store or decode is refused at the edge, per event, naming the field:
NUL in identifiers and object keys, control characters in the message id, nesting beyond the limit.
The deepest event accepted decodes in every protobuf message that wraps it downstream."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict

from cdp.collector.v1 import collector_pb2
from cdp.events.v1 import events_pb2
from cdp.profile.v1 import profile_pb2
from cdp_collector.domain import MAX_DEPTH, Code, parse_request, prepare_grpc_event

RECEIVED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
NUL = "\x00"


def batch(items: list[dict]):
    return parse_request("batch", orjson.dumps({"batch": items}), received_at=RECEIVED, source_id="src")


def bystanders(n: int = 101) -> list[dict]:
    return [
        {"type": "identify", "messageId": f"m{i}", "userId": f"u{i}", "traits": {"email": f"p{i}@example.com"}}
        for i in range(n)
    ]


# (what the poisoned item becomes, the field path the error must name)
POISONS = [
    (lambda e: e | {"userId": "u\x003"}, "batch[3].userId"),
    (lambda e: e | {"anonymousId": "a\x00"}, "batch[3].anonymousId"),
    (lambda e: e | {"messageId": "m\x003"}, "batch[3].messageId"),
    (lambda e: e | {"type": "alias", "previousId": "old\x00"}, "batch[3].previousId"),
    (lambda e: e | {"type": "group", "groupId": "g\x00"}, "batch[3].groupId"),
    (lambda e: e | {"traits": {"email": "p3@example.com\x00"}}, "batch[3].traits.email"),
    (lambda e: e | {"traits": {"phone": "+4915\x00112345678"}}, "batch[3].traits.phone"),
    (lambda e: e | {"traits": {"loyalty_id": "L\x00"}}, "batch[3].traits.loyalty_id"),
    (lambda e: e | {"context": {"traits": {"email": "\x00@x.io"}}}, "batch[3].context.traits.email"),
    (lambda e: e | {"context": {"device": {"id": "dev\x00"}}}, "batch[3].context.device.id"),
    (lambda e: e | {"context": {"device": {"advertisingId": "ad\x00"}}}, "batch[3].context.device.advertisingId"),
    (lambda e: e | {"context": {"groupId": "g\x00"}}, "batch[3].context.groupId"),
    (
        lambda e: (
            e | {"context": {"externalIds": [{"id": "ok", "type": "zoho_id"}, {"id": "z\x00", "type": "zoho_id"}]}}
        ),
        "batch[3].context.externalIds[1].id",
    ),
    (lambda e: e | {"properties": {"cart": {"it\x00em": 1}}}, "batch[3].properties.cart.it\\u0000em"),
    (lambda e: e | {"traits": {"a\x00": "x"}}, "batch[3].traits.a\\u0000"),
    (lambda e: e | {"context": {"custom": {"k\x00": 1}}}, "batch[3].context.custom.k\\u0000"),
    (lambda e: e | {"custom\x00": 1}, "batch[3].custom\\u0000"),
    (lambda e: e | {"integrations": {"Ampli\x00tude": True}}, "batch[3].integrations.Ampli\\u0000tude"),
    (
        lambda e: e | {"context": {"consent": {"categoryPreferences": {"Ads\x00": True}}}},
        "batch[3].context.consent.categoryPreferences.Ads\\u0000",
    ),
    (lambda e: e | {"messageId": "m3\r\nX-Evil: 1"}, "batch[3].messageId"),
    (lambda e: e | {"messageId": "m3\t"}, "batch[3].messageId"),
    (lambda e: e | {"messageId": " m3"}, "batch[3].messageId"),
]


@pytest.mark.parametrize(("poison", "field"), POISONS, ids=[field for _, field in POISONS])
def test_a_poisoned_event_is_refused_alone_and_named(poison, field):
    items = bystanders()
    items[3] = poison(items[3])
    parsed = batch(items)
    assert [i for i, e in enumerate(parsed.events) if e is None] == [3]
    error = parsed.errors[3]
    assert (error.code, error.field) == (Code.INVALID_CHARACTER, field)
    assert NUL not in error.message  # the message names the problem, never the value
    assert len(parsed.valid()) == 100


@pytest.mark.parametrize("preferences", ["categoryPreferences", "channelPreferences"])
def test_a_consent_decision_without_a_name_is_refused_alone_and_named(preferences):
    # It was accepted, then dropped by the profile without a word: `purpose:` names nothing.
    items = bystanders()
    items[3] = items[3] | {"context": {"consent": {preferences: {"": True, "Analytics": True}}}}
    parsed = batch(items)
    assert [i for i, e in enumerate(parsed.events) if e is None] == [3]
    error = parsed.errors[3]
    assert (error.code, error.field) == (Code.MISSING_FIELD, f'batch[3].context.consent.{preferences}[""]')
    assert len(parsed.valid()) == 100


def test_nul_in_ordinary_string_values_is_stored_as_sent():
    # Both store adapters keep NUL inside values (SQLite's JSON escapes it, BSON strings are length-prefixed).
    sent = {
        "type": "track",
        "messageId": "m1",
        "userId": "u1",
        "event": "Note\x00Taken",
        "properties": {"note": "a\x00b", "nested": {"text": "c\x00"}, "list": ["\x00"]},
        "context": {"page": {"title": "T\x00"}, "traits": {"address": {"street": "s\x00"}}},
    }
    parsed = batch([sent])
    assert parsed.all_errors == [()]
    event = parsed.events[0]
    assert event.event == "Note\x00Taken"
    assert MessageToDict(event.properties) == sent["properties"]
    assert event.context.page.title == "T\x00"
    assert event.context.traits["address"]["street"] == "s\x00"


def test_message_ids_with_harmless_unicode_are_accepted():
    parsed = batch([{"type": "track", "messageId": "ajs-näive-\u00ad-id", "userId": "u", "event": "E"}])
    assert parsed.all_errors == [()]


def test_identify_traits_sent_only_in_context_are_named_where_the_client_put_them():
    parsed = batch([{"type": "identify", "messageId": "m", "userId": "u", "context": {"traits": {"email": "\x00"}}}])
    assert [e.field for e in parsed.all_errors[0]] == ["batch[0].context.traits.email"]


# --- the same rules over gRPC (proto field names) ------------------------------------------------------


def prepare(event: events_pb2.Event):
    return prepare_grpc_event(event, received_at=RECEIVED, batch_sent_at=None, source_id="src", index=2)


def identify(**fields) -> events_pb2.Event:
    return events_pb2.Event(**{"type": events_pb2.EVENT_TYPE_IDENTIFY, "message_id": "m", "user_id": "u", **fields})


def with_struct(event: events_pb2.Event, attr: str, data: dict) -> events_pb2.Event:
    target = event
    *parents, last = attr.split(".")
    for parent in parents:
        target = getattr(target, parent)
    getattr(target, last).update(data)
    return event


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (identify(user_id="u\x00"), "events[2].user_id"),
        (identify(message_id="m\n"), "events[2].message_id"),
        (
            identify(context=events_pb2.Context(device=events_pb2.Device(token="t\x00"))),
            "events[2].context.device.token",
        ),
        (with_struct(identify(), "traits", {"email": "a@b.c\x00"}), "events[2].traits.email"),
        (with_struct(identify(), "context.traits", {"phone": "\x00"}), "events[2].context.traits.phone"),
        (
            with_struct(identify(), "context.extra", {"externalIds": [{"id": "x", "type": "h\x00"}]}),
            "events[2].context.extra.externalIds[0].type",
        ),
        (with_struct(identify(), "properties", {"a": [{"b\x00": 1}]}), "events[2].properties.a[0].b\\u0000"),
        (with_struct(identify(), "extra", {"k\x00": 1}), "events[2].extra.k\\u0000"),
    ],
)
def test_grpc_events_follow_the_same_rules(event, field):
    errors = prepare(event)
    assert [(e.code, e.field) for e in errors] == [(Code.INVALID_CHARACTER, field)]


def test_grpc_events_keep_nul_in_values():
    event = with_struct(identify(), "properties", {"note": "a\x00b"})
    assert prepare(event) == []


# --- nesting: the deepest accepted event decodes everywhere downstream ---------------------------------


def dicts(levels: int) -> dict:
    value: object = "leaf"
    for _ in range(levels):
        value = {"a": value}
    return value  # type: ignore[return-value]


PLACES = ["properties", "traits", "integrations", "extra", "context.extra", "context.traits"]


def deepest_json(place: str, extra_levels: int = 0) -> dict:
    """A group call (its traits become the group's, the deepest-wrapped thing downstream) whose `place`
    nests objects in objects (3 protobuf messages per level, the costliest) down to the limit."""
    levels = MAX_DEPTH - 1 + extra_levels  # event (1) > place (2) > ... > MAX_DEPTH
    payload: dict = {"type": "group", "messageId": "m", "userId": "u", "groupId": "g"}
    if place in ("properties", "traits", "integrations"):
        payload[place] = dicts(levels)
    elif place == "extra":
        payload["custom"] = dicts(levels)
    elif place == "context.extra":
        payload["context"] = {"custom": dicts(levels - 1)}  # context is level 2
    else:
        payload["context"] = {"traits": dicts(levels - 1)}
    return payload


def deepest_proto(place: str, extra_levels: int = 0) -> events_pb2.Event:
    """The same shape built as a protobuf event, as a gRPC client would send it."""
    payload = deepest_json(place, extra_levels)
    event = events_pb2.Event(type=events_pb2.EVENT_TYPE_GROUP, message_id="m", user_id="u", group_id="g")
    if place == "extra":
        with_struct(event, "extra", {"custom": payload["custom"]})
    elif place == "context.traits":
        with_struct(event, "context.traits", payload["context"]["traits"])
    elif place == "context.extra":
        with_struct(event, "context.extra", payload["context"])  # unknown context keys
    else:
        with_struct(event, place, payload[place])
    return event


def downstream_wrappers(event: events_pb2.Event):
    """Every protobuf message a stored event (or a part of it) travels in after the edge."""
    properties = event.properties
    traits = event.traits if event.HasField("traits") else event.context.traits
    first = next(iter(traits.fields.values()), struct_pb2.Value(struct_value=properties))
    group = struct_pb2.Value(struct_value=traits)
    yield "events.raw Event", event
    yield "CollectRequest", collector_pb2.CollectRequest(events=[event])
    yield "events.resolved", events_pb2.ResolvedEventBatch(events=[events_pb2.ResolvedEvent(event=event)])
    yield (
        "profiles.changed",
        profile_pb2.ProfileChangedBatch(changes=[profile_pb2.ProfileChanged(traits={"t": first}, groups={"g": group})]),
    )
    yield "ListEvents", profile_pb2.ListEventsResponse(events=[profile_pb2.TimelineEvent(properties=properties)])
    trait = profile_pb2.Trait(value=first, history=[profile_pb2.TraitVersion(value=first)])
    group_trait = profile_pb2.Trait(value=group, history=[profile_pb2.TraitVersion(value=group)])
    yield (
        "BatchGetProfiles",
        profile_pb2.BatchGetProfilesResponse(
            profiles=[profile_pb2.Profile(traits={"t": trait}, groups={"g": group_trait})]
        ),
    )
    # Export's document: traits and groups with their history, the timeline with each event's properties.
    value, group_value = MessageToDict(first), MessageToDict(traits)
    document = struct_pb2.Struct()
    document.update(
        {
            "traits": {"t": {"current": {"value": value}, "history": [{"value": value}]}},
            "groups": {"g": {"current": {"value": group_value}, "history": [{"value": group_value}]}},
            "timeline": [{"properties": MessageToDict(properties)}],
        }
    )
    yield "Export", profile_pb2.ExportResponse(document=document)


@pytest.mark.parametrize("place", PLACES)
def test_the_deepest_event_accepted_over_http_decodes_in_every_downstream_message(place):
    parsed = batch([deepest_json(place)])
    assert parsed.all_errors == [()]
    for name, message in downstream_wrappers(parsed.events[0]):
        wire = message.SerializeToString()
        assert type(message).FromString(wire) == message, name


@pytest.mark.parametrize("place", PLACES)
def test_one_level_more_is_refused_over_http_naming_the_path_and_the_limit(place):
    parsed = batch([deepest_json(place, extra_levels=1)])
    (error,) = parsed.all_errors[0]
    assert error.code == Code.NESTING_TOO_DEEP
    assert error.field.startswith("batch[0].") and error.field.endswith(".a")
    # The first container beyond the limit: `place` is level 2 (context.* level 3), each ".a" one more.
    assert error.field.count(".a") == MAX_DEPTH - (
        1 if place in ("properties", "traits", "integrations", "extra") else 2
    )
    assert f"deeper than {MAX_DEPTH} levels" in error.message


@pytest.mark.parametrize("place", PLACES)
def test_the_deepest_event_accepted_over_grpc_decodes_in_every_downstream_message(place):
    event = deepest_proto(place)
    assert prepare(event) == []
    for name, message in downstream_wrappers(event):
        wire = message.SerializeToString()
        assert type(message).FromString(wire) == message, name


@pytest.mark.parametrize("place", PLACES)
def test_one_level_more_is_refused_over_grpc(place):
    (error,) = prepare(deepest_proto(place, extra_levels=1))
    assert error.code == Code.NESTING_TOO_DEEP
    assert error.field.startswith("events[2].") and error.field.endswith(".a")
    assert f"deeper than {MAX_DEPTH} levels" in error.message


def test_grpc_nesting_counts_arrays_as_levels_too():
    value: object = 1
    for _ in range(MAX_DEPTH - 1):
        value = [value]
    event = with_struct(identify(), "properties", {"deep": value})  # properties (2) > deep (3) > ... > MAX_DEPTH + 1
    (error,) = prepare(event)
    assert error.code == Code.NESTING_TOO_DEEP
    assert error.field == "events[2].properties.deep" + "[0]" * (MAX_DEPTH - 2)


def test_a_grpc_event_with_an_unnamed_consent_decision_is_refused_naming_the_field():
    from cdp.events.v1 import events_pb2
    from cdp_collector.domain.storable import struct_problems

    consent = events_pb2.Consent(channel_preferences={"": False, "email": True})
    event = events_pb2.Event(message_id="m", user_id="u", context=events_pb2.Context(consent=consent))
    problems = struct_problems(event, base="events[0]", json_paths=False, max_depth=None)
    assert [(p.code, p.field) for p in problems] == [
        (Code.MISSING_FIELD, 'events[0].context.consent.channel_preferences[""]')
    ]
