"""Scoring's own start-up requests to JetStream (the model bucket's look-up, the label watch's consumer)
asked again while nats-server stalls longer than a request's 5 s (CI's loaded workers, a node under
pressure), as the kit's setup requests are (`cdp_kit.bus.setup.answered`), where the start failed with
a bare TimeoutError."""

from __future__ import annotations

import asyncio
import logging
import time

from cdp_kit.bus import Bus, events_resolved_stream
from cdp_scoring.labelwatch import _create_delivering_new, consumer_spec
from cdp_scoring.modelstore import ObjectModelStore


def _asked_again(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "asking again" in r.getMessage()]


async def _during_a_stall(nats_server, caplog, work):
    """`work` run while nats-server is frozen until its request was asked again (past nats-py's 5 s): not
    for a fixed time, which a loaded machine may spend before the request is even sent, so that the retry
    itself is what the test sees. Before the retries: a bare TimeoutError, raised at the end."""
    caplog.set_level(logging.INFO, logger="cdp.bus")
    with nats_server.paused():
        task = asyncio.create_task(work)
        deadline = time.monotonic() + 60
        while not _asked_again(caplog) and not task.done():
            assert time.monotonic() < deadline, "the request was neither answered nor asked again"
            await asyncio.sleep(0.1)
    result = await asyncio.wait_for(task, 60)
    assert _asked_again(caplog)
    return result


async def test_the_model_bucket_is_found_after_a_server_stall(nats_server, caplog):
    async with Bus.connect(nats_server.url, name="scoring-stalled", connect_timeout=10) as bus:
        made = ObjectModelStore(bus.js, "cdp_models_stalled")
        digest = await made.put("churn_risk", "1.0.0", b"onnx bytes")  # the bucket exists from here on
        store = ObjectModelStore(bus.js, "cdp_models_stalled")  # a start: the bucket looked up first
        assert await _during_a_stall(nats_server, caplog, store.get("churn_risk", "1.0.0", digest)) == b"onnx bytes"


async def test_the_label_watch_consumer_is_made_after_a_server_stall(nats_server, caplog):
    async with Bus.connect(nats_server.url, name="scoring-stalled", connect_timeout=10) as bus:
        await bus.ensure_streams(events_resolved_stream())
        spec = consumer_spec()
        await _during_a_stall(nats_server, caplog, _create_delivering_new(bus, spec))
        info = await bus.js.consumer_info(spec.stream, spec.durable)
        assert info.config.deliver_policy == "new"
