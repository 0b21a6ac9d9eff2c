"""Client time as clients send it, and the correction for their clocks being wrong.

Times are handled as integer nanoseconds since the Unix epoch: exact (protobuf Timestamps carry nanoseconds,
datetimes stop at microseconds) and cheap to subtract. The conversions themselves are the kit's
(`cdp_kit.timestamps`); this module holds what the collector decides about client times.

Clock skew (Segment's rule). A device clock may be minutes or years off, but the *interval* between the
event and the send is measured on that same clock, so it is trustworthy:

    timestamp = received_at - (sent_at - original_timestamp)

- client time and sent_at known → corrected as above; `original_timestamp` keeps the client's value;
- client time but no sent_at (curl, server-side back-fills, imports) → `timestamp` = the client time as sent.
  Without sent_at the skew cannot be measured, and a deliberate historical timestamp must not be moved
  to "now";
- no client time → `timestamp` = `received_at`; `original_timestamp` stays unset (nothing was sent).

Never later than the arrival. Whatever the case, `timestamp` is at most `received_at`: an event cannot have
happened after it reached us, and anyone holding a public write key could otherwise send one dated 9999
that stays a person's last-seen, inside every `within` window and at the newest end of the timeline for
ever. Such a time is not refused (Segment does not refuse it either): the client's value is kept in
`original_timestamp`, and only the time the platform uses is capped. Every service reads `timestamp`,
so deciding it here, once, keeps them consistent. Past times, however old, are kept: imports are legitimate.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from cdp_collector.domain.errors import described
from cdp_kit.timestamps import EPOCH, MAX_NS, MIN_NS, NANOS, datetime_to_ns, to_ns

_EXAMPLE = (
    "an ISO-8601 date-time (2024-05-01T12:00:00.000Z, 2024-05-01T14:00:00+02:00; without a zone it is UTC), "
    "a date (midnight UTC) or epoch milliseconds"
)

#: What Segment accepts beyond the strict form: fields not zero-padded (`2015-2-02T00:30:08.276Z`, its own
#: batch example), a date alone. A time needs hours and minutes; seconds and their fraction are optional.
_LENIENT = re.compile(
    r"(\d{4})-(\d{1,2})-(\d{1,2})"
    r"(?:[Tt ](\d{1,2}):(\d{1,2})(?::(\d{1,2})(?:[.,](\d+))?)?([Zz]|[+-]\d{2}(?::?\d{2})?)?)?"
)


#: What datetime.fromisoformat says of a part out of range, which names no part of the value sent.
_RANGE_PROBLEM = re.compile(r"[a-z]+ must be in \d+\.\.\d+|day is out of range for month")


class TimestampError(ValueError):
    """A client time that cannot be used; the message says what was wrong and what would be valid."""


def parse_timestamp(value: object) -> int:
    """A JSON timestamp → ns. ISO-8601 strings need a date, a time and a zone; numbers are epoch milliseconds."""
    kind = type(value)
    if kind is str:
        return _parse_iso(value)  # type: ignore[arg-type]
    if kind is int:
        return _in_range(value * 1_000_000)  # type: ignore[operator]
    if kind is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise TimestampError(f"must be {_EXAMPLE}; got a number that is not finite")
        # Scale the whole and fractional milliseconds apart: value * 1e6 would round away sub-ms digits.
        whole = math.floor(value)  # type: ignore[call-overload]
        return _in_range(whole * 1_000_000 + round((value - whole) * 1_000_000))  # type: ignore[operator]
    raise TimestampError(f"must be {_EXAMPLE}; got {described(value)}")


def _parse_iso(text: str) -> int:
    # datetime.fromisoformat is fast but liberal: it also takes week dates and compact forms. It is used
    # only on YYYY-MM-DD then a time; what it refuses, and other forms, go to the lenient pattern, which
    # reads what Segment accepts (fields not zero-padded, a date alone) and nothing else.
    if len(text) >= 13 and text[4] == "-" and text[7] == "-" and text[10] in "Tt ":
        if text[-1] == "z":  # RFC 3339 allows a lower-case zone letter; fromisoformat does not
            text = text[:-1] + "Z"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            return _parse_lenient(text)
        if parsed.tzinfo is None:  # no zone: UTC, as Segment reads it
            parsed = parsed.replace(tzinfo=UTC)
        ns = datetime_to_ns(parsed)
        # fromisoformat keeps microseconds only; RFC 3339 "nano" clients (Go, Java) send up to 9 digits.
        if len(text) > 26 and text[19] in ".," and text[26].isdigit():
            digits = text[26:29]
            end = 0
            while end < len(digits) and digits[end].isdigit():
                end += 1
            ns += int(digits[:end].ljust(3, "0"))
        return _in_range(ns)
    return _parse_lenient(text)


def _parse_lenient(text: str) -> int:
    match = _LENIENT.fullmatch(text)
    if match is None:
        raise TimestampError(f"must be {_EXAMPLE}; got {described(text)}")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        moment = datetime(
            int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0), tzinfo=UTC
        )
    except ValueError as exc:
        # datetime names the part out of range ("month must be in 1..12"), never the value.
        detail = f" ({exc})" if _RANGE_PROBLEM.fullmatch(str(exc)) else ""
        raise TimestampError(f"must be {_EXAMPLE}; got {described(text)}{detail}") from None
    ns = datetime_to_ns(moment) + (int(fraction[:9].ljust(9, "0")) if fraction else 0)
    if zone and zone not in "Zz":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:] or 0)
        if hours > 23 or minutes > 59:
            raise TimestampError(f"must be {_EXAMPLE}; got {described(text)} (an offset beyond ±23:59)")
        ns -= sign * (hours * 3600 + minutes * 60) * NANOS
    return _in_range(ns)


def _in_range(ns: int, what: str = "") -> int:
    if MIN_NS <= ns <= MAX_NS:
        return ns
    raise TimestampError(f"{what}is outside the years 0001..9999 (numbers are epoch milliseconds)")


def corrected_ns(*, received_at: int, sent_at: int | None, client_time: int | None) -> int:
    """The event time the platform uses, never later than `received_at`. See the module docstring."""
    if client_time is None:
        return received_at
    if sent_at is None:
        return min(client_time, received_at)
    corrected = received_at - (sent_at - client_time)
    if corrected > received_at:  # the client says the event came after its own send: it arrived when it did
        return received_at
    if corrected < MIN_NS:
        raise TimestampError(
            f"correcting for clock skew (received_at - (sent_at - timestamp)) lands outside the years 0001..9999: "
            f"sent_at is {format_ns(sent_at)} and the event time {format_ns(client_time)}; check the client clock"
        )
    return corrected


def timestamp_to_ns(stamp: Timestamp) -> int:
    """A protobuf Timestamp (from a gRPC client) → ns, refusing values protobuf itself calls invalid."""
    if not 0 <= stamp.nanos < NANOS:
        raise TimestampError(f"nanos={stamp.nanos} must be in 0..999999999")
    return _in_range(to_ns(stamp), "the time ")


def format_ns(ns: int) -> str:
    seconds, nanos = divmod(ns, NANOS)
    if not MIN_NS <= ns <= MAX_NS:
        return f"{seconds}s since the epoch"
    moment = (EPOCH + timedelta(seconds=seconds)).replace(tzinfo=None)
    return f"{moment.isoformat(timespec='seconds')}.{nanos:09d}Z"
