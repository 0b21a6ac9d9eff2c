"""prepare_grpc_event: protobuf events from CollectRequest get server fields, skew correction, limits, rules."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from google.protobuf.json_format import MessageToDict
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from cdp.events.v1 import events_pb2
from cdp_collector.domain import GENERATED_MESSAGE_ID_KEY, Code, Limits, prepare_grpc_event

RECEIVED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
T = events_pb2


def stamp(moment: datetime) -> Timestamp:
    result = Timestamp()
    result.FromDatetime(moment)
    return result


def prepare(
    event: events_pb2.Event,
    *,
    batch_sent_at: Timestamp | None = None,
    limits: Limits | None = None,
    index=None,
):
    kwargs = {"limits": limits} if limits else {}
    return prepare_grpc_event(
        event, received_at=RECEIVED, batch_sent_at=batch_sent_at, source_id="src-grpc", index=index, **kwargs
    )


def track(**fields) -> events_pb2.Event:
    return events_pb2.Event(
        **{"type": T.EVENT_TYPE_TRACK, "message_id": "m-1", "user_id": "u-1", "event": "Clicked", **fields}
    )


def test_server_fields_are_set_and_client_values_for_them_overwritten():
    event = track(source_id="spoofed", received_at=stamp(datetime(1999, 1, 1, tzinfo=UTC)))
    assert prepare(event) == []
    assert event.source_id == "src-grpc"
    assert event.received_at.ToDatetime(UTC) == RECEIVED
    assert event.timestamp.ToDatetime(UTC) == RECEIVED  # no client time at all
    assert not event.HasField("original_timestamp") and not event.HasField("extra")


def test_a_missing_message_id_is_generated_and_marked():
    event = track(message_id="")
    assert prepare(event) == []
    assert uuid.UUID(event.message_id).version == 4
    assert event.extra.fields[GENERATED_MESSAGE_ID_KEY].bool_value is True


def test_clients_may_not_set_the_generated_marker():
    event = track()
    event.extra.fields[GENERATED_MESSAGE_ID_KEY].bool_value = True
    errors = prepare(event, index=2)
    assert [(e.code, e.field) for e in errors] == [(Code.RESERVED_FIELD, f"events[2].extra.{GENERATED_MESSAGE_ID_KEY}")]


def test_skew_is_corrected_with_the_events_own_sent_at():
    sent = datetime(2024, 5, 1, 15, 0, 0, tzinfo=UTC)  # device clock 3 h fast
    happened = sent - timedelta(seconds=42, microseconds=5)
    event = track(sent_at=stamp(sent), original_timestamp=stamp(happened))
    assert prepare(event, batch_sent_at=stamp(datetime(2000, 1, 1, tzinfo=UTC))) == []
    assert event.timestamp.ToDatetime(UTC) == RECEIVED - timedelta(seconds=42, microseconds=5)
    assert event.original_timestamp.ToDatetime(UTC) == happened
    assert event.sent_at.ToDatetime(UTC) == sent


def test_skew_is_corrected_with_the_requests_sent_at_when_the_event_has_none():
    sent = datetime(2024, 4, 30, 12, 0, 0, tzinfo=UTC)  # device clock a day slow
    event = track(original_timestamp=stamp(sent - timedelta(minutes=2)))
    assert prepare(event, batch_sent_at=stamp(sent)) == []
    assert event.timestamp.ToDatetime(UTC) == RECEIVED - timedelta(minutes=2)
    assert event.sent_at.ToDatetime(UTC) == sent  # recorded on the event


def test_a_client_that_set_only_timestamp_meant_its_own_clock():
    sent = datetime(2024, 5, 1, 11, 0, 0, tzinfo=UTC)
    event = track(timestamp=stamp(sent - timedelta(seconds=7)))
    assert prepare(event, batch_sent_at=stamp(sent)) == []
    assert event.original_timestamp.ToDatetime(UTC) == sent - timedelta(seconds=7)
    assert event.timestamp.ToDatetime(UTC) == RECEIVED - timedelta(seconds=7)


def test_without_any_sent_at_the_client_time_is_kept():
    happened = datetime(2020, 2, 2, tzinfo=UTC)
    event = track(original_timestamp=stamp(happened))
    assert prepare(event, batch_sent_at=Timestamp()) == []  # an unset request field reads as all zeros
    assert event.timestamp.ToDatetime(UTC) == happened
    assert not event.HasField("sent_at")


def test_a_future_client_time_is_kept_as_original_and_the_event_time_is_the_arrival():
    far = datetime(9999, 12, 31, tzinfo=UTC)
    only_timestamp = track(timestamp=stamp(far))
    assert prepare(only_timestamp) == []
    assert only_timestamp.original_timestamp.ToDatetime(UTC) == far
    assert only_timestamp.timestamp.ToDatetime(UTC) == RECEIVED
    # sent_at earlier than the event itself: the corrected time would land after the arrival
    after_send = track(original_timestamp=stamp(RECEIVED + timedelta(minutes=5)), sent_at=stamp(RECEIVED))
    assert prepare(after_send) == []
    assert after_send.timestamp.ToDatetime(UTC) == RECEIVED


def test_invalid_protobuf_timestamps_are_refused():
    event = track(original_timestamp=Timestamp(seconds=1, nanos=-5))
    errors = prepare(event, index=0)
    assert [(e.code, e.field) for e in errors] == [(Code.INVALID_TIMESTAMP, "events[0].original_timestamp")]
    event = track()
    errors = prepare(event, batch_sent_at=Timestamp(seconds=10**12), index=1)
    assert [(e.code, e.field) for e in errors] == [(Code.INVALID_TIMESTAMP, "sent_at")]


def test_rules_apply_with_proto_field_names_under_the_events_index():
    event = events_pb2.Event(type=T.EVENT_TYPE_GROUP, message_id="m")
    errors = prepare(event, index=3)
    assert [(e.code, e.field) for e in errors] == [
        (Code.MISSING_FIELD, "events[3].user_id"),
        (Code.MISSING_FIELD, "events[3].group_id"),
    ]
    assert [(e.code, e.field) for e in prepare(events_pb2.Event(user_id="u", message_id="m"))] == [
        (Code.INVALID_EVENT_TYPE, "type")
    ]


def test_size_is_the_serialized_protobuf_as_received_with_an_exact_boundary():
    limits = Limits(max_event_bytes=1000)

    def sized(size: int) -> events_pb2.Event:
        event = track(properties=Struct())
        pad = event.properties.fields["pad"]
        pad.string_value = ""
        length = size - event.ByteSize() - 8  # length prefixes grow with the pad: creep up to the size
        while event.ByteSize() < size:
            length += 1
            pad.string_value = "x" * length
        assert event.ByteSize() == size
        return event

    assert prepare(sized(1000), limits=limits) == []
    (error,) = prepare(sized(1001), limits=limits, index=7)
    assert (error.code, error.field) == (Code.EVENT_TOO_LARGE, "events[7]")
    assert error.message.startswith("event is 1001 bytes; the limit is 1000 bytes.")
    assert "serialized protobuf" in error.message


def test_the_default_event_limit_is_32_kb_of_protobuf():
    event = track()
    event.properties.fields["pad"].string_value = "x" * 40_000
    (error,) = prepare(event)
    assert error.code == Code.EVENT_TOO_LARGE
    assert f"event is {event.ByteSize()} bytes; the limit is 32768 bytes (32 KB)." in error.message
    assert MessageToDict(event.properties)["pad"] == "x" * 40_000  # untouched: not examined further


def test_the_requests_sent_at_may_be_given_as_a_datetime():
    sent = datetime(2024, 5, 1, 18, 0, 0, tzinfo=UTC)  # device clock 6 h fast
    event = track(original_timestamp=stamp(sent - timedelta(seconds=3)))
    assert prepare(event, batch_sent_at=sent) == []
    assert event.timestamp.ToDatetime(UTC) == RECEIVED - timedelta(seconds=3)
    assert event.sent_at.ToDatetime(UTC) == sent


def test_a_replayed_event_with_both_times_keeps_its_timestamp_as_sent():
    """gRPC as HTTP: an event carrying `timestamp` and `original_timestamp` (a replay of an archive) has the
    sent `timestamp` as its time, not the device clock's original corrected again."""
    archived = datetime(2024, 5, 1, 10, 0, 0, 500000, tzinfo=UTC)
    device = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
    event = track(
        timestamp=stamp(archived), original_timestamp=stamp(device), sent_at=stamp(device + timedelta(seconds=2))
    )
    assert not prepare(event)
    assert event.timestamp.ToDatetime(UTC) == archived and event.original_timestamp.ToDatetime(UTC) == device
    future = track(timestamp=stamp(RECEIVED + timedelta(days=3)), original_timestamp=stamp(device))
    assert not prepare(future)
    assert future.timestamp.ToDatetime(UTC) == RECEIVED
