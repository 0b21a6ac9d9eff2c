"""Describing a CRM's schema at start spends the account's budget like every other request: a connector
restarted right after its predecessor used the whole burst window (a crash mid-sync) waits for the
window instead of sending its describe calls over the CRM's limit."""

from __future__ import annotations

import time

import aiohttp

from cdp_crm.__main__ import describe
from cdp_crm.budgets import SharedBudget
from cdp_crm.connectors import open_adapters
from cdp_crm.domain.mapping import parse_connections
from cdp_crm.state import prepare_store
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_kit.storage import open_store

BURST, WINDOW = 2, 1.0


def document(base_url: str) -> dict:
    return {
        "connections": [
            {
                "id": "hs",
                "kind": "hubspot",
                "account": "62515",
                "url": base_url,
                "credentials": {"token": "HUBSPOT_TOKEN"},
                "limits": {"burst": BURST, "window_seconds": WINDOW},
                "mappings": [
                    {"id": "contacts", "object": "contacts", "match": {"cdp_id": "person.id"},
                     "fields": {"email": "traits.email"}},
                    {"id": "task", "object": "tasks", "action": "task", "about": {"mapping": "contacts"},
                     "idempotency_field": "cdp_idempotency_key",
                     "fields": {"hs_task_subject": "action.subject"}},
                ],
            }
        ]
    }  # fmt: skip


async def test_describe_at_start_waits_for_a_burst_window_the_previous_process_used_up(tmp_path):
    async with HubSpotEmulator(burst_limit=BURST, burst_window=WINDOW) as hubspot:
        connections = parse_connections(document(hubspot.base_url))
        async with open_store(f"sqlite:///{tmp_path}/crm.db") as store, aiohttp.ClientSession() as session:
            await prepare_store(store)
            # The process before this one spent the whole window just before it was killed.
            budget = SharedBudget(store, connections[0])
            reservation = await budget.acquire(BURST, time.time)
            assert reservation
            for _ in range(BURST):
                headers = {"Authorization": "Bearer pat-local-hubspot"}
                async with session.get(f"{hubspot.base_url}/crm/v3/objects/contacts/none", headers=headers):
                    pass
            await budget.settle(reservation, time.time())  # the answers came back
            assert hubspot.budget()["burst_used"] == BURST
            adapters = open_adapters(connections, session, {"HUBSPOT_TOKEN": "pat-local-hubspot"}, timeout=5)

            await describe(adapters, connections, store)

        described = [r for r in hubspot.requests if r.path.startswith("/crm/v3/properties/")]
        assert len(described) == 2  # contacts and tasks: described, not skipped
        assert hubspot.budget()["over_budget"] == 0
