"""parse_request: the Segment HTTP shapes, field spellings, type checks and what is kept."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import orjson
import pytest
from google.protobuf.json_format import MessageToDict

from cdp.events.v1 import events_pb2
from cdp_collector.domain import GENERATED_MESSAGE_ID_KEY, KINDS, Code, RequestRejected, parse_request

RECEIVED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
T = events_pb2


def parse(kind: str, payload: object):
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return parse_request(kind, body, received_at=RECEIVED, source_id="src-web")


def rejected(kind: str, payload: object) -> RequestRejected:
    with pytest.raises(RequestRejected) as caught:
        parse(kind, payload)
    return caught.value


def one(kind: str, payload: object) -> events_pb2.Event:
    parsed = parse(kind, payload)
    assert parsed.all_errors == [()] and parsed.errors == [None], parsed.all_errors
    return parsed.events[0]


def problems(kind: str, payload: object) -> list[tuple[str, str]]:
    parsed = parse(kind, payload)
    return [(error.code, error.field) for errors in parsed.all_errors for error in errors]


BASE = {"messageId": "m-1", "userId": "u-1"}


# --- single calls -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "payload", "expected_type"),
    [
        ("track", {"event": "Clicked"}, T.EVENT_TYPE_TRACK),
        ("identify", {"traits": {"a": 1}}, T.EVENT_TYPE_IDENTIFY),
        ("alias", {"previousId": "anon-1"}, T.EVENT_TYPE_ALIAS),
        ("page", {"name": "Home"}, T.EVENT_TYPE_PAGE),
        ("screen", {"name": "Home"}, T.EVENT_TYPE_SCREEN),
        ("group", {"groupId": "g-1"}, T.EVENT_TYPE_GROUP),
    ],
)
def test_single_call_type_comes_from_the_endpoint(kind, payload, expected_type):
    assert one(kind, {**BASE, **payload}).type == expected_type
    assert one(kind, {**BASE, **payload, "type": kind}).type == expected_type


def test_single_call_type_must_match_the_endpoint():
    parsed = parse("track", {**BASE, "type": "identify", "event": "Clicked"})
    (error,) = parsed.all_errors[0]
    assert (error.code, error.field) == (Code.INVALID_EVENT_TYPE, "type")
    assert "/v1/track" in error.message and "identify" in error.message
    assert parsed.events == [None]


def test_unknown_kind_is_a_caller_bug():
    assert {"batch", "track", "identify", "alias", "page", "screen", "group"} == KINDS
    with pytest.raises(ValueError, match="unknown kind"):
        parse("purchase", {})


def test_page_carries_name_category_and_properties():
    event = one(
        "page",
        {
            **BASE,
            "name": "Pricing",
            "category": "Marketing",
            "properties": {
                "path": "/pricing",
                "referrer": "https://google.com/",
                "title": "Pricing",
                "tier": None,
            },
        },
    )
    assert (event.name, event.category) == ("Pricing", "Marketing")
    assert MessageToDict(event.properties) == {
        "path": "/pricing",
        "referrer": "https://google.com/",
        "title": "Pricing",
        "tier": None,
    }


# --- batch ------------------------------------------------------------------------------------------


def test_batch_keeps_events_and_errors_aligned():
    parsed = parse(
        "batch",
        {
            "batch": [
                {"type": "track", "event": "A", "userId": "u"},
                "not an event",
                {"type": "track", "userId": "u"},  # no event name
                {"event": "B", "userId": "u"},  # no type
                {"type": "purchase", "userId": "u"},
                {"type": "identify", "anonymousId": "a"},
            ]
        },
    )
    assert len(parsed.events) == len(parsed.errors) == len(parsed.all_errors) == len(parsed.message_ids) == 6
    assert [event is not None for event in parsed.events] == [True, False, False, False, False, True]
    assert [index for index, _ in parsed.valid()] == [0, 5]
    assert parsed.all_errors[0] == () and parsed.all_errors[5] == ()
    assert [(e.code, e.field) for e in parsed.all_errors[1]] == [(Code.INVALID_TYPE, "batch[1]")]
    assert [(e.code, e.field) for e in parsed.all_errors[2]] == [(Code.MISSING_FIELD, "batch[2].event")]
    assert [(e.code, e.field) for e in parsed.all_errors[3]] == [(Code.MISSING_FIELD, "batch[3].type")]
    assert [(e.code, e.field) for e in parsed.all_errors[4]] == [(Code.INVALID_EVENT_TYPE, "batch[4].type")]
    assert "track, identify, alias, page, screen, group" in parsed.all_errors[4][0].message


def test_empty_batch_is_accepted_with_nothing_in_it():
    parsed = parse("batch", {"batch": []})
    assert parsed.events == [] and parsed.errors == [] and parsed.all_errors == []


@pytest.mark.parametrize(
    ("payload", "code", "field"),
    [
        ({"sentAt": "2024-05-01T12:00:00Z"}, Code.MISSING_FIELD, "batch"),
        ({"batch": {"type": "track"}}, Code.INVALID_TYPE, "batch"),
        ({"batch": [], "context": "web"}, Code.INVALID_TYPE, "context"),
        ({"batch": [], "integrations": [1]}, Code.INVALID_TYPE, "integrations"),
        ({"batch": [], "sentAt": "yesterday"}, Code.INVALID_TIMESTAMP, "sentAt"),
        ({"batch": [], "userId": "u-1"}, Code.MISPLACED_FIELD, "userId"),
        ({"batch": [], "messageId": "m"}, Code.MISPLACED_FIELD, "messageId"),
    ],
)
def test_batch_envelope_problems_refuse_the_request(payload, code, field):
    error = rejected("batch", {**payload, "writeKey": "wk_123456789"})
    assert (error.code, error.field, error.status) == (code, field, 400)


def test_batch_context_and_integrations_are_merged_under_each_items_own():
    parsed = parse(
        "batch",
        {
            "context": {
                "ip": "198.51.100.1",
                "library": {"name": "batch-lib", "version": "1"},
                "locale": "en-US",
            },
            "integrations": {"All": False, "Mixpanel": True},
            "batch": [
                {"type": "track", "event": "A", "userId": "u"},
                {
                    "type": "track",
                    "event": "B",
                    "userId": "u",
                    "context": {"locale": "fr-FR", "library": {"name": "own-lib"}},
                    "integrations": {"Mixpanel": False},
                },
            ],
        },
    )
    first, second = parsed.events
    assert (first.context.ip, first.context.locale, first.context.library.name) == (
        "198.51.100.1",
        "en-US",
        "batch-lib",
    )
    assert MessageToDict(first.integrations) == {"All": False, "Mixpanel": True}
    # The item's own keys win, one level deep: its library replaces the batch's library as a whole.
    assert (second.context.ip, second.context.locale) == ("198.51.100.1", "fr-FR")
    assert (second.context.library.name, second.context.library.version) == ("own-lib", "")
    assert MessageToDict(second.integrations) == {"All": False, "Mixpanel": False}


def test_unknown_batch_level_keys_are_shared_into_every_events_extra():
    parsed = parse(
        "batch",
        {
            "metadata": {"nodeVersion": "20.1"},
            "batch": [
                {"type": "track", "event": "A", "userId": "u", "messageId": "m-1"},
                {"type": "track", "event": "B", "userId": "u", "messageId": "m-2", "metadata": "own"},
            ],
        },
    )
    assert MessageToDict(parsed.events[0].extra) == {"metadata": {"nodeVersion": "20.1"}}
    assert MessageToDict(parsed.events[1].extra) == {"metadata": "own"}


def test_item_context_of_the_wrong_type_is_its_own_error_even_with_a_batch_context():
    parsed = parse(
        "batch",
        {
            "context": {"ip": "1.1.1.1"},
            "batch": [{"type": "track", "event": "A", "userId": "u", "context": 7}],
        },
    )
    assert [(e.code, e.field) for e in parsed.all_errors[0]] == [(Code.INVALID_TYPE, "batch[0].context")]


# --- spellings --------------------------------------------------------------------------------------


def test_snake_case_aliases_are_read():
    event = one(
        "track",
        {
            "message_id": "m-1",
            "user_id": "u-1",
            "anonymous_id": "a-1",
            "event": "Clicked",
            "original_timestamp": "2024-05-01T11:00:00Z",
            "sent_at": "2024-05-01T11:00:10Z",
        },
    )
    assert (event.message_id, event.user_id, event.anonymous_id) == ("m-1", "u-1", "a-1")
    assert event.original_timestamp.ToDatetime(UTC) == datetime(2024, 5, 1, 11, 0, tzinfo=UTC)
    assert event.timestamp.ToDatetime(UTC) == datetime(2024, 5, 1, 11, 59, 50, tzinfo=UTC)
    assert one("alias", {"user_id": "u", "previous_id": "p"}).previous_id == "p"
    assert one("group", {"user_id": "u", "group_id": "g"}).group_id == "g"


def test_both_spellings_with_the_same_value_are_fine_and_different_values_conflict():
    assert one("track", {**BASE, "user_id": "u-1", "event": "E"}).user_id == "u-1"
    parsed = parse("track", {**BASE, "user_id": "u-2", "event": "E"})
    (error,) = parsed.all_errors[0]
    assert (error.code, error.field) == (Code.CONFLICTING_FIELDS, "user_id")
    assert "different values (strings of 3 and 3 characters)" in error.message and "send only userId" in error.message
    assert "u-1" not in error.message and "u-2" not in error.message  # described, never repeated


def test_errors_name_fields_as_the_client_spelled_them():
    assert problems("batch", {"batch": [{"type": "alias", "user_id": "u"}]}) == [
        (Code.MISSING_FIELD, "batch[0].previousId")
    ]
    assert problems("batch", {"batch": [{"type": "alias", "user_id": "u", "previous_id": "x" * 300}]}) == [
        (Code.TOO_LONG, "batch[0].previous_id")
    ]
    assert problems("track", {"event": "E", "user_id": 1.5}) == [(Code.INVALID_TYPE, "user_id")]


# --- ids --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["userId", "anonymousId", "previousId", "groupId", "messageId"])
def test_integer_ids_become_strings(field):
    event = one("batch", {"batch": [{"type": "alias", "userId": "u", "previousId": "p", field: 9007199254740993}]})
    proto_field = {"userId": "user_id", "anonymousId": "anonymous_id", "previousId": "previous_id"}.get(
        field, {"groupId": "group_id", "messageId": "message_id"}.get(field)
    )
    assert getattr(event, proto_field) == "9007199254740993"  # beyond 2^53 and still exact


@pytest.mark.parametrize("value", [1.5, 42.0, True, False, {"id": 1}, ["u"]])
def test_ids_of_other_types_are_refused(value):
    parsed = parse("track", {"event": "E", "anonymousId": "a", "userId": value})
    (error,) = parsed.all_errors[0]
    assert (error.code, error.field) == (Code.INVALID_TYPE, "userId")
    assert "must be a string (or an integer)" in error.message


def test_null_and_empty_ids_are_absent():
    parsed = parse("track", {"event": "E", "userId": None, "anonymousId": ""})
    (error,) = parsed.all_errors[0]
    assert (error.code, error.field) == (Code.MISSING_FIELD, "userId")
    assert "userId or anonymousId" in error.message


# --- field types ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("properties", [1, 2]),
        ("properties", "x"),
        ("traits", ["a"]),
        ("context", "web"),
        ("integrations", True),
        ("event", 12),
        ("name", {"a": 1}),
        ("category", False),
    ],
)
def test_fields_of_the_wrong_json_type_are_refused(field, value):
    parsed = parse("track", {**BASE, "event": "E", field: value})
    assert parsed.events == [None]
    assert [(e.code, e.field) for e in parsed.all_errors[0]] == [(Code.INVALID_TYPE, field)]
    assert "must be" in parsed.all_errors[0][0].message


def test_every_problem_of_an_event_is_reported_once_per_field():
    parsed = parse(
        "batch",
        {
            "batch": [
                {
                    "type": "track",
                    "userId": 1.5,
                    "properties": [],
                    "timestamp": "2024-05",
                    "messageId": "m" * 101,
                }
            ]
        },
    )
    assert [(e.code, e.field) for e in parsed.all_errors[0]] == [
        (Code.INVALID_TYPE, "batch[0].userId"),
        (Code.INVALID_TYPE, "batch[0].properties"),
        (Code.INVALID_TIMESTAMP, "batch[0].timestamp"),
        (Code.TOO_LONG, "batch[0].messageId"),
        (Code.MISSING_FIELD, "batch[0].event"),
    ]


# --- what is kept, generated or ignored --------------------------------------------------------------


def test_unknown_top_level_fields_are_kept_in_extra():
    event = one(
        "track",
        {
            **BASE,
            "event": "E",
            "channel": "server",
            "_metadata": {"bundled": ["Segment.io"], "unbundled": []},
            "version": 2,
            "nothing": None,
        },
    )
    assert MessageToDict(event.extra) == {
        "channel": "server",
        "_metadata": {"bundled": ["Segment.io"], "unbundled": []},
        "version": 2,
        "nothing": None,
    }


def test_client_received_at_is_ignored_and_write_key_is_returned_not_stored():
    parsed = parse("identify", {**BASE, "receivedAt": "1999-01-01T00:00:00Z", "writeKey": "wk_abcdefgh", "traits": {}})
    (event,) = parsed.events
    assert parsed.write_key == "wk_abcdefgh"
    assert event.received_at.ToDatetime(UTC) == RECEIVED
    assert not event.HasField("extra")


def test_missing_message_id_is_generated_and_marked():
    first = one("track", {"userId": "u", "event": "E"})
    second = one("track", {"userId": "u", "event": "E", "messageId": ""})
    assert uuid.UUID(first.message_id).version == 4
    assert first.message_id != second.message_id
    assert first.extra.fields[GENERATED_MESSAGE_ID_KEY].bool_value is True
    assert GENERATED_MESSAGE_ID_KEY not in one("track", {**BASE, "event": "E"}).extra.fields


def test_clients_may_not_send_the_generated_marker():
    parsed = parse("track", {**BASE, "event": "E", GENERATED_MESSAGE_ID_KEY: True})
    assert [(e.code, e.field) for e in parsed.all_errors[0]] == [(Code.RESERVED_FIELD, GENERATED_MESSAGE_ID_KEY)]


def test_both_timestamp_and_original_timestamp_keep_each_its_value():
    event = one(
        "track",
        {
            **BASE,
            "event": "E",
            "timestamp": "2024-05-01T11:00:05Z",
            "originalTimestamp": "2024-05-01T11:00:00Z",
            "sentAt": "2024-05-01T11:00:10Z",
        },
    )
    assert event.original_timestamp.ToDatetime(UTC) == datetime(2024, 5, 1, 11, 0, tzinfo=UTC)
    assert event.timestamp.ToDatetime(UTC) == datetime(2024, 5, 1, 11, 0, 5, tzinfo=UTC)
    assert not event.HasField("extra")


def test_identify_traits_come_from_context_only_when_top_level_traits_are_absent():
    lifted = one("identify", {**BASE, "context": {"traits": {"email": "a@example.com"}}})
    assert MessageToDict(lifted.traits) == {"email": "a@example.com"}
    own = one("identify", {**BASE, "traits": {"plan": "pro"}, "context": {"traits": {"email": "a@example.com"}}})
    assert MessageToDict(own.traits) == {"plan": "pro"}
    track = one("track", {**BASE, "event": "E", "context": {"traits": {"email": "a@example.com"}}})
    assert not track.HasField("traits")


def test_server_fields_are_set():
    event = one("track", {**BASE, "event": "E", "sourceId": "spoofed"})
    assert event.source_id == "src-web"
    assert event.received_at.ToDatetime(UTC) == RECEIVED
    assert MessageToDict(event.extra) == {"sourceId": "spoofed"}  # an unknown key, kept but not trusted


# --- the body itself --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"userId": "u", "event": "E",}', "trailing comma"),
        (b"", "empty"),
        (b'{"userId": "u"', "line 1"),
        (b'{"a": NaN}', "position 6"),
        (b'{"a": "\xff"}', "UTF-8"),
    ],
)
def test_malformed_json_refuses_the_request_with_where(body, fragment):
    error = rejected("track", body)
    assert (error.code, error.field, error.status) == (Code.INVALID_JSON, "", 400)
    assert fragment in error.message


@pytest.mark.parametrize(("body", "kind"), [(b"[]", "array"), (b'"track"', "string"), (b"null", "null")])
def test_a_body_that_is_not_an_object_is_refused(body, kind):
    for endpoint in ("track", "batch"):
        error = rejected(endpoint, body)
        assert (error.code, error.field) == (Code.INVALID_TYPE, "")
        assert f"got {kind}" in error.message


# --- what the transports read off the result ---------------------------------------------------------


def test_result_gives_first_error_all_errors_and_message_ids_per_item():
    parsed = parse(
        "batch",
        {
            "batch": [
                {"type": "track", "event": "A", "userId": "u", "messageId": "m-ok"},
                {"type": "track", "userId": 1.5, "message_id": 42},  # two problems; an id it sent
                {"type": "page", "anonymousId": "a"},  # valid, id generated
                [],
            ]
        },
    )
    assert [error.code if error else None for error in parsed.errors] == [
        None,
        Code.INVALID_TYPE,
        None,
        Code.INVALID_TYPE,
    ]
    assert [len(errors) for errors in parsed.all_errors] == [0, 2, 0, 1]
    assert parsed.errors[1] == parsed.all_errors[1][0]
    assert parsed.message_ids[:2] == ["m-ok", "42"]
    assert parsed.message_ids[2] == parsed.events[2].message_id and uuid.UUID(parsed.message_ids[2])
    assert parsed.message_ids[3] == ""


def test_assign_source_for_requests_authenticated_by_their_body():
    parsed = parse_request(
        "batch",
        orjson.dumps({"writeKey": "wk_body_key1", "batch": [{"type": "page", "userId": "u"}, {"type": "page"}]}),
        received_at=RECEIVED,
        source_id="",
    )
    assert parsed.write_key == "wk_body_key1"
    parsed.assign_source("src-from-body")
    assert parsed.events[0].source_id == "src-from-body" and parsed.events[1] is None


def test_request_rejected_carries_code_field_message_and_an_http_status():
    error = rejected("batch", {"batch": "x"})
    assert (error.code, error.field, error.status) == (Code.INVALID_TYPE, "batch", 400)
    assert error.error.code == Code.INVALID_TYPE and str(error).startswith("batch: batch must be an array")
    transport = RequestRejected("unsupported_encoding", "Content-Encoding", "use gzip", status=415)
    assert (transport.code, transport.status) == ("unsupported_encoding", 415)
