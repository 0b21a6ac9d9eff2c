"""Merges done in the Salesforce and Dynamics 365 UIs are followed as HubSpot's are (test_crm_side_merge.py):
the record that held the merged-away id is linked to the survivor. Before, Salesforce's merge deleted the
losing contact (``MasterRecordId`` set) and the connector never read it: the merged-away person's next
change was upserted by their ``CDP_Id__c``, which no live contact held, and Salesforce made their contact
again. Dataverse's merge deactivates the subordinate (``merged`` true, ``_masterid_value``) and the
connector went on writing to it by its alternate key.

- The survivor holds another person's key (both contacts were the connector's): the merged-away person's
  record reads `merged` (written no more) and the CRM's claim that they are one goes to identity.
- The survivor holds no key (a contact a CRM user made): the person's record names the survivor."""

from __future__ import annotations

from cdp_crm.adapters.dynamics import DynamicsAdapter
from cdp_crm.adapters.salesforce import SalesforceAdapter
from cdp_crm.budgets import SharedBudget
from cdp_crm.inbound import Poller
from cdp_crm.inbound.dynamics import DynamicsReader
from cdp_crm.inbound.salesforce import SalesforceReader
from cdp_crm.state import MERGED, RECORDS
from cdp_crm_emulators.dynamics import DynamicsEmulator
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_crm_emulators.salesforce import SalesforceEmulator

from .conftest import salesforce_contacts

SF = {"SF_ID": "local-consumer-key", "SF_SECRET": "local-consumer-secret"}
SF_FIELDS = {"Email": "traits.email", "FirstName": "traits.first_name",
             "LastName": {"source": "traits.last_name", "default": "(unknown)"}}  # fmt: skip


def _salesforce_poller(world, emulator, collector) -> Poller:
    (connection,) = world.connections
    adapter = SalesforceAdapter(
        world.session, client_id=emulator.client_id, client_secret=emulator.client_secret, login_url=emulator.base_url
    )
    reader = SalesforceReader(connection, adapter, SharedBudget(world.store, connection))
    return Poller(world.store, connection, reader, collector.client(world.session), objects=("Contact",))


def _dynamics_document(dynamics) -> dict:
    return {"connections": [{
        "id": "dyn", "kind": "dynamics", "url": dynamics.base_url, "auth_url": dynamics.base_url,
        "credentials": {"tenant_id": "DYN_TENANT", "client_id": "DYN_ID", "client_secret": "DYN_SECRET"},
        "mappings": [{"id": "contacts", "object": "contacts", "match": {"cdp_id": "person.id"},
                      "fields": {"emailaddress1": "traits.email", "firstname": "traits.first_name",
                                 "lastname": {"source": "traits.last_name", "default": "(unknown)"}}}],
    }]}  # fmt: skip


def _dynamics_env(dynamics) -> dict[str, str]:
    return {"DYN_TENANT": dynamics.tenant, "DYN_ID": dynamics.client_id, "DYN_SECRET": dynamics.client_secret}


def _dynamics_poller(world, emulator, collector) -> Poller:
    (connection,) = world.connections
    adapter = DynamicsAdapter(
        world.session, url=emulator.base_url, authority=emulator.base_url, tenant_id=emulator.tenant,
        client_id=emulator.client_id, client_secret=emulator.client_secret,
    )  # fmt: skip
    reader = DynamicsReader(connection, adapter, SharedBudget(world.store, connection))
    return Poller(world.store, connection, reader, collector.client(world.session), objects=("contacts",))


async def _record(world, person: str) -> dict:
    (found,) = [r.doc for r in await world.store.find(RECORDS, "person_id", person)]
    return found


def _beside(world, person: str) -> str:
    """A person of `person`'s partition: their change is applied after `person`'s (a marker)."""
    return next(f"marker-{i}" for i in range(1000) if world.partition(f"marker-{i}") == world.partition(person))


async def test_a_salesforce_merge_of_two_persons_contacts_keeps_one_contact_and_claims_the_two_are_one(
    world_factory, collector
):
    async with HubSpotEmulator() as hubspot, SalesforceEmulator() as sf:
        world = await world_factory(hubspot)
        await world.start(salesforce_contacts(sf, SF_FIELDS), env=SF)
        await world.profiles({"person-a": {"traits.email": "ada@example.com", "traits.first_name": "Ada"},
                              "person-b": {"traits.email": "ada@work.example"}})  # fmt: skip
        await world.eventually(lambda: len(sf.records("Contact")) == 2)
        ada, work = (sf.find("Contact", "CDP_Id__c", p) for p in ("person-a", "person-b"))
        await world.eventually(lambda: _synced_all(world, ("person-a", "person-b")))
        poller = _salesforce_poller(world, sf, collector)
        await poller.poll()
        assert collector.names() == []  # the connector's own contacts: no news

        sf.clock.advance(1)
        sf.user_merge("Contact", ada["Id"], work["Id"])  # a Salesforce user merges the two
        await poller.poll()
        record = await _record(world, "person-b")
        assert (record["state"], record["crm_id"], record["merged_in_crm"]) == (MERGED, ada["Id"], True)
        survivor = await _record(world, "person-a")
        assert (survivor["state"], survivor["crm_id"]) == ("synced", ada["Id"])
        claims = collector.events("CRM Contact Merged")
        assert {c["context"]["traits"]["email"] for c in claims} == {"ada@example.com", "ada@work.example"}
        assert {c["anonymousId"] for c in claims} == {f"salesforce:sf:{ada['Id']}"}
        assert all(c["properties"]["merged_crm_ids"] == [work["Id"]] for c in claims)
        assert "CRM Contact Deleted" not in collector.names()

        # The merged-away person changes: no contact is made again for them.
        marker = _beside(world, "person-b")
        await world.profiles({"person-b": {"traits.first_name": "Augusta"}})
        await world.profiles({marker: {"traits.email": "marker@example.com"}})
        await world.eventually(lambda: sf.find("Contact", "CDP_Id__c", marker))
        assert sorted(c["CDP_Id__c"] for c in sf.records("Contact")) == sorted([marker, "person-a"])
        assert sf.find("Contact", "CDP_Id__c", "person-a")["FirstName"] == "Ada"
        await poller.poll()
        assert len(collector.events("CRM Contact Merged")) == 2  # read again: claimed once
        await world.stop()


async def test_a_salesforce_contact_merged_into_one_a_user_made_is_written_there_afterwards(world_factory, collector):
    """The user kept their own contact as the master and took the connector's `CDP_Id__c` from the loser (a
    field picked in the merge): the person's record names the master, and their writes go there."""
    async with HubSpotEmulator() as hubspot, SalesforceEmulator() as sf:
        world = await world_factory(hubspot)
        await world.start(salesforce_contacts(sf, SF_FIELDS), env=SF)
        await world.profiles({"person-b": {"traits.email": "bo@example.com"}})
        await world.eventually(lambda: _synced_all(world, ("person-b",)))
        mine = sf.find("Contact", "CDP_Id__c", "person-b")
        theirs = sf.user_create("Contact", {"LastName": "Bo", "Email": "bo@work.example"})
        poller = _salesforce_poller(world, sf, collector)
        await poller.poll()

        sf.clock.advance(1)
        sf.user_merge("Contact", theirs["Id"], mine["Id"], take={"CDP_Id__c": "person-b"})
        await poller.poll()
        record = await _record(world, "person-b")
        assert (record["state"], record["crm_id"]) == ("synced", theirs["Id"])

        await world.profiles({"person-b": {"traits.first_name": "Bohdan"}})
        await world.eventually(lambda: sf.find("Contact", "CDP_Id__c", "person-b")["FirstName"] == "Bohdan")
        (only,) = sf.records("Contact")
        assert only["Id"] == theirs["Id"]
        await world.stop()


async def _synced_all(world, persons) -> bool:
    for person in persons:
        found = [r.doc for r in await world.store.find(RECORDS, "person_id", person)]
        if not found or found[0].get("state") != "synced" or not found[0].get("crm_id"):
            return False
    return True


async def test_a_dynamics_merge_of_two_persons_contacts_stops_writing_the_subordinate_and_claims_the_two_are_one(
    world_factory, collector
):
    async with HubSpotEmulator() as hubspot, DynamicsEmulator() as dv:
        world = await world_factory(hubspot)
        await world.start(_dynamics_document(dv), env=_dynamics_env(dv))
        await world.profiles({"person-a": {"traits.email": "ada@example.com", "traits.first_name": "Ada"},
                              "person-b": {"traits.email": "ada@work.example", "traits.first_name": "Augusta"}})  # fmt: skip
        await world.eventually(lambda: _synced_all(world, ("person-a", "person-b")))
        ada, work = (dv.find("contacts", "cdp_id", p) for p in ("person-a", "person-b"))
        poller = _dynamics_poller(world, dv, collector)
        await poller.poll()
        assert collector.names() == []

        dv.clock.advance(1)
        dv.user_merge("contacts", ada["contactid"], work["contactid"])  # a Dynamics user merges the two
        await poller.poll()
        record = await _record(world, "person-b")
        assert (record["state"], record["crm_id"], record["merged_in_crm"]) == (MERGED, ada["contactid"], True)
        assert (await _record(world, "person-a"))["state"] == "synced"
        claims = collector.events("CRM Contact Merged")
        assert {c["context"]["traits"]["email"] for c in claims} == {"ada@example.com", "ada@work.example"}
        assert {c["anonymousId"] for c in claims} == {f"dynamics:dyn:{ada['contactid']}"}

        # The merged-away person changes: their deactivated contact is written no more.
        marker = _beside(world, "person-b")
        await world.profiles({"person-b": {"traits.first_name": "Ada Augusta"}})
        await world.profiles({marker: {"traits.email": "marker@example.com"}})
        await world.eventually(lambda: dv.find("contacts", "cdp_id", marker))
        subordinate = dv.find("contacts", "contactid", work["contactid"])
        assert (subordinate["statecode"], subordinate["merged"], subordinate["firstname"]) == (1, True, "Augusta")
        await poller.poll()
        assert len(collector.events("CRM Contact Merged")) == 2
        await world.stop()
