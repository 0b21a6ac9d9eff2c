"""Quiescent points shared by several holders, and a snapshot loop that survives a failed snapshot."""

import asyncio

from engine_toy import CheckedStore, engine, publish_inputs
from test_pipeline import all_applied, keys_in, run, stop

from cdp_kit.errors import Unavailable


async def test_a_pipeline_stays_held_until_every_quiescent_holder_has_left(bus):
    # Two holders at once (a snapshot and a timer round, say): the first one leaving must not let
    # the pipelines apply while the second still relies on nothing moving.
    positions = {}
    store = CheckedStore(positions)
    eng, _ = engine(bus, store, 1)
    task = await run(eng)
    second_inside = asyncio.Event()
    release_second = asyncio.Event()

    async def second():
        async with eng.quiescent():
            second_inside.set()
            await release_second.wait()

    async with eng.quiescent():
        holder = asyncio.create_task(second())
        await asyncio.sleep(0.05)
    await asyncio.wait_for(second_inside.wait(), 5)
    ids = await publish_inputs(bus, keys_in(0, 1, 8), 1, positions)
    await asyncio.sleep(0.5)
    assert not await all_applied(store, ids), "a batch was applied while a holder was still inside"
    release_second.set()
    await holder
    deadline = asyncio.get_running_loop().time() + 10
    while not await all_applied(store, ids):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    await stop(task)


class FailingSnapshots:
    def __init__(self, logic) -> None:
        self.logic = logic
        self.calls = 0

    def decode(self, delivery):
        return self.logic.decode(delivery)

    async def apply(self, partition, items):
        return await self.logic.apply(partition, items)

    async def recover(self, partition):
        await self.logic.recover(partition)

    async def snapshot(self, positions):
        self.calls += 1
        if self.calls == 1:
            raise Unavailable("store down")


async def test_a_failed_snapshot_is_retried_at_the_next_interval_and_the_engine_keeps_going(bus):
    positions = {}
    store = CheckedStore(positions)
    eng, toy = engine(bus, store, 1, snapshot_every=0.05)
    logic = FailingSnapshots(toy)
    eng.logic = logic
    task = await run(eng)
    deadline = asyncio.get_running_loop().time() + 10
    while logic.calls < 3:
        assert not task.done(), "the engine stopped on a failed snapshot"
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    ids = await publish_inputs(bus, keys_in(0, 1, 8), 1, positions)
    while not await all_applied(store, ids):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    await stop(task)
