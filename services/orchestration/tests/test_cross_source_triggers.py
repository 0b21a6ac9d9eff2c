"""One event sent through two collector sources under the same messageId is two events: the collector
de-duplicates per source (its `Nats-Msg-Id` is `<source>:<messageId>`) and the profile stores and counts
both. Before, orchestration derived the instance id from the messageId alone, so the second copy found the
first one's instance, started nothing and recorded no decision (no `not_entered` either). The trigger is now
the event's `<source>:<messageId>`: each copy goes through the journey's entry rules on its own. A copy from
the same source is still the same trigger, and an instance made before (its id from the messageId alone)
is still found when the event that started it is applied again. On a real nats-server."""

from __future__ import annotations

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_orchestration.api import OrchestrationApi
from cdp_orchestration.domain.instance import instance_id
from cdp_orchestration.journeys import Journeys
from cdp_orchestration.state import INSTANCES, PERSONS

from .conftest import journey_document

WEB, IOS = "src-web", "src-ios"


def journey(journey_id: str, entry: dict, **rules) -> dict:
    return journey_document(journey_id, entry, **rules)


async def refusal(world, person: str, journey_id: str) -> pb.Decision | None:
    api = OrchestrationApi(journeys=Journeys(world.store), store=world.store, bus=None, partitions=2)
    decisions = (await api.ListDecisions(pb.ListDecisionsRequest(person_id=person), None)).decisions
    found = [d for d in decisions if d.journey_id == journey_id and d.kind == pb.DECISION_KIND_NOT_ENTERED]
    return found[0] if found else None


async def started(world, person: str, journey_id: str, count: int) -> bool:
    return len([i for i in await world.instances(person) if i["journey_id"] == journey_id]) == count


async def test_one_message_id_from_two_sources_goes_through_the_entry_rules_twice(world_factory):
    world = await world_factory()
    await world.publish_journey(journey("cart", {"event": "Cart Abandoned"}, reentry="always", max_concurrent=1))
    await world.publish_journey(journey("cart-log", {"event": "Cart Abandoned"}, reentry="always", max_concurrent=5))
    await world.start()
    await world.profile("ada", plan="free")

    await world.event("ada", "Cart Abandoned", "cart-1", source=WEB)
    await world.eventually(lambda: started(world, "ada", "cart", 1))
    await world.event("ada", "Cart Abandoned", "cart-1", source=IOS)
    # The second copy is a trigger of its own: refused by max_concurrent here, entered where it may be.
    refused = await world.eventually(lambda: refusal(world, "ada", "cart"))
    assert refused.rule == "max_concurrent"
    await world.eventually(lambda: started(world, "ada", "cart-log", 2))
    assert await started(world, "ada", "cart", 1)


async def test_a_copy_from_the_same_source_is_the_same_trigger(world_factory):
    world = await world_factory()
    await world.publish_journey(journey("cart", {"event": "Cart Abandoned"}, reentry="always", max_concurrent=5))
    await world.publish_journey(journey("visits", {"event": "Visited"}, reentry="always", max_concurrent=5))
    await world.start()
    await world.profile("ada", plan="free")

    await world.event("ada", "Cart Abandoned", "cart-1", source=WEB)
    await world.eventually(lambda: started(world, "ada", "cart", 1))
    await world.event("ada", "Cart Abandoned", "cart-1", source=WEB)
    await world.event("ada", "Visited", "v1", source=WEB)  # applied after the copy: the copy was too
    await world.eventually(lambda: started(world, "ada", "visits", 1))
    assert await started(world, "ada", "cart", 1)
    assert await refusal(world, "ada", "cart") is None


async def test_an_instance_made_before_keeps_its_id_and_its_event_applied_again_starts_no_other(world_factory):
    world = await world_factory()
    await world.publish_journey(journey("cart", {"event": "Cart Abandoned"}, reentry="always", max_concurrent=5))
    await world.publish_journey(journey("visits", {"event": "Visited"}, reentry="always", max_concurrent=5))
    await world.start()
    await world.profile("ada", plan="free")
    await world.event("ada", "Cart Abandoned", "cart-1", source=WEB)
    await world.eventually(lambda: started(world, "ada", "cart", 1))
    await world.stop()

    # As a build before this one left it: the instance's id derived from the messageId alone, and the person
    # having entered the journey at (or after) the time of the message applied again below, as a batch
    # applied but not acknowledged before a crash is.
    [made] = await world.instances("ada")
    before = instance_id("cart", "ada", "cart-1")
    await world.store.delete(INSTANCES, made["id"])
    await world.store.put(INSTANCES, before, {**made, "id": before})
    person = (await world.store.get(PERSONS, "ada")).doc
    person["live"] = [before if i == made["id"] else i for i in person["live"]]
    person["entered"] = {**person["entered"], "cart": world.now() + 3600}
    await world.store.put(PERSONS, "ada", person)

    await world.start()
    await world.event("ada", "Cart Abandoned", "cart-1", source=WEB)
    await world.event("ada", "Visited", "v1", source=WEB)
    await world.eventually(lambda: started(world, "ada", "visits", 1))
    assert [i["id"] for i in await world.instances("ada") if i["journey_id"] == "cart"] == [before]
