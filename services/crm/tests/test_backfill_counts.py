"""A finished backfill's figures add up: people counted in its total who were gone when their page was read
(merged away, or deleted since the count) are counted as absent, so processed + absent = total, and
GetRun / `cdpctl crm runs` show them - a run no longer ends "succeeded" with one person unaccounted for."""

from __future__ import annotations

import grpc
from google.protobuf import json_format
from rich.console import Console

from cdp.profile.v1 import profile_pb2_grpc
from cdp_crm.api import run_message
from cdp_crm.people import PROFILE_COLLECTION, ProfileDirectory, profile_fetch
from cdp_crm.runs import Runs
from cdp_crm.state import RUNS
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_kit.storage import Put, open_store
from cdpctl.crm import _runs_table

from .test_backfill import ProfileService, _state


async def test_people_gone_since_the_count_are_counted_as_absent_and_the_figures_add_up(world_factory, tmp_path):
    everyone = {f"person-{i}": {"email": f"p{i}@example.com", "first_name": f"P{i}"} for i in range(5)}
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start()
        profiles = open_store(f"sqlite:///{tmp_path}/profile.db")
        await profiles.bulk_write(
            [Put(PROFILE_COLLECTION, p, {"merged_from": [], "profile": "{}"}) for p in everyone]
            + [Put(PROFILE_COLLECTION, "person-merged-away", {"merged_from": []})]  # no profile part
            # Listed, but deleted from the profile service before its page is read (BatchGetProfiles: missing).
            + [Put(PROFILE_COLLECTION, "person-deleted", {"merged_from": [], "profile": "{}"})]
        )
        server = grpc.aio.server()
        profile_pb2_grpc.add_ProfileServiceServicer_to_server(ProfileService(everyone), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            people = ProfileDirectory(profiles, profile_fetch(channel, "token"), world.store)
            runs = Runs(world.logic, partitions=world.partitions, people=people)
            run_id, _ = await runs.start_backfill("hs")
            await world.eventually(lambda: _state(world, run_id, "succeeded"))
        finally:
            await channel.close()
            await server.stop(None)
            await profiles.close()
        run = (await world.store.get(RUNS, run_id)).doc
        assert (run["total"], run["processed"], run["absent"]) == (7, 5, 2)
        assert run["processed"] + run["absent"] == run["total"]
        message = run_message(run_id, run)
        assert (message.total, message.processed, message.absent) == (7, 5, 2)
        console = Console(record=True, width=250)
        console.print(_runs_table([json_format.MessageToDict(message)]))
        assert "5/7 (2 absent)" in console.export_text()  # what `cdpctl crm runs` shows


async def test_people_added_since_the_count_raise_the_total_of_a_finished_run(world_factory):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start()
        runs = Runs(world.logic, partitions=world.partitions)  # the connector's own view: counted, then listed
        await world.profiles({"person-a": {"traits.email": "a@example.com"}})
        await world.eventually(lambda: len(emulator.records("contacts")) == 1)
        counted = runs.people.count
        # The contact is written before the connector commits its record of the person: wait for that too.
        await world.eventually(lambda: _equals(counted(), 1))

        async def undercount() -> int:
            return await counted() - 1  # someone appeared between the count and the listing

        runs.people.count = undercount
        run_id, doc = await runs.start_backfill("hs")
        assert doc["total"] == 0
        await world.eventually(lambda: _state(world, run_id, "succeeded"))
        run = (await world.store.get(RUNS, run_id)).doc
        assert (run["total"], run["processed"], run["absent"]) == (1, 1, 0)


async def _equals(value, expected) -> bool:
    return await value == expected
