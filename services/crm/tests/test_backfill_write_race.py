"""A backfill's write of a record after its share of a page is a compare-and-set on the version it read, as
the engine's batch write is (test_record_write_race.py): a write landing between the share's read and its
commit - the relink of a merge made in the CRM (news.py `_relink`), an erasure - is not overwritten with
what the backfill computed from the record as it read it. Before, the backfill's commit was a plain put:
the relinked record (`merged`, written no more) read as before the merge again (state `synced`, its own
key), and the person's next change was upserted by their own key, making their contact again. Now the
commit fails, the share is planned again from what the store holds, and the record stays merged; an
erasure landing the same way stands, and the erased person is left out of the share planned again (their
tombstone, as the stream drops their inputs)."""

from __future__ import annotations

import time

import pytest

from cdp_crm.runs import Runs
from cdp_crm.state import ANONYMISED, MERGED, RECORDS, RUNS, TOMBSTONES
from cdp_crm_emulators.hubspot import HubSpotEmulator


async def _only(world, person: str):
    (found,) = await world.store.find(RECORDS, "person_id", person)
    return found


async def _linked(world, emulator) -> bool:
    found = [await world.store.find(RECORDS, "person_id", p) for p in ("person-a", "person-b")]
    return len(emulator.records("contacts")) == 2 and all(len(f) == 1 for f in found)


async def _finished(world, run_id: str) -> bool:
    record = await world.store.get(RUNS, run_id)
    return record is not None and record.doc["state"] not in ("running", "pending")


@pytest.mark.parametrize("meanwhile", ["relinked", "erased"])
async def test_a_write_landing_while_a_backfill_share_is_delivered_is_not_overwritten(world_factory, meanwhile):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start(partitions=1)
        await world.profiles({"person-a": {"traits.email": "ada@example.com", "traits.first_name": "Ada"},
                              "person-b": {"traits.email": "ada@work.example", "traits.first_name": "Ada"}})  # fmt: skip
        await world.eventually(lambda: _linked(world, emulator))
        survivor = await _only(world, "person-a")
        # person-b's record as if the CRM had taken an older first name: the backfill has a field to write.
        record = await _only(world, "person-b")
        older = {**record.doc, "fields": {**record.doc["fields"], "firstname": "A."}}
        await world.store.put(RECORDS, record.key, older, expected_version=record.version)

        deliverer = world.logic.deliverer
        deliver = deliverer.deliver
        landed = []

        async def racing(mapping, changes, **kwargs):
            """The share read person-b's record; while its write is at the CRM, the other write lands."""
            answer = await deliver(mapping, changes, **kwargs)
            if not landed and any(c.person_id == "person-b" for c in changes):
                record = await _only(world, "person-b")
                if meanwhile == "relinked":
                    doc = {**record.doc, "state": MERGED, "merged_into": survivor.key, "merged_in_crm": True}
                else:  # privacy.py's erasure: the tombstone and the erased record
                    doc = {**record.doc, "state": ANONYMISED, "key": [], "fields": {}}
                    await world.store.put(TOMBSTONES, "person-b", {"at": time.time(), "request": "req-1"})
                await world.store.put(RECORDS, record.key, doc, expected_version=record.version)
                landed.append(True)
            return answer

        deliverer.deliver = racing
        runs = Runs(world.logic, partitions=1)
        run_id, _ = await runs.start_backfill("hs")
        await world.eventually(lambda: _finished(world, run_id))
        assert landed
        run = (await world.store.get(RUNS, run_id)).doc
        assert run["state"] == "succeeded", run.get("error")
        doc = (await _only(world, "person-b")).doc
        if meanwhile == "relinked":
            assert (doc["state"], doc.get("merged_into")) == (MERGED, survivor.key)  # the relink stands
        else:
            assert (doc["state"], doc["key"], doc["fields"]) == (ANONYMISED, [], {})  # the erasure stands
        await runs.close()
        await world.stop()
