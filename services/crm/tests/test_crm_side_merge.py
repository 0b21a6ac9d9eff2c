"""A merge done in HubSpot (its UI's "merge": one contact id kept, the other retired, listed in the
survivor's `hs_merged_object_ids`) is followed, not undone: the inbound side reads the survivor and links
the person whose record held the retired id to the survivor. Before, the next change of that person was
upserted by their `cdp_id`, which the survivor does not hold, and HubSpot made their contact again.

- The survivor holds the person's key (a contact a HubSpot user made, which took the merged-away one's
  `cdp_id` in the merge): the person's record now names it, and their changes are written there.
- The survivor is another person's record: two persons in the CDP, one contact in HubSpot. The merged-away
  person's record is `merged` into the survivor's (written no more: no contact is made again) and the
  CRM's claim that they are one is posted as identity links (the survivor's anonymous id with each
  person's email), so identity merges them and the connector follows that merge as any other."""

from __future__ import annotations

import time

import pytest

from cdp.privacy.v1 import privacy_pb2
from cdp.profile.v1 import profile_pb2
from cdp_crm.domain.coalesce import UPSERT, Change
from cdp_crm.privacy import Privacy
from cdp_crm.state import MERGED, PENDING, RECORDS
from cdp_crm.writes import change_doc
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_kit.bus import subjects
from cdp_kit.timestamps import from_seconds


def _beside(world, person: str) -> str:
    """A person of `person`'s partition: their change is applied after `person`'s (a marker)."""
    return next(f"marker-{i}" for i in range(1000) if world.partition(f"marker-{i}") == world.partition(person))


async def _record(world, person: str) -> dict:
    (found,) = [r.doc for r in await world.store.find(RECORDS, "person_id", person) if r.doc["object"] == "contacts"]
    return found


@pytest.mark.parametrize("merge_new_ids", [False, True], ids=["primary-kept", "new-id"])
async def test_a_contact_merged_into_another_persons_keeps_one_contact_and_claims_the_two_are_one(
    world_factory, collector, merge_new_ids
):
    """`new-id`: HubSpot's merge of contacts today - a new record, both ids retired (the person whose key it
    holds is linked to it too)."""
    async with HubSpotEmulator(merge_new_ids=merge_new_ids) as emulator:
        world = await world_factory(emulator)
        await world.start()
        await world.profiles({"person-a": {"traits.email": "ada@example.com", "traits.first_name": "Ada"},
                              "person-b": {"traits.email": "ada@work.example"}})  # fmt: skip
        await world.eventually(lambda: len(emulator.records("contacts")) == 2)
        ada, work = (emulator.find("contacts", "cdp_id", p) for p in ("person-a", "person-b"))
        poller = world.hubspot_poller(collector)
        await poller.poll()
        assert collector.names() == []  # the connector's own contacts: no news

        emulator.clock.advance(1)
        survivor = emulator.user_merge("contacts", ada["id"], work["id"])["id"]  # a HubSpot user merges the two
        await poller.poll()
        record = await _record(world, "person-b")
        assert (record["state"], record["crm_id"]) == (MERGED, survivor)
        assert ((await _record(world, "person-a"))["state"], (await _record(world, "person-a"))["crm_id"]) == (
            "synced",
            survivor,
        )
        (survivors,) = [r.key for r in await world.store.find(RECORDS, "person_id", "person-a")]
        assert record["merged_into"] == survivors and record["merged_in_crm"] is True
        claims = collector.events("CRM Contact Merged")
        assert {c["context"]["traits"]["email"] for c in claims} == {"ada@example.com", "ada@work.example"}
        assert {c["anonymousId"] for c in claims} == {f"hubspot:62515:{survivor}"}
        retired = sorted([work["id"], *([ada["id"]] if merge_new_ids else [])])
        assert all(c["properties"]["merged_crm_ids"] == retired for c in claims)

        # The merged-away person changes: no contact is made again for them.
        marker = _beside(world, "person-b")
        await world.profiles({"person-b": {"traits.first_name": "Augusta"}})
        await world.profiles({marker: {"traits.email": "marker@example.com"}})
        await world.eventually(lambda: emulator.find("contacts", "cdp_id", marker))
        assert sorted(c["properties"].get("cdp_id") for c in emulator.records("contacts")) == [marker, "person-a"]
        assert emulator.find("contacts", "cdp_id", "person-a")["properties"]["firstname"] == "Ada"
        await poller.poll()
        assert len(collector.events("CRM Contact Merged")) == 2  # read again: claimed once
        assert collector.duplicates == 0
        await world.stop()


async def test_a_contact_merged_into_one_a_hubspot_user_made_is_written_there_afterwards(world_factory, collector):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start()
        await world.profiles({"person-b": {"traits.email": "bo@example.com"}})
        await world.eventually(lambda: emulator.find("contacts", "cdp_id", "person-b"))
        mine = emulator.find("contacts", "cdp_id", "person-b")
        theirs = emulator.user_create("contacts", {"email": "bo@work.example", "firstname": "Bo"})
        poller = world.hubspot_poller(collector)
        await poller.poll()

        emulator.clock.advance(1)
        survivor = emulator.user_merge("contacts", theirs["id"], mine["id"])  # a new id, both retired
        assert survivor["properties"]["cdp_id"] == "person-b"  # it lacked one: the merge carried it over
        await poller.poll()
        record = await _record(world, "person-b")
        assert (record["state"], record["crm_id"]) == ("synced", survivor["id"])

        await world.profiles({"person-b": {"traits.first_name": "Bohdan"}})
        await world.eventually(
            lambda: emulator.find("contacts", "cdp_id", "person-b")["properties"]["firstname"] == "Bohdan"
        )
        (only,) = emulator.records("contacts")
        assert only["id"] == survivor["id"]
        assert (await _record(world, "person-b"))["crm_id"] == survivor["id"]
        await world.stop()


async def test_identity_merging_the_two_after_the_crm_did_keeps_the_one_contact_whichever_survives(
    world_factory, collector
):
    """Identity, told by the claims, merges the two persons; its survivor is the merged-away contact's person.
    That person takes the surviving contact over (their key written there) and is written to it again."""
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start()
        await world.profiles({"person-a": {"traits.email": "ada@example.com"},
                              "person-b": {"traits.email": "ada@work.example"}})  # fmt: skip
        await world.eventually(lambda: len(emulator.records("contacts")) == 2)
        ada, work = (emulator.find("contacts", "cdp_id", p) for p in ("person-a", "person-b"))
        poller = world.hubspot_poller(collector)
        await poller.poll()
        emulator.clock.advance(1)
        survivor = emulator.user_merge("contacts", ada["id"], work["id"])["id"]
        await poller.poll()
        assert (await _record(world, "person-b"))["state"] == MERGED

        await _merge(world, "person-b", "person-a", {"first_name": "Augusta"})

        async def taken_over() -> bool:
            survivor, loser = await _record(world, "person-b"), await _record(world, "person-a")
            return survivor["state"] == "synced" and loser["state"] == MERGED

        await world.eventually(taken_over)
        await world.profiles({"person-b": {"traits.first_name": "Augusta"}})
        await world.eventually(lambda: (emulator.find("contacts", "cdp_id", "person-b") or {}).get(
            "properties", {}).get("firstname") == "Augusta")  # fmt: skip
        (only,) = emulator.records("contacts")
        assert only["id"] == survivor and only["properties"]["cdp_id"] == "person-b"
        await world.stop()


async def _merge(world, survivor: str, loser: str, traits: dict[str, str]) -> None:
    """What profile publishes when identity merges `loser` into `survivor` (as test_crm_merges does)."""
    at = from_seconds(time.time())
    kept = profile_pb2.ProfileChanged(person_id=survivor, cause="merge", at=at, merged=[loser])
    for name, value in traits.items():
        kept.traits[name].string_value = value
    gone = profile_pb2.ProfileChanged(person_id=loser, cause="merge", at=at, removed=True)
    for change in (kept, gone):
        batch = profile_pb2.ProfileChangedBatch(changes=[change])
        await world._publish(subjects.profiles_changed(world.partition(change.person_id)), batch.SerializeToString())


async def test_erasing_the_merged_away_person_alone_leaves_the_other_persons_contact(world_factory, collector):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start()
        await world.profiles({"person-a": {"traits.email": "ada@example.com", "traits.first_name": "Ada"},
                              "person-b": {"traits.email": "ada@work.example"}})  # fmt: skip
        await world.eventually(lambda: len(emulator.records("contacts")) == 2)
        ada, work = (emulator.find("contacts", "cdp_id", p) for p in ("person-a", "person-b"))
        poller = world.hubspot_poller(collector)
        await poller.poll()
        emulator.clock.advance(1)
        survivor = emulator.user_merge("contacts", ada["id"], work["id"])["id"]
        await poller.poll()

        privacy = Privacy(
            world.store, world.logic.mappings, world.logic.deliverer, retry_for=0.5, settled=world.logic.settled,
            partitions=world.partitions, policies={c.id: "anonymise" for c in world.connections},
        )  # fmt: skip
        assert await privacy.erase(privacy_pb2.PrivacyDeleted(request_id="req-b", person_id="person-b")) is True
        (only,) = emulator.records("contacts")
        assert (only["id"], only["properties"]["cdp_id"], only["properties"]["email"]) == (
            survivor, "person-a", "ada@example.com",
        )  # fmt: skip
        assert (await _record(world, "person-b"))["state"] == "anonymised"
        await world.stop()


async def test_a_change_queued_before_the_merge_was_read_makes_no_contact_again(world_factory, collector):
    """The merged-away person's change was queued (`crm_pending`: HubSpot failing) before the merge was read:
    the retrier drops it once the record reads `merged`, rather than sending it by the person's own key."""
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start()
        await world.profiles({"person-a": {"traits.email": "ada@example.com"},
                              "person-b": {"traits.email": "ada@work.example"}})  # fmt: skip
        await world.eventually(lambda: len(emulator.records("contacts")) == 2)
        ada, work = (emulator.find("contacts", "cdp_id", p) for p in ("person-a", "person-b"))
        poller = world.hubspot_poller(collector)
        await poller.poll()
        world._stop_retrier()  # the queued change stays queued until this test retries it
        (mine,) = [r for r in await world.store.find(RECORDS, "person_id", "person-b")]
        (mapping,) = [m for m in world.logic.mappings.values() if m.id == "contacts"]
        queued = Change(mapping.name, (("cdp_id", "person-b"),), {"firstname": "Augusta"}, 1, UPSERT, "person-b", "t")
        await world.store.put(PENDING, mine.key, change_doc(queued, world.partition("person-b")))

        emulator.clock.advance(1)
        emulator.user_merge("contacts", ada["id"], work["id"])
        await poller.poll()
        await world.logic.retry_pending(world.partition("person-b"))
        assert await world.store.get(PENDING, mine.key) is None
        assert [c["properties"]["cdp_id"] for c in emulator.records("contacts")] == ["person-a"]
        await world.stop()
