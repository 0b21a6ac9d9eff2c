"""A stream created again that already holds as many new messages as the checkpoint counts when the engine
binds its partition: every one is applied, none skipped as applied already.

Found by the on-call helper (stop 43) on a running platform: nats-server restarted on an empty store, its
streams made again by the provisioner, and events accepted by the collector before identity's partition bound
its new consumer. The check for a checkpoint past its stream (test_checkpoint_ahead.py) looked only at
whether the stream's last message of the partition was below the checkpoint: with the new stream already at
or past it, nothing was said, and its messages numbered up to the checkpoint were skipped as applied - the
person's identify was lost, without a word. The same race follows a restore of nats/ older than the stores
when the collector takes events before a partition binds. A stream created after the checkpoint was written
now rewinds the partition to the stream's start, said once at ERROR and counted."""

from __future__ import annotations

import logging

from engine_toy import CHECKPOINTS, IN_STREAM, CheckedStore, applied, engine, ensure_streams, publish_inputs, until
from test_pipeline import all_applied, run, stop

from cdp_kit.bus import Bus
from cdp_testing.metrics import MetricsCapture


async def _checkpoint(store) -> int:
    record = await store.get(CHECKPOINTS, "toyin.0")
    return record.doc["stream_seq"] if record is not None else 0


async def test_a_recreated_stream_already_past_the_checkpoint_is_applied_whole(nats_server, caplog):
    captured = MetricsCapture("toy")
    async with Bus.connect(nats_server.url, name="engine-recreated", telemetry=captured.telemetry) as bus:
        await ensure_streams(bus)
        positions: dict = {}
        store = CheckedStore(positions)
        old = await publish_inputs(bus, ["a", "b", "c"], 1, positions)
        eng, _ = engine(bus, store, 1)
        task = await run(eng)
        await until(lambda: all_applied(store, old))
        await stop(task)
        assert await _checkpoint(store) == 3

        # The stream made again, and more new messages in it than the checkpoint counts, before the bind.
        await bus.js.delete_stream(IN_STREAM)
        await ensure_streams(bus)
        new = await publish_inputs(bus, ["a", "b", "c", "d", "e"], 1, positions, start=len(old))
        assert [positions[i][1] for i in new] == [1, 2, 3, 4, 5]

        caplog.set_level(logging.INFO, logger="cdp.engine")
        eng, _ = engine(bus, store, 1)
        task = await run(eng)
        try:

            async def every_new_one():
                got = [i for v in (await applied(store)).values() for i in v]
                return all(i in got for i in new)

            await until(every_new_one)
        finally:
            await stop(task)

    assert await applied(store) == {
        "a": ["in-0", "in-3"],
        "b": ["in-1", "in-4"],
        "c": ["in-2", "in-5"],
        "d": ["in-6"],
        "e": ["in-7"],
    }
    assert await _checkpoint(store) == 5
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and "checkpoint" in r.getMessage()]
    assert len(errors) == 1 and "partition 0 of toy: checkpoint 3" in errors[0], errors
    rewinds = captured.collected()["cdp.engine.checkpoint.rewinds"][1]
    assert [(dict(p.attributes), p.value) for p in rewinds] == [({"service": "toy", "partition": 0}, 1)]
