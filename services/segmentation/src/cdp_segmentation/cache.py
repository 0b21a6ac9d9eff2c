"""Another service's answer kept a few seconds: what ListComputedTraitReaders asks orchestration
(ListJourneys) and scoring (ListModels). Each call of it asked both, so any caller with segmentation:read
made segmentation call them as often as it liked.

An answer is kept `seconds` (CDP_SEGMENTATION_READERS_CACHE_SECONDS), and forgotten as soon as that service
announces a change (`forget`: orchestration.journeys.changed, scoring.models.changed): a journey published
or archived, a model deployed, promoted or rolled back is seen by the next call, not seconds later. What
can be stale for up to `seconds`: an answer given while the service could still be asked, once it cannot
(it is no longer UNAVAILABLE until the answer expires), and a change whose announcement has not arrived yet
(core NATS, milliseconds; a change made at the same time as the question is a race either way). One call
at a time: callers arriving while one is under way share it. A failure is never kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Cached(Generic[T]):
    def __init__(
        self, fetch: Callable[[], Awaitable[T]], seconds: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._fetch = fetch
        self.seconds = seconds
        self._clock = clock
        self._value: tuple[float, T] | None = None  # (expires at, answer)
        self._pending: asyncio.Future[T] | None = None
        self._generation = 0  # forgotten so many times: an answer asked for before the last is not kept

    async def __call__(self) -> T:
        if self.seconds <= 0:
            return await self._fetch()
        if self._value is not None and self._clock() < self._value[0]:
            return self._value[1]
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(self._refresh(self._generation))
        return await asyncio.shield(self._pending)

    async def _refresh(self, generation: int) -> T:
        value = await self._fetch()
        if generation == self._generation:
            self._value = (self._clock() + self.seconds, value)
        return value

    def forget(self) -> None:
        """The service announced a change: the next call asks it again."""
        self._generation += 1
        self._value = None
        self._pending = None


__all__ = ["Cached"]
