"""Retries that keep the account's budget busy. Queued changes (what a batch's deadline left, crm_pending)
are retried by the partitions' owner: the partitions side by side, so a backlog drains at the pace the
budget allows, not at one request at a time; and as soon as the batch that queued them is committed, not
at the next round `every` seconds later. Within a delivery, a failure between answered requests backs
off briefly: the back-off grows only while the CRM keeps failing."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace

from cdp_crm import delivery
from cdp_crm.budgets import SharedBudget
from cdp_crm.delivery import Deliverer
from cdp_crm.domain.coalesce import Change
from cdp_crm.domain.isolation import UNAVAILABLE, BatchOutcome, CrmError, RecordResult
from cdp_crm.domain.mapping import parse_connections
from cdp_crm.domain.projection import Source, project
from cdp_crm.engine import CrmLogic, Input, change_doc
from cdp_crm.state import PENDING, prepare_store
from cdp_kit.storage import open_store
from cdp_testing.crm import hubspot_document
from cdp_testing.waiting import eventually


class SlowCrm:
    """A CRM whose every answer takes a while: notes how many requests it holds at once."""

    kind, batch_limit = "hubspot", 100

    def __init__(self) -> None:
        self.in_flight = self.most = 0
        self.together = asyncio.Event()

    def cost(self, mapping, n, op="upsert") -> int:
        return 1

    async def send(self, mapping, changes) -> BatchOutcome:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        if self.in_flight >= 2:
            self.together.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.together.wait(), 1.0)
        self.in_flight -= 1
        return BatchOutcome({c.record: RecordResult(c.record, True, "1", True) for c in changes})


async def test_queued_changes_of_several_partitions_are_retried_side_by_side():
    (connection,) = parse_connections(hubspot_document("http://127.0.0.1:9"))
    contacts = connection.mapping("contacts")
    crm = SlowCrm()
    async with open_store("memory://") as store:
        await prepare_store(store)
        deliverer = Deliverer({connection.id: crm}, {connection.id: SharedBudget(store, connection)}, retry_for=5.0)
        logic = CrmLogic(store, [connection], deliverer)
        for partition in (0, 1):
            for i in range(150):  # two requests each
                person = f"person-{partition}-{i}"
                projection = project(contacts, Source(person, {"traits.email": f"{person}@example.com"}))
                change = Change(contacts.name, projection.key, projection.fields, stamp=1, person_id=person)
                await store.put(PENDING, change.record, change_doc(change, partition))
        idle = asyncio.Event()
        idle.set()
        engine = SimpleNamespace(
            owned=lambda: {0, 1}, pipelines={0: SimpleNamespace(idle=idle), 1: SimpleNamespace(idle=idle)}
        )
        retrier = asyncio.create_task(logic.retry_forever(engine, 30.0))
        try:
            await eventually(lambda: _nothing_queued(store), timeout=15)
        finally:
            retrier.cancel()
            await asyncio.gather(retrier, return_exceptions=True)
    assert crm.most == 2  # both partitions' requests at the CRM at once


async def _nothing_queued(store) -> bool:
    return not (
        await store.find(PENDING, "partition", 0, limit=1) or await store.find(PENDING, "partition", 1, limit=1)
    )


class FailingOnce:
    """A CRM down for its first request (a 503), fine after."""

    kind, batch_limit = "hubspot", 100

    def __init__(self) -> None:
        self.requests = 0
        self.written: set[str] = set()

    def cost(self, mapping, n, op="upsert") -> int:
        return 1

    async def send(self, mapping, changes) -> BatchOutcome:
        self.requests += 1
        if self.requests == 1:
            return BatchOutcome.failed(CrmError(UNAVAILABLE, "503", "", 503))
        self.written.update(c.person_id for c in changes)
        return BatchOutcome({c.record: RecordResult(c.record, True, "1", True) for c in changes})


async def test_what_a_batch_queued_is_retried_once_the_batch_is_committed_not_a_round_later():
    (connection,) = parse_connections(hubspot_document("http://127.0.0.1:9"))
    crm = FailingOnce()
    async with open_store("memory://") as store:
        await prepare_store(store)
        # No time to retry within the batch: the 503 leaves its changes queued.
        deliverer = Deliverer({connection.id: crm}, {connection.id: SharedBudget(store, connection)}, retry_for=0.0)
        logic = CrmLogic(store, [connection], deliverer)
        idle = asyncio.Event()  # the partition's pipeline is busy with the batch
        engine = SimpleNamespace(owned=lambda: {0}, pipelines={0: SimpleNamespace(idle=idle)})
        retrier = asyncio.create_task(logic.retry_forever(engine, 60.0))
        await asyncio.sleep(0.3)  # its first round found nothing to do: it waits for the next
        try:
            fields = {"traits.email": "ada@example.com", "traits.first_name": "Ada"}
            effects = await logic.apply(0, [[Input("profile", "person-1", 1, (fields, False))]])
            await store.bulk_write(effects.writes)  # the engine commits the batch
            idle.set()
            assert not crm.written
            await eventually(lambda: crm.written == {"person-1"}, timeout=10)  # not a minute later
        finally:
            retrier.cancel()
            await asyncio.gather(retrier, return_exceptions=True)


class FailingEveryOther:
    """A CRM answering every other request with a 503 (a fault every few seconds, not an outage)."""

    kind, batch_limit = "hubspot", 100

    def __init__(self) -> None:
        self.requests = 0

    def cost(self, mapping, n, op="upsert") -> int:
        return 1

    async def send(self, mapping, changes) -> BatchOutcome:
        self.requests += 1
        if self.requests % 2 == 0:
            return BatchOutcome.failed(CrmError(UNAVAILABLE, "503", "", 503))
        return BatchOutcome({c.record: RecordResult(c.record, True, "1", True) for c in changes})


async def test_a_failure_between_answered_requests_backs_off_briefly_not_longer_each_time(monkeypatch):
    (connection,) = parse_connections(hubspot_document("http://127.0.0.1:9"))
    contacts = connection.mapping("contacts")
    backoffs: list[float] = []

    async def sleep(seconds: float) -> None:
        backoffs.append(seconds)
        await asyncio.sleep(0)

    monkeypatch.setattr(delivery, "asyncio", SimpleNamespace(sleep=sleep))
    async with open_store("memory://") as store:
        await prepare_store(store)
        deliverer = Deliverer(
            {connection.id: FailingEveryOther()}, {connection.id: SharedBudget(store, connection)}, retry_for=60.0
        )
        changes = []
        for i in range(800):
            projection = project(contacts, Source(f"person-{i}", {"traits.email": f"p{i}@example.com"}))
            changes.append(Change(contacts.name, projection.key, projection.fields, stamp=1, person_id=f"person-{i}"))
        delivered = await deliverer.deliver(contacts, changes)
    assert len(delivered.synced) == 800 and not delivered.pending
    assert backoffs == [delivery.BACKOFF[0]] * len(backoffs) and len(backoffs) >= 4


async def test_a_stop_that_comes_with_a_wake_up_stops_the_retrier():
    """A batch queuing changes (the retrier woken) in the loop turn the connector stops in: the stop is not
    lost (Python 3.11's wait_for would return the wake-up and swallow it: the stop then waited for ever)."""
    (connection,) = parse_connections(hubspot_document("http://127.0.0.1:9"))
    async with open_store("memory://") as store:
        await prepare_store(store)
        deliverer = Deliverer({}, {connection.id: SharedBudget(store, connection)}, retry_for=5.0)
        logic = CrmLogic(store, [connection], deliverer)
        engine = SimpleNamespace(owned=set, pipelines={})
        retrier = asyncio.create_task(logic.retry_forever(engine, 30.0))
        await eventually(lambda: bool(logic.queued._waiters), timeout=5)  # waiting to be woken
        logic.queued.set()
        await asyncio.sleep(0)  # the wake-up is in
        retrier.cancel()
        done, _ = await asyncio.wait({retrier}, timeout=5)
        assert done, "the retrier ran on after its cancellation"
        assert retrier.cancelled()
