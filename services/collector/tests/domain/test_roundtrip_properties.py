"""Property tests: any valid Segment event survives JSON → Event with every field it carries intact, and no
JSON object, however odd, makes the parser raise instead of answering."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import orjson
from google.protobuf.json_format import MessageToDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.events.v1 import events_pb2
from cdp_collector.domain import GENERATED_MESSAGE_ID_KEY, Code, RequestRejected, parse_request
from cdp_collector.domain.segment import _SLOTS, EVENT_TYPES
from cdp_kit.timestamps import NANOS, datetime_to_ns

RECEIVED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

text = st.text(alphabet=st.characters(codec="utf-8"), max_size=24)
# NUL is valid in string values, but not in object keys or identifiers (downstream stores cannot hold it
# there), and a message id holds no control character nor surrounding whitespace (see storable.py).
no_nul = st.characters(codec="utf-8", exclude_characters="\x00")
keys = st.text(alphabet=no_nul, max_size=24)
nonblank = st.text(alphabet=no_nul, min_size=1, max_size=40).filter(str.strip)
message_ids = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cc"]), min_size=1, max_size=40).filter(
    lambda s: s == s.strip() and s
)
ids = st.one_of(nonblank, st.integers(min_value=-(2**70), max_value=2**70))
safe_numbers = st.one_of(
    st.integers(min_value=-(2**53), max_value=2**53), st.floats(allow_nan=False, allow_infinity=False)
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), safe_numbers, text),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)),
    max_leaves=16,
)
json_objects = st.dictionaries(keys, json_values, max_size=6)
# Every top-level string of traits may be an identifier for identity: no NUL there.
trait_objects = st.dictionaries(
    keys, json_values.filter(lambda v: not (isinstance(v, str) and "\x00" in v)), max_size=6
)
moments = st.datetimes(
    min_value=datetime(1990, 1, 1),
    max_value=datetime(2040, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-7, minutes=-30))]),
)
unknown_keys = keys.filter(lambda key: key not in _SLOTS and key != GENERATED_MESSAGE_ID_KEY)


@st.composite
def contexts(draw) -> dict:
    context: dict = {}
    for key in ("ip", "userAgent", "locale", "timezone"):
        if draw(st.booleans()):
            context[key] = draw(text)
    if draw(st.booleans()):
        context["library"] = {"name": draw(text), "version": draw(text)}
    if draw(st.booleans()):
        context["page"] = {key: draw(text) for key in ("path", "referrer", "search", "title", "url")}
    if draw(st.booleans()):
        context["device"] = {"id": draw(keys), "adTrackingEnabled": draw(st.booleans()), "model": draw(text)}
    if draw(st.booleans()):
        context["screen"] = {
            "width": draw(st.integers(0, 2**31 - 1)),
            "height": draw(st.integers(0, 2**31 - 1)),
            "density": draw(st.floats(0, 10)),
        }
    if draw(st.booleans()):
        context["location"] = {"latitude": draw(st.floats(-90, 90)), "longitude": draw(st.floats(-180, 180))}
    if draw(st.booleans()):
        context["traits"] = draw(trait_objects)
    if draw(st.booleans()):
        # Named decisions: an unnamed one is refused (storable.unnamed_consent).
        named = keys.filter(bool)
        context["consent"] = {"categoryPreferences": draw(st.dictionaries(named, st.booleans(), max_size=3))}
    known = {"ip", "userAgent", "locale", "timezone", "library", "page", "device", "screen", "location", "traits",
             "consent", "groupId", "app", "campaign", "os", "network"}  # fmt: skip
    for key, value in draw(
        st.dictionaries(keys.filter(lambda k: k not in known and "_" not in k), json_values, max_size=3)
    ).items():
        context[key] = value
    return context


@st.composite
def segment_events(draw) -> dict:
    kind = draw(st.sampled_from(sorted(EVENT_TYPES)))
    event: dict = {"type": kind, "messageId": draw(message_ids)}
    if kind == "alias":
        event["userId"] = draw(ids)
        event["previousId"] = draw(ids)
    else:
        who = draw(st.sampled_from(["userId", "anonymousId", "both"]))
        if who in ("userId", "both"):
            event["userId"] = draw(ids)
        if who in ("anonymousId", "both"):
            event["anonymousId"] = draw(ids)
    if kind == "track":
        event["event"] = draw(nonblank)
    if kind == "group":
        event["groupId"] = draw(ids)
    if kind in ("page", "screen"):
        if draw(st.booleans()):
            event["name"] = draw(text)
        if draw(st.booleans()):
            event["category"] = draw(text)
    if kind in ("track", "page", "screen") and draw(st.booleans()):
        event["properties"] = draw(json_objects)
    if kind in ("identify", "group") and draw(st.booleans()):
        event["traits"] = draw(trait_objects)
    if draw(st.booleans()):
        event["integrations"] = draw(st.dictionaries(keys, st.one_of(st.booleans(), json_objects), max_size=3))
    if draw(st.booleans()):
        event["context"] = draw(contexts())
    if draw(st.booleans()):
        event["timestamp"] = draw(moments)
    for key, value in draw(st.dictionaries(unknown_keys, json_values, max_size=3)).items():
        event[key] = value
    return event


def encode(document: dict) -> bytes:
    try:
        return orjson.dumps(document)
    except TypeError:  # integers beyond 64 bits, which clients can send and orjson cannot write
        return json.dumps(document, default=datetime.isoformat).encode()


def as_id(value: object) -> str:
    return value if isinstance(value, str) else str(value)


def check_carried(sent: dict, event: events_pb2.Event, sent_at: datetime | None) -> None:
    assert event.type == EVENT_TYPES[sent["type"]]
    assert event.message_id == sent["messageId"]
    for key, attr in (
        ("userId", "user_id"),
        ("anonymousId", "anonymous_id"),
        ("previousId", "previous_id"),
        ("groupId", "group_id"),
    ):
        assert getattr(event, attr) == (as_id(sent[key]) if key in sent else "")
    for key in ("event", "name", "category"):
        assert getattr(event, key) == sent.get(key, "")
    for key in ("properties", "traits", "integrations"):
        expected = sent.get(key, {})
        if key == "traits" and sent["type"] == "identify" and "traits" not in sent:
            expected = sent.get("context", {}).get("traits", {})  # RudderStack's identify shape
        assert MessageToDict(getattr(event, key)) == expected
    assert MessageToDict(event.extra) == {k: v for k, v in sent.items() if k not in _SLOTS}

    context = sent.get("context", {})
    typed = event.context
    for key, attr in (
        ("ip", "ip"),
        ("userAgent", "user_agent"),
        ("locale", "locale"),
        ("timezone", "timezone"),
    ):
        assert getattr(typed, attr) == context.get(key, "")
    for key, fields in (
        ("library", {"name": "name", "version": "version"}),
        ("page", {k: k for k in ("path", "referrer", "search", "title", "url")}),
        ("device", {"id": "id", "adTrackingEnabled": "ad_tracking_enabled", "model": "model"}),
        ("screen", {"width": "width", "height": "height", "density": "density"}),
        ("location", {"latitude": "latitude", "longitude": "longitude"}),
    ):
        for client_key, attr in fields.items():
            assert getattr(getattr(typed, key), attr) == context.get(key, {}).get(
                client_key, getattr(typed, key).__class__().__getattribute__(attr)
            )
    assert MessageToDict(typed.traits) == context.get("traits", {})
    assert dict(typed.consent.category_preferences) == context.get("consent", {}).get("categoryPreferences", {})
    known = {
        "ip",
        "userAgent",
        "locale",
        "timezone",
        "library",
        "page",
        "device",
        "screen",
        "location",
        "traits",
        "consent",
    }
    assert MessageToDict(typed.extra) == {k: v for k, v in context.items() if k not in known}

    received = datetime_to_ns(RECEIVED)
    assert event.received_at.seconds * NANOS + event.received_at.nanos == received
    if "timestamp" in sent:
        client = datetime_to_ns(sent["timestamp"])
        assert event.original_timestamp.seconds * NANOS + event.original_timestamp.nanos == client
        expected = client if sent_at is None else received - (datetime_to_ns(sent_at) - client)
        expected = min(expected, received)  # an event never happened after it arrived
    else:
        assert not event.HasField("original_timestamp")
        expected = received
    assert event.timestamp.seconds * NANOS + event.timestamp.nanos == expected


@SETTINGS
@given(sent=segment_events(), with_type=st.booleans())
def test_a_valid_single_call_round_trips(sent, with_type):
    body = dict(sent) if with_type else {k: v for k, v in sent.items() if k != "type"}
    parsed = parse_request(sent["type"], encode(body), received_at=RECEIVED, source_id="src")
    assert parsed.all_errors == [()], parsed.all_errors
    check_carried(sent, parsed.events[0], None)


@settings(SETTINGS, max_examples=60)
@given(batch=st.lists(segment_events(), min_size=1, max_size=4), sent_at=st.none() | moments)
def test_a_valid_batch_round_trips(batch, sent_at):
    body: dict = {"batch": batch, "writeKey": "wk_property_test"}
    if sent_at is not None:
        body["sentAt"] = sent_at
    parsed = parse_request("batch", encode(body), received_at=RECEIVED, source_id="src")
    assert parsed.write_key == "wk_property_test"
    assert parsed.all_errors == [()] * len(batch), parsed.all_errors
    for sent, event in zip(batch, parsed.events, strict=True):
        check_carried(sent, event, sent_at)


odd_values = st.one_of(json_values, st.integers(), st.floats(allow_nan=False, allow_infinity=False), moments.map(str))
odd_events = st.dictionaries(st.one_of(st.sampled_from(sorted(_SLOTS)), text), odd_values, max_size=10)


@SETTINGS
@given(
    kind=st.sampled_from(["batch", *sorted(EVENT_TYPES)]),
    items=st.lists(st.one_of(odd_events, odd_values), max_size=4),
    single=odd_events,
)
def test_any_json_object_gets_an_answer_never_an_exception(kind, items, single):
    document = {"batch": items} if kind == "batch" else single
    try:
        parsed = parse_request(kind, encode(document), received_at=RECEIVED, source_id="src")
    except RequestRejected as rejected:
        assert rejected.code in set(Code) and rejected.status in (400, 413)
        return
    assert len(parsed.events) == len(parsed.errors) == len(parsed.all_errors) == len(parsed.message_ids)
    for event, first, errors in zip(parsed.events, parsed.errors, parsed.all_errors, strict=True):
        assert (event is None) == bool(errors) == (first is not None)
        assert first is None or first == errors[0]
        for error in errors:
            assert error.code in set(Code) and isinstance(error.field, str) and error.message
        if event is not None:
            assert event.message_id and (event.user_id or event.anonymous_id)
            event.SerializeToString()  # a well-formed message, ready for the bus
