"""Closing an engine whose partition fails every batch returns promptly, and acknowledges nothing it did
not apply: the messages come again to the next owner.

After a failed batch the partition goes the careful way (`ConsumerRunner`'s isolation): it retries in
place with backoff - forever while the store is unavailable (an outage dead-letters nothing), and for
minutes while a part keeps failing on its own (the isolation's rounds hold the rest at the spec's last
backoff). A stop that waited for that to end kept a service past its shutdown grace (Kubernetes then
kills it, the clean close lost) and a test's teardown past its timeout.
"""

from __future__ import annotations

import asyncio

import pytest
from engine_toy import CheckedStore, applied, checkpoint_of, engine, publish_inputs, until
from test_pipeline import keys_in

from cdp_kit.errors import InvalidArgument, Unavailable


class FailingStore(CheckedStore):
    """Every commit writing the toy's state fails with `error` while it is set."""

    def __init__(self, positions) -> None:
        super().__init__(positions)
        self.error: Exception | None = None
        self.failures = 0
        self.gate: asyncio.Event | None = None  # a failing commit waits for it while `hold_when()` says so
        self.hold_when = lambda: False
        self.waiting = 0

    async def _bulk_write(self, ops):
        if self.error is not None and any(getattr(op, "collection", "") == "toy_counters" for op in ops):
            if self.gate is not None and self.hold_when():
                self.waiting += 1
                await self.gate.wait()
            self.failures += 1
            raise self.error
        return await super()._bulk_write(ops)


@pytest.mark.parametrize(
    "error",
    [Unavailable("store down"), InvalidArgument("applied", "the store cannot keep the value")],
    ids=["outage", "plain"],
)
async def test_close_returns_promptly_while_every_commit_fails(bus, error):
    positions = {}
    store = FailingStore(positions)
    store.error = error
    keys = keys_in(0, 1, 12)
    ids = await publish_inputs(bus, keys, 1, positions)
    # Long holds between the careful path's attempts, as a service's backoff is (seconds to a minute).
    eng, logic = engine(bus, store, 1, backoff=(30.0,), max_deliver=5)
    await eng.start()
    await asyncio.wait_for(eng.wait_ready(), 10)
    # The pipelined batch failed, the partition recovered, and the careful path failed too.
    await until(lambda: _true(len(logic.recoveries) >= 2 and store.failures >= 2))

    await asyncio.wait_for(eng.close(), 5)

    assert not eng.pipelines
    assert await store.count("toy_counters") == 0
    assert await checkpoint_of(store) == 0  # claimed by the partition's owner, never advanced
    info = await bus.js.consumer_info("TOYIN", "toy-p0")
    assert info.ack_floor.stream_seq == 0  # nothing acknowledged: all of it comes again

    # The next owner, its store fixed, applies every message once: nothing was lost. The same logic
    # (a partition that comes back to this replica): its hot state holds nothing the store does not.
    store.error = None
    await _next_owner_applies_all(bus, store, logic, ids)


async def _next_owner_applies_all(bus, store, logic, ids) -> None:
    """The partition's next owner (the same logic: it came back to this replica) applies every message
    once: nothing was lost, and the hot state held nothing the store did not."""
    nxt, _ = engine(bus, store, 1, logic=logic, backoff=(0.05,))
    await nxt.start()
    await until(lambda: _all_applied(store, ids))
    await asyncio.wait_for(nxt.close(), 10)
    assert sorted(i for v in (await applied(store)).values() for i in v) == sorted(ids)
    assert not store.violations


async def _true(value):
    return value


async def _all_applied(store, ids):
    got = await applied(store)
    return sum(len(v) for v in got.values()) >= len(ids)


async def test_close_during_a_careful_commit_waits_for_it_and_its_recovery(bus):
    """A stop while a careful attempt's commit is in flight ends the partition after that commit failed
    and the hot state was dropped, not in between: the hot state never keeps what the store does not."""
    positions = {}
    store = FailingStore(positions)
    store.error = Unavailable("store down")
    keys = keys_in(0, 1, 12)
    ids = await publish_inputs(bus, keys, 1, positions)
    eng, logic = engine(bus, store, 1, backoff=(30.0,), max_deliver=5)
    # The pipelined batch fails; the first careful attempt's commit waits.
    store.gate, store.hold_when = asyncio.Event(), lambda: bool(logic.recoveries)
    await eng.start()
    await asyncio.wait_for(eng.wait_ready(), 10)
    await until(lambda: _true(store.waiting == 1))
    recoveries = len(logic.recoveries)
    assert logic.cache.get(0)  # applied, not yet committed
    pipeline = eng.pipelines[0]
    closing = asyncio.create_task(eng.close())
    await until(lambda: _true(pipeline._stopping.is_set()))
    for _ in range(20):  # loop turns (not time) for the stop to reach the careful path
        await asyncio.sleep(0)
    assert not closing.done()
    store.gate.set()  # that commit fails now; the partition recovers from it, then ends
    await asyncio.wait_for(closing, 5)
    assert len(logic.recoveries) == recoveries + 1
    assert 0 not in logic.cache

    store.error, store.gate = None, None
    await _next_owner_applies_all(bus, store, logic, ids)
