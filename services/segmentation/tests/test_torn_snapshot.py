"""A process killed while a snapshot is being written (cdp_kit.held writes the persons in chunks, then the
positions they include): the store holds some persons newer than the positions. The restart replays the
stream from the old positions; the persons already written skip what they hold, the others apply it again.

What the restart publishes must be what the first attempt published, under the same message ids: a stream
message's transitions travel in one message whose id comes from all of them, so a replay that finds only
some of them (the persons not yet written) must not publish them under a new id, and a person deleted by
the part that was written must not be evaluated as a new, empty profile and enter segments it never was in.
tests/fault/test_segmentation_crash.py found the first under load ("transition dormant:p_0202:s0.11.0:e
published twice"); here the kill lands at that point.

The replay publishes nothing of a message the bus has already: at or below the engine's checkpoint, or the
newest person the snapshot wrote (engine.py, `replay`). What the outbox holds is published first, so what
the replay finds after the checkpoint still goes out after it (the last test)."""

from __future__ import annotations

import asyncio
import collections
import contextlib

import nats
import pytest

from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2
from cdp_kit.bus import Bus, partition_for, profiles_stream, segments_stream, subjects
from cdp_kit.storage import open_store
from cdp_kit.timestamps import set_seconds
from cdp_segmentation.domain import parse
from cdp_segmentation.engine import PERSONS, SegmentationEngine
from cdp_testing.fakes import T0, Clock, Delivery

from . import test_stream
from .test_stream import until

PARTITIONS = 4
# More persons in one message than a snapshot writes at once (engine.SNAPSHOT_CHUNK, 100): the kill after
# the first chunk leaves some of them newer than the positions and the rest older, whatever the order.
CROWD = 150


def change(person: str, at: float, *, removed: bool = False, **traits: float) -> profile_pb2.ProfileChanged:
    message = profile_pb2.ProfileChanged(person_id=person, cause="delete" if removed else "event", removed=removed)
    set_seconds(message.at, at)
    for name, value in traits.items():
        message.traits[name].number_value = value
    return message


def in_partition(count: int, partition: int, prefix: str) -> list[str]:
    persons = (f"{prefix}{i:04d}" for i in range(100_000))
    return [p for p in persons if partition_for(p, PARTITIONS) == partition][:count]


async def events(js) -> list[segmentation_pb2.SegmentEvent]:
    info = await js.stream_info("SEGMENTS")
    out = []
    if info.state.messages:
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            out.extend(segmentation_pb2.SegmentEventBatch.FromString((await js.get_msg("SEGMENTS", seq)).data).events)
    return out


class DiesAtSecondChunk:
    """The store as a snapshot sees it: the first write of persons lands, the process dies in the second
    (it never returns; the test then kills the replica)."""

    def __init__(self, store) -> None:
        self.store = store
        self.chunks = 0
        self.reached = asyncio.Event()

    def __getattr__(self, name):
        return getattr(self.store, name)

    async def bulk_write(self, ops):
        if any(op.collection == PERSONS for op in ops):
            self.chunks += 1
            if self.chunks == 2:
                self.reached.set()
                await asyncio.Event().wait()
        return await self.store.bulk_write(ops)


class Replica(test_stream.Replica):
    """test_stream's replica, owning every partition, with a crash that also ends the tasks the test holds."""

    def __init__(self, store, url: str, clock: Clock) -> None:
        super().__init__("torn", store, url, clock)
        self.crashed = False

    async def start(self) -> Replica:
        # Every partition has arrived (replayed, published) when this returns.
        return await super().start(ownership=None)

    async def crash(self, *pending: asyncio.Task) -> None:
        """Gone at once: nothing drained, the snapshot under way never finishes."""
        self.crashed = True
        self.serving.cancel()
        self.stream.abort()
        for task in [*self.engine._tasks, *pending]:
            task.cancel()
        await asyncio.gather(self.serving, *self.engine._tasks, *pending, return_exceptions=True)
        self.engine._tasks.clear()
        self.stack.pop_all()
        await self.bus.nc.close()


@contextlib.asynccontextmanager
async def crash_world(nats_server):
    """PROFILES and SEGMENTS on `nats_server`, one memory store, a clock the test moves, and a factory of
    replicas on that store (or on another, `on`); each replica not crashed is stopped at the end."""
    async with open_store("memory://") as store:
        async with Bus.connect(nats_server.url, name="setup") as bus:
            await bus.ensure_streams(profiles_stream(), segments_stream())
        nc = await nats.connect(nats_server.url)
        started: list[Replica] = []
        clock = Clock(T0)

        async def replica(on=None) -> Replica:
            started.append(Replica(on if on is not None else store, nats_server.url, clock))
            return await started[-1].start()

        try:
            yield replica, nc.jetstream(), clock, store
        finally:
            for r in started:
                if not r.crashed:
                    await r.stop()
            await nc.close()


@pytest.fixture
async def world(nats_server):
    async with crash_world(nats_server) as (replica, js, _clock, _store):
        yield replica, js


async def applied_commit_held(replica: Replica, seq: int, commits: Held, what: str) -> None:
    """`replica` applied partition 0 up to `seq`, and the commit `commits` holds (`on`) has reached it."""

    async def held() -> bool:
        return replica.engine.applied.get(subjects.profiles_changed(0), 0) >= seq and commits.reached.is_set()

    await until(held, what)


async def send(js, *changes: profile_pb2.ProfileChanged) -> int:
    batch = profile_pb2.ProfileChangedBatch(changes=list(changes))
    ack = await js.publish(subjects.profiles_changed(0), batch.SerializeToString())
    return ack.seq


async def applied(replica: Replica, seq: int) -> None:
    async def done() -> bool:
        return replica.stream.pipelines[0].checkpoint >= seq and replica.stream.pipelines[0].idle.is_set()

    await until(done, f"position {seq} applied and published")


async def killed_mid_snapshot(replica: Replica) -> None:
    torn = DiesAtSecondChunk(replica.store)
    replica.engine.held.store = torn
    snapshot = asyncio.create_task(replica.engine.snapshot())
    await asyncio.wait_for(torn.reached.wait(), 20)
    await replica.crash(snapshot)


async def test_a_message_whose_persons_a_torn_snapshot_split_is_published_once(world):
    """One message enters 150 persons: one message of 150 events on SEGMENTS. The kill lands after the
    snapshot wrote 100 of them; the restart replays the message for the other 50."""
    replica, js = world
    first = await replica()
    await first.engine.create("high", parse("traits.level > 0"))
    await first.engine.wait_live("high")
    await first.engine.snapshot()
    crowd = in_partition(CROWD, 0, "p")
    seq = await send(js, *(change(p, T0 + 1, level=1) for p in crowd))
    await applied(first, seq)
    assert len(await events(js)) == CROWD
    await killed_mid_snapshot(first)

    second = await replica()
    assert set(second.engine.members["high"]) == set(crowd)
    published = await events(js)
    twice = [key for key, n in collections.Counter(e.id for e in published).items() if n > 1]
    assert not twice, f"{len(twice)} transitions published twice, e.g. {twice[:3]}"
    assert len(published) == CROWD


async def test_a_person_a_torn_snapshot_deleted_is_not_replayed_as_a_new_profile(world):
    """`nolevel` holds the profiles without a level. p_gone (level 1) changes `other`, then is deleted;
    the kill lands after the snapshot wrote the deletion and 99 persons of an earlier message. The
    restart replays the change to `other` for a person it no longer holds: evaluated as a new, empty
    profile it would enter `nolevel` (and leave it at the deletion), which never happened."""
    replica, js = world
    first = await replica()
    await first.engine.create("high", parse("traits.level > 0"))
    await first.engine.create("nolevel", parse("not traits.level exists"))
    await first.engine.wait_live("high")
    await first.engine.wait_live("nolevel")
    gone = in_partition(1, 0, "gone")[0]
    await applied(first, await send(js, change(gone, T0, level=1)))
    await first.engine.snapshot()
    crowd = in_partition(CROWD, 0, "p")
    await send(js, *(change(p, T0 + 1, level=1) for p in crowd))
    await send(js, change(gone, T0 + 2, other=1))
    await applied(first, await send(js, change(gone, T0 + 3, removed=True)))
    before = await events(js)
    assert [(e.segment_id, e.entered) for e in before if e.person_id == gone] == [("high", True), ("high", False)]
    await killed_mid_snapshot(first)

    second = await replica()
    assert gone not in second.engine.persons
    published = await events(js)
    assert [(e.segment_id, e.entered) for e in published if e.person_id == gone] == [
        ("high", True),
        ("high", False),
    ]
    assert len({e.id for e in published}) == len(published) == len(before)


async def test_a_go_live_whose_snapshot_a_crash_cut_short_is_published_once(world):
    """`high` goes live over 150 persons of a partition: one message of 150 entries (`v1`). The snapshot
    the build takes after it is cut short after 100 persons; the restart replays the logged go-live (the
    positions and marks were not written), where 100 persons hold the membership already."""
    replica, js = world
    first = await replica()
    crowd = in_partition(CROWD, 0, "p")
    await applied(first, await send(js, *(change(p, T0 + 1, level=1) for p in crowd)))
    await first.engine.snapshot()
    torn = DiesAtSecondChunk(first.store)
    first.engine.held.store = torn
    creating = asyncio.create_task(first.engine.create("high", parse("traits.level > 0")))
    await asyncio.wait_for(torn.reached.wait(), 20)
    assert len(await events(js)) == CROWD
    await first.crash(creating)

    second = await replica()
    second.engine.resume_builds()
    await second.engine.wait_live("high")
    assert second.engine.members["high"] == set(crowd)
    published = await events(js)
    twice = [key for key, n in collections.Counter(e.id for e in published).items() if n > 1]
    assert not twice, f"{len(twice)} transitions published twice, e.g. {twice[:3]}"
    assert len(published) == CROWD


async def test_a_torn_snapshot_of_an_engine_without_the_stream_is_replayed_without_publishing_twice(nats_server):
    """The same without the partitioned engine (tools, the in-process benchmark): no checkpoint to go by,
    the persons the snapshot wrote say how far the stream had been published."""
    crowd = in_partition(CROWD, 0, "p")
    message = profile_pb2.ProfileChangedBatch(changes=[change(p, T0 + 1, level=1) for p in crowd])
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="segmentation") as bus:
        await bus.ensure_streams(profiles_stream(), segments_stream())

        def make() -> SegmentationEngine:
            return SegmentationEngine(
                store, bus.publisher, partitions=PARTITIONS, owned=[0], telemetry=bus.telemetry, clock=Clock(T0)
            )

        first = make()
        await first.start()
        await first.create("high", parse("traits.level > 0"))
        await first.wait_live("high")
        await first.snapshot()
        await first.handle([Delivery(message, subjects.profiles_changed(0), 1)])
        torn = DiesAtSecondChunk(store)
        first.held.store = torn
        snapshot = asyncio.create_task(first.snapshot())
        await asyncio.wait_for(torn.reached.wait(), 20)
        for task in [*first._tasks, snapshot]:
            task.cancel()
        await asyncio.gather(*first._tasks, snapshot, return_exceptions=True)

        second = make()
        await second.start()
        try:

            async def stream():
                yield subjects.profiles_changed(0), 1, message.SerializeToString()

            assert await second.replay(stream()) == CROWD  # the message; the persons written skip it
            assert set(second.members["high"]) == set(crowd)
            published = await events(bus.js)
            assert len({e.id for e in published}) == len(published) == CROWD
        finally:
            await second.stop()


class Held:
    """A hold the test puts on the store's commits or on publishing: what comes while it is on waits
    forever (the process dies there). `reached` once something waits."""

    def __init__(self) -> None:
        self.on = False
        self.reached = asyncio.Event()

    async def __call__(self) -> None:
        if self.on:
            self.reached.set()
            await asyncio.Event().wait()


class HeldStore:
    def __init__(self, store, hold: Held) -> None:
        self.store, self.hold = store, hold

    def __getattr__(self, name):
        return getattr(self.store, name)

    async def bulk_write(self, ops):
        await self.hold()
        return await self.store.bulk_write(ops)


async def test_what_the_outbox_holds_goes_out_before_what_the_replay_finds_after_it(world, nats_server):
    """p enters at a; its batch commits (outbox and checkpoint) and the publish never returns. p leaves
    at b; b is applied and its commit never lands. The process dies. The restart replays b (the consumer
    had it) and publishes its exit: after a's entry from the outbox, not before it."""
    _replica, js = world
    async with open_store("memory://") as memory:
        commits, publishes = Held(), Held()
        first = await Replica(HeldStore(memory, commits), nats_server.url, Clock(T0)).start()
        await first.engine.create("high", parse("traits.level > 0"))
        await first.engine.wait_live("high")
        await first.engine.snapshot()
        real = first.bus.publisher.publish_batch

        async def publish_batch(messages, **options):
            await publishes()
            return await real(messages, **options)

        first.bus.publisher.publish_batch = publish_batch
        person = in_partition(1, 0, "p")[0]
        publishes.on = True
        a = await send(js, change(person, T0 + 1, level=1))
        await asyncio.wait_for(publishes.reached.wait(), 20)  # a's commit landed: its publish waits
        commits.on = True
        b = await send(js, change(person, T0 + 2, level=0))

        await applied_commit_held(first, b, commits, "b applied, its commit held")
        await first.crash()
        assert not await events(js)

        second = await Replica(memory, nats_server.url, Clock(T0)).start()
        try:
            assert a < b
            await until(lambda: _count(js, 2), "both transitions published")
            assert [(e.person_id, e.entered) for e in await events(js)] == [(person, True), (person, False)]
        finally:
            await second.stop()


async def _count(js, n: int) -> bool:
    return len(await events(js)) >= n
