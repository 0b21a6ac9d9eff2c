"""Each CRM account's budget, shared by every sync and replica through one store document.

The budget (`domain.budget.Budget`) is plain data; here it lives in `crm_budgets/<account>` and every
change to it - a reservation, what the CRM's headers say, a Retry-After - is a read, the domain call, and
a write with `expected_version` (compare-and-set). A lost race re-reads and tries again, so two replicas
can never both take the last unit of a window: a grant is only a grant once its write has landed. A
restart reads the same document back: the day's count and the window's grants survive it.

Chosen over a NATS KV bucket because every other piece of the connector's state is in the store already
(one thing to back up, one thing the tests open); the KV would give the same compare-and-set.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from cdp_crm.domain.budget import Budget, Reservation
from cdp_crm.domain.mapping import Connection
from cdp_crm.state import BUDGETS
from cdp_kit.storage import Store, VersionConflict

T = TypeVar("T")


class SharedBudget:
    def __init__(self, store: Store, connection: Connection, *, margin: float = 0.5) -> None:
        self.store = store
        self.account = connection.account
        limits = connection.limits
        self._fresh = lambda: Budget.for_kind(
            connection.kind,
            account=connection.account,
            burst=limits.burst,
            window=limits.window_seconds,
            daily=limits.daily,
            margin=margin,
        )

    @property
    def burst(self) -> int | None:
        return self._fresh().burst

    async def _change(self, change: Callable[[Budget], T]) -> T:
        while True:
            record = await self.store.get(BUDGETS, self.account)
            budget = Budget.from_state(record.doc) if record is not None else self._fresh()
            answer = change(budget)
            try:
                await self.store.put(
                    BUDGETS, self.account, budget.to_state(), expected_version=record.version if record else 0
                )
            except VersionConflict:
                await asyncio.sleep(0)  # another replica or sync wrote first: read its state and redo
                continue
            return answer

    async def reserve(self, units: int, now: float) -> Reservation:
        return await self._change(lambda b: b.reserve(units, now))

    async def acquire(self, units: int, clock: Callable[[], float], deadline: float | None = None) -> bool:
        """Reserve `units`, waiting as long as the budget says; False (nothing reserved) when that would be
        past `deadline`. The budget is shared through the store: there is no event to wait on, only a time."""
        reservation = await self.reserve(units, clock())
        while not reservation.granted:
            if deadline is not None and reservation.wait_until > deadline:
                return False
            await asyncio.sleep(max(0.01, reservation.wait_until - clock()))
            reservation = await self.reserve(units, clock())
        return True

    async def refund(self, units: int, now: float) -> None:
        await self._change(lambda b: b.refund(units, now))

    async def observe(self, headers: Mapping[str, str], now: float) -> None:
        if headers:
            await self._change(lambda b: b.observe(headers, now))

    async def throttled(self, now: float, *, retry_after: str | float | None, daily: bool) -> None:
        await self._change(lambda b: b.throttled(now, retry_after=retry_after, daily=daily))

    async def status(self, now: float) -> dict[str, Any]:
        record = await self.store.get(BUDGETS, self.account)
        budget = Budget.from_state(record.doc) if record is not None else self._fresh()
        return budget.status(now)
