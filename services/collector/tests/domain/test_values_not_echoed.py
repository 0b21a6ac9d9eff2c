"""A refused event's answer names the field, what it must be and the JSON type and length of what came,
never the value: SDKs log these answers, and an email sent in the wrong field must not land in app logs."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from cdp_collector.domain import Code, decode_body, parse_decoded, parse_request

RECEIVED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
SECRET = "jane.doe@example.com"


def messages(kind: str, payload: dict) -> list[tuple[str, str, str]]:
    parsed = parse_request(kind, orjson.dumps(payload), received_at=RECEIVED, source_id="src")
    return [(e.code, e.field, e.message) for errors in parsed.all_errors for e in errors]


@pytest.mark.parametrize(
    ("payload", "field", "said"),
    [
        ({"traits": SECRET}, "traits", "traits must be an object ({...}); got a string of 20 characters"),
        ({"properties": [SECRET]}, "properties", "got an array of 1 item"),
        ({"event": {"email": SECRET}}, "event", "event must be a string; got an object with 1 entry"),
        ({"anonymousId": 1.5}, "anonymousId", "got a number"),
        ({"timestamp": SECRET}, "timestamp", "got a string of 20 characters"),
        ({"timestamp": "2023-02"}, "timestamp", "got a string of 7 characters"),
        ({"timestamp": "2023-02-30"}, "timestamp", "day is out of range for month"),
        ({"timestamp": "2023-13-03T04:05:06Z"}, "timestamp", "month must be in 1..12"),
        ({"timestamp": "2023-02-03T04:05:06+jane"}, "timestamp", "got a string of 24 characters"),
        ({"timestamp": 253402300800000}, "timestamp", "timestamp is outside the years 0001..9999"),
        ({"user_id": SECRET}, "user_id", "different values (strings of 3 and 20 characters)"),
        ({"properties": {"n": 12345678901234567890}}, "properties.n", "an integer of 20 digits is beyond"),
    ],
)
def test_a_refused_field_is_described_not_repeated(payload, field, said):
    found = messages("track", {"userId": "u-1", "event": "E", "messageId": "m", **payload})
    assert [(code, f) for code, f, _ in found if f == field], found
    (message,) = [m for _, f, m in found if f == field]
    assert said in message
    for value in (SECRET, "jane", "12345678901234567890", "2023-", "253402300800000", "1.5"):
        assert value not in message


def test_a_type_that_is_no_event_type_is_described_and_a_known_one_named():
    batch = {"batch": [{"type": SECRET, "userId": "u", "messageId": "m"}]}
    ((code, _, message),) = messages("batch", batch)
    assert code == Code.INVALID_EVENT_TYPE and SECRET not in message and "a string of 20 characters" in message
    ((_, _, message),) = messages("track", {"type": SECRET, "userId": "u", "event": "E"})
    assert SECRET not in message and "/v1/track" in message
    ((_, _, message),) = messages("track", {"type": "identify", "userId": "u", "event": "E"})
    assert "type is identify" in message  # an event type is a word of the API, not the caller's data


def test_a_body_read_for_its_key_only_is_decoded_exactly_before_its_events_are_used():
    body = b'{"writeKey": "wk", "batch": [{"type": "track", "userId": "u", "event": "half \\ud83d"}]}'
    decoded = decode_body(body, exact=False)
    assert decoded.write_key == "wk" and not decoded.exact
    (event,) = parse_decoded("batch", decoded, received_at=RECEIVED, source_id="src").events
    assert event is not None and event.event == "half \ufffd"
    big = b'{"batch": [{"type": "track", "userId": "u", "event": "E", "properties": {"n": 98765432109876543210}}]}'
    decoded = decode_body(big, exact=False)
    assert not decoded.exact
    parsed = parse_decoded("batch", decoded, received_at=RECEIVED, source_id="src")
    assert parsed.events == [None] and parsed.errors[0].code == Code.INTEGER_OUT_OF_RANGE
    assert decode_body(b'{"write_key": "wk2"}', exact=False).exact
