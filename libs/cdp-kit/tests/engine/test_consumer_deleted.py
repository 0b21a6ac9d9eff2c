"""A partition's durable consumer deleted under a running engine (an operator's mistake, a stream restored
without its consumers): the engine creates it again at its checkpoint and goes on, exactly once."""

from __future__ import annotations

from engine_toy import CheckedStore, applied, engine, publish_inputs, until
from nats.js import api
from test_pipeline import all_applied, run, stop

from cdp_testing.streams import settled_consumer


async def test_a_deleted_partition_consumer_is_created_again_at_the_checkpoint(bus, caplog):
    positions: dict = {}
    store = CheckedStore(positions)
    keys = [f"k{i % 3}" for i in range(8)]
    ids = await publish_inputs(bus, keys, 1, positions)
    eng, _ = engine(bus, store, 1)
    task = await run(eng)
    await until(lambda: all_applied(store, ids))
    pipeline = eng.pipelines[0]
    await until(lambda: _true(pipeline.checkpoint == positions[ids[-1]][1]))
    checkpoint = pipeline.checkpoint

    await bus.js.delete_consumer("TOYIN", "toy-p0")
    more = [f"k{i % 3}" for i in range(8, 16)]
    ids += await publish_inputs(bus, more, 1, positions, start=len(ids))
    await until(lambda: all_applied(store, ids))
    await stop(task)

    keys += more
    assert await applied(store) == {k: [i for i, kk in zip(ids, keys, strict=True) if kk == k] for k in set(keys)}
    assert not store.violations
    assert pipeline.runner.recreated == 1
    info = await settled_consumer(bus.js, "TOYIN", "toy-p0")  # acks counted a moment after the stop
    # Not from the stream's start: nothing up to the checkpoint needs reading again.
    assert info.config.deliver_policy == api.DeliverPolicy.BY_START_SEQUENCE
    assert info.config.opt_start_seq == checkpoint + 1
    assert info.num_ack_pending == 0 and info.num_pending == 0
    assert "consumer toy-p0 did not exist on the server" in caplog.text


async def _true(value):
    return value
