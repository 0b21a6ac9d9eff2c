"""A checkpoint past what its stream holds (day-2 operator trial: a home's nats/ copied 15 s before the
services' stores; separate volume snapshots do the same; a stream deleted and created again): the stream
numbers new messages at or below the checkpoint, and the engine skipped them as applied - silently. It
now resumes from the stream's last position for the partition, says so once (ERROR, naming the partition,
the checkpoint and that position) and counts it in `cdp.engine.checkpoint.rewinds`."""

from __future__ import annotations

import logging
import time

from engine_toy import CHECKPOINTS, IN_STREAM, CheckedStore, applied, engine, ensure_streams, publish_inputs, until
from test_pipeline import all_applied, run, stop

from cdp_kit.bus import Bus
from cdp_kit.storage import Put
from cdp_testing.metrics import MetricsCapture

REWINDS = "cdp.engine.checkpoint.rewinds"


def _in_order(inputs: list, keys: list[str]) -> dict[str, list]:
    """Every input applied once, each key's in the order published."""
    return {k: [i for i, kk in zip(inputs, keys, strict=True) if kk == k] for k in set(keys)}


def _checkpoint_errors(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.ERROR and "checkpoint" in r.getMessage()]


def _rewinds(captured: MetricsCapture) -> list[tuple[dict, int]]:
    metrics = captured.collected()
    if REWINDS not in metrics:
        return []
    return [(dict(p.attributes), p.value) for p in metrics[REWINDS][1]]


async def _checkpoint(store) -> int:
    record = await store.get(CHECKPOINTS, "toyin.0")
    return record.doc["stream_seq"] if record is not None else 0


async def _applied_once(store, ids) -> bool:
    got = [i for v in (await applied(store)).values() for i in v]
    return all(i in got for i in ids)


async def test_messages_of_a_stream_created_again_below_the_checkpoint_are_applied(nats_server, caplog):
    captured = MetricsCapture("toy")
    async with Bus.connect(nats_server.url, name="engine-ahead", telemetry=captured.telemetry) as bus:
        await ensure_streams(bus)
        positions: dict = {}
        store = CheckedStore(positions)
        keys = [f"k{i % 3}" for i in range(20)]
        old = await publish_inputs(bus, keys, 1, positions)
        eng, _ = engine(bus, store, 1)
        task = await run(eng)
        await until(lambda: all_applied(store, old))
        await stop(task)
        checkpoint = await _checkpoint(store)
        assert checkpoint == 20

        # The stream deleted and created again: its new messages are numbered 1, 2, ... - below the checkpoint.
        await bus.js.delete_stream(IN_STREAM)
        await ensure_streams(bus)
        more = [f"k{i % 3}" for i in range(20, 26)]
        new = await publish_inputs(bus, more, 1, positions, start=len(old))
        assert max(positions[i][1] for i in new) < checkpoint

        caplog.set_level(logging.INFO, logger="cdp.engine")
        eng, _ = engine(bus, store, 1)
        task = await run(eng)
        await until(lambda: _applied_once(store, new))
        await stop(task)

    assert await applied(store) == _in_order(old + new, keys + more)
    assert await _checkpoint(store) == max(positions[i][1] for i in new)
    errors = _checkpoint_errors(caplog)
    assert len(errors) == 1
    assert (
        "partition 0 of toy: checkpoint 20 is past the stream's last sequence 6 for the partition; resuming after sequence 0"
        in errors[0].getMessage()
    )
    assert _rewinds(captured) == [({"service": "toy", "partition": 0}, 1)]


async def test_a_stream_recreated_under_a_running_engine_has_its_new_messages_applied(nats_server, caplog):
    captured = MetricsCapture("toy")
    async with Bus.connect(nats_server.url, name="engine-ahead-running", telemetry=captured.telemetry) as bus:
        await ensure_streams(bus)
        positions: dict = {}
        store = CheckedStore(positions)
        keys = [f"k{i % 3}" for i in range(20)]
        old = await publish_inputs(bus, keys, 1, positions)
        eng, _ = engine(bus, store, 1)
        task = await run(eng)
        try:
            await until(lambda: all_applied(store, old))
            pipeline = eng.pipelines[0]

            async def settled():
                return pipeline.checkpoint == 20 and await _checkpoint(store) == 20

            await until(settled)
            await bus.js.delete_stream(IN_STREAM)
            await ensure_streams(bus)
            more = [f"k{i % 3}" for i in range(20, 26)]
            new = await publish_inputs(bus, more, 1, positions, start=len(old))
            assert max(positions[i][1] for i in new) < 20
            await until(lambda: _applied_once(store, new))
        finally:
            await stop(task)

    assert await applied(store) == _in_order(old + new, keys + more)
    assert not store.violations
    errors = _checkpoint_errors(caplog)
    assert len(errors) == 1 and "partition 0 of toy: checkpoint 20" in errors[0].getMessage()
    assert _rewinds(captured) == [({"service": "toy", "partition": 0}, 1)]


async def test_a_store_ahead_of_its_stream_resumes_after_what_the_stream_held_applying_nothing_twice(
    nats_server, caplog
):
    """The operator trial's order: the stream is a copy older than the store (its messages were all
    applied), and new messages arrive before the partition binds. The store's checkpoint is past the
    stream's end; the new ones are applied, the old ones not again."""
    captured = MetricsCapture("toy")
    async with Bus.connect(nats_server.url, name="engine-torn", telemetry=captured.telemetry) as bus:
        await ensure_streams(bus)
        positions: dict = {}
        store = CheckedStore(positions)
        keys = [f"k{i % 3}" for i in range(10)]
        old = await publish_inputs(bus, keys, 1, positions)
        eng, _ = engine(bus, store, 1)
        task = await run(eng)
        await until(lambda: all_applied(store, old))
        await stop(task)
        assert await _checkpoint(store) == 10
        # The store went on after the stream was copied: it applied up to 40 (positions this stream never had).
        await store.bulk_write([Put(CHECKPOINTS, "toyin.0", {"stream_seq": 40, "at": time.time()})])
        more = [f"k{i % 3}" for i in range(10, 17)]
        new = await publish_inputs(bus, more, 1, positions, start=len(old))
        assert [positions[i][1] for i in new] == list(range(11, 18))

        eng, _ = engine(bus, store, 1)
        task = await run(eng)
        await until(lambda: _applied_once(store, new))
        await stop(task)

    assert await applied(store) == _in_order(old + new, keys + more)
    assert await _checkpoint(store) == 17
    errors = _checkpoint_errors(caplog)
    assert (
        len(errors) == 1
        and "checkpoint 40 is past the stream's last sequence 17 for the partition; resuming after sequence 10"
        in errors[0].getMessage()
    )
    assert _rewinds(captured) == [({"service": "toy", "partition": 0}, 1)]


async def test_a_purged_stream_is_no_rewind(nats_server, caplog):
    """Purged (or aged out): the stream's first sequence is past the checkpoint, its sequences go on."""
    captured = MetricsCapture("toy")
    async with Bus.connect(nats_server.url, name="engine-purged", telemetry=captured.telemetry) as bus:
        await ensure_streams(bus)
        positions: dict = {}
        store = CheckedStore(positions)
        keys = [f"k{i % 3}" for i in range(10)]
        old = await publish_inputs(bus, keys, 1, positions)
        eng, _ = engine(bus, store, 1)
        task = await run(eng)
        await until(lambda: all_applied(store, old))
        await stop(task)
        await bus.js.purge_stream(IN_STREAM)
        more = [f"k{i % 3}" for i in range(10, 14)]
        new = await publish_inputs(bus, more, 1, positions, start=len(old))
        eng, _ = engine(bus, store, 1)
        task = await run(eng)
        await until(lambda: _applied_once(store, new))
        await stop(task)

    assert await applied(store) == _in_order(old + new, keys + more)
    assert not [r for r in caplog.records if r.levelno == logging.ERROR]
    assert _rewinds(captured) == []
