"""A partition this replica released has no lag and no oldest age on its /metrics any more.

Found by the on-call helper (stop 43). The bus gauges (`cdp.bus.consumer.lag`, `cdp.bus.consumer.oldest_age`)
are reported for every consumer runner still alive in the process, and a released partition's runner lived on
in a reference cycle (feed -> runner -> handler -> pipeline -> feed) until a full garbage collection: services
raise the collector's thresholds (identity, segmentation, orchestration, crm) and freeze what start-up made
(profile, segmentation, orchestration), so a partition taken at start and handed to another replica (a scale-up,
a rolling update) never was. The old replica went on reporting the lag it last polled beside the new owner's
(`sum by (stream, consumer)` counted it twice), and the oldest age, aged at each scrape, grew for ever: the
"Consumer stuck" page (docs/operations.md) fired five minutes after a hand-over of a partition with a backlog.

The collector is off during the test, as it is in effect in those services."""

from __future__ import annotations

import asyncio
import gc

from engine_toy import CheckedStore, Toy, ensure_streams, publish_inputs, spec, until

from cdp_kit.bus import Bus, ConsumerSpec
from cdp_kit.engine import PartitionedEngine
from cdp_kit.engine import pipeline as pipeline_module
from cdp_testing.metrics import MetricsCapture


def series(captured: MetricsCapture, name: str, consumer: str) -> list[float]:
    _unit, points = captured.collected().get(name, ("", []))
    return [p.value for p in points if p.attributes.get("consumer") == consumer]


async def test_a_released_partition_with_a_backlog_leaves_no_lag_or_age_behind(nats_server, monkeypatch):
    monkeypatch.setattr(pipeline_module, "LAG_POLL_SECONDS", 0.1)  # the poll's cadence, not its result
    captured = MetricsCapture("toy")
    collecting = gc.isenabled()
    gc.disable()
    try:
        async with Bus.connect(nats_server.url, name="released", telemetry=captured.telemetry) as bus:
            await ensure_streams(bus)
            store = CheckedStore({})
            store.hold = asyncio.Event()  # commits wait: a backlog builds behind them
            eng = PartitionedEngine(Toy(store), spec(1), bus=bus, store=store)
            try:
                await eng.start()
                await eng.wait_ready()
                await publish_inputs(bus, [f"k{n}" for n in range(200)], 1, store.positions)

                async def behind():
                    lag = series(captured, "cdp.bus.consumer.lag", "toy-p0")
                    age = series(captured, "cdp.bus.consumer.oldest_age", "toy-p0")
                    return bool(lag) and lag[0] > 0 and bool(age) and age[0] > 0.3

                await until(behind)

                # The hand-over: the partition is released (what is in flight commits), the backlog stays for
                # the next owner.
                releasing = asyncio.create_task(eng.stop_partition(0))
                store.hold.set()
                await asyncio.wait_for(releasing, 15)
                assert 0 not in eng.owned()

                _unit, engine_lag = captured.collected().get("cdp.engine.lag", ("", []))
                assert engine_lag == [], engine_lag  # the engine's own gauge, keyed by owned partition, went (control)
                assert series(captured, "cdp.bus.consumer.lag", "toy-p0") == [], "lag of a released partition"
                assert series(captured, "cdp.bus.consumer.oldest_age", "toy-p0") == [], (
                    "oldest age of a released partition"
                )

                # Taken again, it reports again.
                await eng.start_partition(0)
                await eng.wait_ready()

                async def reported():
                    return bool(series(captured, "cdp.bus.consumer.lag", "toy-p0"))

                await until(reported)
            finally:
                store.hold.set()
                await eng.close()
    finally:
        if collecting:
            gc.enable()


async def test_a_stopped_plain_consumer_leaves_no_lag_behind_and_reports_again_when_run(nats_server):
    captured = MetricsCapture("toy")
    collecting = gc.isenabled()
    gc.disable()
    try:
        async with Bus.connect(nats_server.url, name="released-plain", telemetry=captured.telemetry) as bus:
            await ensure_streams(bus)
            await publish_inputs(bus, ["a", "b", "c"], 1, {})

            async def hold(_batch) -> None:
                await asyncio.Event().wait()  # nothing is acknowledged while it runs

            runner = bus.consumer(ConsumerSpec("TOYIN", "toy-plain", ("toyin.>",), batch_size=1), hold)
            for _round in range(2):  # stopped, then run again (a dispatcher whose ownership comes back)
                running = asyncio.create_task(runner.run())
                await runner.wait_ready()

                async def polled():
                    return series(captured, "cdp.bus.consumer.lag", "toy-plain") != []

                await until(polled)
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
                assert series(captured, "cdp.bus.consumer.lag", "toy-plain") == [], "lag of a stopped consumer"
                assert series(captured, "cdp.bus.consumer.oldest_age", "toy-plain") == []
    finally:
        if collecting:
            gc.enable()
