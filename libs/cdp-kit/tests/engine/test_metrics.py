"""What the engine puts on a service's /metrics page: one series per stage histogram per service, however
many partitions it works on (a histogram series is ~19 exposition lines; per partition they made a
profile replica's page 400 KB, its 1 Hz scrape ~6 % of the process' CPU). What is per partition is
the lag gauge (one line each), and a recovery names its partition."""

from __future__ import annotations

from engine_toy import CheckedStore, applied, engine, ensure_streams, publish_inputs, until

from cdp_kit.bus import Bus
from cdp_testing.metrics import MetricsCapture

STAGES = (
    "cdp.engine.bus.wait.duration",
    "cdp.engine.slot.wait.duration",
    "cdp.engine.decode.duration",
    "cdp.engine.batch.apply.duration",
    "cdp.engine.commit.duration",
    "cdp.engine.publish.duration",
    "cdp.engine.ack.duration",
)


async def test_stage_histograms_have_one_series_per_service_whatever_the_partitions(nats_server):
    captured = MetricsCapture("toy")
    async with Bus.connect(nats_server.url, name="engine-metrics", telemetry=captured.telemetry) as bus:
        await ensure_streams(bus)
        positions: dict = {}
        store = CheckedStore(positions)
        keys = [f"k{i}" for i in range(64)]  # spread over the four partitions
        ids = await publish_inputs(bus, keys, 4, positions)
        eng, _ = engine(bus, store, 4)
        await eng.start()
        try:
            await eng.wait_ready()

            async def done():
                return sum(len(v) for v in (await applied(store)).values()) >= len(ids)

            await until(done)
        finally:
            await eng.close()
    metrics = captured.collected()
    for name in STAGES:
        unit, points = metrics[name]
        assert unit == "ms"
        assert [dict(p.attributes) for p in points] == [{"service": "toy"}], name
        assert points[0].count >= 4  # every partition's batches in the one series
