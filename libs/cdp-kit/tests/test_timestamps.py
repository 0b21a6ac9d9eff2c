"""Timestamp conversions agree with protobuf's own, round toward the past, and keep every nanosecond."""

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from cdp_kit import timestamps as ts


@pytest.mark.parametrize("ms", [0, 1, 999, 1_000, 1_717_171_717_123, -1, -1_001, -62_135_596_800_000])
def test_milliseconds_agree_with_protobuf(ms):
    theirs = Timestamp()
    theirs.FromMilliseconds(ms)
    ours = ts.from_ms(ms)
    assert (ours.seconds, ours.nanos) == (theirs.seconds, theirs.nanos)
    assert ts.to_ms(ours) == theirs.ToMilliseconds() == ms


def test_sub_millisecond_times_round_toward_the_past():
    stamp = Timestamp(seconds=-1, nanos=999_999_999)  # one nanosecond before the epoch
    assert ts.to_ms(stamp) == stamp.ToMilliseconds() == -1
    assert ts.to_ns(stamp) == -1
    assert ts.ns_to_datetime(-1) == datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)


def test_nanoseconds_round_trip_exactly():
    for ns in (0, 1, -1, 1_717_171_717_123_456_789, ts.MIN_NS, ts.MAX_NS):
        assert ts.to_ns(ts.set_ns(Timestamp(), ns)) == ns


def test_seconds_keep_the_fraction_and_never_write_a_billion_nanos():
    assert ts.to_seconds(ts.from_seconds(1_717_171_717.25)) == 1_717_171_717.25
    stamp = ts.from_seconds(0.9999999999)
    assert (stamp.seconds, stamp.nanos) == (1, 0)
    assert (ts.from_seconds(-0.5).seconds, ts.from_seconds(-0.5).nanos) == (-1, 500_000_000)


def test_datetimes_agree_with_protobuf_and_insist_on_a_zone():
    moment = datetime(2024, 5, 1, 14, 0, 0, 123_456, tzinfo=timezone(timedelta(hours=2)))
    theirs = Timestamp()
    theirs.FromDatetime(moment)
    ours = ts.set_datetime(Timestamp(), moment)
    assert (ours.seconds, ours.nanos) == (theirs.seconds, theirs.nanos)
    assert ts.to_datetime(ours) == moment
    assert ts.ms_to_datetime(ts.datetime_to_ms(moment)) == moment.replace(microsecond=123_000)
    with pytest.raises(ValueError, match="timezone-aware"):
        ts.datetime_to_ns(datetime(2024, 5, 1))


def test_validity_is_protobufs_range():
    assert ts.valid_ns(Timestamp(seconds=0, nanos=0))
    assert not ts.valid_ns(Timestamp(seconds=0, nanos=1_000_000_000))
    assert not ts.valid_ns(Timestamp(seconds=253_402_300_800))
    assert not ts.valid_ns(Timestamp(seconds=-62_135_596_801))


def test_an_event_is_never_dated_after_its_arrival_and_earlier_times_are_kept():
    from cdp.events.v1 import events_pb2
    from cdp_kit.timestamps import event_stamp, from_seconds

    arrived = from_seconds(1_700_000_000)
    future = events_pb2.Event(timestamp=from_seconds(253_402_300_000), received_at=arrived)
    assert event_stamp(future) == arrived  # a 9999 date stored before the collector capped it
    past = events_pb2.Event(timestamp=from_seconds(1_600_000_000), received_at=arrived)
    assert event_stamp(past) == past.timestamp  # an import's past date stays
    assert event_stamp(events_pb2.Event(received_at=arrived)) == arrived  # no timestamp: its arrival
    assert event_stamp(events_pb2.Event(timestamp=past.timestamp)) == past.timestamp  # nothing to cap against
    assert event_stamp(events_pb2.Event()) is None
