"""The engine's write of a record after a batch is a compare-and-set on the version the batch read: a
write landing between the batch's read and its commit - the relink of a merge made in the CRM (news.py
`_relink`), from the poller or another replica - is not overwritten with what the batch computed from the
record as it read it. Before, the commit was a plain put: the relinked record (`merged`, written no more)
read as before the merge again, and the person's next change was upserted by their own key, making their
contact again. Now the commit fails whole, the batch is applied again from what the store holds, and the
record stays merged (its change not written: merged records are written no more)."""

from __future__ import annotations

from cdp_crm.state import MERGED, PENDING, RECORDS, RUNS
from cdp_crm.writes import stream_run_key
from cdp_crm_emulators.hubspot import HubSpotEmulator


async def _only(world, person: str):
    (found,) = await world.store.find(RECORDS, "person_id", person)
    return found


async def _both_linked(world, emulator) -> None:
    """Both contacts made in the CRM and their records committed here (the CRM answers before the batch's
    commit lands: reading the records on the contacts alone failed now and then in a loaded CI run)."""

    async def linked() -> bool:
        found = [await world.store.find(RECORDS, "person_id", p) for p in ("person-a", "person-b")]
        return len(emulator.records("contacts")) == 2 and all(len(f) == 1 for f in found)

    await world.eventually(linked)


async def test_a_relink_landing_while_a_batch_is_delivered_is_not_overwritten_by_its_commit(world_factory):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start()
        await world.profiles({"person-a": {"traits.email": "ada@example.com"},
                              "person-b": {"traits.email": "ada@work.example"}})  # fmt: skip
        await _both_linked(world, emulator)
        survivor = await _only(world, "person-a")

        deliverer = world.logic.deliverer
        deliver = deliverer.deliver
        landed = []

        async def racing(mapping, changes, **kwargs):
            """The batch read person-b's record; while its write is at the CRM, the relink lands."""
            answer = await deliver(mapping, changes, **kwargs)
            if not landed and any(c.person_id == "person-b" for c in changes):
                record = await _only(world, "person-b")
                doc = {**record.doc, "state": MERGED, "merged_into": survivor.key, "merged_in_crm": True}
                await world.store.put(RECORDS, record.key, doc, expected_version=record.version)
                landed.append(record.version + 1)
            return answer

        run = stream_run_key("hs", world.partition("person-b"))
        before = (await world.store.get(RUNS, run)).doc["processed"]

        async def committed() -> bool:
            """The batch's commit landed (the first one, or the batch applied again): its run counted it."""
            return (await world.store.get(RUNS, run)).doc["processed"] > before

        deliverer.deliver = racing
        await world.profiles({"person-b": {"traits.first_name": "Augusta"}})
        await world.eventually(lambda: bool(landed))
        await world.eventually(committed)
        record = await _only(world, "person-b")
        assert (record.doc["state"], record.doc["merged_into"]) == (MERGED, survivor.key)  # the relink stands
        await world.stop()


async def test_a_relink_landing_while_a_queued_change_is_retried_is_not_overwritten(world_factory):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start(retry_for=0.0)  # a failing write is queued at once (crm_pending)
        await world.profiles({"person-a": {"traits.email": "ada@example.com"},
                              "person-b": {"traits.email": "ada@work.example"}})  # fmt: skip
        await _both_linked(world, emulator)
        survivor = await _only(world, "person-a")

        deliverer = world.logic.deliverer
        deliver = deliverer.deliver
        landed = []
        emulator.faults.fail_next(1_000_000, status=503)  # HubSpot down: person-b's change is queued

        async def racing(mapping, changes, **kwargs):
            """The retrier read person-b's record; while its queued change is at the CRM, the relink lands."""
            answer = await deliver(mapping, changes, **kwargs)
            if not landed and answer.synced and any(c.person_id == "person-b" for c in changes):
                record = await _only(world, "person-b")
                doc = {**record.doc, "state": MERGED, "merged_into": survivor.key, "merged_in_crm": True}
                await world.store.put(RECORDS, record.key, doc, expected_version=record.version)
                landed.append(True)
            return answer

        deliverer.deliver = racing
        await world.profiles({"person-b": {"traits.first_name": "Augusta"}})
        await world.eventually(lambda: _queued(world, "person-b"))
        emulator.faults.clear()  # back: the retrier sends it, and the relink lands meanwhile
        await world.eventually(lambda: bool(landed))
        await world.eventually(lambda: _not_queued(world))  # dropped: its record is merged now
        record = await _only(world, "person-b")
        assert (record.doc["state"], record.doc["merged_into"]) == (MERGED, survivor.key)  # the relink stands
        await world.stop()


async def _queued(world, person: str) -> bool:
    record = await _only(world, person)
    return await world.store.get(PENDING, record.key) is not None


async def _not_queued(world) -> bool:
    for partition in range(world.partitions):
        if await world.store.find(PENDING, "partition", partition, limit=1):
            return False
    return True
