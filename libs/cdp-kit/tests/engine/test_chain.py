"""WriteChain's group commit: writes queued behind one in flight land together, in order, or fail together."""

from __future__ import annotations

import asyncio

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
