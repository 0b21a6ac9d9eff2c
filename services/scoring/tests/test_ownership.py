"""Partitions move between scoring replicas under traffic (leases in a NATS KV bucket, one shared store),
and every profile change is still scored exactly once, on the fields the person had right after it.

Replica A starts alone and owns every partition; replica B joins while changes keep coming, and the
leases move half the partitions to it: A drains each, snapshots, and forgets its fields; B restores
them from that snapshot plus the stream before it fetches. A change scored on fields that missed an
earlier change (a restore that lost something), one scored twice (a replay that scored, or a partition
worked on by both), or one never scored (a hand-over that dropped a batch) fails the test.

Batches of one message, one change each: nothing is folded, so "once" is exact."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict

import pytest
from nats.js.errors import NotFoundError

from cdp.profile.v1 import profile_pb2
from cdp.scoring.v1 import scoring_pb2
from cdp_kit.bus import Bus, partition_for, profiles_stream, scores_stream, subjects
from cdp_kit.ownership.assignment import owned_by
from cdp_kit.ownership.nats_kv import nats_kv_ownership
from cdp_kit.storage import open_store
from cdp_scoring.engine import ScoringEngine
from cdp_scoring.modelstore import FolderModelStore
from cdp_scoring.stream import scoring_stream
from cdp_testing.fakes import Clock
from cdp_testing.onnx_models import expected, logistic_model

PARTITIONS = 4
PERSONS = [f"p_{i:03d}" for i in range(24)]
W = [0.05, -0.03]
T0_MS = 1_790_000_000_000


class Replica:
    def __init__(self, name: str, store, nats_url: str, tmp_path) -> None:
        self.name = name
        self.store = store
        self.nats_url = nats_url
        self.tmp_path = tmp_path

    async def start(self) -> Replica:
        self._bus_cm = Bus.connect(self.nats_url, name=self.name)
        self.bus = await self._bus_cm.__aenter__()
        self.engine = ScoringEngine(
            self.store,
            FolderModelStore(self.tmp_path / "models"),  # a volume both replicas mount
            self.bus.publisher,
            partitions=PARTITIONS,
            telemetry=self.bus.telemetry,
            clock=Clock(T0_MS / 1000),
        )
        await self.engine.start()
        self.stream = scoring_stream(
            self.engine, self.bus, partitions=PARTITIONS, batch_size=1, ack_wait=30, snapshot_every=0.5
        )
        self._count_scored()
        ownership = await nats_kv_ownership(
            self.bus.js, group="scoring", partitions=PARTITIONS, identity=self.name, ttl=1.0
        )
        self.ownership = await self.stream.start(ownership)
        self.serving = asyncio.create_task(self.stream.serve(self.ownership))
        return self

    def _count_scored(self) -> None:
        """`scored`: per partition, the (person, change time) of every change this replica's pipelines
        scored. A record that stays when the partition leaves, unlike `ownership.owned()`, which a fence
        empties (a lease round that misses its fence drops every partition of its replica)."""
        self.scored: defaultdict[int, set[tuple[str, int]]] = defaultdict(set)
        logic = self.stream.logic
        apply = logic.apply

        async def counted(partition: int, items: list[profile_pb2.ProfileChangedBatch]):
            effects = await apply(partition, items)
            if effects.messages:
                changes = (change for batch in items for change in batch.changes)
                self.scored[partition].update((c.person_id, c.at.ToMilliseconds()) for c in changes)
            return effects

        logic.apply = counted

    async def stop(self) -> None:
        self.serving.cancel()  # releases every partition: drained, snapshotted, lease freed
        await asyncio.gather(self.serving, return_exceptions=True)
        await self.engine.stop()
        await self._bus_cm.__aexit__(None, None, None)


def orders_change(person: str, at_ms: int, orders: float) -> bytes:
    change = profile_pb2.ProfileChanged(person_id=person, cause="event")
    change.at.FromMilliseconds(at_ms)
    change.computed["orders_90d"].number_value = orders
    return profile_pb2.ProfileChangedBatch(changes=[change]).SerializeToString()


def sessions_change(person: str, at_ms: int, sessions: float) -> bytes:
    change = profile_pb2.ProfileChanged(person_id=person, cause="event")
    change.at.FromMilliseconds(at_ms)
    change.computed["sessions_30d"].number_value = sessions
    return profile_pb2.ProfileChangedBatch(changes=[change]).SerializeToString()


async def until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not (await condition() if asyncio.iscoroutinefunction(condition) else condition()):
        assert time.monotonic() < deadline, f"{what} within {timeout}s"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
async def test_a_partition_moving_under_traffic_keeps_every_change_scored_once(nats_server, tmp_path):
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="traffic") as bus:
        await bus.ensure_streams(profiles_stream(), scores_stream())
        a = await Replica("scoring-a", store, nats_server.url, tmp_path).start()
        b = None
        try:
            await a.engine.deploy(logistic_model(weights=W), role=None)
            await until(lambda: len(a.ownership.owned()) == PARTITIONS, "replica A owns every partition")

            # What each change must be scored as: the model on the person's fields right after it.
            want: dict[tuple[str, int], float] = {}
            fields: dict[str, list[float]] = {p: [0.0, 0.0] for p in PERSONS}
            last_seq: dict[int, int] = {}
            at_ms = T0_MS

            async def publish(person: str, data: bytes) -> None:
                p = partition_for(person, PARTITIONS)
                last_seq[p] = (await bus.js.publish(subjects.profiles_changed(p), data)).seq

            for i, person in enumerate(PERSONS):  # every person's sessions first
                at_ms += 1
                fields[person][1] = float(i + 1)
                want[(person, at_ms)] = expected(W, fields[person])
                await publish(person, sessions_change(person, at_ms, float(i + 1)))

            moved, took_over = asyncio.Event(), asyncio.Event()

            async def traffic() -> None:
                nonlocal at_ms
                k, k_moved = 0, None
                # Changes keep coming before, during and well after the hand-over: until B has taken its
                # partitions over, and 150 more after the hand-over at least.
                while k_moved is None or k < k_moved + 150 or not took_over.is_set():
                    if k_moved is None and moved.is_set():
                        k_moved = k
                    person = PERSONS[k % len(PERSONS)]
                    at_ms += 1
                    k += 1
                    # Orders and sessions in turn: each score depends on the person's previous change.
                    which = (k // len(PERSONS)) % 2
                    # Never the value the person had (so every change moves an input), and small enough
                    # that the score tells the fields apart.
                    value = k % 97 + 0.5
                    fields[person][which] = value
                    want[(person, at_ms)] = expected(W, fields[person])
                    change = orders_change if which == 0 else sessions_change
                    await publish(person, change(person, at_ms, value))
                    await asyncio.sleep(0.004)

            sending = asyncio.create_task(traffic())
            await asyncio.sleep(0.3)
            scored_before_move = len(await scores(bus))
            b = await Replica("scoring-b", store, nats_server.url, tmp_path).start()
            await until(lambda: bool(b.ownership.owned()), "replica B takes partitions")
            # The partitions the leases move to B: the assignment over both replicas.
            taken = owned_by(PARTITIONS, {a.name, b.name}, b.name)
            moved_at_ms = at_ms
            moved.set()

            # B takes its partitions over: its pipelines score changes of each made after the hand-over. Counted
            # as they score them, while the traffic goes on, not read from B's `owned()` at the end: under load a
            # lease round that misses its fence (TTL / 2 after the last renewal began, 0.5 s here) drops every
            # partition of its replica until its next round takes them back, and the end may fall between the two.
            def b_took_over() -> bool:
                return all(any(at > moved_at_ms for _, at in b.scored[p]) for p in taken)

            try:
                await until(b_took_over, "B scored changes of every partition it took over, made after the hand-over")
            finally:
                took_over.set()
                await sending

            async def drained() -> bool:
                for p, seq in last_seq.items():
                    try:
                        info = await bus.js.consumer_info(subjects.PROFILES, subjects.partition_durable("scoring", p))
                    except NotFoundError:
                        return False  # a pipeline restarting its consumer at its floor deletes it, then adds it
                    if info.ack_floor.stream_seq < seq or info.num_ack_pending:
                        return False
                return True

            await until(drained, "every change acknowledged")
            # Acknowledged is not published: a partition's pipeline acknowledges a batch, then publishes its
            # scores (one socket write, but JetStream takes the acknowledgement and the message on separate
            # queues), and a score left in the outbox by a replica letting go is published by the next owner.
            # So the scores are read once every change's has arrived; a lost one still fails below, after 30 s.
            deadline = time.monotonic() + 30
            while not set(want) <= {(person, at) for person, at, _ in await scores(bus)}:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)

            published = await scores(bus)
            counts = Counter((person, at) for person, at, _ in published)
            assert scored_before_move > 0, "nothing was scored before the hand-over"
            twice = [key for key, n in counts.items() if n > 1]
            assert not twice, f"{len(twice)} changes scored more than once, e.g. {twice[:5]}"
            lost = [key for key in want if key not in counts]
            assert not lost, f"{len(lost)} of {len(want)} changes never scored, e.g. {lost[:5]}"
            wrong = [(p, at, v, want[(p, at)]) for p, at, v in published if abs(v - want[(p, at)]) > 1e-6]
            assert not wrong, f"{len(wrong)} scores on the wrong fields, e.g. {wrong[:5]}"
            # Each person's scores in the order of their changes, across the hand-over.
            for person in PERSONS:
                times = [at for who, at, _ in published if who == person]
                assert times == sorted(times), f"{person}'s scores out of order"
        finally:
            if b is not None:
                await b.stop()
            await a.stop()


async def scores(bus: Bus) -> list[tuple[str, int, float]]:
    """Every (person, change time, churn_risk) on scores.updated, in stream order."""
    info = await bus.js.stream_info(subjects.SCORES)
    out = []
    if not info.state.messages:
        return out
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        message = scoring_pb2.ScoresUpdatedBatch.FromString((await bus.js.get_msg(subjects.SCORES, seq)).data)
        for batch in (message, *message.more):
            out.extend(zip(batch.person_ids, batch.at_ms, batch.values, strict=True))
    return out


@contextlib.asynccontextmanager
async def static_replica(nats_server, tmp_path):
    """One scoring replica on a memory store with every partition its own (no leases): (bus, engine,
    stream), the stream not started; closed, and the engine stopped, on the way out."""
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="cut") as bus:
        await bus.ensure_streams(profiles_stream(), scores_stream())
        engine = ScoringEngine(
            store,
            FolderModelStore(tmp_path / "models"),
            bus.publisher,
            partitions=PARTITIONS,
            telemetry=bus.telemetry,
            clock=Clock(T0_MS / 1000),
        )
        await engine.start()
        stream = scoring_stream(engine, bus, partitions=PARTITIONS, batch_size=1, ack_wait=30, snapshot_every=60)
        try:
            yield bus, engine, stream
        finally:
            await stream.close()
            await engine.stop()


async def test_a_release_cut_while_a_snapshot_holds_the_lock_gives_the_partition_up_all_the_same(nats_server, tmp_path):
    """The ownership cuts a release its lease no longer covers (`cdp_kit.ownership.leased`). Cut while a
    snapshot held the logic's lock, the release never told the engine: the pipeline worked on after the
    lease was gone, and the partition, back here, was taken for running (held, and idle once fenced).
    Now the pipeline stops and the partition's fields are forgotten; it starts again when it comes back."""
    async with static_replica(nats_server, tmp_path) as (_, engine, stream):
        await stream.start()  # every partition, static
        await stream.wait_ready()
        await until(lambda: 0 in engine.ready, "partition 0 restored")
        async with stream._released:  # a snapshot copying the fields
            releasing = asyncio.create_task(stream.stop_partition(0))
            await asyncio.sleep(0.05)
            assert not releasing.done()
            releasing.cancel()  # the cut
            await asyncio.sleep(0)
        await asyncio.gather(releasing, return_exceptions=True)
        assert releasing.cancelled()
        assert 0 not in stream.pipelines and 0 not in engine.ready
        await stream.start_partition(0)  # it comes back
        await stream.wait_ready()
        await until(lambda: 0 in engine.ready, "partition 0 restored again")
        assert stream.pipelines[0].task is not None and not stream.pipelines[0].task.done()


async def test_a_release_cut_before_its_drain_began_scores_nothing_on_the_fields_it_forgot(nats_server, tmp_path):
    """Cut while it waited for the logic's lock, a release forgot the partition's fields at once and left its
    pipeline, told to stop, to drain alone: the batch it had in flight was scored on fields no longer held (the
    person on no inputs: 0.5 here), committed and published, and the partition, back here, restored past it.
    Seen under load in the hand-over test. Now the pipeline's task is cancelled at the cut (nothing more of it
    scored, committed or published), and the change is scored on the person's fields when the partition comes
    back (the engine aborts the pipeline then, and recovers the partition)."""
    async with static_replica(nats_server, tmp_path) as (bus, engine, stream):
        person = next(p for p in PERSONS if partition_for(p, PARTITIONS) == 0)
        score_round, in_flight, go_on = engine.score_round, asyncio.Event(), asyncio.Event()

        async def held_back(partition, touched, changed_at):
            in_flight.set()
            await go_on.wait()
            return await score_round(partition, touched, changed_at)

        await engine.deploy(logistic_model(weights=W), role=None)
        await stream.start()  # every partition, static
        await stream.wait_ready()
        await until(lambda: 0 in engine.ready, "partition 0 restored")
        await bus.js.publish(subjects.profiles_changed(0), sessions_change(person, T0_MS + 1, 2.0))
        await until(_scored(bus, 1), "the first change scored")
        engine.score_round = held_back
        await bus.js.publish(subjects.profiles_changed(0), orders_change(person, T0_MS + 2, 3.0))
        await until(in_flight.is_set, "the second change being scored")
        pipeline = stream.pipelines[0]
        async with stream._released:  # a snapshot copying the fields
            releasing = asyncio.create_task(stream.stop_partition(0))
            await asyncio.sleep(0.05)
            assert not releasing.done()
            releasing.cancel()  # the cut
            await asyncio.gather(releasing, return_exceptions=True)
        assert 0 not in engine.ready  # its fields forgotten
        engine.score_round = score_round
        go_on.set()
        await asyncio.wait({pipeline.task})  # cancelled, or (before) drained alone: scored, committed, published
        await stream.start_partition(0)  # it comes back
        await until(_scored(bus, 2), "the second change scored")
        published = await scores(bus)
        assert [(p, at) for p, at, _ in published] == [(person, T0_MS + 1), (person, T0_MS + 2)]
        want = [expected(W, [0.0, 2.0]), expected(W, [3.0, 2.0])]  # the second on the fields the first left
        assert all(abs(v - w) < 1e-6 for (_, _, v), w in zip(published, want, strict=True)), published


def _scored(bus: Bus, n: int):
    async def condition() -> bool:
        return len(await scores(bus)) >= n

    return condition
