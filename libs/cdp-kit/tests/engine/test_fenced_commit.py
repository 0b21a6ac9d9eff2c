"""A partition's commits are fenced: once another owner has taken the partition, a commit of the old
owner's cannot land.

The lease protocol stops a member from *starting* work after its lease is lost, but a process stalled
(a long pause, a frozen VM, a store that answers late) wakes with commits already on their way to the
store: without a fence they land after the new owner has read the store and worked on, undoing its
writes. Each owner claims the partition's checkpoint record when it starts (its token in the record),
and every commit writes the checkpoint only at the version it last wrote: a commit of an owner whose
claim was overtaken fails whole, and that owner stops working on the partition.
"""

from __future__ import annotations

import asyncio

from engine_toy import CHECKPOINTS, COUNTERS, CheckedStore, applied, engine, publish_inputs, until
from test_pipeline import keys_in, run, stop


class StallingStore(CheckedStore):
    """Holds the commits that reach it while `stall` is set, until that event is set."""

    def __init__(self, positions) -> None:
        super().__init__(positions)
        self.stall: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def _bulk_write(self, ops):
        gate = self.stall
        if gate is not None and any(getattr(op, "collection", "") == COUNTERS for op in ops):
            self.entered.set()
            await gate.wait()
        return await super()._bulk_write(ops)


async def test_a_stalled_owners_commit_cannot_land_after_another_owner_took_the_partition(bus):
    positions = {}
    store = StallingStore(positions)
    stalled = store.stall = asyncio.Event()  # the old owner's first commit is on its way, and waits
    keys = keys_in(0, 1, 4) * 3  # each key three times: a list written back loses entries
    ids = await publish_inputs(bus, keys, 1, positions)
    old, _ = engine(bus, store, 1, ack_wait=1.0, in_flight=1)
    old_task = await run(old)
    await asyncio.wait_for(store.entered.wait(), 10)
    store.stall = None  # later writes are not held: only the old owner's commit in flight waits
    ids += await publish_inputs(bus, keys, 1, positions, start=len(ids))  # what only the new owner sees
    keys = keys + keys
    # Its lease expired while it stalled; another replica takes the partition and applies everything
    # (what the old owner took and never acknowledged comes again after the ack wait).
    new, _ = engine(bus, store, 1, ack_wait=1.0)
    new_task = await run(new)

    async def all_once() -> bool:
        got = await applied(store)
        return sorted(i for v in got.values() for i in v) == sorted(ids)

    await until(all_once)
    claimed = (await store.get(CHECKPOINTS, "toyin.0")).doc
    stalled.set()  # the old owner wakes: its commit reaches the store
    old_pipeline = old.pipelines[0]
    await asyncio.wait({old_pipeline.task}, timeout=5)  # fenced, it stops working on the partition
    expected = {}
    for key, msg_id in zip(keys, ids, strict=True):
        expected.setdefault(key, []).append(msg_id)
    assert await applied(store) == expected, "the old owner's commit undid the new owner's writes"
    after = (await store.get(CHECKPOINTS, "toyin.0")).doc
    assert after["stream_seq"] >= claimed["stream_seq"], "the checkpoint went back"
    assert after.get("owner") == claimed.get("owner") == new.pipelines[0].token
    assert not store.violations
    assert old_pipeline.task.done(), "the overtaken owner went on working on the partition"
    await stop(new_task)
    await stop(old_task)
