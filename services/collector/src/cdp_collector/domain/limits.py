"""Segment's documented tracking-API limits, in one place, overridable through `Limits`.

What is measured (the tests pin each boundary):

- **Request body** (`max_batch_bytes`, Segment: 500 KB): the length of the body as the server got it after
  HTTP decompression, for every endpoint. Over → `request_too_large`, the whole request is refused.
- **Events per request** (`max_batch_events`, Segment: 2,500): items in `batch` (or `events` over gRPC).
  Over → `too_many_events`, the whole request is refused.
- **One event** (`max_event_bytes`, Segment: 32 KB). JSON: the length of the event object re-encoded as
  compact UTF-8 JSON (`orjson.dumps`: no insignificant whitespace, non-ASCII as raw UTF-8, keys in the
  order sent). For a single call the event object is the whole body (a `writeKey` in it counts); for a
  batch item it is the item *after* the batch-level `context`, `integrations` and other
  shared fields were merged into it, so a large shared context counts against every event that inherits
  it (otherwise one 400 KB context could be stored 2,500 times). Measuring the re-encoding rather than the
  raw bytes gives one number for one event whether it came alone, in a batch, pretty-printed or not, and
  it is no more than what the Segment/RudderStack Python SDKs measure before sending (`json.dumps`, with
  spaces and `\\u` escapes), so an event they let through fits. Protobuf (gRPC): `Event.ByteSize()` as
  received, before the collector fills in server fields. Over → `event_too_large` for that event only; the
  rest of the batch goes on.
- **Nesting** (`max_depth`, 24): objects and arrays inside one event, counting the event object as level 1
  (so `properties` is level 2, `context.traits` level 3; the event's unknown keys sit at level 1 and
  unknown context keys at level 2, as in the JSON). Over → `nesting_too_deep` for that event only, naming
  the path of the first container beyond the limit and the limit. The reason is protobuf, not taste: every
  consumer decodes with protobuf's default recursion limit of 100 nested messages, a JSON object inside a
  Struct costs three of them (map entry, Value, Struct), and the accepted event is later wrapped deeper
  than it arrived. The tightest wrapper is profile's `ExportResponse` (a group's traits sit 14 messages
  below the document), where 29 levels still decode and 30 do not; `events.resolved` (ResolvedEventBatch
  > ResolvedEvent > Event) decodes up to 32. 24 leaves five levels of margin under the tightest, for
  wrappers yet to come (a test serializes and parses the deepest accepted event in every one of them).
  Segment documents no nesting limit; real payloads rarely pass ten levels. JSON is measured while it is
  converted (the decoder itself stops at 1,024 levels for the request as a whole); protobuf events (gRPC)
  are walked with the same count, since the gRPC decoder's own limit applies to the request, one level
  shallower than `events.resolved` holds the event.

Sizes are in bytes with KB = 1,024 bytes, as Segment and its SDKs count them.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdp_collector.domain.errors import Code, FieldError

MAX_EVENT_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
MAX_BATCH_EVENTS = 2_500
MAX_DEPTH = 24
MAX_MESSAGE_ID_CHARS = 100
MAX_ID_CHARS = 256
MAX_EVENT_NAME_CHARS = 200


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits one collector enforces. Field names match `CollectorSettings` so settings can build it:
    `Limits(max_event_bytes=s.max_event_bytes, max_batch_bytes=s.max_batch_bytes, max_batch_events=s.max_batch_events)`."""

    max_event_bytes: int = MAX_EVENT_BYTES
    max_batch_bytes: int = MAX_BATCH_BYTES
    max_batch_events: int = MAX_BATCH_EVENTS
    max_depth: int = MAX_DEPTH
    max_message_id_chars: int = MAX_MESSAGE_ID_CHARS
    max_id_chars: int = MAX_ID_CHARS
    max_event_name_chars: int = MAX_EVENT_NAME_CHARS

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name}={value!r} is invalid: must be a positive integer")


DEFAULT_LIMITS = Limits()


def describe_bytes(n: int) -> str:
    """`32768 bytes (32 KB)`: exact, plus the unit people quote the limit in when it is a whole number of KB."""
    return f"{n} bytes ({n // 1024} KB)" if n % 1024 == 0 else f"{n} bytes"


def check_request_bytes(size: int, limits: Limits = DEFAULT_LIMITS) -> FieldError | None:
    """For the HTTP layer to call while it reads/decompresses, so it can stop early; `parse_request` checks too."""
    if size > limits.max_batch_bytes:
        return FieldError(
            Code.REQUEST_TOO_LARGE,
            "",
            f"request body is {size} bytes after decompression; the limit is {describe_bytes(limits.max_batch_bytes)}: "
            "send fewer events per request",
        )
    return None


def check_event_count(count: int, limits: Limits = DEFAULT_LIMITS, *, field: str = "batch") -> FieldError | None:
    """Events in one request; gRPC passes field="events"."""
    if count > limits.max_batch_events:
        return FieldError(
            Code.TOO_MANY_EVENTS,
            field,
            f"request has {count} events; the limit is {limits.max_batch_events} events per request: split it",
        )
    return None


def check_event_bytes(size: int, field: str, limits: Limits, *, measured: str) -> FieldError | None:
    if size > limits.max_event_bytes:
        return FieldError(
            Code.EVENT_TOO_LARGE,
            field,
            f"event is {size} bytes; the limit is {describe_bytes(limits.max_event_bytes)}. "
            f"Measured {measured}; move bulky data out of the event",
        )
    return None
