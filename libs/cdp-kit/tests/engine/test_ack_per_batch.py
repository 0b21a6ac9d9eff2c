"""A partition's consumer is acknowledged once a batch (AckPolicy.ALL): what the server is told, what a
poison message costs, and a consumer made before (one acknowledgement a message) taken over."""

from __future__ import annotations

import asyncio

import nats
from engine_toy import CheckedStore, Toy, applied, engine, outputs, publish_inputs, until
from nats.js import api

from cdp_kit.bus import ConsumerSpec

DURABLE = "toy-p0"


async def run(eng):
    task = asyncio.create_task(eng.run())
    await asyncio.sleep(0)
    await asyncio.wait_for(eng.wait_ready(), 10)
    return task


async def stop(task):
    task.cancel()
    await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 15)


async def all_applied(store, ids):
    return sum(len(v) for v in (await applied(store)).values()) >= len(ids)


async def settled(bus, last_seq: int) -> bool:
    """Every message up to `last_seq` acknowledged on the server, nothing left pending."""
    info = await bus.js.consumer_info("TOYIN", DURABLE)
    return info.num_ack_pending == 0 and info.num_pending == 0 and info.ack_floor.stream_seq == last_seq


async def test_a_batch_costs_one_acknowledgement_and_the_server_sees_everything_acknowledged(bus, nats_server):
    acks: list[str] = []

    async def note(msg) -> None:
        acks.append(msg.data.decode())

    watcher = await nats.connect(nats_server.url)
    await watcher.subscribe(f"$JS.ACK.TOYIN.{DURABLE}.>", cb=note)
    await watcher.flush()
    positions = {}
    store = CheckedStore(positions)
    keys = [f"k{i % 5}" for i in range(64)]
    ids = await publish_inputs(bus, keys, 1, positions)
    batches = 0

    async def count(partition, items) -> None:
        nonlocal batches
        batches += 1

    eng, _ = engine(bus, store, 1, logic=Toy(store, on_apply=count))  # batches of up to 8
    task = await run(eng)
    await until(lambda: all_applied(store, ids))
    last = max(seq for _, seq, _ in positions.values())
    await until(lambda: settled(bus, last))
    await stop(task)
    await watcher.flush()
    await watcher.close()
    assert (await bus.js.consumer_info("TOYIN", DURABLE)).config.ack_policy == api.AckPolicy.ALL
    # One acknowledgement a batch (a batch is what has arrived: up to 8, 16 when it waited for a slot).
    assert len(acks) == batches < len(ids), (len(acks), batches)
    assert await applied(store) == {k: [i for i, kk in zip(ids, keys, strict=True) if kk == k] for k in set(keys)}
    assert sorted(await outputs(bus)) == sorted("out-" + i for i in ids)


async def test_poison_in_the_middle_and_at_the_end_of_a_batch_leaves_nothing_unacknowledged(bus):
    positions = {}
    store = CheckedStore(positions)
    keys = [f"k{i % 3}" for i in range(20)]
    keys[3] = "poison"  # rejected by decode, inside the first batch
    keys[19] = "poison"  # the last message: its dead-lettering is the batch's acknowledgement
    ids = await publish_inputs(bus, keys, 1, positions)
    eng, _ = engine(bus, store, 1)
    task = await run(eng)
    good = [i for i, k in zip(ids, keys, strict=True) if k != "poison"]
    await until(lambda: all_applied(store, good))
    last = max(seq for _, seq, _ in positions.values())
    await until(lambda: settled(bus, last))
    await until(lambda: _dead_lettered(bus, 2))
    await stop(task)
    got = await applied(store)
    assert sorted(i for v in got.values() for i in v) == sorted(good)
    assert not store.violations


async def _dead_lettered(bus, n: int) -> bool:
    return (await bus.js.stream_info("DLQ")).state.messages >= n


async def test_a_consumer_made_with_one_acknowledgement_a_message_is_taken_over_where_it_was(bus, monkeypatch):
    """An upgrade of a running platform: the durable exists with AckPolicy.EXPLICIT (JetStream cannot
    change the policy in place). It is created again at its floor; nothing is missed or applied twice."""
    original = ConsumerSpec.config

    def explicit(self):
        config = original(self)
        config.ack_policy = api.AckPolicy.EXPLICIT
        return config

    positions = {}
    store = CheckedStore(positions)
    first = await publish_inputs(bus, [f"k{i % 4}" for i in range(24)], 1, positions)
    monkeypatch.setattr(ConsumerSpec, "config", explicit)
    eng, _ = engine(bus, store, 1)
    task = await run(eng)
    await until(lambda: all_applied(store, first))
    await until(lambda: settled(bus, max(seq for _, seq, _ in positions.values())))
    await stop(task)
    assert (await bus.js.consumer_info("TOYIN", DURABLE)).config.ack_policy == api.AckPolicy.EXPLICIT
    monkeypatch.setattr(ConsumerSpec, "config", original)

    # Arrived while the platform was being upgraded.
    second = await publish_inputs(bus, [f"k{i % 4}" for i in range(24)], 1, positions, start=len(first))
    eng, _ = engine(bus, store, 1)
    task = await run(eng)
    ids = first + second
    await until(lambda: all_applied(store, ids))
    await until(lambda: settled(bus, max(seq for _, seq, _ in positions.values())))
    await until(lambda: _published(bus, len(ids)))
    await stop(task)
    assert (await bus.js.consumer_info("TOYIN", DURABLE)).config.ack_policy == api.AckPolicy.ALL
    keys = [f"k{i % 4}" for i in range(24)] * 2
    assert await applied(store) == {k: [i for i, kk in zip(ids, keys, strict=True) if kk == k] for k in set(keys)}
    out = await outputs(bus)
    assert len(out) == len(set(out)) == len(ids)
    assert not store.violations


async def _published(bus, n: int) -> bool:
    return len(await outputs(bus)) >= n
