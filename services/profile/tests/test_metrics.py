"""What an operator's dashboard reads from profile: its metrics under the OpenTelemetry dotted names
(`cdp.profile.<thing>`, the unit in the instrument's unit), counting what the engine did; the batches of
its partitioned inputs are timed by the kit's engine (`cdp.engine.<thing>`, attribute `service`: not per
partition, which multiplied the page by the partitions)."""

from __future__ import annotations

import asyncio

import pytest

from cdp.events.v1 import events_pb2
from cdp_kit.bus import Bus, dead_letter_stream, events_resolved_stream, profiles_stream, scores_stream, subjects
from cdp_kit.storage import open_store
from cdp_profile.domain import Retention
from cdp_profile.engine import ProfileEngine
from cdp_profile.stream import partitioned_engines
from cdp_testing.fakes import T0, Clock
from cdp_testing.metrics import MetricsCapture


def order(message_id: str, person: str) -> events_pb2.ResolvedEvent:
    event = events_pb2.Event(
        message_id=message_id, source_id="t", type=events_pb2.EVENT_TYPE_TRACK, event="Order Completed"
    )
    event.timestamp.FromNanoseconds(int(T0 * 1e9))
    event.received_at.FromNanoseconds(int(T0 * 1e9))
    return events_pb2.ResolvedEvent(event=event, person_id=person, identifiers=[f"user_id:{person}"])


async def test_applied_events_changes_and_commits_are_counted_under_dotted_names(nats_server):
    captured = MetricsCapture("profile")
    telemetry = captured.telemetry
    async with (
        open_store("memory://") as store,
        Bus.connect(nats_server.url, name="metrics-test", telemetry=telemetry) as bus,
    ):
        await bus.ensure_streams(events_resolved_stream(), scores_stream(), profiles_stream(), dead_letter_stream())
        engine = ProfileEngine(
            store,
            bus.publisher,
            partitions=1,
            owned=[0],
            retention=Retention(max_events=100),
            telemetry=telemetry,
            clock=Clock(T0 + 0.25),
        )
        await engine.start()
        events = partitioned_engines(engine, bus, partitions=1, batch_size=64, ack_wait=30)[0]
        await events.start_partition(0)
        try:
            batch = events_pb2.ResolvedEventBatch(events=[order("o1", "p1"), order("o2", "p2"), order("o3", "p1")])
            ack = await bus.js.publish(subjects.events_resolved(0), batch.SerializeToString())
            for _ in range(1000):  # until the batch is durable
                if events.pipelines[0].checkpoint >= ack.seq:
                    break
                await asyncio.sleep(0.01)
        finally:
            await events.close()
            await engine.stop()

    metrics = captured.collected()
    assert not [name for name in metrics if not name.startswith(("cdp.profile.", "cdp.engine.", "cdp.bus."))]
    unit, (events,) = metrics["cdp.profile.events"]
    assert unit == "{event}" and events.value == 3 and dict(events.attributes) == {"outcome": "applied"}
    unit, (changes,) = metrics["cdp.profile.changes"]
    assert unit == "{change}" and changes.value == 2 and dict(changes.attributes) == {"cause": "event"}
    unit, (freshness,) = metrics["cdp.profile.freshness"]
    assert unit == "ms" and freshness.count == 1 and freshness.sum == pytest.approx(250)
    unit, (commit,) = metrics["cdp.engine.commit.duration"]
    assert unit == "ms" and commit.count >= 1 and dict(commit.attributes) == {"service": "profile"}
