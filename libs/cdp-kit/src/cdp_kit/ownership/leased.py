"""The hand-off protocol over a lease store: membership, one lease per partition, release before transfer.

Every `interval` (a third of the TTL, from one round's start to the next's) a member

1. renews every lease it holds, including those it is releasing (first: the rest of the round does
   not come out of the time left before its fence);
2. heartbeats its own member record;
3. reads the member records and the partition leases; a record is *live* while its revision keeps
   changing: one that has not changed for `ttl` seconds of this member's own clock is expired (the
   rule of client-go's leader election: it needs no synchronised clocks, only similar clock rates);
4. computes the assignment over the live members (`assignment.assign`, the same on every member);
5. starts releasing each held partition that is no longer assigned to it: the partition leaves
   `owned()`, `on_release(p)` is awaited (the engine stops fetching, drains in-flight commits and
   returns) and only then is the lease written free, by compare-and-set on its revision;
6. acquires each assigned partition whose lease is free, absent or expired, by compare-and-set; on
   success the partition joins `owned()` and `on_acquire(p)` is awaited.

Invariants:
- A lease has one holder: every write is a create-if-absent or a compare-and-set on the revision read.
- A member works on a partition only between a successful acquire and the end of its release, so
  two members never work on one partition at once while both are alive: the new owner can take the
  lease only after the old one freed it, which happens after `on_release` returned. A slow releaser
  keeps renewing, so it delays the new owner rather than overlapping with it.
- A member that dies keeps its leases until they expire (`ttl` without a renewal); a member that
  cannot renew (cut off from the store) fences itself: `fence` seconds (half the TTL) after the
  start of its last successful renewal it drops every lease from `owned()` and calls `on_release`.
- A release may not outlast the lease it stands on. Once the lease is lost, a release (one just begun
  by the fence, or one already draining) is *cut*: cancelled `ttl - fence / 2` seconds after the start
  of the last renewal (a quarter of the TTL before anyone else may take the lease, the margin for the
  members' clock rates), or at once when the store shows another holder. A cancelled `on_release`
  must stop working on the partition without finishing (the engine aborts the partition as a crash
  would). A drain that outlived the lease overlapped the next owner: a loop stalled past the fence
  fenced its member, whose drain then ran on after the lease had expired under it.
- `on_acquire` and `on_release` of one partition never run at once on one member, and alternate:
  acquire, release, acquire, ... A callback that raises is logged and counts as done (an engine
  that failed to start a partition still holds it: it must retry or stop the process).
- Identities are unique among live members (the pod name). A replica that restarts under the same
  identity (a StatefulSet pod) takes its own leases back at once instead of waiting for the TTL:
  the process that held them is gone with its pod.
- `stop()` releases every held partition (awaiting `on_release`), frees the leases and removes the
  member record, so the others take over at once instead of after the TTL. Leases a fence let go of
  are freed too once every release has ended, if the store still names this member for them and
  the release drained (a cut one may still have a write landing: its lease expires instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from cdp_kit.ownership.assignment import owned_by
from cdp_kit.ownership.base import Ownership, PartitionCallback, noop
from cdp_kit.stopping import raise_if_cancelling

log = logging.getLogger("cdp.ownership")

Revision = int | str


@dataclass(frozen=True, slots=True)
class Lease:
    """A partition's lease as read: its holder ("" when free) and the revision to compare-and-set on."""

    holder: str
    revision: Revision


class LeaseStore(Protocol):
    """What the protocol needs from a store (NATS KV, Kubernetes Leases). Each call may raise on a
    transport failure: the member retries on its next round."""

    async def members(self) -> dict[str, Revision]:
        """Every member record: identity -> revision (a record that changes on every heartbeat)."""

    async def heartbeat(self, identity: str) -> None:
        """Write this member's record (unconditionally: only the member itself writes it)."""

    async def leave(self, identity: str) -> None:
        """Remove this member's record."""

    async def leases(self) -> dict[int, Lease]:
        """Every partition lease that exists."""

    async def write(self, partition: int, holder: str, expected: Lease | None) -> Lease | None:
        """Set the holder ("" frees it) if the lease is still `expected` (None: only if absent).
        Returns the lease written, or None when another write came first."""


class _Observed:
    """When each record's revision was first seen by this member (the clock for expiry)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._seen: dict[object, tuple[Revision, float]] = {}

    def age(self, key: object, revision: Revision) -> float:
        now = self._clock()
        seen = self._seen.get(key)
        if seen is None or seen[0] != revision:
            self._seen[key] = (revision, now)
            return 0.0
        return now - seen[1]

    def forget_missing(self, keys: set[object]) -> None:
        for key in set(self._seen) - keys:
            del self._seen[key]


class LeasedOwnership(Ownership):
    """Ownership that follows the live members through a `LeaseStore` (see the module docstring)."""

    def __init__(
        self,
        store: LeaseStore,
        *,
        partitions: int,
        identity: str,
        ttl: float = 15.0,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, got {partitions}")
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        if not identity:
            raise ValueError("identity must not be empty")
        self.store = store
        self.partitions = partitions
        self.identity = identity
        self.ttl = ttl
        self.interval = interval if interval is not None else ttl / 3
        self.fence = ttl / 2
        self._clock = clock
        self._observed = _Observed(clock)
        self._held: dict[int, Lease] = {}  # leases this member holds, releasing ones included
        self._owned: set[int] = set()  # held, acquired (on_acquire called) and not being released
        self._holders: dict[int, str] = {}  # others' live leases as of the last round (see `holder`)
        self._releasing: set[int] = set()
        # Per partition whose release must end by a time (its lease lost): that time, on this member's clock;
        # and the timeout of its running release, rescheduled when the lease is lost while it runs.
        self._cut_at: dict[int, float] = {}
        self._cuts: dict[int, asyncio.Timeout] = {}
        # Partitions whose last release was cut: writes of theirs may still land (a group commit shared with
        # other partitions finishes what it holds), so their leases are left to expire, never freed early.
        self._cut_short: set[int] = set()
        self._callbacks: dict[int, asyncio.Task[None]] = {}  # per partition: the last callback chain
        self._renewed_at: float | None = None  # clock at the start of the last round that renewed all
        self._round_started: float | None = None  # clock at the start of the last round (the next is due `interval` on)
        self._watchers: list[asyncio.Queue[frozenset[int]]] = []
        self._lock = asyncio.Lock()  # store writes of this member are serialised
        self._on_acquire: PartitionCallback = noop
        self._on_release: PartitionCallback = noop
        self._task: asyncio.Task[None] | None = None
        # Set by stop(): the loop also checks it, because a cancellation can be swallowed inside a
        # store client (seen with nats-py's KV watch), and a round must not acquire after stop().
        self.closing = False
        self._in_round = False  # the loop is in a round (not asleep): see stop()
        self._round_timeout: asyncio.Timeout | None = None  # the running round's bound: its fence

    # -- the interface --------------------------------------------------------------------------

    async def start(self, on_acquire: PartitionCallback = noop, on_release: PartitionCallback = noop) -> None:
        self._on_acquire, self._on_release = on_acquire, on_release
        await self._round_safely()
        self._task = asyncio.create_task(self._run(), name=f"ownership-{self.identity}")

    async def stop(self) -> None:
        me = asyncio.current_task()
        # Cancellations the caller had already been asked before this stop: the engine's `serve` stops in
        # its `finally` after its own cancellation - the normal way down - and must still release every
        # partition (the next owner takes them at once, not after the TTL). Only one that comes while
        # the stop runs (its caller past its shutdown grace) ends it early.
        asked = me.cancelling() if me is not None else 0

        def cancelled_during_stop() -> None:
            if me is not None and me.cancelling() > asked:
                raise asyncio.CancelledError

        self.closing = True
        if self._task is not None:
            if self._in_round:
                # A round in flight may be taking a lease: cancelled between its write and recording it, the
                # lease would stay in the store under this member's name, never released (held until it
                # expires). The round ends soon (it takes nothing new once closing); then the loop stops.
                await asyncio.wait({self._task}, timeout=max(self.interval, 1.0))
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                # The loop's end, as asked. A cancellation of this stop itself (its caller's: a service
                # past its shutdown grace) lands here too, and is passed on: suppressed, the stop went on
                # to release every partition and waited for the drains it had been told to give up.
                cancelled_during_stop()
            self._task = None
        for p in sorted(self._owned):
            self._begin_release(p)
        # Keep renewing while the engine drains: a slow drain must not let the leases expire under it. The
        # renewals keep the rounds' schedule, `interval` after the last round's start: waiting a whole
        # interval from the stop, the first came up to two intervals after the last, past the fence (1.5).
        due = (self._clock() if self._round_started is None else self._round_started) + self.interval
        while self._callbacks:
            cancelled_during_stop()  # one a renewal swallowed (below, or in the store client)
            pending = [t for t in self._callbacks.values() if not t.done()]
            if not pending:
                break
            await asyncio.wait(pending, timeout=max(0.0, due - self._clock()))
            started = self._clock()
            if started < due:
                continue  # the drains ended first
            due = started + self.interval
            with contextlib.suppress(Exception):
                if await self._renew_all():
                    self._renewed_at = started
            self._fence_if_stale()
        with contextlib.suppress(Exception):
            await self._free_left_behind()
        with contextlib.suppress(Exception):
            await self.store.leave(self.identity)
        for queue in self._watchers:
            queue.put_nowait(frozenset())

    async def _free_left_behind(self) -> None:
        """Free the leases the store still names this member for, once nothing of it works on them: those
        a fence let go of (renewals failed; nobody took them since) whose release drained, and those whose
        freeing failed. Left, each waited out its TTL before the next owner could take it. Not a lease whose
        release was cut (a write of its partition may still land) nor one another member holds
        (compare-and-set on the revision read)."""
        for p, lease in sorted((await self.store.leases()).items()):
            if lease.holder == self.identity and p not in self._held and p not in self._cut_short:
                async with self._lock:
                    await self.store.write(p, "", lease)

    def owned(self) -> frozenset[int]:
        return frozenset(self._owned)

    def holder(self, partition: int) -> str | None:
        """This member while it owns `partition`; else the other member whose lease on it was live at
        the last round (at most `interval` old); None while it is free, expired or being released."""
        if partition in self._owned:
            return self.identity
        if partition in self._held:
            return None  # releasing: neither here nor there yet
        return self._holders.get(partition)

    async def changes(self) -> AsyncIterator[frozenset[int]]:
        queue: asyncio.Queue[frozenset[int]] = asyncio.Queue()
        self._watchers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._watchers.remove(queue)

    # -- the rounds -----------------------------------------------------------------------------

    def _until_fence(self) -> float | None:
        """Seconds left before this member must stop working on its leases; None when it holds none."""
        if not self._held or self._renewed_at is None:
            return None
        return self._renewed_at + self.fence - self._clock()

    async def _run(self) -> None:
        me = asyncio.current_task()
        while not self.closing:
            # A cancellation the round swallowed is still owed (`cdp_kit.stopping`): nats-py's requests
            # return their reply when the cancellation lands in the loop turn the reply does, and a
            # cleanup that fails on a closed connection (a scan's unsubscribe) replaces it with an error
            # the round logs. Not closing, the loop ran on for ever, a round every interval, and whatever
            # waited for the task with it: an event loop's teardown after a failed test, which cancels
            # each task once (a hang of the kit's ownership tests).
            raise_if_cancelling(me)
            # Rounds `interval` apart from start to start: a round's own time comes out of the wait before
            # the next one, not out of the fence's margin. Renewals count from their round's start (TTL/2 to
            # the fence, TTL/3 between rounds): waiting `interval` after each round's end, two rounds' time
            # (heartbeat, reads, a partition's start) came out of the TTL/6 between a renewal and the fence,
            # and a loaded member fenced itself over rounds of ~0.1 s each at the tests' TTLs.
            wait = self.interval
            if self._round_started is not None:
                wait = max(0.0, self._round_started + self.interval - self._clock())
            left = self._until_fence()
            await asyncio.sleep(wait if left is None else max(0.0, min(wait, left)))
            self._in_round = True
            try:
                await self._round_safely()
            finally:
                self._in_round = False

    async def _round_safely(self) -> None:
        left = self._until_fence()
        try:
            # A store that fails or hangs must not keep this member working past its fence.
            if left is not None and left <= 0:
                raise TimeoutError
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the round finishes, and then stop() would wait for a loop that never ends.
            try:
                async with asyncio.timeout(self.fence if left is None else left) as self._round_timeout:
                    await self._round()
            finally:
                self._round_timeout = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the store is unreachable or failed: retry next round, fence if too long
            # Unless the round was cancelled and a cleanup on the way out raised instead: a stop, not a
            # failed round.
            raise_if_cancelling(asyncio.current_task())
            log.warning("ownership round failed", extra={"member": self.identity, "error": type(exc).__name__})
        self._fence_if_stale()

    async def _round(self) -> None:
        started = self._round_started = self._clock()
        # Renewals first: the fence falls TTL/2 after the last round whose renewals all succeeded began, the
        # next round is due TTL/3 after it, so what comes before the renewals in a round comes out of TTL/6.
        # After the heartbeat and both scans (at the tests' 1 s TTL: 0.16 s against rounds of ~0.17 s under
        # load), a member fenced itself on a healthy store. A lease taken meanwhile fails its compare-and-set.
        if await self._renew_all():
            self._renewed_at = started
            if self._held and self._round_timeout is not None:
                self._round_timeout.reschedule(self._loop_time(started + self.fence))  # the new fence
        await self.store.heartbeat(self.identity)
        records = await self.store.members()
        live = {m for m, revision in records.items() if self._observed.age(("member", m), revision) < self.ttl}
        live.add(self.identity)
        assigned = owned_by(self.partitions, live, self.identity)
        leases = await self.store.leases()
        # Every lease's age is tracked from the first round that sees it, so a dead member's leases
        # are free one TTL after it stopped renewing, not one TTL after someone became assigned them.
        age = {p: self._observed.age(("lease", p), lease.revision) for p, lease in leases.items()}
        self._observed.forget_missing({("member", m) for m in records} | {("lease", p) for p in leases})
        self._holders = {
            p: lease.holder
            for p, lease in leases.items()
            if lease.holder and lease.holder != self.identity and age[p] < self.ttl
        }

        # Leases this member believes it holds but the store says otherwise were lost (taken after
        # an expiry this member did not notice): stop working on them at once.
        for p in list(self._held):
            current = leases.get(p)
            if current is None or current.holder != self.identity:
                self._lose(p, at=self._clock())  # another may be working on it already

        for p in sorted(self._owned - assigned):
            self._begin_release(p)
        for p in sorted(assigned - self._held.keys()):
            if self.closing:
                return
            current = leases.get(p)
            if current is not None and current.holder and current.holder != self.identity and age[p] < self.ttl:
                continue  # its holder still renews it: it frees the lease once it has released the partition
            async with self._lock:
                lease = await self.store.write(p, self.identity, current)
            if lease is None:
                continue  # someone else wrote first: look again next round
            self._held[p] = lease
            self._cut_at.pop(p, None)
            self._owned.add(p)
            self._chain(p, self._on_acquire)
            self._notify()

    async def _renew_all(self) -> bool:
        """Renew every held lease; True when all were renewed."""
        ok = True
        for p in sorted(self._held):
            async with self._lock:
                lease = self._held.get(p)
                if lease is None:
                    continue
                renewed = await self.store.write(p, self.identity, lease)
            if renewed is None:
                self._lose(p, at=self._clock())  # someone else wrote it: taken
                ok = False
            elif p in self._held:
                self._held[p] = renewed
        return ok

    def _fence_if_stale(self) -> None:
        if self._held and (self._renewed_at is None or self._clock() - self._renewed_at >= self.fence):
            log.warning("ownership leases not renewed in time: releasing all", extra={"member": self.identity})
            # Nobody may take a lease before `ttl` after the renewal this member last saw succeed began;
            # the release stops a quarter of a TTL before that.
            end = self._clock() if self._renewed_at is None else self._renewed_at + self.ttl - self.fence / 2
            for p in list(self._held):
                self._lose(p, at=end)

    # -- acquire and release --------------------------------------------------------------------

    def _chain(self, p: int, callback: PartitionCallback, then: Callable[[], Awaitable[None]] | None = None) -> None:
        """Run `callback(p)` after the partition's previous callback, then `then()`. A release
        (`callback` is `on_release`) runs under a timeout that `_lose` sets (`_cut_at`, `_cuts`)."""
        previous = self._callbacks.get(p)
        releasing = callback is self._on_release

        async def step() -> None:
            if previous is not None:
                # Wait for it without taking on its outcome; a cancellation of this step still stops it.
                await asyncio.wait([previous])
            try:
                if not releasing:
                    await callback(p)
                else:
                    # Begun even when its deadline has passed while it waited: the callback's first steps
                    # (the engine takes the partition out of its pipelines) run before it is cancelled.
                    async with asyncio.timeout_at(self._loop_time(self._cut_at.get(p))) as cut:
                        self._cuts[p] = cut
                        try:
                            await callback(p)
                        finally:
                            del self._cuts[p]
                            self._cut_at.pop(p, None)
                        self._cut_short.discard(p)
            except TimeoutError as exc:
                if not (releasing and cut.expired()):
                    log.error("ownership callback failed", extra={"partition": p, "error": type(exc).__name__})
                else:
                    self._cut_short.add(p)
                    log.error(
                        "ownership release cut short: its lease was lost before the partition drained",
                        extra={"member": self.identity, "partition": p},
                    )
            except Exception as exc:  # an engine's failure to start or drain must not stop the rounds
                log.error("ownership callback failed", extra={"partition": p, "error": type(exc).__name__})
            if then is not None:
                await then()

        task = asyncio.create_task(step(), name=f"ownership-{self.identity}-p{p}")
        self._callbacks[p] = task
        task.add_done_callback(lambda t, p=p: self._callbacks.pop(p, None) if self._callbacks.get(p) is t else None)

    def _begin_release(self, p: int) -> None:
        if p not in self._owned:
            return
        self._owned.discard(p)
        self._releasing.add(p)
        self._notify()

        async def free() -> None:
            self._releasing.discard(p)
            self._cut_at.pop(p, None)  # lost after its release ended: nothing left to cut
            async with self._lock:
                lease = self._held.pop(p, None)
                if lease is None:
                    return  # lost meanwhile: nothing to free
                try:
                    await self.store.write(p, "", lease)
                except Exception as exc:  # the lease then expires after the TTL instead
                    log.warning("ownership lease not freed", extra={"partition": p, "error": type(exc).__name__})

        self._chain(p, self._on_release, free)

    def _lose(self, p: int, *, at: float) -> None:
        """The lease is gone (taken or unrenewable): stop working on the partition, free nothing, and
        be done by `at` (this member's clock): a release still running then is cut."""
        self._held.pop(p, None)
        if p not in self._releasing and p not in self._owned:
            return
        self._cut_at[p] = min(at, self._cut_at.get(p, at))
        if p in self._releasing:
            # on_release already under way (or queued), renewed no more: it must end before the lease does.
            cut = self._cuts.get(p)
            if cut is not None:
                deadline = self._loop_time(self._cut_at[p])
                if cut.when() is None or deadline < cut.when():
                    cut.reschedule(deadline)
            return
        self._owned.discard(p)
        self._notify()
        self._chain(p, self._on_release)

    def _loop_time(self, at: float | None) -> float | None:
        """This member's clock time `at` as the event loop's (None stays None)."""
        if at is None:
            return None
        return asyncio.get_running_loop().time() + max(0.0, at - self._clock())

    def _notify(self) -> None:
        owned = frozenset(self._owned)
        for queue in self._watchers:
            queue.put_nowait(owned)
