"""Scoring's own start-up requests to JetStream (the model bucket's look-up, the label watch's consumer)
asked again while nats-server stalls longer than a request's 5 s (CI's loaded workers, a node under
pressure), as the kit's setup requests are (`cdp_kit.bus.setup.answered`), where the start failed with
a bare TimeoutError."""

from __future__ import annotations

import asyncio

from cdp_kit.bus import Bus, events_resolved_stream
from cdp_scoring.labelwatch import _create_delivering_new, consumer_spec
from cdp_scoring.modelstore import ObjectModelStore

STALL_SECONDS = 7.0  # longer than nats-py's 5 s request timeout


async def _during_a_stall(nats_server, work):
    with nats_server.paused():
        task = asyncio.create_task(work)
        await asyncio.sleep(STALL_SECONDS)
    return await asyncio.wait_for(task, 60)


async def test_the_model_bucket_is_found_after_a_server_stall(nats_server):
    async with Bus.connect(nats_server.url, name="scoring-stalled", connect_timeout=10) as bus:
        made = ObjectModelStore(bus.js, "cdp_models_stalled")
        digest = await made.put("churn_risk", "1.0.0", b"onnx bytes")  # the bucket exists from here on
        store = ObjectModelStore(bus.js, "cdp_models_stalled")  # a start: the bucket looked up first
        assert await _during_a_stall(nats_server, store.get("churn_risk", "1.0.0", digest)) == b"onnx bytes"


async def test_the_label_watch_consumer_is_made_after_a_server_stall(nats_server):
    async with Bus.connect(nats_server.url, name="scoring-stalled", connect_timeout=10) as bus:
        await bus.ensure_streams(events_resolved_stream())
        spec = consumer_spec()
        await _during_a_stall(nats_server, _create_delivering_new(bus, spec))
        info = await bus.js.consumer_info(spec.stream, spec.durable)
        assert info.config.deliver_policy == "new"
