"""Every consumer and every engine of a process has its lag on /metrics, not only the first one made.

The OpenTelemetry SDK keeps the first observable gauge of a name and drops the callbacks of any later one,
so a gauge made per runner showed one consumer per process: a soak under `make up` found the webhook, SMS,
push and in-app dispatchers, the privacy consumers and profile's second engine with no lag series at all,
so a stuck one raised no alarm."""

from __future__ import annotations

from engine_toy import CheckedStore, Toy, ensure_streams, spec

from cdp_kit.bus import Bus, ConsumerSpec, dead_letter_stream, events_raw_stream
from cdp_kit.engine import PartitionedEngine
from cdp_testing.metrics import MetricsCapture


async def nothing(_batch) -> None:
    return None


def lag_series(captured: MetricsCapture, name: str) -> dict[str, float]:
    _unit, points = captured.collected()[name]
    return {",".join(f"{k}={v}" for k, v in sorted(p.attributes.items())): p.value for p in points}


async def test_each_consumer_runner_of_a_process_reports_its_lag(nats_server):
    captured = MetricsCapture("orchestration")
    names = ("dispatch-email", "dispatch-webhook", "privacy")
    async with Bus.connect(nats_server.url, name="lag-gauges", telemetry=captured.telemetry) as bus:
        await bus.ensure_streams(events_raw_stream(), dead_letter_stream())
        runners = [bus.consumer(ConsumerSpec("EVENTS_RAW", name, ("events.raw.>",)), nothing) for name in names]
        for pending, runner in enumerate(runners, start=1):
            runner.pending = pending
        series = lag_series(captured, "cdp.bus.consumer.lag")
    assert sorted(series.values()) == [1, 2, 3], series
    for name in names:
        assert any(f"={name}" in key for key in series), (name, series)


async def test_each_engine_of_a_process_reports_its_lag(nats_server):
    captured = MetricsCapture("profile")
    async with Bus.connect(nats_server.url, name="lag-gauges", telemetry=captured.telemetry) as bus:
        await ensure_streams(bus)
        store = CheckedStore({})
        engines = [
            PartitionedEngine(Toy(store), spec(2, service=service), bus=bus, store=store)
            for service in ("events", "merges")
        ]
        try:
            for eng in engines:
                await eng.start()
            for eng in engines:
                await eng.wait_ready()
            series = lag_series(captured, "cdp.engine.lag")
        finally:
            for eng in engines:
                await eng.close()
    assert len(series) == 4, series  # two partitions of each engine
    assert any("events" in key for key in series) and any("merges" in key for key in series), series
