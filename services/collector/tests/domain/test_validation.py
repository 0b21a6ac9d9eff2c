"""validate_event: the per-type rules, on protobuf events (the gRPC shape), with proto and JSON field names."""

from __future__ import annotations

import pytest

from cdp.events.v1 import events_pb2
from cdp_collector.domain import Code, Limits, partition_key, validate_event
from cdp_collector.domain.events import JSON_NAMES

T = events_pb2


def event(**fields) -> events_pb2.Event:
    return events_pb2.Event(message_id="m-1", **fields)


def codes(e: events_pb2.Event, **kwargs) -> list[tuple[str, str]]:
    return [(error.code, error.field) for error in validate_event(e, **kwargs)]


VALID = [
    event(type=T.EVENT_TYPE_TRACK, user_id="u", event="Order Completed"),
    event(type=T.EVENT_TYPE_TRACK, anonymous_id="a", event="x" * 200),
    event(type=T.EVENT_TYPE_IDENTIFY, user_id="u"),
    event(type=T.EVENT_TYPE_IDENTIFY, anonymous_id="a"),
    event(type=T.EVENT_TYPE_ALIAS, user_id="u", previous_id="a"),
    event(type=T.EVENT_TYPE_PAGE, anonymous_id="a"),
    event(type=T.EVENT_TYPE_SCREEN, user_id="u", name="Home"),
    event(type=T.EVENT_TYPE_GROUP, user_id="u", group_id="g"),
]


@pytest.mark.parametrize("valid", VALID, ids=lambda e: T.EventType.Name(e.type))
def test_valid_events_have_no_errors(valid):
    assert validate_event(valid) == []


def test_unspecified_and_unknown_types_are_refused():
    (error,) = validate_event(event(user_id="u"))
    assert (error.code, error.field) == (Code.INVALID_EVENT_TYPE, "type")
    assert "EVENT_TYPE_UNSPECIFIED" in error.message and "track, identify" in error.message
    assert codes(event(type=99, user_id="u")) == [(Code.INVALID_EVENT_TYPE, "type")]


@pytest.mark.parametrize(
    "kind",
    [T.EVENT_TYPE_TRACK, T.EVENT_TYPE_IDENTIFY, T.EVENT_TYPE_PAGE, T.EVENT_TYPE_SCREEN, T.EVENT_TYPE_GROUP],
)
def test_every_type_needs_user_id_or_anonymous_id(kind):
    e = event(type=kind, event="E", group_id="g")
    (error,) = validate_event(e)
    assert (error.code, error.field) == (Code.MISSING_FIELD, "user_id")
    assert "user_id or anonymous_id" in error.message


def test_track_needs_a_non_blank_event_name_of_at_most_200_characters():
    assert codes(event(type=T.EVENT_TYPE_TRACK, user_id="u")) == [(Code.MISSING_FIELD, "event")]
    assert codes(event(type=T.EVENT_TYPE_TRACK, user_id="u", event="   ")) == [(Code.MISSING_FIELD, "event")]
    (error,) = validate_event(event(type=T.EVENT_TYPE_TRACK, user_id="u", event="x" * 201))
    assert (error.code, error.field) == (Code.TOO_LONG, "event")
    assert error.message == "event is 201 characters; the limit is 200"


def test_alias_needs_user_id_and_previous_id():
    assert codes(event(type=T.EVENT_TYPE_ALIAS, anonymous_id="a")) == [
        (Code.MISSING_FIELD, "user_id"),
        (Code.MISSING_FIELD, "previous_id"),
    ]
    assert codes(event(type=T.EVENT_TYPE_ALIAS, user_id="u")) == [(Code.MISSING_FIELD, "previous_id")]


def test_group_needs_group_id():
    assert codes(event(type=T.EVENT_TYPE_GROUP, user_id="u")) == [(Code.MISSING_FIELD, "group_id")]


def test_message_id_is_required_and_at_most_100_characters():
    assert codes(events_pb2.Event(type=T.EVENT_TYPE_PAGE, user_id="u")) == [(Code.MISSING_FIELD, "message_id")]
    ok = events_pb2.Event(type=T.EVENT_TYPE_PAGE, user_id="u", message_id="m" * 100)
    assert validate_event(ok) == []
    ok.message_id += "m"
    assert codes(ok) == [(Code.TOO_LONG, "message_id")]


@pytest.mark.parametrize("field", ["user_id", "anonymous_id", "previous_id", "group_id"])
def test_ids_are_at_most_256_characters(field):
    e = event(type=T.EVENT_TYPE_PAGE, user_id="u", anonymous_id="a")
    setattr(e, field, "x" * 256)
    assert validate_event(e) == []
    setattr(e, field, "x" * 257)
    assert codes(e) == [(Code.TOO_LONG, field)]


def test_context_group_id_is_an_id_too():
    e = event(type=T.EVENT_TYPE_PAGE, user_id="u")
    e.context.group_id = "g" * 257
    assert codes(e) == [(Code.TOO_LONG, "context.group_id")]


def test_all_problems_are_reported_in_a_fixed_order():
    e = events_pb2.Event(type=T.EVENT_TYPE_TRACK, message_id="m" * 101, previous_id="p" * 300)
    assert codes(e) == [
        (Code.TOO_LONG, "message_id"),
        (Code.TOO_LONG, "previous_id"),
        (Code.MISSING_FIELD, "user_id"),
        (Code.MISSING_FIELD, "event"),
    ]


def test_paths_use_the_base_and_the_clients_names():
    e = events_pb2.Event(type=T.EVENT_TYPE_ALIAS, message_id="m")
    assert codes(e, base="events[4]") == [
        (Code.MISSING_FIELD, "events[4].user_id"),
        (Code.MISSING_FIELD, "events[4].previous_id"),
    ]
    errors = validate_event(e, base="batch[2]", names=JSON_NAMES)
    assert [error.field for error in errors] == ["batch[2].userId", "batch[2].previousId"]
    assert "alias needs previousId" in errors[1].message


def test_limits_can_be_changed():
    tight = Limits(max_id_chars=3, max_message_id_chars=2, max_event_name_chars=4)
    e = event(type=T.EVENT_TYPE_TRACK, user_id="user", event="Event")
    assert codes(e, limits=tight) == [
        (Code.TOO_LONG, "message_id"),
        (Code.TOO_LONG, "user_id"),
        (Code.TOO_LONG, "event"),
    ]


def test_partition_key_is_user_id_else_anonymous_id():
    assert partition_key(event(user_id="u", anonymous_id="a")) == "u"
    assert partition_key(event(anonymous_id="a")) == "a"
    assert partition_key(event()) == ""
