"""What one `events.raw` message must be for identity to apply it without failing the batch around it.

A batch is applied and written as one (engine.py), so anything a single message can make fail later -
the store refusing a key, a number it cannot hold, JetStream refusing the resolved message, a consumer
downstream failing to parse the batch the event is re-wrapped into - would cost every event in the
batch its delivery. Each message is therefore checked here on its own first, and one that fails is
rejected alone (dead-lettered with the reason and the field, never the value).

Found by trying (protobuf runtime upb, the kit's storage port, nats-server):

- bytes that are not an Event, invalid UTF-8 in a string, or nesting deeper than the decoder's limit:
  the decoder refuses them. The limit counts the messages around the event too, and identity publishes
  each event inside a `ResolvedEventBatch` two levels down, so the event is decoded at that depth here:
  an event that decodes alone but not inside the batch would otherwise poison every consumer of
  `events.resolved` (seen at 32 levels of nested `properties`);
- a NUL character in an identifier value: its key ("type:value") is refused by every store backend;
- a timestamp outside 0001-01-01..9999-12-31: milliseconds past the signed 64-bit range are refused by
  the store, and `Timestamp` cannot represent them anyway;
- an event so large that, wrapped with its person and identifiers, it would exceed the server's maximum
  message size on `events.resolved`.

Over-long identifier values are not poison: the normaliser drops them as invalid (MAX_VALUE_CHARS) and
the event is resolved on the rest.
"""

from __future__ import annotations

import time

from google.protobuf.message import DecodeError

from cdp.events.v1 import events_pb2
from cdp_kit import timestamps

# Timestamp's own range (0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z), in whole seconds.
MIN_SECONDS = timestamps.MIN_NS // timestamps.NANOS
MAX_SECONDS = timestamps.MAX_NS // timestamps.NANOS
NANOS = timestamps.NANOS
NS_PER_MS = 1_000_000
# Room on a resolved message for what identity adds around the raw event beyond its identifier keys
# (person id, field tags, dropped identifiers' reasons) and for the headers (message id, trace context).
RESOLVED_OVERHEAD_BYTES = 4 * 1024


class Unusable(Exception):
    """One message identity cannot apply. `field` names where (an identifier type, `timestamp`), and
    the message says what is wrong with it without quoting it."""

    def __init__(self, reason: str, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.reason = reason
        self.field = field
        self.problem = problem


def _header(size: int) -> bytes:
    """The key and length of field 1 (length-delimited) holding `size` bytes."""
    if size < 0x80:
        return _SMALL_HEADERS[size]
    if size < 0x4000:
        return bytes((0x0A, size & 0x7F | 0x80, size >> 7))
    out = bytearray(b"\x0a")
    while True:
        byte = size & 0x7F
        size >>= 7
        if size:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_SMALL_HEADERS = [bytes((0x0A, n)) for n in range(0x80)]


def parse_event(data: bytes) -> events_pb2.Event:
    """The event, decoded as deep as consumers of `events.resolved` will decode it (inside a
    `ResolvedEvent` inside a `ResolvedEventBatch`), so that whatever decodes here decodes there."""
    inner = _header(len(data))
    wrapped = b"".join((_header(len(inner) + len(data)), inner, data))
    try:
        batch = events_pb2.ResolvedEventBatch.FromString(wrapped)
    except DecodeError as exc:
        # upb's message names the type and the problem (bad UTF-8, too deep), never the content.
        problem = str(exc).rsplit(": ", 1)[-1] if ": " in str(exc) else "not decodable"
        raise Unusable("invalid_event", "event", f"not a cdp.events.v1.Event ({problem})") from None
    return batch.events[0].event


def check_event(event: events_pb2.Event, pairs: list[tuple[str, str]]) -> tuple[int, int]:
    """Raise Unusable when the store could not hold what this event would write. Otherwise: when the
    event happened and when the collector received it, epoch ms (`codec.event_time_ms`, and 0 for
    an unknown arrival), read here since both stamps are at hand."""
    for kind, value in pairs:
        if "\x00" in value:
            raise Unusable("invalid_identifier", kind, "the value contains a NUL character, which no store keys hold")
    # Each stamp's two fields read once (a protobuf read is what this costs).
    has = event.HasField
    stamp_ns = received_ns = None
    if has("timestamp"):
        stamp = event.timestamp
        seconds = stamp.seconds
        if not MIN_SECONDS <= seconds <= MAX_SECONDS:
            raise Unusable("invalid_event", "timestamp", "is outside 0001-01-01..9999-12-31")
        stamp_ns = seconds * NANOS + stamp.nanos
    if has("received_at"):
        stamp = event.received_at
        seconds = stamp.seconds
        if not MIN_SECONDS <= seconds <= MAX_SECONDS:
            raise Unusable("invalid_event", "received_at", "is outside 0001-01-01..9999-12-31")
        received_ns = seconds * NANOS + stamp.nanos
    # timestamps.event_stamp: the event's own time, never later than its arrival.
    if stamp_ns is None or (received_ns is not None and stamp_ns > received_ns):
        stamp_ns = received_ns
    # timestamps.to_ms of each: seconds * 1000 + nanos // 1e6, which is the ns floored to ms.
    at = stamp_ns // NS_PER_MS if stamp_ns is not None else 0
    return at or int(time.time() * 1000), (received_ns // NS_PER_MS or 0) if received_ns is not None else 0


def check_size(raw: bytes, identifier_keys: list[str], max_payload: int) -> None:
    """Raise Unusable when the resolved message for this event could not be published."""
    size = len(raw) + RESOLVED_OVERHEAD_BYTES
    # A character is at most 4 bytes: the exact sum only when that bound does not fit.
    if size + sum(map(len, identifier_keys)) * 4 + 8 * len(identifier_keys) <= max_payload:
        return
    size += sum(len(key.encode()) + 8 for key in identifier_keys)
    if size > max_payload:
        raise Unusable(
            "too_large",
            "event",
            f"{len(raw)} bytes; resolved it would exceed the bus's maximum message size of {max_payload} bytes",
        )
