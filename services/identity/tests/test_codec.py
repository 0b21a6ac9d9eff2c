"""The resolved events identity writes by hand (codec.py) are what protobuf itself reads back, at every
size a length can take (one, two and three varint bytes)."""

from __future__ import annotations

import pytest

from cdp.events.v1 import events_pb2
from cdp_identity.codec import MAX_RESOLVED_MESSAGE_BYTES, encode_resolved, resolved_messages


def raw_event(size: int) -> bytes:
    event = events_pb2.Event(message_id="m1", user_id="u1")
    event.properties.update({"blob": "x" * max(0, size - 30)})
    return event.SerializeToString()


@pytest.mark.parametrize("size", [20, 127, 128, 300, 16_383, 16_384, 70_000])
def test_a_resolved_event_reads_back_as_protobuf_writes_it(size):
    raw = raw_event(size)
    dropped = [("email", "shared@example.com", "limit:email")]
    encoded = encode_resolved(raw, "p_1", dropped, ["user_id:u1", "anonymous_id:" + "a" * 200])

    expected = events_pb2.ResolvedEvent(
        event=events_pb2.Event.FromString(raw),
        person_id="p_1",
        dropped=[events_pb2.DroppedIdentifier(type="email", value="shared@example.com", reason="limit:email")],
        identifiers=["user_id:u1", "anonymous_id:" + "a" * 200],
    )
    assert events_pb2.ResolvedEvent.FromString(encoded) == expected


def test_a_batch_splits_into_messages_that_read_back_in_order():
    entries = [(f"e{i}", encode_resolved(raw_event(40_000), f"p_{i}")) for i in range(10)]
    messages = resolved_messages({3: entries})
    assert len(messages) > 1 and all(len(m.payload) <= MAX_RESOLVED_MESSAGE_BYTES + 50_000 for m in messages)
    assert {m.subject for m in messages} == {"events.resolved.3"}
    persons = [e.person_id for m in messages for e in events_pb2.ResolvedEventBatch.FromString(m.payload).events]
    assert persons == [f"p_{i}" for i in range(10)]


def test_the_counts_of_other_persons_per_identifier_type_read_back_as_the_shared_with_map():
    raw = raw_event(300)
    encoded = encode_resolved(raw, "p_1", [], ["user_id:u1"], {"device_id": 3, "anonymous_id": 200})
    decoded = events_pb2.ResolvedEvent.FromString(encoded)
    assert dict(decoded.shared_with) == {"device_id": 3, "anonymous_id": 200}
    assert decoded.person_id == "p_1" and list(decoded.identifiers) == ["user_id:u1"]
    assert events_pb2.ResolvedEvent.FromString(encode_resolved(raw, "p_1", [], [], {})).shared_with == {}
