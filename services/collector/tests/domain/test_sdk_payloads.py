"""Bodies produced by the real segment-analytics-python 2.4.0 and rudder-sdk-python 2.1.9 parse into the
events their callers meant. Both SDKs always POST to /v1/batch, with sentAt (and Segment: writeKey)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest
from google.protobuf.json_format import MessageToDict

from cdp.events.v1 import events_pb2
from cdp_collector.domain import GENERATED_MESSAGE_ID_KEY, RequestRejected, parse_request
from cdp_kit.timestamps import NANOS

RECEIVED = datetime(2024, 5, 1, 12, 0, 30, tzinfo=UTC)


def ns(ts) -> int:
    return ts.seconds * NANOS + ts.nanos


def parse_single_request(session):
    (request,) = session.requests
    assert request["url"] == "http://collector.test/v1/batch"
    parsed = parse_request("batch", request["body"], received_at=RECEIVED, source_id="src-web")
    (event,) = parsed.events
    assert parsed.all_errors == [()], parsed.all_errors
    return parsed, event, orjson.loads(request["body"])


def test_segment_track_with_all_arguments(segment_sdk):
    client, session = segment_sdk()
    when = datetime(2024, 5, 1, 11, 59, 58, 250000, tzinfo=UTC)
    client.track(
        user_id="u-1",
        event="Order Completed",
        properties={"orderId": "o-9", "total": 27.5, "products": [{"sku": "45790-32", "quantity": 2}]},
        context={"ip": "203.0.113.9", "locale": "nl-NL"},
        timestamp=when,
        anonymous_id="anon-1",
        integrations={"Mixpanel": False},
        message_id="msg-track-1",
    )
    parsed, event, wire = parse_single_request(session)

    assert wire["writeKey"] == "wk_segment_0123456789"
    assert parsed.write_key == "wk_segment_0123456789"
    assert event.type == events_pb2.EVENT_TYPE_TRACK
    assert (event.message_id, event.user_id, event.anonymous_id) == ("msg-track-1", "u-1", "anon-1")
    assert event.event == "Order Completed"
    assert MessageToDict(event.properties) == {
        "orderId": "o-9",
        "total": 27.5,
        "products": [{"sku": "45790-32", "quantity": 2}],
    }
    assert MessageToDict(event.integrations) == {"Mixpanel": False}
    assert event.context.ip == "203.0.113.9"
    assert event.context.locale == "nl-NL"
    assert (event.context.library.name, event.context.library.version) == ("analytics-python", "2.4.0")
    assert event.source_id == "src-web"
    # The SDK's timestamp survives as sent; the batch's sentAt drives the clock-skew correction.
    sent_at = datetime.fromisoformat(wire["sentAt"])
    assert ns(event.original_timestamp) == int(when.timestamp()) * NANOS + 250_000_000
    assert event.sent_at.ToDatetime(UTC) == sent_at
    assert event.timestamp.ToDatetime(UTC) == RECEIVED - (sent_at - when)
    # The write key is a secret: it must not travel with the event.
    assert "writeKey" not in MessageToDict(event.extra)
    assert not event.HasField("extra")


def test_segment_identify_with_numeric_user_id(segment_sdk):
    client, session = segment_sdk()
    client.identify(user_id=1234, traits={"email": "ada@example.com", "plan": "pro", "logins": 3})
    _, event, wire = parse_single_request(session)
    assert wire["batch"][0]["userId"] == "1234"  # this SDK stringifies userId itself
    assert wire["batch"][0]["anonymousId"] is None  # and sends null for what it does not know
    assert event.type == events_pb2.EVENT_TYPE_IDENTIFY
    assert event.user_id == "1234"
    assert event.anonymous_id == ""
    assert MessageToDict(event.traits) == {"email": "ada@example.com", "plan": "pro", "logins": 3}
    # The SDK generated a uuid4 message id; the server did not need to.
    assert event.message_id == wire["batch"][0]["messageId"]
    assert GENERATED_MESSAGE_ID_KEY not in event.extra.fields


def test_segment_alias_passes_a_numeric_previous_id_through(segment_sdk):
    client, session = segment_sdk()
    client.alias(previous_id=987654321, user_id="u-42")
    _, event, wire = parse_single_request(session)
    assert wire["batch"][0]["previousId"] == 987654321  # not stringified by the SDK
    assert event.type == events_pb2.EVENT_TYPE_ALIAS
    assert (event.previous_id, event.user_id) == ("987654321", "u-42")


def test_segment_group_passes_a_numeric_group_id_through(segment_sdk):
    client, session = segment_sdk()
    client.group(user_id="u-1", group_id=42, traits={"name": "Initech", "employees": 120})
    _, event, wire = parse_single_request(session)
    assert wire["batch"][0]["groupId"] == 42
    assert event.type == events_pb2.EVENT_TYPE_GROUP
    assert event.group_id == "42"
    assert MessageToDict(event.traits) == {"name": "Initech", "employees": 120}


def test_segment_page_and_screen(segment_sdk):
    client, session = segment_sdk()
    client.page(user_id="u-1", category="Docs", name="Tracking API", properties={"url": "https://example.com/docs"})
    client.screen(anonymous_id="anon-7", name="Checkout", properties={"step": 2})
    page = parse_request("batch", session.requests[0]["body"], received_at=RECEIVED, source_id="s").events[0]
    screen = parse_request("batch", session.requests[1]["body"], received_at=RECEIVED, source_id="s").events[0]
    assert page.type == events_pb2.EVENT_TYPE_PAGE
    assert (page.category, page.name) == ("Docs", "Tracking API")
    assert MessageToDict(page.properties) == {"url": "https://example.com/docs"}
    assert screen.type == events_pb2.EVENT_TYPE_SCREEN
    assert (screen.name, screen.category, screen.anonymous_id) == ("Checkout", "", "anon-7")  # category: null


def test_segment_batch_of_many_calls_as_its_consumer_sends_it(segment_sdk):
    from segment.analytics import request

    client, session = segment_sdk()
    client.send = False  # collect messages the way the consumer thread does, then post them as one batch
    messages = [
        client.track(user_id=f"u-{i}", event="Product Viewed", properties={"position": i})[1] for i in range(5)
    ] + [client.identify(anonymous_id="anon-1", traits={"theme": "dark"})[1]]
    request.post("wk_segment_0123456789", "http://collector.test", batch=messages)
    (sent,) = session.requests
    parsed = parse_request("batch", sent["body"], received_at=RECEIVED, source_id="src")
    assert all(errors == () for errors in parsed.all_errors) and parsed.errors == [None] * 6
    assert [event.type for event in parsed.events] == [events_pb2.EVENT_TYPE_TRACK] * 5 + [
        events_pb2.EVENT_TYPE_IDENTIFY
    ]
    assert [event.user_id for event in parsed.events[:5]] == [f"u-{i}" for i in range(5)]
    assert len({event.message_id for event in parsed.events}) == 6


def test_rudderstack_identify_keeps_traits_in_context_only_and_we_lift_them(rudder_sdk):
    client, session = rudder_sdk()
    client.identify(user_id="u-5", traits={"email": "grace@example.com", "age": 37}, anonymous_id="anon-5")
    (request,) = session.requests
    assert request["headers"]["Content-Encoding"] == "gzip"
    wire = orjson.loads(request["body"])
    assert "traits" not in wire["batch"][0]
    assert "writeKey" not in wire  # RudderStack authenticates with Basic auth only
    parsed = parse_request("batch", request["body"], received_at=RECEIVED, source_id="src")
    (event,) = parsed.events
    assert parsed.write_key is None
    assert MessageToDict(event.traits) == {"email": "grace@example.com", "age": 37}
    assert MessageToDict(event.context.traits) == {"email": "grace@example.com", "age": 37}
    # RudderStack's own top-level field and default integrations are kept, not dropped.
    assert MessageToDict(event.extra) == {"channel": "server"}
    assert MessageToDict(event.integrations) == {"All": True}
    assert event.context.library.name == "analytics-python"


def test_rudderstack_track_timestamp_with_microseconds_and_offset(rudder_sdk):
    client, session = rudder_sdk()
    when = datetime(2024, 5, 1, 13, 59, 0, 123456, tzinfo=UTC) + timedelta(0)
    client.track(user_id="u-5", event="Signed Up", properties={"plan": "free"}, timestamp=when)
    (request,) = session.requests
    wire = orjson.loads(request["body"])
    assert wire["batch"][0]["timestamp"] == "2024-05-01T13:59:00.123456+00:00"
    (event,) = parse_request("batch", request["body"], received_at=RECEIVED, source_id="src").events
    assert event.original_timestamp.ToDatetime(UTC) == when
    assert event.event == "Signed Up"


def test_rudderstack_group_and_alias_with_numeric_ids(rudder_sdk):
    client, session = rudder_sdk()
    client.group(user_id=77, group_id=5, traits={"name": "Acme"})
    client.alias(previous_id=76, user_id=77)
    group = parse_request("batch", session.requests[0]["body"], received_at=RECEIVED, source_id="s").events[0]
    alias = parse_request("batch", session.requests[1]["body"], received_at=RECEIVED, source_id="s").events[0]
    assert (group.user_id, group.group_id) == ("77", "5")
    assert (alias.user_id, alias.previous_id) == ("77", "76")


def test_half_an_emoji_costs_that_character_not_the_event():
    """A string cut in the middle of an emoji holds an unpaired surrogate. The SDKs write it as the escape
    JSON allows (`"\\ud83d"`: Python's json.dumps, JavaScript's JSON.stringify), and the whole request was
    refused as invalid JSON, every other event of the batch with it. It is U+FFFD now, as Segment's own
    API stores it: in values and keys, a lone low half too."""
    parsed = parse_request(
        "batch",
        b'{"batch": [{"type": "track", "userId": "u-1", "event": "Viewed", "messageId": "m-1",'
        b' "properties": {"title": "Caf\\u00e9 \\ud83d", "\\udc00key": "\\ud83d\\ude00"}},'
        b' {"type": "track", "userId": "u-2", "event": "Viewed", "messageId": "m-2"}]}',
        received_at=RECEIVED,
        source_id="src-web",
    )
    assert parsed.all_errors == [(), ()]
    first, second = parsed.events
    assert dict(first.properties) == {"title": "Café \ufffd", "\ufffdkey": "\U0001f600"}  # a whole pair stays
    assert second.user_id == "u-2"
    first.SerializeToString()  # storable


def test_the_segment_sdk_sends_half_an_emoji_and_it_is_stored(segment_sdk):
    client, session = segment_sdk()
    client.track(user_id="u-1", event="Searched", properties={"query": "pizza \ud83c"})
    (request,) = session.requests
    assert b"pizza \\ud83c" in request["body"]
    parsed = parse_request("batch", request["body"], received_at=RECEIVED, source_id="src-web")
    assert parsed.all_errors == [()]
    assert parsed.events[0].properties["query"] == "pizza \ufffd"


def test_invalid_json_after_half_an_emoji_is_still_refused():
    for body in (b'{"a": "\\ud83d", "b": NaN}', b'{"a": "\\ud83d", "b": 1e999}', b'{"a": "\\ud83d", "b": }'):
        with pytest.raises(RequestRejected) as refused:
            parse_request("track", body, received_at=RECEIVED, source_id="src-web")
        assert refused.value.code == "invalid_json", body
