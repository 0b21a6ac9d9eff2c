"""Membership stories run against every lease store (NATS KV and Kubernetes Leases).

A `Ledger` is what the engines would see: a member works on a partition from the start of its
`on_acquire` to the end of its `on_release`; two members working on one partition at once is a
violation, recorded the instant it happens.

A member whose renewals come too late (a loaded machine stalls its rounds past the fence) fences itself:
it stops working on every partition without freeing a lease and, each lease still its own in the store,
takes them back on its next round: a second acquisition of a partition that never changed hands. The ledger
tells that from a move: a release whose lease was let go by a fence is *fenced* (`Ledger.fences`), and the
same member starting that partition again with nobody between is a *retake* (`Ledger.retakes`), which
`moves_since` leaves out. A lease let go for any other reason (taken, or dropped by mistake) is no fence, and
its partition's next start counts as a move.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from cdp_kit.ownership import LeasedOwnership

PARTITIONS = 8
TTL = 1.2


@dataclass
class Ledger:
    working: dict[int, set[str]] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    acquisitions: list[tuple[str, int]] = field(default_factory=list)
    acquired_at: dict[tuple[str, int], float] = field(default_factory=dict)
    released_at: dict[tuple[str, int], float] = field(default_factory=dict)
    fences: list[tuple[str, int]] = field(default_factory=list)  # releases whose lease a fence let go
    retakes: set[int] = field(default_factory=set)  # indexes into acquisitions (see the module docstring)
    _fenced: dict[int, str] = field(default_factory=dict)  # partition -> who fenced it, until anyone starts it

    def begin(self, member: str, p: int) -> None:
        holders = self.working.setdefault(p, set())
        if holders:
            self.violations.append(f"partition {p}: {member} started while {sorted(holders)} worked on it")
        holders.add(member)
        if self._fenced.pop(p, None) == member:
            self.retakes.add(len(self.acquisitions))
        self.acquisitions.append((member, p))
        self.acquired_at[(member, p)] = time.monotonic()

    def end(self, member: str, p: int, *, fenced: bool = False) -> None:
        self.working[p].discard(member)
        self.released_at[(member, p)] = time.monotonic()
        if fenced:
            self.fences.append((member, p))
            self._fenced[p] = member

    def moves_since(self, start: int) -> list[tuple[str, int]]:
        """The acquisitions from index `start` on that moved a partition: all but the retakes."""
        return [a for i, a in enumerate(self.acquisitions[start:], start) if i not in self.retakes]

    def crashed(self, member: str) -> None:
        for holders in self.working.values():
            holders.discard(member)

    def owners(self) -> dict[int, set[str]]:
        return {p: set(h) for p, h in self.working.items() if h}


@dataclass
class Member:
    name: str
    ownership: LeasedOwnership
    ledger: Ledger
    release_delay: float = 0.0
    cut: Callable[[], Awaitable[None]] | None = None  # cut the member off from the store (it lives on)

    async def on_acquire(self, p: int) -> None:
        self.ledger.begin(self.name, p)

    def fenced(self, p: int) -> bool:
        """The member let go of p's lease by fencing itself: the lease is no longer held (a hand-over frees
        it only after `on_release` returns) and the member's last renewal of all began a fence or more ago
        (`LeasedOwnership._fence_if_stale`'s rule)."""
        own = self.ownership
        stale = own._renewed_at is None or own._clock() - own._renewed_at >= own.fence
        return p not in own._held and stale

    async def on_release(self, p: int) -> None:
        fenced = self.fenced(p)  # before the release began, or (below) while it drained
        try:
            await asyncio.sleep(self.release_delay)  # an engine draining its in-flight commits
        finally:
            # Cancelled (its lease lost mid-drain), the engine aborts the partition: it works no more.
            self.ledger.end(self.name, p, fenced=fenced or self.fenced(p))

    async def start(self) -> Member:
        await self.ownership.start(self.on_acquire, self.on_release)
        return self

    async def kill(self) -> None:
        """Crash: no release, no goodbye; its leases stay until they expire."""
        self.ownership.closing = True
        tasks = [self.ownership._task, *self.ownership._callbacks.values()]
        for task in tasks:
            if task is not None:
                task.cancel()
        await asyncio.wait([t for t in tasks if t is not None])
        self.ledger.crashed(self.name)


# make(name, ledger, release_delay) -> a started member
MakeMember = Callable[[str, Ledger, float], Awaitable[Member]]


async def settled(members: list[Member], ledger: Ledger, timeout: float = 15.0) -> dict[int, str]:
    """Wait until every partition is worked on by exactly one of `members`, as assigned; return it."""
    deadline = time.monotonic() + timeout
    names = {m.name for m in members}
    while True:
        owners = ledger.owners()
        owned = [m.ownership.owned() for m in members]
        if (
            set(owners) == set(range(PARTITIONS))
            and all(len(h) == 1 and h <= names for h in owners.values())
            and sum(len(o) for o in owned) == PARTITIONS
            and max(len(o) for o in owned) - min(len(o) for o in owned) <= 1
        ):
            return {p: next(iter(h)) for p, h in owners.items()}
        if time.monotonic() > deadline:
            raise AssertionError(f"not settled: {owners}, owned {owned}")
        await asyncio.sleep(0.05)


async def scale_one_three_two(make: MakeMember) -> Ledger:
    ledger = Ledger()
    # A hand-over may wait out a TTL (a member that joins while a round is on its way): the settle bound
    # grows with it.
    wait = max(15.0, 4 * getattr(make, "ttl", TTL))
    a = await make("replica-0", ledger, 0.05)
    first = await settled([a], ledger, timeout=wait)
    assert set(first.values()) == {"replica-0"}

    b, c = await make("replica-1", ledger, 0.05), await make("replica-2", ledger, 0.05)
    before = len(ledger.acquisitions)
    second = await settled([a, b, c], ledger, timeout=wait)
    moved = {p for p in first if first[p] != second[p]}
    # Partitions that changed hands moved once each, straight to their new owner; the rest stayed. A member
    # that fenced itself on a loaded machine took its own partitions back: a retake, not a move.
    assert sorted(ledger.moves_since(before)) == sorted((second[p], p) for p in moved), ledger.fences
    assert len(moved) <= PARTITIONS - PARTITIONS // 3

    await b.ownership.stop()  # scale down: replica-1 hands its partitions over and leaves
    before = len(ledger.acquisitions)
    third = await settled([a, c], ledger, timeout=wait)
    moved = {p for p in second if second[p] != third[p]}
    assert {p for p in second if second[p] == "replica-1"} <= moved
    assert sorted(ledger.moves_since(before)) == sorted((third[p], p) for p in moved), ledger.fences
    assert len(moved) <= PARTITIONS // 2 + 1

    await a.ownership.stop()
    await c.ownership.stop()
    assert ledger.violations == []
    assert ledger.owners() == {}
    return ledger


async def killed_member_loses_partitions_after_ttl(make: MakeMember) -> None:
    ledger = Ledger()
    a, b = await make("replica-0", ledger, 0.0), await make("replica-1", ledger, 0.0)
    before = await settled([a, b], ledger)
    orphaned = {p for p, owner in before.items() if owner == "replica-1"}
    assert orphaned

    await b.kill()
    # Its last round that renewed every lease started here (the members' clock is time.monotonic): each of
    # its leases was last written after it, so none is free to the survivor until a TTL after that.
    last_round = b.ownership._renewed_at
    assert last_round is not None
    after = await settled([a], ledger)
    assert set(after.values()) == {"replica-0"}
    # The survivor did not take them early: it started each a TTL or more after that round. (Looked at once,
    # half a TTL after the kill, as it was, with renewals every third of a TTL: 0.2 s to spare, which a late
    # renewal round or wake-up on a loaded machine can use up.)
    ttl = getattr(make, "ttl", TTL)
    early = {p: ledger.acquired_at[("replica-0", p)] - last_round for p in orphaned}
    assert all(waited >= ttl for waited in early.values()), early
    assert ledger.violations == []
    await a.ownership.stop()


async def slow_releaser_delays_the_new_owner(make: MakeMember) -> None:
    ledger = Ledger()
    # Longer than the members' TTL: the releaser keeps renewing while it drains.
    drain = 2 * getattr(make, "ttl", TTL)
    a = await make("replica-0", ledger, drain)
    await settled([a], ledger)

    b = await make("replica-1", ledger, drain)
    after = await settled([a, b], ledger, timeout=max(20.0, 4 * getattr(make, "ttl", TTL)))
    handed = {p for p, owner in after.items() if owner == "replica-1"}
    assert handed
    assert ledger.violations == []
    # The new owner started each handed partition only after the old owner's drain had ended.
    assert all(("replica-0", p) in ledger.released_at for p in handed)
    a.release_delay = b.release_delay = 0.0
    await asyncio.gather(a.ownership.stop(), b.ownership.stop())
    assert ledger.violations == []


async def churn(make: MakeMember) -> None:
    """Members come and go before the previous hand-off has finished."""
    ledger = Ledger()
    a = await make("replica-0", ledger, 0.1)
    b, c = await make("replica-1", ledger, 0.1), await make("replica-2", ledger, 0.1)
    await asyncio.sleep(TTL / 3)
    await b.ownership.stop()  # leaves mid-hand-off
    d = await make("replica-3", ledger, 0.1)
    await asyncio.sleep(TTL / 3)
    await c.kill()  # crashes holding whatever it had taken by then
    final = await settled([a, d], ledger, timeout=20)
    assert set(final.values()) == {"replica-0", "replica-3"}
    assert ledger.violations == []
    await asyncio.gather(a.ownership.stop(), d.ownership.stop())
    assert ledger.violations == []


async def member_cut_off_from_the_store_stops_before_others_take_over(make: MakeMember) -> None:
    ledger = Ledger()
    a, b = await make("replica-0", ledger, 0.0), await make("replica-1", ledger, 0.0)
    before = await settled([a, b], ledger)
    assert b.cut is not None
    await b.cut()  # b keeps running but can no longer renew: it must stop on its own
    after = await settled([a], ledger, timeout=20)
    assert set(after.values()) == {"replica-0"}
    assert b.ownership.owned() == frozenset()
    # b released each partition it had (fenced) before a started it: never two at once.
    assert all(("replica-1", p) in ledger.released_at for p, owner in before.items() if owner == "replica-1")
    assert ledger.violations == []
    await b.kill()
    await a.ownership.stop()
