"""The partitioned engine on a real nats-server: pipelining, the checkpoint, poison, restarts."""

from __future__ import annotations

import asyncio

from engine_toy import CheckedStore, applied, checkpoint_of, engine, outputs, publish_inputs, until

from cdp_kit.bus import partition_for
from cdp_testing.streams import next_dead_letters, settled_consumer


def keys_in(partition: int, partitions: int, n: int) -> list[str]:
    found, i = [], 0
    while len(found) < n:
        if partition_for(f"k{i}", partitions) == partition:
            found.append(f"k{i}")
        i += 1
    return found


async def run(engine):
    task = asyncio.create_task(engine.run())
    await asyncio.sleep(0)
    await asyncio.wait_for(engine.wait_ready(), 10)
    return task


async def stop(task):
    task.cancel()
    await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 15)


async def all_applied(store, ids):
    got = await applied(store)
    return sum(len(v) for v in got.values()) >= len(ids)


async def test_applies_every_input_once_in_order_and_publishes_each_output(bus):
    positions = {}
    store = CheckedStore(positions)
    keys = [f"k{i % 7}" for i in range(200)]
    ids = await publish_inputs(bus, keys, 4, positions)
    eng, _ = engine(bus, store, 4)
    task = await run(eng)
    await until(lambda: all_applied(store, ids))
    await until(lambda: _count(bus, len(ids)))
    await stop(task)
    assert await applied(store) == {k: [i for i, kk in zip(ids, keys, strict=True) if kk == k] for k in set(keys)}
    assert sorted(await outputs(bus)) == sorted("out-" + i for i in ids)
    assert not store.violations
    # Stopping drained: every published outbox record is deleted, every message acknowledged.
    assert await store.count("toy_engine_outbox") == 0
    for p in range(4):
        info = await settled_consumer(bus.js, "TOYIN", f"toy-p{p}")  # acks counted a moment after the stop
        assert info.num_ack_pending == 0 and info.num_pending == 0


async def _count(bus, n):
    return len(await outputs(bus)) >= n


async def test_the_next_batch_is_applied_while_the_previous_one_commits(bus):
    positions = {}
    store = CheckedStore(positions)
    store.hold = asyncio.Event()  # commits carrying state wait until released
    keys = keys_in(0, 1, 24)  # three batches of 8
    ids = await publish_inputs(bus, keys, 1, positions)
    applies = []

    async def on_apply(partition, items):
        applies.append(([msg_id for _, msg_id in items], store.writes))

    eng, logic = engine(bus, store, 1)
    logic.on_apply = on_apply
    task = await run(eng)
    claimed = store.writes  # the partition's owner claimed its checkpoint record when it started
    await until(lambda: _true(len(applies) >= 3))
    # Three batches applied, none of them committed yet: the second and third did not wait.
    assert [n for _, n in applies[:3]] == [claimed] * 3
    assert await store.count("toy_counters") == 0
    store.hold.set()
    await until(lambda: all_applied(store, ids))
    await stop(task)
    assert [i for batch, _ in applies for i in batch] == ids
    assert not store.violations


async def _true(value):
    return value


async def test_the_checkpoint_never_passes_a_failed_commit(bus):
    positions = {}
    store = CheckedStore(positions)
    store.hold = asyncio.Event()
    keys = keys_in(0, 1, 40)
    ids = await publish_inputs(bus, keys, 1, positions)
    eng, logic = engine(bus, store, 1)
    task = await run(eng)
    await until(
        lambda: _true(len(eng.pipelines[0]._queue._queue) >= 2 if hasattr(eng.pipelines[0], "_queue") else False)
    )
    # The first commit fails; those queued behind it must not land (their checkpoint would pass it).
    store.down = True
    store.hold.set()
    await asyncio.sleep(0.3)
    assert await checkpoint_of(store) == 0
    assert await store.count("toy_counters") == 0
    store.down = False
    await until(lambda: all_applied(store, ids))
    await stop(task)
    assert logic.recoveries  # the hot state was dropped and rebuilt from the store
    assert await applied(store) == {k: [i for i, kk in zip(ids, keys, strict=True) if kk == k] for k in set(keys)}
    assert not store.violations


async def dead_letters(bus, expected):
    return await next_dead_letters(bus.js, expected)


async def test_a_poison_message_is_dead_lettered_alone(bus):
    positions = {}
    store = CheckedStore(positions)
    keys = keys_in(0, 1, 30)
    keys[5] = "poison"  # rejected by decode
    keys[17] = "boom"  # makes apply raise, whatever the batch around it
    ids = await publish_inputs(bus, keys, 1, positions)
    eng, _ = engine(bus, store, 1)
    task = await run(eng)
    letters = await dead_letters(bus, 2)
    good = [i for i, k in zip(ids, keys, strict=True) if k not in ("poison", "boom")]
    await until(lambda: all_applied(store, good))
    await stop(task)
    reasons = {m.headers["Cdp-Dlq-Stream-Seq"]: m.headers["Cdp-Dlq-Reason"] for m in letters}
    assert reasons == {str(positions[ids[5]][1]): "invalid_toy", str(positions[ids[17]][1]): "handler_error"}
    details = {m.headers["Cdp-Dlq-Reason"]: m.headers["Cdp-Dlq-Detail"] for m in letters}
    assert details["invalid_toy"] == "key: cannot be counted"  # the field, not the value
    got = await applied(store)
    assert sorted(i for v in got.values() for i in v) == sorted(good)
    assert not store.violations


async def test_a_store_outage_dead_letters_nothing(bus):
    positions = {}
    store = CheckedStore(positions)
    keys = keys_in(0, 1, 30)
    eng, _ = engine(bus, store, 1, backoff=(0.05, 0.3), max_deliver=5)
    task = await run(eng)
    store.down = True  # every commit fails from now on, the careful path's retries too
    ids = await publish_inputs(bus, keys, 1, positions)
    await asyncio.sleep(0.6)
    store.down = False
    await until(lambda: all_applied(store, ids))
    await stop(task)
    info = await bus.js.stream_info("DLQ")
    assert info.state.messages == 0
    assert not store.violations


async def test_a_restarted_engine_publishes_the_outbox_and_skips_what_was_applied(bus):
    positions = {}
    store = CheckedStore(positions)
    keys = keys_in(0, 1, 16)
    ids = await publish_inputs(bus, keys, 1, positions)
    store.fail_after = 1.0  # every commit lands and is reported failed: nothing is published or acked
    eng, _ = engine(bus, store, 1)
    task = await run(eng)
    await until(lambda: _true(store.writes >= 1))
    eng.abort()
    await stop(task)
    store.fail_after = 0.0
    eng, _ = engine(bus, store, 1)
    task = await run(eng)
    await until(lambda: all_applied(store, ids))
    await until(lambda: _count(bus, len(ids)))
    await stop(task)
    assert await applied(store) == {k: [i for i, kk in zip(ids, keys, strict=True) if kk == k] for k in set(keys)}
    assert sorted(await outputs(bus)) == sorted("out-" + i for i in ids)


async def test_stopping_a_partition_drains_its_commits_and_it_resumes_where_it_stopped(bus):
    """A stop lets every batch applied commit and be acknowledged before the partition is released. What
    reaches the partition's pull after the stop began (here: published while the commits are held) is
    delivered and never handed to a batch: not applied, not acknowledged, and the next owner gets it
    first, at once (its consumer restarted at the acknowledgement floor), not after `ack_wait`."""
    positions = {}
    store = CheckedStore(positions)
    store.hold = asyncio.Event()
    keys = keys_in(0, 2, 20)
    seen = []

    async def on_apply(partition, items):
        seen.extend(msg_id for _, msg_id in items)

    # Slots for every batch the first 16 may come in: each is applied, its commit held, before the stop.
    eng, logic = engine(bus, store, 2, in_flight=16)
    logic.on_apply = on_apply
    task = await run(eng)
    ids = await publish_inputs(bus, keys[:16], 2, positions)
    await until(lambda: _true(len(seen) == len(ids)))
    assert eng.pipelines[0]._in_flight >= 2  # at least two batches (of 8 at most) between apply and ack
    stopping = asyncio.create_task(eng.stop_partition(0))  # what an ownership's release does
    late = await publish_inputs(bus, keys[16:], 2, positions, start=len(ids))
    last = positions[late[-1]][1]

    async def consumer():
        return await bus.js.consumer_info("TOYIN", "toy-p0")

    async def late_delivered() -> bool:
        # Its pull still stands while it drains (every message it took leaves a request for more).
        return ((await consumer()).delivered.stream_seq or 0) >= last

    await until(late_delivered, timeout=5.0)
    assert not stopping.done(), "released before its commits were durable"
    store.hold.set()
    await asyncio.wait_for(stopping, 10)
    assert 0 not in eng.owned()
    assert seen == ids, "a message that reached the pull after the stop began was applied"
    # Everything it applied is durable and acknowledged; nothing else is acknowledged.
    applied_up_to = positions[ids[-1]][1]
    assert await checkpoint_of(store) == applied_up_to

    async def acknowledged() -> bool:
        # The server applies acknowledgements asynchronously: read until it has (or the wait fails).
        return ((await consumer()).ack_floor.stream_seq or 0) >= applied_up_to

    await until(acknowledged, timeout=5.0)
    info = await consumer()
    assert (info.ack_floor.stream_seq, info.num_ack_pending) == (applied_up_to, len(late))

    more = await publish_inputs(bus, keys, 2, positions, start=len(ids) + len(late))
    await eng.start_partition(0)  # acquired again (here, or by another replica)
    # Well within the consumer's ack_wait (30 s): the late ones came again at once, before the newer ones.
    await until(lambda: all_applied(store, ids + late + more), timeout=10.0)
    await stop(task)
    assert seen == ids + late + more
    expected = {}
    for key, msg_id in zip(keys + keys, ids + late + more, strict=True):
        expected.setdefault(key, []).append(msg_id)
    assert await applied(store) == expected
    assert not store.violations


async def test_a_batch_that_waited_for_a_slot_takes_what_arrived_meanwhile(bus):
    """Under load every slot is held by a commit; what arrives while a fetched batch waits for one is
    applied with it (one apply, one commit, one publish) rather than as batches of its own behind it."""
    positions = {}
    store = CheckedStore(positions)
    store.hold = asyncio.Event()
    keys = keys_in(0, 1, 8)
    sizes = []

    async def on_apply(partition, items):
        sizes.append(len(items))

    eng, logic = engine(bus, store, 1, in_flight=1)
    logic.on_apply = on_apply
    task = await run(eng)
    ids = await publish_inputs(bus, keys[:1], 1, positions)
    await until(lambda: _true(sizes == [1]))  # applied; its commit is held, so the only slot is too

    async def delivered(n: int) -> bool:
        return (await bus.js.consumer_info("TOYIN", "toy-p0")).num_ack_pending >= n

    ids += await publish_inputs(bus, keys[1:2], 1, positions, start=1)
    await until(lambda: delivered(2))
    await asyncio.sleep(0.2)  # fetched, waiting for the slot
    ids += await publish_inputs(bus, keys[2:], 1, positions, start=2)
    await until(lambda: delivered(8))
    store.hold.set()
    await until(lambda: all_applied(store, ids))
    await stop(task)
    assert sizes == [1, 7]
    assert await applied(store) == {k: [i] for k, i in zip(keys, ids, strict=True)}
    assert not store.violations


async def test_a_partitions_lag_poll_stops_when_its_cancellation_lands_with_a_reply(bus, monkeypatch):
    """nats-py waits for JetStream's replies with `asyncio.wait_for`, which on Python 3.11 returns the reply
    when it lands in the cancellation's loop turn: the lag poll of a stopped partition must still end, not
    poll on for the life of the process."""
    from cdp_kit.engine import pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "LAG_POLL_SECONDS", 0.05)
    eng, _ = engine(bus, CheckedStore({}), 1)
    task = await run(eng)
    reply = asyncio.get_running_loop().create_future()
    asked = asyncio.Event()
    consumer_info = bus.js.consumer_info

    async def consumer_info_with_a_late_reply(*args, **kwargs):
        info = await consumer_info(*args, **kwargs)
        if asyncio.current_task().get_name().startswith("lag ") and not reply.done():
            asked.set()
            await asyncio.wait_for(reply, 10)  # the shape of nats-py's request
        return info

    monkeypatch.setattr(bus.js, "consumer_info", consumer_info_with_a_late_reply)
    try:
        await asyncio.wait_for(asked.wait(), 5)
        [lag] = [t for t in asyncio.all_tasks() if t.get_name().startswith("lag ")]
        reply.set_result(None)  # the reply and the stop in one loop turn
        lag.cancel()
        done, _ = await asyncio.wait({lag}, timeout=2)
        assert done, "the lag poll ran on after its cancellation"
    finally:
        await stop(task)
