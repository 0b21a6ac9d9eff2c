"""Identity's own start-up read of JetStream (how long EVENTS_RAW keeps an event, which bounds how long a
deletion's suppression drops older events) asked again while nats-server stalls longer than a request's
5 s (CI's loaded workers, a node under pressure), as the kit's setup requests are
(`cdp_kit.bus.setup.answered`), where the start failed with a bare TimeoutError."""

from __future__ import annotations

import asyncio

from cdp_identity.notices import events_retention
from cdp_kit.bus import Bus, events_raw_stream

STALL_SECONDS = 7.0  # longer than nats-py's 5 s request timeout


async def test_the_events_retention_is_read_after_a_server_stall(nats_server):
    async with Bus.connect(nats_server.url, name="identity-stalled", connect_timeout=10) as bus:
        await bus.ensure_streams(events_raw_stream(max_age=3 * 86_400))
        with nats_server.paused():
            reading = asyncio.create_task(events_retention(bus.js))
            await asyncio.sleep(STALL_SECONDS)
        assert await asyncio.wait_for(reading, 60) == 3 * 86_400
