"""A partition engine's batches held by a store outage show on `cdp.bus.consumed` as retries.

Found by the on-call helper (stop 43; bus/test_found_s43_retries_counted.py for the plain consumers): a
partition's consumer is ordered, so its failed batches are retried in place, never redelivered, and only
redeliveries were counted: a store that could not write held every partition's batches while
`cdp_bus_consumed_total{outcome="retry"}`, the series docs/operations.md's "Batches retried" alert reads for
exactly that case, stayed where it was."""

from __future__ import annotations

from engine_toy import CheckedStore, Toy, ensure_streams, publish_inputs, spec, until

from cdp_kit.bus import Bus
from cdp_kit.engine import PartitionedEngine
from cdp_testing.metrics import MetricsCapture


def counted(captured: MetricsCapture, outcome: str) -> float:
    _unit, points = captured.collected().get("cdp.bus.consumed", ("", []))
    return sum(p.value for p in points if p.attributes.get("outcome") == outcome)


async def test_a_store_outage_under_a_partition_counts_its_retries(nats_server):
    captured = MetricsCapture("toy")
    async with Bus.connect(nats_server.url, name="engine-retries", telemetry=captured.telemetry) as bus:
        await ensure_streams(bus)
        positions: dict = {}
        store = CheckedStore(positions)
        eng = PartitionedEngine(Toy(store), spec(1), bus=bus, store=store)
        try:
            await eng.start()
            await eng.wait_ready()
            store.down = True  # every commit answers Unavailable (a full disk)
            ids = await publish_inputs(bus, ["a", "b", "c"], 1, positions)

            async def retried():
                return counted(captured, "retry") >= 1

            await until(retried, timeout=30)
            store.down = False

            async def applied():
                return eng.pipelines[0].checkpoint >= positions[ids[-1]][1]

            await until(applied, timeout=30)
            assert counted(captured, "dead_letter") == 0
            assert not store.violations
        finally:
            store.down = False
            await eng.close()
