"""A Dataverse row committed late is read all the same, and once. Its ``versionnumber`` (SQL Server's
rowversion) is stamped when the write is made, and a delta link issued while its transaction was open
starts past it: the next delta never lists it. Before, the Dynamics reader read nothing back and the case
was lost; now the settled window is read back by ``modifiedon`` (dynamics.py) as the other readers do."""

from __future__ import annotations

from cdp_crm.adapters.dynamics import DynamicsAdapter
from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.mapping import parse_connections
from cdp_crm.inbound import Poller
from cdp_crm.inbound.dynamics import DynamicsReader
from cdp_crm_emulators.dynamics import DynamicsEmulator


def _poller(store, session, dv, collector) -> Poller:
    document = {"connections": [{
        "id": "dyn", "kind": "dynamics", "account": "org-dyn", "url": dv.base_url,
        "credentials": {"tenant_id": "T", "client_id": "C", "client_secret": "S"},
        "mappings": [{"id": "contacts", "object": "contacts", "match": {"cdp_id": "person.id"},
                      "fields": {"emailaddress1": "traits.email"}}],
    }]}  # fmt: skip
    (connection,) = parse_connections(document)
    adapter = DynamicsAdapter(
        session, url=dv.base_url, authority=dv.base_url, tenant_id=dv.tenant,
        client_id=dv.client_id, client_secret=dv.client_secret,
    )  # fmt: skip
    reader = DynamicsReader(connection, adapter, SharedBudget(store, connection), clock=dv.clock)
    return Poller(store, connection, reader, collector.client(session), objects=("incidents",), clock=dv.clock)


async def test_a_dataverse_case_committed_late_is_posted_once_after_the_overlap(store, session, collector):
    async with DynamicsEmulator() as dv:
        ada = dv.user_create("contacts", {"lastname": "Lovelace", "emailaddress1": "ada@example.com"})
        about_ada = f"/contacts({ada['contactid']})"
        poller = _poller(store, session, dv, collector)
        await poller.poll()  # the initial read: a delta link
        dv.clock.advance(2)
        # A case opened in a transaction that commits 40 s later (a plug-in's, a bulk job's): stamped now.
        late = dv.user_create("incidents", {"title": "Refund", "customerid_contact@odata.bind": about_ada},
                              commit_after=40)  # fmt: skip
        dv.clock.advance(1)
        soon = dv.user_create("incidents", {"title": "Cannot log in", "customerid_contact@odata.bind": about_ada})
        await poller.poll()  # the delta link now starts past the late case's version
        assert [e["properties"]["crm_id"] for e in collector.events()] == [soon["incidentid"]]
        dv.clock.advance(60)  # committed now, behind the delta link
        await poller.poll()
        assert [e["properties"]["crm_id"] for e in collector.events()] == [soon["incidentid"]]

        dv.clock.advance(180)  # Dynamics' default overlap: read back once settled
        await poller.poll()
        assert [e["properties"]["crm_id"] for e in collector.events()] == [soon["incidentid"], late["incidentid"]]
        assert collector.names() == ["CRM Case Opened"] * 2
        (posted,) = collector.events("CRM Case Opened")[1:]
        assert posted["anonymousId"] == f"dynamics:org-dyn:{ada['contactid']}"
        for _ in range(3):
            dv.clock.advance(200)
            assert await poller.poll() == 0
        assert collector.names() == ["CRM Case Opened"] * 2 and collector.duplicates == 0


async def test_a_merged_subordinate_read_back_posts_nothing(store, session, collector):
    """The subordinate of a merge is the target's change in the read-back as in the delta: the deactivated
    contact is no contact edit (here a duplicate made and merged away within one polling turn: the forward
    read never posted it)."""
    async with DynamicsEmulator() as dv:
        ada = dv.user_create("contacts", {"lastname": "Lovelace", "emailaddress1": "ada@example.com"})
        poller = _poller(store, session, dv, collector)
        poller.objects = ("contacts",)
        await poller.poll()
        before = len(collector.names())
        dv.clock.advance(2)
        work = dv.user_create("contacts", {"lastname": "Lovelace", "emailaddress1": "ada@work.example"})
        dv.user_merge("contacts", ada["contactid"], work["contactid"], {"jobtitle": "Analyst"})
        await poller.poll()
        posted = collector.names()
        assert posted[before:] == ["CRM Contact Updated"]  # the target's edit (its job title); nothing of the duplicate
        for _ in range(3):
            dv.clock.advance(200)  # past Dynamics' default overlap: the merge's window is read back
            assert await poller.poll() == 0
        assert collector.names() == posted
