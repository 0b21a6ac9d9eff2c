"""Backfills that reach beyond the stream: every person the profile service holds (not only those the
connector saw change), and Salesforce Bulk API 2.0 ingest jobs for a bulk backfill, with progress and the
rows Salesforce refused dead-lettered."""

from __future__ import annotations

import grpc

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_crm.people import PROFILE_COLLECTION, ProfileDirectory, profile_fetch
from cdp_crm.runs import Runs
from cdp_crm.state import DEAD_LETTERS, RUNS
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_crm_emulators.salesforce import SalesforceEmulator
from cdp_kit.storage import Put, open_store


async def _state(world, run_id: str, *states: str) -> bool:
    record = await world.store.get(RUNS, run_id)
    return record is not None and record.doc["state"] in states


class ProfileService(profile_pb2_grpc.ProfileServiceServicer):
    """The profile service's BatchGetProfiles over people given as flat traits."""

    def __init__(self, people: dict[str, dict[str, str]]) -> None:
        self.people = people
        self.calls = 0

    async def BatchGetProfiles(self, request, context):
        self.calls += 1
        answer = profile_pb2.BatchGetProfilesResponse()
        for person in request.person_ids:
            if person not in self.people:
                answer.missing.append(person)
                continue
            profile = answer.profiles.add(person_id=person)
            for name, value in self.people[person].items():
                profile.traits[name].value.string_value = value
        return answer


async def test_a_backfill_reaches_every_person_of_the_profile_service(world_factory, tmp_path):
    everyone = {f"person-{i}": {"email": f"p{i}@example.com", "first_name": f"P{i}"} for i in range(12)}
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start()
        # The connector saw only two of them change.
        await world.profiles({p: {f"traits.{k}": v for k, v in everyone[p].items()} for p in ("person-0", "person-1")})
        await world.eventually(lambda: len(emulator.records("contacts")) == 2)

        profiles = open_store(f"sqlite:///{tmp_path}/profile.db")  # the profile service's store
        await profiles.bulk_write(
            [Put(PROFILE_COLLECTION, p, {"merged_from": [], "profile": "{}"}) for p in everyone]
            + [Put(PROFILE_COLLECTION, "person-merged-away", {"merged_from": []})]  # no profile part: skipped
        )
        service = ProfileService(everyone)
        server = grpc.aio.server()
        profile_pb2_grpc.add_ProfileServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            people = ProfileDirectory(profiles, profile_fetch(channel, "token"), world.store)
            runs = Runs(world.logic, partitions=world.partitions, people=people)
            run_id, doc = await runs.start_backfill("hs")
            assert doc["people"] == "profiles"
            await world.eventually(lambda: _state(world, run_id, "succeeded"))
        finally:
            await channel.close()
            await server.stop(None)
            await profiles.close()
        contacts = {r["properties"]["cdp_id"]: r["properties"] for r in emulator.records("contacts")}
        assert set(contacts) == set(everyone)  # ten persons the connector never saw, once each
        assert contacts["person-7"]["email"] == "p7@example.com" and contacts["person-7"]["firstname"] == "P7"
        run = (await world.store.get(RUNS, run_id)).doc
        assert (run["created"], run["unchanged"], run["processed"]) == (10, 2, 12)


def _salesforce_document(emulator) -> dict:
    return {
        "connections": [
            {
                "id": "sf",
                "kind": "salesforce",
                "url": emulator.base_url,
                "credentials": {"client_id": "SF_ID", "client_secret": "SF_SECRET"},
                "mappings": [
                    {
                        "id": "contacts",
                        "object": "Contact",
                        "match": {"CDP_Id__c": "person.id"},
                        "triggers": ["backfill"],  # written by backfills only
                        "fields": {"Email": "traits.email", "LastName": "traits.last_name"},
                    }
                ],
            }
        ]
    }


async def test_a_bulk_backfill_goes_through_bulk_api_jobs_with_progress(world_factory):
    persons = [f"person-{i}" for i in range(40)]
    async with SalesforceEmulator() as emulator:
        world = await world_factory(emulator)
        env = {"SF_ID": emulator.client_id, "SF_SECRET": emulator.client_secret}
        await world.start(_salesforce_document(emulator), env=env)
        emulator.faults.reject(lambda obj, record: record.get("LastName") == "Refused", message="validation rule")
        await world.profiles(
            {p: {"traits.email": f"{p}@example.com", "traits.last_name": "Refused" if p == "person-3" else p.upper()}
             for p in persons}
        )  # fmt: skip
        await world.eventually(lambda: _persons(world, 40))
        assert emulator.records("Contact") == []  # the mapping is written by backfills only

        runs = Runs(world.logic, partitions=world.partitions)
        run_id, doc = await runs.start_backfill("sf", bulk=True)
        assert doc["bulk"] is True
        await world.eventually(lambda: _state(world, run_id, "succeeded_with_errors"))
        run = (await world.store.get(RUNS, run_id)).doc
        assert (run["created"], run["dead_lettered"], run["processed"]) == (39, 1, 40)
        assert run["bulk_state"] == "JobComplete" and run["bulk_job"] in emulator.jobs
        assert len(emulator.jobs) == world.partitions  # one ingest job per partition's page
        assert not [r for r in emulator.requests if "/composite/sobjects" in r.path]  # no Collections call
        assert len(emulator.records("Contact")) == 39
        dead = [r.doc async for r in world.store.scan_all(DEAD_LETTERS)]
        assert [(d["person_id"], d["reason"]) for d in dead] == [("person-3", "invalid_value")]


async def _persons(world, n: int) -> bool:
    return await world.store.count("crm_persons") == n
