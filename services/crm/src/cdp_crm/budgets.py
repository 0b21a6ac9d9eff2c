"""Each CRM account's budget, shared by every sync and replica through one store document.

The budget (`domain.budget.Budget`) is plain data; here it lives in `crm_budgets/<account>` and every
change to it - a reservation, a request's answer coming back, what the CRM's headers say, a Retry-After -
is the domain call and a write with `expected_version` (compare-and-set). A lost race re-reads and tries
again, so two replicas can never both take the last unit of a window: a grant is only a grant once its
write has landed. Within one process the changes take turns (a lock) on the last state this process
wrote, so they neither race each other nor read the document back before every write. A restart reads
the same document back: the day's count and the window's grants survive it.

A grant is held until its request's answer comes back (`settle`): the CRM counts a request when it
arrives, and only the answer bounds when that was (domain/budget.py).

The limits are the connection's (`limits`, else the CRM's documented ones) as the document records them
(`configured`): a start with other limits - a contract raised from 250,000 requests a day to 500,000, or
lowered - adopts them, keeping the day's count and the window's grants. Without that the stored document
kept the limits it was first written with for ever (only the CRM's headers could lower them). While the
configured limits stay the same, what the CRM's headers lowered stays lowered.

Chosen over a NATS KV bucket because every other piece of the connector's state is in the store already
(one thing to back up, one thing the tests open); the KV would give the same compare-and-set.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from cdp_crm.domain.budget import UTC, Budget, Reservation
from cdp_crm.domain.mapping import Connection
from cdp_crm.state import BUDGETS
from cdp_kit.storage import Store, VersionConflict

T = TypeVar("T")

# The limits the budget document was written under (the connection's, or the CRM's documented ones).
CONFIGURED = "configured"


class SharedBudget:
    def __init__(self, store: Store, connection: Connection, *, margin: float = 0.1, hold: float = 120.0) -> None:
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
            hold=hold,
            day_zone=limits.day_zone or UTC,
        )
        fresh = self._fresh()
        self._configured = {"burst": fresh.burst, "window": fresh.window, "daily": fresh.daily}
        if fresh.day_zone != UTC:  # recorded only when set: documents written before it hold none
            self._configured["day_zone"] = fresh.day_zone
        self._lock = asyncio.Lock()
        self._known: tuple[int, dict[str, Any]] | None = None  # (version, state) this process last wrote
        # The budget whose state `_known` holds, as this process last wrote it: the next change starts from it
        # instead of reading the state again (`Budget.from_state` of a window of grants - HubSpot's holds up
        # to 190 - was a third of what a change cost, and every request makes two). None after any failed
        # write: the change may have altered it, so the next one starts from a state read again.
        self._budget: Budget | None = None

    @property
    def burst(self) -> int | None:
        return self._fresh().burst

    async def _change(self, change: Callable[[Budget], T]) -> T:
        async with self._lock:
            known = self._known
            while True:
                if known is None:
                    record = await self.store.get(BUDGETS, self.account)
                    known = (record.version, record.doc) if record is not None else (0, {})
                version, doc = known
                budget = self._budget if known is self._known and self._budget is not None else None
                if budget is None:
                    budget = self._read(doc)
                self._budget = None  # changed below: kept again only once its state is written
                answer = change(budget)
                state = {**budget.to_state(), CONFIGURED: self._configured}
                try:
                    written = await self.store.put(BUDGETS, self.account, state, expected_version=version)
                except VersionConflict:
                    # Another replica wrote first: read its state and redo.
                    known = self._known = None
                    await asyncio.sleep(0)
                    continue
                self._known = (written, state)
                self._budget = budget
                return answer

    async def reserve(self, units: int, now: float) -> Reservation:
        return await self._change(lambda b: b.reserve(units, now))

    async def acquire(
        self, units: int, clock: Callable[[], float], deadline: float | None = None
    ) -> Reservation | None:
        """Reserve `units`, waiting as long as the budget says; None (nothing reserved) when that would be
        past `deadline`. The budget is shared through the store: there is no event to wait on, only a time.
        The grant is held until `settle` (or `refund`) is given it."""
        reservation = await self.reserve(units, clock())
        while not reservation.granted:
            if deadline is not None and reservation.wait_until > deadline:
                return None
            await asyncio.sleep(max(0.01, reservation.wait_until - clock()))
            reservation = await self.reserve(units, clock())
        return reservation

    async def settle(
        self,
        reservation: Reservation | None,
        now: float,
        headers: Mapping[str, str] | None = None,
        *,
        answered: bool = True,
        throttled: tuple[str | float | None, bool] | None = None,
    ) -> None:
        """A request made on `reservation` is over, in one write: its grant released (`answered`: an answer
        or a failure came back; not after a timeout, when the CRM may still take it: then the grant is held
        its `hold`), the answer's limit headers observed, and a throttling answer's (Retry-After, daily)."""

        def change(budget: Budget) -> None:
            if reservation is not None and reservation.ticket and answered:
                budget.release(reservation.ticket, now)
            if headers:
                budget.observe(headers, now)
            if throttled is not None:
                budget.throttled(now, retry_after=throttled[0], daily=throttled[1])

        await self._change(change)

    async def refund(self, reservation: Reservation, now: float) -> None:
        """Give back a reservation whose request was never sent."""
        await self._change(lambda b: b.refund(reservation.ticket, now))

    async def observe(self, headers: Mapping[str, str], now: float) -> None:
        if headers:
            await self._change(lambda b: b.observe(headers, now))

    async def throttled(self, now: float, *, retry_after: str | float | None, daily: bool) -> None:
        await self._change(lambda b: b.throttled(now, retry_after=retry_after, daily=daily))

    async def status(self, now: float) -> dict[str, Any]:
        record = await self.store.get(BUDGETS, self.account)
        return self._read(record.doc if record is not None else {}).status(now)

    def _read(self, doc: Mapping[str, Any]) -> Budget:
        """The budget a stored document holds, under the limits configured now: a document written under other
        limits (or before they were recorded) takes the configured ones, its usage kept."""
        if not doc:
            return self._fresh()
        budget = Budget.from_state(doc)
        if doc.get(CONFIGURED) != self._configured:
            budget.burst, budget.window, budget.daily = (
                self._configured["burst"], self._configured["window"], self._configured["daily"],
            )  # fmt: skip
            zone = self._configured.get("day_zone", UTC)
            if budget.day_zone != zone:
                budget.move_day_zone(zone)
        return budget
