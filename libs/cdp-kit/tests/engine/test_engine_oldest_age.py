"""A partition engine's consumer has its oldest unacknowledged message's age on /metrics too
(`cdp.bus.consumer.oldest_age`, polled with its lag): the partition engines (identity, profile, ...) are
where a backlog grows first. A store that holds its commits keeps the input unacknowledged."""

from __future__ import annotations

import asyncio

from engine_toy import CheckedStore, Toy, ensure_streams, publish_inputs, spec, until

from cdp_kit.bus import Bus
from cdp_kit.engine import PartitionedEngine
from cdp_kit.engine import pipeline as pipeline_module
from cdp_testing.metrics import MetricsCapture


async def test_a_held_partition_reports_the_age_of_its_oldest_input_until_it_is_committed(nats_server, monkeypatch):
    monkeypatch.setattr(pipeline_module, "LAG_POLL_SECONDS", 0.2)  # the poll's cadence, not its result
    captured = MetricsCapture("toy")

    def ages() -> list[float]:
        _unit, points = captured.collected().get("cdp.bus.consumer.oldest_age", ("s", []))
        return [p.value for p in points if p.attributes.get("consumer") == "toy-p0"]

    async with Bus.connect(nats_server.url, name="oldest", telemetry=captured.telemetry) as bus:
        await ensure_streams(bus)
        store = CheckedStore({})
        store.hold = asyncio.Event()  # commits wait: nothing is acknowledged
        eng = PartitionedEngine(Toy(store), spec(1), bus=bus, store=store)
        try:
            await eng.start()
            await eng.wait_ready()
            await publish_inputs(bus, ["ada"], 1, store.positions)

            async def waiting_a_second():
                return any(age >= 1.0 for age in ages())

            await until(waiting_a_second)

            store.hold.set()

            async def none_waiting():
                return ages() == [0]

            await until(none_waiting)
        finally:
            store.hold.set()
            await eng.close()
