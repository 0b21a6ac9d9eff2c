"""Identity's wire formats: the `events.resolved` batches built around the raw events' bytes, and the
protobuf messages of identity's notifications and API (merge records, identifiers, timestamps).

Nothing here has state or does I/O; the engine decides what to publish, this module how it is spelled.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from cdp.events.v1 import events_pb2
from cdp.identity.v1 import identity_pb2
from cdp_identity.domain.graph import Merge, stable_id
from cdp_identity.domain.normalize import split_key
from cdp_kit import timestamps
from cdp_kit.bus import OutMessage, subjects


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL_VARINTS[n]
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_SMALL_VARINTS = [bytes((i,)) for i in range(0x80)]
# One events.resolved message stays well under JetStream's default 1 MiB payload limit.
MAX_RESOLVED_MESSAGE_BYTES = 256 * 1024


def _size(n: int) -> bytes:
    """A length as a varint; events are mostly 128 bytes to 16 KiB long (two bytes)."""
    if n < 0x80:
        return _SMALL_VARINTS[n]
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    return _varint(n)


# The key of a length-delimited field 1..15 is one byte.
_TAGS = [bytes((n << 3 | 2,)) for n in range(16)]


def _length_delimited(field_number: int, data: bytes) -> bytes:
    return _TAGS[field_number] + _size(len(data)) + data


def encode_resolved(
    raw_event: bytes,
    person_id: str,
    dropped: Sequence[tuple[str, str, str]] = (),
    identifiers: Sequence[str] = (),
    shared: Mapping[str, int] | None = None,
) -> bytes:
    """A serialized `ResolvedEvent` built around the raw event's bytes: the event is embedded as
    received, not parsed and re-serialized (most of the cost of resolving would be that). `shared`:
    identifier type -> other persons seen with it (`shared_with`; most events have none)."""
    person = person_id.encode()
    parts = [_TAGS[1], _size(len(raw_event)), raw_event, _TAGS[2], _size(len(person)), person]
    for kind, value, reason in dropped:
        item = events_pb2.DroppedIdentifier(type=kind, value=value, reason=reason).SerializeToString()
        parts += (_TAGS[3], _size(len(item)), item)
    for key in identifiers:
        encoded = key.encode()
        parts += (_TAGS[4], _size(len(encoded)), encoded)
    if shared:
        for kind, count in shared.items():
            # A map entry is a message: key = 1 (string), value = 2 (varint).
            name = kind.encode()
            entry = _TAGS[1] + _size(len(name)) + name + b"\x10" + _varint(count)
            parts += (_TAGS[5], _size(len(entry)), entry)
    return b"".join(parts)


# The event identity publishes on a person's behalf when persons join them on an identifier (see
# `identifier_shared`), and the source it comes from (its event id is "identity:<message id>").
IDENTIFIER_SHARED = "Identifier Shared"
SYSTEM_SOURCE = "identity"


def identifier_shared(person_id: str, shared: Mapping[str, int], *, message_id: str, at: int, received: int) -> bytes:
    """A `ResolvedEventBatch` of one system event for `person_id`: a track "Identifier Shared" at `at` (the
    event that brought the new person), properties {"identifier_types": [...], "persons": the most others
    on one of them}, `shared_with` = `shared` as on the person's own events. Counts only: no identifier,
    no id of anyone else; no user or anonymous id, no context (it is not the person's own doing)."""
    event = events_pb2.Event(
        message_id=message_id, type=events_pb2.EVENT_TYPE_TRACK, event=IDENTIFIER_SHARED, source_id=SYSTEM_SOURCE
    )
    event.properties.update({"identifier_types": sorted(shared), "persons": max(shared.values())})
    event.timestamp.CopyFrom(timestamp(at))
    event.received_at.CopyFrom(timestamp(received))
    return _length_delimited(1, encode_resolved(event.SerializeToString(), person_id, shared=shared))


def resolved_messages(grouped: dict[int, list[tuple[str, bytes]]]) -> list[OutMessage]:
    """`ResolvedEventBatch` messages, one per person partition (split when large). The message id is a
    digest of the event ids inside, so re-publishing the same batch after a crash is deduplicated;
    consumers are idempotent on each event's id for anything else."""
    messages = []
    for partition, entries in grouped.items():
        chunk: list[tuple[str, bytes]] = []
        size = 0
        for entry in [*entries, None]:
            if entry is None or (chunk and size + len(entry[1]) > MAX_RESOLVED_MESSAGE_BYTES):
                if chunk:
                    payload = b"".join(
                        [part for _id, encoded in chunk for part in (_TAGS[1], _size(len(encoded)), encoded)]
                    )
                    msg_id = stable_id("rb_", *(event_id for event_id, _ in chunk))
                    messages.append(
                        OutMessage(subject=subjects.events_resolved(partition), payload=payload, msg_id=msg_id)
                    )
                chunk, size = [], 0
            if entry is not None:
                chunk.append(entry)
                size += len(entry[1])
    return messages


def event_time_ms(event: events_pb2.Event) -> int:
    """When the event happened (its own timestamp, else when the collector received it), epoch ms; never
    later than its arrival.

    The collector caps `timestamp` at `received_at`; an event stored before it did (read again by a
    replay or a backfill) may carry a time from the future, which would date a person's creation, an
    identifier's joining and the merges it causes there. Earlier times are kept."""
    stamp = timestamps.event_stamp(event)
    return (timestamps.to_ms(stamp) if stamp is not None else 0) or int(time.time() * 1000)


def timestamp(ms: int) -> timestamp_pb2.Timestamp:
    return timestamps.from_ms(ms)


def merge_record(merge: Merge | dict) -> identity_pb2.MergeRecord:
    data = merge.as_dict() if isinstance(merge, Merge) else merge
    cause = data.get("cause", {})
    return identity_pb2.MergeRecord(
        merge_id=data["id"],
        winner=data["winner"],
        loser=data["loser"],
        at=timestamp(data["at"]),
        cause=identity_pb2.MergeCause(
            event_id=cause.get("event_id", ""),
            identifiers=cause.get("identifiers", []),
            rule=cause.get("rule", ""),
            detail=cause.get("detail", ""),
        ),
    )


def identifier_message(key: str) -> identity_pb2.Identifier:
    kind, value = split_key(key)
    return identity_pb2.Identifier(type=kind, value=value)


def strings(message: Message) -> set[str]:
    """Every string a notification holds, identifiers also as their keys ("type:value")."""
    found: set[str] = set()
    if isinstance(message, identity_pb2.Identifier):
        found.add(f"{message.type}:{message.value}")
    for descriptor, value in message.ListFields():
        values = value if descriptor.is_repeated else [value]
        for item in values:
            if isinstance(item, Message):
                found |= strings(item)
            elif isinstance(item, str):
                found.add(item)
    return found
