"""The ownership interface, and `StaticOwnership`: today's fixed ordinal/replicas split."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from cdp_kit.bus.partition import owned_partitions

PartitionCallback = Callable[[int], Awaitable[None]]


async def noop(partition: int) -> None:
    return None


class Ownership(abc.ABC):
    """Which partitions this replica works on, and the hooks that hand a partition over.

    `start(on_acquire, on_release)`: `on_acquire(p)` is awaited once this replica holds p (start its
    pipeline); `on_release(p)` is awaited when it must give p up (stop fetching, drain in-flight
    commits, return): returning *is* the acknowledgement, and nobody else gets p before it. The two
    never run at once for one partition and alternate, acquire first. An `on_release` may be
    cancelled (a lease-based ownership whose lease is lost mid-drain): it must then stop working on p
    at once, finishing nothing (the engine aborts the partition as a crash would).
    `owned()`: the partitions acquired and not being released. `changes()`: each new `owned()`.
    `stop()`: release everything (awaiting `on_release`) and leave, so the others take over at once.
    """

    @abc.abstractmethod
    async def start(self, on_acquire: PartitionCallback = noop, on_release: PartitionCallback = noop) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    def owned(self) -> frozenset[int]: ...

    @abc.abstractmethod
    def changes(self) -> AsyncIterator[frozenset[int]]: ...

    def holder(self, partition: int) -> str | None:
        """Who works on `partition` as far as this member knows (for forwarding a request to it), or
        None: unknown, moving, or an ownership without holders (static: the ordinal split says it)."""
        return None


class StaticOwnership(Ownership):
    """Replica `ordinal` of `replicas` owns p where p % replicas == ordinal, for its whole life.

    For tests and single-process runs (`replicas=1` owns everything). Nothing checks that the other
    replicas agree: scaling needs `LeasedOwnership`."""

    def __init__(self, *, partitions: int, ordinal: int = 0, replicas: int = 1) -> None:
        self._partitions = frozenset(owned_partitions(partitions, ordinal, replicas))
        self._owned: frozenset[int] = frozenset()
        self._on_release: PartitionCallback = noop
        self._watchers: list[asyncio.Queue[frozenset[int]]] = []

    async def start(self, on_acquire: PartitionCallback = noop, on_release: PartitionCallback = noop) -> None:
        self._on_release = on_release
        for p in sorted(self._partitions):
            await on_acquire(p)
            self._owned |= {p}
        self._notify()

    async def stop(self) -> None:
        # Every partition drains at once: each waits at most for its in-flight fetch and commits, and
        # no other replica waits for them in any order (a process stopping drained 8 partitions one
        # after the other, up to a fetch timeout each).
        partitions = sorted(self._owned)
        self._owned = frozenset()
        await asyncio.gather(*(self._on_release(p) for p in partitions))
        self._notify()

    def owned(self) -> frozenset[int]:
        return self._owned

    async def changes(self) -> AsyncIterator[frozenset[int]]:
        queue: asyncio.Queue[frozenset[int]] = asyncio.Queue()
        self._watchers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._watchers.remove(queue)

    def _notify(self) -> None:
        for queue in self._watchers:
            queue.put_nowait(self._owned)
