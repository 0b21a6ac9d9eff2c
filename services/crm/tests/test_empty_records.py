"""The connector never makes a CRM record that holds nothing: a profile change clearing a mapped field of a
person it never wrote creates no record holding only its match key (the backfill already skips such
persons), and a backfill does not ask the CRM to remove from a list a person the connector never added."""

from __future__ import annotations

import pytest

from cdp_crm.runs import Runs
from cdp_crm.state import PERSONS, RUNS
from cdp_crm_emulators.hubspot import HubSpotEmulator

from .test_backfill import _state


@pytest.mark.parametrize("mode", ["upsert", "mirror"])
async def test_clearing_a_mapped_field_of_a_person_never_written_creates_no_record(world_factory, mode):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        document = world.document()
        document["connections"][0]["mappings"][0]["mode"] = mode
        await world.start(document)
        # The kept person shares the cleared one's partition: one batch, so once its contact is written,
        # whatever the batch wrote is written.
        kept = next(
            p for p in (f"person-{i}" for i in range(100)) if world.partition(p) == world.partition("person-cleared")
        )
        await world.profiles({"person-cleared": {"traits.email": None}, kept: {"traits.email": "a@example.com"}})
        await world.eventually(lambda: emulator.find("contacts", "cdp_id", kept))
        assert [c["properties"]["cdp_id"] for c in emulator.records("contacts")] == [kept]

        # A value later arriving creates the record as usual, and clearing it then is written (mirror clears).
        await world.profiles({"person-cleared": {"traits.email": "b@example.com"}})
        contact = await world.eventually(lambda: emulator.find("contacts", "cdp_id", "person-cleared"))
        assert contact["properties"]["email"] == "b@example.com"
        if mode == "mirror":
            await world.profiles({"person-cleared": {"traits.email": None}})
            await world.eventually(
                lambda: not emulator.find("contacts", "cdp_id", "person-cleared")["properties"].get("email")
            )


async def test_a_backfill_removes_from_a_list_only_persons_the_connector_added(world_factory):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        list_id = await world.start_with_list(triggers=["segments.entered", "backfill"])
        persons = [f"person-{i}" for i in range(6)]
        await world.profiles({p: {"traits.email": f"{p}@example.com"} for p in persons})
        await world.eventually(lambda: len(emulator.records("contacts")) == 6)
        await world.segment("person-0", "high_value")
        await world.segment("person-1", "high_value")
        await world.eventually(lambda: len(emulator.members(list_id)) == 2)

        async def followed() -> bool:
            return len(await world.store.get_many(PERSONS, persons)) == 6

        await world.eventually(followed)
        before = len(emulator.requests)
        runs = Runs(world.logic, partitions=world.partitions)
        run_id, _ = await runs.start_backfill("hs")
        await world.eventually(lambda: _state(world, run_id, "succeeded"))
        # Everything is in sync: the four never added are not asked to be removed (no call at all).
        sent = [r.path for r in list(emulator.requests)[before:]]
        assert [p for p in sent if "/lists/" in p] == []
        run = (await world.store.get(RUNS, run_id)).doc
        assert (run["dead_lettered"], run["created"], run["updated"]) == (0, 0, 0)
        assert sorted(emulator.members(list_id)) == sorted(
            emulator.find("contacts", "cdp_id", p)["id"] for p in ("person-0", "person-1")
        )

        # One the connector added who has left is removed by a backfill (this mapping leaves exits to it).
        await world.segment("person-1", "high_value", entered=False)

        async def left() -> bool:
            return "high_value" not in (await world.store.get(PERSONS, "person-1")).doc.get("segments", [])

        await world.eventually(left)
        assert len(emulator.members(list_id)) == 2
        second, _ = await runs.start_backfill("hs")
        await world.eventually(lambda: _state(world, second, "succeeded"))
        assert emulator.members(list_id) == [emulator.find("contacts", "cdp_id", "person-0")["id"]]


async def test_a_person_entering_a_segment_a_record_mapping_is_limited_to_is_written_as_a_backfill_would(world_factory):
    """The segment is what such a record says: the stream writes it on entry however few values the person
    holds, as a backfill does, so a backfill after the stream makes no write."""
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        document = world.document()
        document["connections"][0]["mappings"] = [
            {"id": "vip", "object": "contacts", "match": {"cdp_id": "person.id"}, "segment": "vip",
             "fields": {"firstname": "traits.first_name"}}
        ]  # fmt: skip
        await world.start(document)
        await world.segment("person-vip", "vip")
        await world.eventually(lambda: emulator.find("contacts", "cdp_id", "person-vip"))
        await world.eventually(lambda: world.store.get(PERSONS, "person-vip"))
        before = len(emulator.requests)
        runs = Runs(world.logic, partitions=world.partitions)
        run_id, _ = await runs.start_backfill("hs")
        await world.eventually(lambda: _state(world, run_id, "succeeded"))
        run = (await world.store.get(RUNS, run_id)).doc
        assert (run["unchanged"], run["skipped"], run["created"]) == (1, 0, 0)
        # No write (a read of which contacts HubSpot still holds: test_record_gone.py).
        assert [r.path for r in list(emulator.requests)[before:] if not r.path.endswith("/batch/read")] == []
