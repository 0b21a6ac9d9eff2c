"""Scheduled entry: a journey that runs on a cron for the members of a segment, each in their own zone."""

from __future__ import annotations

import orjson

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_orchestration.api import OrchestrationApi

WEEKLY_DIGEST = {
    "id": "digest",
    "version": 1,
    "name": "Digest",
    "priority": 5,
    "category": "newsletter",
    "timezone": "UTC",
    "entry": {"schedule": {"cron": "* * * * *", "segment": "vip"}},
    "reentry": "always",
    "nodes": [
        {
            "id": "send",
            "type": "action",
            "channel": "inapp",
            "purpose": "Marketing",
            "template": {"title": "This week", "body": "for {{ traits.first_name }}"},
        }
    ],
}


async def test_members_enter_at_the_slot_and_a_member_who_left_does_not(world_factory):
    # What the engine is to apply before the slot is in its input stream before it runs again, and its
    # clock is set from there: the last of it reads two seconds before the slot (a whole minute), however
    # late the machine stored it. So every member is armed, and jon has left, before the slot's timers fire.
    world = await world_factory()
    await world.start()
    for person in ("kim", "ida", "jon"):
        await world.profile(person, consent={"purpose:Marketing": True}, first_name=person)
    await world.segment("kim", "vip")  # a member before the journey is published
    await world.stop()
    inputs = len(await world.inputs())

    async def then(publish) -> float:  # stored before what comes next is published: one order
        nonlocal inputs
        await publish
        inputs += 1
        return await world.stored(inputs)

    api = OrchestrationApi(journeys=world.journeys, store=world.store, bus=world.bus, partitions=2)
    await api.CreateJourney(
        pb.CreateJourneyRequest(definition=pb.JourneyDefinition(json=orjson.dumps(WEEKLY_DIGEST).decode())), None
    )
    await then(api.PublishJourney(pb.PublishJourneyRequest(journey_id="digest"), None))  # arms kim
    await then(world.segment("ida", "vip"))  # joins after
    await then(world.segment("jon", "vip"))
    last = await then(world.segment("jon", "vip", entered=False))  # and leaves before the slot
    slot = ((last + world.clock_offset) // 60 + 2) * 60  # a whole minute ahead of what the engine read so far
    world.clock_offset = slot - 2 - last
    await world.start()

    actions = await world.eventually(lambda: _two(world), timeout=25)
    assert sorted(a.person_id for a in actions) == ["ida", "kim"]
    assert sorted(a.content["body"] for a in actions) == ["for ida", "for kim"]
    for person in ("ida", "kim"):
        [instance] = await world.instances(person)
        assert instance["entered_at"] >= slot  # at the slot, not when they joined
        stored = await world.store.get("orchestration_persons", person)
        [(_, next_slot)] = stored.doc["slots"].values()
        assert next_slot == slot + 60  # the next one is armed
    await world.eventually(world.settled)  # every timer due by now fired and was applied
    assert await world.instances("jon") == []


async def _two(world):
    actions = await world.actions()
    return actions if len(actions) >= 2 else None
