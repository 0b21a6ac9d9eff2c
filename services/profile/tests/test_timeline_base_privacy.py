"""The timeline base is personal data: a person past the timeline cap has the dropped events' values in
it, stored with the profile, shown by an export and gone with a deletion."""

from __future__ import annotations

import asyncio
import json
import time

from cdp.events.v1 import events_pb2
from cdp_kit.bus import Bus, dead_letter_stream, events_resolved_stream, privacy_stream, profiles_stream, scores_stream
from cdp_kit.storage import open_store
from cdp_profile.domain import ComputedTrait, Retention
from cdp_profile.engine import ProfileEngine
from cdp_profile.stream import partitioned_engines

T0 = 1_790_000_000.0
COLLECTIONS = ("profiles", "profile_timeline", "profile_checkpoints", "profile_computed_traits", "profile_deletions")


def viewed(message_id: str, person: str, at: float, sku: str) -> events_pb2.ResolvedEvent:
    event = events_pb2.Event(message_id=message_id, source_id="t", type=events_pb2.EVENT_TYPE_TRACK, event="Viewed")
    event.timestamp.FromNanoseconds(int(at * 1e9))
    event.received_at.FromNanoseconds(int(at * 1e9))
    event.properties.update({"sku": sku})
    return events_pb2.ResolvedEvent(event=event, person_id=person, identifiers=[f"user_id:{person}"])


async def _dump(store) -> str:
    out = []
    for collection in COLLECTIONS:
        async for record in store.scan_all(collection):
            out.append(json.dumps([record.key, record.doc]))
    return "\n".join(out)


async def test_a_deleted_person_past_the_cap_leaves_nothing_of_the_dropped_events(nats_server):
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="base-privacy") as bus:
        await bus.ensure_streams(
            events_resolved_stream(), scores_stream(), profiles_stream(), dead_letter_stream(), privacy_stream()
        )
        engine = ProfileEngine(
            store,
            bus.publisher,
            partitions=1,
            owned=[0],
            retention=Retention(max_events=5),
            telemetry=bus.telemetry,
            clock=lambda: T0,
        )
        await engine.start()
        await engine.define(
            ComputedTrait.from_dict({"name": "skus", "op": "unique", "event_names": ["Viewed"], "property": "sku"})
        )
        engine.streams.clear()
        partitioned = partitioned_engines(engine, bus, partitions=1, batch_size=64, ack_wait=30)[0]
        await partitioned.start_partition(0)
        await partitioned.wait_ready()
        try:
            events = [viewed(f"v{i}", "p1", T0 - 100 + i, f"secret-sku-{i:02d}") for i in range(12)]
            ack = await bus.js.publish(
                "events.resolved.0", events_pb2.ResolvedEventBatch(events=events).SerializeToString()
            )
            deadline = time.monotonic() + 10
            while partitioned.pipelines[0].checkpoint < ack.seq:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            await engine.flush()
            stored = await _dump(store)
            assert "secret-sku-00" in stored
            records = [record async for record in store.scan_all("profiles")]
            (part,) = json.loads(records[0].doc["profile"])["parts"]
            assert "secret-sku-00" in json.dumps(part["base"])  # dropped from the timeline, kept in the base
            exported = engine.profiles["p1"].export(now=T0)
            assert exported["timeline_base"][0]["computed"]["skus"][0] == "secret-sku-00"

            await engine.delete("p1", suppress=False, request_id="r1")
            await engine.flush()
            assert "secret-sku-" not in await _dump(store)
        finally:
            await partitioned.close()
            await engine.stop()
