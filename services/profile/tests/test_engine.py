"""The profile engine against a real nats-server and the memory store, with a clock the test moves:
windowed traits fall when time passes (and the change is published), a lost write race drops the cache
and the redelivered batch applies on the store's state, and a redelivered batch counts once."""

from __future__ import annotations

import nats
import pytest

from cdp.events.v1 import events_pb2
from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import Bus, events_resolved_stream, profiles_stream
from cdp_kit.errors import Unavailable
from cdp_kit.storage import open_store
from cdp_profile.domain import ComputedTrait, Retention
from cdp_profile.engine import PROFILES, ProfileEngine

DAY = 86_400.0
T0 = 1_790_000_000.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Delivery:
    """A delivery as the consumer runner hands it over (data, subject, stream position)."""

    def __init__(self, batch: events_pb2.ResolvedEventBatch, subject: str, seq: int) -> None:
        self.data = batch.SerializeToString()
        self.subject = subject
        self.stream_seq = seq

    def reject(self, reason: str, detail: str = "") -> None:
        raise AssertionError(f"rejected: {reason} {detail}")


def order(message_id: str, person: str, at: float, revenue: float) -> events_pb2.ResolvedEvent:
    event = events_pb2.Event(
        message_id=message_id, source_id="t", type=events_pb2.EVENT_TYPE_TRACK, event="Order Completed"
    )
    event.timestamp.FromNanoseconds(int(at * 1e9))
    event.received_at.FromNanoseconds(int(at * 1e9))
    event.properties.update({"revenue": revenue})
    return events_pb2.ResolvedEvent(event=event, person_id=person, identifiers=[f"user_id:{person}"])


@pytest.fixture
async def engine(nats_server):
    clock = Clock(T0)
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="engine-test") as bus:
        await bus.ensure_streams(events_resolved_stream(), profiles_stream())
        engine = ProfileEngine(
            store,
            bus.publisher,
            partitions=1,
            owned=[0],
            retention=Retention(max_events=100),
            telemetry=bus.telemetry,
            clock=clock,
        )
        await engine.start()
        engine.test_clock = clock
        try:
            yield engine
        finally:
            await engine.stop()


async def changes_of(nats_url: str, person: str) -> list[profile_pb2.ProfileChanged]:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("PROFILES")
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            batch = profile_pb2.ProfileChangedBatch.FromString((await js.get_msg("PROFILES", seq)).data)
            out.extend(c for c in batch.changes if c.person_id == person)
        return out
    finally:
        await nc.close()


async def test_a_windowed_count_falls_when_an_order_ages_out_without_a_new_event(engine, nats_server):
    await engine.define(
        ComputedTrait.from_dict(
            {"name": "orders_30d", "op": "count", "event_names": ["Order Completed"], "window": "30d"}
        )
    )
    batch = events_pb2.ResolvedEventBatch(
        events=[order("o1", "p1", T0 - 20 * DAY, 10), order("o2", "p1", T0 - 2 * DAY, 20)]
    )
    await engine.handle([Delivery(batch, "events.resolved.0", 1)])
    assert engine.profiles["p1"].view(now=T0).computed["orders_30d"] == 2

    engine.test_clock.now = T0 + 11 * DAY  # o1 is now 31 days old
    assert await engine.expire_due() == 1
    assert engine.profiles["p1"].view(now=engine.test_clock.now).computed["orders_30d"] == 1
    feed = await changes_of(nats_server.url, "p1")
    assert feed[-1].cause == "expiry" and feed[-1].computed["orders_30d"].number_value == 1
    # Durable too: a restart reads the fallen value back.
    await engine.flush()
    stored = await engine.store.get(PROFILES, "p1")
    assert stored is not None


async def test_a_redelivered_batch_counts_once(engine):
    await engine.define(
        ComputedTrait.from_dict(
            {"name": "revenue", "op": "sum", "property": "revenue", "event_names": ["Order Completed"]}
        )
    )
    batch = events_pb2.ResolvedEventBatch(events=[order("o1", "p1", T0, 10), order("o2", "p1", T0, 5)])
    await engine.handle([Delivery(batch, "events.resolved.0", 1)])
    await engine.handle([Delivery(batch, "events.resolved.0", 1)])  # redelivered after a lost ack
    assert engine.profiles["p1"].view(now=T0).computed["revenue"] == 15


async def test_a_lost_write_race_drops_the_cache_and_the_retry_applies_on_the_stored_state(engine):
    await engine.define(ComputedTrait.from_dict({"name": "orders", "op": "count", "event_names": ["Order Completed"]}))
    first = events_pb2.ResolvedEventBatch(events=[order("o1", "p1", T0, 10)])
    await engine.handle([Delivery(first, "events.resolved.0", 1)])
    # Another replica wrote p1 behind this one's back (a stale owner during a rollout).
    record = await engine.store.get(PROFILES, "p1")
    await engine.store.put(PROFILES, "p1", record.doc, expected_version=record.version)

    second = events_pb2.ResolvedEventBatch(events=[order("o2", "p1", T0 + 1, 10)])
    with pytest.raises(Unavailable):
        await engine.handle([Delivery(second, "events.resolved.0", 2)])
    await engine.handle([Delivery(second, "events.resolved.0", 2)])  # JetStream redelivers it
    profile = engine.profiles["p1"]
    assert profile.view(now=T0).computed["orders"] == 2
    assert [e.event_id for e in profile.events(limit=10)[0]] == ["t:o2", "t:o1"]


async def test_a_definition_added_later_is_backfilled_once_even_while_events_arrive(engine):
    events = [order(f"o{i}", "p1", T0 + i, 1) for i in range(10)]
    await engine.handle([Delivery(events_pb2.ResolvedEventBatch(events=events), "events.resolved.0", 1)])
    backfill = await engine.define(
        ComputedTrait.from_dict(
            {"name": "spent", "op": "sum", "property": "revenue", "event_names": ["Order Completed"]}
        )
    )
    later = [order("o10", "p1", T0 + 10, 1)]
    await engine.handle([Delivery(events_pb2.ResolvedEventBatch(events=later), "events.resolved.0", 2)])
    for task in list(engine._tasks):
        if task.get_name().startswith("backfill"):
            await task
    assert backfill.state == "ready" and backfill.done == backfill.total == 1
    assert engine.profiles["p1"].view(now=T0).computed["spent"] == 11
