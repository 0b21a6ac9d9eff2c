"""The engine's standing pull (`cdp_kit.bus.consumer.StandingPull`): one pull request serves many
batches, and a partition that stops leaves nothing behind that the next owner would wait `ack_wait` for."""

from __future__ import annotations

import asyncio

from engine_toy import IN_PREFIX, IN_STREAM, CheckedStore, applied, engine, publish_inputs, until

from cdp_kit.bus import OutMessage
from cdp_kit.bus.consumer import ConsumerRunner, ConsumerSpec, StandingPull


async def test_one_pull_request_serves_many_batches(bus):
    """A pull request per batch was most of what a batch of a few messages cost the engine and the
    server; a quiet partition also asked again every `fetch_timeout`."""
    requests = []

    async def seen(msg) -> None:
        requests.append(msg)

    watch = await bus.nc.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{IN_STREAM}.toy-p0", cb=seen)
    positions: dict = {}
    store = CheckedStore(positions)
    eng, _ = engine(bus, store, 1)
    task = asyncio.create_task(eng.run())
    await asyncio.wait_for(eng.wait_ready(), 10)
    ids: list[str] = []
    for n in range(20):  # one message at a time: twenty batches of one
        ids += await publish_inputs(bus, ["k1"], 1, positions, start=n)
        await until(lambda n=n: _applied_count(store, n + 1))
    await asyncio.sleep(0.3)  # three fetch timeouts of the toy spec with nothing coming
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await watch.unsubscribe()
    assert (await applied(store)) == {"k1": ids}
    # batch_size 8: renewed once fewer than 4 remain owed, so ~20/4 requests, not one per batch (20+).
    assert len(requests) <= 8, len(requests)


async def _applied_count(store, n: int) -> bool:
    return sum(len(v) for v in (await applied(store)).values()) >= n


async def test_what_a_stopped_pull_was_sent_comes_to_the_next_owner_at_once(bus):
    """Messages delivered to a standing pull after its owner's last fetch are unacknowledged. After
    `close()` the next owner (ordered: restarted at the acknowledgement floor) gets them first and at
    once - not after `ack_wait` (an hour here), and not after newer ones."""
    spec = ConsumerSpec(
        stream=IN_STREAM,
        durable="handover-p0",
        filter_subjects=(f"{IN_PREFIX}.0",),
        ack_wait=3600.0,
        ordered=True,
    )

    async def owner() -> StandingPull:
        runner = ConsumerRunner(bus.js, spec, handler=None, telemetry=bus.telemetry)
        await runner.provision()
        subscription = await bus.js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
        return StandingPull(bus.nc, subscription, 16)

    first = await owner()
    assert await first.fetch(0.05) == []  # the request stands
    assert first.outstanding == 16
    stored = await bus.publisher.publish_batch([OutMessage(f"{IN_PREFIX}.0", b"x", f"h-{n}") for n in range(3)])
    inbox = first.inbox._pending_queue

    async def delivered() -> bool:
        return inbox.qsize() >= 3

    await until(delivered, timeout=5)
    await first.close()  # stopped without taking them (an owner handing the partition over)
    newer = await bus.publisher.publish_batch([OutMessage(f"{IN_PREFIX}.0", b"y", "h-3")])

    second = await owner()
    got = []
    while len(got) < 4:
        batch = await second.fetch(5.0)
        assert batch, "the next owner waited for what the last one was sent"
        got += batch
    assert [m.metadata.sequence.stream for m in got] == [r.seq for r in stored + newer]
    for m in got:
        await m.ack()
    await second.close()


async def test_a_quiet_stream_always_has_a_request_waiting(bus):
    """The standing request is renewed before the server expires it: a message that comes just after
    an expiry is handed over at once, not when the owner next looks (up to a heartbeat later)."""
    spec = ConsumerSpec(stream=IN_STREAM, durable="quiet-p1", filter_subjects=(f"{IN_PREFIX}.1",), ordered=True)
    runner = ConsumerRunner(bus.js, spec, handler=None, telemetry=bus.telemetry)
    await runner.provision()
    subscription = await bus.js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
    pull = StandingPull(bus.nc, subscription, 16, expires=2.0, heartbeat=0.9)

    async def later() -> None:
        await asyncio.sleep(2.2)  # the first request expired at the server 0.2 s ago
        await bus.publisher.publish_batch([OutMessage(f"{IN_PREFIX}.1", b"q", "quiet-1")])

    publishing = asyncio.create_task(later())
    got = await pull.fetch(2.6)
    await publishing
    assert [m.data for m in got] == [b"q"]
    await got[0].ack()
    await pull.close()


async def test_the_engine_survives_a_nats_restart_in_order(nats_server, bus):
    """The server restarts: its waiting requests are gone, and what was on its way to the inbox may be.
    The partition resubscribes (at its acknowledgement floor) and goes on, every input applied once and
    in order."""
    positions: dict = {}
    store = CheckedStore(positions)
    eng, _ = engine(bus, store, 1)
    task = asyncio.create_task(eng.run())
    await asyncio.wait_for(eng.wait_ready(), 10)
    ids = await publish_inputs(bus, [f"k{n % 3}" for n in range(10)], 1, positions)
    await until(lambda: _applied_count(store, 10))
    nats_server.restart()

    async def connected() -> bool:
        return bus.connected

    await until(connected, timeout=15)
    keys = [f"k{n % 3}" for n in range(10, 30)]
    for _ in range(40):  # as any producer: until JetStream (recovering its streams) stores them
        try:
            more = await publish_inputs(bus, keys, 1, positions, start=10)
            break
        except AssertionError:
            await asyncio.sleep(0.25)
    await until(lambda: _applied_count(store, 30), timeout=20)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    expected: dict[str, list[str]] = {}
    for n, msg_id in enumerate(ids + more):
        expected.setdefault(f"k{n % 3}", []).append(msg_id)
    assert await applied(store) == expected
    assert not store.violations


async def test_the_engine_stops_while_its_consumer_cannot_be_bound_after_a_reconnect(nats_server, bus):
    """`cdpctl up` SIGKILLed: the kernel tells every child to stop at once, nats-server among them, just
    after a reconnect. A partition that lost its pull binds its consumer again, and JetStream cannot answer
    (here: provisioning fails as it does while the server is gone or its streams are still recovering).
    A stop must still end the partition instead of retrying the bind for ever (the service never exited)."""
    eng, _ = engine(bus, CheckedStore({}), 1)
    task = asyncio.create_task(eng.run())
    await asyncio.wait_for(eng.wait_ready(), 10)
    pipeline = eng.pipelines[0]
    binds = 0

    async def not_ready() -> None:
        nonlocal binds
        binds += 1
        raise TimeoutError

    pipeline.runner.provision = not_ready
    nats_server.restart()

    async def rebinding() -> bool:
        return binds >= 2

    await until(rebinding, timeout=15)  # the pull was lost in the reconnect, and the bind fails
    task.cancel()  # the service stopping: release every partition, draining
    done, _ = await asyncio.wait([task], timeout=30)
    assert done, "the engine kept trying to bind its consumer after it was told to stop"


async def test_a_woken_fetch_returns_at_once_and_later_fetches_do_not_wait(bus):
    """A partition that stops wakes its pull: a fetch waiting on a quiet stream returns what it has
    (nothing) now, not after its timeout - every service stop and partition handover used to sit it out."""
    spec = ConsumerSpec(stream=IN_STREAM, durable="wake-p0", filter_subjects=(f"{IN_PREFIX}.0",), ordered=True)
    runner = ConsumerRunner(bus.js, spec, handler=None, telemetry=bus.telemetry)
    await runner.provision()
    subscription = await bus.js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
    pull = StandingPull(bus.nc, subscription, 16)
    waiting = asyncio.create_task(pull.fetch(3600.0))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    pull.wake()
    assert await asyncio.wait_for(waiting, 5) == []
    assert await asyncio.wait_for(pull.fetch(3600.0), 5) == []
    await pull.close()


async def test_an_engine_stops_without_waiting_out_a_long_fetch_timeout(bus):
    """A stop drains what was applied and returns; with an hour's fetch timeout on a quiet stream it
    still returns (the pull is woken), with everything applied and acknowledged."""
    positions: dict = {}
    store = CheckedStore(positions)
    eng, _ = engine(bus, store, 2, fetch_timeout=3600.0)
    await eng.start()
    await eng.wait_ready()
    ids = await publish_inputs(bus, ["k1", "k2"], 2, positions)

    async def both() -> bool:
        return sum(len(v) for v in (await applied(store)).values()) == len(ids)

    await until(both)
    await asyncio.wait_for(eng.close(), 10)
    assert sorted(i for v in (await applied(store)).values() for i in v) == sorted(ids)


async def test_a_wake_that_lands_while_the_fetch_timeout_fires_is_taken(bus):
    """A stop can come in the turn a fetch's own timeout fires (asyncio then refuses to move the
    timeout): the wake is still taken - no error, and the fetch after it does not wait."""
    spec = ConsumerSpec(stream=IN_STREAM, durable="wake-p1", filter_subjects=(f"{IN_PREFIX}.1",), ordered=True)
    runner = ConsumerRunner(bus.js, spec, handler=None, telemetry=bus.telemetry)
    await runner.provision()
    subscription = await bus.js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
    pull = StandingPull(bus.nc, subscription, 16)
    try:
        async with asyncio.timeout(0) as firing:
            await asyncio.sleep(1)
    except TimeoutError:
        pass
    pull._waiting = firing  # the state a fetch is in while its timeout fires
    pull.wake()
    pull._waiting = None
    assert await asyncio.wait_for(pull.fetch(3600.0), 5) == []
    await pull.close()
