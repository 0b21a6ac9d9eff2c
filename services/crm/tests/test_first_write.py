"""The first write to a contact a CRM user made is field by field too. The person came from that contact
(read as news, identity made a person of it); when the CDP changes one of their fields, the connector
stamps its match key on the contact (`claim`) and writes the record for the first time. Before, that
write carried every mapped field - none had been written, so all counted as changed - and a field a CRM
user edited after the connector's last read of the contact (between the read before the write and the
write) was overwritten with the value the CDP had read earlier, and the edit was lost: read back, the
contact held what the connector wrote, no news. Now the first write sends only the fields whose value
differs from what the last read of the contact found (the memo's digest per field, the base the inbound
side compares against, news.py `_identify`): the CDP's change, not the values it took from the CRM.

Real HTTP against the local HubSpot, the engine on a real nats-server, the poller posting to a collector
stand-in; the rep's edit lands right after the engine's read before the write."""

from __future__ import annotations

from typing import Any

from cdp_crm.adapters.salesforce import SalesforceAdapter
from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.coalesce import record_key
from cdp_crm.inbound import HubSpotPoller, Poller
from cdp_crm.inbound.salesforce import SalesforceReader
from cdp_crm.state import RECORDS, SYNCED
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_crm_emulators.salesforce import SalesforceEmulator

from .conftest import salesforce_contacts

SF = {"SF_ID": "local-consumer-key", "SF_SECRET": "local-consumer-secret"}

HS_KEY = record_key("hs/contacts", (("cdp_id", "person-ada"),))


def _document(world) -> dict[str, Any]:
    document = world.document()
    document["connections"][0]["mappings"][0]["fields"]["phone"] = "traits.phone"
    return document


def _identifiers(contact_id: str):
    async def answer(person_ids):
        known = {"person-ada": ["email:ada@example.com", f"anonymous_id:hubspot:62515:{contact_id}"]}
        return {p: known[p] for p in person_ids if p in known}

    return answer


async def _synced(world) -> bool:
    record = await world.store.get(RECORDS, HS_KEY)
    return record is not None and record.doc.get("state") == SYNCED


async def _started(world, collector, contact) -> HubSpotPoller:
    """The connector started on the local HubSpot with its inbound poller wired as the process wires it,
    the engine reading before each write; the rep's contact read once (created, identify: identity makes
    person-ada of it)."""
    await world.start(_document(world), identifiers=_identifiers(contact["id"]))
    poller = world.hubspot_poller(collector)
    poller.read_first_fresh = 0.0
    world.logic.inbound = {"hs": poller}
    assert await poller.poll() == 2
    return poller


async def test_a_crm_edit_landing_between_the_read_and_the_first_write_is_not_overwritten(world_factory, collector):
    async with HubSpotEmulator() as hubspot:
        world = await world_factory(hubspot)
        contact = hubspot.user_create(
            "contacts", {"email": "ada@example.com", "firstname": "Ada", "phone": "+44 20 0000"}
        )
        poller = await _started(world, collector, contact)

        # The rep corrects the phone just after the engine's read before its write: no read sees it first.
        read_first = poller.read_first

        async def read_then_edit(obj: str) -> int:
            posted = await read_first(obj)
            hubspot.clock.advance(5)
            hubspot.user_update("contacts", contact["id"], {"phone": "+44 20 1111"})
            return posted

        poller.read_first = read_then_edit
        # The person as identity made them from the contact, with the CDP's own change of the first name.
        profile = {"traits.email": "ada@example.com", "traits.phone": "+44 20 0000", "traits.first_name": "Augusta"}
        await world.profiles({"person-ada": profile})
        await world.eventually(lambda: _synced(world))

        (stored,) = hubspot.records("contacts")  # the rep's contact, claimed: no second one
        assert stored["id"] == contact["id"]
        assert stored["properties"]["cdp_id"] == "person-ada"
        assert stored["properties"]["firstname"] == "Augusta"  # the CDP's change is written
        assert stored["properties"]["phone"] == "+44 20 1111"  # the rep's edit is kept

        # And it comes in as the rep's edit at the next read: news, not the connector's own value.
        poller.read_first = read_first
        assert await poller.poll() == 2
        assert collector.events(kind="identify")[-1]["traits"] == {"phone": "+44 20 1111"}
        await world.stop()


async def test_the_first_write_sends_the_cdps_change_and_the_record_holds_every_field(world_factory, collector):
    """No edit in between: the CDP's change (a phone the contact lacked) and the match key are written,
    and the connector's record holds every mapped field as the base of the next writes."""
    async with HubSpotEmulator() as hubspot:
        world = await world_factory(hubspot)
        contact = hubspot.user_create("contacts", {"email": "ada@example.com", "firstname": "Ada"})
        await _started(world, collector, contact)
        profile = {"traits.email": "ada@example.com", "traits.first_name": "Ada", "traits.phone": "+44 20 2222"}
        await world.profiles({"person-ada": profile})
        await world.eventually(lambda: _synced(world))
        (stored,) = hubspot.records("contacts")
        assert stored["id"] == contact["id"]
        assert (stored["properties"]["firstname"], stored["properties"]["phone"]) == ("Ada", "+44 20 2222")
        record = await world.store.get(RECORDS, HS_KEY)
        assert record.doc["fields"] == {"email": "ada@example.com", "firstname": "Ada", "phone": "+44 20 2222"}
        await world.stop()


async def test_the_same_in_salesforce_a_reps_edit_between_the_read_and_the_first_write_is_kept(
    world_factory, collector
):
    async with HubSpotEmulator() as hubspot, SalesforceEmulator() as salesforce:
        world = await world_factory(hubspot)
        contact = salesforce.user_create("Contact", {"LastName": "Lovelace", "Email": "ada@example.com",
                                                     "Phone": "+44 20 0000"})  # fmt: skip
        fields = {"LastName": "traits.last_name", "FirstName": "traits.first_name", "Email": "traits.email",
                  "Phone": "traits.phone"}  # fmt: skip

        async def identifiers(person_ids):
            known = {"person-ada": [f"anonymous_id:salesforce:sf:{contact['Id']}"]}
            return {p: known[p] for p in person_ids if p in known}

        await world.start(salesforce_contacts(salesforce, fields), env=SF, identifiers=identifiers)
        (connection,) = world.connections
        adapter = SalesforceAdapter(
            world.session, client_id=salesforce.client_id, client_secret=salesforce.client_secret,
            login_url=salesforce.base_url,
        )  # fmt: skip
        reader = SalesforceReader(connection, adapter, SharedBudget(world.store, connection))
        poller = Poller(world.store, connection, reader, collector.client(world.session), objects=("Contact",))
        poller.read_first_fresh = 0.0
        world.logic.inbound = {"sf": poller}
        assert await poller.poll() >= 1  # the rep's new contact (identity makes person-ada of it)
        read_first = poller.read_first

        async def read_then_edit(obj: str) -> int:
            posted = await read_first(obj)
            salesforce.clock.advance(5)
            salesforce.user_update("Contact", contact["Id"], {"Phone": "+44 20 1111"})
            return posted

        poller.read_first = read_then_edit
        profile = {"traits.email": "ada@example.com", "traits.last_name": "Lovelace", "traits.phone": "+44 20 0000",
                   "traits.first_name": "Augusta"}  # fmt: skip
        await world.profiles({"person-ada": profile})
        await world.eventually(lambda: (salesforce.find("Contact", "CDP_Id__c", "person-ada") or {}).get("FirstName"))
        (stored,) = salesforce.records("Contact")
        assert stored["Id"] == contact["Id"] and stored["FirstName"] == "Augusta"
        assert stored["Phone"] == "+44 20 1111"  # the rep's edit is kept
        await world.stop()
