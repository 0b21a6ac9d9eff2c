"""The domain and an adapter together, as the engine will drive them: a stream of profile changes to the
local HubSpot under a tight burst limit, with a 429, a dropped connection after commit and rejected records
injected. Every good record ends in the CRM exactly once with its latest values, every bad one is a dead
letter, and the CRM never counts a request over its limit."""

from __future__ import annotations

import asyncio

import aiohttp

from cdp_crm.adapters.hubspot import HubSpotAdapter
from cdp_crm.domain.budget import Budget
from cdp_crm.domain.coalesce import Change, Coalescer
from cdp_crm.domain.isolation import THROTTLED, Isolation
from cdp_crm.domain.mapping import parse_connections
from cdp_crm.domain.projection import Source, changed_fields, project
from cdp_crm_emulators.hubspot import HubSpotEmulator

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
