"""A partition's task ends when cancelled, even when a store or bus client loses the cancellation.

nats-py waits for every reply with `asyncio.wait_for`, which on Python 3.11 returns the reply when it lands
in the loop turn of the cancellation (`cdp_kit.stopping`); a client that then fails (the store is down, the
bus refuses) raises an ordinary error where the cancellation should have been. The pipeline's retry loops
(start over after a failure, bind its consumer again, publish again) went on for as long as the outage lasted, and so did
whatever waited for the task: a crash test's abort, a service's stop past its grace, an event loop's
teardown (which cancels each task once). Each test bounds its wait.
"""

from __future__ import annotations

import asyncio

from engine_toy import CHECKPOINTS, OUT_PREFIX, CheckedStore, engine, publish_inputs
from test_pipeline import keys_in

from cdp_kit.bus import OutMessage
from cdp_kit.bus.consumer import ConsumerRunner
from cdp_kit.engine import outbox
from cdp_kit.errors import Unavailable

BOUND = 5.0  # a guard against waiting for ever, not a speed figure


class LostReply:
    """A request whose reply comes in the loop turn the task is cancelled; the client fails after it."""

    def __init__(self) -> None:
        self.reply = asyncio.get_running_loop().create_future()
        self.asked = asyncio.Event()

    async def ask(self) -> None:
        if not self.asked.is_set():
            self.asked.set()
            await asyncio.wait_for(self.reply, 10)  # the shape of nats-py's request
        raise Unavailable("down")

    async def cancel_with_the_reply(self, task: asyncio.Task) -> bool:
        await asyncio.wait_for(self.asked.wait(), BOUND)
        self.reply.set_result(None)  # the reply and the stop in one loop turn
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=BOUND)
        return bool(done) and task.cancelled()


class CheckpointsDown(CheckedStore):
    """The checkpoints cannot be read: the partition's start fails, and is started over."""

    def __init__(self) -> None:
        super().__init__({})
        self.lost = LostReply()

    async def _get(self, collection, key):
        if collection == CHECKPOINTS:
            await self.lost.ask()
        return await super()._get(collection, key)


async def test_a_partition_starting_over_after_a_lost_cancellation_ends(bus):
    store = CheckpointsDown()
    eng, _ = engine(bus, store, 1)
    await eng.start()
    try:
        assert await store.lost.cancel_with_the_reply(eng.pipelines[0].task), "the partition started over"
    finally:
        eng.abort()


async def test_a_partition_binding_its_consumer_after_a_lost_cancellation_ends(bus, monkeypatch):
    lost = LostReply()
    provision = ConsumerRunner.provision

    async def provision_then_refused(self, **kwargs):
        await provision(self, **kwargs)
        await lost.ask()  # the bind's next request: its reply comes with the stop, then a refusal

    monkeypatch.setattr(ConsumerRunner, "provision", provision_then_refused)
    eng, _ = engine(bus, CheckedStore({}), 1)
    await eng.start()
    try:
        assert await lost.cancel_with_the_reply(eng.pipelines[0].task), "the partition bound its consumer again"
    finally:
        eng.abort()


async def test_a_partition_publishing_its_outbox_at_start_after_a_lost_cancellation_ends(bus, monkeypatch):
    store = CheckedStore({})
    message = OutMessage(f"{OUT_PREFIX}.0", b"k", "out-left")
    await store.bulk_write([outbox.put_record(outbox.outbox_collection("toy"), 0, 1, [message])])  # a predecessor's
    lost = LostReply()
    monkeypatch.setattr(bus.publisher, "publish_batch", lambda messages, **_: lost.ask())  # the bus refuses
    eng, _ = engine(bus, store, 1)
    await eng.start()
    try:
        assert await lost.cancel_with_the_reply(eng.pipelines[0].task), "the partition went on publishing"
        assert await store.count(outbox.outbox_collection("toy")) == 1  # kept for whoever publishes next
    finally:
        eng.abort()


async def test_a_settler_publishing_a_batch_after_a_lost_cancellation_ends(bus, monkeypatch):
    await publish_inputs(bus, keys_in(0, 1, 1), 1, {})
    lost = LostReply()
    monkeypatch.setattr(bus.publisher, "publish_batch", lambda messages, **_: lost.ask())  # the bus refuses
    store = CheckedStore({})
    eng, _ = engine(bus, store, 1)
    await eng.start()
    try:
        await asyncio.wait_for(lost.asked.wait(), BOUND)  # the batch committed; its publish is asked
        settler = next(t for t in asyncio.all_tasks() if t.get_name() == "settle toy-p0")
        # The crash of `abort` cancels the pipeline, which cancels its settler once: that one is lost here.
        assert await lost.cancel_with_the_reply(settler), "the settler went on publishing"
        assert await store.count(outbox.outbox_collection("toy")) == 1  # the batch's messages stay
    finally:
        eng.abort()


class SnapshotsDown:
    """The toy, snapshotting into a store that is down."""

    def __init__(self, toy) -> None:
        self.toy = toy
        self.lost = LostReply()

    def decode(self, delivery):
        return self.toy.decode(delivery)

    async def apply(self, partition, items):
        return await self.toy.apply(partition, items)

    async def recover(self, partition):
        await self.toy.recover(partition)

    async def snapshot(self, positions):
        await self.lost.ask()


async def test_an_engine_whose_snapshot_lost_the_stop_releases_and_ends(bus):
    eng, toy = engine(bus, CheckedStore({}), 1, snapshot_every=0.05)
    eng.logic = logic = SnapshotsDown(toy)
    serving = asyncio.create_task(eng.run())
    try:
        assert await logic.lost.cancel_with_the_reply(serving), "the engine went on snapshotting"
        assert not eng.pipelines  # released on the way out, as a stop does
    finally:
        eng.abort()
