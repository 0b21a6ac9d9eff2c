"""A person partition moving between two replicas (what `CDP_OWNERSHIP=nats|kubernetes` does when a
StatefulSet scales): the replica that gets it loads its profiles from the store, the one that gives it
up forgets them (and reads them from the store when asked about them), and one that gets it back
works on the store's state, not on what it held before.

Two `ProfileEngine`s share one store and one nats-server, as two replicas share MongoDB (or one SQLite
file) and JetStream; the test hands partition 0 over with the hooks an ownership calls
(`start_partition` / `stop_partition`)."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack

import pytest

from cdp.events.v1 import events_pb2
from cdp_kit.bus import (
    Bus,
    dead_letter_stream,
    events_resolved_stream,
    identity_stream,
    partition_for,
    profiles_stream,
    scores_stream,
)
from cdp_kit.errors import Unavailable
from cdp_kit.storage import open_store
from cdp_profile.domain import ComputedTrait, Retention
from cdp_profile.engine import ProfileEngine
from cdp_profile.routing import FORWARDED, Router, holder_address
from cdp_profile.stream import partitioned_engines

DAY = 86_400.0
T0 = 1_790_000_000.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def order(message_id: str, person: str, at: float) -> bytes:
    event = events_pb2.Event(
        message_id=message_id, source_id="t", type=events_pb2.EVENT_TYPE_TRACK, event="Order Completed"
    )
    event.timestamp.FromNanoseconds(int(at * 1e9))
    event.received_at.FromNanoseconds(int(at * 1e9))
    resolved = events_pb2.ResolvedEvent(event=event, person_id=person, identifiers=[f"user_id:{person}"])
    return events_pb2.ResolvedEventBatch(events=[resolved]).SerializeToString()


async def replica(stack: AsyncExitStack, store, nats_url: str, name: str) -> ProfileEngine:
    bus = await stack.enter_async_context(Bus.connect(nats_url, name=name))
    await bus.ensure_streams(
        events_resolved_stream(), identity_stream(), profiles_stream(), scores_stream(), dead_letter_stream()
    )
    engine = ProfileEngine(
        store,
        bus.publisher,
        partitions=1,
        owned=(),  # leased ownership: nothing is owned until acquired
        retention=Retention(max_events=100),
        telemetry=bus.telemetry,
        clock=Clock(T0),
    )
    await engine.start()
    stack.push_async_callback(engine.stop)
    partitioned_engines(engine, bus, partitions=1, batch_size=64, ack_wait=30)
    engine.bus = bus
    return engine


async def two_replicas(stack: AsyncExitStack, nats_url: str) -> tuple[object, ProfileEngine, ProfileEngine]:
    """Replicas a and b on one memory store, `orders_30d` (a 30-day count of orders) defined."""
    store = await stack.enter_async_context(open_store("memory://"))
    a = await replica(stack, store, nats_url, "replica-a")
    await a.define(
        ComputedTrait.from_dict(
            {"name": "orders_30d", "op": "count", "event_names": ["Order Completed"], "window": "30d"}
        )
    )
    b = await replica(stack, store, nats_url, "replica-b")
    return store, a, b


async def feed(engine: ProfileEngine, data: bytes) -> None:
    """Publish on events.resolved.0 and wait until the owning engine has made it durable."""
    ack = await engine.bus.js.publish("events.resolved.0", data)
    deadline = time.monotonic() + 10
    while engine.streams[0].pipelines[0].checkpoint < ack.seq:
        assert time.monotonic() < deadline, f"position {ack.seq} not durable in 10s"
        await asyncio.sleep(0.01)


def orders(engine: ProfileEngine, person: str) -> int:
    return engine.profiles[person].view(now=engine.clock()).computed["orders_30d"]


async def test_a_partition_moves_with_its_profiles_and_comes_back_onto_the_stores_state(nats_server):
    async with AsyncExitStack() as stack:
        _, a, b = await two_replicas(stack, nats_server.url)

        await a.start_partition(0)
        await feed(a, order("o1", "p1", T0 - 20 * DAY))
        assert orders(a, "p1") == 1

        # 0 moves to b: a drains and forgets p1; b has p1 from the store before any event of p1 arrives.
        await a.stop_partition(0)
        assert "p1" not in a.profiles
        await b.start_partition(0)
        assert orders(b, "p1") == 1
        # So the window closes on the new owner without waiting for an event: o1 is now 31 days old.
        b.clock.now = T0 + 11 * DAY
        assert await b.expire_due() == 1
        assert orders(b, "p1") == 0
        await feed(b, order("o2", "p1", T0 + 10 * DAY))
        assert orders(b, "p1") == 1
        # a, asked about p1 meanwhile, reads what b wrote, and keeps no copy that would go stale.
        a.clock.now = b.clock.now
        read = await a.profile("p1")
        assert read.view(now=a.clock()).computed["orders_30d"] == 1
        assert "p1" not in a.profiles

        # 0 comes back to a, which last saw p1 before o2 and the expiry: it works on the store's p1.
        await b.stop_partition(0)
        await a.start_partition(0)
        await feed(a, order("o3", "p1", T0 + 11 * DAY))
        assert orders(a, "p1") == 2
        assert [e.event_id for e in a.profiles["p1"].timeline()] == ["t:o1", "t:o2", "t:o3"]
        assert a.epoch == 0, "a stale copy made a write fail and the whole cache was rebuilt"
        await a.stop_partition(0)


async def test_a_replica_that_owns_nothing_yet_starts_without_reading_every_timeline(nats_server):
    """With leases a replica owns nothing when it starts (its partitions come afterwards, each loaded
    then): reading every stored timeline first would only delay a new pod's readiness on a large store
    (past its startup probe), for nothing."""
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(open_store("memory://"))
        scanned: list[str] = []
        scan_all = store.scan_all

        def spy(collection, **options):
            scanned.append(collection)
            return scan_all(collection, **options)

        store.scan_all = spy
        await replica(stack, store, nats_server.url, "replica-a")
        assert "profile_timeline" not in scanned and "profiles" not in scanned


class Call:
    def __init__(self, *metadata: tuple[str, str]) -> None:
        self.metadata = metadata

    def invocation_metadata(self):
        return self.metadata


def test_with_leases_a_request_goes_to_the_pod_holding_the_persons_partition():
    holders = {p: f"cdp-profile-{p % 2}" for p in range(8)}
    router = Router(
        partitions=8,
        ordinal=0,
        replicas=1,
        addresses=[],
        channel=lambda address: None,
        holder=holders.get,
        me="cdp-profile-0",
        address_of=lambda holder: holder_address(holder, 50053),
    )
    persons = [f"person-{n}" for n in range(40)]
    for person in persons:
        mine = partition_for(person, 8) % 2 == 0
        assert router.owner(person) == (None if mine else "cdp-profile-1.cdp-profile-headless:50053")
    # While a partition moves nobody holds it: the replica asked answers (from the store) itself.
    holders.clear()
    assert {router.owner(person) for person in persons} == {None}
    # A request forwarded on an older holder's word reaches a replica that no longer holds it: retry.
    with pytest.raises(Unavailable, match="moving"):
        router.stub("cdp-profile-1.cdp-profile-headless:50053", Call((FORWARDED, "1")))


async def test_a_release_cut_short_gives_the_partition_up_all_the_same(nats_server):
    """The ownership cuts a release its lease no longer covers (`cdp_kit.ownership.leased`): cancelled while
    its writes are in flight, the replica still stops owning the partition and forgets its persons, so it
    neither answers from a copy the new owner no longer updates nor writes them."""
    async with AsyncExitStack() as stack:
        store, a, b = await two_replicas(stack, nats_server.url)
        await a.start_partition(0)
        await feed(a, order("o1", "p1", T0 - 2 * DAY))

        gate, bulk_write = asyncio.Event(), store.bulk_write

        async def held(ops):
            await gate.wait()  # a store answering late
            return await bulk_write(ops)

        store.bulk_write = held
        await a.bus.js.publish("events.resolved.0", order("o2", "p1", T0 - DAY))
        deadline = time.monotonic() + 10
        while a.streams[0].pipelines[0]._in_flight < 1:
            assert time.monotonic() < deadline, "o2 not applied"
            await asyncio.sleep(0.01)
        releasing = asyncio.create_task(a.stop_partition(0))
        await asyncio.sleep(0.1)
        assert not releasing.done()  # draining: o2's write is in flight
        releasing.cancel()  # the lease is lost: the release is cut
        await asyncio.gather(releasing, return_exceptions=True)
        assert 0 not in a.owned
        assert "p1" not in a.profiles

        store.bulk_write = bulk_write
        gate.set()
        await a.chain.settle()  # what was in flight lands (a chain shared by every partition: not aborted)
        await b.start_partition(0)
        await feed(b, order("o3", "p1", T0))
        assert orders(b, "p1") == 3
        assert [e.event_id for e in b.profiles["p1"].timeline()] == ["t:o1", "t:o2", "t:o3"]
        await b.stop_partition(0)
