"""The engine's write-behind against a real nats-server and the memory store: a write that loses a
version race to another replica fails its batch, and the retry applies on the store's state."""

from __future__ import annotations

import pytest

from cdp.events.v1 import events_pb2
from cdp_identity.domain.rules import MergeRules
from cdp_identity.engine import PERSONS, IdentityEngine
from cdp_kit.bus import Bus, events_resolved_stream, identity_stream
from cdp_kit.storage import VersionConflict, open_store


@pytest.fixture
async def engine(nats_server):
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="engine-test") as bus:
        await bus.ensure_streams(identity_stream(), events_resolved_stream())
        engine = IdentityEngine(MergeRules.default(), store, bus.publisher, partitions=4, telemetry=bus.telemetry)
        await engine.start()
        yield engine


async def test_a_lost_write_race_fails_the_batch_and_the_retry_sees_the_other_write(engine):
    first, _ = await engine.resolve([("user_id", "u1"), ("email", "a@example.com")], request_id="r1", at=1_000)
    person = first.person
    # Another replica changes the same person behind this one's cache.
    record = await engine.store.get(PERSONS, person)
    changed = {**record.doc, "drops": [{"identifier": "x", "reason": "other-replica", "event_id": "e", "at": 1}]}
    await engine.store.put(PERSONS, person, changed, expected_version=record.version)

    with pytest.raises(VersionConflict):
        await engine.resolve([("user_id", "u1"), ("anonymous_id", "a1")], request_id="r2", at=2_000)
    retried, _ = await engine.resolve([("user_id", "u1"), ("anonymous_id", "a1")], request_id="r2", at=2_000)

    assert retried.person == person
    stored = (await engine.store.get(PERSONS, person)).doc
    assert {key for key, _at, _owner in stored["ids"]} == {"user_id:u1", "email:a@example.com", "anonymous_id:a1"}
    assert stored["drops"][0]["reason"] == "other-replica", "the other replica's write survives"


async def test_writes_queue_in_order_and_all_become_durable(engine):
    for i in range(50):
        await engine.resolve([("user_id", "u1"), ("anonymous_id", f"a{i}")], request_id=f"r{i}", at=1_000 + i)
    stored = (await engine.store.get(PERSONS, (await engine.canonical(engine.graph.person_of("user_id:u1"))))).doc
    assert len(stored["ids"]) == 51


class StreamDelivery:
    """A delivery as the consumer runner hands it over (data, id, subject, stream position), built
    directly so a test can choose the order in which partitions arrive."""

    def __init__(self, event: events_pb2.Event, subject: str, seq: int) -> None:
        self.data = event.SerializeToString()
        self.msg_id = f"test:{event.message_id}"
        self.subject = subject
        self.stream_seq = seq

    def reject(self, reason: str, detail: str = "") -> None:
        raise AssertionError(f"rejected: {reason} {detail}")


def identify(message_id: str, user: str, anon: str) -> events_pb2.Event:
    return events_pb2.Event(message_id=message_id, type=events_pb2.EVENT_TYPE_IDENTIFY, user_id=user, anonymous_id=anon)


async def test_each_partition_keeps_its_own_checkpoint(engine):
    # events.raw.1 holds the stream's first sequences but is applied after events.raw.0 got far ahead:
    # its events are new, not replays, and must change the graph.
    later = [StreamDelivery(identify(f"p0-{i}", f"u{i}", f"a{i}"), "events.raw.0", 100 + i) for i in range(5)]
    earlier = [StreamDelivery(identify(f"p1-{i}", f"v{i}", f"b{i}"), "events.raw.1", 1 + i) for i in range(5)]
    await engine.handle(later)
    await engine.handle(earlier)
    for i in range(5):
        assert engine.graph.person_of(f"anonymous_id:b{i}") == engine.graph.person_of(f"user_id:v{i}") is not None
    assert engine.applied == {"events.raw.0": 104, "events.raw.1": 5}


async def test_a_redelivered_batch_is_resolved_again_without_changing_the_graph(engine):
    batch = [StreamDelivery(identify(f"e{i}", f"u{i}", f"a{i}"), "events.raw.2", 10 + i) for i in range(3)]
    await engine.handle(batch)
    before = engine.graph.partition()
    stored = await engine.store.get(PERSONS, engine.graph.person_of("user_id:u0"))
    await engine.handle(batch)  # the ack was lost: JetStream delivers the same messages again
    assert engine.graph.partition() == before
    assert (await engine.store.get(PERSONS, engine.graph.person_of("user_id:u0"))).version == stored.version
