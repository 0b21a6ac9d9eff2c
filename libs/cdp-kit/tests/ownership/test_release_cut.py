"""A release may not outlast its lease: once the lease is lost, a release still draining is cut.

A member fenced by a loop stall or a store outage called `on_release` and let the engine drain for as
long as it took; a drain longer than the rest of the lease overlapped the next owner (seen in the
Kubernetes-lease slow-releaser scenario, a round stalled past the fence).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from test_leased_protocol import MemoryStore

from cdp_kit.ownership import Lease, LeasedOwnership


class CutOffStore(MemoryStore):
    """A memory store that can be cut off: every call then fails, as an unreachable store's would."""

    def __init__(self) -> None:
        super().__init__()
        self.cut = False

    def _check(self) -> None:
        if self.cut:
            raise ConnectionError("store unreachable")

    async def members(self):
        self._check()
        return await super().members()

    async def heartbeat(self, identity):
        self._check()
        await super().heartbeat(identity)

    async def leases(self):
        self._check()
        return await super().leases()

    async def write(self, partition, holder, expected):
        self._check()
        return await super().write(partition, holder, expected)


class Drain:
    """An engine's release that never finishes by itself; notes when it was cut."""

    def __init__(self) -> None:
        self.began = asyncio.Event()
        self.cut = asyncio.Event()
        self.cut_at: float | None = None

    async def on_release(self, p: int) -> None:
        self.began.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cut_at = time.monotonic()
            self.cut.set()
            raise


async def test_a_fenced_members_drain_is_cut_before_its_lease_can_expire():
    ttl = 3.0
    store, drain = CutOffStore(), Drain()
    member = LeasedOwnership(store, partitions=1, identity="identity-0", ttl=ttl)
    await member.start(on_release=drain.on_release)
    assert member.owned() == {0}
    store.cut = True  # renewals fail from now on: the member fences itself half a TTL after the last one
    renewed_at = member._renewed_at
    await asyncio.wait_for(drain.began.wait(), ttl)
    assert member.owned() == frozenset()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(drain.cut.wait(), ttl)
    assert drain.cut_at is not None, "the fenced member went on draining after its lease could expire"
    # Nobody may take the lease before `ttl` after that renewal began; the drain stopped a quarter of a
    # TTL before it (and not before the fence: it was given the time there was).
    assert member.fence <= drain.cut_at - renewed_at < ttl
    member._task.cancel()
    await asyncio.gather(member._task, return_exceptions=True)


async def test_a_release_under_way_is_cut_at_once_when_another_member_holds_the_lease():
    ttl = 3.0
    store, drain = MemoryStore(), Drain()
    member = LeasedOwnership(store, partitions=1, identity="identity-0", ttl=ttl)
    await member.start(on_release=drain.on_release)
    stopping = asyncio.create_task(member.stop())  # releases, renewing while the engine drains
    await asyncio.wait_for(drain.began.wait(), ttl)
    await asyncio.sleep(0.1)
    assert drain.cut_at is None  # still renewed: it may drain for as long as it needs
    # The lease is taken (an operator's hand, a store restored from a backup): the drain stops at once.
    store.lease_records[0] = Lease("identity-1", next(store.revisions))
    taken = time.monotonic()
    await asyncio.wait_for(stopping, 2 * ttl)
    assert drain.cut_at is not None and drain.cut_at - taken < ttl / 3 + 0.5
    assert store.lease_records[0].holder == "identity-1", "a cut release frees nothing"
