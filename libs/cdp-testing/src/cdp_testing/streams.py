"""Reading a whole JetStream stream in a test, to count what a run published.

`get_msg` per sequence is one request and reply per message: tens of seconds for the tens of thousands of
events a fault test sends. `stream_messages` reads the same messages in stream order through an ephemeral
pull consumer (no acks, deleted afterwards), a thousand at a time. Deleted sequences
(gaps) are skipped, as they hold nothing. Everything stored when it is called is returned: it reads up to
the last sequence `stream_info` reported then.
"""

from __future__ import annotations

import asyncio

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cdp_kit.bus import subjects
from cdp_kit.bus.rawevents import events_of

BATCH = 1000


async def stream_messages(js: JetStreamContext, stream: str, *, timeout: float = 30.0) -> list:
    """Every message stored in `stream` now, in stream order (each has `.data`, `.headers`, `.metadata`)."""
    info = await js.stream_info(stream)
    if not info.state.messages:
        return []
    last = info.state.last_seq
    subscription = await js.pull_subscribe(
        "",
        stream=stream,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=60.0),
    )
    consumer = (await subscription.consumer_info()).name
    out: list = []
    try:
        while not out or out[-1].metadata.sequence.stream < last:
            try:
                out.extend(await subscription.fetch(BATCH, timeout=timeout))
            except NatsTimeoutError as exc:
                got = out[-1].metadata.sequence.stream if out else 0
                raise AssertionError(
                    f"{stream}: read to sequence {got} of {last}, then nothing for {timeout}s"
                ) from exc
    finally:
        await subscription.unsubscribe()
        await js.delete_consumer(stream, consumer)
    return [msg for msg in out if msg.metadata.sequence.stream <= last]


async def raw_events(js: JetStreamContext, *, timeout: float = 30.0) -> list[bytes]:
    """Every event stored in EVENTS_RAW now, serialized, in stream order: a message of several events
    (`cdp_kit.bus.rawevents`) gives each of them, in its order."""
    return [
        event
        for msg in await stream_messages(js, subjects.EVENTS_RAW, timeout=timeout)
        for event in events_of(msg.data, msg.headers)
    ]


async def next_dead_letters(js: JetStreamContext, expected: int, *, timeout: float = 5.0) -> list:
    """The next `expected` dead letters, read through one durable pull consumer of the DLQ (`dlq-reader`):
    each call returns the ones after the last call's. A wait longer than `timeout` for one fails."""
    subscription = await js.pull_subscribe(subjects.dead_letter_filter(), durable="dlq-reader", stream=subjects.DLQ)
    got: list = []
    while len(got) < expected:
        got += await subscription.fetch(expected - len(got), timeout=timeout)
    return got


async def settled_consumer(js: JetStreamContext, stream: str, durable: str, *, timeout: float = 5.0):
    """The consumer's info once the server counts nothing of it pending (nothing delivered and unacknowledged,
    nothing undelivered), or as it stands after `timeout`: the caller asserts what it expects of it.

    For a read right after a consumer's stop: every batch was acknowledged before the stop returned, but
    nats-server queues an acknowledgement for the consumer's own goroutine and answers consumer info from
    another, so an info asked at once (even on the connection that sent the acknowledgement, so after it)
    can still count the last batch as pending for some milliseconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        info = await js.consumer_info(stream, durable)
        if (info.num_ack_pending == 0 and info.num_pending == 0) or loop.time() >= deadline:
            return info
        await asyncio.sleep(0.02)
