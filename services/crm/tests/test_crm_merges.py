"""Two synced persons merged by identity: afterwards the survivor has one record per CRM, and what the
loser's held that the survivor's lacked is kept. HubSpot merges the two contacts itself (its merge
endpoint); Salesforce has no merge over REST: what the survivor's contact lacks is copied from the loser's,
which is then deleted (`on_merge: delete`, the default) or left in the CRM (`on_merge: keep`).

What reaches the connector is what profile publishes for a merge: the survivor's change naming the persons
merged into it (`merged`), and the loser's `removed`. Real HTTP against the local CRMs, the engine on a real
nats-server."""

from __future__ import annotations

import time
from typing import Any

from cdp.crm.v1 import crm_pb2
from cdp.profile.v1 import profile_pb2
from cdp_crm.api import CrmApi
from cdp_crm.domain.coalesce import record_key
from cdp_crm.state import DEAD_LETTERS, MERGED, MERGES, RECORDS, SYNCED
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_crm_emulators.salesforce import SalesforceEmulator
from cdp_kit.bus import subjects
from cdp_kit.timestamps import from_seconds

from .conftest import salesforce_contacts

SF_FIELDS = {
    "Email": "traits.email",
    "FirstName": "traits.first_name",
    "LastName": {"source": "traits.last_name", "default": "(unknown)"},
}


async def _merge(world, survivor: str, loser: str, traits: dict[str, str] | None = None) -> None:
    """What profile publishes when identity merges `loser` into `survivor`."""
    at = from_seconds(time.time())
    kept = profile_pb2.ProfileChanged(person_id=survivor, cause="merge", at=at, merged=[loser])
    for name, value in (traits or {}).items():
        kept.traits[name].string_value = value
    gone = profile_pb2.ProfileChanged(person_id=loser, cause="merge", at=at, removed=True)
    for change in (kept, gone):
        batch = profile_pb2.ProfileChangedBatch(changes=[change])
        await world._publish(subjects.profiles_changed(world.partition(change.person_id)), batch.SerializeToString())


async def _synced(world, key: str) -> bool:
    record = await world.store.get(RECORDS, key)
    return record is not None and record.doc.get("state") == SYNCED and bool(record.doc.get("crm_id"))


async def _state(world, key: str) -> dict[str, Any]:
    record = await world.store.get(RECORDS, key)
    return record.doc if record is not None else {}


async def _merged(world, key: str) -> bool:
    """The loser's record merged, and no merge left to do."""
    done = (await _state(world, key)).get("state") == MERGED
    return done and not await world.store.find(MERGES, "partition", world.partition("person-1"), limit=10)


async def test_hubspot_merges_the_losers_contact_into_the_survivors(world_factory):
    async with HubSpotEmulator() as hubspot:
        world = await world_factory(hubspot)
        await world.start()
        await world.profiles(
            {
                "person-1": {"traits.email": "ada@example.com", "traits.first_name": "Ada"},
                "person-2": {"traits.email": "ada@work.example", "traits.first_name": "Augusta"},
            }
        )
        keys = {p: record_key("hs/contacts", (("cdp_id", p),)) for p in ("person-1", "person-2")}
        for key in keys.values():
            await world.eventually(lambda key=key: _synced(world, key))
        loser = hubspot.find("contacts", "cdp_id", "person-2")
        hubspot.user_update("contacts", loser["id"], {"phone": "+44 20 7946 0000"})  # a rep's, on the loser's

        await _merge(world, "person-1", "person-2")
        await world.eventually(lambda: len(hubspot.records("contacts")) == 1)
        (only,) = hubspot.records("contacts")
        props = only["properties"]
        assert props["cdp_id"] == "person-1" and props["firstname"] == "Ada" and props["email"] == "ada@example.com"
        assert props["phone"] == "+44 20 7946 0000"  # carried over by the merge
        await world.eventually(lambda: _merged(world, keys["person-2"]))
        merged = await _state(world, keys["person-2"])
        assert merged["state"] == MERGED and merged["merged_into"] == keys["person-1"] and merged["key"] == []
        assert (await _state(world, keys["person-1"]))["crm_id"] == only["id"]

        # The survivor goes on being written to that one contact.
        await world.profiles({"person-1": {"traits.first_name": "Augusta"}})
        await world.eventually(lambda: hubspot.records("contacts")[0]["properties"]["firstname"] == "Augusta")
        assert len(hubspot.records("contacts")) == 1
        await world.stop()


async def _salesforce_world(world_factory, sf: SalesforceEmulator, **connection: Any):
    world = await world_factory(sf)
    document = salesforce_contacts(sf, SF_FIELDS)
    document["connections"][0].update(connection)
    await world.start(document, env={"SF_ID": sf.client_id, "SF_SECRET": sf.client_secret})
    await world.profiles(
        {
            "person-1": {"traits.email": "ada@example.com", "traits.last_name": "Lovelace"},
            "person-2": {"traits.email": "ada@work.example", "traits.first_name": "Ada", "traits.last_name": "King"},
        }
    )
    keys = {p: record_key("sf/contacts", (("CDP_Id__c", p),)) for p in ("person-1", "person-2")}
    for key in keys.values():
        await world.eventually(lambda key=key: _synced(world, key))
    survivor = sf.find("Contact", "CDP_Id__c", "person-1")
    loser = sf.find("Contact", "CDP_Id__c", "person-2")
    sf.user_update("Contact", survivor["Id"], {"Title": "Analyst"})
    sf.user_update("Contact", loser["Id"], {"Title": "Countess", "Phone": "+44 20 7946 0000"})
    return world, keys


async def test_salesforce_carries_over_what_the_survivor_lacks_then_deletes_the_losers_contact(world_factory):
    async with SalesforceEmulator() as sf:
        world, keys = await _salesforce_world(world_factory, sf)
        await _merge(world, "person-1", "person-2")
        await world.eventually(lambda: len(sf.records("Contact")) == 1)
        (only,) = sf.records("Contact")
        assert only["CDP_Id__c"] == "person-1" and only["Email"] == "ada@example.com"
        assert only["LastName"] == "Lovelace" and only["Title"] == "Analyst"  # the survivor's own stay
        assert only["FirstName"] == "Ada" and only["Phone"] == "+44 20 7946 0000"  # what it lacked
        await world.eventually(lambda: _merged(world, keys["person-2"]))
        merged = await _state(world, keys["person-2"])
        assert merged["state"] == MERGED and merged["kept"] is False and merged["key"] == []
        await world.stop()


async def test_salesforce_on_merge_keep_leaves_the_losers_contact_after_the_carry_over(world_factory):
    async with SalesforceEmulator() as sf:
        world, keys = await _salesforce_world(world_factory, sf, on_merge="keep")
        await _merge(world, "person-1", "person-2")
        await world.eventually(lambda: _merged(world, keys["person-2"]))
        survivor = sf.find("Contact", "CDP_Id__c", "person-1")
        assert survivor["Phone"] == "+44 20 7946 0000" and survivor["FirstName"] == "Ada"
        assert sf.find("Contact", "CDP_Id__c", "person-2") is not None  # kept
        merged = await _state(world, keys["person-2"])
        assert merged["state"] == MERGED and merged["kept"] is True and merged["key"] == [["CDP_Id__c", "person-2"]]
        # What an operator reads of it (GetRecordStatus, `cdpctl crm record`): merged, into which record, kept.
        api = CrmApi(store=world.store, connections=world.connections, deliverer=world.logic.deliverer, budgets={},
                     runs=None)  # fmt: skip
        status = await api.GetRecordStatus(crm_pb2.GetRecordStatusRequest(person_id="person-2"), None)
        (record,) = status.records
        assert (record.state, record.merged_into, record.kept) == (crm_pb2.RECORD_STATE_MERGED, keys["person-1"], True)
        await world.stop()


async def test_a_merge_that_gives_the_survivor_the_losers_email_merges_first_then_writes(world_factory):
    """A privacy trial's merge: the merged profile took the loser's email, so the survivor's write carried the
    email the loser's contact still held - HubSpot refused it (409, a contact already has it) and the change
    was dead-lettered, the merge then done after. The merge's CRM work comes first: the loser's contact is
    merged into the survivor's, then the survivor's write takes the email; nothing is dead-lettered."""
    async with HubSpotEmulator() as hubspot:
        world = await world_factory(hubspot)
        await world.start()
        await world.profiles(
            {
                "person-1": {"traits.email": "ada@example.com", "traits.first_name": "Ada"},
                "person-2": {"traits.email": "ada@work.example", "traits.first_name": "Augusta"},
            }
        )
        keys = {p: record_key("hs/contacts", (("cdp_id", p),)) for p in ("person-1", "person-2")}
        for key in keys.values():
            await world.eventually(lambda key=key: _synced(world, key))

        await _merge(world, "person-1", "person-2", {"email": "ada@work.example"})
        await world.eventually(lambda: _merged(world, keys["person-2"]))
        await world.eventually(
            lambda: [r["properties"].get("email") for r in hubspot.records("contacts")] == ["ada@work.example"]
        )
        (only,) = hubspot.records("contacts")
        assert only["properties"]["cdp_id"] == "person-1" and only["properties"]["firstname"] == "Ada"
        survivor = await _state(world, keys["person-1"])
        assert survivor["state"] == SYNCED and survivor["crm_id"] == only["id"]
        assert await world.store.find(DEAD_LETTERS, "connection", "hs", limit=10) == []
        await world.stop()


async def test_a_survivor_refused_for_the_losers_email_adopts_the_losers_contact(world_factory):
    """A merge whose survivor has no contact yet: its first write carries the loser's email, and HubSpot refuses
    it (409, the loser's contact holds it; its body names that contact). The merge waited for the survivor's
    record, which the refusal never brings: every retry round tried it again, without end. The loser's
    contact is the one HubSpot names: it becomes the survivor's (its match key stamped with the survivor's id,
    then the survivor's write lands on it) - one contact, the survivor's, and no dead letter or merge left."""
    async with HubSpotEmulator() as hubspot:
        world = await world_factory(hubspot)
        await world.start()
        await world.profiles({"person-2": {"traits.email": "ada@work.example", "traits.first_name": "Augusta"}})
        keys = {p: record_key("hs/contacts", (("cdp_id", p),)) for p in ("person-1", "person-2")}
        await world.eventually(lambda: _synced(world, keys["person-2"]))
        (losers,) = hubspot.records("contacts")

        await _merge(world, "person-1", "person-2", {"email": "ada@work.example", "first_name": "Ada"})
        await world.eventually(lambda: _merged(world, keys["person-2"]))
        await world.eventually(lambda: _synced(world, keys["person-1"]))
        assert any(r.status == 409 for r in hubspot.requests)  # the survivor's first write was refused
        (only,) = hubspot.records("contacts")
        assert only["id"] == losers["id"]  # adopted, not made again
        assert only["properties"]["cdp_id"] == "person-1" and only["properties"]["email"] == "ada@work.example"
        assert only["properties"]["firstname"] == "Ada"
        survivor = await _state(world, keys["person-1"])
        assert survivor["state"] == SYNCED and survivor["crm_id"] == only["id"]
        merged = await _state(world, keys["person-2"])
        assert merged["state"] == MERGED and merged["merged_into"] == keys["person-1"] and merged["kept"] is False
        assert await world.store.find(DEAD_LETTERS, "connection", "hs", limit=10) == []
        await world.stop()


async def test_a_survivor_refused_for_someone_elses_contact_ends_the_merge_once(world_factory):
    """The survivor's first write refused for a contact that is not the loser's (a rep's own, holding the email
    the merged profile took): nothing of the loser's to adopt. The merge ends with the loser's contact kept
    as it is (it waited for the survivor's record every round, without end); the survivor's change stays one
    dead letter naming the duplicate, for an operator."""
    async with HubSpotEmulator() as hubspot:
        world = await world_factory(hubspot)
        await world.start()
        await world.profiles({"person-2": {"traits.email": "ada@work.example", "traits.first_name": "Augusta"}})
        keys = {p: record_key("hs/contacts", (("cdp_id", p),)) for p in ("person-1", "person-2")}
        await world.eventually(lambda: _synced(world, keys["person-2"]))
        reps = hubspot.user_create("contacts", {"email": "ada@home.example", "firstname": "A."})

        await _merge(world, "person-1", "person-2", {"email": "ada@home.example", "first_name": "Ada"})
        await world.eventually(lambda: _merged(world, keys["person-2"]))
        merged = await _state(world, keys["person-2"])
        assert merged["kept"] is True and merged["key"] == [["cdp_id", "person-2"]]
        (letter,) = await world.store.find(DEAD_LETTERS, "connection", "hs", limit=10)
        assert letter.key == keys["person-1"] and letter.doc["reason"] == "duplicate"
        assert reps["id"] in letter.doc["crm_message"]
        contacts = {r["id"]: r["properties"] for r in hubspot.records("contacts")}
        assert len(contacts) == 2 and contacts[reps["id"]].get("cdp_id") in (None, "")
        await world.stop()
