"""Zoho CRM's feedback loop against the local Zoho over HTTP, by If-Modified-Since listings: a case opened and
closed, a task completed, a deal moved and lost, a contact edited reach the collector once each, linked
to the person; changes within one second are not skipped; a poller killed in the middle of a listing
resumes from its cursor."""

from __future__ import annotations

from cdp_crm.adapters.zoho import ZohoAdapter
from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.mapping import parse_connections
from cdp_crm.inbound import Poller
from cdp_crm.inbound.zoho import ZohoReader
from cdp_crm_emulators.zoho import ZohoEmulator


def _poller(store, session, emulator, collector, objects=None) -> Poller:
    """A fresh process: nothing in memory, the store as it was left."""
    document = {"connections": [{
        "id": "zoho", "kind": "zoho", "account": "org-z", "url": emulator.base_url,
        "credentials": {"client_id": "Z_ID", "client_secret": "Z_SECRET", "refresh_token": "Z_REFRESH"},
        "mappings": [{"id": "contacts", "object": "Contacts", "match": {"CDP_Id": "person.id"},
                      "fields": {"Email": "traits.email", "Last_Name": "traits.last_name",
                                 "Churn_Risk": "scores.churn_risk"}}],
    }]}  # fmt: skip
    (connection,) = parse_connections(document)
    adapter = ZohoAdapter(
        session, client_id=emulator.client_id, client_secret=emulator.client_secret,
        refresh_token="1000.local-refresh-token", accounts_url=emulator.base_url,
    )  # fmt: skip
    reader = ZohoReader(connection, adapter, SharedBudget(store, connection))
    return Poller(store, connection, reader, collector.client(session), objects=objects)


async def test_cases_tasks_and_deals_reach_the_person(store, session, collector):
    async with ZohoEmulator() as zoho:
        ada = zoho.user_create("Contacts", {"Last_Name": "Lovelace", "Email": "ada@example.com", "CDP_Id": "person-1"})
        about_ada = {"id": ada["id"], "name": "Ada Lovelace"}
        poller = _poller(store, session, zoho, collector)
        await poller.poll()
        zoho.clock.advance(1)
        case = zoho.user_create("Cases", {"Subject": "Cannot log in", "Status": "New", "Case_Origin": "Email",
                                          "Related_To": about_ada})  # fmt: skip
        task = zoho.user_create("Tasks", {"Subject": "Call back", "Status": "Not Started", "Who_Id": about_ada})
        deal = zoho.user_create("Deals", {"Deal_Name": "Renewal", "Stage": "Qualification", "Contact_Name": about_ada})
        zoho.user_create("Tasks", {"Subject": "CDP: churn", "CDP_Idempotency_Key": "cdp-1", "Who_Id": about_ada})
        await poller.poll()
        zoho.clock.advance(1)
        zoho.user_update("Cases", case["id"], {"Status": "Closed"})
        zoho.user_update("Tasks", task["id"], {"Status": "Completed"})
        zoho.user_update("Deals", deal["id"], {"Stage": "Negotiation/Review"})
        await poller.poll()
        zoho.clock.advance(1)
        zoho.user_update("Deals", deal["id"], {"Stage": "Closed Lost"})
        await poller.poll()

        assert sorted(collector.names()) == sorted([
            "CRM Case Opened", "CRM Task Created", "CRM Deal Created", "CRM Case Closed",
            "CRM Task Completed", "CRM Deal Stage Changed", "CRM Deal Lost",
        ])  # fmt: skip
        for event in collector.events():
            assert event["anonymousId"] == f"zoho:org-z:{ada['id']}"
            assert event["context"]["traits"] == {"email": "ada@example.com"}
            assert event["properties"]["cdp_person_id"] == "person-1" and "userId" not in event


async def test_changes_in_the_same_second_as_the_cursor_are_read_and_a_contact_edit_becomes_traits(
    store, session, collector
):
    async with ZohoEmulator() as zoho:
        ada = zoho.user_create("Contacts", {"Last_Name": "Lovelace", "Email": "ada@example.com"})
        poller = _poller(store, session, zoho, collector, objects=("Contacts",))
        await poller.poll()
        # Same second as the cursor (Zoho's times are whole seconds): still read, once.
        grace = zoho.user_create("Contacts", {"Last_Name": "Hopper", "Email": "grace@example.com"})
        await poller.poll()
        zoho.clock.advance(1)
        zoho.user_update("Contacts", ada["id"], {"Last_Name": "King"})
        zoho.user_update("Contacts", grace["id"], {"Churn_Risk": 0.3})  # the connector's own score: no event
        await poller.poll()
        assert await poller.poll() == 0
        assert sorted(collector.names()) == ["CRM Contact Created", "CRM Contact Created", "CRM Contact Updated"]
        traits = [e["traits"] for e in collector.events(kind="identify")]
        assert {"last_name": "King"} in traits


async def test_a_poller_killed_in_the_middle_of_a_listing_resumes_from_its_cursor(store, session, collector):
    async with ZohoEmulator() as zoho:
        for i in range(450):  # three pages of 200; five posts of 100
            zoho.user_create("Cases", {"Subject": f"Case {i}", "Status": "New", "Case_Origin": "Web"})
            if i % 100 == 99:
                zoho.clock.advance(1)
        await collector.kill_mid_page(_poller(store, session, zoho, collector, objects=("Cases",)).poll, 3)
        assert len(collector.events()) == 300
        await _poller(store, session, zoho, collector, objects=("Cases",)).poll()
        opened = collector.events("CRM Case Opened")
        assert len(opened) == 450 and len({e["properties"]["crm_id"] for e in opened}) == 450
        assert collector.duplicates == 0
        assert await _poller(store, session, zoho, collector, objects=("Cases",)).poll() == 0
