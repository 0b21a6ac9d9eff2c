"""Backfills that reach beyond the stream: every person the profile service holds (not only those the
connector saw change), and Salesforce Bulk API 2.0 ingest jobs for a bulk backfill, with progress and the
rows Salesforce refused dead-lettered."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_crm.people import PROFILE_COLLECTION, ProfileDirectory, profile_fetch
from cdp_crm.runs import STALE_AFTER, Runs
from cdp_crm.state import DEAD_LETTERS, RUNS
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_crm_emulators.salesforce import SalesforceEmulator, bulk
from cdp_kit.storage import Put, open_store

from .conftest import salesforce_contacts


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
    # written by backfills only
    return salesforce_contacts(
        emulator, {"Email": "traits.email", "LastName": "traits.last_name"}, triggers=["backfill"]
    )


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

        # The data is fixed: the next bulk backfill writes that record, and its dead letter goes.
        await world.profiles({"person-3": {"traits.last_name": "FIXED"}})
        await world.eventually(lambda: _last_name(world, "person-3", "FIXED"))
        fixed, _ = await runs.start_backfill("sf", bulk=True)
        await world.eventually(lambda: _state(world, fixed, "succeeded"))
        run = (await world.store.get(RUNS, fixed)).doc
        assert (run["created"], run["unchanged"], run["dead_lettered"]) == (1, 39, 0)
        assert [r.doc async for r in world.store.scan_all(DEAD_LETTERS)] == []
        assert emulator.find("Contact", "CDP_Id__c", "person-3")["LastName"] == "FIXED"


async def _last_name(world, person: str, name: str) -> bool:
    record = await world.store.get("crm_persons", person)
    return record is not None and record.doc["fields"].get("traits.last_name") == name


async def _persons(world, n: int) -> bool:
    return await world.store.count("crm_persons") == n


class HeldJobs:
    """The local Salesforce's Bulk API jobs from the `held_from`-th on wait for `release` before their rows
    are applied: a backfill is then stopped (or killed) while one of its jobs runs."""

    def __init__(self, monkeypatch, held_from: int) -> None:
        self.release = asyncio.Event()
        self.started = 0
        self.held: list[str] = []
        self.held_from = held_from
        original = bulk.process

        async def process(job, write_row, stamp):
            self.started += 1
            if self.started >= self.held_from:
                self.held.append(job.id)
                await self.release.wait()
            await original(job, write_row, stamp)

        monkeypatch.setattr(bulk, "process", process)


def _rows_sent(emulator) -> Counter:
    """How often each person's row reached the local Salesforce, over every ingest job."""
    sent: Counter = Counter()
    for job in emulator.jobs.values():
        at = job.columns.index("CDP_Id__c") if job.columns else None
        for row in job.successful + job.failed:
            sent[row[at + 2]] += 1
        for row in job.unprocessed:
            sent[row[at]] += 1
    return sent


async def _stopped_mid_job(world_factory, emulator, monkeypatch, persons):
    """A bulk backfill of `persons` in pages of 10 (two partitions: two jobs a page), stopped while the
    second page's first job runs; its run id."""
    world = await world_factory(emulator)
    env = {"SF_ID": emulator.client_id, "SF_SECRET": emulator.client_secret}
    await world.start(_salesforce_document(emulator), env=env)
    await world.profiles({p: {"traits.email": f"{p}@example.com", "traits.last_name": p.upper()} for p in persons})
    await world.eventually(lambda: _persons(world, len(persons)))
    held = HeldJobs(monkeypatch, held_from=3)
    runs = Runs(world.logic, partitions=world.partitions, bulk_page=10)
    run_id, _ = await runs.start_backfill("sf", bulk=True)
    await world.eventually(lambda: _polling(world, run_id, held.held))
    await runs.close()  # the connector stops mid-job
    held.release.set()
    await emulator.drain_jobs()  # the stopped job's rows are applied all the same, as Salesforce would
    return world, run_id


async def _polling(world, run_id: str, jobs: list[str]) -> bool:
    """The backfill is polling one of `jobs` (its progress names it)."""
    return (await world.store.get(RUNS, run_id)).doc.get("bulk_job") in jobs


async def test_a_bulk_backfill_stopped_mid_job_resumes_after_its_last_finished_page(world_factory, monkeypatch):
    persons = [f"person-{i:02d}" for i in range(30)]
    async with SalesforceEmulator() as emulator:
        world, run_id = await _stopped_mid_job(world_factory, emulator, monkeypatch, persons)
        stopped = (await world.store.get(RUNS, run_id)).doc
        assert stopped["state"] == "cancelled"
        assert (stopped["processed"], stopped["after"]) == (10, "person-09")  # the first page is done

        # The connector starts again: the backfill goes on under its run id from the second page.
        again = Runs(world.logic, partitions=world.partitions, bulk_page=10)
        assert await again.resume_interrupted() == [run_id]
        await world.eventually(lambda: _state(world, run_id, "succeeded"))
        run = (await world.store.get(RUNS, run_id)).doc
        assert (run["processed"], run["total"], run["resumed"]) == (30, 30, 1)
        assert run["created"] + run["updated"] + run["unchanged"] == 30  # each person counted once
        sent = _rows_sent(emulator)
        assert all(sent[p] == 1 for p in persons[:10])  # the finished page is not sent again
        assert set(sent) == set(persons)
        contacts = [c["CDP_Id__c"] for c in emulator.records("Contact")]
        assert sorted(contacts) == persons  # every person once: no duplicate
        # Started again by hand after it finished: a new backfill, which finds nothing to write.
        second, _ = await again.start_backfill("sf", bulk=True)
        assert second != run_id
        await world.eventually(lambda: _state(world, second, "succeeded"))
        assert (await world.store.get(RUNS, second)).doc["unchanged"] == 30


async def test_a_killed_bulk_backfill_is_resumed_once_its_progress_is_stale(world_factory, monkeypatch):
    persons = [f"person-{i:02d}" for i in range(30)]
    async with SalesforceEmulator() as emulator:
        world, run_id = await _stopped_mid_job(world_factory, emulator, monkeypatch, persons)
        # A kill leaves the run as its last progress write left it: running, mid-job.
        record = await world.store.get(RUNS, run_id)
        await world.store.put(RUNS, run_id, {**record.doc, "state": "running", "error": "", "finished_at": 0.0})
        killed_at = record.doc["heartbeat"]

        now = {"t": killed_at + 5.0}
        again = Runs(world.logic, partitions=world.partitions, bulk_page=10, clock=lambda: now["t"])
        # Progress seconds old: another replica may be at it - nothing resumed, the run returned as it is.
        assert await again.resume_interrupted() == []
        same, doc = await again.start_backfill("sf", bulk=True)
        assert (same, doc["state"], doc["processed"]) == (run_id, "running", 10)
        assert not again.tasks

        now["t"] = killed_at + STALE_AFTER + 1.0  # its connector is gone
        same, doc = await again.start_backfill("sf", bulk=True)
        assert (same, doc["resumed"]) == (run_id, 1)
        await world.eventually(lambda: _state(world, run_id, "succeeded"))
        run = (await world.store.get(RUNS, run_id)).doc
        assert (run["processed"], run["created"] + run["updated"] + run["unchanged"]) == (30, 30)
        assert all(_rows_sent(emulator)[p] == 1 for p in persons[:10])
        assert sorted(c["CDP_Id__c"] for c in emulator.records("Contact")) == persons


async def test_a_stopped_backfill_starts_over_when_its_mappings_changed(world_factory, monkeypatch):
    persons = [f"person-{i:02d}" for i in range(30)]
    async with SalesforceEmulator() as emulator:
        world, run_id = await _stopped_mid_job(world_factory, emulator, monkeypatch, persons)
        document = _salesforce_document(emulator)
        document["connections"][0]["mappings"][0]["fields"]["FirstName"] = "traits.email"  # one more field
        await world.stop()
        env = {"SF_ID": emulator.client_id, "SF_SECRET": emulator.client_secret}
        await world.start(document, env=env)
        again = Runs(world.logic, partitions=world.partitions, bulk_page=10)
        assert await again.resume_interrupted() == []  # what it was writing is not what is mapped now
        fresh, _ = await again.start_backfill("sf", bulk=True)
        assert fresh != run_id
        await world.eventually(lambda: _state(world, fresh, "succeeded"))
        assert (await world.store.get(RUNS, fresh)).doc["processed"] == 30
        assert {c["FirstName"] for c in emulator.records("Contact")} == {f"{p}@example.com" for p in persons}
