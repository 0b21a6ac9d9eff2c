"""A standing pull whose owner is busy past its requests' expiry (a partition's batch that takes longer
than the pull's `expires`: a CRM that hangs, 30 s timeouts): every message delivered meanwhile is handed
over, in order, and the expiry notices (408) that wait in the inbox with them are never an error.

The on-call trial: a message taken from the inbox together with two such notices was dropped (the
second notice raised), a newer message of its partition was applied, and the dropped one, redelivered
after `ack_wait`, was skipped as applied and acknowledged - a person never reached the CRM."""

from __future__ import annotations

import asyncio
import functools

from engine_toy import IN_PREFIX, IN_STREAM, CheckedStore, Toy, applied, engine, publish_inputs, until

from cdp_kit.bus import OutMessage
from cdp_kit.bus.consumer import ConsumerRunner, ConsumerSpec, StandingPull
from cdp_kit.engine import pipeline

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


async def test_an_engine_whose_batches_outlast_its_pull_loses_no_message(bus, monkeypatch):
    """The engine as the CRM connector ran it: each batch takes longer than a pull request lives, and a
    message comes while each one is applied. Every message is applied, in order, and the checkpoint
    never passes one that was not (`CheckedStore`). Before, one came in the inbox with two expiry notices
    and was dropped: the next one was applied past it."""
    monkeypatch.setattr(pipeline, "StandingPull", functools.partial(StandingPull, expires=EXPIRES, heartbeat=0.3))

    async def slow(partition, items) -> None:
        await asyncio.sleep(PAST_EXPIRY)  # a CRM that hangs until its request times out

    positions: dict = {}
    store = CheckedStore(positions)
    logic = Toy(store, on_apply=slow)
    eng, _ = engine(bus, store, 1, logic=logic, in_flight=1, ack_wait=3600.0)
    await eng.start()
    await eng.wait_ready()
    ids = []
    for n in range(6):
        ids += await publish_inputs(bus, ["k1"], 1, positions, start=n)
        await asyncio.sleep(1.0)

    async def all_applied() -> bool:
        return len((await applied(store)).get("k1", [])) >= len(ids) or bool(store.violations)

    await until(all_applied, timeout=60)
    await asyncio.wait_for(eng.close(), 30)
    assert store.violations == []
    assert (await applied(store)) == {"k1": ids}
