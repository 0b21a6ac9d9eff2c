"""A service's receiver of a core NATS subject takes only what was published on it.

Any NATS user that may create a consumer on a stream it reads can make it a push consumer whose deliver
subject is another service's core subject; nats-server then publishes the stream's messages onto it (an
open nats-server issue: the deliver subject is not checked against the creator's publish permission). A
pushed message keeps its stream subject (`cdp_kit.bus.subjects.published_on`), and each receiver drops it.

`pushed_then_published` drives one receiver: it stores `pushed` in `stream`, makes a push consumer of
that stream deliver onto `subject`, waits until nats-server has pushed the message there, then publishes
`published` on the subject as its owner would. The receiver's subscription handles the two in that order,
so once the caller sees `published` taken, the pushed message was already dropped (or taken).
`reloads_taken` does it for a receiver that reloads what a message names (`owner.<method>(name)`) and
returns every name it reloaded: `["control"]` when it drops the pushed message."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from nats.js.api import ConsumerConfig, DeliverPolicy

from cdp_kit.bus import Bus, subjects

DURABLE = "aimed-at-a-core-subject"


async def pushed_then_published(
    bus: Bus, *, stream: str, stream_subject: str, subject: str, pushed: bytes, published: bytes
) -> None:
    await bus.js.publish(stream_subject, pushed)
    await bus.js.add_consumer(
        stream, ConsumerConfig(durable_name=DURABLE, deliver_subject=subject, deliver_policy=DeliverPolicy.ALL)
    )
    deadline = time.monotonic() + 10
    while (await bus.js.consumer_info(stream, DURABLE)).delivered.stream_seq < 1:
        assert time.monotonic() < deadline, "nats-server did not push the message"
        await asyncio.sleep(0.02)
    await bus.nc.publish(subject, published)


async def taken(seen: Callable[[], list[str]], published: str) -> list[str]:
    """Wait until the receiver took `published` (it appears in `seen()`); everything it took."""
    deadline = time.monotonic() + 10
    while published not in seen():
        assert time.monotonic() < deadline, f"the announcement was not taken: {seen()}"
        await asyncio.sleep(0.02)
    return seen()


async def reloads_taken(bus: Bus, monkeypatch, owner: object, method: str, subject: str) -> list[str]:
    """Every name `owner.<method>` was called with (recorded, then called through) while a message of
    PROFILES is pushed onto `subject` ("pushed") and "control" is published on it; once "control" is taken."""
    reloaded: list[str] = []
    reload = getattr(owner, method)

    async def recording(name: str) -> None:
        reloaded.append(name)
        await reload(name)

    monkeypatch.setattr(owner, method, recording)
    await pushed_then_published(
        bus,
        stream=subjects.PROFILES,
        stream_subject=subjects.profiles_changed(0),
        subject=subject,
        pushed=b"pushed",
        published=b"control",
    )
    return await taken(lambda: reloaded, "control")
