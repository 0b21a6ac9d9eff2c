"""Dynamics 365's feedback loop against the local Dataverse over HTTP, through change tracking: a case opened and
resolved, a task completed, an opportunity moved and won, a contact edited and deleted reach the collector
once each, linked to the person; a poller killed in the middle of a delta reads it again without a change
stored twice."""

from __future__ import annotations

from cdp_crm.adapters.dynamics import DynamicsAdapter
from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.mapping import parse_connections
from cdp_crm.inbound import Poller
from cdp_crm.inbound.dynamics import DynamicsReader
from cdp_crm.state import CURSORS
from cdp_crm_emulators.dynamics import DynamicsEmulator


def _poller(store, session, emulator, collector, objects=None) -> Poller:
    """A fresh process: nothing in memory, the store as it was left."""
    document = {"connections": [{
        "id": "dyn", "kind": "dynamics", "account": "org-dyn", "url": emulator.base_url,
        "credentials": {"tenant_id": "T", "client_id": "C", "client_secret": "S"},
        "mappings": [{"id": "contacts", "object": "contacts", "match": {"cdp_id": "person.id"},
                      "fields": {"emailaddress1": "traits.email", "jobtitle": "traits.title",
                                 "cdp_churnrisk": "scores.churn_risk"}}],
    }]}  # fmt: skip
    (connection,) = parse_connections(document)
    adapter = DynamicsAdapter(
        session, url=emulator.base_url, authority=emulator.base_url, tenant_id=emulator.tenant,
        client_id=emulator.client_id, client_secret=emulator.client_secret,
    )  # fmt: skip
    reader = DynamicsReader(connection, adapter, SharedBudget(store, connection))
    return Poller(store, connection, reader, collector.client(session), objects=objects)


async def test_cases_tasks_and_opportunities_reach_the_person_through_change_tracking(store, session, collector):
    async with DynamicsEmulator() as dv:
        ada = dv.user_create("contacts", {"lastname": "Lovelace", "emailaddress1": "ada@example.com",
                                          "cdp_id": "person-1"})  # fmt: skip
        about_ada = f"/contacts({ada['contactid']})"
        poller = _poller(store, session, dv, collector)
        await poller.poll()
        dv.clock.advance(1)
        case = dv.user_create("incidents", {"title": "Cannot log in", "customerid_contact@odata.bind": about_ada})
        task = dv.user_create("tasks", {"subject": "Call back", "regardingobjectid_contact@odata.bind": about_ada})
        deal = dv.user_create("opportunities", {"name": "Renewal", "stepname": "1-Qualify",
                                                "parentcontactid@odata.bind": about_ada})  # fmt: skip
        dv.user_create("tasks", {"subject": "CDP: churn risk", "cdp_idempotencykey": "cdp-1",
                                 "regardingobjectid_contact@odata.bind": about_ada})  # fmt: skip
        await poller.poll()
        dv.clock.advance(1)
        dv.user_update("incidents", case["incidentid"], {"statecode": 1, "statuscode": 5})
        dv.user_update("tasks", task["activityid"], {"statecode": 1, "statuscode": 5})
        dv.user_update("opportunities", deal["opportunityid"], {"stepname": "2-Develop"})
        await poller.poll()
        dv.clock.advance(1)
        dv.user_update("opportunities", deal["opportunityid"], {"statecode": 1, "stepname": "3-Close"})
        await poller.poll()

        assert sorted(collector.names()) == sorted([
            "CRM Case Opened", "CRM Task Created", "CRM Deal Created", "CRM Case Closed",
            "CRM Task Completed", "CRM Deal Stage Changed", "CRM Deal Won",
        ])  # fmt: skip
        for event in collector.events():
            assert event["anonymousId"] == f"dynamics:org-dyn:{ada['contactid']}"
            assert event["context"]["traits"] == {"email": "ada@example.com"}
            assert event["properties"]["cdp_person_id"] == "person-1" and "userId" not in event
        (moved,) = collector.events("CRM Deal Stage Changed")
        assert (moved["properties"]["stepname"], moved["properties"]["previous_stage"]) == ("2-Develop", "1-Qualify")
        # The cursor is the delta link Dataverse gave.
        cursor = await store.get(CURSORS, "dyn:incidents")
        assert "$deltatoken=" in cursor.doc["delta"]


async def test_a_contact_edit_becomes_traits_and_a_deletion_an_event(store, session, collector):
    async with DynamicsEmulator() as dv:
        ada = dv.user_create("contacts", {"lastname": "Lovelace", "emailaddress1": "ada@example.com"})
        poller = _poller(store, session, dv, collector, objects=("contacts",))
        await poller.poll()
        dv.clock.advance(1)
        dv.user_update("contacts", ada["contactid"], {"jobtitle": "Analyst"})
        await poller.poll()
        dv.user_update("contacts", ada["contactid"], {"cdp_churnrisk": 0.4})  # the connector's own score
        assert await poller.poll() == 0
        dv.user_delete("contacts", ada["contactid"])
        await poller.poll()
        assert collector.names().count("CRM Contact Deleted") == 1
        traits = [e["traits"] for e in collector.events(kind="identify")]
        assert {"title": "Analyst"} in traits
        (deleted,) = collector.events("CRM Contact Deleted")
        assert deleted["anonymousId"] == f"dynamics:org-dyn:{ada['contactid']}"


async def test_a_poller_killed_in_the_middle_of_a_delta_reads_it_again_and_the_collector_keeps_each_once(
    store, session, collector
):
    async with DynamicsEmulator() as dv:
        poller = _poller(store, session, dv, collector, objects=("incidents",))
        await poller.poll()  # the initial read: nothing yet, a delta link
        for i in range(250):
            dv.user_create("incidents", {"title": f"Case {i}"})
        # The delta comes in pages of 100; killed while the second page's events are in flight.
        await collector.kill_mid_page(_poller(store, session, dv, collector, objects=("incidents",)).poll, 1)
        assert len(collector.events()) == 100
        await _poller(store, session, dv, collector, objects=("incidents",)).poll()
        opened = collector.events("CRM Case Opened")
        assert len(opened) == 250 and len({e["properties"]["crm_id"] for e in opened}) == 250
        # The delta was read again from its start: its first page posted again, under the same ids.
        assert collector.duplicates == 100
        assert await _poller(store, session, dv, collector, objects=("incidents",)).poll() == 0


async def test_an_expired_delta_link_is_read_afresh_and_what_changed_meanwhile_arrives_once(
    store, session, collector, caplog
):
    async with DynamicsEmulator() as dv:
        ada = dv.user_create("contacts", {"lastname": "Lovelace", "emailaddress1": "ada@example.com"})
        about_ada = f"/contacts({ada['contactid']})"
        poller = _poller(store, session, dv, collector, objects=("incidents",))
        await poller.poll()
        dv.clock.advance(1)
        case = dv.user_create("incidents", {"title": "Cannot log in", "customerid_contact@odata.bind": about_ada})
        await poller.poll()
        assert collector.names() == ["CRM Case Opened"]
        # Change tracking expires (the organisation keeps it for so many days), and meanwhile the case closes.
        dv.expire_change_tracking()
        dv.clock.advance(1)
        dv.user_update("incidents", case["incidentid"], {"statecode": 1, "statuscode": 5})
        await poller.poll()
        assert collector.names() == ["CRM Case Opened", "CRM Case Closed"]
        (expired,) = [r for r in caplog.records if "change tracking expired" in r.getMessage()]
        assert (expired.connection, expired.object, expired.crm_code) == ("dyn", "incidents", "0x80044352")
        assert "ada@example.com" not in caplog.text and "Cannot log in" not in caplog.text
        # The fresh delta link is the cursor now: later changes come through it, and nothing twice.
        dv.clock.advance(1)
        dv.user_create("incidents", {"title": "Second", "customerid_contact@odata.bind": about_ada})
        await poller.poll()
        assert collector.names() == ["CRM Case Opened", "CRM Case Closed", "CRM Case Opened"]
        assert await poller.poll() == 0
