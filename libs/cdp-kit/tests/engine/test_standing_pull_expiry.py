"""A standing pull whose owner is busy past its requests' expiry (a partition's batch that takes longer
than the pull's `expires`: a CRM that hangs, 30 s timeouts): every message delivered meanwhile is handed
over, in order, and the expiry notices (408) that wait in the inbox with them are never an error.

The on-call trial: a message taken from the inbox together with two such notices was dropped (the
second notice raised), a newer message of its partition was applied, and the dropped one, redelivered
after `ack_wait`, was skipped as applied and acknowledged - a person never reached the CRM."""

from __future__ import annotations

import asyncio

from engine_toy import IN_PREFIX, IN_STREAM

from cdp_kit.bus import OutMessage
from cdp_kit.bus.consumer import ConsumerRunner, ConsumerSpec, StandingPull

EXPIRES = 1.0
PAST_EXPIRY = 1.6  # longer than a request lives at the server, with room for a loaded machine


async def _pull(bus, durable: str, subject: str) -> StandingPull:
    spec = ConsumerSpec(stream=IN_STREAM, durable=durable, filter_subjects=(subject,), ack_wait=3600.0, ordered=True)
    runner = ConsumerRunner(bus.js, spec, handler=None, telemetry=bus.telemetry)
    await runner.provision()
    subscription = await bus.js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
    return StandingPull(bus.nc, subscription, 8, expires=EXPIRES, heartbeat=0.3)


async def test_a_message_that_waited_with_expiry_notices_is_handed_over(bus):
    subject = f"{IN_PREFIX}.5"
    pull = await _pull(bus, "expiry-p5", subject)
    assert await pull.fetch(0.05) == []  # a request stands
    await asyncio.sleep(PAST_EXPIRY)  # the owner is busy: the request expires at the server
    assert await pull.fetch(0.05) == []  # its notice is read as the owner asks again
    # Busy again: a message arrives on a standing request, then the requests expire behind it.
    stored = await bus.publisher.publish_batch([OutMessage(subject, b"m", "expiry-m1")])
    await asyncio.sleep(PAST_EXPIRY)
    got = []
    for _ in range(3):
        got += await pull.fetch(0.5)
        if got:
            break
    assert [m.metadata.sequence.stream for m in got] == [r.seq for r in stored]
    # And the pull goes on serving: the next message comes on a request that stands.
    newer = await bus.publisher.publish_batch([OutMessage(subject, b"n", "expiry-m2")])
    later = await pull.fetch(5.0)
    assert [m.metadata.sequence.stream for m in later] == [r.seq for r in newer]
    await pull.close()
