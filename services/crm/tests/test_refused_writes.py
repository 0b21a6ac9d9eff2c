"""A write the CRM refused leaves the connector's record of what the CRM holds as it was: the next write of
the person carries every field that differs from what the CRM really holds (all of them, with the mapping's
defaults, for a record the CRM never created), and the dead letter stays until such a write succeeds."""

from __future__ import annotations

from cdp_crm.domain.coalesce import record_key
from cdp_crm.runs import Runs
from cdp_crm.state import DEAD_LETTERS, RECORDS, RUNS
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_crm_emulators.salesforce import SalesforceEmulator

from .conftest import salesforce_contacts


def _hs_key(person: str) -> str:
    return record_key("hs/contacts", (("cdp_id", person),))


def _sf_key(person: str) -> str:
    return record_key("sf/contacts", (("CDP_Id__c", person),))


async def _letter(world, key: str):
    record = await world.store.get(DEAD_LETTERS, key)
    return None if record is None else record.doc


async def test_a_fix_after_a_refused_create_writes_every_field_and_clears_the_letter(world_factory):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start()
        await world.profiles({"dl2": {"traits.email": "bad@@x", "traits.first_name": "Eve"}})
        letter = await world.eventually(lambda: _letter(world, _hs_key("dl2")))
        assert letter["reason"] == "invalid_value"
        assert emulator.find("contacts", "cdp_id", "dl2") is None
        record = (await world.store.get(RECORDS, _hs_key("dl2"))).doc
        assert record["fields"] == {}  # the CRM holds nothing of it

        await world.profiles({"dl2": {"traits.email": "eve@example.com"}})  # the fix
        contact = await world.eventually(lambda: emulator.find("contacts", "cdp_id", "dl2"))
        assert contact["properties"]["email"] == "eve@example.com"
        assert contact["properties"]["firstname"] == "Eve"
        await world.eventually(lambda: _gone(world, _hs_key("dl2")))
        record = (await world.store.get(RECORDS, _hs_key("dl2"))).doc
        assert record["state"] == "synced"
        assert record["fields"]["firstname"] == "Eve" and record["fields"]["email"] == "eve@example.com"


async def test_a_smaller_change_does_not_get_a_refused_record_created_or_its_letter_dropped(world_factory):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start()
        await world.profiles({"dl3": {"traits.email": "bad@@x", "traits.first_name": "Eve"}})
        first = await world.eventually(lambda: _letter(world, _hs_key("dl3")))
        await world.profiles({"dl3": {"traits.first_name": "Eva"}})  # the email is still invalid

        async def refused_again():
            letter = await _letter(world, _hs_key("dl3"))
            return letter if letter is not None and letter != first else None

        letter = await world.eventually(refused_again)
        assert letter["reason"] == "invalid_value"
        assert emulator.find("contacts", "cdp_id", "dl3") is None
        assert emulator.records("contacts") == []
        record = (await world.store.get(RECORDS, _hs_key("dl3"))).doc
        assert (record["state"], record["fields"]) == ("dead_lettered", {})


async def test_a_refused_update_is_sent_again_with_the_next_change(world_factory):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start()
        await world.profiles({"dl4": {"traits.email": "eve@example.com", "traits.first_name": "Eve"}})
        await world.eventually(lambda: emulator.find("contacts", "cdp_id", "dl4"))
        await world.profiles({"dl4": {"traits.email": "bad@@x", "traits.first_name": "Eva"}})
        await world.eventually(lambda: _letter(world, _hs_key("dl4")))
        record = (await world.store.get(RECORDS, _hs_key("dl4"))).doc
        assert record["fields"]["firstname"] == "Eve"  # what the CRM still holds
        await world.profiles({"dl4": {"traits.email": "eva@example.com"}})

        def updated():
            contact = emulator.find("contacts", "cdp_id", "dl4")
            return contact["properties"]["firstname"] == "Eva" and contact

        contact = await world.eventually(updated)
        assert contact["properties"]["email"] == "eva@example.com"
        await world.eventually(lambda: _gone(world, _hs_key("dl4")))

        # A backfill compares with what the CRM accepted: nothing left to write.
        runs = Runs(world.logic, partitions=world.partitions)
        run_id, _ = await runs.start_backfill("hs", "contacts")

        async def finished():
            record = await world.store.get(RUNS, run_id)
            return record is not None and record.doc["state"] == "succeeded" and record.doc

        run = await world.eventually(finished)
        assert (run["created"], run["updated"], run["unchanged"]) == (0, 0, 1)


async def test_a_backfill_writes_what_the_crm_refused_once_it_would_take_it(world_factory):
    async with HubSpotEmulator() as emulator:
        emulator.faults.reject(lambda obj, record: record.get("cdp_id") == "dl6", message="INVALID_EMAIL")
        world = await world_factory(emulator)
        await world.start()
        await world.profiles({"dl6": {"traits.email": "eve@example.com", "traits.first_name": "Eve"}})
        await world.eventually(lambda: _letter(world, _hs_key("dl6")))
        emulator.faults.clear()  # the CRM takes it now (its rule was fixed)

        runs = Runs(world.logic, partitions=world.partitions)
        run_id, _ = await runs.start_backfill("hs", "contacts")
        contact = await world.eventually(lambda: emulator.find("contacts", "cdp_id", "dl6"))
        assert (contact["properties"]["email"], contact["properties"]["firstname"]) == ("eve@example.com", "Eve")
        await world.eventually(lambda: _gone(world, _hs_key("dl6")))

        async def finished():
            record = await world.store.get(RUNS, run_id)
            return record is not None and record.doc["state"] == "succeeded" and record.doc

        run = await world.eventually(finished)
        assert (run["created"], run["unchanged"]) == (1, 0)


def _salesforce_document(emulator) -> dict:
    fields = {
        "Email": "traits.email",
        "FirstName": "traits.first_name",
        "LastName": {"source": "traits.last_name", "default": "(unknown)"},
    }
    return salesforce_contacts(emulator, fields)


async def test_salesforce_gets_the_whole_record_with_defaults_after_a_refused_create(world_factory):
    async with SalesforceEmulator() as emulator:
        world = await world_factory(emulator)
        env = {"SF_ID": emulator.client_id, "SF_SECRET": emulator.client_secret}
        await world.start(_salesforce_document(emulator), env=env)
        await world.profiles({"dl5": {"traits.email": "bad@@x", "traits.first_name": "Eve"}})
        letter = await world.eventually(lambda: _letter(world, _sf_key("dl5")))
        assert letter["crm_code"] == "INVALID_EMAIL_ADDRESS"

        await world.profiles({"dl5": {"traits.email": "eve@example.com"}})  # the fix
        contact = await world.eventually(lambda: emulator.find("Contact", "CDP_Id__c", "dl5"))
        assert (contact["Email"], contact["FirstName"], contact["LastName"]) == ("eve@example.com", "Eve", "(unknown)")
        await world.eventually(lambda: _gone(world, _sf_key("dl5")))
        assert (await world.store.get(RECORDS, _sf_key("dl5"))).doc["state"] == "synced"


async def _gone(world, key: str) -> bool:
    return await world.store.get(DEAD_LETTERS, key) is None


async def test_a_list_membership_refused_after_its_waits_is_added_by_a_backfill(world_factory):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        list_id = await world.start_with_list()
        key = record_key("hs/high-value", (("cdp_id", "dl7"),))
        await world.segment("dl7", "high_value")  # no contact for the person: waited for, then refused
        await world.eventually(lambda: _letter(world, key), timeout=30.0)
        record = (await world.store.get(RECORDS, key)).doc
        assert record["member"] is not True  # the CRM never took the membership

        await world.profiles({"dl7": {"traits.email": "eve@example.com"}})
        contact = await world.eventually(lambda: emulator.find("contacts", "cdp_id", "dl7"))
        runs = Runs(world.logic, partitions=world.partitions)
        await runs.start_backfill("hs", "high-value")
        await world.eventually(lambda: emulator.members(list_id) == [contact["id"]])
        await world.eventually(lambda: _gone(world, key))
