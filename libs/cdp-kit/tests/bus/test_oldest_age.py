"""A consumer's oldest unacknowledged message has its age on /metrics (`cdp.bus.consumer.oldest_age`), next
to its lag: a count alone does not tell a stuck consumer from a busy one without sampling it twice by hand.
On a real nats-server: a handler that does not return holds its message unacknowledged, and its age grows;
once acknowledged, none waits."""

from __future__ import annotations

import asyncio
import time

from cdp_kit.bus import Bus, ConsumerSpec, OutMessage, dead_letter_stream, events_raw_stream
from cdp_kit.bus.consumer import may_read_messages
from cdp_kit.natsauth import ROLES
from cdp_testing.metrics import MetricsCapture


def oldest_age(captured: MetricsCapture, durable: str) -> float:
    unit, points = captured.collected()["cdp.bus.consumer.oldest_age"]
    assert unit == "s"
    (age,) = [p.value for p in points if p.attributes.get("consumer") == durable]
    return age


async def until(predicate, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_the_age_of_an_unacknowledged_message_grows_and_is_gone_once_acknowledged(nats_server):
    captured = MetricsCapture("identity")
    async with Bus.connect(nats_server.url, name="oldest", telemetry=captured.telemetry) as bus:
        await bus.ensure_streams(events_raw_stream(), dead_letter_stream())
        release = asyncio.Event()
        got: list[bytes] = []

        async def stuck(batch):
            got.extend(d.data for d in batch)
            await release.wait()  # the handler has not returned: nothing is acknowledged

        spec = ConsumerSpec("EVENTS_RAW", "identity-p0", ("events.raw.0",), fetch_timeout=0.2)
        runner = bus.consumer(spec, stuck)
        task = asyncio.create_task(runner.run())
        await asyncio.wait_for(runner.wait_ready(), 5)
        await runner.observe(await bus.js.consumer_info("EVENTS_RAW", "identity-p0"))
        assert oldest_age(captured, "identity-p0") == 0  # nothing waits

        # Another partition's message first: the age is that of the consumer's own (its filter's) oldest.
        await bus.publisher.publish_batch([OutMessage("events.raw.1", b"other", "o-1")])
        await asyncio.sleep(1.0)
        published = time.time()
        await bus.publisher.publish_batch([OutMessage("events.raw.0", b"a", "a-1")])

        async def delivered():
            return got == [b"a"]

        await until(delivered)
        await asyncio.sleep(1.0)
        await runner.observe(await bus.js.consumer_info("EVENTS_RAW", "identity-p0"))
        first = oldest_age(captured, "identity-p0")
        assert 1.0 <= first <= time.time() - published + 0.5, first  # since it was stored, not the other one
        await asyncio.sleep(0.5)
        assert oldest_age(captured, "identity-p0") > first  # grows while it waits, between polls too

        release.set()

        async def acknowledged():
            return (await bus.js.consumer_info("EVENTS_RAW", "identity-p0")).num_ack_pending == 0

        await until(acknowledged)
        await runner.observe(await bus.js.consumer_info("EVENTS_RAW", "identity-p0"))
        assert oldest_age(captured, "identity-p0") == 0
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_only_a_user_allowed_to_read_a_streams_messages_asks_for_its_oldest():
    """Under per-service credentials a get its role does not grant is refused by nats-server (and answered
    by nothing until the request times out): the poll asks only where the role may."""

    class Connection:
        def __init__(self, user):
            self.options = {"user": user}

    assert may_read_messages(Connection(None), "EVENTS_RAW")  # no service user: tests, an operator
    assert may_read_messages(Connection(lambda: "scoring"), "PROFILES")  # its role reads PROFILES
    assert may_read_messages(Connection("segmentation.2"), "PROFILES")  # a rotated generation: same role
    # A stream a role consumes it may read message by message (natsauth: its lag poll dates the oldest);
    # one it neither reads nor consumes it may not.
    assert "identity" in ROLES and may_read_messages(Connection("identity"), "EVENTS_RAW")
    assert not may_read_messages(Connection(lambda: "scoring"), "ACTIONS")
    assert not may_read_messages(Connection("identity"), "ACTIONS")
