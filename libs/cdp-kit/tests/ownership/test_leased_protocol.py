"""The hand-off protocol against an in-memory lease store: the rules that need no real store."""

from __future__ import annotations

import asyncio
import itertools

from cdp_kit.ownership import Lease, LeasedOwnership, owned_by


class MemoryStore:
    def __init__(self) -> None:
        self.revisions = itertools.count(1)
        self.member_records: dict[str, int] = {}
        self.lease_records: dict[int, Lease] = {}

    async def members(self):
        return dict(self.member_records)

    async def heartbeat(self, identity):
        self.member_records[identity] = next(self.revisions)

    async def leave(self, identity):
        self.member_records.pop(identity, None)

    async def leases(self):
        return dict(self.lease_records)

    async def write(self, partition, holder, expected):
        if self.lease_records.get(partition) != expected:
            return None
        lease = self.lease_records[partition] = Lease(holder, next(self.revisions))
        return lease


async def test_a_crash_during_a_slow_start_runs_no_queued_callback():
    """A member killed while a partition is starting never runs the release queued behind it (the
    process is gone); earlier, a cancelled step swallowed its cancellation and ran anyway."""
    started, unblock, calls = asyncio.Event(), asyncio.Event(), []

    async def on_acquire(p):
        calls.append(("acquire", p))
        started.set()
        await unblock.wait()

    async def on_release(p):
        calls.append(("release", p))

    store = MemoryStore()
    ownership = LeasedOwnership(store, partitions=1, identity="identity-0", ttl=3)
    await ownership.start(on_acquire, on_release)
    await started.wait()
    stopping = asyncio.ensure_future(ownership.stop())  # queues the release behind the slow start
    await asyncio.sleep(0.05)
    for task in list(ownership._callbacks.values()):
        task.cancel()  # the crash
    stopping.cancel()
    unblock.set()
    await asyncio.sleep(0.1)
    assert calls == [("acquire", 0)]
    assert store.lease_records[0].holder == "identity-0", "a crashed member frees nothing: its lease expires"


async def test_stop_releases_then_frees_the_lease_and_leaves():
    store, order = MemoryStore(), []

    async def on_release(p):
        order.append(("released", p, store.lease_records[p].holder))

    ownership = LeasedOwnership(store, partitions=2, identity="identity-0", ttl=3)
    await ownership.start(on_release=on_release)
    assert ownership.owned() == {0, 1}
    await ownership.stop()
    # The engine was told while the lease was still held; the lease was freed only afterwards.
    assert order == [("released", 0, "identity-0"), ("released", 1, "identity-0")]
    assert {p: lease.holder for p, lease in store.lease_records.items()} == {0: "", 1: ""}
    assert store.member_records == {}


async def test_a_pod_restarted_under_its_name_takes_its_leases_back_at_once():
    store = MemoryStore()
    before = LeasedOwnership(store, partitions=4, identity="identity-0", ttl=60)
    await before.start()
    before._task.cancel()  # the pod dies holding its leases
    another = LeasedOwnership(store, partitions=4, identity="identity-1", ttl=60)
    await another.start()
    assert another.owned() == frozenset(), "a stranger waits for the TTL"
    again = LeasedOwnership(store, partitions=4, identity="identity-0", ttl=60)
    await again.start()
    # identity-1 is live, so identity-0 keeps only its share, taken back without waiting 60 s.
    assert again.owned() == owned_by(4, ["identity-0", "identity-1"], "identity-0")
    await asyncio.gather(another.stop(), again.stop())


async def test_each_member_knows_who_holds_a_partition_so_a_request_can_be_forwarded_there():
    store, now = MemoryStore(), [0.0]
    first = LeasedOwnership(store, partitions=4, identity="identity-0", ttl=60, clock=lambda: now[0])
    second = LeasedOwnership(store, partitions=4, identity="identity-1", ttl=60, clock=lambda: now[0])
    await first.start()
    await second.start()
    await first._round()  # sees identity-1 and hands over its share
    await asyncio.sleep(0.05)
    await second._round()
    await first._round()
    assert first.owned() | second.owned() == {0, 1, 2, 3} and second.owned()
    for p in range(4):
        holder = "identity-0" if p in first.owned() else "identity-1"
        assert first.holder(p) == second.holder(p) == holder
    # A dead member's lease names nobody once it has expired: no request goes to a pod that is gone.
    gone = second.owned()
    second._task.cancel()
    now[0] += 61
    await first._round()
    assert {first.holder(p) for p in gone} <= {None, "identity-0"}
    await first.stop()


class SlowStore(MemoryStore):
    """Every read and write answers `delay` seconds late: a store that is healthy, only slow (a loaded API
    server, a distant NATS)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def members(self):
        await asyncio.sleep(self.delay)
        return await super().members()

    async def heartbeat(self, identity):
        await asyncio.sleep(self.delay)
        await super().heartbeat(identity)

    async def leases(self):
        await asyncio.sleep(self.delay)
        return await super().leases()

    async def write(self, partition, holder, expected):
        await asyncio.sleep(self.delay)
        return await super().write(partition, holder, expected)


async def test_a_member_whose_rounds_take_a_while_keeps_its_leases_without_fencing():
    """Rounds are `interval` apart from start to start, so a round's own time is not taken out of the margin
    between a renewal and the fence (TTL/6) twice. A round here takes ~0.36 s (a heartbeat, two reads and a
    renewal of 0.09 s each) against an interval of 1 s and a fence 1.5 s after a renewal's round began:
    spaced `interval` after each round's end, the next round began 1.36 s after the last renewal's, with
    0.14 s left before the fence for a round of 0.36 s, was cut, and the member fenced itself at every other
    round, its partition going and coming back for as long as the store stayed that slow. Now the next round
    begins 1 s after the last, 0.14 s to spare. (A single round longer than TTL/6 still fences: it must
    renew before the fence.)"""
    store = SlowStore(delay=0.09)
    member = LeasedOwnership(store, partitions=1, identity="identity-0", ttl=3.0)
    moves: list[str] = []
    await member.start(on_acquire=lambda p: _noted(moves, f"+{p}"), on_release=lambda p: _noted(moves, f"-{p}"))
    try:
        assert member.owned() == {0}
        await asyncio.sleep(3.5)  # three rounds after the first
        assert moves == ["+0"], f"the partition went and came back: {moves}"
        assert member.owned() == {0}
    finally:
        await member.stop()


async def _noted(moves: list[str], move: str) -> None:
    moves.append(move)


class SlowReads(SlowStore):
    """A SlowStore whose lease writes answer at once: only its heartbeats and scans are late (scans are the
    store's costly calls: a KV consumer each)."""

    async def write(self, partition, holder, expected):
        return await MemoryStore.write(self, partition, holder, expected)


async def test_a_round_renews_before_it_reads_so_slow_reads_do_not_fence_the_member():
    """The fence falls TTL/2 after the last renewing round began and rounds are TTL/3 apart: whatever comes
    before the renewals comes out of TTL/6. Renewed after the heartbeat and both scans (0.3 s here against
    TTL/6 = 0.2 s), the member fenced itself at every round on a store that only reads slowly, its partition
    going and coming back. Now the renewals come first, and the round (its reads, the assignment) still
    completes: a member that joins gets its share."""
    store = SlowReads(delay=0.1)
    first = LeasedOwnership(store, partitions=2, identity="identity-0", ttl=1.2)
    moves: list[str] = []
    await first.start(on_acquire=lambda p: _noted(moves, f"+{p}"), on_release=lambda p: _noted(moves, f"-{p}"))
    second = None
    try:
        assert first.owned() == {0, 1}
        await asyncio.sleep(2.0)  # five rounds
        assert moves == ["+0", "+1"], f"the partitions went and came back: {moves}"
        second = LeasedOwnership(store, partitions=2, identity="identity-1", ttl=1.2)
        await second.start()
        deadline = asyncio.get_running_loop().time() + 10
        while not (second.owned() and first.owned()):
            assert asyncio.get_running_loop().time() < deadline, (first.owned(), second.owned(), moves)
            await asyncio.sleep(0.05)
        assert first.owned() | second.owned() == {0, 1} and not first.owned() & second.owned()
    finally:
        await asyncio.gather(*(m.stop() for m in (first, second) if m is not None))
