"""One writer: identity works on all of its partitions in one replica, never on some of them in several.

Why identity cannot split its partitions between replicas the way profile does: the graph spans
partitions. Raw events are partitioned by user id (or anonymous id), but one person owns identifiers
of many partitions, and a merge rewrites persons that other partitions' events resolve to. Each
replica keeps the graph hot in memory and reads its cache without asking the store. Writes are
version-checked, so two replicas changing one record cannot both win; but reads are not: after replica
B merges person P into Q, replica A - which cached P as a root - goes on resolving P's anonymous id to
P without writing anything (a resolution that changes nothing writes nothing), and publishes events of
a person that no longer exists. Lookups and the limits, quarantine counts and winner choices of later
merges read the same stale cache. Nothing invalidates one replica's cache when another writes, so
several writers resolve events wrongly and silently.

So `OneWriter` turns the kit's ownership into a single *writer lease*: `ownership_from_settings(...,
group="identity", partitions=1)` hands its one partition to exactly one live replica at a time, and
that replica works on every partition of `events.raw`. The others are standbys: they own no
partition, their API answers UNAVAILABLE (`IdentityEngine.writer`), and they purge their caches on
`privacy.deleted` like any replica. When the writer stops (SIGTERM) it drains every partition, lets
its last writes land, and only then frees the lease; a standby takes it at once (or after
`CDP_OWNERSHIP_TTL` when the writer crashed) and drops whatever it had cached before working: the old
writer changed the graph meanwhile. So scaling identity's StatefulSet up adds hot standbys, never a
second writer; static ownership with `CDP_REPLICAS` > 1 is refused at start-up (settings.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from cdp_kit.ownership import Ownership, PartitionCallback
from cdp_kit.ownership.base import noop

log = logging.getLogger("cdp.identity")

#: The writer lease is the only partition of identity's ownership group.
WRITER_LEASE = 0


class OneWriter(Ownership):
    """All `partitions` while `lease` (an ownership of one partition) holds its partition; none otherwise.

    `become_writer()` is awaited before the first partition starts (drop stale state); `stop_writing()`
    when the lease goes, before the partitions drain (refuse new API writes, let the queued ones land).
    The lease is freed after both. A release cut short (cancelled: the lease was lost) stops every
    partition all the same, wherever the cut found it."""

    def __init__(
        self,
        lease: Ownership,
        *,
        partitions: int,
        become_writer: Callable[[], Awaitable[None]],
        stop_writing: Callable[[], Awaitable[None]],
    ) -> None:
        self.lease = lease
        self.partitions = partitions
        self._become_writer = become_writer
        self._stop_writing = stop_writing
        self._owned: frozenset[int] = frozenset()
        self._on_acquire: PartitionCallback = noop
        self._on_release: PartitionCallback = noop
        self._watchers: list = []

    async def start(self, on_acquire: PartitionCallback = noop, on_release: PartitionCallback = noop) -> None:
        self._on_acquire, self._on_release = on_acquire, on_release
        await self.lease.start(self._acquired, self._released)
        if not self.lease.owned():
            log.info("identity standby: another replica holds the writer lease")

    async def stop(self) -> None:
        await self.lease.stop()

    def owned(self) -> frozenset[int]:
        return self._owned

    async def changes(self) -> AsyncIterator[frozenset[int]]:
        async for lease in self.lease.changes():
            yield frozenset(range(self.partitions)) if WRITER_LEASE in lease else frozenset()

    async def _acquired(self, lease: int) -> None:
        if lease != WRITER_LEASE:
            return
        await self._become_writer()
        for p in range(self.partitions):
            await self._on_acquire(p)
            self._owned |= {p}
        log.info("identity writer: working on every partition", extra={"partitions": self.partitions})

    async def _released(self, lease: int) -> None:
        if lease != WRITER_LEASE:
            return
        log.info("identity writer lease released: draining every partition", extra={"partitions": self.partitions})
        partitions = sorted(self._owned)
        self._owned = frozenset()
        releases: list[asyncio.Future[None]] = []
        try:
            await self._stop_writing()
            releases = [asyncio.ensure_future(self._on_release(p)) for p in partitions]
            await asyncio.gather(*releases)  # all drain at once; a cut cancels each
        except asyncio.CancelledError:
            # Cut (the lease was lost before this release ended: `cdp_kit.ownership.leased`) while the queued
            # writes landed: every partition is still released, and cut at once - each stops fetching and is
            # aborted as a crash would abort it. Left alone they worked on without the lease, on after another
            # replica took it (two writers). Each release begins before it is cancelled: a cancelled one that
            # never ran would leave its partition draining, not aborted.
            if not releases:
                releases = [asyncio.ensure_future(self._on_release(p)) for p in partitions]
                await asyncio.sleep(0)
                for release in releases:
                    release.cancel()
                await asyncio.wait(releases)
            raise
