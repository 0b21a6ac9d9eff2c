"""Sending one mapping's changes to its CRM: within the account's budget, bad records isolated, transient
failures retried for a while and then handed back as pending - never dropped, never dead-lettered.

    delivered = await deliverer.deliver(mapping, changes)
    delivered.synced   # (change, the CRM's result) per record written
    delivered.dead     # DeadLetters: records the CRM refused for themselves (reason-coded)
    delivered.pending  # changes still not taken after `retry_for` seconds (429s, 5xx, lost answers, auth)

Every request first reserves its cost from the account's shared budget (budgets.py) and waits when the
budget says so; the reservation is held until the answer (or the failure) comes back - the CRM counted
the request before that, however late it arrived - and the answer's limit headers and any Retry-After go
back into it in the same write. A request that timed out leaves its reservation held (the CRM may still
take it) and one that failed counts: only a request never sent gives its units back. Batches are cut so
their cost fits the budget's burst. A transient failure is sent again, unchanged, after a back-off that
grows while the CRM keeps failing (and starts over once it takes a request): every write is an upsert by
its key, so a retry after a lost answer converges to the same records.
A backfill may go through the CRM's bulk path instead (`deliver_bulk`: Salesforce Bulk API 2.0).
A stop of the service (`stop()`) ends a call's retries between attempts: no back-off or budget wait is
sat out, nothing more is sent, and what was not taken is handed back as pending at once (the batch queues
it, `crm_pending`, and the partition's next owner writes it: upserts by the same keys, one record). A
request already on its way is cut short at once too, as a lost answer (`CUT`): the CRM may have taken it,
so its values are kept as sent and its budget units stay spent - waiting for it would hold the stop for up
to the adapter's timeout (CDP_CRM_REQUEST_TIMEOUT, 30 s), past the shutdown grace (10 s).
Log lines carry the connection, mapping, counts and reason codes, never a value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from asyncio import FIRST_COMPLETED, CancelledError, Event, current_task, ensure_future, wait
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from opentelemetry.metrics import Observation

from cdp_crm.adapters import Adapter
from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.budget import Reservation
from cdp_crm.domain.coalesce import Change
from cdp_crm.domain.isolation import (
    ANSWER_LOST,
    AUTH,
    REJECTED,
    THROTTLED,
    UNAVAILABLE,
    BatchOutcome,
    CrmError,
    DeadLetter,
    Isolation,
    RecordResult,
)
from cdp_crm.domain.mapping import ObjectMapping
from cdp_crm.state import PENDING_STATE, RECORDS
from cdp_crm.writes import record_doc, unconfirmed
from cdp_kit.storage import Put

log = logging.getLogger("cdp.crm.delivery")

T = TypeVar("T")

BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)
# How long one call keeps retrying a CRM that fails (a 5xx, a 401, a dropped connection, no answer) before
# the connection is held: its changes are handed back as pending at once, and until the CRM answers again
# (a probe, `HOLD_BACKOFF` apart) no call sends it anything - so a CRM that is down or refusing every
# request delays only its own writes, never a batch's writes to the other CRMs, nor the batches after it.
PATIENCE = 3.0
HOLD_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)
# The match-key value a probe of a held connection looks up (a batch read of no consequence).
PROBE_VALUE = "cdp-connection-probe"
# What a batch the budget would not allow before the deadline is recorded as: transient, so pending.
# Match-key values per lookup of which records the CRM holds (`present`): HubSpot's batch read takes 100.
PRESENCE_BATCH = 100
NOT_SENT = CrmError(THROTTLED, "BUDGET", "not sent: the account's budget allows no request before the deadline")
# What a batch not sent because the service is stopping is recorded as: transient, so pending (never a
# failure of the CRM's: it neither holds the connection nor counts as a failed request).
STOPPED = CrmError(UNAVAILABLE, "STOPPING", "not sent: the service is stopping")
# What a request the stop cut short on its way is recorded as: a lost answer, as for a timeout (the CRM may
# have taken it: its values are kept as sent, its reservation stays held), queued for the next owner.
CUT = CrmError(ANSWER_LOST, "STOPPED", "cut short by the stop; the write may have committed")


def timed_out(error: CrmError | None) -> bool:
    """A request with no answer within its timeout, or cut short by the stop: the CRM may take it later
    still (its grant stays held)."""
    return error is not None and error.reason == ANSWER_LOST and error.code in ("TIMEOUT", "STOPPED")


@dataclass
class Delivered:
    synced: list[tuple[Change, RecordResult]] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    pending: list[Change] = field(default_factory=list)
    units: int = 0
    requests: int = 0
    # Record key -> (the version its crm_records document was read at, the version the delivery's own write
    # left it at): `_note_unanswered` writes the record while the batch is at the CRM, and the batch's
    # commit, a compare-and-set on the version it read (writes.Outcomes.versions), expects that write.
    noted: dict[str, tuple[int, int]] = field(default_factory=dict)


HEALTH_STATES = ("active", "auth_failed", "unavailable", "throttled")


@dataclass
class Health:
    """A connection as this replica last saw it (ListConnections)."""

    state: str = "active"  # active | auth_failed | unavailable | throttled
    last_error_reason: str = ""
    last_error_code: str = ""
    last_error_at: float = 0.0
    last_synced_at: float = 0.0
    held_since: float = 0.0  # > 0: held since then (the CRM kept failing): its writes are queued, not sent
    retry_at: float = 0.0  # when a held connection is tried again (by a probe, or by a write without one)
    holds: int = 0  # failed tries since it was held: the step of `HOLD_BACKOFF`


class Deliverer:
    def __init__(
        self,
        adapters: Mapping[str, Adapter],
        budgets: Mapping[str, SharedBudget],
        *,
        retry_for: float = 60.0,
        clock: Callable[[], float] = time.time,
        metrics=None,
        bulk_poll_seconds: float = 2.0,
        hold_backoff: Sequence[float] = HOLD_BACKOFF,
    ) -> None:
        """`hold_backoff`: the steps between tries of a held connection (the last one repeats); the process
        keeps `HOLD_BACKOFF`, tests that stall a CRM for seconds rather than minutes take them shorter."""
        self.bulk_poll_seconds = bulk_poll_seconds
        self.hold_backoff = tuple(hold_backoff)
        if not self.hold_backoff or min(self.hold_backoff) <= 0:
            raise ValueError(f"hold_backoff must be positive seconds, not {hold_backoff!r}")
        self.adapters = adapters
        self.budgets = budgets  # by connection id (connections of one account share the object's document)
        self.retry_for = retry_for
        self.clock = clock
        self.health: dict[str, Health] = {c: Health() for c in adapters}
        self.metrics = metrics
        self.failures = None  # a counter of requests that will be retried, by connection and reason (observe)
        self.probes: dict[str, asyncio.Task[None]] = {}  # by held connection: its probe, while it runs
        # The stop's wait helpers are imported by name: `asyncio.sleep` alone is looked up through the module
        # (a test records the back-offs by replacing it).
        self.stopping = Event()  # set by `stop()`: no retry, back-off or budget wait from then on

    def stop(self) -> None:
        """The service is stopping: every call ends its retries between attempts and hands back what was not
        taken as pending (a back-off or a wait for the budget ends at once); calls after this send nothing.
        A stop must end within the service's shutdown grace, and a CRM answering 503 or 429 to everything
        kept a batch - and the partition's drain with it - for up to `retry_for` (the connection held only
        after `PATIENCE`, a 429's budget wait sat out whole); a CRM that holds a request unanswered kept it
        for the adapter's whole timeout: requests on their way are cut short too (`unless_stopped`)."""
        self.stopping.set()

    async def unless_stopped(self, call: Awaitable[T]) -> T | CrmError:
        """`call`'s result, or STOPPED once `stop()` comes while it waits - a CRM request on its way, or a
        read of its news before a write (engine.py): cancelled then, as its own timeout would have (every
        caller takes a request with no answer as one that may have landed)."""
        if self.stopping.is_set():
            if asyncio.iscoroutine(call):
                call.close()  # never started
            return STOPPED
        running = ensure_future(call)
        stopped = ensure_future(self.stopping.wait())
        try:
            await wait((running, stopped), return_when=FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not running.done():
                running.cancel()
                with contextlib.suppress(CancelledError):
                    await running
                if current_task().cancelling():
                    raise CancelledError
        if running.cancelled():
            return STOPPED
        return running.result()

    def observe(self, meter) -> None:
        """What an operator alerts on while a CRM is down: `cdp.crm.connection.state` (1 for each connection's
        current state - active, auth_failed, unavailable, throttled - 0 for the others) and
        `cdp.crm.request.failures` (requests that failed and will be retried, by connection and reason)."""
        self.failures = meter.create_counter(
            "cdp.crm.request.failures", unit="{request}",
            description="CRM requests that failed and will be retried, by connection and reason",
        )  # fmt: skip

        def states(_options):
            for connection, health in list(self.health.items()):
                for state in HEALTH_STATES:
                    yield Observation(int(health.state == state), {"connection": connection, "state": state})

        meter.create_observable_gauge(
            "cdp.crm.connection.state", callbacks=[states], unit="1",
            description="1 for each connection's current state (active, auth_failed, unavailable, throttled)",
        )  # fmt: skip

    def batch_size(self, mapping: ObjectMapping) -> int:
        adapter = self.adapters[mapping.connection]
        size = adapter.batch_limit
        burst = self.budgets[mapping.connection].burst
        while burst is not None and size > 1 and adapter.cost(mapping, size) > burst:
            size = max(1, size // 2)
        return size

    async def deliver(
        self,
        mapping: ObjectMapping,
        changes: list[Change],
        *,
        retry_for: float | None = None,
        deadline: float | None = None,
    ) -> Delivered:
        """Send `changes`; retry what fails transiently until `deadline` (default: `retry_for` seconds from
        now). After the deadline no request is started, except a call's first (so a call always tries)."""
        delivered = Delivered()
        if not changes:
            return delivered
        if self.resting(mapping.connection) or self.stopping.is_set():
            # held: retried once the CRM answers again (`_hold`); stopping: by the partition's next owner
            delivered.pending.extend(changes)
            return delivered
        if deadline is None:
            deadline = self.clock() + (self.retry_for if retry_for is None else retry_for)
        size = self.batch_size(mapping)
        waiting = deque(changes[i : i + size] for i in range(0, len(changes), size))
        attempt = 0
        failing_since: float | None = None
        while waiting:
            isolation = Isolation(waiting.popleft())
            started = self.clock()
            while (batch := isolation.next_batch()) is not None:
                if not await self._send(mapping, batch, isolation, delivered, deadline):
                    isolation.record(batch, BatchOutcome.failed(NOT_SENT), self.clock())
            delivered.synced.extend(isolation.synced)
            delivered.dead.extend(isolation.dead)
            if isolation.synced or isolation.dead:
                self._release(mapping.connection)  # the CRM answers (a held connection's write went through)
            if not isolation.retry:
                attempt, failing_since = 0, None  # the CRM is taking requests: back off from the start again
                continue
            if self.stopping.is_set():
                # Stopping: no further attempt. What failed, and what was not sent, waits for the next owner.
                delivered.pending.extend(change for retry in isolation.retry for change in retry)
                delivered.pending.extend(change for rest in waiting for change in rest)
                break
            error = isolation.retry_errors[-1]
            self._note_failure(mapping.connection, error)
            if error is NOT_SENT:
                # The account's budget allows no request before the deadline (a Retry-After, the daily
                # limit): nothing can be sent before then, so the rest is queued at once rather than tried
                # again until the deadline - which held the batch, and every batch after it, that long.
                delivered.pending.extend(change for retry in isolation.retry for change in retry)
                delivered.pending.extend(change for rest in waiting for change in rest)
                break
            now = self.clock()
            failing_since = started if failing_since is None else failing_since
            if self.health[mapping.connection].held_since or now - failing_since >= PATIENCE:
                # The CRM keeps failing: hold the connection; this call's changes and the rest wait for it.
                self._hold(mapping)
                delivered.pending.extend(change for retry in isolation.retry for change in retry)
                delivered.pending.extend(change for rest in waiting for change in rest)
                break
            lost = [
                change
                for failed, failure in zip(isolation.retry, isolation.retry_errors, strict=True)
                if failure.reason == ANSWER_LOST
                for change in failed
            ]
            if lost:
                await self._note_unanswered(mapping, lost, delivered)
            if now >= deadline:
                delivered.pending.extend(change for retry in isolation.retry for change in retry)
                continue
            await self._pause(min(BACKOFF[min(attempt, len(BACKOFF) - 1)], max(0.0, deadline - self.clock())))
            attempt += 1
            waiting.extend(isolation.retry)
        if delivered.synced:
            health = self.health.setdefault(mapping.connection, Health())
            health.last_synced_at = self.clock()
            if not delivered.pending:
                health.state = "active"
        if self.metrics is not None:
            self.metrics.delivered(mapping, delivered)
        if delivered.dead or delivered.pending:
            log.info(
                "crm delivery incomplete",
                extra={
                    "connection": mapping.connection,
                    "mapping": mapping.id,
                    "synced": len(delivered.synced),
                    "dead_lettered": len(delivered.dead),
                    "pending": len(delivered.pending),
                },
            )
        return delivered

    async def claim(self, mapping: ObjectMapping, crm_id: str, field: str, value: str, deadline: float) -> bool:
        """Stamp the match key `field` = `value` on the CRM's record `crm_id` (`Adapter.claim`), two requests
        from the account's budget; False when it was not (no such record, another person's, an error, no
        budget before `deadline`, an adapter that cannot)."""
        adapter = self.adapters[mapping.connection]
        stamp = getattr(adapter, "claim", None)
        if stamp is None or self.resting(mapping.connection):
            return False
        budget = self.budgets[mapping.connection]
        reservation = await budget.acquire(2, self.clock, deadline)
        if reservation is None:
            return False
        answer = await self.unless_stopped(stamp(mapping, crm_id, field, value))
        done, headers = (None, {}) if answer is STOPPED else answer
        await budget.settle(reservation, self.clock(), headers, answered=done is not None)
        return bool(done)

    async def present(self, mapping: ObjectMapping, field: str, values: list[str], deadline: float) -> set[str] | None:
        """Which of these match-key values (lower case) the CRM holds a record of `mapping`'s object for, a
        request per `PRESENCE_BATCH` from the account's budget; None when the CRM cannot say (its adapter
        has no lookup, an error, or the budget allows no request before `deadline`): then the connector's
        own record of what it wrote stands."""
        adapter = self.adapters[mapping.connection]
        lookup = getattr(adapter, "present", None)
        if lookup is None or self.resting(mapping.connection):
            return None
        budget = self.budgets[mapping.connection]
        found: set[str] = set()
        for i in range(0, len(values), PRESENCE_BATCH):
            reservation = await budget.acquire(1, self.clock, deadline)
            if reservation is None:
                return None
            asked = await self.unless_stopped(lookup(mapping, field, values[i : i + PRESENCE_BATCH]))
            answer, headers = (None, {}) if asked is STOPPED else asked
            await budget.settle(reservation, self.clock(), headers, answered=answer is not None)
            if answer is None:
                return None
            found |= answer
        return found

    async def _send(
        self, mapping: ObjectMapping, batch: list[Change], isolation: Isolation, delivered: Delivered, deadline: float
    ) -> bool:
        """One request within the budget; False when the budget will not allow it before `deadline`."""
        adapter = self.adapters[mapping.connection]
        budget = self.budgets[mapping.connection]
        cost = adapter.cost(mapping, len(batch), op=batch[0].op)
        if delivered.requests and self.clock() > deadline:
            return False
        if self.stopping.is_set():
            isolation.record(batch, BatchOutcome.failed(STOPPED), self.clock())
            return True
        reservation = await self._acquire(budget, cost, deadline)
        if reservation is STOPPED:
            isolation.record(batch, BatchOutcome.failed(STOPPED), self.clock())
            return True
        if reservation is None:
            self.health[mapping.connection].state = "throttled"
            return False
        delivered.units += cost
        delivered.requests += 1
        outcome = await self.unless_stopped(adapter.send(mapping, batch))
        if outcome is STOPPED:  # cut short on its way: a lost answer (the CRM may have taken it)
            outcome = BatchOutcome.failed(CUT)
        now = self.clock()
        error = outcome.error
        throttled = (error.retry_after, error.daily) if error is not None and error.reason == THROTTLED else None
        await budget.settle(reservation, now, outcome.headers, answered=not timed_out(error), throttled=throttled)
        isolation.record(batch, outcome, now)
        return True

    async def _pause(self, seconds: float) -> None:
        """A back-off of `seconds`, ended early by `stop()`."""
        sleeping = ensure_future(asyncio.sleep(seconds))
        stopped = ensure_future(self.stopping.wait())
        try:
            await wait((sleeping, stopped), return_when=FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            stopped.cancel()

    async def _acquire(self, budget: SharedBudget, cost: int, deadline: float) -> Reservation | CrmError | None:
        """`budget.acquire`, or STOPPED once `stop()` is called while it waits (a 429's Retry-After, a full
        burst window: seconds). The wait is a sleep between store writes; a grant that landed as the stop
        came is given back (its request is never sent)."""
        if self.stopping.is_set():
            return STOPPED
        acquiring = ensure_future(budget.acquire(cost, self.clock, deadline))
        stopped = ensure_future(self.stopping.wait())
        try:
            await wait((acquiring, stopped), return_when=FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not acquiring.done():
                acquiring.cancel()
        if not acquiring.cancelled() and acquiring.done() and acquiring.exception() is None:
            reservation = acquiring.result()
            if reservation is None or not self.stopping.is_set():
                return reservation
            await budget.refund(reservation, self.clock())
            return STOPPED
        with contextlib.suppress(CancelledError):
            await acquiring  # its cancellation (or its own error, raised here as before)
        if current_task().cancelling():
            raise CancelledError
        return STOPPED

    async def deliver_bulk(
        self,
        mapping: ObjectMapping,
        changes: list[Change],
        *,
        deadline: float | None = None,
        progress: Callable[[str, str, int], Awaitable[None]] | None = None,
    ) -> Delivered:
        """A backfill's changes through the CRM's bulk path where it has one (Salesforce Bulk API 2.0:
        one ingest job for them all) - record mappings that may create; anything else, and a job that
        fails as a whole or cannot be started, goes through `deliver` (the batch endpoints, which isolate
        bad records and retry). Rows the job refused or left unprocessed are dead letters, replayable.
        Every request of the job (create, upload, close, each poll, the result reads) is reserved from the
        account's budget first."""
        adapter = self.adapters[mapping.connection]
        bulk = getattr(adapter, "bulk_upsert", None)
        if (
            bulk is None or not changes or mapping.kind != "record" or mapping.mode == "update_only"
            or self.resting(mapping.connection)
        ):  # fmt: skip
            return await self.deliver(mapping, changes, deadline=deadline)
        if deadline is None:
            deadline = self.clock() + self.retry_for
        budget = self.budgets[mapping.connection]
        units = adapter.bulk_cost()
        job = await budget.acquire(units, self.clock, deadline)
        if job is None:
            return await self.deliver(mapping, changes, deadline=deadline)
        polled: list[Reservation] = []

        async def poll(seconds: float) -> None:
            nonlocal units
            await asyncio.sleep(seconds)
            if polled:  # the previous poll's answer is in: its slot ages from now
                await budget.settle(polled.pop(), self.clock())
            polled.append(await budget.acquire(1, self.clock))  # a poll waits for the budget however long
            units += 1

        outcome = await bulk(mapping, changes, poll=poll, poll_seconds=self.bulk_poll_seconds, progress=progress)
        now = self.clock()
        for reservation in polled:
            await budget.settle(reservation, now)
        await budget.settle(job, now, outcome.headers, answered=not timed_out(outcome.error))
        if outcome.error is not None:
            self._note_failure(mapping.connection, outcome.error)
            fallback = await self.deliver(mapping, changes, deadline=max(deadline, now + 1.0))
            fallback.units += units
            return fallback
        delivered = Delivered(units=units, requests=units)
        for change in changes:
            record = change.record
            result = outcome.results.get(record)
            if result is None:  # not in any result file: never seen by the job; the batch endpoints take it
                delivered.pending.append(change)
            elif result.ok:
                delivered.synced.append((change, result))
            else:
                error = result.error or CrmError(REJECTED, "BULK_FAILED", "", 200)
                dead = DeadLetter(
                    mapping.connection, mapping.name, record, error.reason, error.code, error.message,
                    error.status, now, change,
                )  # fmt: skip
                delivered.dead.append(dead)
        if delivered.pending:
            rest = await self.deliver(mapping, delivered.pending, deadline=max(deadline, now + 1.0))
            delivered.pending = rest.pending
            delivered.synced += rest.synced
            delivered.dead += rest.dead
            delivered.units += rest.units
        if delivered.synced:
            health = self.health.setdefault(mapping.connection, Health())
            health.last_synced_at = now
        if self.metrics is not None:
            self.metrics.delivered(mapping, delivered)
        log.info(
            "crm bulk job done",
            extra={"connection": mapping.connection, "mapping": mapping.id, "synced": len(delivered.synced),
                   "dead_lettered": len(delivered.dead), "pending": len(delivered.pending)},
        )  # fmt: skip
        return delivered

    async def _note_unanswered(self, mapping: ObjectMapping, changes: list[Change], delivered: Delivered) -> None:
        """Record, before they are sent again, the values of writes whose answer was lost: the CRM may hold
        them now, and until a write is confirmed the inbound side must read them there as the CDP's own
        (`crm_records` `sent`, `writes.unconfirmed`) - not a CRM user's edit to post back as news. Retries go
        on for up to `retry_for` (429s in between, a CRM failing): the batch's own commit of them comes too
        late. Only where the account's budget lives in the store (`SharedBudget`); a failure to write is
        logged and the retries go on (the batch's commit records them as before). A compare-and-set on the
        version read here (a relink landing meanwhile is not overwritten: the write fails, and so does the
        batch's commit); the versions it left go into `delivered.noted`."""
        store = getattr(self.budgets.get(mapping.connection), "store", None)
        changes = [c for c in changes if c.fields]  # a list membership carries no values
        if store is None or not changes:
            return
        try:
            found = await store.get_many(RECORDS, list(dict.fromkeys(c.record for c in changes)))
            now, writes = self.clock(), {}
            for change in changes:
                record = found.get(change.record)
                if record is not None:
                    doc = writes.get(change.record) or dict(record.doc)
                    doc.update(unconfirmed(doc, change.fields))
                else:  # never written before: a record holding only what may have landed
                    doc = writes.get(change.record) or record_doc(
                        mapping, change, {}, None, PENDING_STATE, now, None, **unconfirmed({}, change.fields)
                    )
                    doc.update(unconfirmed(doc, change.fields))
                writes[change.record] = doc
            read = {key: found[key].version if key in found else 0 for key in writes}
            result = await store.bulk_write(
                [Put(RECORDS, key, doc, expected_version=read[key]) for key, doc in writes.items()]
            )
            for key, version in zip(writes, result.versions, strict=True):
                first, left = delivered.noted.get(key, (read[key], read[key]))
                # Chained on this delivery's own earlier write, or the first: else another write came
                # between the two (-1: the batch's commit, expecting the version it read, fails).
                delivered.noted[key] = (first if left == read[key] else -1, version)
        except Exception as exc:
            log.warning(
                "recording unanswered crm writes failed",
                extra={"connection": mapping.connection, "mapping": mapping.id, "error": type(exc).__name__},
            )

    # --- holding a failing connection -----------------------------------------------------------------

    def read_failed(self, mapping: ObjectMapping, code: str) -> None:
        """A read of the CRM failed where a write was to follow (the engine reads a connection's news before
        writing to it): the CRM is failing as the write would find it - a hang costs the read's whole
        timeout. The connection is held at once, so the next batches queue its changes without waiting on
        it again; the probe tells when it answers. `code`: what failed (an exception's name)."""
        self._note_failure(mapping.connection, CrmError(UNAVAILABLE, code, "reading the CRM's changes failed"))
        self._hold(mapping)

    def resting(self, connection: str) -> bool:
        """Whether nothing is to be sent to this connection now: it is held (its CRM kept failing) and either
        its probe decides when it answers again, or its next try (a write, for a CRM without a probe) is
        not due yet. Its changes are queued meanwhile (`crm_pending`, committed with the batch)."""
        health = self.health.get(connection)
        if health is None or not health.held_since:
            return False
        return connection in self.probes or self.clock() < health.retry_at

    def _hold(self, mapping: ObjectMapping) -> None:
        connection = mapping.connection
        health = self.health.setdefault(connection, Health())
        now = self.clock()
        if not health.held_since:
            health.held_since, health.holds = now, 0
            log.warning(
                "crm connection held: its writes are queued until it answers again",
                extra={
                    "connection": connection,
                    "reason": health.last_error_reason,
                    "crm_code": health.last_error_code,
                },
            )
        health.retry_at = now + self._hold_step(health.holds)
        health.holds += 1
        if connection not in self.probes and self._probe_call(mapping) is not None:
            self.probes[connection] = asyncio.get_running_loop().create_task(self._probe(mapping))

    def _hold_step(self, holds: int) -> float:
        """Seconds until a held connection that failed `holds` tries since it was held is tried again."""
        return self.hold_backoff[min(holds, len(self.hold_backoff) - 1)]

    def _probe_call(self, mapping: ObjectMapping) -> Callable[[], Awaitable[tuple[Any, dict]]] | None:
        """A probe of `mapping`'s CRM: the adapter's own cheap authenticated read (`probe`: Dataverse's
        WhoAmI, a Zoho module's first id) or a lookup of a value no record holds by the mapping's match field
        (`present`: HubSpot's batch read, Salesforce's SOQL); None when it has neither."""
        adapter = self.adapters[mapping.connection]
        if (probe := getattr(adapter, "probe", None)) is not None:
            return lambda: probe(mapping)
        lookup = getattr(adapter, "present", None)
        if lookup is None or mapping.kind != "record" or len(mapping.match) != 1:
            return None
        field = mapping.match[0].crm_field
        return lambda: lookup(mapping, field, [PROBE_VALUE])

    async def _probe(self, mapping: ObjectMapping) -> None:
        """Until the held connection's CRM answers: at each `retry_at`, one probe (`_probe_call`; a unit of the
        account's budget) - not a write, and not under any partition's lock: a CRM that hangs holds up nothing."""
        connection = mapping.connection
        health = self.health[connection]
        probe = self._probe_call(mapping)
        assert probe is not None, "a probe is only started for a CRM that has one"
        budget = self.budgets[connection]
        try:
            while health.held_since:
                await asyncio.sleep(max(0.0, health.retry_at - self.clock()))
                reservation = await budget.acquire(1, self.clock, self.clock() + self.retry_for)
                if reservation is None:
                    health.retry_at = self.clock() + self.hold_backoff[-1]
                    continue
                answer, headers = await probe()
                await budget.settle(reservation, self.clock(), headers, answered=answer is not None)
                if answer is not None:
                    self._release(connection)
                    break
                health.retry_at = self.clock() + self._hold_step(health.holds)
                health.holds += 1
        except Exception as exc:  # the store failing: writes try the CRM themselves again
            log.warning("crm connection probe failed", extra={"connection": connection, "error": type(exc).__name__})
            health.retry_at = self.clock()
        finally:
            self.probes.pop(connection, None)

    def _release(self, connection: str) -> None:
        health = self.health.get(connection)
        if health is None or not health.held_since:
            return
        log.info(
            "crm connection answers again: its queued writes follow",
            extra={"connection": connection, "held_seconds": round(self.clock() - health.held_since, 1)},
        )
        health.held_since, health.retry_at, health.holds = 0.0, 0.0, 0
        health.state = "active"

    async def close(self) -> None:
        """Stop the probes of held connections."""
        for task in list(self.probes.values()):
            task.cancel()
        for task in list(self.probes.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.probes.clear()

    def _note_failure(self, connection: str, error: CrmError) -> None:
        health = self.health.setdefault(connection, Health())
        health.state = {AUTH: "auth_failed", UNAVAILABLE: "unavailable", THROTTLED: "throttled"}.get(
            error.reason, "unavailable"
        )
        health.last_error_reason = error.reason
        health.last_error_code = error.code
        health.last_error_at = self.clock()
        if self.failures is not None:
            self.failures.add(1, {"connection": connection, "reason": error.reason})
        log.warning(
            "crm request will be retried",
            extra={
                "connection": connection,
                "reason": error.reason,
                "crm_code": error.code,
                "http_status": error.status,
            },
        )
