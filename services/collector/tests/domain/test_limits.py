"""Segment's limits at their exact boundaries, nesting depth, and integers a Struct cannot hold."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import orjson
import pytest
from google.protobuf.json_format import MessageToDict

from cdp.events.v1 import events_pb2
from cdp_collector.domain import (
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    MAX_DEPTH,
    MAX_EVENT_BYTES,
    Code,
    Limits,
    RequestRejected,
    check_event_count,
    check_request_bytes,
    parse_request,
)

RECEIVED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def parse(kind: str, body: bytes | dict, limits: Limits | None = None):
    if not isinstance(body, bytes):
        body = orjson.dumps(body)
    kwargs = {"limits": limits} if limits else {}
    return parse_request(kind, body, received_at=RECEIVED, source_id="src", **kwargs)


def rejected(kind: str, body: bytes | dict, limits: Limits | None = None) -> RequestRejected:
    with pytest.raises(RequestRejected) as caught:
        parse(kind, body, limits)
    return caught.value


def padded_to(size: int, *, extra_when_measured: dict | None = None, **fields) -> dict:
    """A track event whose compact JSON (plus `extra_when_measured`, e.g. a merged batch context) is exactly
    `size` bytes."""
    event = {"messageId": "m-1", "userId": "u-1", "event": "Padded", **fields, "properties": {"pad": ""}}
    measured = len(orjson.dumps({**event, **(extra_when_measured or {})}))
    event["properties"]["pad"] = "x" * (size - measured)
    assert len(orjson.dumps({**event, **(extra_when_measured or {})})) == size
    return event


def test_the_defaults_are_segments_documented_limits():
    assert (MAX_EVENT_BYTES, MAX_BATCH_BYTES, MAX_BATCH_EVENTS, MAX_DEPTH) == (32_768, 512_000, 2_500, 24)
    assert Limits() == Limits(max_event_bytes=32 * 1024, max_batch_bytes=500 * 1024, max_batch_events=2500)


@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_limits_must_be_positive_integers(value):
    with pytest.raises(ValueError, match="max_event_bytes"):
        Limits(max_event_bytes=value)


# --- one event: 32 KB of compact JSON ----------------------------------------------------------------


def test_single_call_of_exactly_32768_bytes_is_accepted_and_32769_refused():
    assert parse("track", padded_to(32_768)).all_errors == [()]
    parsed = parse("track", padded_to(32_769))
    assert parsed.events == [None]
    (error,) = parsed.all_errors[0]
    assert (error.code, error.field) == (Code.EVENT_TOO_LARGE, "")
    assert error.message.startswith("event is 32769 bytes; the limit is 32768 bytes (32 KB).")


def test_what_is_measured_is_compact_json_not_the_raw_bytes():
    event = padded_to(32_768)
    pretty = orjson.dumps(event, option=orjson.OPT_INDENT_2)
    assert len(pretty) > 32_768
    assert parse("track", pretty).all_errors == [()]
    # "\u00e9" escapes (6 bytes each, as Python's json.dumps sends them) count as the 2-byte UTF-8 "é".
    event["properties"]["pad"] = event["properties"]["pad"][:-2] + "é"
    escaped = json.dumps(event).encode()
    assert len(escaped) > 32_768 and b"\\u00e9" in escaped
    assert parse("track", escaped).all_errors == [()]
    event["properties"]["pad"] += "é"
    assert parse("track", json.dumps(event).encode()).all_errors[0][0].code == Code.EVENT_TOO_LARGE


def test_batch_items_are_measured_with_the_batch_context_merged_in():
    shared = {"context": {"ip": "192.0.2.1", "library": {"name": "lib", "version": "1"}}}
    fits = {"type": "track", **padded_to(32_768 - len(b'"type":"track",'), extra_when_measured=shared)}
    too_big = {**fits, "messageId": "m-22"}  # one character longer
    parsed = parse("batch", {**shared, "batch": [fits, too_big, {"type": "page", "userId": "u"}]})
    assert parsed.all_errors[0] == () and parsed.all_errors[2] == ()
    (error,) = parsed.all_errors[1]
    assert (error.code, error.field) == (Code.EVENT_TOO_LARGE, "batch[1]")
    assert "event is 32769 bytes" in error.message
    assert parsed.events[0].context.ip == "192.0.2.1"
    # Without the shared context the same item is well under the limit: the merge is what counted.
    assert parse("batch", {"batch": [too_big]}).all_errors == [()]


def test_an_oversized_event_is_reported_as_only_that():
    oversized = padded_to(40_123, userId=1.5)  # also a bad userId: not examined
    (error,) = parse("track", oversized).all_errors[0]
    assert error.code == Code.EVENT_TOO_LARGE
    assert error.message.startswith("event is 40123 bytes; the limit is 32768 bytes (32 KB).")


def test_event_size_limit_can_be_changed():
    assert parse("track", padded_to(1000), Limits(max_event_bytes=1000)).all_errors == [()]
    error = parse("track", padded_to(1001), Limits(max_event_bytes=1000)).all_errors[0][0]
    assert error.message.startswith("event is 1001 bytes; the limit is 1000 bytes.")


# --- the request: 500 KB and 2,500 events -------------------------------------------------------------


def test_request_body_of_exactly_500_kb_is_accepted_and_one_byte_more_refused():
    document = orjson.dumps({"batch": [padded_to(30_000, type="track") for _ in range(16)]})
    exact = document + b" " * (512_000 - len(document))  # trailing whitespace is valid JSON
    parsed = parse("batch", exact)
    assert all(errors == () for errors in parsed.all_errors)
    refused = rejected("batch", exact + b" ")
    assert (refused.code, refused.field, refused.status) == (Code.REQUEST_TOO_LARGE, "", 413)
    assert refused.message.startswith(
        "request body is 512001 bytes after decompression; the limit is 512000 bytes (500 KB)"
    )


def test_single_calls_are_held_to_the_request_limit_too():
    body = orjson.dumps(padded_to(100)) + b" " * 600_000
    assert rejected("track", body).code == Code.REQUEST_TOO_LARGE


def test_2500_events_are_accepted_and_2501_refused():
    item = {"type": "page", "userId": "u"}
    parsed = parse("batch", {"batch": [item] * 2500})
    assert len(parsed.events) == 2500 and all(e is not None for e in parsed.events)
    refused = rejected("batch", {"batch": [item] * 2501})
    assert (refused.code, refused.field, refused.status) == (Code.TOO_MANY_EVENTS, "batch", 400)
    assert refused.message.startswith("request has 2501 events; the limit is 2500 events per request")


def test_request_limits_can_be_changed():
    limits = Limits(max_batch_events=2, max_batch_bytes=200)
    assert rejected("batch", {"batch": [{"type": "page", "userId": "u"}] * 3}, limits).code == Code.TOO_MANY_EVENTS
    assert rejected("batch", b'{"batch": []}' + b" " * 200, limits).code == Code.REQUEST_TOO_LARGE


def test_helpers_for_the_transport_layers():
    assert check_request_bytes(512_000) is None
    assert check_request_bytes(512_001).code == Code.REQUEST_TOO_LARGE
    assert check_event_count(2500) is None
    error = check_event_count(2501, field="events")
    assert (error.code, error.field) == (Code.TOO_MANY_EVENTS, "events")


# --- nesting ------------------------------------------------------------------------------------------


def nested(levels: int, leaf: object = 1) -> object:
    value = leaf
    for index in range(levels):
        value = {"a": value} if index % 2 else [value]
    return value


def test_nesting_up_to_24_levels_is_accepted_counting_the_event_as_level_1():
    # event (1) > properties (2) > 22 more containers = 24
    assert parse("track", {"userId": "u", "event": "E", "properties": {"deep": nested(22)}}).all_errors == [()]
    parsed = parse("track", {"userId": "u", "event": "E", "properties": {"deep": nested(23)}})
    (error,) = parsed.all_errors[0]
    assert error.code == Code.NESTING_TOO_DEEP
    # The path names the container at level 25: properties.deep is level 3, then 22 more steps.
    assert error.field.startswith("properties.deep") and error.field.count("[0]") + error.field.count(".a") == 22
    assert "deeper than 24 levels" in error.message


def dicts(levels: int) -> dict:
    value: object = "leaf"
    for _ in range(levels):
        value = {"a": value}
    return value  # type: ignore[return-value]


@pytest.mark.parametrize("place", ["properties", "traits", "integrations", "extra", "context.extra", "context.traits"])
def test_every_event_accepted_decodes_with_protobufs_default_recursion_limit(place):
    # Objects in objects are the costliest nesting in protobuf (3 messages per level); build the deepest
    # event the limit lets through in each place, and decode it the way every consumer downstream will.
    payload: dict = {"messageId": "m", "userId": "u", "event": "E"}
    if place in ("properties", "traits", "integrations"):
        payload[place] = dicts(MAX_DEPTH - 1)  # levels 2..24
    elif place == "extra":
        payload["custom"] = dicts(MAX_DEPTH - 1)
    else:
        payload["context"] = {place.split(".")[1]: dicts(MAX_DEPTH - 2)}  # context is level 2
    parsed = parse("track", payload)
    assert parsed.all_errors == [()]
    wire = parsed.events[0].SerializeToString()
    assert events_pb2.Event.FromString(wire) == parsed.events[0]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"properties": {"a": {"b": {}}}}, "properties.a.b"),
        ({"traits": {"a": [[1]]}}, "traits.a[0]"),
        ({"integrations": {"a": {"b": {"c": 1}}}}, "integrations.a.b"),
        ({"custom": {"b": {"c": {}}}}, "custom.b.c"),
        ({"context": {"custom": {"b": {}}}}, "context.custom.b"),
        ({"context": {"traits": {"b": {}}}}, "context.traits.b"),
    ],
)
def test_nesting_is_bounded_everywhere_in_the_event(payload, field):
    limits = Limits(max_depth=3)
    parsed = parse("identify", {"userId": "u", **payload}, limits)
    assert [(e.code, e.field) for e in parsed.all_errors[0]] == [(Code.NESTING_TOO_DEEP, field)]


def test_pathological_nesting_is_refused_by_the_decoder():
    body = b'{"userId": "u", "properties": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}"
    error = rejected("track", body)
    assert (error.code, error.field) == (Code.NESTING_TOO_DEEP, "")


# --- integers beyond 2^53 ----------------------------------------------------------------------------


def test_integers_up_to_2_pow_53_are_kept_exactly():
    event = parse("track", {"userId": "u", "event": "E", "properties": {"max": 2**53, "min": -(2**53)}}).events[0]
    assert MessageToDict(event.properties) == {"max": 2**53, "min": -(2**53)}


@pytest.mark.parametrize(
    ("literal", "field"),
    [
        (b'{"n": 9007199254740993}', "properties.n"),
        (b'{"n": -9007199254740993}', "properties.n"),
        (b'{"order": {"ids": [1, 18446744073709551615]}}', "properties.order.ids[1]"),  # fits u64
        (b'{"n": 123456789012345678901}', "properties.n"),  # beyond 64 bits: a decoder would round it
        (b'{"n": -9999999999999999999}', "properties.n"),  # below i64
        (b'{"list": [ 100000000000000000000000 ]}', "properties.list[0]"),
    ],
)
def test_integers_a_struct_would_round_are_refused_by_name(literal, field):
    body = b'{"userId": "u", "event": "E", "properties": ' + literal + b"}"
    parsed = parse("track", body)
    (error,) = parsed.all_errors[0]
    assert (error.code, error.field) == (Code.INTEGER_OUT_OF_RANGE, field)
    assert "send it as a string" in error.message
    digits = literal.split(b"[")[-1].split(b":")[-1].strip(b" }]").split(b",")[-1].strip()
    # Described by its length as sent (read exactly, not rounded), never repeated: it may be a card number.
    assert f"an integer of {len(digits.lstrip(b'-'))} digits" in error.message
    assert digits.decode().lstrip("-") not in error.message


def test_long_digit_runs_that_are_not_integers_are_fine():
    body = (
        b'{"userId": 123456789012345678901234567890, "event": "E", "properties": '
        b'{"card": "1234567890123456789012", "note": "a:12345678901234567890", "big": 12345678901234567890.5,'
        b' "huge": 1e300}}'
    )
    event = parse("track", body).events[0]
    assert event.user_id == "123456789012345678901234567890"  # an id: kept exactly as a string
    assert MessageToDict(event.properties) == {
        "card": "1234567890123456789012",
        "note": "a:12345678901234567890",
        "big": 12345678901234567890.5,
        "huge": 1e300,
    }


def test_every_limit_is_listed_in_the_readme():
    """The README promises every limit the collector enforces is in its limits table; the id, event-name and
    messageId lengths were enforced (400 to the SDK, which does not retry it) and listed nowhere."""
    from dataclasses import fields
    from pathlib import Path

    from cdp_collector.domain.limits import DEFAULT_LIMITS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("| limit | at most |")
    table = readme[start : readme.index("\n\n", start)]
    rows = {
        "max_event_bytes": "| one event |",
        "max_batch_bytes": "| one request's body |",
        "max_batch_events": "| events in one request |",
        "max_depth": "| nesting |",
        "max_id_chars": "| `userId`, `anonymousId`, `previousId`, `groupId`, `context.groupId` |",
        "max_event_name_chars": "| `event` (track) |",
        "max_message_id_chars": "| `messageId` |",
    }
    assert sorted(rows) == sorted(f.name for f in fields(DEFAULT_LIMITS))
    for name, label in rows.items():
        value = getattr(DEFAULT_LIMITS, name)
        shown = f"{value // 1024} KB" if name.endswith("_bytes") else f"{value:,}"
        (row,) = [line.strip() for line in table.splitlines() if line.strip().startswith(label)]
        assert f"| {shown}" in row, (name, row)
