"""A release may not outlast its lease: once the lease is lost, a release still draining is cut.

A member fenced by a loop stall or a store outage called `on_release` and let the engine drain for as
long as it took; a drain longer than the rest of the lease overlapped the next owner (seen in the
Kubernetes-lease slow-releaser scenario, a round stalled past the fence).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
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


async def fenced(partitions: int, on_release=None) -> tuple[CutOffStore, LeasedOwnership]:
    """A member that fenced itself (its store cut off) and runs no more rounds, its store back: what its
    stop finds. `on_release` (default: returns at once) must have begun for the fence to be done."""
    store, released = CutOffStore(), asyncio.Event()

    async def noted(p):
        released.set()
        if on_release is not None:
            await on_release(p)

    member = LeasedOwnership(store, partitions=partitions, identity="identity-0", ttl=3.0)
    await member.start(on_release=noted)
    assert member.owned() == set(range(partitions))
    store.cut = True
    await asyncio.wait_for(released.wait(), member.ttl)  # fenced: released, nothing freed
    member._task.cancel()  # no round takes the leases back before the stop
    await asyncio.gather(member._task, return_exceptions=True)
    store.cut = False
    return store, member


async def test_a_member_that_fenced_frees_its_leases_when_it_stops():
    """A fence lets go of the leases without freeing them (the store cannot be reached). Stopped after the
    store came back and before a round took them again, the member left them in its name, and the next
    owner waited out the TTL; now the stop frees them once every release has ended."""
    store, member = await fenced(2)
    assert {p: lease.holder for p, lease in store.lease_records.items()} == {0: "identity-0", 1: "identity-0"}
    await member.stop()
    assert {p: lease.holder for p, lease in store.lease_records.items()} == {0: "", 1: ""}
    assert store.member_records == {}


async def test_a_stopping_member_frees_no_lease_another_took_after_its_fence():
    store, member = await fenced(1)
    store.lease_records[0] = Lease("identity-1", next(store.revisions))  # taken after the TTL
    await member.stop()
    assert store.lease_records[0].holder == "identity-1"


async def test_a_stopping_member_leaves_a_cut_releases_lease_to_expire():
    """A release cut short may still have a write landing (a group commit shared with other partitions
    finishes what it holds): its lease is not freed early; the next owner waits out the TTL."""
    drain = Drain()
    store, member = await fenced(1, drain.on_release)
    await asyncio.wait_for(drain.cut.wait(), member.ttl)
    await member.stop()
    assert store.lease_records[0].holder == "identity-0"


async def test_a_stopping_member_renews_on_the_rounds_schedule_while_it_drains():
    """The stop renews the leases of the partitions still draining `interval` after the last round's start,
    as the rounds would: it waited a whole interval from the stop itself, so a stop late in an interval
    renewed up to two intervals after the last renewal, past the member's fence (half the TTL)."""
    ttl = 3.0  # interval 1 s, fence 1.5 s

    class Noted(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.renewals: list[float] = []
            self.renewed = asyncio.Event()

        async def write(self, partition, holder, expected):
            if expected is not None and holder == expected.holder:
                self.renewals.append(time.monotonic())
                self.renewed.set()
            return await super().write(partition, holder, expected)

    store = Noted()

    async def on_release(p):
        await asyncio.sleep(2.0)  # a long drain

    member = LeasedOwnership(store, partitions=1, identity="identity-0", ttl=ttl)
    await member.start(on_release=on_release)
    # Just after a round (its renewal), then late in the interval that follows it.
    await asyncio.wait_for(store.renewed.wait(), ttl)
    last_round = member._round_started
    await asyncio.sleep(0.8 - (time.monotonic() - last_round))
    await member.stop()
    renewed = [last_round, *(t for t in store.renewals if t > last_round)]
    gaps = [later - earlier for earlier, later in itertools.pairwise(renewed)]
    assert len(gaps) >= 2 and max(gaps) < member.fence, f"renewals {gaps} s apart (the fence: {member.fence} s)"
    assert store.lease_records[0].holder == ""
