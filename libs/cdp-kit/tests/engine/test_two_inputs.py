"""One engine reading two inputs (`PartitionedEngine(..., also=[(logic, spec)])`): a partition's one
pipeline takes what has arrived on both, and each input is still applied exactly once and in stream
order, checkpointed and published through its own outbox, acknowledged - through crashes and failed
commits too."""

from __future__ import annotations

import asyncio
import random

from engine_toy import CheckedStore, Toy, applied, outputs, publish_inputs, spec, until

from cdp_kit.bus import OutMessage, StreamSpec, partition_for
from cdp_kit.engine import PartitionedEngine
from cdp_testing.streams import settled_consumer

IN2_STREAM, IN2_PREFIX = "TOY2IN", "toy2in"
PARTITIONS = 3


async def publish_second(bus, keys: list[str], positions: dict, start: int) -> list[str]:
    """Inputs of the second stream: keys of their own (`j...`), ids `in-<n>` numbered from `start`."""
    messages = [
        OutMessage(f"{IN2_PREFIX}.{partition_for(key, PARTITIONS)}", key.encode(), f"in-{n}")
        for n, key in enumerate(keys, start)
    ]
    results = await bus.publisher.publish_batch(messages)
    for message, result in zip(messages, results, strict=True):
        assert result.ok
        positions[message.msg_id] = (message.payload.decode(), result.seq, message.subject)
    return [m.msg_id for m in messages]


def two_input_engine(bus, store, **overrides) -> PartitionedEngine:
    # One logic for both inputs (its state is per key; the inputs' keys differ). The second input's
    # checkpoints go to the same collection under its own subject (the store checks both), its outbox
    # is its own.
    toy = Toy(store)
    second = spec(PARTITIONS, stream=IN2_STREAM, subject_prefix=IN2_PREFIX, outbox="toy2_outbox", **overrides)
    return PartitionedEngine(toy, spec(PARTITIONS, **overrides), bus=bus, store=store, also=[(toy, second)])


async def test_both_inputs_are_applied_once_in_order_and_acknowledged(bus):
    await bus.ensure_streams(StreamSpec(name=IN2_STREAM, subjects=(f"{IN2_PREFIX}.>",)))
    positions: dict = {}
    store = CheckedStore(positions)
    keys1 = [f"k{i % 9}" for i in range(150)]
    keys2 = [f"j{i % 7}" for i in range(120)]
    ids1 = await publish_inputs(bus, keys1, PARTITIONS, positions)
    ids2 = await publish_second(bus, keys2, positions, start=len(ids1))
    eng = two_input_engine(bus, store)
    await eng.start()
    try:
        await eng.wait_ready()
        total = len(ids1) + len(ids2)

        async def done():
            return sum(len(v) for v in (await applied(store)).values()) >= total and len(await outputs(bus)) >= total

        await until(done)
    finally:
        await eng.close()
    expected: dict[str, list[str]] = {}
    for key, msg_id in [*zip(keys1, ids1, strict=True), *zip(keys2, ids2, strict=True)]:
        expected.setdefault(key, []).append(msg_id)
    assert await applied(store) == expected
    out = await outputs(bus)
    assert sorted(out) == sorted("out-" + i for i in ids1 + ids2)
    assert not store.violations
    # Each input's checkpoint is its own stream's last position; both outboxes drained; all acknowledged.
    checkpoints = {r.key: r.doc["stream_seq"] async for r in store.scan_all("toy_checkpoints")}
    for msg_id, (_key, seq, subject) in positions.items():
        assert checkpoints[subject] >= seq, msg_id
    assert await store.count("toy_engine_outbox") == 0 and await store.count("toy2_outbox") == 0
    for p in range(PARTITIONS):
        for stream in ("TOYIN", IN2_STREAM):
            info = await settled_consumer(bus.js, stream, f"toy-p{p}")  # acks counted a moment after the stop
            assert info.num_ack_pending == 0 and info.num_pending == 0, (stream, p)


async def test_random_kills_and_failed_commits_keep_both_inputs_exactly_once(bus):
    await bus.ensure_streams(StreamSpec(name=IN2_STREAM, subjects=(f"{IN2_PREFIX}.>",)))
    rng = random.Random(20261205)
    positions: dict = {}
    store = CheckedStore(positions)
    store.random = random.Random(7)
    pairs: list[tuple[str, str]] = []
    killed_mid_pipeline = 0
    for _ in range(16):
        keys1 = [f"k{rng.randrange(10)}" for _ in range(rng.randrange(10, 60))]
        ids1 = await publish_inputs(bus, keys1, PARTITIONS, positions, start=len(pairs))
        pairs += zip(keys1, ids1, strict=True)
        keys2 = [f"j{rng.randrange(10)}" for _ in range(rng.randrange(10, 60))]
        ids2 = await publish_second(bus, keys2, positions, start=len(pairs))
        pairs += zip(keys2, ids2, strict=True)
        store.fail_before = rng.choice([0.0, 0.05, 0.2])
        store.fail_after = rng.choice([0.0, 0.05, 0.2])
        store.latency = rng.choice([0.0, 0.01, 0.03])
        eng = two_input_engine(bus, store, in_flight=rng.randrange(1, 4), batch_size=rng.randrange(2, 12))
        task = asyncio.create_task(eng.run())
        deadline = asyncio.get_running_loop().time() + 2.0
        wait = rng.uniform(0.0, 0.3)
        while asyncio.get_running_loop().time() < deadline:
            if wait <= 0 and any(p._in_flight for p in eng.pipelines.values()):
                break
            await asyncio.sleep(0.005)
            wait -= 0.005
        killed_mid_pipeline += any(p._in_flight for p in eng.pipelines.values())
        eng.abort()  # a crash: nothing drains
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    store.fail_before = store.fail_after = store.latency = 0.0
    eng = two_input_engine(bus, store)
    task = asyncio.create_task(eng.run())

    async def caught_up():
        return sum(len(v) for v in (await applied(store)).values()) >= len(pairs)

    async def published():
        return len(await outputs(bus)) >= len(pairs)

    await until(caught_up, timeout=30)
    await until(published, timeout=30)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    expected: dict[str, list[str]] = {}
    for key, msg_id in pairs:
        expected.setdefault(key, []).append(msg_id)
    assert await applied(store) == expected  # exactly once, in order per key, on both inputs
    out = await outputs(bus)
    assert len(out) == len(set(out)) == len(pairs)
    assert not store.violations, store.violations[:5]
    assert killed_mid_pipeline and store.failed_before and store.failed_after


async def test_an_input_with_the_engines_outbox_is_refused(bus):
    store = CheckedStore({})
    toy = Toy(store)
    try:
        PartitionedEngine(toy, spec(2), bus=bus, store=store, also=[(toy, spec(2, stream=IN2_STREAM))])
    except ValueError as exc:
        assert "outbox" in str(exc)
    else:
        raise AssertionError("two inputs sharing one outbox were accepted")
