"""An erasure reaches every CRM record that names the deleted person, not only the ones the connector wrote:
a contact a sales rep made for them (never synced, or made again after the synced one was deleted) is found
by the person's email or phone, or by the match key stamped with their id, and erased by the connection's
policy. What a rep then does to such a record is no news: it would make a new person of the deleted one.

Real HTTP against the local HubSpot, Salesforce, Dynamics 365 and Zoho, the engine on a real nats-server."""

from __future__ import annotations

import urllib.parse

import pytest

from cdp.privacy.v1 import privacy_pb2
from cdp_crm.adapters.salesforce import SalesforceAdapter
from cdp_crm.budgets import SharedBudget
from cdp_crm.inbound import Poller
from cdp_crm.inbound.salesforce import SalesforceReader
from cdp_crm.privacy import Privacy
from cdp_crm.state import ANONYMISED, DELETED, PRIVACY, RECORDS
from cdp_crm_emulators.dynamics import DynamicsEmulator
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_crm_emulators.salesforce import SalesforceEmulator
from cdp_crm_emulators.zoho import ZohoEmulator

from .conftest import TOKEN, salesforce_contacts

SF_FIELDS = {
    "Email": "traits.email",
    "Phone": "traits.phone",
    "FirstName": "traits.first_name",
    "LastName": {"source": "traits.last_name", "default": "(unknown)"},
}


def _privacy(world) -> Privacy:
    return Privacy(
        world.store, world.logic.mappings, world.logic.deliverer, settled=world.logic.settled,
        partitions=world.partitions, policies={c.id: c.on_delete or "anonymise" for c in world.connections},
        retry_for=5.0,
    )  # fmt: skip


async def test_salesforce_a_reps_own_contact_of_the_person_is_anonymised_and_its_later_edits_are_no_news(
    world_factory, collector
):
    async with SalesforceEmulator() as sf:
        world = await world_factory(sf)
        await world.start(
            salesforce_contacts(sf, SF_FIELDS),
            env={"SF_ID": sf.client_id, "SF_SECRET": sf.client_secret},
            describe=True,
        )
        await world.profiles(
            {"person-1": {"traits.email": "ada@example.com", "traits.phone": "+442079460000", "traits.last_name": "L"}}
        )
        await world.eventually(lambda: sf.find("Contact", "CDP_Id__c", "person-1") is not None)
        # Reps' own contacts: one by her email, one by her phone, and one of somebody else.
        by_email = sf.user_create("Contact", {"LastName": "Lovelace", "Email": "ADA@example.com", "Title": "Countess"})
        by_phone = sf.user_create("Contact", {"LastName": "Lovelace", "Phone": "+442079460000"})
        other = sf.user_create("Contact", {"LastName": "Byron", "Email": "byron@example.com"})
        (connection,) = world.connections
        adapter = SalesforceAdapter(
            world.session, client_id=sf.client_id, client_secret=sf.client_secret, login_url=sf.base_url
        )
        reader = SalesforceReader(connection, adapter, SharedBudget(world.store, connection))
        poller = Poller(world.store, connection, reader, collector.client(world.session), objects=("Contact",))
        await poller.poll()
        seen = len(collector.stored)

        assert await _privacy(world).erase(privacy_pb2.PrivacyDeleted(request_id="req-1", person_id="person-1"))
        for made in (by_email, by_phone):
            record = sf.records("Contact")
            (now,) = [r for r in record if r["Id"] == made["Id"]]
            assert not now.get("Email") and not now.get("Phone") and now["LastName"] == "(deleted)"
        assert sf.find("Contact", "Id", other["Id"])["Email"] == "byron@example.com"  # nobody else touched
        done = (await world.store.get(PRIVACY, "req-1")).doc
        assert done["connections"] == {"sf": {"anonymised": 3, "removed": 0}}
        erased = {r.doc["crm_id"]: r.doc["state"] for r in await world.store.find(RECORDS, "person_id", "person-1")}
        assert erased[by_email["Id"]] == ANONYMISED and erased[by_phone["Id"]] == ANONYMISED
        # The search named her email and phone in a request's body, never in a request line: Salesforce's
        # access logs keep those (an e2e run found the email in the emulator's request log).
        lines = " ".join(urllib.parse.unquote_plus(r.path) for r in sf.requests).lower()
        assert "ada@example.com" not in lines and "442079460000" not in lines

        # A rep edits the anonymised contact: no event (identity would make a new person of it).
        sf.clock.advance(5)
        sf.user_update("Contact", by_email["Id"], {"Title": "Mathematician", "FirstName": "Ada"})
        await poller.poll()
        assert len(collector.stored) == seen
        await world.stop()


async def test_hubspot_a_contact_made_again_by_a_rep_after_the_synced_one_was_deleted_is_deleted(world_factory):
    async with HubSpotEmulator() as hubspot:
        world = await world_factory(hubspot)
        document = world.document()
        document["connections"][0]["on_delete"] = "delete"
        await world.start(document)
        await world.profiles({"person-1": {"traits.email": "ada@example.com", "traits.first_name": "Ada"}})
        await world.eventually(lambda: hubspot.find("contacts", "cdp_id", "person-1") is not None)
        synced = hubspot.find("contacts", "cdp_id", "person-1")
        archive = f"{hubspot.base_url}/crm/v3/objects/contacts/batch/archive"
        body = {"inputs": [{"id": synced["id"]}]}
        async with world.session.post(archive, json=body, headers={"Authorization": f"Bearer {TOKEN}"}) as answer:
            assert answer.status == 204  # a rep deletes it ...
        again = hubspot.user_create("contacts", {"email": "ada@example.com", "firstname": "Ada"})  # ... and makes it
        # A contact stamped with her id the connector does not know of (its record of it lost).
        stamped = hubspot.user_create("contacts", {"email": "ada@work.example", "cdp_id": "person-1-old"})
        other = hubspot.user_create("contacts", {"email": "bo@example.com"})

        request = privacy_pb2.PrivacyDeleted(
            request_id="req-1", person_id="person-1", merged_person_ids=["person-1-old"]
        )
        assert await _privacy(world).erase(request)
        left = {r["id"] for r in hubspot.records("contacts")}
        assert again["id"] not in left and stamped["id"] not in left and other["id"] in left
        states = {r.doc.get("crm_id"): r.doc["state"] for r in await world.store.find(RECORDS, "person_id", "person-1")}
        assert states[again["id"]] == DELETED and states[stamped["id"]] == DELETED
        await world.stop()


async def test_a_record_the_crm_refused_is_not_created_by_its_erasure(world_factory):
    """A privacy trial's merged person: the survivor's HubSpot upsert was refused (409, its email already on
    another contact), and the erasure's anonymising upsert by the match key then created a new, empty
    contact holding the deleted person's CDP id. A record the CRM never took holds nothing there to erase."""
    async with HubSpotEmulator() as hubspot:
        world = await world_factory(hubspot)
        await world.start()
        taken = hubspot.user_create("contacts", {"email": "ada@example.com", "firstname": "Someone"})
        await world.profiles({"person-1": {"traits.email": "ada@example.com", "traits.first_name": "Ada"}})

        async def refused() -> bool:
            found = await world.store.find(RECORDS, "person_id", "person-1")
            return any(r.doc.get("state") == "dead_lettered" for r in found)

        await world.eventually(refused)
        before = {r["id"] for r in hubspot.records("contacts")}

        assert await _privacy(world).erase(privacy_pb2.PrivacyDeleted(request_id="req-1", person_id="person-1"))
        assert {r["id"] for r in hubspot.records("contacts")} == before  # nothing created
        assert hubspot.find("contacts", "cdp_id", "person-1") is None
        # The contact that held her email is hers as far as the erasure can tell: the sweep anonymised it.
        (kept,) = [r for r in hubspot.records("contacts") if r["id"] == taken["id"]]
        assert not kept["properties"].get("email")
        await world.stop()


def _dynamics_contacts(emulator) -> dict:
    return {
        "connections": [
            {
                "id": "dyn", "kind": "dynamics", "url": emulator.base_url, "auth_url": emulator.base_url,
                "credentials": {"tenant_id": "DYN_TENANT", "client_id": "DYN_ID", "client_secret": "DYN_SECRET"},
                "mappings": [
                    {"id": "contacts", "object": "contacts", "match": {"cdp_id": "person.id"},
                     "fields": {"emailaddress1": "traits.email", "telephone1": "traits.phone",
                                "lastname": "traits.last_name"}},
                ],
            }
        ]
    }  # fmt: skip


def _zoho_contacts(emulator) -> dict:
    return {
        "connections": [
            {
                "id": "zoho", "kind": "zoho", "url": emulator.base_url,
                "credentials": {"client_id": "ZOHO_ID", "client_secret": "ZOHO_SECRET", "refresh_token": "ZOHO_REFRESH"},
                "mappings": [
                    {"id": "contacts", "object": "Contacts", "match": {"CDP_Id": "person.id"},
                     "fields": {"Email": "traits.email", "Phone": "traits.phone", "Last_Name": "traits.last_name"}},
                ],
            }
        ]
    }  # fmt: skip


# Per CRM: the emulator, its connection document, its credentials, and its contacts' object and names of the
# id, email, phone, last name and stamped key.
CRMS = {
    "dynamics": (
        DynamicsEmulator, _dynamics_contacts,
        lambda e: {"DYN_TENANT": e.tenant, "DYN_ID": e.client_id, "DYN_SECRET": e.client_secret},
        ("contacts", "contactid", "emailaddress1", "telephone1", "lastname", "cdp_id"),
    ),
    "zoho": (
        ZohoEmulator, _zoho_contacts,
        lambda e: {"ZOHO_ID": e.client_id, "ZOHO_SECRET": e.client_secret, "ZOHO_REFRESH": "1000.local-refresh-token"},
        ("Contacts", "id", "Email", "Phone", "Last_Name", "CDP_Id"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("policy", ["anonymise", "delete"])
@pytest.mark.parametrize("crm", sorted(CRMS))
async def test_a_reps_own_contact_of_the_person_in_dynamics_and_zoho_is_erased(world_factory, crm, policy):
    """D8 for Dynamics 365 and Zoho: a rep deleted the synced contact and made it again with the person's email,
    made another with her phone, and one is stamped with the id of a person merged into her. The erasure finds
    them by a Dataverse $filter (in a $batch body) or a Zoho COQL query (in a POST body) and erases them by the
    connection's policy; a contact of somebody else is left alone, and no request line names her email or
    phone (access logs keep those)."""
    emulator_class, document_of, env_of, names = CRMS[crm]
    obj, id_field, email, phone, last_name, stamp = names
    async with emulator_class() as emulator:
        world = await world_factory(emulator)
        document = document_of(emulator)
        document["connections"][0]["on_delete"] = policy
        await world.start(document, env=env_of(emulator), describe=True)
        await world.profiles(
            {"person-1": {"traits.email": "ada@example.com", "traits.phone": "+442079460000", "traits.last_name": "L"}}
        )
        await world.eventually(lambda: emulator.find(obj, stamp, "person-1") is not None)
        emulator.user_delete(obj, emulator.find(obj, stamp, "person-1")[id_field])  # a rep deletes it ...
        by_email = emulator.user_create(obj, {last_name: "Lovelace", email: "ADA@example.com"})  # ... and makes it
        by_phone = emulator.user_create(obj, {last_name: "Lovelace", phone: "+442079460000"})
        stamped = emulator.user_create(obj, {last_name: "Lovelace", email: "ada@work.example", stamp: "person-1-old"})
        other = emulator.user_create(obj, {last_name: "Byron", email: "byron@example.com", phone: "+442079460001"})

        request = privacy_pb2.PrivacyDeleted(
            request_id="req-1", person_id="person-1", merged_person_ids=["person-1-old"]
        )
        assert await _privacy(world).erase(request)
        rows = {r[id_field]: r for r in emulator.records(obj)}
        for made in (by_email, by_phone, stamped):
            if policy == "delete":
                assert made[id_field] not in rows
            else:
                now = rows[made[id_field]]
                assert not now.get(email) and not now.get(phone) and now[last_name] == "(deleted)"
        assert rows[other[id_field]][email] == "byron@example.com"  # nobody else touched
        assert rows[other[id_field]][phone] == "+442079460001"
        states = {r.doc.get("crm_id"): r.doc["state"] for r in await world.store.find(RECORDS, "person_id", "person-1")}
        expected = DELETED if policy == "delete" else ANONYMISED
        assert all(states[made[id_field]] == expected for made in (by_email, by_phone, stamped))
        done = (await world.store.get(PRIVACY, "req-1")).doc
        # Each record counted once: the synced one (gone: the rep deleted it, and neither policy makes it
        # again) and the rep's three.
        assert done["connections"] == {document["connections"][0]["id"]: {expected: 4, "removed": 0}}
        lines = " ".join(urllib.parse.unquote_plus(r.path) for r in emulator.requests).lower()
        assert "ada@example.com" not in lines and "442079460000" not in lines
        await world.stop()


async def test_anonymising_a_contact_a_rep_deleted_in_hubspot_does_not_make_it_again(world_factory):
    """A rep deleted the person's synced contact; her erasure (anonymise) then upserted it by its match key,
    and HubSpot made a new contact holding her CDP id and nothing else. An erasure never creates a record:
    the anonymising write is an update by HubSpot's id, and its 404 means the contact is gone already -
    done, counted as anonymised."""
    async with HubSpotEmulator() as hubspot:
        world = await world_factory(hubspot)
        await world.start()
        await world.profiles({"person-1": {"traits.email": "ada@example.com", "traits.first_name": "Ada"}})
        await world.eventually(lambda: hubspot.find("contacts", "cdp_id", "person-1") is not None)
        synced = hubspot.find("contacts", "cdp_id", "person-1")
        archive = f"{hubspot.base_url}/crm/v3/objects/contacts/batch/archive"
        body = {"inputs": [{"id": synced["id"]}]}
        async with world.session.post(archive, json=body, headers={"Authorization": f"Bearer {TOKEN}"}) as answer:
            assert answer.status == 204  # a rep deletes it

        assert await _privacy(world).erase(privacy_pb2.PrivacyDeleted(request_id="req-1", person_id="person-1"))
        assert hubspot.records("contacts") == []  # not made again
        (record,) = await world.store.find(RECORDS, "person_id", "person-1")
        assert record.doc["state"] == ANONYMISED and record.doc["crm_id"] == synced["id"]
        done = (await world.store.get(PRIVACY, "req-1")).doc
        assert done["connections"] == {"hs": {"anonymised": 1, "removed": 0}}
        await world.stop()


@pytest.mark.parametrize("crm", sorted(CRMS))
async def test_anonymising_a_record_a_rep_deleted_in_dynamics_or_zoho_does_not_make_it_again(world_factory, crm):
    """As in HubSpot: the anonymising write is an update by the CRM's id (Dataverse PATCH with If-Match: *,
    Zoho Update Records), never an upsert by the match key; the record gone is done."""
    emulator_class, document_of, env_of, names = CRMS[crm]
    obj, id_field, *_, stamp = names
    async with emulator_class() as emulator:
        world = await world_factory(emulator)
        await world.start(document_of(emulator), env=env_of(emulator), describe=True)
        await world.profiles({"person-1": {"traits.email": "ada@example.com", "traits.last_name": "L"}})
        await world.eventually(lambda: emulator.find(obj, stamp, "person-1") is not None)
        synced = emulator.find(obj, stamp, "person-1")
        emulator.user_delete(obj, synced[id_field])  # a rep deletes it

        assert await _privacy(world).erase(privacy_pb2.PrivacyDeleted(request_id="req-1", person_id="person-1"))
        assert emulator.records(obj) == []  # not made again
        (record,) = await world.store.find(RECORDS, "person_id", "person-1")
        assert record.doc["state"] == ANONYMISED and record.doc["crm_id"] == synced[id_field]
        done = (await world.store.get(PRIVACY, "req-1")).doc
        assert done["connections"] == {crm if crm == "zoho" else "dyn": {"anonymised": 1, "removed": 0}}
        await world.stop()
