"""Changes that become visible late are read all the same, and once: HubSpot's search index lags writes by
seconds (a contact edited at t can first be found at t+5 s, after the cursor moved past t on records
written after it); a Salesforce transaction committed late carries a SystemModstamp earlier than records
already read. The poller reads each object's last `inbound.overlap_seconds` back once they have settled
(core.Poller's read-back) and drops what it posted already (its memo holds that stamp), so nothing is
posted twice and the connector's own writes read back are no news."""

from __future__ import annotations

from cdp_crm.adapters.salesforce import SalesforceAdapter
from cdp_crm.adapters.zoho import ZohoAdapter
from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.mapping import parse_connections
from cdp_crm.inbound import HubSpotPoller, Poller
from cdp_crm.inbound.salesforce import SalesforceReader
from cdp_crm.inbound.zoho import ZohoReader
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_crm_emulators.salesforce import SalesforceEmulator
from cdp_crm_emulators.zoho import ZohoEmulator

TOKEN = "pat-local-hubspot"


def _hubspot_poller(store, session, emulator, collector, inbound=None) -> HubSpotPoller:
    document = {"connections": [{
        "id": "hs", "kind": "hubspot", "account": "62515", "url": emulator.base_url,
        "credentials": {"token": "HUBSPOT_TOKEN"},
        "mappings": [{"id": "contacts", "object": "contacts", "match": {"cdp_id": "person.id"},
                      "fields": {"email": "traits.email", "firstname": "traits.first_name"}}],
        **({"inbound": inbound} if inbound else {}),
    }]}  # fmt: skip
    (connection,) = parse_connections(document)
    budget = SharedBudget(store, connection)
    # The poller's clock is the local HubSpot's: the read-back's "settled" is now less the overlap.
    return HubSpotPoller(
        store, connection, session, TOKEN, budget, collector.client(session), objects=("contacts",),
        clock=emulator.clock,
    )  # fmt: skip


async def test_a_contact_edit_hubspot_indexes_late_is_posted_once_after_the_overlap(store, session, collector):
    async with HubSpotEmulator() as hubspot:
        ada = hubspot.user_create("contacts", {"email": "ada@example.com"})
        poller = _hubspot_poller(store, session, hubspot, collector)
        await poller.poll()
        assert collector.names() == ["CRM Contact Created"]

        hubspot.clock.advance(2)
        hubspot.index_late(6)  # Ada's edit reaches the search index 6 s after it was made
        hubspot.user_update("contacts", ada["id"], {"firstname": "Augusta"})
        hubspot.clock.advance(1)
        hubspot.user_create("contacts", {"email": "bob@example.com"})  # found at once: the cursor passes Ada's
        await poller.poll()
        assert collector.names() == ["CRM Contact Created"] * 2

        hubspot.clock.advance(10)  # indexed now, behind the cursor
        await poller.poll()
        assert collector.names() == ["CRM Contact Created"] * 2

        hubspot.clock.advance(180)  # HubSpot's default overlap: Ada's edit has settled and is read back
        await poller.poll()
        assert collector.names() == ["CRM Contact Created"] * 2 + ["CRM Contact Updated"]
        (updated,) = collector.events("CRM Contact Updated")
        assert (updated["properties"]["crm_id"], updated["properties"]["firstname"]) == (ada["id"], "Augusta")
        assert [e["traits"] for e in collector.events(kind="identify") if e["traits"].get("first_name")] == [
            {"first_name": "Augusta"}
        ]

        # Read back again later: nothing posted twice, not even to the collector (which would drop it).
        for _ in range(3):
            hubspot.clock.advance(200)
            assert await poller.poll() == 0
        assert collector.names() == ["CRM Contact Created"] * 2 + ["CRM Contact Updated"]
        assert collector.duplicates == 0


def _salesforce_poller(store, session, emulator, collector) -> Poller:
    document = {"connections": [{
        "id": "sf", "kind": "salesforce", "account": "org-1", "url": emulator.base_url,
        "credentials": {"client_id": "SF_ID", "client_secret": "SF_SECRET"},
        "mappings": [{"id": "contacts", "object": "Contact", "match": {"CDP_Id__c": "person.id"},
                      "fields": {"Email": "traits.email", "LastName": {"source": "traits.last_name",
                                                                       "default": "(unknown)"}}}],
    }]}  # fmt: skip
    (connection,) = parse_connections(document)
    adapter = SalesforceAdapter(
        session, client_id="local-consumer-key", client_secret="local-consumer-secret", login_url=emulator.base_url
    )
    budget = SharedBudget(store, connection)
    reader = SalesforceReader(connection, adapter, budget, clock=emulator.clock)
    return Poller(store, connection, reader, collector.client(session), objects=("Case",), clock=emulator.clock)


async def test_a_case_whose_transaction_commits_late_is_posted_once_after_the_overlap(store, session, collector):
    async with SalesforceEmulator() as sf:
        ada = sf.user_create("Contact", {"LastName": "Lovelace", "Email": "ada@example.com"})
        poller = _salesforce_poller(store, session, sf, collector)
        await poller.poll()
        sf.clock.advance(2)
        # A case opened in a transaction that commits 40 s later (a long data load): stamped now, seen then.
        late = sf.user_create("Case", {"Subject": "Refund", "ContactId": ada["Id"]}, commit_after=40)
        sf.clock.advance(1)
        soon = sf.user_create("Case", {"Subject": "Cannot log in", "ContactId": ada["Id"]})  # committed at once
        await poller.poll()
        assert collector.names() == ["CRM Case Opened"]
        sf.clock.advance(60)  # committed now, behind the cursor
        await poller.poll()
        assert collector.names() == ["CRM Case Opened"]

        sf.clock.advance(600)  # Salesforce's default overlap: read back once settled
        await poller.poll()
        assert collector.names() == ["CRM Case Opened"] * 2
        assert [e["properties"]["crm_id"] for e in collector.events()] == [soon["Id"], late["Id"]]
        for _ in range(3):
            sf.clock.advance(700)
            assert await poller.poll() == 0
        assert collector.names() == ["CRM Case Opened"] * 2 and collector.duplicates == 0


async def test_a_read_back_costs_a_search_a_page_and_asks_nothing_about_what_was_posted(store, session, collector):
    """What the overlap costs: once per overlap a window's records are searched again (a search a page of
    200, at most READ_BACK_PAGES pages a polling turn); those posted already are dropped before their
    contacts are looked up or anything is posted; while the cursor stands still, no search at all."""
    async with HubSpotEmulator() as hubspot:
        ada = hubspot.user_create("contacts", {"email": "ada@example.com"})
        poller = _hubspot_poller(store, session, hubspot, collector)
        poller.objects = ("tickets",)
        await poller.poll()
        hubspot.clock.advance(1)
        for n in range(150):  # each read forward costs an associations read: within the burst limit
            hubspot.user_create(
                "tickets", {"subject": f"t{n}", "hs_pipeline_stage": "1"}, [("contacts", ada["id"], [])]
            )
        await poller.poll()
        assert len(collector.events("CRM Ticket Opened")) == 150
        posts = collector.posts

        def requests_since(mark: int) -> list[str]:
            return [r.path.split("?")[0] for r in list(hubspot.requests)[mark:]]

        mark = len(hubspot.requests)
        hubspot.clock.advance(400)  # the tickets' window settled: read back now
        await poller.poll()
        spent = requests_since(mark)
        # The forward read's one search, then the read-back's: 150 tickets, one page of 200 (a second where the
        # last ticket's millisecond is searched again); no associations read, nothing posted.
        assert set(spent) == {"/crm/v3/objects/tickets/search"} and 1 + 1 <= len(spent) <= 1 + 2, spent
        assert collector.posts == posts

        mark = len(hubspot.requests)
        for _ in range(3):  # nothing changed: the cursor stands still, the window is empty - no read-back search
            hubspot.clock.advance(400)
            await poller.poll()
        assert requests_since(mark) == ["/crm/v3/objects/tickets/search"] * 3
        assert len(collector.events("CRM Ticket Opened")) == 150 and collector.duplicates == 0


async def test_a_zoho_case_committed_late_is_posted_once_after_the_overlap(store, session, collector):
    async with ZohoEmulator() as zoho:
        ada = zoho.user_create("Contacts", {"Last_Name": "Lovelace", "Email": "ada@example.com"})
        about_ada = {"id": ada["id"], "name": "Ada Lovelace"}
        document = {"connections": [{
            "id": "zoho", "kind": "zoho", "account": "org-z", "url": zoho.base_url,
            "credentials": {"client_id": "Z_ID", "client_secret": "Z_SECRET", "refresh_token": "Z_REFRESH"},
            "mappings": [{"id": "contacts", "object": "Contacts", "match": {"CDP_Id": "person.id"},
                          "fields": {"Email": "traits.email", "Last_Name": "traits.last_name"}}],
        }]}  # fmt: skip
        (connection,) = parse_connections(document)
        adapter = ZohoAdapter(
            session, client_id=zoho.client_id, client_secret=zoho.client_secret,
            refresh_token="1000.local-refresh-token", accounts_url=zoho.base_url,
        )  # fmt: skip
        reader = ZohoReader(connection, adapter, SharedBudget(store, connection), clock=zoho.clock)
        poller = Poller(store, connection, reader, collector.client(session), objects=("Cases",), clock=zoho.clock)
        await poller.poll()
        zoho.clock.advance(2)
        late = zoho.user_create(
            "Cases", {"Subject": "Refund", "Status": "New", "Related_To": about_ada}, commit_after=30
        )
        zoho.clock.advance(2)
        soon = zoho.user_create("Cases", {"Subject": "Cannot log in", "Status": "New", "Related_To": about_ada})
        await poller.poll()
        zoho.clock.advance(40)  # committed now, behind the cursor
        await poller.poll()
        assert [e["properties"]["crm_id"] for e in collector.events()] == [soon["id"]]

        zoho.clock.advance(120)  # Zoho's default overlap: read back once settled
        await poller.poll()
        assert [e["properties"]["crm_id"] for e in collector.events()] == [soon["id"], late["id"]]
        assert collector.names() == ["CRM Case Opened"] * 2
        for _ in range(3):
            zoho.clock.advance(200)
            assert await poller.poll() == 0
        assert collector.names() == ["CRM Case Opened"] * 2 and collector.duplicates == 0
