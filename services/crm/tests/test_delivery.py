"""The domain and an adapter together, as the engine will drive them: a stream of profile changes to the
local HubSpot under a tight burst limit, with a 429, a dropped connection after commit and rejected records
injected. Every good record ends in the CRM exactly once with its latest values, every bad one is a dead
letter, and the CRM never counts a request over its limit."""

from __future__ import annotations

import asyncio

import aiohttp

from cdp_crm.adapters.hubspot import HubSpotAdapter
from cdp_crm.budgets import SharedBudget
from cdp_crm.delivery import Deliverer
from cdp_crm.domain.budget import Budget
from cdp_crm.domain.coalesce import Change, Coalescer
from cdp_crm.domain.isolation import THROTTLED, Isolation
from cdp_crm.domain.mapping import parse_connections
from cdp_crm.domain.projection import Source, changed_fields, project
from cdp_crm.state import prepare_store
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_kit.storage import open_store

DOCUMENT = {
    "connections": [
        {
            "id": "hs",
            "kind": "hubspot",
            "credentials": {"token": "HUBSPOT_TOKEN"},
            "mappings": [
                {
                    "id": "contacts",
                    "object": "contacts",
                    "match": {"cdp_id": "person.id"},
                    "fields": {
                        "firstname": "traits.first_name",
                        "cdp_churn_risk": {"source": "scores.churn_risk", "transform": "round:2"},
                    },
                }
            ],
        }
    ]
}


async def _deliver(adapter, budget, mapping, changes, clock, dead):
    """Send one batch window: budget first, isolation on every answer, retries until nothing is left."""
    pending = [changes]
    while pending:
        isolation = Isolation(pending.pop())
        while (batch := isolation.next_batch()) is not None:
            # The budget is plain data shared through the store: there is no event to wait on, only a time.
            while not (reservation := budget.reserve(adapter.cost(mapping, len(batch)), clock())).granted:  # noqa: ASYNC110
                await asyncio.sleep(max(0.0, reservation.wait_until - clock()))
            outcome = await adapter.send(mapping, batch)
            budget.release(reservation.ticket, clock())  # the answer is in: the CRM counted it before now
            budget.observe(outcome.headers, clock())
            if outcome.error is not None and outcome.error.reason == THROTTLED:
                budget.throttled(clock(), retry_after=outcome.error.retry_after, daily=outcome.error.daily)
            isolation.record(batch, outcome, clock())
        dead.extend(isolation.dead)
        pending.extend(isolation.retry)


async def test_a_stream_of_changes_lands_once_with_latest_values_within_the_burst_limit():
    (connection,) = parse_connections(DOCUMENT)
    contacts = connection.mapping("contacts")
    async with HubSpotEmulator(burst_limit=4, burst_window=0.5) as emulator, aiohttp.ClientSession() as session:
        adapter = HubSpotAdapter(session, token="pat-local-hubspot", base_url=emulator.base_url, timeout=5.0)
        budget = Budget("62515", "hubspot", burst=4, window=0.5, daily=None, margin=0.05)
        emulator.faults.throttle_next()
        emulator.faults.drop_after_commit_next()
        emulator.faults.reject(
            lambda obj, record: record.get("cdp_id") in ("person-7", "person-70", "person-170"), message="no"
        )
        written: dict[str, object] = {}  # record status: the last projection written per record
        dead: list = []
        stamp = 0
        for window in range(3):
            batch = Coalescer()
            for round_ in range(3):  # every person changes three times within the window
                for i in range(250):
                    stamp += 1
                    source = Source(
                        f"person-{i}", {"traits.first_name": f"P{i}", "scores.churn_risk": window + round_ / 10 + 0.001}
                    )
                    projection = project(contacts, source)
                    fields = changed_fields(written.get(projection.key), projection)
                    if fields:
                        batch.add(
                            Change(contacts.name, projection.key, fields, stamp=stamp, person_id=source.person_id)
                        )
                    written[projection.key] = projection
            assert len(batch) == 250  # coalesced: one write per person per window
            while chunk := batch.take(adapter.batch_limit):
                await _deliver(adapter, budget, contacts, chunk, emulator.clock, dead)
        records = {r["properties"]["cdp_id"]: r["properties"] for r in emulator.records("contacts")}
        assert len(records) == 247 and len(emulator.records("contacts")) == 247  # once each
        assert {p["cdp_churn_risk"] for p in records.values()} == {"2.2"}  # the latest values
        assert sorted({d.change.person_id for d in dead}) == ["person-170", "person-7", "person-70"]
        assert [r.faulted for r in emulator.requests if r.faulted] == ["status", "drop"]  # both faults hit
        assert emulator.budget()["over_budget"] == 0


async def test_requests_that_reach_the_crm_late_never_put_it_over_its_limit_faults_included():
    """The CRM counts a request when it arrives, which can be long after our grant (a loaded machine, a
    store write queued behind a commit, a slow network): here the first window's requests spend 0.7 s on
    their way, longer than any fixed margin. Four deliveries share the budget (as the engine's partitions
    do), with a 429, a 503 and a connection dropped after the write committed injected - each counted by
    the CRM. Not one request arrives over its limit, and every contact is written once."""
    (connection,) = parse_connections(DOCUMENT)
    contacts = connection.mapping("contacts")
    slow = 10  # the first window's requests are slow on their way

    async def on_the_way(session, context, params) -> None:
        nonlocal slow
        if slow > 0:
            slow -= 1
            await asyncio.sleep(0.7)

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_the_way)
    async with (
        HubSpotEmulator(burst_limit=10, burst_window=1.0) as emulator,
        aiohttp.ClientSession(trace_configs=[trace]) as session,
    ):
        adapter = HubSpotAdapter(session, token="pat-local-hubspot", base_url=emulator.base_url, timeout=5.0)
        async with open_store("memory://") as store:
            await prepare_store(store)
            budget = SharedBudget(store, parse_connections(_limited(DOCUMENT, burst=10, window=1.0))[0])
            deliverer = Deliverer({"hs": adapter}, {"hs": budget}, retry_for=30.0, clock=emulator.clock)
            emulator.faults.throttle_next()
            emulator.faults.fail_next(status=503)
            emulator.faults.drop_after_commit_next()
            people = [[f"person-{p}-{i}" for i in range(300)] for p in range(4)]
            delivered = await asyncio.gather(
                *(deliverer.deliver(contacts, [_change(contacts, person) for person in persons]) for persons in people)
            )
        assert all(not d.pending and not d.dead for d in delivered)
        assert sorted(r.faulted for r in emulator.requests if r.faulted) == ["drop", "status", "status"]
        assert emulator.budget()["over_budget"] == 0
        ids = [r["properties"]["cdp_id"] for r in emulator.records("contacts")]
        assert len(ids) == 1200 and len(set(ids)) == 1200


def _limited(document: dict, *, burst: int, window: float) -> dict:
    (connection,) = document["connections"]
    return {"connections": [{**connection, "limits": {"burst": burst, "window_seconds": window}}]}


def _change(mapping, person: str) -> Change:
    projection = project(mapping, Source(person, {"traits.first_name": person.upper(), "scores.churn_risk": 0.5}))
    return Change(mapping.name, projection.key, projection.fields, stamp=1, person_id=person)
