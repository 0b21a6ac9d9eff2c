"""A copy of an applied event, through the real profile engine on a real nats-server: the same event id
applied a second time is listed again in `profiles.changed` (orchestration holds a person's actions until
a change lists their latest event), and the stored profile is not rewritten or changed by it.

Events come as in production: published on `events.resolved.0` and applied by the kit's partitioned engine
running profile's logic (`cdp_profile.stream`)."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest

from cdp.events.v1 import events_pb2
from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import Bus, dead_letter_stream, events_resolved_stream, profiles_stream, scores_stream
from cdp_kit.storage import open_store
from cdp_profile.domain import ComputedTrait, Retention
from cdp_profile.engine import PROFILES, ProfileEngine
from cdp_profile.stream import partitioned_engines

T0 = 1_790_000_000.0
PERSON = "p_0c1d2e3f"


def order(message_id: str) -> events_pb2.ResolvedEventBatch:
    event = events_pb2.Event(
        message_id=message_id, source_id="web", type=events_pb2.EVENT_TYPE_TRACK, event="Order Completed"
    )
    event.timestamp.FromNanoseconds(int((T0 - 60) * 1e9))
    event.received_at.FromNanoseconds(int((T0 - 60) * 1e9))
    event.properties.update({"revenue": 20})
    resolved = events_pb2.ResolvedEvent(event=event, person_id=PERSON, identifiers=[f"user_id:{PERSON}"])
    return events_pb2.ResolvedEventBatch(events=[resolved])


@pytest.fixture
async def engine(nats_server):
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="relisting-test") as bus:
        await bus.ensure_streams(events_resolved_stream(), scores_stream(), profiles_stream(), dead_letter_stream())
        engine = ProfileEngine(
            store,
            bus.publisher,
            partitions=1,
            owned=[0],
            retention=Retention(max_events=100),
            telemetry=bus.telemetry,
            clock=lambda: T0,
        )
        await engine.start()
        engine.streams.clear()
        partitioned = partitioned_engines(engine, bus, partitions=1, batch_size=64, ack_wait=30)[0]
        await partitioned.start_partition(0)
        await partitioned.wait_ready()
        engine.test_bus, engine.test_partitioned = bus, partitioned
        try:
            yield engine
        finally:
            await partitioned.close()
            await engine.stop()


async def feed(engine: ProfileEngine, batch: events_pb2.ResolvedEventBatch) -> None:
    """Publish a batch and wait until the engine has applied, written and published it: its position durable
    and the pipeline idle. The checkpoint alone is not enough: it moves when the commit lands, and the batch's
    changes are published after that (stored by JetStream once the pipeline is idle again)."""
    ack = await engine.test_bus.js.publish("events.resolved.0", batch.SerializeToString())
    deadline = time.monotonic() + 10.0
    pipeline = engine.test_partitioned.pipelines[0]
    while pipeline.checkpoint < ack.seq or not pipeline.idle.is_set():
        assert time.monotonic() < deadline, f"position {ack.seq} not durable and published in 10 s"
        await asyncio.sleep(0.01)


async def changes(nats_url: str) -> list[profile_pb2.ProfileChanged]:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("PROFILES")
        found = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            batch = profile_pb2.ProfileChangedBatch.FromString((await js.get_msg("PROFILES", seq)).data)
            found.extend(c for c in batch.changes if c.person_id == PERSON)
        return found
    finally:
        await nc.close()


async def test_the_same_event_again_is_listed_in_a_change_and_leaves_the_stored_profile_as_it_was(engine, nats_server):
    await engine.define(ComputedTrait.from_dict({"name": "orders", "op": "count", "event_names": ["Order Completed"]}))
    await feed(engine, order("o-1"))
    [first] = await changes(nats_server.url)
    assert len(first.event_ids) == 1 and first.computed["orders"].number_value == 1
    await engine.flush()
    before = await engine.store.get(PROFILES, PERSON)
    assert before is not None

    await feed(engine, order("o-1"))  # the same message id from the same source: the same event
    listed = await changes(nats_server.url)
    assert len(listed) == 2, "the copy is not listed: orchestration would hold this person's actions"
    second = listed[1]
    assert list(second.event_ids) == list(first.event_ids)
    assert not second.traits and not second.computed and not second.removed and not second.merged

    await engine.flush()
    after = await engine.store.get(PROFILES, PERSON)
    assert after is not None and after.version == before.version and after.doc == before.doc
    assert engine.profiles[PERSON].view(now=T0).computed["orders"] == 1
