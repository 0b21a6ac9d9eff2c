"""The profile service not answering (UNAVAILABLE, DEADLINE_EXCEEDED: far behind under load, restarting)
costs the connector time, never a duplicate CRM record nor a whole backfill. A real gRPC stand-in of its
BatchGetProfiles that fails while told to, the local CRM emulators, a real nats-server."""

from __future__ import annotations

import contextlib
from collections import Counter

import grpc
import pytest

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_crm import runs as runs_module
from cdp_crm.domain.coalesce import record_key
from cdp_crm.people import PROFILE_COLLECTION, ProfileDirectory, profile_fetch, profile_identifiers
from cdp_crm.runs import Runs
from cdp_crm.state import PENDING, RUNS
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_kit.storage import Put, open_store

from .conftest import TOKEN


class ProfileService(profile_pb2_grpc.ProfileServiceServicer):
    """BatchGetProfiles over people given as flat traits and identifiers. `fail`: the calls (counted from 1)
    answered with `code` instead; `failing`: every call answered so while it is set."""

    def __init__(self, traits=None, identifiers=None, *, code=grpc.StatusCode.UNAVAILABLE, fail=()) -> None:
        self.traits: dict[str, dict[str, str]] = traits or {}
        self.identifiers: dict[str, list[str]] = identifiers or {}
        self.code = code
        self.fail = set(fail)
        self.failing = False
        self.calls = 0
        self.failed = 0
        self.asked: Counter[str] = Counter()  # person -> calls answered with them

    async def BatchGetProfiles(self, request, context):
        self.calls += 1
        if self.failing or self.calls in self.fail:
            self.failed += 1
            await context.abort(self.code, "the profile service is far behind")
        answer = profile_pb2.BatchGetProfilesResponse()
        for person in request.person_ids:
            if person not in self.traits and person not in self.identifiers:
                answer.missing.append(person)
                continue
            self.asked[person] += 1
            profile = answer.profiles.add(person_id=person)
            profile.identifiers.extend(self.identifiers.get(person, []))
            for name, value in self.traits.get(person, {}).items():
                profile.traits[name].value.string_value = value
        return answer


class Served:
    def __init__(self, service: ProfileService) -> None:
        self.service = service

    async def __aenter__(self) -> grpc.aio.Channel:
        self.server = grpc.aio.server()
        profile_pb2_grpc.add_ProfileServiceServicer_to_server(self.service, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        return self.channel

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()
        await self.server.stop(None)


async def _make_contact(world, emulator, **properties: str) -> str:
    """A contact a CRM user makes in HubSpot (it comes in as news; identity makes a person of it)."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    url = f"{emulator.base_url}/crm/v3/objects/contacts"
    async with world.session.post(url, json={"properties": properties}, headers=headers) as answer:
        return (await answer.json())["id"]


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
async def test_a_crm_made_contact_is_not_duplicated_while_profile_does_not_answer(world_factory, code):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        # A rep makes Ada's contact without her email (HubSpot would refuse a second contact holding it).
        contact_id = await _make_contact(world, emulator, firstname="Ada", lastname="Lovelace")
        service = ProfileService(
            identifiers={"person-ada": ["email:ada@example.com", f"anonymous_id:hubspot:62515:{contact_id}"]},
            code=code,
        )
        async with Served(service) as channel:
            await world.start(identifiers=profile_identifiers(channel, "token", timeout=5.0))
            await world.profiles({"person-bo": {"traits.email": "bo@example.com", "traits.first_name": "Bo"}})
            await world.eventually(lambda: emulator.find("contacts", "cdp_id", "person-bo"))

            service.failing = True  # profile far behind: its calls end DEADLINE_EXCEEDED, or it restarts
            await world.profiles({"person-ada": {"traits.email": "ada@example.com", "traits.first_name": "Ada"}})
            await world.profiles({"person-bo": {"traits.first_name": "Bob"}})

            # Bo's record, written before, goes on; Ada's waits, queued, while profile cannot name her contact.
            def bob() -> bool:
                return emulator.find("contacts", "cdp_id", "person-bo")["properties"].get("firstname") == "Bob"

            await world.eventually(bob)
            key = record_key("hs/contacts", (("cdp_id", "person-ada"),))

            async def queued() -> bool:
                if emulator.find("contacts", "cdp_id", "person-ada"):
                    return True  # written all the same: the asserts below say how
                return await world.store.get(PENDING, key) is not None and service.failed >= 2  # asked again

            await world.eventually(queued)
            ada = [c["id"] for c in emulator.records("contacts") if c["properties"].get("cdp_id") != "person-bo"]
            assert ada == [contact_id]  # no second record of her
            assert emulator.find("contacts", "cdp_id", "person-ada") is None

            service.failing = False  # profile answers: her change is written to her contact, once
            await world.eventually(lambda: emulator.find("contacts", "cdp_id", "person-ada"))

            async def settled() -> bool:
                return await world.store.get(PENDING, key) is None

            await world.eventually(settled)
        ada = [c for c in emulator.records("contacts") if c["properties"].get("cdp_id") != "person-bo"]
        assert [c["id"] for c in ada] == [contact_id]
        assert ada[0]["properties"]["cdp_id"] == "person-ada" and ada[0]["properties"]["email"] == "ada@example.com"
        assert len(emulator.records("contacts")) == 2  # Ada's and Bo's


@contextlib.asynccontextmanager
async def _profiles(world, tmp_path, service: ProfileService):
    """Backfills of the connector over the profile service's people: its store listing them, its
    BatchGetProfiles answering as `service` does (asked again 0.1 s after it did not answer)."""
    profiles = open_store(f"sqlite:///{tmp_path}/profile.db")
    try:
        await profiles.bulk_write([Put(PROFILE_COLLECTION, p, {"profile": "{}"}) for p in service.traits])
        async with Served(service) as channel:
            fetch = profile_fetch(channel, "token", timeout=5.0, retry_after=0.1)
            backfills = Runs(
                world.logic, partitions=world.partitions, people=ProfileDirectory(profiles, fetch, world.store)
            )
            try:
                yield backfills
            finally:
                await backfills.close()
    finally:
        await profiles.close()


async def _state(world, run_id: str, *states: str) -> bool:
    record = await world.store.get(RUNS, run_id)
    return record is not None and record.doc["state"] in states


@pytest.fixture
def paged(monkeypatch):
    monkeypatch.setattr(runs_module, "PAGE", 5)


EVERYONE = {f"person-{i:02d}": {"email": f"p{i}@example.com", "first_name": f"P{i}"} for i in range(20)}


async def test_a_backfill_asks_a_page_again_when_profile_did_not_answer_it(world_factory, tmp_path, paged, caplog):
    # The second, third and fifth BatchGetProfiles calls are not answered: page 2 twice, page 3 once.
    service = ProfileService(dict(EVERYONE), fail={2, 3, 5})
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start()
        async with _profiles(world, tmp_path, service) as backfills:
            run_id, _ = await backfills.start_backfill("hs")
            await world.eventually(lambda: _state(world, run_id, "succeeded", "failed", "cancelled"))
        run = (await world.store.get(RUNS, run_id)).doc
        assert run["state"] == "succeeded", run
        assert (run["processed"], run["created"]) == (20, 20)
        assert service.failed == 3
        contacts = Counter(r["properties"]["cdp_id"] for r in emulator.records("contacts"))
        assert contacts == Counter(dict.fromkeys(EVERYONE, 1))  # every person written, once
        waits = [r for r in caplog.records if r.name == "cdp.crm.runs" and r.levelname == "WARNING"]
        assert waits and all(r.run == run_id for r in waits)
        assert not [r for r in caplog.records if r.name == "cdp.crm.runs" and r.levelname == "ERROR"]
        logged = " ".join(f"{r.getMessage()} {r.__dict__}" for r in waits)
        assert "example.com" not in logged  # the page's place, never its people's values


async def test_a_backfill_profile_stops_answering_is_left_to_resume_where_it_got(world_factory, tmp_path, paged):
    service = ProfileService(dict(EVERYONE))
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start()
        async with _profiles(world, tmp_path, service) as backfills:
            service.fail = set(range(3, 1000))  # two pages answered, then nothing
            run_id, _ = await backfills.start_backfill("hs")
            await world.eventually(lambda: _state(world, run_id, "succeeded", "failed", "cancelled"), timeout=30.0)
            stopped = (await world.store.get(RUNS, run_id)).doc
            assert stopped["state"] == "cancelled", stopped  # resumable, not failed
            assert stopped["error"].startswith("page 3 not answered after 12 tries")  # what GetRun shows
            assert (stopped["processed"], stopped["after"]) == (10, "person-09")

            service.fail = set()  # profile answers again: the run goes on from the third page
            assert await backfills.resume_interrupted() == [run_id]
            await world.eventually(lambda: _state(world, run_id, "succeeded", "failed", "cancelled"))
        run = (await world.store.get(RUNS, run_id)).doc
        assert (run["state"], run["processed"], run["created"], run["resumed"]) == ("succeeded", 20, 20, 1)
        assert all(service.asked[p] == 1 for p in EVERYONE)  # no page read twice
        contacts = Counter(r["properties"]["cdp_id"] for r in emulator.records("contacts"))
        assert contacts == Counter(dict.fromkeys(EVERYONE, 1))


async def test_a_backfill_whose_page_profile_refuses_still_fails(world_factory, tmp_path, paged):
    service = ProfileService(dict(EVERYONE), code=grpc.StatusCode.PERMISSION_DENIED, fail={2})
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start()
        async with _profiles(world, tmp_path, service) as backfills:
            run_id, _ = await backfills.start_backfill("hs")
            await world.eventually(lambda: _state(world, run_id, "succeeded", "failed", "cancelled"))
        run = (await world.store.get(RUNS, run_id)).doc
        assert run["state"] == "failed" and service.failed == 1
        assert await backfills.resume_interrupted() == []  # asking again will not help
