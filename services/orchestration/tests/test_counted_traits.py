"""A named computed trait of kind count or sum that a person lacks reads as 0 in a journey's conditions, as
it does in a segment (segmentation since 5a21206): `computed.orders < 1` holds for someone who never
ordered. Before, a journey read it as missing, so the entry `if` below kept out exactly the people it was
written for, while the same words as a segment took them in. The kinds come from the profile service's
ListComputedTraits when a journey is saved, and are stored with each version, so a restart or another
replica compiles it the same. A real profile service computing the trait, orchestration's engine and API,
on a real nats-server."""

from __future__ import annotations

import contextlib

import grpc
import orjson

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_kit.natsserver import free_port
from cdp_kit.service import serving
from cdp_orchestration.api import OrchestrationApi
from cdp_orchestration.catalogue import Catalogues, profile_computed_traits
from cdp_orchestration.domain.view import PersonView
from cdp_orchestration.journeys import JOURNEYS, Journeys
from cdp_orchestration.state import PERSONS
from cdp_profile.__main__ import setup as profile_setup
from cdp_profile.settings import ProfileSettings

NEVER_ORDERED = {
    "id": "first-order",
    "version": 1,
    "name": "First order nudge",
    "priority": 10,
    "category": "lifecycle",
    "timezone": "UTC",
    "entry": {"event": "Visited", "if": "computed.orders < 1"},
    "nodes": [{"id": "later", "type": "delay", "duration": "30d"}],
}


@contextlib.asynccontextmanager
async def profile_service(nats_server, tmp_path, partitions: int):
    settings = ProfileSettings(
        nats_url=nats_server.url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        auth_mode="none",
        partitions=partitions,
        shutdown_grace=1.0,
        store_url=f"sqlite:///{tmp_path / 'profile.db'}",
        identity_address=f"127.0.0.1:{free_port()}",  # LookupProfile only; not asked here
    )
    async with serving(settings, profile_setup) as runtime:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
            yield channel


async def instances_of(world, person: str) -> list[dict]:
    return [i for i in await world.instances(person) if i["journey_id"] == "first-order"]


async def test_a_count_trait_a_person_lacks_reads_as_zero_in_a_journey_s_entry_if(world_factory, nats_server, tmp_path):
    world = await world_factory()
    async with profile_service(nats_server, tmp_path, partitions=2) as channel:
        profiles = profile_pb2_grpc.ProfileServiceStub(channel)
        orders = profile_pb2.ComputedTraitDefinition(name="orders", op="count", event_names=["Order Completed"])
        await profiles.DefineComputedTrait(profile_pb2.DefineComputedTraitRequest(definition=orders))

        api = OrchestrationApi(
            journeys=world.journeys,
            store=world.store,
            bus=None,
            partitions=2,
            catalogues=Catalogues(None, profile_computed_traits(channel, "")),
        )
        definition = pb.JourneyDefinition(json=orjson.dumps(NEVER_ORDERED).decode())
        await api.CreateJourney(pb.CreateJourneyRequest(definition=definition), None)
        await api.PublishJourney(pb.PublishJourneyRequest(journey_id="first-order"), None)
        await world.start()

        # bob ordered twice: the profile service counts them and tells orchestration.
        await world.events("bob", [("Order Completed", "o-1", {}), ("Order Completed", "o-2", {})], profiled=False)

        async def counted() -> bool:
            stored = await world.store.get(PERSONS, "bob")
            return stored is not None and stored.doc["fields"].get("computed.orders") == 2

        await world.eventually(counted)
        # ada never ordered: she has no computed.orders at all, which is 0 orders.
        await world.event("ada", "Visited", "v-ada", profiled=False)
        await world.event("bob", "Visited", "v-bob", profiled=False)
        await world.eventually(lambda: instances_of(world, "ada"))

        async def bob_refused() -> list[dict]:
            return [d for d in await world.decisions("bob") if d["kind"] == "not_entered"]

        [refused] = await world.eventually(bob_refused)
        assert refused["journey_id"] == "first-order" and refused["rule"] == "entry_if"
        assert await instances_of(world, "bob") == []

    # Stored with the version: a restart or another replica, with no profile service to ask, reads it the same.
    stored = await world.store.get(JOURNEYS, "first-order")
    assert stored.doc["counted"] == {"1": ["computed.orders"]}
    other = Journeys(world.store)
    await other.load()
    loaded = other.version("first-order", 1)
    assert loaded is not None and loaded.counted == frozenset({"computed.orders"})
    assert loaded.entry.condition.holds(PersonView("cy", {}), world.now())
    assert not loaded.entry.condition.holds(PersonView("cy", {"computed.orders": 2.0}), world.now())


async def test_a_version_stored_without_its_counted_traits_reads_them_as_missing_as_before(world_factory):
    # An earlier release stored no `counted`: its versions keep the meaning they went live with.
    world = await world_factory()
    await world.publish_journey(NEVER_ORDERED)
    stored = await world.store.get(JOURNEYS, "first-order")
    assert "counted" in stored.doc and stored.doc["counted"] == {}  # saved without a profile service to ask
    old = {k: v for k, v in stored.doc.items() if k not in ("counted", "draft_counted")}
    await world.store.put(JOURNEYS, "first-order", old)
    journeys = Journeys(world.store)
    await journeys.load()
    loaded = journeys.version("first-order", 1)
    assert loaded is not None and loaded.counted == frozenset()
    assert not loaded.entry.condition.holds(PersonView("cy", {}), world.now())
    assert loaded.entry.condition.holds(PersonView("cy", {"computed.orders": 0.0}), world.now())
