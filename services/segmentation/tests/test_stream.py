"""Segmentation on the kit's partitioned engine (stream.py) over a real nats-server: partitions moving
between replicas under traffic, a crash between snapshots, and timers of a partition with no traffic."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import random

import nats
import numpy as np
import orjson
import pytest

from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2
from cdp_kit.bus import Bus, partition_for, profiles_stream, segments_stream, subjects
from cdp_kit.ownership import StaticOwnership
from cdp_kit.ownership.nats_kv import nats_kv_ownership
from cdp_kit.storage import open_store
from cdp_kit.timestamps import set_seconds
from cdp_segmentation.domain import parse
from cdp_segmentation.engine import BUILT, CHECKPOINTS, LIVE, SNAPSHOTS, SegmentationEngine
from cdp_segmentation.stream import SegmentationStream, engine_spec
from cdp_segmentation.summaries import SUMMARY_POINTS, SharedPercentiles
from cdp_testing.fakes import T0, Clock, Delivery

PARTITIONS = 4
TTL = 1.2


def change(person: str, at: float, **traits) -> profile_pb2.ProfileChanged:
    message = profile_pb2.ProfileChanged(person_id=person, cause="event")
    set_seconds(message.at, at)
    for name, value in traits.items():
        message.traits[name].number_value = value
    return message


async def transitions(nats_url: str) -> list[segmentation_pb2.SegmentEvent]:
    """Every transition on the SEGMENTS stream, in stream order."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("SEGMENTS")
        out = []
        if info.state.messages:
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                out.extend(
                    segmentation_pb2.SegmentEventBatch.FromString((await js.get_msg("SEGMENTS", seq)).data).events
                )
        return out
    finally:
        await nc.close()


async def until(condition, what: str, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, f"not reached in time: {what}"
        await asyncio.sleep(0.05)


class Replica:
    """One segmentation replica: its engine and its stream, on a connection of its own."""

    def __init__(self, name: str, store, nats_url: str, clock) -> None:
        self.name, self.store, self.nats_url, self.clock = name, store, nats_url, clock
        self.stack = contextlib.AsyncExitStack()

    async def start(
        self,
        ownership: str | StaticOwnership = "nats",
        snapshot_every: float = 3600,
        standby: str = "",
        *,
        shared: bool = False,
        percentile_interval: float = 5.0,
    ) -> Replica:
        self.bus = await self.stack.enter_async_context(Bus.connect(self.nats_url, name=f"segmentation-{self.name}"))
        self.engine = SegmentationEngine(
            self.store,
            self.bus.publisher,
            partitions=PARTITIONS,
            owned=[],
            telemetry=self.bus.telemetry,
            timer_resolution=0.05,
            namespace=f"_{standby}" if standby else "",
            percentile_interval=percentile_interval,
            shared_percentiles=await SharedPercentiles.open(self.bus.js, "segmentation") if shared else None,
            clock=self.clock,
        )
        self._count_pipeline_applies()
        spec = engine_spec(
            partitions=PARTITIONS, batch_size=16, ack_wait=30, snapshot_every=snapshot_every, standby=standby
        )
        self.stream = SegmentationStream(self.engine, spec, bus=self.bus, store=self.store)
        await self.engine.start()
        self.stack.push_async_callback(self.engine.stop)
        owner = ownership if isinstance(ownership, StaticOwnership) else None
        if ownership == "nats":
            owner = await nats_kv_ownership(
                self.bus.js, group="segmentation", partitions=PARTITIONS, identity=self.name, ttl=TTL
            )
        owner = await self.stream.start(owner)
        self.serving = asyncio.create_task(self.stream.serve(owner))
        return self

    def _count_pipeline_applies(self) -> None:
        """`pipeline_applied`: per partition, the `profiles.changed` messages this replica's pipelines
        applied (not those at or below its held position: a replay applied them). A count that stays
        when the partition leaves, unlike `engine.applied`, which a departure (a fence) empties."""
        self.pipeline_applied: collections.Counter[int] = collections.Counter()
        apply_changes = self.engine.apply_changes

        async def counted(partition: int, items, writes=None):
            position = self.engine.applied.get(subjects.profiles_changed(partition), 0)
            messages = await apply_changes(partition, items, writes)
            self.pipeline_applied[partition] += sum(1 for item in items if item.seq > position)
            return messages

        self.engine.apply_changes = counted

    async def stop(self) -> None:
        self.serving.cancel()
        await asyncio.gather(self.serving, return_exceptions=True)
        await self.stack.aclose()

    async def crash(self) -> None:
        """Gone at once: nothing drained, no snapshot."""
        self.serving.cancel()
        self.stream.abort()
        for task in self.engine._tasks:
            task.cancel()
        self.engine._tasks.clear()
        self.stack.pop_all()
        await self.bus.nc.close()


class World:
    """One test's world: the store the replicas share, JetStream to send changes and read transitions, and
    the clock every replica reads. Replicas started through it are stopped at the end of the test (those a
    test stopped or crashed already, again: nothing to do)."""

    def __init__(self, store, js, url: str) -> None:
        self.store, self.js, self.url = store, js, url
        self.clock = Clock(T0)
        self.started: list[Replica] = []

    async def replica(self, name: str, ownership: str | StaticOwnership = "nats", **options) -> Replica:
        replica = Replica(name, self.store, self.url, self.clock)
        self.started.append(replica)
        return await replica.start(ownership, **options)

    async def pair(self, ends: dict[str, int], *, leases: bool = False) -> tuple[Replica, Replica]:
        """Replicas a and b splitting the partitions (statically, or under leases), each once it has
        applied its own partitions' changes up to `ends`."""
        a = await self.replica("a", "nats" if leases else split(0))
        b = await self.replica("b", "nats" if leases else split(1))
        if leases:

            async def split_in_two() -> bool:
                return len(a.stream.owned()) == len(b.stream.owned()) == PARTITIONS // 2

            await until(split_in_two, "the partitions split between a and b")
        for replica in (a, b):
            await applied(
                [replica], {s: q for s, q in ends.items() if subjects.partition_of(s) in replica.stream.owned()}
            )
        return a, b

    def engine(self, bus: Bus, owned: list[int], partitions: int = PARTITIONS) -> SegmentationEngine:
        """An engine without a stream (changes handed to it, partitions arriving when told) on `bus`."""
        return SegmentationEngine(
            self.store, bus.publisher, partitions=partitions, owned=owned, telemetry=bus.telemetry, clock=self.clock
        )


@pytest.fixture
async def world(nats_server):
    async with open_store("memory://") as store:
        nc = await nats.connect(nats_server.url)
        async with Bus.connect(nats_server.url, name="segmentation-setup") as bus:
            await bus.ensure_streams(profiles_stream(), segments_stream())
        world = World(store, nc.jetstream(), nats_server.url)
        try:
            yield world
        finally:
            for replica in reversed(world.started):
                await replica.stop()
            await nc.close()


class Dies:
    """A point where the process dies: `reached` once it gets there, and it never returns (the test then
    crashes the replica, and the tasks waiting here end with it)."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()

    async def __call__(self) -> int:
        self.reached.set()
        await asyncio.Event().wait()
        return 0

    async def wait(self) -> None:
        await asyncio.wait_for(self.reached.wait(), 20)


async def nothing_after(_after: int):
    """A partition's history with nothing after its snapshot."""
    return
    yield


async def define(replica: Replica, segment_id: str, text: str) -> None:
    await replica.engine.create(segment_id, parse(text))
    await replica.engine.wait_live(segment_id)


async def test_a_partition_moving_between_replicas_under_traffic_publishes_every_transition_once(world, nats_server):
    """Replica a owns every partition and applies changes; b joins while the changes keep coming and
    takes half the partitions over. Each change flips its person in or out of the segment, so the
    transitions must be exactly one per change, per person in the order of the changes."""
    js = world.js
    a = await world.replica("a")
    await define(a, "high", "traits.level > 0")
    await a.engine.snapshot()  # the built version: b starts with the segment live
    persons = [f"p{i:02d}" for i in range(24)]
    sent: dict[str, list[bool]] = {p: [] for p in persons}
    stop = asyncio.Event()

    async def traffic() -> None:
        for n in itertools.count():
            if stop.is_set():
                return
            person = persons[n % len(persons)]
            inside = len(sent[person]) % 2 == 0  # first change enters, then out, in, ...
            batch = profile_pb2.ProfileChangedBatch(changes=[change(person, T0 + n, level=1 if inside else 0)])
            await js.publish(subjects.profiles_changed(partition_for(person, PARTITIONS)), batch.SerializeToString())
            sent[person].append(inside)
            await asyncio.sleep(0.005)

    load = asyncio.create_task(traffic())
    await asyncio.sleep(0.5)
    b = await world.replica("b")

    async def shared() -> bool:
        return len(a.stream.owned()) == len(b.stream.owned()) == PARTITIONS // 2

    await until(shared, "the partitions are shared between a and b")
    taken = b.stream.owned()
    # Traffic to b's new partitions: every person changes twice more after the handover (a count, not a
    # time: on a loaded machine half a second may carry no change of b's persons at all).
    handed_over = sum(len(flips) for flips in sent.values())

    async def b_has_traffic() -> bool:
        return sum(len(flips) for flips in sent.values()) >= handed_over + 2 * len(persons)

    await until(b_has_traffic, "two more changes of every person after the handover")

    # b applies changes of its half itself, counted as its pipelines apply them, not read from its held
    # positions at the end: under load a lease round that misses its fence (TTL / 2, 0.6 s here) drops
    # every partition of its replica (`leave` empties their positions) until its next round takes them
    # back, and b may be between the two when the traffic stops.
    async def b_applied_its_half() -> bool:
        return sum(b.pipeline_applied[p] for p in taken) > 0

    await until(b_applied_its_half, "b applied changes of the partitions it took over")
    stop.set()
    await load
    expected = sum(len(flips) for flips in sent.values())

    async def all_published() -> bool:
        return len(await transitions(nats_server.url)) >= expected

    await until(all_published, "every change's transition published")
    await asyncio.sleep(0.3)  # nothing more comes
    events = await transitions(nats_server.url)
    assert len({e.id for e in events}) == len(events) == expected
    for person in persons:
        assert [e.entered for e in events if e.person_id == person] == sent[person], person


async def test_a_crash_between_snapshots_loses_nothing_and_publishes_nothing_twice(world, nats_server):
    js = world.js
    first = await world.replica("one", ownership="static")
    await define(first, "high", "traits.level > 0")
    await first.engine.snapshot()
    person = "p1"
    p = partition_for(person, PARTITIONS)

    async def send(n: int, level: int) -> None:
        batch = profile_pb2.ProfileChangedBatch(changes=[change(person, T0 + n, level=level)])
        await js.publish(subjects.profiles_changed(p), batch.SerializeToString())

    async def published(n: int):
        async def check() -> bool:
            return len(await transitions(nats_server.url)) >= n

        return check

    await send(1, 1)
    await until(await published(1), "entered")
    await first.crash()  # the entry is durable on the bus; the held state was not snapshotted

    second = await world.replica("two", ownership="static")
    assert set(second.engine.membership(person)) == {"high"}  # the snapshot, then the stream after it
    await send(2, 0)
    await until(await published(2), "exited")
    await asyncio.sleep(0.3)
    events = await transitions(nats_server.url)
    assert [(e.entered, e.person_id) for e in events] == [(True, person), (False, person)]


async def test_a_timer_of_a_partition_without_traffic_fires_once(world, nats_server):
    js, clock = world.js, world.clock
    replica = await world.replica("one", ownership="static")
    await define(replica, "trial", "traits.trial_ends_at > now")
    batch = profile_pb2.ProfileChangedBatch(changes=[change("p1", T0, trial_ends_at=T0 + 60)])
    await js.publish(subjects.profiles_changed(partition_for("p1", PARTITIONS)), batch.SerializeToString())

    async def count(n: int):
        async def check() -> bool:
            return len(await transitions(nats_server.url)) >= n

        return check

    await until(await count(1), "entered")
    clock.now = T0 + 61
    await until(await count(2), "the timer's exit")
    await asyncio.sleep(0.3)
    events = await transitions(nats_server.url)
    assert [(e.entered, e.reason) for e in events] == [(True, "event"), (False, "time")]
    assert events[1].at.ToSeconds() == T0 + 60


async def test_the_first_start_after_the_upgrade_takes_the_snapshot_positions_the_consumer_loop_left(
    world, nats_server
):
    """Before the partitioned engine, snapshots kept their positions (and the built versions) in
    segmentation_checkpoints, which the engine's checkpoints now use. The first start moves them to
    segmentation_snapshots: the memberships are not rebuilt and the replay starts where they stopped."""
    store = world.store
    async with Bus.connect(nats_server.url, name="segmentation-upgrade") as bus:
        before = world.engine(bus, [0], partitions=1)
        await before.start()
        await before.create("high", parse("traits.level > 0"))
        await before.wait_live("high")
        batch = profile_pb2.ProfileChangedBatch(changes=[change("p1", T0, level=1)])
        await before.handle([Delivery(batch, subjects.profiles_changed(0), 7)])
        await before.stop()
        # The layout the consumer loop left.
        async for record in store.scan_all(SNAPSHOTS):
            await store.put(CHECKPOINTS, record.key, record.doc)
            await store.delete(SNAPSHOTS, record.key)

        after = world.engine(bus, [0], partitions=1)
        await after.start()
        try:
            assert after.applied == {subjects.profiles_changed(0): 7}
            assert after.segments["high"].state == LIVE  # the built version came along: no rebuild
            assert set(after.membership("p1")) == {"high"}
            assert (await store.get(CHECKPOINTS, BUILT)) is None
            assert (await store.get(CHECKPOINTS, subjects.profiles_changed(0))).doc["stream_seq"] == 7
        finally:
            await after.stop()


async def test_hot_standby_replicas_each_serve_every_partition_and_each_transition_is_stored_once(world, nats_server):
    store, js, clock = world.store, world.js, world.clock
    replicas = [
        await Replica(name, store, nats_server.url, clock).start(ownership="static", standby=name)
        for name in ("r0", "r1")
    ]
    try:
        for replica in replicas:  # (in the service a lifecycle call is announced to the other replica)
            await define(replica, "high", "traits.level > 0")
        assert all(r.stream.owned() == set(range(PARTITIONS)) for r in replicas)
        persons = [f"p{i}" for i in range(8)]
        for n, level in enumerate((1, 0, 1)):
            for person in persons:
                batch = profile_pb2.ProfileChangedBatch(changes=[change(person, T0 + n, level=level)])
                await js.publish(
                    subjects.profiles_changed(partition_for(person, PARTITIONS)), batch.SerializeToString()
                )

        ends = {}
        for p in {partition_for(person, PARTITIONS) for person in persons}:
            subject = subjects.profiles_changed(p)
            ends[subject] = (await js.get_last_msg("PROFILES", subject)).seq

        async def both_applied() -> bool:
            return all(r.engine.applied.get(s, 0) >= seq for r in replicas for s, seq in ends.items())

        await until(both_applied, "both replicas applied every change")

        # Applied is not published: a batch's transitions are published after its commit lands. So wait for
        # them (each replica's under the same ids, stored once), then for anything more to come.
        async def all_published() -> bool:
            return len(await transitions(nats_server.url)) >= 3 * len(persons)

        await until(all_published, "every change's transition published")
        await asyncio.sleep(0.3)  # nothing more comes
        assert all(set(r.engine.membership(p)) == {"high"} for r in replicas for p in persons)
        events = await transitions(nats_server.url)
        assert len({e.id for e in events}) == len(events) == 3 * len(persons)
    finally:
        for replica in replicas:
            await replica.stop()


# --- percentile rounds: one id per boundary, shared by restarts and replicas --------------------------

TOP = "traits.level >= percentile(traits.level, 90)"
INTERVAL = 600.0  # the round loop sleeps to the next boundary (minutes away): the tests run the rounds


async def send_levels(js, levels: dict[str, float], at: float) -> dict[str, int]:
    """One change per person; the last stream position of each partition written to."""
    ends: dict[str, int] = {}
    for person, level in levels.items():
        subject = subjects.profiles_changed(partition_for(person, PARTITIONS))
        batch = profile_pb2.ProfileChangedBatch(changes=[change(person, at, level=level)])
        ends[subject] = (await js.publish(subject, batch.SerializeToString())).seq
    return ends


async def applied(replicas: list[Replica], ends: dict[str, int]) -> None:
    async def done() -> bool:
        return all(r.engine.applied.get(s, 0) >= seq for r in replicas for s, seq in ends.items())

    await until(done, "every change applied")


def percentile_moves(events) -> list[tuple[str, bool]]:
    return sorted((e.person_id, e.entered) for e in events if e.reason == "percentile")


async def test_a_percentile_round_before_a_crash_reaches_the_stream_once(world, nats_server):
    """The round published p18's and p19's exits; the process died before a snapshot held them. The
    restart replays the round where it ran, under its id: nothing twice, and p7's later change is
    evaluated with the round's value, as it was the first time."""
    js, clock = world.js, world.clock
    first = await world.replica("one", ownership="static", percentile_interval=INTERVAL)
    await applied([first], await send_levels(js, {f"p{i}": float(i) for i in range(20)}, T0))
    await define(first, "top", TOP)
    await first.engine.snapshot()
    await applied([first], await send_levels(js, {"p5": 100.0, "p6": 101.0}, T0 + 1))
    clock.advance(INTERVAL)
    await first.engine.recompute_percentiles()  # 17.1 -> 27.1
    await applied([first], await send_levels(js, {"p7": 20.0}, T0 + 6))  # under 27.1, over 17.1
    before = await transitions(nats_server.url)
    assert percentile_moves(before) == [("p18", False), ("p19", False)]
    await first.crash()
    clock.advance(3 * INTERVAL)  # down across boundaries

    second = await world.replica("two", ownership="static", percentile_interval=INTERVAL)
    await second.engine.recompute_percentiles()  # the first round after the restart
    await asyncio.sleep(0.3)
    events = await transitions(nats_server.url)
    assert [(e.person_id, e.entered, e.reason) for e in events] == [(e.person_id, e.entered, e.reason) for e in before]
    assert sorted(second.engine.members["top"]) == ["p5", "p6"]


@pytest.mark.parametrize(
    ("build", "dies"),
    [
        ("create", "after the move's publish"),
        ("create", "after the build's publish"),
        ("create", "before the snapshot"),
        ("update", "after the move's publish"),
        ("update", "before the snapshot"),
    ],
)
async def test_a_build_that_moves_a_percentile_publishes_each_transition_once_across_a_crash(
    world, nats_server, build, dies
):
    """A build takes traits.level's 90th percentile exactly (p5 and p6 rose since the last round: 17.1 ->
    27.1), which moves the value `top` compares with: p18 and p19 exit. The build creates `high`, or
    updates `top` itself. The process dies at some point of the build, before a snapshot holds any of
    it; the restart replays the logged move where it ran and resumes the build. Every transition reaches
    the stream once."""
    js, clock = world.js, world.clock
    first = await world.replica("one", ownership="static", percentile_interval=INTERVAL)
    await applied([first], await send_levels(js, {f"p{i}": float(i) for i in range(20)}, T0))
    await define(first, "top", TOP)
    await first.engine.snapshot()
    await applied([first], await send_levels(js, {"p5": 100.0, "p6": 101.0}, T0 + 1))
    clock.advance(1)
    die = Dies()  # never returns: the crash below ends the process there

    engine = first.engine
    publish = engine._publish

    async def publish_then_maybe_die(messages) -> None:
        await publish(messages)
        events = [e for m in messages for e in segmentation_pb2.SegmentEventBatch.FromString(m.payload).events]
        if dies == "after the move's publish" and any(e.reason == "percentile" for e in events):
            await die()
        if dies == "after the build's publish" and any(e.segment_id == "high" for e in events):
            await die()

    engine._publish = publish_then_maybe_die
    if dies == "before the snapshot":
        engine.snapshot = die
    segment = "high" if build == "create" else "top"
    if build == "create":
        await engine.create("high", parse("traits.level > percentile(traits.level, 90)"))
    else:
        await engine.update("top", parse(f"{TOP} and traits.level < 1000"))
    await die.wait()
    building = list(engine._builds.values())
    await first.crash()
    for task in building:
        task.cancel()
    await asyncio.gather(*building, return_exceptions=True)
    clock.advance(30)  # the restart comes later: a build's move at another instant

    second = await world.replica("two", ownership="static", percentile_interval=INTERVAL)
    second.engine.resume_builds()
    await second.engine.wait_live(segment)
    assert second.engine.segments[segment].version == (1 if build == "create" else 2)
    clock.advance(INTERVAL)
    await second.engine.recompute_percentiles()  # the first round after the restart: nothing moved
    await asyncio.sleep(0.3)
    events = await transitions(nats_server.url)
    counts = collections.Counter((e.segment_id, e.person_id, e.entered) for e in events)
    assert counts == {
        **{("top", p, True): 1 for p in ("p18", "p19", "p5", "p6")},
        **{("top", p, False): 1 for p in ("p18", "p19")},
        **({("high", p, True): 1 for p in ("p5", "p6")} if build == "create" else {}),
    }
    assert sorted(second.engine.members["top"]) == ["p5", "p6"]
    assert sorted(second.engine.members.get("high", ["p5", "p6"])) == ["p5", "p6"]


async def crash_while_building(replica: Replica) -> None:
    """The process dies with the builds under way (their tasks end with it)."""
    building = list(replica.engine._builds.values())
    await replica.crash()
    for task in building:
        task.cancel()
    await asyncio.gather(*building, return_exceptions=True)


@pytest.mark.parametrize("build", ["create", "update"])
@pytest.mark.parametrize("dies", ["before the snapshot", "after the snapshot"])
async def test_changes_applied_between_a_build_going_live_and_its_snapshot_are_published_once_across_a_crash(
    world, nats_server, build, dies
):
    """`high` goes live (created as `traits.level > 3`, or updated to it from `> 5`): p4 and p5 enter
    under the build's id. Before its snapshot (or after it, before the build stores the segment live),
    p2 rises to 4 (it enters through that change) and p7 drops to 0 (it exits through it); then the
    process dies. The restart replays those changes with `high` live from where it went live, as it was
    when they were first applied: p2 is not found entering again under the build's id. Each (segment,
    person, direction) is on the stream once."""
    js, clock = world.js, world.clock
    first = await world.replica("one", ownership="static")
    await applied([first], await send_levels(js, {f"p{i}": float(i) for i in range(10)}, T0))
    if build == "update":
        await define(first, "high", "traits.level > 5")
    await first.engine.snapshot()
    die = Dies()
    snapshot = first.engine.snapshot

    async def changes_then_die() -> int:
        if dies == "after the snapshot":
            await snapshot()
        await applied([first], await send_levels(js, {"p2": 4.0, "p7": 0.0}, T0 + 1))
        return await die()  # never returns: the crash below ends the process here

    first.engine.snapshot = changes_then_die
    if build == "create":
        await first.engine.create("high", parse("traits.level > 3"))
    else:
        await first.engine.update("high", parse("traits.level > 3"))
    await die.wait()
    await crash_while_building(first)
    clock.advance(30)

    second = await world.replica("two", ownership="static")
    second.engine.resume_builds()
    await second.engine.wait_live("high")
    assert second.engine.segments["high"].version == (1 if build == "create" else 2)
    await asyncio.sleep(0.3)
    counts = collections.Counter((e.segment_id, e.person_id, e.entered) for e in await transitions(nats_server.url))
    assert counts == {
        **{("high", p, True): 1 for p in ("p2", "p4", "p5", "p6", "p7", "p8", "p9")},
        ("high", "p7", False): 1,
    }
    assert sorted(second.engine.members["high"]) == ["p2", "p4", "p5", "p6", "p8", "p9"]


async def test_hot_standby_replicas_store_each_percentile_transition_once(world, nats_server):
    """Two replicas run the same boundary's round at their own instants (1.3 s apart): the same id."""
    store, js, clock = world.store, world.js, world.clock
    replicas = [
        await Replica(name, store, nats_server.url, replica_clock).start(
            ownership="static", standby=name, percentile_interval=INTERVAL
        )
        for name, replica_clock in (("r0", clock), ("r1", lambda: clock() + 1.3))
    ]
    try:
        await applied(replicas, await send_levels(js, {f"p{i}": float(i) for i in range(20)}, T0))
        for replica in replicas:
            await define(replica, "top", TOP)
        await applied(replicas, await send_levels(js, {"p5": 100.0, "p6": 101.0}, T0 + 1))
        clock.advance(INTERVAL)
        for replica in replicas:
            await replica.engine.recompute_percentiles()
        await asyncio.sleep(0.3)
        events = await transitions(nats_server.url)
        assert percentile_moves(events) == [("p18", False), ("p19", False)]
        assert len({e.id for e in events}) == len(events)
        assert all(sorted(r.engine.members["top"]) == ["p5", "p6"] for r in replicas)
    finally:
        for replica in replicas:
            await replica.stop()


async def test_replicas_that_split_the_partitions_agree_on_one_percentile_over_the_whole_population(world, nats_server):
    """Two replicas, two partitions each, 6,000 persons (more than a summary keeps per partition): both
    compare with the same value, within the stated bound of the exact one over everyone, and their members
    together are exactly the persons at or above it."""
    store, js, clock = world.store, world.js, world.clock
    rng = random.Random(17)
    levels = {f"p{i:05d}": round(rng.lognormvariate(3.0, 1.0), 3) for i in range(6000)}
    by_partition: dict[int, list[profile_pb2.ProfileChanged]] = {}
    for person, level in levels.items():
        by_partition.setdefault(partition_for(person, PARTITIONS), []).append(change(person, T0, level=level))
    assert all(len(changes) > SUMMARY_POINTS for changes in by_partition.values())
    ends = {}
    for p, changes in by_partition.items():
        for start in range(0, len(changes), 500):
            batch = profile_pb2.ProfileChangedBatch(changes=changes[start : start + 500])
            ends[subjects.profiles_changed(p)] = (
                await js.publish(subjects.profiles_changed(p), batch.SerializeToString())
            ).seq
    a, b = [
        await Replica(f"s{i}", store, nats_server.url, clock).start(
            StaticOwnership(partitions=PARTITIONS, ordinal=i, replicas=2), shared=True, percentile_interval=INTERVAL
        )
        for i in range(2)
    ]
    try:
        for replica in (a, b):
            mine = {s: q for s, q in ends.items() if subjects.partition_of(s) in replica.stream.owned()}
            await applied([replica], mine)
        await a.engine.create("top", parse(TOP))
        await b.engine.reload(orjson.dumps({"segment": "top"}).decode())  # what the announcement does
        for replica in (a, b):
            await replica.engine.wait_live("top")
        # a decides the first round before b has written its summaries (a's alone, then); b's are in the next.
        clock.advance(INTERVAL)
        await a.engine.recompute_percentiles()
        await b.engine.recompute_percentiles()
        clock.advance(INTERVAL)
        await b.engine.recompute_percentiles()
        await a.engine.recompute_percentiles()
        value = a.engine.percentiles["traits.level@90"]
        assert b.engine.percentiles["traits.level@90"] == value
        assert a.engine.percentile_round == b.engine.percentile_round
        everyone = np.array(list(levels.values()))
        n = everyone.size
        assert np.percentile(everyone, 90) <= value <= np.percentile(everyone, 90 + 0.1 + 100 * PARTITIONS / (n - 1))
        assert not a.engine.members["top"] & b.engine.members["top"]
        assert a.engine.members["top"] | b.engine.members["top"] == {p for p, level in levels.items() if level >= value}
    finally:
        for replica in (a, b):
            await replica.stop()


def split(i: int) -> StaticOwnership:
    return StaticOwnership(partitions=PARTITIONS, ordinal=i, replicas=2)


async def entries(nats_url: str, segment: str) -> list[str]:
    return sorted(e.person_id for e in await transitions(nats_url) if e.segment_id == segment and e.entered)


async def test_a_replica_adopting_a_segment_another_replica_already_built_holds_its_own_members(world, nats_server):
    """Replicas a and b split the partitions; a creates a segment and its build is done (its persons'
    entries published) before b follows the announcement: b's persons are members on b, each entry is
    on the stream once, and b evaluates the segment in real time from then on."""
    js = world.js
    levels = {f"p{i:02d}": float(i % 3) for i in range(24)}
    ends = await send_levels(js, levels, T0)
    a, b = await world.pair(ends)
    await define(a, "high", "traits.level > 0")
    await b.engine.reload(orjson.dumps({"segment": "high"}).decode())  # the announcement, after a's build
    await b.engine.wait_live("high")
    inside = {p for p, level in levels.items() if level > 0}
    held_by_b = {p for p in inside if partition_for(p, PARTITIONS) in b.stream.owned()}
    assert held_by_b and held_by_b != inside
    assert b.engine.members.get("high", set()) == held_by_b
    page, _more, total = b.engine.list_members("high", after="", limit=100)
    assert [p for p, _since in page] == sorted(held_by_b) and total == len(held_by_b)

    async def published() -> bool:
        return len(await entries(nats_server.url, "high")) >= len(inside)

    await until(published, "every member's entry published")
    await asyncio.sleep(0.3)
    assert await entries(nats_server.url, "high") == sorted(inside)  # once each
    # From now on b evaluates it on every change of its persons.
    leaving = sorted(held_by_b)[0]
    subject = subjects.profiles_changed(partition_for(leaving, PARTITIONS))
    await js.publish(
        subject, profile_pb2.ProfileChangedBatch(changes=[change(leaving, T0 + 1, level=0)]).SerializeToString()
    )

    async def exited() -> bool:
        return any(not e.entered for e in await transitions(nats_server.url))

    await until(exited, "the exit of a person b holds")
    assert leaving not in b.engine.members["high"]


async def test_the_stream_goes_on_between_the_partitions_a_replica_adopts_a_segment_in(world, nats_server):
    """b adopts `high` (built by a) one partition at a time, each at a quiescent point of its own, and the
    pipelines run between two: a change of a person of a partition it has not reached yet is applied and
    its transition published while the adoption is under way. Once done, b's members are its persons
    that match, and each entry is on the stream once."""
    js = world.js
    levels = {f"p{i:02d}": float(i % 3) for i in range(24)}
    ends = await send_levels(js, levels, T0)
    a, b = await world.pair(ends)
    await define(b, "scored", "traits.score > 0")  # b's alone: what flows during the adoption
    await define(a, "high", "traits.level > 0")
    # Held at the quiescent point of its second partition: one is done, the other waits.
    quiet, sections = b.engine._quiet, 0
    between, go = asyncio.Event(), asyncio.Event()

    @contextlib.asynccontextmanager
    async def held_at_the_second():
        nonlocal sections
        sections += 1
        if sections == 3:  # the first is the segment going live here, the second the first partition
            between.set()
            await go.wait()
        async with quiet():
            yield

    b.engine._quiet = held_at_the_second
    adopting = asyncio.create_task(b.engine.reload(orjson.dumps({"segment": "high"}).decode()))
    await asyncio.wait_for(between.wait(), 10)
    waiting = max(b.stream.owned())
    person = sorted(p for p in levels if partition_for(p, PARTITIONS) == waiting)[0]
    batch = profile_pb2.ProfileChangedBatch(changes=[change(person, T0 + 1, score=1.0)])
    await js.publish(subjects.profiles_changed(waiting), batch.SerializeToString())

    async def scored() -> bool:
        return await entries(nats_server.url, "scored") == [person]

    await until(scored, "the entry of a person of a partition not adopted yet")
    assert not adopting.done()
    go.set()
    await adopting
    inside = {p for p, level in levels.items() if level > 0}
    held_by_b = {p for p in inside if partition_for(p, PARTITIONS) in b.stream.owned()}
    assert b.engine.members["high"] == held_by_b

    async def published() -> bool:
        return len(await entries(nats_server.url, "high")) >= len(inside)

    await until(published, "every member's entry published")
    await asyncio.sleep(0.3)
    assert await entries(nats_server.url, "high") == sorted(inside)  # once each


async def test_a_replica_starting_after_another_built_a_segment_holds_its_own_members(world, nats_server):
    """b is down (its partitions snapshotted without the segment) while a creates and builds a segment;
    when b starts again, its persons are members there and each entry is on the stream once."""
    js = world.js
    levels = {f"p{i:02d}": float(i % 3) for i in range(24)}
    ends = await send_levels(js, levels, T0)
    a, b = await world.pair(ends)
    await b.stop()  # snapshotted: its persons, no segment yet
    await define(a, "high", "traits.level > 0")
    await a.engine.snapshot()
    b = await world.replica("b", split(1))
    await b.engine.wait_live("high")
    inside = {p for p, level in levels.items() if level > 0}
    held_by_b = {p for p in inside if partition_for(p, PARTITIONS) in b.stream.owned()}
    assert held_by_b and held_by_b != inside
    assert b.engine.members.get("high", set()) == held_by_b
    assert all("high" in b.engine.membership(p) for p in held_by_b)

    async def published() -> bool:
        return len(await entries(nats_server.url, "high")) >= len(inside)

    await until(published, "every member's entry published")
    await asyncio.sleep(0.3)
    assert await entries(nats_server.url, "high") == sorted(inside)  # once each


async def test_partitions_handed_over_after_a_build_elsewhere_have_their_members(world, nats_server):
    """a builds a segment while b, down, holds the other partitions' snapshot; then a serves every
    partition: b's persons are members on a, a's own are not published again."""
    js = world.js
    levels = {f"p{i:02d}": float(i % 3) for i in range(24)}
    ends = await send_levels(js, levels, T0)
    a, b = await world.pair(ends)
    await b.stop()
    await define(a, "high", "traits.level > 0")
    await a.stop()
    alone = await world.replica("a", StaticOwnership(partitions=PARTITIONS, ordinal=0, replicas=1))
    inside = {p for p, level in levels.items() if level > 0}
    assert alone.engine.members.get("high", set()) == inside

    async def published() -> bool:
        return len(await entries(nats_server.url, "high")) >= len(inside)

    await until(published, "every member's entry published")
    await asyncio.sleep(0.3)
    assert await entries(nats_server.url, "high") == sorted(inside)  # once each


async def test_a_partition_arriving_while_a_segment_is_built_goes_live_with_it(world, nats_server):
    """A partition arrives after the build evaluated the population and before it goes live (its persons,
    loaded from the snapshot, were not in the population): they go live with the others, at once."""
    persons = {f"p{i:02d}": partition_for(f"p{i:02d}", PARTITIONS) for i in range(24)}
    here = sorted(p for p, q in persons.items() if q == 0)
    there = sorted(p for p, q in persons.items() if q == 1)
    assert here and there

    def levels(who: list[str]) -> profile_pb2.ProfileChangedBatch:
        return profile_pb2.ProfileChangedBatch(changes=[change(p, T0, level=1) for p in who])

    async with Bus.connect(nats_server.url, name="segmentation-arrival") as bus:
        before = world.engine(bus, [1])
        await before.start()
        await before.handle([Delivery(levels(there), subjects.profiles_changed(1), 1)])
        await before.stop()  # partition 1's snapshot
        replica = world.engine(bus, [0])
        await replica.start()
        try:
            await replica.handle([Delivery(levels(here), subjects.profiles_changed(0), 1)])
            segment = await replica.create("high", parse("traits.level > 0"))
            async with replica._lifecycle_lock:  # the build waits here to go live

                async def evaluated() -> bool:
                    return segment.total > 0 and segment.done == segment.total

                await until(evaluated, "the population evaluated")
                await replica.arrive(1, nothing_after)
            await replica.wait_live("high")
            assert replica.members["high"] == set(here) | set(there)
            assert all("high" in replica.membership(p) for p in there)
            assert await entries(nats_server.url, "high") == sorted(here + there)
        finally:
            await replica.stop()


DAY = 86_400.0
TRIAL = "traits.starts_at < now and traits.ends_at > now"


def trials(count: int) -> dict[str, tuple[float, float]]:
    """(starts_at, ends_at) per person: even ones are in a trial at T0 that ends at T0 + 1d + i; odd ones
    start theirs at T0 + 1d + i. By T0 + 2d time alone has moved every one of them, once."""
    return {
        f"p{i:02d}": (T0 - DAY, T0 + DAY + i) if i % 2 == 0 else (T0 + DAY + i, T0 + 10 * DAY) for i in range(count)
    }


async def send_trials(js, persons: dict[str, tuple[float, float]]) -> dict[str, int]:
    ends: dict[str, int] = {}
    for person, (starts, ends_at) in persons.items():
        subject = subjects.profiles_changed(partition_for(person, PARTITIONS))
        batch = profile_pb2.ProfileChangedBatch(changes=[change(person, T0, starts_at=starts, ends_at=ends_at)])
        ends[subject] = (await js.publish(subject, batch.SerializeToString())).seq
    return ends


def expected_by_time(persons: dict[str, tuple[float, float]]) -> list[tuple[str, bool, float]]:
    return sorted(
        (p, i % 2 == 1, ends if i % 2 == 0 else starts) for i, (p, (starts, ends)) in enumerate(persons.items())
    )


async def by_time(nats_url: str, count: int) -> list[tuple[str, bool, float]]:
    """The transitions time caused, once `count` of them are on the stream (and nothing more came)."""

    async def arrived() -> bool:
        return len([e for e in await transitions(nats_url) if e.reason == "time"]) >= count

    await until(arrived, "every timer fired")
    await asyncio.sleep(0.3)
    events = [e for e in await transitions(nats_url) if e.reason == "time"]
    return sorted((e.person_id, e.entered, float(e.at.ToSeconds())) for e in events)


async def test_a_replica_adopting_a_time_based_segment_fires_its_persons_timers(world, nats_server):
    """a builds a time-based segment; b adopts it: every person b holds, member or not, flips when time
    alone moves them (b's timer loop), once."""
    js, clock = world.js, world.clock
    persons = trials(24)
    ends = await send_trials(js, persons)
    a, b = await world.pair(ends)
    await define(a, "trial", TRIAL)
    await b.engine.reload(orjson.dumps({"segment": "trial"}).decode())
    await b.engine.wait_live("trial")
    clock.now = T0 + 2 * DAY
    assert await by_time(nats_server.url, len(persons)) == expected_by_time(persons)


async def test_partitions_handed_over_after_a_time_based_build_elsewhere_fire_their_timers(world, nats_server):
    """b is down while a builds a time-based segment; then a serves every partition: b's persons, brought
    to the segment when their partitions arrive, flip when time moves them, and so do a's, once each."""
    js, clock = world.js, world.clock
    persons = trials(24)
    ends = await send_trials(js, persons)
    a, b = await world.pair(ends)
    await b.stop()
    await define(a, "trial", TRIAL)
    await a.stop()
    await world.replica("a", StaticOwnership(partitions=PARTITIONS, ordinal=0, replicas=1))
    clock.now = T0 + 2 * DAY
    assert await by_time(nats_server.url, len(persons)) == expected_by_time(persons)


async def test_persons_of_a_partition_arriving_mid_build_get_the_time_based_segments_timers(world, nats_server):
    """A partition arrives after the build evaluated the population and before it goes live: its persons,
    loaded when no segment read time, flip with the others when time moves them."""
    clock = world.clock
    persons = trials(24)
    here = {p: t for p, t in persons.items() if partition_for(p, PARTITIONS) == 0}
    there = {p: t for p, t in persons.items() if partition_for(p, PARTITIONS) == 1}
    assert len(here) >= 2 and len(there) >= 2

    def batch(who: dict[str, tuple[float, float]]) -> profile_pb2.ProfileChangedBatch:
        return profile_pb2.ProfileChangedBatch(
            changes=[change(p, T0, starts_at=s, ends_at=e) for p, (s, e) in who.items()]
        )

    async with Bus.connect(nats_server.url, name="segmentation-arrival") as bus:
        before = world.engine(bus, [1])
        await before.start()
        await before.handle([Delivery(batch(there), subjects.profiles_changed(1), 1)])
        await before.stop()  # partition 1's snapshot
        replica = world.engine(bus, [0])
        await replica.start()
        try:
            await replica.handle([Delivery(batch(here), subjects.profiles_changed(0), 1)])
            segment = await replica.create("trial", parse(TRIAL))
            async with replica._lifecycle_lock:  # the build waits here to go live

                async def evaluated() -> bool:
                    return segment.total > 0 and segment.done == segment.total

                await until(evaluated, "the population evaluated")
                await replica.arrive(1, nothing_after)
            await replica.wait_live("trial")
            clock.now = T0 + 2 * DAY
            await replica.fire_timers()
            arrived = {**here, **there}
            assert await by_time(nats_server.url, len(arrived)) == sorted(
                t for t in expected_by_time(persons) if t[0] in arrived
            )
        finally:
            await replica.stop()


async def test_timers_of_an_adopted_time_based_segment_come_back_right_after_a_restart(world, nats_server):
    """b adopts a segment a built, over a person b holds who was never evaluated (no segment was live when
    they changed); the timer flips them, b dies before its next snapshot. Started again, b holds them as a
    member and the flip is on the stream once, at its instant."""
    clock = world.clock
    person = next(p for p in (f"p{i:02d}" for i in range(100)) if partition_for(p, PARTITIONS) == 1)

    async with Bus.connect(nats_server.url, name="segmentation-adoption") as bus:
        a, b = world.engine(bus, [0]), world.engine(bus, [1])
        await a.start()
        await b.start()
        try:
            # Out from T0 + 1d (the first comparison stops holding) until T0 + 5d (the second starts to).
            batch = profile_pb2.ProfileChangedBatch(changes=[change(person, T0, a_at=T0, b_at=T0 - 5 * DAY)])
            await b.handle([Delivery(batch, subjects.profiles_changed(1), 1)])
            clock.now = T0 + 2 * DAY
            await a.create("either", parse("traits.a_at > now - 1d or traits.b_at < now - 10d"))
            await a.wait_live("either")
            await b.reload(orjson.dumps({"segment": "either"}).decode())  # adopted (and snapshotted)
            assert b.membership(person) == {}
            clock.now = T0 + 5 * DAY + 5
            await b.fire_timers()
            for task in b._tasks:  # gone before the next snapshot
                task.cancel()
            await asyncio.gather(*b._tasks, return_exceptions=True)
            b._tasks.clear()
            clock.now = T0 + 6 * DAY
            b = world.engine(bus, [1])
            await b.start()
            await b.fire_timers()
            assert await by_time(nats_server.url, 1) == [(person, True, T0 + 5 * DAY)]
            assert set(b.membership(person)) == {"either"}
        finally:
            await a.stop()
            await b.stop()


async def test_changes_applied_between_an_adoption_and_its_snapshot_are_published_once_across_a_crash(
    world, nats_server
):
    """b adopts `high` (built by a). Before its snapshot, a member of b's leaves and a person of b's enters
    through changes of theirs; then b dies. Its restart replays those changes with `high` live from where
    the adoption made it live, and brings each partition to it where the adoption did: nothing b's
    adoption published is published again in another message, and nothing is found twice."""
    js = world.js
    levels = {f"p{i:02d}": float(i % 3) for i in range(24)}
    ends = await send_levels(js, levels, T0)
    a, b = await world.pair(ends)
    await b.engine.snapshot()
    await define(a, "high", "traits.level > 0")
    held_by_b = sorted(p for p in levels if partition_for(p, PARTITIONS) in b.stream.owned())
    leaving = next(p for p in held_by_b if levels[p] > 0)
    entering = next(p for p in held_by_b if levels[p] == 0)
    die = Dies()

    async def changes_then_die() -> int:
        await applied([b], await send_levels(js, {leaving: 0.0, entering: 1.0}, T0 + 1))
        return await die()  # never returns: the crash below ends the process here

    b.engine.snapshot = changes_then_die
    adopting = asyncio.create_task(b.engine.reload(orjson.dumps({"segment": "high"}).decode()))
    await die.wait()
    await crash_while_building(b)
    adopting.cancel()
    await asyncio.gather(adopting, return_exceptions=True)

    restarted = await world.replica("b2", split(1))
    restarted.engine.resume_builds()
    await restarted.engine.wait_live("high")
    await asyncio.sleep(0.3)
    inside = {p for p, level in levels.items() if level > 0}
    counts = collections.Counter((e.segment_id, e.person_id, e.entered) for e in await transitions(nats_server.url))
    assert counts == {**{("high", p, True): 1 for p in inside | {entering}}, ("high", leaving, False): 1}
    assert restarted.engine.members["high"] == {p for p in held_by_b if p in inside | {entering}} - {leaving}


async def test_changes_applied_after_a_partition_arriving_is_brought_to_a_segment_are_published_once_across_a_crash(
    world, nats_server
):
    """b builds `high` while a is down; a's partitions arrive on its restart with a snapshot from before
    the build, so their persons are brought to `high` as they arrive. A member of a's leaves and a person
    of a's enters through changes of theirs, then a dies before any snapshot. The next start replays those
    changes after bringing the persons to `high` where the arrival did: each transition once."""
    js = world.js
    levels = {f"p{i:02d}": float(i % 3) for i in range(24)}
    ends = await send_levels(js, levels, T0)
    a, b = await world.pair(ends)
    await a.engine.snapshot()
    await a.crash()
    await define(b, "high", "traits.level > 0")
    held_by_a = sorted(p for p in levels if partition_for(p, PARTITIONS) not in b.stream.owned())
    leaving = next(p for p in held_by_a if levels[p] > 0)
    entering = next(p for p in held_by_a if levels[p] == 0)

    again = await world.replica("a2", split(0))
    await applied([again], await send_levels(js, {leaving: 0.0, entering: 1.0}, T0 + 1))
    await again.crash()

    last = await world.replica("a3", split(0))
    await asyncio.sleep(0.3)
    inside = {p for p, level in levels.items() if level > 0}
    counts = collections.Counter((e.segment_id, e.person_id, e.entered) for e in await transitions(nats_server.url))
    assert counts == {**{("high", p, True): 1 for p in inside | {entering}}, ("high", leaving, False): 1}
    assert last.engine.members["high"] == {p for p in held_by_a if p in inside | {entering}} - {leaving}


async def test_two_updates_before_one_snapshot_publish_each_difference_once_across_a_crash(world, nats_server):
    """`high` (`> 5`) is updated to `> 3` (p4 and p5 enter) and the snapshot after it fails; p2 rises to 4
    (it enters) and p7 drops to 0 (it exits); then `high` is updated to `> 4` (p2 and p4 exit) and the
    process dies before the snapshot. The restart replays from the snapshot before both updates: the first
    update goes live where it did, with the definition it went live with, then the second. Each update's
    difference is on the stream once, and the members are the second definition's."""
    js, clock = world.js, world.clock
    first = await world.replica("one", ownership="static")
    await applied([first], await send_levels(js, {f"p{i}": float(i) for i in range(10)}, T0))
    await define(first, "high", "traits.level > 5")
    await first.engine.snapshot()
    die = Dies()

    async def fails() -> int:
        return 0  # as a failed snapshot write: logged, nothing recorded, the log entries stay

    first.engine.snapshot = fails
    await first.engine.update("high", parse("traits.level > 3"))
    await first.engine.wait_live("high")
    await applied([first], await send_levels(js, {"p2": 4.0, "p7": 0.0}, T0 + 1))
    first.engine.snapshot = die
    await first.engine.update("high", parse("traits.level > 4"))
    await die.wait()
    await crash_while_building(first)
    clock.advance(30)

    second = await world.replica("two", ownership="static")
    second.engine.resume_builds()
    await second.engine.wait_live("high")
    assert second.engine.segments["high"].version == 3
    await asyncio.sleep(0.3)
    counts = collections.Counter((e.segment_id, e.person_id, e.entered) for e in await transitions(nats_server.url))
    assert counts == {
        **{("high", p, True): 1 for p in ("p2", "p4", "p5", "p6", "p7", "p8", "p9")},
        **{("high", p, False): 1 for p in ("p2", "p4", "p7")},
    }
    assert sorted(second.engine.members["high"]) == ["p5", "p6", "p8", "p9"]


async def test_a_partition_handed_over_replays_the_go_live_its_new_replica_logged_across_a_crash(world, nats_server):
    """a and b split the partitions under leases. b builds `x` and a adopts it: a has logged more go-lives
    than b (its adoption's turns). a leaves, b takes its partitions from a's snapshot, builds `high`, and
    before b's snapshot a member of a's former partitions changes (staying a member), another leaves and
    a third enters; b dies. Its restart replays a's former partitions from a's snapshot: b's go-live of
    `high` is among what follows it, however far a's log went, so each transition is on the stream once."""
    js = world.js
    levels = {f"p{i:02d}": float(i % 3) for i in range(24)}
    ends = await send_levels(js, levels, T0)
    a, b = await world.pair(ends, leases=True)
    await define(b, "x", "traits.level > 1")
    await a.engine.reload(orjson.dumps({"segment": "x"}).decode())  # a adopts it: three log entries
    await a.engine.wait_live("x")

    async def a_serves_every_level() -> bool:
        # Its half, as the split left it: on a loaded machine a lease renewal can come late, a release
        # all and take the partitions again (a CI run found a serving none here).
        return {levels[p] for p in levels if partition_for(p, PARTITIONS) in a.stream.owned()} == {0.0, 1.0, 2.0}

    await until(a_serves_every_level, "a serves persons of every level")
    from_a = sorted(p for p in levels if partition_for(p, PARTITIONS) in a.stream.owned())
    await a.stop()

    async def b_serves_all() -> bool:
        return b.stream.owned() == set(range(PARTITIONS))

    await until(b_serves_all, "b serves every partition")
    staying = next(p for p in from_a if levels[p] == 2)
    leaving = next(p for p in from_a if levels[p] == 1)
    entering = next(p for p in from_a if levels[p] == 0)
    die = Dies()

    async def changes_then_die() -> int:
        await applied([b], await send_levels(js, {staying: 1.0, leaving: 0.0, entering: 1.0}, T0 + 1))
        return await die()  # never returns: the crash below ends the process here

    b.engine.snapshot = changes_then_die
    await b.engine.create("high", parse("traits.level > 0"))
    await die.wait()
    await crash_while_building(b)

    again = await world.replica("b2", StaticOwnership(partitions=PARTITIONS, ordinal=0, replicas=1))
    again.engine.resume_builds()
    await again.engine.wait_live("high")
    await asyncio.sleep(0.3)
    inside = {p for p, level in levels.items() if level > 0}
    counts = collections.Counter(
        (e.person_id, e.entered) for e in await transitions(nats_server.url) if e.segment_id == "high"
    )
    assert counts == {**{(p, True): 1 for p in inside | {entering}}, (leaving, False): 1}
    assert again.engine.members["high"] == inside - {leaving} | {entering}


@pytest.mark.parametrize("crash", [False, True])
async def test_a_partition_a_lease_moves_in_while_a_build_goes_live_goes_live_with_it(world, nats_server, crash):
    """a and b split the partitions under leases; b builds `high`, and as it goes live (its go-live logged,
    nothing published yet) a leaves and its partitions arrive at b. Their persons go live with the build:
    members on b, each entry on the stream once. With a crash: after the arrivals a member of a's former
    partitions changes (staying a member), another leaves and a third enters, and b dies before its
    snapshot; its restart publishes nothing twice."""
    js = world.js
    levels = {f"p{i:02d}": float(i % 3) for i in range(24)}
    ends = await send_levels(js, levels, T0)
    a, b = await world.pair(ends, leases=True)
    from_a = sorted(p for p in levels if partition_for(p, PARTITIONS) in a.stream.owned())
    engine, log_live, arrive = b.engine, b.engine.log_live, b.engine.arrive
    arriving, handing = asyncio.Event(), []

    async def arrive_noted(partition, history):
        arriving.set()
        return await arrive(partition, history)

    async def log_live_then_hand_over(live, partitions) -> None:
        await log_live(live, partitions)
        if live["segment"] == "high" and live["golive"] and not handing:
            handing.append(asyncio.create_task(a.stop()))
            await asyncio.wait_for(arriving.wait(), 20)
            await asyncio.sleep(0.3)  # as far as the arrival goes while the build goes live

    engine.arrive, engine.log_live = arrive_noted, log_live_then_hand_over
    staying = next(p for p in from_a if levels[p] == 2)
    leaving = next(p for p in from_a if levels[p] == 1)
    entering = next(p for p in from_a if levels[p] == 0)
    die = Dies()
    snapshot = engine.snapshot

    async def served_then_maybe_die() -> int:
        engine.snapshot = snapshot  # the build's only

        async def b_serves_all() -> bool:
            return b.stream.owned() == set(range(PARTITIONS))

        await until(b_serves_all, "b serves every partition")
        if not crash:
            return await snapshot()
        await applied([b], await send_levels(js, {staying: 1.0, leaving: 0.0, entering: 1.0}, T0 + 1))
        return await die()  # never returns: the crash below ends the process here

    engine.snapshot = served_then_maybe_die
    await engine.create("high", parse("traits.level > 0"))
    inside = {p for p, level in levels.items() if level > 0}
    if crash:
        await die.wait()
        await crash_while_building(b)
        b = await world.replica("b2", StaticOwnership(partitions=PARTITIONS, ordinal=0, replicas=1))
        b.engine.resume_builds()
        inside = inside - {leaving} | {entering}
    await b.engine.wait_live("high")
    await asyncio.gather(*handing)
    await asyncio.sleep(0.3)
    counts = collections.Counter(
        (e.person_id, e.entered) for e in await transitions(nats_server.url) if e.segment_id == "high"
    )
    entered = {p for p, level in levels.items() if level > 0} | ({entering} if crash else set())
    assert counts == {**{(p, True): 1 for p in entered}, **({(leaving, False): 1} if crash else {})}

    # Under leases of 1.2 s a member that misses its renewal by half of that lets every partition go and takes
    # them again (a CI run under load: "ownership leases not renewed in time: releasing all", then b's members
    # read empty). What b holds is read once it serves every partition again; the stream above already showed
    # each entry published once.
    async def serves_all_with_its_members() -> bool:
        return b.stream.owned() == set(range(PARTITIONS)) and b.engine.members["high"] == inside

    with contextlib.suppress(AssertionError):
        await until(serves_all_with_its_members, "b serves every partition with the segment's members")
    assert b.engine.members["high"] == inside


async def test_calls_are_answered_while_a_large_build_goes_live_and_a_batch_waits_for_its_end(
    world, nats_server, monkeypatch
):
    """A build's go-live handles the persons a slice at a time (the population's size: its whole
    difference used to be made on the event loop in one stretch, and every call and the stream waited).
    A call made once the go-live is logged is answered before the go-live publishes anything; a change
    sent meanwhile is applied after the go-live, its transition after every one of the build's. The
    build's transitions are exactly the difference, once each, exits then entries in person order."""
    from cdp_segmentation import builds

    monkeypatch.setattr(builds, "GOLIVE_SLICE", 4)  # this population is many slices
    js = world.js
    one = await world.replica("one", ownership="static")
    levels = {f"p{i:02d}": float(i % 3) for i in range(60)}
    await applied([one], await send_levels(js, levels, T0))
    await define(one, "high", "traits.level > 1")  # p02, p05...: they leave as `high` is updated
    await one.engine.snapshot()
    engine = one.engine
    log_live, publish = engine.log_live, engine._publish_durably
    answered = asyncio.Event()
    seen: list[bool] = []
    calls: list[asyncio.Task] = []

    async def call() -> None:
        engine.membership("p01")
        engine.list_members("high", after="", limit=10)
        answered.set()

    async def log_live_then_call(live, partitions) -> None:
        await log_live(live, partitions)
        if live["segment"] == "high" and live["golive"] and live["version"] == 2:
            # p01 enters through the build; this change, sent as it goes live, makes it leave again.
            await send_levels(js, {"p01": 0.0}, T0 + 1)
            calls.append(asyncio.create_task(call()))

    async def publish_noted(messages) -> None:
        if any(b"high" in m.payload and b"updated" in m.payload for m in messages):
            seen.append(answered.is_set())
        await publish(messages)

    engine.log_live, engine._publish_durably = log_live_then_call, publish_noted
    await engine.update("high", parse("traits.level > 0"))
    await engine.wait_live("high")
    await asyncio.gather(*calls)
    assert seen and seen[0], "the call waited for the go-live to publish"

    async def change_published() -> bool:
        return any(e.reason == "event" for e in await transitions(nats_server.url))

    await until(change_published, "the change sent during the go-live published")
    await asyncio.sleep(0.3)  # nothing more comes
    events = await transitions(nats_server.url)
    built = [e for e in events if e.reason == "updated"]
    assert len({e.id for e in built}) == len(built)
    for partition in range(PARTITIONS):
        mine = [(e.entered, e.person_id) for e in built if partition_for(e.person_id, PARTITIONS) == partition]
        assert mine == sorted(mine), partition  # exits then entries, each in person order
    assert sorted((e.person_id, e.entered) for e in built) == sorted(
        (p, True) for p, level in levels.items() if level == 1
    )
    change = [n for n, e in enumerate(events) if e.reason == "event"]
    assert [(events[n].person_id, events[n].entered) for n in change] == [("p01", False)]
    assert change[0] > max(n for n, e in enumerate(events) if e.reason == "updated")
    assert sorted(engine.members["high"]) == sorted(p for p, level in levels.items() if level > 0 and p != "p01")


async def test_a_go_live_cut_short_between_two_partitions_publishes_each_transition_once_after_a_restart(
    world, nats_server
):
    """The go-live publishes a partition's transitions at a time; the process dies after the first one's:
    the restart publishes the others', and nothing twice."""
    js, clock = world.js, world.clock
    first = await world.replica("one", ownership="static")
    levels = {f"p{i:02d}": float(i % 3) for i in range(40)}
    await applied([first], await send_levels(js, levels, T0))
    await first.engine.snapshot()
    die, publish, published = Dies(), first.engine._publish_durably, []

    async def publish_then_die(messages) -> None:
        await publish(messages)
        published.append(len(messages))
        if len(published) == 1:
            await die()  # never returns: the crash below ends the process here

    first.engine._publish_durably = publish_then_die
    await first.engine.create("high", parse("traits.level > 0"))
    await die.wait()
    partial = await transitions(nats_server.url)
    await crash_while_building(first)
    clock.advance(30)

    second = await world.replica("two", ownership="static")
    second.engine.resume_builds()
    await second.engine.wait_live("high")
    await asyncio.sleep(0.3)
    inside = {p for p, level in levels.items() if level > 0}
    assert 0 < len(partial) < len(inside)
    counts = collections.Counter((e.segment_id, e.person_id, e.entered) for e in await transitions(nats_server.url))
    assert counts == {("high", p, True): 1 for p in inside}
    assert second.engine.members["high"] == inside


async def test_a_release_cut_mid_drain_gives_the_partition_up_all_the_same(world, nats_server):
    """The ownership cuts a release its lease no longer covers (`cdp_kit.ownership.leased`): cancelled while
    its commit is in flight, the replica still leaves the partition (before, it kept it in `owned`, its
    persons held and its timers armed, after the new owner had it)."""
    replica = await world.replica("one", ownership="static")
    await define(replica, "high", "traits.level > 0")
    person = "p1"
    p = partition_for(person, PARTITIONS)
    store = world.store
    gate, bulk_write = asyncio.Event(), store.bulk_write

    async def held(ops):
        await gate.wait()  # a store answering late
        return await bulk_write(ops)

    store.bulk_write = held
    try:
        batch = profile_pb2.ProfileChangedBatch(changes=[change(person, T0 + 1, level=1)])
        await world.js.publish(subjects.profiles_changed(p), batch.SerializeToString())

        async def in_flight() -> bool:
            return replica.stream.pipelines[p]._in_flight >= 1

        await until(in_flight, "the change applied, its commit in flight")
        releasing = asyncio.create_task(replica.stream.stop_partition(p))
        await asyncio.sleep(0.1)
        assert not releasing.done()  # draining
        releasing.cancel()  # the cut
        await asyncio.gather(releasing, return_exceptions=True)
        assert p not in replica.engine.owned
        assert p not in replica.stream.pipelines
    finally:
        store.bulk_write = bulk_write
        gate.set()
