"""A backfill reads a page of people, then plans each partition's share of it under the partition's lock
(runs.py): a change of a person the stream commits in between is newer than what the page holds. Before,
the share compared the page's older values with the record the stream had just written and wrote them
back ("updated"): the CRM, and the connector's record of what it took, went back to the old value until
the person's next change. A record the stream wrote from a change after the page was read is left as it is."""

from __future__ import annotations

from cdp_crm.people import ConnectorView
from cdp_crm.runs import Runs
from cdp_crm.state import PERSONS, RECORDS, RUNS
from cdp_crm_emulators.hubspot import HubSpotEmulator


async def test_a_change_committed_after_the_page_was_read_is_not_written_back_over(world_factory):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start()
        await world.profiles({"person-1": {"traits.email": "ada@example.com", "traits.first_name": "Ada"}})

        def first_name() -> str | None:
            record = emulator.find("contacts", "cdp_id", "person-1")
            return (record or {}).get("properties", {}).get("firstname")

        async def followed(value: str) -> bool:
            view = await world.store.get(PERSONS, "person-1")
            return view is not None and value in view.doc["fields"].values()

        await world.eventually(lambda: followed("Ada"))
        view = ConnectorView(world.store)

        class ReadBeforeTheChange:
            """The connector's view, each page handed over once a change read after it is committed."""

            name = view.name
            count = view.count

            async def pages(self, size, after=None):
                async for page in view.pages(size, after):
                    await world.profiles({"person-1": {"traits.first_name": "Augusta"}})
                    await world.eventually(lambda: followed("Augusta"))
                    yield page

        runs = Runs(world.logic, partitions=world.partitions, people=ReadBeforeTheChange())
        run_id, _ = await runs.start_backfill("hs")

        async def finished() -> bool:
            record = await world.store.get(RUNS, run_id)
            return record is not None and record.doc["state"] != "running"

        await world.eventually(finished)
        run = (await world.store.get(RUNS, run_id)).doc
        assert run["state"] == "succeeded", run["error"]
        assert (run["processed"], run["updated"], run["unchanged"]) == (1, 0, 1)
        assert first_name() == "Augusta"
        (record,) = await world.store.find(RECORDS, "person_id", "person-1")
        assert record.doc["fields"]["firstname"] == "Augusta"
