"""A partition's consumer keeps its state in the server's memory (`ConsumerSpec.memory_state`): nats-server
does not rewrite a state file for it after every round of deliveries. A nats-server restart loses it; the
partition's checkpoint is the position that counts, so the engine creates it again right after the
checkpoint - nothing lost, nothing applied twice, and the stream not read again from its beginning."""

from __future__ import annotations

import asyncio

from engine_toy import IN_PREFIX, IN_STREAM, CheckedStore, Toy, applied, engine, publish_inputs, until
from nats.js import api
from test_pipeline import all_applied, run, stop

from cdp_kit.bus.consumer import ConsumerRunner, ConsumerSpec
from cdp_testing.streams import settled_consumer


async def _published_after_restart(bus, keys, positions, start):
    for _ in range(60):  # as any producer: until JetStream (recovering its streams) stores them
        try:
            return await publish_inputs(bus, keys, 1, positions, start=start)
        except AssertionError:
            await asyncio.sleep(0.25)
    raise AssertionError("JetStream did not store the inputs after its restart")


async def _connected(bus) -> bool:
    return bus.connected


async def test_a_partition_consumer_lost_with_a_nats_restart_starts_again_after_the_checkpoint(nats_server, bus):
    positions: dict = {}
    store = CheckedStore(positions)
    keys = [f"k{n % 3}" for n in range(10)]
    ids = await publish_inputs(bus, keys, 1, positions)
    eng, _ = engine(bus, store, 1)
    task = await run(eng)
    await until(lambda: all_applied(store, ids))
    info = await bus.js.consumer_info(IN_STREAM, "toy-p0")
    assert info.config.mem_storage  # no state file rewritten after every delivery
    await stop(task)  # everything applied is written and acknowledged: the checkpoint is the last input
    checkpoint = positions[ids[-1]][1]

    nats_server.restart()  # the memory consumer is gone with it
    await until(lambda: _connected(bus), timeout=15)
    more_keys = [f"k{n % 3}" for n in range(10, 20)]
    more = await _published_after_restart(bus, more_keys, positions, start=10)

    eng, _ = engine(bus, store, 1)
    task = await run(eng)
    await until(lambda: all_applied(store, ids + more), timeout=20)
    await stop(task)

    keys += more_keys
    expected: dict[str, list[str]] = {}
    for key, msg_id in zip(keys, ids + more, strict=True):
        expected.setdefault(key, []).append(msg_id)
    assert await applied(store) == expected
    assert not store.violations
    info = await settled_consumer(bus.js, IN_STREAM, "toy-p0")  # acks counted a moment after the stop
    # Created again after the checkpoint, not at the stream's beginning.
    assert info.config.deliver_policy == api.DeliverPolicy.BY_START_SEQUENCE
    assert info.config.opt_start_seq == checkpoint + 1
    assert info.num_pending == 0 and info.num_ack_pending == 0


async def test_a_file_consumer_of_an_earlier_version_becomes_a_memory_one_at_its_floor(bus):
    """A platform upgraded in place: its partition consumers were made keeping their state in a file.
    JetStream cannot change that on an update, so the consumer is created again at its acknowledgement
    floor (as for an acknowledgement policy): every input still applied once, in order."""
    positions: dict = {}
    store = CheckedStore(positions)
    keys = [f"k{n % 3}" for n in range(6)]
    ids = await publish_inputs(bus, keys, 1, positions)
    earlier = ConsumerSpec(
        stream=IN_STREAM, durable="toy-p0", filter_subjects=(f"{IN_PREFIX}.0",), ordered=True, memory_state=False
    )
    await bus.js.add_consumer(IN_STREAM, earlier.config())
    assert not (await bus.js.consumer_info(IN_STREAM, "toy-p0")).config.mem_storage

    eng, _ = engine(bus, store, 1)
    task = await run(eng)
    await until(lambda: all_applied(store, ids))
    await stop(task)

    info = await bus.js.consumer_info(IN_STREAM, "toy-p0")
    assert info.config.mem_storage
    expected: dict[str, list[str]] = {}
    for key, msg_id in zip(keys, ids, strict=True):
        expected.setdefault(key, []).append(msg_id)
    assert await applied(store) == expected
    assert not store.violations


async def test_a_missing_consumer_given_a_start_after_the_streams_end_starts_at_its_beginning(bus):
    """A stream restored from an older backup ends before the owner's position: its positions are not the
    owner's, so nothing of it may be skipped."""
    spec = ConsumerSpec(stream=IN_STREAM, durable="restored-p0", filter_subjects=(f"{IN_PREFIX}.0",), ordered=True)
    runner = ConsumerRunner(bus.js, spec, handler=None, telemetry=bus.telemetry)
    await runner.provision(start_seq=10_000)
    info = await bus.js.consumer_info(IN_STREAM, "restored-p0")
    assert info.config.deliver_policy == api.DeliverPolicy.ALL


async def test_a_logic_holding_state_between_snapshots_keeps_a_consumer_the_restart_keeps(bus):
    """Held state (scoring's fields, segmentation's memberships) is written by snapshots; at start the
    service replays what its consumer was given after the snapshot (`delivered_since`), which only a
    consumer that survived a nats-server restart can say. So its partitions' consumers stay file-kept."""
    positions: dict = {}
    store = CheckedStore(positions)

    class Holding(Toy):
        async def snapshot(self, positions) -> None:
            return None

    eng, _ = engine(bus, store, 1, logic=Holding(store))
    ids = await publish_inputs(bus, ["k1", "k2"], 1, positions)
    task = await run(eng)
    await until(lambda: all_applied(store, ids))
    await stop(task)
    info = await bus.js.consumer_info(IN_STREAM, "toy-p0")
    assert not info.config.mem_storage
