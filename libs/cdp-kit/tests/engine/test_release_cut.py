"""A release the ownership cuts short (its lease lost mid-drain) aborts the partition as a crash would.

A drain that ran on after its lease expired overlapped the next owner: commits of the old owner's
landing, and its acknowledgements and publishes going out, while the new owner worked on the same
partition from the store as it had read it.
"""

from __future__ import annotations

import asyncio

from engine_toy import CheckedStore, applied, checkpoint_of, engine, outputs, publish_inputs, until
from test_pipeline import _true, keys_in, run, stop


async def test_a_cancelled_release_stops_the_partition_without_landing_acknowledging_or_publishing(bus):
    positions = {}
    store = CheckedStore(positions)
    store.hold = asyncio.Event()  # every commit waits inside the store
    keys = keys_in(0, 2, 20)
    ids = await publish_inputs(bus, keys, 2, positions)
    eng, _ = engine(bus, store, 2, ack_wait=2.0)  # the next owner gets them again soon
    task = await run(eng)
    await until(lambda: _true(eng.pipelines[0]._in_flight >= 2))
    pipeline = eng.pipelines[0]
    releasing = asyncio.create_task(eng.stop_partition(0))
    await asyncio.sleep(0.1)
    assert not releasing.done()  # draining: its commits are held
    releasing.cancel()  # the ownership's cut
    await asyncio.wait({releasing}, timeout=5)
    assert releasing.cancelled()
    assert pipeline.task.done(), "the partition's pipeline still runs after its release was cut"
    writes = store.writes
    store.hold.set()  # the store answers again: nothing of the aborted partition may land now
    await asyncio.sleep(0.3)
    assert store.writes == writes
    assert await store.count("toy_counters") == 0
    assert await checkpoint_of(store) == 0
    assert await outputs(bus) == []

    info = await bus.js.consumer_info("TOYIN", "toy-p0")
    assert info.ack_floor.stream_seq == 0, "acknowledged by a partition whose release was cut"
    # The next owner (here, the same engine acquiring again) applies each input once.
    await eng.start_partition(0)
    await until(lambda: all_applied(store, ids))
    await stop(task)
    assert await applied(store) == {k: [i for i, kk in zip(ids, keys, strict=True) if kk == k] for k in set(keys)}
    assert sorted(await outputs(bus)) == sorted("out-" + i for i in ids)
    assert not store.violations


async def all_applied(store, ids):
    got = await applied(store)
    return sorted(i for v in got.values() for i in v) == sorted(ids)


async def test_a_release_cancelled_before_its_drain_began_still_stops_the_partition(bus):
    """A service releasing several engines' partitions together (profile: `asyncio.gather` of each
    input's `stop_partition`) hands the ownership one release whose drains are tasks of their own. A
    replica woken from a stall finds its leases lost and releases with the deadline passed: the cut
    cancels those tasks before a line of theirs ran. The pipeline went on working on a partition another
    replica owned, stayed in the engine's pipelines, and when the partition came back the engine took it
    for running: the replica held the lease and worked on nothing (tests/scaling/
    test_profile_stalled_replica)."""
    positions = {}
    store = CheckedStore(positions)
    keys = keys_in(0, 1, 10)
    ids = await publish_inputs(bus, keys, 1, positions)
    eng, _ = engine(bus, store, 1, ack_wait=2.0)
    task = await run(eng)
    await until(lambda: all_applied(store, ids))
    pipeline = eng.pipelines[0]

    async def release() -> None:  # as a service composing engines releases
        await asyncio.gather(eng.stop_partition(0))

    releasing = asyncio.create_task(release())
    await asyncio.sleep(0)  # the release has called stop_partition; its drain has not begun
    releasing.cancel()  # the cut, its deadline passed already
    await asyncio.wait({releasing}, timeout=5)
    assert releasing.cancelled()
    assert 0 not in eng.pipelines, "the engine still counts the released partition as its own"
    await asyncio.wait({pipeline.task}, timeout=5)
    assert pipeline.task.done(), "the released partition's pipeline went on working"

    # The partition comes back: it starts again and applies what arrived meanwhile, each once.
    ids += await publish_inputs(bus, keys, 1, positions, start=len(ids))
    await eng.start_partition(0)
    assert eng.pipelines[0] is not pipeline
    await until(lambda: all_applied(store, ids))
    await stop(task)
    assert await applied(store) == {
        k: [i for i, kk in zip(ids, keys + keys, strict=True) if kk == k] for k in set(keys)
    }
    assert not store.violations
