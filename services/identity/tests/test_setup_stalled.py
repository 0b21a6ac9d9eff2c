"""Identity's own start-up read of JetStream (how long EVENTS_RAW keeps an event, which bounds how long a
deletion's suppression drops older events) asked again while nats-server stalls longer than a request's
5 s (CI's loaded workers, a node under pressure), as the kit's setup requests are
(`cdp_kit.bus.setup.answered`), where the start failed with a bare TimeoutError."""

from __future__ import annotations

import asyncio
import logging
import time

from cdp_identity.notices import events_retention
from cdp_kit.bus import Bus, events_raw_stream, subjects


def _asked_again(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "asking again" in r.getMessage()]


async def test_the_events_retention_is_read_after_a_server_stall(nats_server, caplog):
    caplog.set_level(logging.INFO, logger="cdp.bus")
    async with Bus.connect(nats_server.url, name="identity-stalled", connect_timeout=10) as bus:
        await bus.ensure_streams(events_raw_stream(max_age=3 * 86_400))
        with nats_server.paused():
            reading = asyncio.create_task(events_retention(bus.js))
            # Stalled until the read's first request timed out (nats-py's 5 s) and is asked again - not for a
            # fixed time, which a loaded machine may spend before the request is even sent - or until the read
            # failed (before: a bare TimeoutError, raised below).
            deadline = time.monotonic() + 60
            while not _asked_again(caplog) and not reading.done():
                assert time.monotonic() < deadline, "the read was neither answered nor asked again"
                await asyncio.sleep(0.1)
        assert await asyncio.wait_for(reading, 60) == 3 * 86_400
    asked_again = _asked_again(caplog)
    assert asked_again and all(subjects.EVENTS_RAW in line for line in asked_again), asked_again
