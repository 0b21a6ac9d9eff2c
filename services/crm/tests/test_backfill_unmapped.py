"""A backfill writes only the persons the continuous sync would write: one holding none of a mapping's fields
(nor a segment it reads) is skipped and counted as skipped in the run, not sent to the CRM as a record
holding only its match key (after `make up`'s generated users, 10,000 HubSpot contacts holding only
`cdp_id`)."""

from __future__ import annotations

from cdp_crm.runs import Runs
from cdp_crm.state import PERSONS, RUNS
from cdp_crm_emulators.hubspot import HubSpotEmulator

from .test_backfill import _state


async def test_a_backfill_skips_persons_holding_no_mapped_value_as_the_stream_does(world_factory):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start()
        await world.profiles(
            {
                "person-mapped": {"traits.email": "a@example.com", "traits.plan": "pro"},
                "person-unmapped": {"traits.plan": "free"},  # no field the mapping reads
                "person-scored": {"scores.churn_risk": 0.25},  # a mapped score: written
            }
        )

        async def followed() -> bool:
            return len(await world.store.get_many(PERSONS, ["person-mapped", "person-unmapped", "person-scored"])) == 3

        await world.eventually(followed)
        await world.eventually(lambda: len(emulator.records("contacts")) == 2)  # the stream wrote two
        runs = Runs(world.logic, partitions=world.partitions)
        run_id, _ = await runs.start_backfill("hs")
        await world.eventually(lambda: _state(world, run_id, "succeeded"))
        run = (await world.store.get(RUNS, run_id)).doc
        contacts = emulator.records("contacts")
        # No contact made of cdp_id alone: the two the stream wrote, no third.
        assert sorted(c["properties"]["cdp_id"] for c in contacts) == ["person-mapped", "person-scored"]
        assert (run["processed"], run["total"]) == (3, 3)
        assert run["skipped"] == 1
        assert (run["created"], run["updated"], run["unchanged"], run["dead_lettered"]) == (0, 0, 2, 0)
