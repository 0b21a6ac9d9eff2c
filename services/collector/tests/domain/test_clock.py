"""Client times and clock-skew correction: timestamp = received_at - (sent_at - original_timestamp)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from cdp_collector.domain import Code, TimestampError, corrected_ns, parse_request, parse_timestamp
from cdp_collector.domain.clock import format_ns
from cdp_kit.timestamps import MAX_NS, MIN_NS, NANOS, datetime_to_ns

RECEIVED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
EPOCH_2024 = int(datetime(2024, 5, 1, 12, 0, tzinfo=UTC).timestamp()) * NANOS


def ns_of(moment: datetime) -> int:
    return datetime_to_ns(moment)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T12:00:00Z", EPOCH_2024),
        ("2024-05-01T12:00:00.123Z", EPOCH_2024 + 123_000_000),
        ("2024-05-01T12:00:00.123+00:00", EPOCH_2024 + 123_000_000),  # segment-analytics-python
        ("2024-05-01T12:00:00.123456+00:00", EPOCH_2024 + 123_456_000),  # rudder-sdk-python
        ("2024-05-01T12:00:00.123456789Z", EPOCH_2024 + 123_456_789),  # RFC 3339 nano (Go, Java)
        ("2024-05-01T12:00:00.1234567Z", EPOCH_2024 + 123_456_700),
        ("2024-05-01T12:00:00.1234567891Z", EPOCH_2024 + 123_456_789),  # beyond ns: truncated
        ("2024-05-01T14:00:00+02:00", EPOCH_2024),
        ("2024-05-01T07:30:00-04:30", EPOCH_2024),
        ("2024-05-01T14:00:00+0200", EPOCH_2024),
        ("2024-05-01t12:00:00z", EPOCH_2024),
        ("2024-05-01 12:00:00Z", EPOCH_2024),
        ("2024-05-01T12:00Z", EPOCH_2024),
        ("1969-12-31T23:59:59.5Z", -500_000_000),
        # What Segment accepts besides: no zone (UTC), fields not zero-padded, a date alone (midnight UTC).
        ("2024-05-01T12:00:00", EPOCH_2024),
        ("2024-05-01 12:00:00.123", EPOCH_2024 + 123_000_000),  # a warehouse row's form
        ("2024-5-1T12:00:00Z", EPOCH_2024),
        ("2024-05-01T12:0:0.5Z", EPOCH_2024 + 500_000_000),
        ("2024-5-01T14:00:00.123456789+02:00", EPOCH_2024 + 123_456_789),
        ("2024-05-01", EPOCH_2024 - 12 * 3600 * NANOS),
        ("2024-5-1", EPOCH_2024 - 12 * 3600 * NANOS),
        (
            "2015-2-02T00:30:08.276Z",
            int(datetime(2015, 2, 2, 0, 30, 8, 276000, tzinfo=UTC).timestamp() * 1000) * 1_000_000,
        ),
        (1714564800000, EPOCH_2024),  # epoch milliseconds
        (1714564800000.5, EPOCH_2024 + 500_000),
        (0, 0),
        (-1000, -NANOS),
    ],
)
def test_accepted_timestamps(text, expected):
    assert parse_timestamp(text) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("20240501T120000Z", "must be an ISO-8601 date-time"),
        ("2024-05", "must be"),
        ("2024-5-1T12Z", "must be"),
        ("2024-02-30", "day is out of range for month"),
        ("2024-W18-3T12:00:00Z", "must be"),
        ("2024-13-01T12:00:00Z", "month must be in 1..12"),
        ("2024-05-01T25:00:00Z", "must be"),
        ("yesterday", "must be"),
        ("", "must be"),
        ("2024-05-01T12:00:00Zjunk", "must be"),
        (253402300800000, "outside the years 0001..9999"),
        (True, "got a boolean"),
        (None, "got null"),
        ({"seconds": 1}, "got an object with 1 entry"),
    ],
)
def test_refused_timestamps_say_what_would_be_valid(value, fragment):
    with pytest.raises(TimestampError, match=fragment):
        parse_timestamp(value)


def test_the_extreme_timestamps_a_protobuf_can_hold():
    assert parse_timestamp("0001-01-01T00:00:00Z") == MIN_NS
    assert parse_timestamp("9999-12-31T23:59:59.999999999Z") == MAX_NS
    with pytest.raises(TimestampError, match="outside"):
        parse_timestamp("0001-01-01T00:00:00+01:00")
    assert format_ns(MIN_NS) == "0001-01-01T00:00:00.000000000Z"


# --- the correction ------------------------------------------------------------------------------------

HOUR = 3600 * NANOS


def test_client_clock_ahead_is_corrected_back():
    # Device clock 1 h fast: it says the event happened at 13:00 and was sent at 13:00:05.
    received = ns_of(RECEIVED)
    corrected = corrected_ns(received_at=received, sent_at=EPOCH_2024 + HOUR + 5 * NANOS, client_time=EPOCH_2024 + HOUR)
    assert corrected == received - 5 * NANOS


def test_client_clock_behind_is_corrected_forward():
    # Device clock a day slow; the event happened 2 minutes before the batch left.
    received = ns_of(RECEIVED)
    day = 24 * HOUR
    sent = EPOCH_2024 - day
    assert corrected_ns(received_at=received, sent_at=sent, client_time=sent - 120 * NANOS) == received - 120 * NANOS


def test_without_sent_at_the_client_time_is_kept_and_without_client_time_received_at_is_used():
    assert corrected_ns(received_at=5, sent_at=None, client_time=3) == 3
    assert corrected_ns(received_at=5, sent_at=None, client_time=None) == 5
    assert corrected_ns(received_at=5, sent_at=4, client_time=None) == 5


def test_a_correction_outside_the_representable_range_is_an_error():
    with pytest.raises(TimestampError, match="check the client clock"):
        corrected_ns(received_at=ns_of(RECEIVED), sent_at=MAX_NS, client_time=MIN_NS)


# --- through parse_request -------------------------------------------------------------------------------


def parse_events(payload: dict, kind: str = "batch"):
    parsed = parse_request(kind, orjson.dumps(payload), received_at=RECEIVED, source_id="src")
    return parsed


@pytest.mark.parametrize("skew", [timedelta(hours=3), timedelta(hours=-3), timedelta(days=-400), timedelta(0)])
def test_batch_sent_at_corrects_every_event_for_skewed_clocks(skew):
    device_now = RECEIVED + skew  # what the device's clock reads when the batch arrives
    sent = device_now - timedelta(milliseconds=800)  # in flight for 800 ms
    happened = [sent - timedelta(seconds=30), sent - timedelta(minutes=5, microseconds=250)]
    parsed = parse_events(
        {
            "sentAt": sent.isoformat(),
            "batch": [{"type": "page", "userId": "u", "timestamp": when.isoformat()} for when in happened],
        }
    )
    for event, when in zip(parsed.events, happened, strict=True):
        assert event.original_timestamp.ToDatetime(UTC) == when  # kept as sent
        assert event.sent_at.ToDatetime(UTC) == sent
        assert event.received_at.ToDatetime(UTC) == RECEIVED
        assert event.timestamp.ToDatetime(UTC) == RECEIVED - (sent - when)
        # the device's clock error is gone: the event happened (sent - when) + 800 ms before arrival
        assert RECEIVED - event.timestamp.ToDatetime(UTC) == (sent - when)


def test_an_events_own_sent_at_wins_over_the_batchs():
    parsed = parse_events(
        {
            "sentAt": "2024-05-01T10:00:00Z",
            "batch": [
                {"type": "page", "userId": "u", "timestamp": "2024-05-01T09:00:00Z"},
                {
                    "type": "page",
                    "userId": "u",
                    "timestamp": "2024-05-01T09:00:00Z",
                    "sentAt": "2024-05-01T09:30:00Z",
                },
            ],
        }
    )
    first, second = (event.timestamp.ToDatetime(UTC) for event in parsed.events)
    assert first == RECEIVED - timedelta(hours=1)
    assert second == RECEIVED - timedelta(minutes=30)


def test_original_timestamp_is_the_client_time_when_sent():
    parsed = parse_events(
        {
            "sentAt": "2024-05-01T10:00:10+00:00",
            "batch": [{"type": "page", "userId": "u", "originalTimestamp": "2024-05-01T10:00:00+00:00"}],
        }
    )
    assert parsed.events[0].timestamp.ToDatetime(UTC) == RECEIVED - timedelta(seconds=10)


def test_a_client_timestamp_without_sent_at_is_kept_as_sent():
    historical = datetime(2019, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-5)))
    parsed = parse_events({"userId": "u", "event": "Imported", "timestamp": historical.isoformat()}, kind="track")
    event = parsed.events[0]
    assert event.timestamp.ToDatetime(UTC) == historical
    assert event.original_timestamp.ToDatetime(UTC) == historical
    assert not event.HasField("sent_at")


def test_no_client_timestamp_means_received_at_and_no_original_timestamp():
    parsed = parse_events({"sentAt": "2030-01-01T00:00:00Z", "batch": [{"type": "page", "userId": "u"}]})
    event = parsed.events[0]
    assert event.timestamp.ToDatetime(UTC) == RECEIVED
    assert not event.HasField("original_timestamp")
    assert event.sent_at.ToDatetime(UTC) == datetime(2030, 1, 1, tzinfo=UTC)


def test_epoch_millisecond_timestamps_are_corrected_too():
    sent_ms = int((RECEIVED + timedelta(hours=2)).timestamp() * 1000)
    parsed = parse_events({"userId": "u", "event": "E", "sentAt": sent_ms, "timestamp": sent_ms - 1500}, kind="track")
    assert parsed.events[0].timestamp.ToDatetime(UTC) == RECEIVED - timedelta(milliseconds=1500)


def test_bad_timestamps_name_the_field():
    parsed = parse_events(
        {
            "batch": [
                {"type": "page", "userId": "u", "timestamp": "2024-05"},
                {"type": "page", "userId": "u", "originalTimestamp": "2024-05-01T12:00:00+jane"},
                {"type": "page", "userId": "u", "sentAt": [2024]},
                {"type": "page", "userId": "u", "original_timestamp": "soon"},
            ]
        }
    )
    assert [[(e.code, e.field) for e in errors] for errors in parsed.all_errors] == [
        [(Code.INVALID_TIMESTAMP, "batch[0].timestamp")],
        [(Code.INVALID_TIMESTAMP, "batch[1].originalTimestamp")],
        [(Code.INVALID_TIMESTAMP, "batch[2].sentAt")],
        [(Code.INVALID_TIMESTAMP, "batch[3].original_timestamp")],
    ]
    assert parsed.all_errors[0][0].message.startswith("timestamp must be an ISO-8601 date-time")


def test_a_correction_out_of_range_names_timestamp():
    parsed = parse_events(
        {"userId": "u", "event": "E", "sentAt": "9999-12-31T00:00:00Z", "timestamp": "0001-01-02T00:00:00Z"},
        kind="track",
    )
    (error,) = parsed.all_errors[0]
    assert (error.code, error.field) == (Code.INVALID_TIMESTAMP, "timestamp")


def test_received_at_must_be_timezone_aware():
    with pytest.raises(ValueError, match="timezone-aware"):
        parse_request("track", b"{}", received_at=datetime(2024, 1, 1), source_id="src")


# --- an event is never later than its arrival ------------------------------------------------------------


def test_a_client_time_later_than_the_arrival_is_capped_at_received_at():
    received = ns_of(RECEIVED)
    # No sent_at: a time from the future is not a historical import; the event cannot have happened later
    # than the moment it reached the collector.
    assert corrected_ns(received_at=received, sent_at=None, client_time=MAX_NS) == received
    assert corrected_ns(received_at=received, sent_at=None, client_time=received + NANOS) == received
    # With sent_at: an event "after" its own send (client_time > sent_at) corrects to after the arrival.
    assert corrected_ns(received_at=received, sent_at=EPOCH_2024, client_time=EPOCH_2024 + HOUR) == received


def test_a_far_future_timestamp_is_kept_as_sent_but_the_event_time_is_its_arrival():
    parsed = parse_events({"userId": "u", "event": "E", "timestamp": "9999-12-31T23:59:59Z"}, kind="track")
    assert not any(parsed.all_errors)  # nothing valid is refused
    event = parsed.events[0]
    assert event.original_timestamp.ToDatetime(UTC) == datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert event.timestamp.ToDatetime(UTC) == RECEIVED
    assert event.received_at.ToDatetime(UTC) == RECEIVED


def test_a_timestamp_in_year_1_is_a_past_time_and_kept():
    parsed = parse_events({"userId": "u", "event": "E", "timestamp": "0001-01-01T00:00:00Z"}, kind="track")
    event = parsed.events[0]
    assert event.timestamp.ToDatetime(UTC) == datetime(1, 1, 1, tzinfo=UTC)
    assert event.original_timestamp.ToDatetime(UTC) == datetime(1, 1, 1, tzinfo=UTC)


def test_a_replayed_call_keeps_its_timestamp_and_its_original_timestamp():
    """A replay of a Segment archive or warehouse row carries both: `timestamp` (Segment's, already corrected
    for the device's clock: "used for historical replays") and `originalTimestamp` (the device's clock).
    The SDKs send one of them, never both. The replay's `timestamp` is the event's time as it is; the device
    clock it was corrected from stays the original. Before, the uncorrected originalTimestamp won (a trial
    saw an archive replayed an hour off)."""
    row = {
        "type": "track",
        "userId": "u",
        "event": "Archived",
        "timestamp": "2024-05-01T10:00:00.500Z",
        "originalTimestamp": "2024-05-01T09:00:00Z",
        "sentAt": "2024-05-01T09:00:02Z",
        "receivedAt": "2024-05-01T10:00:01Z",
    }
    ((event),) = parse_events({"batch": [row]}).events
    assert event.timestamp.ToDatetime(UTC) == datetime(2024, 5, 1, 10, 0, 0, 500000, tzinfo=UTC)
    assert event.original_timestamp.ToDatetime(UTC) == datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
    assert "timestamp" not in event.extra.fields
    # Still never later than its arrival.
    future = {**row, "timestamp": "2099-01-01T00:00:00Z"}
    ((event),) = parse_events({"batch": [future]}).events
    assert event.timestamp.ToDatetime(UTC) == RECEIVED
