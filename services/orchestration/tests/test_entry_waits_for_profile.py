"""An event entry's `if` reading a trait the same event sets: the event reaches orchestration (from
`events.resolved`) a moment before the profile's change for it, so the condition used to be evaluated on the
profile as it was before the event, and a person upgrading to "pro" was not entered into the journey for
people who upgraded to "pro". Now an entry whose condition is false while the person's fields lag behind
this very event is checked again when the profile's change for it arrives. On a real nats-server."""

from __future__ import annotations

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_orchestration.api import OrchestrationApi
from cdp_orchestration.journeys import Journeys

PRO = {
    "id": "pro",
    "version": 1,
    "name": "Welcome to pro",
    "priority": 10,
    "category": "lifecycle",
    "timezone": "UTC",
    "entry": {"event": "Plan Changed", "if": 'traits.plan = "pro"'},
    "nodes": [{"id": "later", "type": "delay", "duration": "30d"}],
}
MARKER = {**PRO, "id": "marker", "entry": {"event": "Ping"}}


async def started(world, person: str, journey_id: str) -> int:
    return len([i for i in await world.instances(person) if i["journey_id"] == journey_id])


async def test_an_entry_condition_on_a_trait_the_event_sets_reads_the_profile_with_the_event(world_factory):
    world = await world_factory()
    await world.publish_journey(PRO)
    await world.start()
    await world.profile("eve", plan="free")
    # The event first, its profile change (plan now "pro") a moment later, as the sources interleave.
    await world.event("eve", "Plan Changed", "pc-1", profiled=False, to="pro")
    await world.profile_applied("eve", ["pc-1"], plan="pro")
    assert await world.eventually(lambda: started(world, "eve", "pro")) == 1


async def test_an_entry_still_false_with_the_events_change_is_recorded_as_not_entered(world_factory):
    world = await world_factory()
    await world.publish_journey(PRO)
    await world.publish_journey(MARKER)
    await world.start()
    await world.profile("fay", plan="free")
    await world.event("fay", "Plan Changed", "pc-2", profiled=False, to="team")
    await world.profile_applied("fay", ["pc-2"], plan="team")
    await world.event("fay", "Ping", "ping")
    await world.eventually(lambda: started(world, "fay", "marker"))
    api = OrchestrationApi(journeys=Journeys(world.store), store=world.store, bus=None, partitions=2)
    request = pb.ListDecisionsRequest(person_id="fay", journey_id="pro")

    # The change for pc-2 decides the parked entry. The server sources it into ORCHESTRATION from PROFILES,
    # and Ping from EVENTS_RESOLVED: two sources, nothing orders the change before Ping, so the marker's
    # start does not say the decision is made.
    async def decided() -> list:
        return list((await api.ListDecisions(request, None)).decisions)

    [refused] = await world.eventually(decided)
    assert await started(world, "fay", "pro") == 0
    assert (refused.kind, refused.rule) == (pb.DECISION_KIND_NOT_ENTERED, "entry_if")
    assert 'entry condition `traits.plan = "pro"` was false' in refused.reason
