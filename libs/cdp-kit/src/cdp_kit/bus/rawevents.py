"""The two forms of an `events.raw.<p>` message: one event, or several in one message.

- **One event**: the body is a serialized `cdp.events.v1.Event`, its `Nats-Msg-Id` the event's own id
  (`<source>:<message_id>`). What the collector wrote before batches existed, what it still writes for a
  partition that gets one event of a request, and what tools and tests publish.
- **Several events**: the body is a serialized `cdp.events.v1.EventBatch` (each event a field-1 entry, so
  the body is the events' bytes each behind a tag and a length), and the header `Cdp-Events` says how
  many. The collector writes one such message per partition a request's events fall in. Its
  `Nats-Msg-Id` is a digest of the event ids inside (`batch_id`), so a request retried as it was sent is
  stored once (JetStream drops the copy); a retry that groups its events otherwise is stored again, and
  every consumer applies each event once by its id (identity and profile are idempotent on it).

Why: one message an event cost nats-server a store, an acknowledgement and a delivery per event, and the
collector and identity a message each - most of nats-server's work in the pipeline. One message a
partition a request costs the same once per message (measured with a real nats-server: 13-15 us to store
and 9 us to deliver an event alone, against 5-6 and 3.5 us an event batched by fifty).

Readers tell the forms apart by the header alone (`events_of`): an `Event`'s own bytes can begin like a
batch's, so the body is never guessed at.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

#: The header that marks the several-events form; its value is the number of events inside.
EVENTS_HEADER = "Cdp-Events"

_TAG = 0x0A  # field 1, length-delimited: `EventBatch.events`
_SMALL = [bytes((_TAG, n)) for n in range(0x80)]


class NotABatch(ValueError):
    """The body of a message marked as several events is not an `EventBatch` of them."""


def _entry_header(size: int) -> bytes:
    if size < 0x80:
        return _SMALL[size]
    out = bytearray((_TAG,))
    while size >= 0x80:
        out.append(size & 0x7F | 0x80)
        size >>= 7
    out.append(size)
    return bytes(out)


def join(events: Sequence[bytes]) -> bytes:
    """The several-events body: each serialized event behind its tag and length (`EventBatch`)."""
    parts: list[bytes] = []
    append = parts.append
    for event in events:
        append(_entry_header(len(event)))
        append(event)
    return b"".join(parts)


def split(body: bytes) -> list[bytes]:
    """The serialized events of a several-events body, in order. Raises NotABatch (naming the offset,
    never the content) when the body is anything but field-1 entries that fit in it."""
    events: list[bytes] = []
    append = events.append
    at, end = 0, len(body)
    view = memoryview(body)
    while at < end:
        if body[at] != _TAG:
            raise NotABatch(f"byte {at}: expected an EventBatch.events entry")
        at += 1
        size = shift = 0
        while True:
            if at >= end or shift > 28:
                raise NotABatch(f"byte {at}: the entry's length is cut short or too long")
            byte = body[at]
            at += 1
            size |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
        if at + size > end:
            raise NotABatch(f"byte {at}: an entry of {size} bytes runs past the body's end ({end})")
        append(bytes(view[at : at + size]))
        at += size
    return events


def is_batch(headers: Mapping[str, str] | None) -> bool:
    return bool(headers) and EVENTS_HEADER in headers  # type: ignore[operator]


def events_of(body: bytes, headers: Mapping[str, str] | None) -> list[bytes]:
    """The serialized events one `events.raw` message carries, whichever its form."""
    return split(body) if is_batch(headers) else [body]


def batch_id(event_ids: Sequence[str]) -> str:
    """The several-events message's `Nats-Msg-Id`: the same events in the same order, the same id."""
    digest = hashlib.blake2b("\x1f".join(event_ids).encode(), digest_size=16).hexdigest()
    return f"eb_{digest}"
