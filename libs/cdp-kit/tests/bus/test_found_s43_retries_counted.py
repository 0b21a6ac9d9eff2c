"""A message tried again in place is counted as a retry (`cdp.bus.consumed`, outcome `retry`).

Found by the on-call helper (stop 43). docs/operations.md's "Batches retried" alert
(`rate(cdp_bus_consumed_total{outcome="retry"}[5m]) > 0` for 10 minutes) is what it gives for a store that
cannot write ("A store that cannot write holds every batch"), and its lag section reads a climbing `retry`
as a consumer failing its batches. But a store outage (`Unavailable`) and an ordered consumer's failures
are retried in place, without a redelivery, and only a redelivery (a nak) was counted: through a whole
outage the series did not move, and a partition engine's batches (retried in place by its careful path)
never moved it at all. Each attempt made again now counts its messages, whichever way it is made."""

from __future__ import annotations

import asyncio

import pytest

from cdp_kit.bus import Bus, ConsumerSpec, OutMessage, dead_letter_stream, events_raw_stream
from cdp_kit.errors import Unavailable
from cdp_testing.metrics import MetricsCapture


class Outage:
    """A handler whose store answers Unavailable for its first `failing` calls."""

    def __init__(self, failing: int) -> None:
        self.failing, self.failed, self.applied = failing, 0, []

    async def __call__(self, batch) -> None:
        if self.failed < self.failing:
            self.failed += 1
            raise Unavailable("sqlite store /data/cdp.db: database or disk is full")
        self.applied.extend(int(d.data) for d in batch)


def outcomes(captured: MetricsCapture) -> dict[str, float]:
    _unit, points = captured.collected().get("cdp.bus.consumed", ("", []))
    found: dict[str, float] = {}
    for p in points:
        found[p.attributes["outcome"]] = found.get(p.attributes["outcome"], 0) + p.value
    return found


@pytest.mark.parametrize("ordered", [False, True], ids=["unordered", "ordered"])
@pytest.mark.parametrize("messages", [1, 4], ids=["alone", "a-batch"])
async def test_an_outage_retried_in_place_counts_its_retries(nats_server, ordered, messages):
    captured = MetricsCapture("toy")
    async with Bus.connect(nats_server.url, name="retries", telemetry=captured.telemetry) as bus:
        await bus.ensure_streams(events_raw_stream(), dead_letter_stream())
        await bus.publisher.publish_batch(
            [OutMessage("events.raw.0", str(i).encode(), f"id-{i}") for i in range(messages)]
        )
        handler = Outage(failing=6)
        spec = ConsumerSpec(
            stream="EVENTS_RAW",
            durable="t",
            filter_subjects=("events.raw.>",),
            backoff=(0.05,),
            fetch_timeout=0.2,
            batch_size=messages,
            max_deliver=3,
            ordered=ordered,
        )
        runner = bus.consumer(spec, handler)
        task = asyncio.create_task(runner.run())
        try:
            deadline = asyncio.get_running_loop().time() + 15
            while sorted(handler.applied) != list(range(messages)):
                assert asyncio.get_running_loop().time() < deadline, "not applied in time"
                await asyncio.sleep(0.02)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    counted = outcomes(captured)
    assert counted.get("ack") == messages and "dead_letter" not in counted, counted
    assert counted.get("retry", 0) >= 1, counted  # the outage shows on the documented series
