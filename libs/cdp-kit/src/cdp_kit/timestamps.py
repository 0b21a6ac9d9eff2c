"""protobuf Timestamps ↔ epoch nanoseconds, milliseconds, seconds and datetimes, written once.

Three units are in use and each has its reason: nanoseconds where a time is exact and compared (the
collector's client clocks: a Timestamp carries nanoseconds, a datetime stops at microseconds), epoch
milliseconds where a time travels in ids and JSON (`at_ms`), float epoch seconds where a time is compared
against `now` in rules (segments, features, expiry). Conversions round toward the past, as
`Timestamp.ToMilliseconds` does, so a converted time never lies after the moment it stands for.

A Timestamp holds 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z (`MIN_NS`..`MAX_NS`) with
`0 <= nanos < 1e9`; `to_ns` does not check this (`valid_ns` does), since stamps the platform wrote itself
are valid by construction and checking them on every read costs on the hot paths.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

NANOS = 1_000_000_000
_NS_PER_MS = 1_000_000
MIN_NS = -62_135_596_800 * NANOS
MAX_NS = 253_402_300_800 * NANOS - 1
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_ns(stamp: Timestamp) -> int:
    return stamp.seconds * NANOS + stamp.nanos


def set_ns(stamp: Timestamp, ns: int) -> Timestamp:
    """Write `ns` into `stamp` (a message field or a new Timestamp); returns the stamp."""
    stamp.seconds, stamp.nanos = divmod(ns, NANOS)
    return stamp


def valid_ns(stamp: Timestamp) -> bool:
    """Whether `stamp` is a Timestamp protobuf itself accepts (nanos in range, years 0001..9999)."""
    return 0 <= stamp.nanos < NANOS and MIN_NS <= stamp.seconds * NANOS + stamp.nanos <= MAX_NS


def to_ms(stamp: Timestamp) -> int:
    return stamp.seconds * 1000 + stamp.nanos // _NS_PER_MS


def set_ms(stamp: Timestamp, ms: int) -> Timestamp:
    seconds, millis = divmod(ms, 1000)
    stamp.seconds, stamp.nanos = seconds, millis * _NS_PER_MS
    return stamp


def from_ms(ms: int) -> Timestamp:
    return set_ms(Timestamp(), ms)


def to_seconds(stamp: Timestamp) -> float:
    return stamp.seconds + stamp.nanos / NANOS


def set_seconds(stamp: Timestamp, seconds: float) -> Timestamp:
    """Write float epoch seconds into `stamp`, to the nanosecond the float holds."""
    whole = math.floor(seconds)
    nanos = round((seconds - whole) * NANOS)
    if nanos == NANOS:  # the fraction rounded up to a whole second
        whole, nanos = whole + 1, 0
    stamp.seconds, stamp.nanos = whole, nanos
    return stamp


def from_seconds(seconds: float) -> Timestamp:
    return set_seconds(Timestamp(), seconds)


def datetime_to_ns(moment: datetime) -> int:
    """A timezone-aware datetime → epoch ns, exactly (no float on the way)."""
    if moment.tzinfo is None:
        raise ValueError("the datetime must be timezone-aware, e.g. datetime.now(UTC)")
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * NANOS + delta.microseconds * 1_000


def ns_to_datetime(ns: int) -> datetime:
    """Epoch ns → an aware UTC datetime (to the microsecond, rounded toward the past)."""
    return EPOCH + timedelta(microseconds=ns // 1_000)


def to_datetime(stamp: Timestamp) -> datetime:
    return ns_to_datetime(to_ns(stamp))


def set_datetime(stamp: Timestamp, moment: datetime) -> Timestamp:
    return set_ns(stamp, datetime_to_ns(moment))


def ms_to_datetime(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


def datetime_to_ms(moment: datetime) -> int:
    return datetime_to_ns(moment) // _NS_PER_MS


def event_stamp(event) -> Timestamp | None:
    """When an event happened, as every service reads it: its `timestamp`, else when the collector received
    it (`received_at`), and never later than that; None when it carries neither.

    The collector caps `timestamp` at `received_at` on the way in. An event stored before it did (read again
    by a replay, a backfill or from a stream's retention) may carry a time from the future, which would stay a
    person's last-seen, a watched event's time or the date of a merge for ever. Earlier times (imports) are
    kept. `event` is any message with those two Timestamp fields (`cdp.events.v1.Event`)."""
    received = event.received_at if event.HasField("received_at") else None
    if not event.HasField("timestamp"):
        return received
    if received is not None and to_ns(event.timestamp) > to_ns(received):
        return received
    return event.timestamp
