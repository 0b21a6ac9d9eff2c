"""Steps reached while the person's fields lag behind their events, through the engine on a real nats-server.

An SDK's identify and track of one batch: the track's resolved event reaches orchestration before the
identify's profile change (here: the event is published without its change, which follows). A `wait`
condition, a `delay` until a time of day in the person's zone, and the exit conditions checked on the
batch's next event read the person as they were before the batch; they wait for the change now.
"""

from __future__ import annotations

from typing import Any

from cdp_orchestration.domain import clock

from .conftest import journey_document


async def _instance(world, person: str, journey_id: str) -> dict[str, Any] | None:
    return next((i for i in await world.instances(person) if i["journey_id"] == journey_id), None)


def _kinds(instance: dict[str, Any]) -> list[str]:
    return sorted(kind for _id, _at, _node, kind in instance["timers"])


async def test_a_wait_at_entry_is_decided_on_the_plan_the_batchs_identify_sets(world_factory):
    trial = journey_document(
        "trial",
        {"event": "Trial Started"},
        nodes=[
            {"id": "w", "type": "wait", "condition": 'traits.plan = "pro"', "timeout": "3d", "next": "upgraded"},
            {"id": "upgraded", "type": "exit"},
        ],
    )
    world = await world_factory()
    await world.publish_journey(trial)
    await world.start()
    await world.profile("ann", plan="pro")  # an old subscription; the identify sets "trial"
    await world.event("ann", "Trial Started", "ts-ann", profiled=False)
    held = await world.eventually(lambda: _instance(world, "ann", "trial"))
    # Before, the wait was "met" at once on the plan before the batch, and the instance ended.
    assert held["status"] == "running" and held["node"] == "w" and _kinds(held) == ["fields", "timeout"]
    await world.profile_applied("ann", ["ts-ann"], plan="trial")

    async def decided() -> dict[str, Any] | None:
        instance = await _instance(world, "ann", "trial")
        return instance if instance is not None and _kinds(instance) == ["timeout"] else None

    waiting = await world.eventually(decided)
    assert waiting["status"] == "running" and waiting["node"] == "w"


async def test_a_delay_until_a_time_of_day_counts_in_the_zone_the_batchs_identify_sets(world_factory):
    morning = journey_document(
        "morning", {"event": "Signed Up"}, nodes=[{"id": "d", "type": "delay", "until": "09:00"}], timezone="UTC"
    )
    world = await world_factory()
    await world.publish_journey(morning)
    await world.start()
    await world.event("ben", "Signed Up", "su-ben", profiled=False)
    held = await world.eventually(lambda: _instance(world, "ben", "morning"))
    assert _kinds(held) == ["fields"]  # before: a delay timer at 09:00 UTC, 04:00 or 05:00 in New York
    await world.profile_applied("ben", ["su-ben"], timezone="America/New_York")

    async def scheduled() -> list | None:
        instance = await _instance(world, "ben", "morning")
        return [t for t in instance["timers"] if t[3] == "delay"] if instance is not None else None

    [[_id, at, _node, _kind]] = await world.eventually(scheduled)
    reached = held["steps"][-1][1]
    assert at == max(reached, clock.next_time_of_day(reached, 9, 0, clock.zone("America/New_York")))


async def test_the_batchs_next_event_does_not_end_an_instance_on_the_fields_before_the_batch(world_factory):
    welcome = journey_document(
        "welcome", {"event": "Signed Up"}, exit=[{"id": "no_email", "condition": "not traits.email exists"}]
    )
    marker = journey_document("marker", {"event": "Viewed Page"})
    world = await world_factory()
    await world.publish_journey(welcome)
    await world.publish_journey(marker)
    await world.start()
    # identify (the email), track "Signed Up", track "Viewed Page": both tracks before the identify's change.
    await world.events("cat", [("Signed Up", "su-cat", {}), ("Viewed Page", "vp-cat", {})], profiled=False)
    await world.eventually(lambda: _instance(world, "cat", "marker"))  # the batch is applied, "Viewed Page" too
    instance = await _instance(world, "cat", "welcome")
    # Before, "Viewed Page" ended it: exit_rule:no_email, on the fields without the email.
    assert instance is not None and instance["status"] == "running", instance and instance["end_reason"]
    await world.profile_applied("cat", ["su-cat", "vp-cat"], email="cat@example.com")

    async def caught_up() -> dict[str, Any] | None:
        instance = await _instance(world, "cat", "welcome")
        return instance if instance is not None and "recheck" not in _kinds(instance) else None

    kept = await world.eventually(caught_up)
    assert kept["status"] == "running"
