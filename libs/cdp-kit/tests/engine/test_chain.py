"""WriteChain's group commit: writes queued behind one in flight land together, in order, or fail together."""

from __future__ import annotations

import asyncio
import gc

import pytest

from cdp_kit.engine import EarlierWriteFailed, WriteChain
from cdp_kit.errors import Unavailable
from cdp_kit.storage import Put


class GatedStore:
    """Records each bulk_write; the first waits until released, and one can be told to fail."""

    def __init__(self) -> None:
        self.writes: list[list[str]] = []
        self.release = asyncio.Event()
        self.fail_next = False

    async def bulk_write(self, ops) -> None:
        if not self.writes:
            self.writes.append([op.key for op in ops])
            await self.release.wait()
            return
        if self.fail_next:
            self.fail_next = False
            raise Unavailable("store down")
        self.writes.append([op.key for op in ops])


def put(key: str) -> Put:
    return Put("c", key, {"v": key})


async def test_writes_queued_behind_one_in_flight_land_in_one_bulk_write_in_order():
    store = GatedStore()
    chain = WriteChain(store)
    first = chain.submit([put("a")])
    await asyncio.sleep(0)  # a's write has started: nothing joins it any more
    later = [chain.submit([put(k)], after=first) for k in ("b", "c", "d")]
    store.release.set()
    await asyncio.gather(first, *later)
    assert store.writes == [["a"], ["b", "c", "d"]]


async def test_a_failed_group_fails_every_write_in_it_and_every_later_one():
    store = GatedStore()
    chain = WriteChain(store)
    first = chain.submit([put("a")])
    await asyncio.sleep(0)
    grouped = [chain.submit([put(k)]) for k in ("b", "c")]
    store.fail_next = True
    store.release.set()
    await first
    for write in grouped:
        with pytest.raises(Unavailable):
            await write
    with pytest.raises(EarlierWriteFailed):
        await chain.submit([put("e")])
    chain.reset()
    await chain.submit([put("f")])
    assert store.writes == [["a"], ["f"]]


async def test_a_submission_is_landing_until_its_write_is_durable_then_nothing_is_left_to_wait_for():
    store = GatedStore()
    chain = WriteChain(store)
    assert chain.submitted == 0 and chain.landing(1) is None  # nothing submitted: nothing to wait for
    first = chain.submit([put("a")])
    await asyncio.sleep(0)
    second, third = chain.submit([put("b")]), chain.submit([put("c")])  # one group behind a
    assert (chain.submitted, chain.durable) == (3, 0)
    assert chain.landing(1) is first
    assert chain.landing(2) is second and chain.landing(3) is second
    assert not first.done()
    store.release.set()
    await chain.landing(3)
    assert chain.durable == 3
    assert all(chain.landing(n) is None for n in (1, 2, 3))
    assert third.done()


async def test_a_failed_submission_is_seen_failed_until_the_owner_resets_the_chain():
    store = GatedStore()
    chain = WriteChain(store)
    first = chain.submit([put("a")])
    await asyncio.sleep(0)
    chain.submit([put("b")])
    store.fail_next = True
    store.release.set()
    await first
    await chain.settle()
    failed = chain.landing(2)
    assert failed is not None and failed.done()
    with pytest.raises(Unavailable):
        failed.result()
    assert chain.landing(1) is None  # landed before the failure
    chain.reset()
    assert chain.landing(2) is None  # the owner dropped the state it carried
    await chain.submit([put("c")])
    assert (chain.submitted, chain.durable) == (3, 3)


# --- outcomes nobody retrieves: a crash (abort) leaves writes whose waiters are gone -------------------


@pytest.fixture
async def unretrieved():
    """The loop's "... exception was never retrieved" reports (a future or task collected with a failure
    nobody looked at): a test ends by collecting what it dropped and asserting there were none."""
    loop = asyncio.get_running_loop()
    reports: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reports.append(f"{context['message']}: {context.get('exception')!r}"))

    def collected() -> list[str]:
        gc.collect()
        return reports

    yield collected
    loop.set_exception_handler(previous)


async def test_a_write_queued_behind_one_whose_cancellation_lands_first_in_an_abort_ends_cancelled(unretrieved):
    """abort() cancels the chain's writes in no set order. When the write in flight is cancelled first (here
    its waiter gave up on it just as the process crashed), the write queued behind it saw the earlier one
    cancelled and ended with EarlierWriteFailed instead of its own cancellation, an outcome nobody was left
    to retrieve: "Task exception was never retrieved" at exit."""
    store = GatedStore()
    chain = WriteChain(store)
    first = chain.submit([put("a")])
    await asyncio.sleep(0)  # in flight
    queued = chain.submit([put("b")])  # waits for it
    await asyncio.sleep(0)
    first.cancel()  # its waiter gone...
    chain.abort()  # ... as the process crashes
    await asyncio.wait([first, queued])  # (retrieving nothing)
    ended = first.cancelled(), queued.cancelled()
    del first, queued, chain  # the crashed replica's
    assert unretrieved() == []
    assert ended == (True, True)


async def test_writes_failed_before_a_crash_leave_no_unretrieved_failure_behind(unretrieved):
    """A write fails, those behind it fail with it; the owner (a partition's settler) would have awaited
    them, but the process crashes first: abort() consumes what they ended with, and an owner still
    awaiting one gets it all the same."""
    store = GatedStore()
    chain = WriteChain(store)
    first = chain.submit([put("a")])
    await asyncio.sleep(0)
    failing = chain.submit([put("b")])
    await asyncio.sleep(0)
    behind = chain.submit([put("c")], after=asyncio.get_running_loop().create_future())  # a group of its own
    store.fail_next = True
    store.release.set()
    await first
    await asyncio.wait([failing, behind])
    chain.abort()
    refused = chain.submit([put("d")])  # a task outliving the crash: refused, and never awaited
    assert refused.done()
    with pytest.raises(Unavailable):
        await failing  # an owner still waiting sees the store's failure
    del failing, behind, refused, chain  # the crashed replica's
    assert unretrieved() == []


async def test_a_write_behind_an_abandoned_one_still_fails_for_its_waiter(unretrieved):
    """Not every cancellation is the waiting write's own: the one in flight abandoned (its waiter timed out
    and cancelled it), the write queued behind it is not attempted, and its waiter is told so."""
    store = GatedStore()
    chain = WriteChain(store)
    first = chain.submit([put("a")])
    await asyncio.sleep(0)
    queued = chain.submit([put("b")])
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(first, 0.01)
    with pytest.raises(EarlierWriteFailed):
        await queued
    assert store.writes == [["a"]]
    assert unretrieved() == []
