"""`WriteChain`: store writes that land one after another, in the order they were submitted.

A partition's batches are applied to hot state in stream order, and each batch's writes assume the
earlier batches' writes (a counter's next value, a record's next version). So they must land in that
order, and a write must not land after an earlier one failed: its state was computed on top of a
change the store never got. The chain gives both:

- `submit(ops)` returns at once with a future; the write starts only after every earlier write of
  the chain has landed (and after `after`, another chain's write it depends on, when given);
- if a write fails, every write submitted after it fails too (`EarlierWriteFailed`), until the owner
  has recovered (dropped the state those writes were computed on) and called `reset()`.

One chain per partition is the default (partitions are independent). A service whose hot state spans
partitions (identity's graph, profile's merges) shares one chain between all of them and its own
synchronous writes, so every write it makes lands in the order the changes were made.

Group commit: writes submitted while an earlier one is still being written are queued as one group and
land in one `bulk_write` (in submission order, at most `max_group_ops` operations), so a chain shared by
many partitions costs one store round trip per round, not one per batch. A group lands or fails whole:
a write that fails takes the others of its group with it, as it would take every later write anyway.

Positions: each `submit` is numbered (`submitted` is the number of the latest), and `durable` is the
highest number whose write has landed; every write before it has landed too (writes land in order).
`landing(n)` is the future of write n, or None once it is durable: an owner that noted, when it changed
some state, the number of the write that carries the change (`submitted + 1` right before submitting it,
with nothing awaited between) can tell whether that change is durable yet, and wait for it, at the cost
of a comparison when it is.

Outcomes: a write's future is the caller's to await, and nothing here swallows its failure. `abort` (a
crash) consumes the outcomes of the writes it leaves behind - their waiters went with the crashed
process; an owner still awaiting one gets it all the same -, and an aborted chain's refusals are
consumed as they are made: unretrieved, asyncio prints "... exception was never retrieved" for each once
it is collected (at exit, after a crash test).
A write cancelled while it waits for an earlier one ends cancelled, even when the earlier one was
cancelled just before it (abort cancels them in no set order): only a write that was not cancelled
itself fails with `EarlierWriteFailed` behind an abandoned one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

from cdp_kit.errors import Unavailable
from cdp_kit.storage import Store, WriteOp


class EarlierWriteFailed(Unavailable):
    """A write was not attempted because one submitted before it failed."""


class _Group:
    __slots__ = ("last", "ops", "sealed", "write")

    def __init__(self, ops: list[WriteOp], last: int) -> None:
        self.ops = ops
        self.last = last  # the number of the latest submission it carries
        self.sealed = False  # its bulk_write has started: nothing joins any more
        self.write: asyncio.Future | None = None


class WriteChain:
    def __init__(self, store: Store, *, max_group_ops: int = 20_000) -> None:
        self.store = store
        self.max_group_ops = max_group_ops
        self._last: asyncio.Future | None = None
        self._open: _Group | None = None  # the last group, joinable until its write starts
        self._tasks: set[asyncio.Future] = set()
        self._closed = False
        self.submitted = 0  # the number of the latest submission
        self.durable = 0  # every submission up to this number has landed
        # Groups not known durable, in submission order: in flight, or failed (dropped by `reset`).
        self._unlanded: deque[_Group] = deque()

    def submit(self, ops: Iterable[WriteOp], *, after: asyncio.Future | None = None) -> asyncio.Future:
        """Queue one `bulk_write` of `ops` behind every write submitted so far (and behind `after`).
        The future completes when it is durable, or fails with the store's error (or
        `EarlierWriteFailed`)."""
        if self._closed:
            return _aborted()
        ops = list(ops)
        self.submitted += 1
        group = self._open
        if (
            group is not None
            and not group.sealed
            and len(group.ops) + len(ops) <= self.max_group_ops
            # `after` is already ordered before the group (this chain's) or done: nothing more to wait for.
            and (after is None or after.done() or after in self._tasks)
        ):
            group.ops.extend(ops)
            group.last = self.submitted
            return group.write  # type: ignore[return-value]
        group = _Group(ops, self.submitted)
        write = group.write = asyncio.ensure_future(self._write(self._last, after, group))
        self._open = group
        self._last = write
        self._tasks.add(write)
        self._unlanded.append(group)
        write.add_done_callback(self._tasks.discard)
        return write

    def landing(self, number: int) -> asyncio.Future | None:
        """The write of submission `number` (done with an error if it failed), or None if it has landed
        (or was failed and dropped by `reset`: its state is gone with the owner's recovery)."""
        if number <= self.durable:
            return None
        for group in self._unlanded:
            if group.last >= number:
                return group.write
        if self._closed:
            return _aborted()
        return None

    async def _write(self, previous: asyncio.Future | None, after: asyncio.Future | None, group: _Group) -> None:
        try:
            await self._wait_for(previous, after)
        finally:
            group.sealed = True
        if group.ops:
            await self.store.bulk_write(group.ops)
        # Landed, so every earlier submission has too (or failed before a `reset`).
        self.durable = max(self.durable, group.last)
        while self._unlanded and self._unlanded[0].last <= self.durable:
            self._unlanded.popleft()

    @staticmethod
    async def _wait_for(previous: asyncio.Future | None, after: asyncio.Future | None) -> None:
        for earlier in (previous, after):
            if earlier is None:
                continue
            try:
                await asyncio.shield(earlier)
            except asyncio.CancelledError:
                # Either this write was cancelled, or the shield passed on the earlier one's cancellation.
                # Only the latter is an earlier write abandoned: a write cancelled itself (abort, racing
                # the earlier write's own cancellation there) ends cancelled, with nothing to retrieve.
                me = asyncio.current_task()
                if earlier.cancelled() and not (me is not None and me.cancelling()):
                    raise EarlierWriteFailed("an earlier write was abandoned") from None
                raise
            except Exception as exc:
                raise EarlierWriteFailed(f"an earlier write failed ({type(exc).__name__})") from None

    @property
    def last(self) -> asyncio.Future | None:
        return self._last

    async def settle(self) -> None:
        """Wait until every write submitted so far has landed or failed."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def reset(self) -> None:
        """Start a fresh chain: writes submitted from now on no longer wait for (or fail with) the
        earlier ones. Only after the state computed on a failed write has been dropped."""
        self._last = None
        self._open = None
        # Only failed groups can be left before a landed one; those in flight stay until they land.
        self._unlanded = deque(g for g in self._unlanded if not (g.write is not None and g.write.done()))

    def abort(self) -> None:
        """Cancel every write not yet landed and refuse any later one (tests: what a crash does to a
        process' pending writes; a task that outlives its cancellation cannot write any more)."""
        self._closed = True
        self._open = None
        # Their waiters are gone with the "crashed" process: whatever each write ends with (cancelled, or
        # a failure it had met already - a group failed before the crash, still in `_unlanded`) is consumed
        # here; an owner still awaiting one sees it all the same.
        for write in {*self._tasks, *(g.write for g in self._unlanded if g.write is not None)}:
            write.cancel()
            write.add_done_callback(_consume)
        self._last = None


def _consume(write: asyncio.Future) -> None:
    """Mark a write's failure retrieved (a waiter awaiting it still gets it)."""
    if not write.cancelled():
        write.exception()


def _aborted() -> asyncio.Future:
    """The refusal of an aborted chain: consumed at once, as `abort` consumes the writes it ends (a task
    that outlives the crash may submit and never await)."""
    refused = asyncio.get_running_loop().create_future()
    refused.set_exception(EarlierWriteFailed("the write chain was aborted"))
    _consume(refused)
    return refused
