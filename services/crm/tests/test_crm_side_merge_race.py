"""The relink after a merge done in the CRM (news.py `_relink`) is a compare-and-set on the version of the
record document it read: a write that lands between its read and its write - the engine committing the
merged-away person's change, an erasure, another replica following the same merge - is not overwritten
with what was read before. Before, the relink was a plain put: the person's record lost the fields the
engine had just recorded as written (so the echo check took them for a CRM user's edit), and an erasure
landing meanwhile was undone (the erased person's record read `merged` again, their key and values back)."""

from __future__ import annotations

import pytest

from cdp_crm.budgets import SharedBudget
from cdp_crm.inbound import HubSpotPoller
from cdp_crm.state import ANONYMISED, MERGED, RECORDS
from cdp_crm_emulators.hubspot import HubSpotEmulator

from .conftest import TOKEN


async def _only(world, person: str):
    (found,) = await world.store.find(RECORDS, "person_id", person)
    return found


@pytest.mark.parametrize("meanwhile", ["change written", "erased"])
async def test_a_write_landing_while_a_merge_is_followed_is_kept(world_factory, collector, meanwhile):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start()
        await world.profiles({"person-a": {"traits.email": "ada@example.com"},
                              "person-b": {"traits.email": "ada@work.example"}})  # fmt: skip
        await world.eventually(lambda: len(emulator.records("contacts")) == 2)
        ada, work = (emulator.find("contacts", "cdp_id", p) for p in ("person-a", "person-b"))
        (connection,) = world.connections
        poller = HubSpotPoller(
            world.store, connection, world.session, TOKEN, SharedBudget(world.store, connection),
            collector.client(world.session), objects=("contacts",),
        )  # fmt: skip
        await poller.poll()
        await world.stop()  # the engine's own writes are the one this test makes, at the moment it chooses

        relink = poller._relink
        landed = []

        async def racing(change, now):
            """The relink reads the records; then, before it writes, the other write lands."""
            answer = await relink(change, now)
            if not landed:
                record = await _only(world, "person-b")
                if meanwhile == "change written":
                    doc = {**record.doc, "fields": {**record.doc["fields"], "firstname": "Augusta"}}
                else:
                    doc = {**record.doc, "state": ANONYMISED, "key": [], "fields": {}}
                await world.store.put(RECORDS, record.key, doc, expected_version=record.version)
                landed.append(True)
            return answer

        poller._relink = racing
        emulator.clock.advance(1)
        survivor = emulator.user_merge("contacts", ada["id"], work["id"])["id"]
        await poller.poll()
        assert landed
        doc = (await _only(world, "person-b")).doc
        if meanwhile == "change written":
            assert (doc["state"], doc["crm_id"]) == (MERGED, survivor)  # followed, from the record as it is now
            assert doc["fields"]["firstname"] == "Augusta"
        else:
            assert (doc["state"], doc["key"], doc["fields"]) == (ANONYMISED, [], {})  # the erasure stands
        assert len(collector.events("CRM Contact Merged")) == 2
