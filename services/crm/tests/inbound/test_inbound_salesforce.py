"""Salesforce's feedback loop against the local Salesforce over HTTP: what users do in the org - open and close
a case, complete a task, move an opportunity, respond to a campaign, edit a contact - reaches the collector
once each, linked to the person, across a poller killed in the middle of a page."""

from __future__ import annotations

from cdp_crm.adapters.salesforce import SalesforceAdapter
from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.mapping import parse_connections
from cdp_crm.inbound import Poller
from cdp_crm.inbound.salesforce import SalesforceReader
from cdp_crm_emulators.salesforce import SalesforceEmulator


def _connection(url: str):
    document = {"connections": [{
        "id": "sf", "kind": "salesforce", "account": "org-1", "url": url,
        "credentials": {"client_id": "SF_ID", "client_secret": "SF_SECRET"},
        "mappings": [{"id": "contacts", "object": "Contact", "match": {"CDP_Id__c": "person.id"},
                      "fields": {"Email": "traits.email", "FirstName": "traits.first_name",
                                 "LastName": {"source": "traits.last_name", "default": "(unknown)"},
                                 "Churn_Risk__c": {"source": "scores.churn_risk", "transform": "round:2"}}}],
    }]}  # fmt: skip
    (connection,) = parse_connections(document)
    return connection


def _poller(store, session, emulator, collector, objects=None) -> Poller:
    """A fresh process: nothing in memory, the store as it was left."""
    connection = _connection(emulator.base_url)
    adapter = SalesforceAdapter(
        session, client_id="local-consumer-key", client_secret="local-consumer-secret", login_url=emulator.base_url
    )
    reader = SalesforceReader(connection, adapter, SharedBudget(store, connection))
    return Poller(store, connection, reader, collector.client(session), objects=objects)


async def test_cases_tasks_opportunities_and_campaign_engagement_reach_the_person(store, session, collector):
    async with SalesforceEmulator() as sf:
        ada = sf.user_create("Contact", {"LastName": "Lovelace", "Email": "ada@example.com", "CDP_Id__c": "person-1"})
        poller = _poller(store, session, sf, collector)
        await poller.poll()
        sf.clock.advance(1)
        case = sf.user_create("Case", {"Subject": "Cannot log in", "ContactId": ada["Id"]})
        task = sf.user_create("Task", {"Subject": "Call back", "WhoId": ada["Id"]})
        deal = sf.user_create(
            "Opportunity", {"Name": "Renewal", "StageName": "Prospecting", "CloseDate": "2027-01-31",
                            "ContactId": ada["Id"]},
        )  # fmt: skip
        campaign = sf.user_create("Campaign", {"Name": "Spring"})
        member = sf.user_create("CampaignMember", {"CampaignId": campaign["Id"], "ContactId": ada["Id"]})
        # The connector's own task (its idempotency key) is not news when it comes back.
        sf.user_create("Task", {"Subject": "CDP: churn risk", "WhoId": ada["Id"], "CDP_Idempotency_Key__c": "cdp-1"})
        await poller.poll()
        sf.clock.advance(1)
        sf.user_update("Case", case["Id"], {"Status": "Closed"})
        sf.user_update("Task", task["Id"], {"Status": "Completed"})
        sf.user_update("Opportunity", deal["Id"], {"StageName": "Negotiation/Review"})
        sf.user_update("CampaignMember", member["Id"], {"Status": "Responded"})
        await poller.poll()
        sf.clock.advance(1)
        sf.user_update("Opportunity", deal["Id"], {"StageName": "Closed Won"})
        await poller.poll()

        # Ada's contact, made by the connector's upsert (it holds her CDP id), is not news; the rest is.
        assert sorted(collector.names()) == sorted([
            "CRM Case Opened", "CRM Task Created", "CRM Deal Created",
            "CRM Campaign Member Added", "CRM Case Closed", "CRM Task Completed", "CRM Deal Stage Changed",
            "CRM Campaign Engagement", "CRM Deal Won",
        ])  # fmt: skip
        for event in collector.events():
            # Linked to Ada through her email under her contact's anonymous id; her CDP id rides along.
            assert event["anonymousId"] == f"salesforce:org-1:{ada['Id']}"
            assert event["context"]["traits"] == {"email": "ada@example.com"}
            assert event["properties"]["cdp_person_id"] == "person-1"
            assert event["context"]["source"] == {"crm": "salesforce", "connection": "sf"}
            assert "userId" not in event
        (stage,) = collector.events("CRM Deal Stage Changed")
        assert stage["properties"]["StageName"] == "Negotiation/Review"
        assert stage["properties"]["previous_stage"] == "Prospecting"
        (engaged,) = collector.events("CRM Campaign Engagement")
        assert engaged["properties"]["Status"] == "Responded" and engaged["properties"]["HasResponded"] is True
        (closed,) = collector.events("CRM Case Closed")
        assert closed["properties"]["crm_id"] == case["Id"] and closed["properties"]["object"] == "Case"


async def test_a_contact_edit_in_salesforce_reaches_the_profile_as_traits_with_the_crm_as_source(
    store, session, collector
):
    async with SalesforceEmulator() as sf:
        ada = sf.user_create("Contact", {"LastName": "Lovelace", "Email": "ada@example.com", "CDP_Id__c": "person-1"})
        poller = _poller(store, session, sf, collector, objects=("Contact",))
        await poller.poll()
        sf.clock.advance(1)
        edited = sf.user_update("Contact", ada["Id"], {"FirstName": "Ada"})
        await poller.poll()
        sf.clock.advance(1)
        # What the connector itself wrote (a rounded score: not a trait, not reported) is not an event.
        sf.user_update("Contact", ada["Id"], {"Churn_Risk__c": 0.42})
        assert await poller.poll() == 0

        # Her contact's creation was the connector's own upsert: only the user's edit comes back.
        (latest,) = collector.events(kind="identify")
        # The fields read at its creation and unchanged since (her last name, her email) are not sent again
        # as changed now (test_crm_field_conflicts.py); the email links the contact to her, in the context.
        assert latest["traits"] == {"first_name": "Ada"}
        assert latest["context"]["traits"] == {"email": "ada@example.com"}
        assert collector.names() == ["CRM Contact Updated"]
        assert latest["anonymousId"] == f"salesforce:org-1:{ada['Id']}" and "userId" not in latest
        assert latest["context"]["source"] == {"crm": "salesforce", "connection": "sf"}
        # The CRM's modification time is the change's time: an older CRM value never overrides a newer one.
        assert latest["timestamp"][:23] == edited["LastModifiedDate"][:23]


async def test_a_poller_killed_in_the_middle_of_a_page_neither_loses_nor_repeats_a_change(store, session, collector):
    async with SalesforceEmulator() as sf:
        for i in range(250):
            sf.user_create("Lead", {"LastName": f"Person {i}", "Company": "Acme", "Email": f"p{i}@example.com"})
        # One query page holds all 250; the poller posts them 100 leads at a time (a track and an identify
        # each) and is killed while its second post is in flight.
        await collector.kill_mid_page(_poller(store, session, sf, collector, objects=("Lead",)).poll, 1)
        assert len(collector.events()) == 100
        await _poller(store, session, sf, collector, objects=("Lead",)).poll()
        leads = collector.events("CRM Lead Created")
        assert len(leads) == 250 and len({e["properties"]["crm_id"] for e in leads}) == 250
        assert collector.duplicates == 0  # the cursor had moved past the first chunk: nothing posted twice
        assert await _poller(store, session, sf, collector, objects=("Lead",)).poll() == 0


async def test_a_mappings_placeholder_is_not_sent_back_as_the_persons_trait(store, session, collector):
    async with SalesforceEmulator() as sf:
        # Salesforce requires a last name; the mapping writes "(unknown)" when the CDP has none.
        grace = sf.user_create("Contact", {"LastName": "(unknown)", "Email": "grace@example.com"})
        poller = _poller(store, session, sf, collector, objects=("Contact",))
        await poller.poll()
        sf.clock.advance(1)
        sf.user_update("Contact", grace["Id"], {"FirstName": "Grace"})
        await poller.poll()
        latest = max(collector.events(kind="identify"), key=lambda e: e["timestamp"])
        assert latest["traits"] == {"first_name": "Grace"}
