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


async def test_a_change_listing_the_event_and_moving_no_field_decides_the_parked_entry(world_factory):
    # The event's change moves nothing (the plan stays "free"): it is applied without `_handle`
    # (`OrchestrationLogic._quick`), and it still ends the fields' lag behind the event, so the parked entry
    # is decided on it, not left parked.
    world = await world_factory()
    await world.publish_journey(PRO)
    await world.start()
    await world.profile("gus", plan="free")
    await world.event("gus", "Plan Changed", "pc-3", profiled=False, to="pro")
    api = OrchestrationApi(journeys=Journeys(world.store), store=world.store, bus=None, partitions=2)
    request = pb.ListDecisionsRequest(person_id="gus", journey_id="pro")

    async def decided() -> list:
        return list((await api.ListDecisions(request, None)).decisions)

    async def event_applied() -> bool:  # before its change (sources interleave): the entry is parked
        info = await world.bus.js.stream_info("ORCHESTRATION")
        consumers = await world.bus.js.consumers_info("ORCHESTRATION")
        return info.state.messages >= 2 and all(not c.num_pending and not c.num_ack_pending for c in consumers)

    await world.eventually(event_applied)
    assert await decided() == []
    await world.profile_applied("gus", ["pc-3"])
    [refused] = await world.eventually(decided)
    assert await started(world, "gus", "pro") == 0
    assert (refused.kind, refused.rule) == (pb.DECISION_KIND_NOT_ENTERED, "entry_if")


async def test_an_event_whose_change_came_first_decides_the_entry_parked_before_it(world_factory):
    # The change listing "x-1" came before x-1 itself; the person's next event parked an entry; then x-1
    # comes: the profile applied it after the parked one (a person's events in order), so the fields cover
    # that one too and the entry is decided. x-1 starts nothing and is applied without `_handle`
    # (`OrchestrationLogic._quick`): the release is still its part.
    world = await world_factory()
    await world.publish_journey(PRO)
    await world.start()
    api = OrchestrationApi(journeys=Journeys(world.store), store=world.store, bus=None, partitions=2)
    request = pb.ListDecisionsRequest(person_id="hal", journey_id="pro")

    async def decided() -> list:
        return list((await api.ListDecisions(request, None)).decisions)

    async def applied(messages: int) -> bool:
        info = await world.bus.js.stream_info("ORCHESTRATION")
        consumers = await world.bus.js.consumers_info("ORCHESTRATION")
        return info.state.messages >= messages and all(not c.num_pending and not c.num_ack_pending for c in consumers)

    await world.profile("hal", plan="free")
    await world.profile_applied("hal", ["x-1"])
    await world.eventually(lambda: applied(2))
    await world.event("hal", "Plan Changed", "pc-5", profiled=False, to="pro")
    await world.eventually(lambda: applied(3))
    assert await decided() == []
    await world.event("hal", "Ping", "x-1", profiled=False)
    [refused] = await world.eventually(decided)
    assert (refused.kind, refused.rule) == (pb.DECISION_KIND_NOT_ENTERED, "entry_if")
