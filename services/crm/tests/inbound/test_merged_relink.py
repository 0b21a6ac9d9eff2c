"""`News._relink` on its own: a deal a HubSpot user merged into another is relinked like a contact, but no
claim about persons is posted for it (`CRM Contact Merged` is about contacts)."""

from __future__ import annotations

import aiohttp

from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.mapping import parse_connections
from cdp_crm.inbound import HubSpotPoller
from cdp_crm.inbound.core import Change, Person
from cdp_crm.state import RECORDS


async def test_a_merged_deal_is_relinked_without_a_claim_about_persons(store, collector):
    document = {"connections": [{
        "id": "hs", "kind": "hubspot", "account": "62515", "url": "http://127.0.0.1:9",
        "credentials": {"token": "HUBSPOT_TOKEN"},
        "mappings": [{"id": "deals", "object": "deals", "match": {"cdp_idempotency_key": "person.id"},
                      "fields": {"dealname": "traits.company"}}],
    }]}  # fmt: skip
    (connection,) = parse_connections(document)
    async with aiohttp.ClientSession() as session:
        poller = HubSpotPoller(
            store, connection, session, "t", SharedBudget(store, connection), collector.client(session)
        )
        doc = {"connection": "hs", "mapping": "deals", "object": "deals", "person_id": "person-1",
               "key": [["cdp_idempotency_key", "person-1"]], "fields": {"dealname": "Acme"}, "state": "synced",
               "crm_id": "501"}  # fmt: skip
        await store.put(RECORDS, "deal-record", doc)
        survivor = Change(
            obj="deals", record_id="777", stamp="2026-01-01T00:00:00Z", kind="deal", properties={},
            person=Person("901", "ada@example.com"), record={"cdp_idempotency_key": "person-1"}, merged=("501",),
        )  # fmt: skip
        claims, puts = await poller._relink(survivor, 1.0)
    assert claims == []
    (put,) = puts
    assert (put.key, put.doc["crm_id"], put.doc["state"]) == ("deal-record", "777", "synced")
