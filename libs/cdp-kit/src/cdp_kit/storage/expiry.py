"""Records that age out of a collection: deleted, a bounded page at a time, once their `at` is past a horizon.

For records that carry no personal data but must not be kept for ever either - the privacy tombstones of
orchestration (`orchestration_tombstones`) and of the CRM connector (`crm_tombstones`): each says "this
person was deleted, drop what still reaches you for them", which matters only as long as something for
them can still arrive (a stream's retention, a dead letter's replay).

Invariants:
- `at` is epoch seconds; a record without a numeric `at` is kept (never guessed old);
- a page is at most `page` records read and one bulk write, so a sweep never holds the store's writer
  for long, however many records have aged out;
- each delete carries the version the scan read, so a record written again since (a deletion
  redelivered stamps its tombstone anew) is kept; replicas sweeping at once delete each record once;
- a sweep that fails (the store is down) is tried again at the next interval: nothing depends on when a
  record goes, only that it goes after its horizon.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cdp_kit.storage.port import Delete, Record, Store, VersionConflict

log = logging.getLogger("cdp.kit.storage.expiry")

PAGE = 500


async def sweep_expired(store: Store, collection: str, *, before: float, page: int = PAGE) -> int:
    """Delete the records of `collection` whose `at` is older than `before`; how many were deleted."""
    swept = 0
    cursor = None
    while True:
        result = await store.scan(collection, cursor=cursor, limit=page)
        expired = [r for r in result.records if _stamp(r) is not None and _stamp(r) < before]  # type: ignore[operator]
        if expired:
            swept += await _delete(store, collection, expired)
        cursor = result.next_cursor
        if cursor is None:
            return swept


async def sweep_every(interval: float, sweep: Callable[[], Awaitable[int]], what: str) -> None:
    """Run `sweep` now and then every `interval` seconds, for ever (a task the service cancels at stop)."""
    while True:
        try:
            swept = await sweep()
            if swept:
                log.info("expired records swept", extra={"collection": what, "swept": swept})
        except Exception as exc:  # the next sweep tries again
            log.warning("sweep of %s failed: %s", what, type(exc).__name__)
        await asyncio.sleep(interval)


class ExpirySweeper:
    """Sweeps one collection of records stamped `at` once they are older than `max_age` seconds, now and
    every `interval` seconds (`run`, a task the service cancels at stop), adding what it deleted to
    `swept` (an OpenTelemetry counter) when given. `clock` is settable for tests."""

    def __init__(
        self,
        store: Store,
        collection: str,
        *,
        max_age: float,
        interval: float,
        swept: Any | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.collection = collection
        self.max_age = max_age
        self.interval = interval
        self.swept = swept
        self.clock = clock

    async def sweep(self) -> int:
        """One sweep now; how many records it deleted."""
        deleted = await sweep_expired(self.store, self.collection, before=self.clock() - self.max_age)
        if self.swept is not None:
            self.swept.add(deleted)
        return deleted

    async def run(self) -> None:
        await sweep_every(self.interval, self.sweep, self.collection)


def _stamp(record: Record) -> float | None:
    at = record.doc.get("at")
    return float(at) if isinstance(at, int | float) and not isinstance(at, bool) else None


async def _delete(store: Store, collection: str, records: list[Record]) -> int:
    ops = [Delete(collection, r.key, expected_version=r.version) for r in records]
    try:
        return (await store.bulk_write(ops)).deleted
    except VersionConflict:
        pass
    # One of them was written again (or swept by another replica) since the scan: the rest one by one.
    deleted = 0
    for op in ops:
        try:
            deleted += (await store.bulk_write([op])).deleted
        except VersionConflict:
            continue
    return deleted
