"""A member's tasks end when cancelled, whatever the store client does with the cancellation.

An event loop's teardown (asyncio.Runner, as pytest-asyncio closes a test's loop) cancels every task left
once and waits for all of them. After a failed ownership test its members were left running; one whose
round swallowed that cancellation ran on, a round every interval, and the test run never ended. nats-py
swallows it two ways: a request returns its reply when the cancellation lands in the loop turn the reply
does (3.11's `asyncio.wait_for`), and a cleanup that fails on a closed connection (the scan's unsubscribe)
raises an error in its place. Each test bounds its wait, so a task that runs on fails it instead of
hanging the run.
"""

from __future__ import annotations

import asyncio

import nats
from test_leased_protocol import MemoryStore

from cdp_kit.ownership import LeasedOwnership
from cdp_kit.ownership.group_kv import GroupKv
from cdp_kit.ownership.nats_kv import NatsKvLeaseStore
from cdp_testing.waiting import eventually

BOUND = 5.0  # a guard against waiting for ever, not a speed figure


async def ended(task: asyncio.Task) -> bool:
    done, _ = await asyncio.wait({task}, timeout=BOUND)
    return bool(done)


class RepliedStore(MemoryStore):
    """Each heartbeat waits for a reply the way nats-py's requests do (3.11's `asyncio.wait_for`)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: asyncio.Queue[asyncio.Future] = asyncio.Queue()

    async def heartbeat(self, identity):
        reply = asyncio.get_running_loop().create_future()
        self.asked.put_nowait(reply)
        await asyncio.wait_for(reply, 5)
        await super().heartbeat(identity)


async def test_a_round_whose_reply_lands_with_the_cancellation_ends_the_loop():
    store = RepliedStore()
    member = LeasedOwnership(store, partitions=2, identity="m-0", ttl=3)
    starting = asyncio.ensure_future(member.start())
    (await store.asked.get()).set_result(None)
    await starting
    loop = member._task
    (await store.asked.get()).set_result(None)  # the next round's reply comes...
    loop.cancel()  # ...in the loop turn the teardown cancels the task: wait_for returns the reply
    try:
        assert await ended(loop), "the member's loop ran on after its cancellation"
        assert loop.cancelled()
    finally:
        member.closing = True
        for _ in range(3):  # a loop that ran on: answered until it sees `closing`
            if loop.done():
                break
            asked = asyncio.ensure_future(store.asked.get())
            await asyncio.wait({loop, asked}, timeout=BOUND, return_when=asyncio.FIRST_COMPLETED)
            if asked.done() and not asked.result().done():
                asked.result().set_result(None)
            asked.cancel()


async def test_a_member_cancelled_as_its_connection_closes_mid_round_ends(nats_server):
    # What a failed test left behind: the fixture closes the member's connection while a round is in
    # flight (its scan waits for a reply: the server is paused so it stays waiting), then the loop's
    # teardown cancels the member's task once.
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=0)
    store = await NatsKvLeaseStore.open(nc.jetstream(), "identity")
    pause, scanning = nats_server.paused(), asyncio.Event()
    members = store.members

    async def paused_members():
        if scanning.is_set():
            return await members()
        pause.__enter__()
        scanning.set()
        return await members()

    member = LeasedOwnership(store, partitions=2, identity="m-0", ttl=6)
    await member.start()
    store.members = paused_members  # from the next round on
    loop = member._task
    try:
        await asyncio.wait_for(scanning.wait(), BOUND)
        await eventually(lambda: nc._resp_map, timeout=BOUND)  # the scan's request waits for its reply
        await nc.close()
        loop.cancel()
        assert await ended(loop), "the member's loop ran on after its cancellation"
        assert loop.cancelled()
    finally:
        if scanning.is_set():
            pause.__exit__(None, None, None)
        member.closing = True
        await asyncio.wait({loop}, timeout=BOUND)


async def test_a_scan_cancelled_on_a_closed_connection_ends_cancelled(nats_server):
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=0)
    kv = await GroupKv.open(nc.jetstream(), "CDP_OWNERSHIP", "identity")
    await kv.put("identity.members.m-0", b"")
    with nats_server.paused():
        scan = asyncio.create_task(kv.scan("identity.members.>"))
        await eventually(lambda: nc._resp_map, timeout=BOUND)  # its request is out, no reply comes
        await nc.close()
        scan.cancel()
        await asyncio.wait({scan}, timeout=BOUND)
    assert scan.done()
    # Cancelled, not ConnectionClosedError from its cleanup: a caller that logs errors and goes on (a
    # member's round) would have lost the cancellation.
    assert scan.cancelled(), scan.exception()


async def test_a_stop_cancelled_while_it_waits_for_the_loop_gives_up():
    """A stop is cancelled when it overruns (a service's shutdown grace): it ends there, and does not go on
    to release partitions and wait for their drains (here one that never ends)."""
    store, draining = MemoryStore(), asyncio.Event()

    async def on_release(p):
        draining.set()
        await asyncio.Event().wait()  # a drain that does not end

    member = LeasedOwnership(store, partitions=1, identity="m-0", ttl=3)
    await member.start(on_release=on_release)
    stopping = asyncio.ensure_future(member.stop())
    await asyncio.sleep(0)  # one step: the stop has cancelled the loop and waits for it to end
    assert member.closing and member._task is not None and member._task.cancelling()
    stopping.cancel()  # lands while the stop waits for the loop
    try:
        await asyncio.wait({stopping}, timeout=BOUND)
        assert stopping.done(), "the stop went on after its cancellation"
        assert stopping.cancelled()
        assert not draining.is_set(), "a cancelled stop started releasing"
    finally:
        for task in [stopping, *member._callbacks.values()]:
            task.cancel()
        await asyncio.wait([stopping, *member._callbacks.values()], timeout=BOUND)


async def test_a_stop_from_a_cancelled_tasks_cleanup_still_releases_every_partition():
    """The engine's `serve` is stopped by cancelling it and calls `stop()` in its `finally`: the task
    is cancelling there already. Taken for a cancellation of the stop itself, every lease stayed in the
    store under the stopped member's name until its TTL - every hand-over (a rolling update, a scale
    down) waited out the TTL instead of happening at once."""
    store = MemoryStore()
    member = LeasedOwnership(store, partitions=2, identity="m-0", ttl=3)
    released: list[int] = []

    async def on_release(p):
        released.append(p)

    async def serve():
        await member.start(on_release=on_release)
        try:
            await asyncio.Event().wait()
        finally:
            await member.stop()

    serving = asyncio.ensure_future(serve())
    await eventually(lambda: member.owned() == frozenset({0, 1}), BOUND)
    serving.cancel()
    assert await ended(serving)
    assert sorted(released) == [0, 1], "the stop gave up before releasing"
    assert all(lease.holder != "m-0" for lease in store.lease_records.values()), "leases left held"
    assert "m-0" not in store.member_records
