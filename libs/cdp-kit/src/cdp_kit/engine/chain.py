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
partitions (identity's graph) shares one chain between all of them and its own synchronous writes, so
every write it makes lands in the order the changes were made.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from cdp_kit.errors import Unavailable
from cdp_kit.storage import Store, WriteOp


class EarlierWriteFailed(Unavailable):
    """A write was not attempted because one submitted before it failed."""


class WriteChain:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._last: asyncio.Future | None = None
        self._tasks: set[asyncio.Future] = set()
        self._closed = False

    def submit(self, ops: Iterable[WriteOp], *, after: asyncio.Future | None = None) -> asyncio.Future:
        """Queue one `bulk_write` of `ops` behind every write submitted so far (and behind `after`).
        The future completes when it is durable, or fails with the store's error (or
        `EarlierWriteFailed`)."""
        if self._closed:
            write = asyncio.get_running_loop().create_future()
            write.set_exception(EarlierWriteFailed("the write chain was aborted"))
            return write
        write = asyncio.ensure_future(self._write(self._last, after, list(ops)))
        self._last = write
        self._tasks.add(write)
        write.add_done_callback(self._tasks.discard)
        return write

    async def _write(self, previous: asyncio.Future | None, after: asyncio.Future | None, ops: list[WriteOp]) -> None:
        for earlier in (previous, after):
            if earlier is None:
                continue
            try:
                await asyncio.shield(earlier)
            except asyncio.CancelledError:
                if earlier.cancelled():
                    raise EarlierWriteFailed("an earlier write was abandoned") from None
                raise
            except Exception as exc:
                raise EarlierWriteFailed(f"an earlier write failed ({type(exc).__name__})") from None
        if ops:
            await self.store.bulk_write(ops)

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

    def abort(self) -> None:
        """Cancel every write not yet landed and refuse any later one (tests: what a crash does to a
        process' pending writes; a task that outlives its cancellation cannot write any more)."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        self._last = None
