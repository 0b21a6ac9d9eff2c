"""A person's history ages out: send records, decisions and ended instances older than
CDP_ORCHESTRATION_HISTORY_DAYS (400 by default), in-app messages older than CDP_ORCHESTRATION_INBOX_DAYS (90),
and decided approvals and Enroll answers older than the history period are deleted (storage limitation:
each is kept for a stated period, not until the person is deleted).

What goes, and when (`HistorySweeper`, every replica, every `SWEEP_INTERVAL` seconds, a bounded page at a
time, as the tombstone sweep does - `cdp_kit.storage.expiry`):
- `orchestration_sends`: a send record whose `at` (its last write: the outcome, or the last attempt) is
  older than the period;
- `orchestration_decisions`: a decision (and a refused entry, `<person>:~entry:<journey>`) whose `at` is
  older than the period;
- `orchestration_instances`: an instance that has ended, once both its end (`ended_at`) and its goal
  window's end (`goal_until`) are older than the period. A running instance stays, however old; an ended
  one whose goal can still be reached stays too (its person record lists it as live);
- `inbox`: an in-app message (its rendered content) added (`created_at_ms`) more than
  CDP_ORCHESTRATION_INBOX_DAYS ago, read or not: the inbox shows what is current, and nothing reads a message
  back but the person's app (a redelivered action is kept from being added again by its send record, kept
  for the history period);
- `orchestration_approvals`: an approval decided (approved, rejected, expired) more than the period ago
  (`decided_at`), or one still pending whose expiry (`expires_at`) passed more than the period ago (its
  action was decided without the record being closed). A pending approval within its expiry stays: the
  arbiter holds its action;
- `orchestration_enrollments`: an Enroll answer given (`at`) more than the period ago. A retried Enroll
  with the same idempotency key gets the first answer within the period; after it, it enrolls again.

Never removed here: the person record (their view, the arbiter's state, last entry per journey) and the
counters. That is what the live rules read back:
- frequency caps read the sends counted in the person record's arbiter state (`PersonState.sent`, kept
  for eight days: a week cap looks back to last Monday), never `orchestration_sends`;
- re-entry and cooldown read the last entry per journey in the person record (`Person.entered`);
- suppressions read watched events' `last_seen` in the person record.
What reads these collections back, and so bounds the period from below (refused at start below it,
`settings.py`):
- a dispatcher reads an action's send record before it sends, so an action delivered again (a redelivery
  within the ACTIONS stream's retention, a dead letter replayed within the dead-letter stream's 30 days)
  is not sent twice;
- the engine reads an instance's record to know a trigger started it already (`Applier.enter`), and an
  Enroll answer to know a command was answered already, so a trigger or an Enroll delivered again (within
  the same retentions) does not enter the person twice;
- a person's first identifier posts the outcomes of their sends of the last eight days (`engine.py`).
So the period is at least the dead-letter stream's 30 days and CDP_ORCHESTRATION_RETENTION_DAYS. The
inbox period is at least a week (`settings.INBOX_FLOOR_DAYS`): nothing reads a message back but the app.
`ListDecisions`, `ListApprovals` and `ExportPerson` show what is left.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from opentelemetry import metrics

from cdp_kit.storage import Delete, Store
from cdp_kit.storage.expiry import PAGE, sweep_every, sweep_expired
from cdp_kit.storage.port import Record, VersionConflict
from cdp_orchestration.channels.inapp import COLLECTION as INBOX
from cdp_orchestration.state import APPROVALS, DECISIONS, ENROLLMENTS, INSTANCES, SENDS

log = logging.getLogger("cdp.orchestration.history")

SWEEP_INTERVAL = 3600.0  # seconds between two sweeps
DAY = 86_400.0


class HistorySweeper:
    """Deletes send records, decisions, ended instances, decided approvals and Enroll answers older than
    `days`, and in-app messages older than `inbox_days` (see the module docstring), now and every `interval`
    seconds (`run`, a task the service cancels at stop), counting what it deleted by collection
    (`cdp.orchestration.history.swept`). `clock` is settable for tests."""

    def __init__(
        self,
        store: Store,
        *,
        days: float,
        inbox_days: float = 90.0,
        meter: metrics.Meter | None = None,
        clock: Callable[[], float] = time.time,
        interval: float = SWEEP_INTERVAL,
        page: int = PAGE,
    ) -> None:
        self.store = store
        self.max_age = days * DAY
        self.inbox_max_age = inbox_days * DAY
        self.clock = clock
        self.interval = interval
        self.page = page
        self.swept = (meter or metrics.get_meter("cdp.orchestration")).create_counter(
            "cdp.orchestration.history.swept",
            unit="{record}",
            description="send records, decisions, ended instances, decided approvals and Enroll answers deleted "
            "once older than CDP_ORCHESTRATION_HISTORY_DAYS, in-app messages once older than "
            "CDP_ORCHESTRATION_INBOX_DAYS, by collection",
        )

    async def sweep(self) -> dict[str, int]:
        """One sweep now: how many records it deleted, per collection."""
        before = self.clock() - self.max_age
        deleted = {}
        for collection in (SENDS, DECISIONS):
            deleted[collection] = await sweep_expired(self.store, collection, before=before, page=self.page)
        deleted[INSTANCES] = await sweep_ended_instances(self.store, before=before, page=self.page)
        inbox_before_ms = (self.clock() - self.inbox_max_age) * 1000
        deleted[INBOX] = await _sweep_where(
            self.store, INBOX, lambda doc: _older(doc.get("created_at_ms"), inbox_before_ms), self.page
        )
        deleted[APPROVALS] = await _sweep_where(
            self.store, APPROVALS, lambda doc: closed_before(doc, before), self.page
        )
        deleted[ENROLLMENTS] = await sweep_expired(self.store, ENROLLMENTS, before=before, page=self.page)
        for collection, count in deleted.items():
            if count:
                self.swept.add(count, {"collection": collection})
        return deleted

    async def _sweep_total(self) -> int:
        return sum((await self.sweep()).values())

    async def run(self) -> None:
        await sweep_every(self.interval, self._sweep_total, "orchestration history")


def ended_before(doc: dict[str, Any], before: float) -> bool:
    """Whether an instance record has ended, and both its end and its goal window's end are before `before`.
    A record without a numeric `ended_at` is kept (never guessed old)."""
    if doc.get("status") != "ended":
        return False
    stamps = [doc.get("ended_at"), doc.get("goal_until")]
    if not _number(stamps[0]):
        return False
    return all(stamp is None or (_number(stamp) and stamp < before) for stamp in stamps)


def closed_before(doc: dict[str, Any], before: float) -> bool:
    """Whether an approval was decided before `before`, or is pending with an expiry before it. A record
    without the numeric time its state needs is kept (never guessed old)."""
    if doc.get("state") == "pending":
        return _older(doc.get("expires_at"), before)
    return _older(doc.get("decided_at"), before)


async def sweep_ended_instances(store: Store, *, before: float, page: int = PAGE) -> int:
    """Delete the ended instances of `ended_before`, a page at a time; how many were deleted."""
    return await _sweep_where(store, INSTANCES, lambda doc: ended_before(doc, before), page)


async def _sweep_where(store: Store, collection: str, expired: Callable[[dict[str, Any]], bool], page: int) -> int:
    """Delete the records of `collection` whose document `expired` holds for, a page at a time."""
    swept = 0
    cursor = None
    while True:
        result = await store.scan(collection, cursor=cursor, limit=page)
        found = [r for r in result.records if expired(r.doc)]
        if found:
            swept += await _delete(store, collection, found)
        cursor = result.next_cursor
        if cursor is None:
            return swept


async def _delete(store: Store, collection: str, records: list[Record]) -> int:
    """Each delete carries the version the scan read: a record written again since (an instance handed to a
    survivor on a merge, say) is kept; replicas sweeping at once delete each record once."""
    ops = [Delete(collection, r.key, expected_version=r.version) for r in records]
    try:
        return (await store.bulk_write(ops)).deleted
    except VersionConflict:
        pass
    deleted = 0
    for op in ops:
        try:
            deleted += (await store.bulk_write([op])).deleted
        except VersionConflict:
            continue
    return deleted


def _older(stamp: Any, before: float) -> bool:
    return _number(stamp) and stamp < before


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
