"""A message is dead-lettered by whichever comes first - the runner giving up on it, or nats-server's
MAX_DELIVERIES advisory - and the other stores nothing more (same Nats-Msg-Id). It used to log both, so an
on-call trial saw one dead letter logged twice (and an alert on the line would count two)."""

from __future__ import annotations

import logging

from cdp_kit.bus import Bus, ConsumerSpec, dead_letter_stream, events_raw_stream
from cdp_kit.bus.consumer import ConsumerRunner


async def test_a_dead_letter_stored_twice_is_logged_once(nats_server, caplog):
    async with Bus.connect(nats_server.url, name="test", connect_timeout=5) as bus:
        await bus.ensure_streams(events_raw_stream(), dead_letter_stream())
        spec = ConsumerSpec(stream="EVENTS_RAW", durable="logged-once", filter_subjects=("events.raw.>",))
        runner = ConsumerRunner(bus.js, spec, handler=None, telemetry=bus.telemetry)
        letter = dict(data=b"x", headers={}, subject="events.raw.0", seq=7, deliveries=5, reason="handler_error")
        with caplog.at_level(logging.WARNING, logger="cdp.bus"):
            await runner.publish_dead_letter(**letter, detail="gave up")
            await runner.publish_dead_letter(**letter, detail="max deliveries")  # the advisory's, later
        logged = [r for r in caplog.records if "dead-lettered message 7 of logged-once" in r.getMessage()]
        assert len(logged) == 1
        assert (await bus.js.stream_info("DLQ")).state.messages == 1
