"""The 2 a.m. cart story through the bus: what identity, profile and segmentation publish goes in; actions,
timers and decisions come out, on a real nats-server and a real store."""

from __future__ import annotations

import asyncio
import collections
import time
from datetime import UTC, datetime, timedelta

import orjson

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_orchestration.api import OrchestrationApi
from cdp_orchestration.domain.rules import parse_rules
from cdp_orchestration.state import STATS

CART = {
    "id": "abandoned-cart",
    "version": 1,
    "name": "Abandoned cart",
    "priority": 50,
    "category": "reminder",
    "timezone": "UTC",
    "entry": {"event": "Cart Abandoned"},
    "reentry": "always",
    "exit": [{"id": "purchased", "event": "Order Completed"}],
    "goal": {"event": "Order Completed", "within": "3d"},
    "nodes": [
        {"id": "wait", "type": "delay", "duration": "1s", "next": "remind"},
        {
            "id": "remind",
            "type": "action",
            "channel": "email",
            "purpose": "Marketing",
            "category": "reminder",
            "template": {"subject": "{{ traits.first_name }}, your cart is waiting", "body": "{{ entry.cart_url }}"},
        },
    ],
}


def _without_delay() -> dict:
    return {**CART, "nodes": [{**CART["nodes"][1]}]}


async def test_the_reminder_leaves_seconds_after_the_cart_is_abandoned(world_factory):
    world = await world_factory()
    await world.publish_journey(CART)
    await world.start()
    await world.profile("ada", consent={"purpose:Marketing": True}, first_name="Ada", email="ada@example.com")
    await world.event("ada", "Cart Abandoned", "e-cart-1", cart_url="https://shop.example/cart/1")

    [action] = await world.eventually(world.actions)
    assert action.channel == "email" and action.person_id == "ada" and action.journey_id == "abandoned-cart"
    assert action.content["subject"] == "Ada, your cart is waiting"
    assert action.content["body"] == "https://shop.example/cart/1"
    assert action.address["email"] == "ada@example.com"
    kinds = [d["kind"] for d in await world.decisions("ada")]
    assert kinds == ["sent"]
    [instance] = await world.eventually(lambda: _ended(world, "ada"))
    assert instance["end_reason"] == "completed"


async def test_a_purchase_in_the_same_batch_as_the_cart_event_ends_the_journey_and_counts_as_converted(world_factory):
    world = await world_factory()
    await world.publish_journey({**CART, "nodes": [{**CART["nodes"][0], "duration": "3s"}, CART["nodes"][1]]})
    await world.start()
    await world.profile("cy", consent={"purpose:Marketing": True}, first_name="Cy", email="cy@example.com")
    await world.events(
        "cy", [("Cart Abandoned", "e-cart-cy", {"cart_url": "u"}), ("Order Completed", "e-order-cy", {})]
    )

    [instance] = await world.eventually(lambda: _ended(world, "cy"))
    assert instance["end_reason"] == "exit_rule:purchased"
    assert instance["converted_at"] is not None
    stats = await world.eventually(lambda: _stats(world, "abandoned-cart"))
    assert stats["converted"] == 1 and stats["ended"] == {"exit_rule:purchased": 1}


async def _stats(world, journey_id):
    docs = [r.doc async for r in world.store.scan_all(STATS) if r.key.startswith(f"{journey_id}:")]
    return docs[0] if docs and docs[0]["ended"] else None


async def test_the_action_names_the_person_as_identity_knows_them_for_its_outcome_events(world_factory):
    world = await world_factory()
    await world.publish_journey(_without_delay())
    await world.start()
    for person in ("ada", "anon"):
        await world.profile(person, consent={"purpose:Marketing": True}, first_name="X", email=f"{person}@example.com")
    await world.event("ada", "Page Viewed", "e-page-ada", anonymous_id="visitor-7")
    await world.event("ada", "Cart Abandoned", "e-cart-ada", user_id="ada-42", anonymous_id="visitor-7", cart_url="u")
    await world.event("anon", "Cart Abandoned", "e-cart-anon", anonymous_id="visitor-9", cart_url="u")

    actions = await world.eventually(lambda: _two(world))
    by_person = {a.person_id: dict(a.address) for a in actions}
    assert by_person["ada"] == {"email": "ada@example.com", "user_id": "ada-42"}
    assert by_person["anon"] == {"email": "anon@example.com", "anonymous_id": "visitor-9"}


async def _two(world):
    actions = await world.actions()
    return actions if len(actions) == 2 else None


async def _ended(world, person):
    return [i for i in await world.instances(person) if i["status"] == "ended"]


async def test_a_purchase_during_the_delay_exits_at_once_and_no_reminder_is_sent(world_factory):
    world = await world_factory()
    await world.publish_journey({**CART, "nodes": [{**CART["nodes"][0], "duration": "3s"}, CART["nodes"][1]]})
    await world.start()
    await world.profile("bob", consent={"purpose:Marketing": True}, first_name="Bob", email="bob@example.com")
    await world.event("bob", "Cart Abandoned", "e-cart-2", cart_url="u")
    await world.eventually(lambda: world.instances("bob"))
    await world.event("bob", "Order Completed", "e-order-2")

    [instance] = await world.eventually(lambda: _ended(world, "bob"))
    assert instance["end_reason"] == "exit_rule:purchased"
    assert instance["converted_at"] is not None  # the purchase is the journey's goal, too
    await asyncio.sleep(4)  # past the delay: its timer was cancelled (and would be ignored anyway)
    await world.eventually(world.settled)  # and whatever was due by then is applied
    assert await world.actions() == []
    assert await world.decisions("bob") == []


async def test_quiet_hours_defer_through_a_durable_timer_and_a_purchase_withdraws_the_held_reminder(world_factory):
    # Quiet hours end at 08:00 UTC. Everything the engine is to apply before then is in its input stream
    # before it starts, and its clock is set from there: the last of it reads 07:59:59, whenever the
    # machine got round to storing it. So each cart is held, dan's purchase comes before the timer that
    # releases the held reminders, and no stall of the machine can move either past 08:00.
    tomorrow = datetime.now(UTC).date() + timedelta(days=1)
    eight = datetime(tomorrow.year, tomorrow.month, tomorrow.day, 8, tzinfo=UTC).timestamp()
    rules = parse_rules({"quiet_hours": {"from": "21:00", "to": "08:00"}})
    world = await world_factory(rules=rules, clock_offset=eight - 60 - time.time())
    await world.publish_journey(_without_delay())
    inputs = 0

    async def then(*publish) -> float:  # each one stored before the next is published: one order
        nonlocal inputs
        for one in publish:
            await one
            inputs += 1
            last = await world.stored(inputs)
        return last

    for person in ("cleo", "dan"):
        await then(
            world.profile(
                person, consent={"purpose:Marketing": True}, first_name=person, email=f"{person}@example.com"
            ),
            world.event(person, "Cart Abandoned", f"e-cart-{person}", profiled=False, cart_url="u"),
            world.profile_applied(person, [f"e-cart-{person}"]),
        )
    # After dan's cart and its profile change: the engine holds the reminder before it reads the purchase.
    last = await then(
        world.event("dan", "Order Completed", "e-order-dan", profiled=False),
        world.profile_applied("dan", ["e-order-dan"]),
    )
    world.clock_offset = eight - 1 - last
    await world.start()

    for person in ("cleo", "dan"):
        decisions = await world.eventually(lambda p=person: world.decisions(p))
        assert decisions[0]["kind"] == "deferred"
        assert "quiet hours" in decisions[0]["reason"] and "08:00" in decisions[0]["reason"]

    [action] = await world.eventually(world.actions, timeout=15)
    assert action.person_id == "cleo"
    assert [d["kind"] for d in await world.decisions("cleo")] == ["deferred", "sent"]
    [dan] = await world.eventually(lambda: _ended(world, "dan"))
    assert dan["end_reason"] == "exit_rule:purchased"
    await world.eventually(world.settled)  # every timer due fired and was applied: nothing more is coming
    assert [d["kind"] for d in await world.decisions("dan")] == ["deferred", "withdrawn"]
    assert len(await world.actions()) == 1
    # The journey's counters see every decision, the withdrawal of an instance that ended included.
    decisions: collections.Counter = collections.Counter()
    async for record in world.store.scan_all("orchestration_stats"):
        decisions.update(record.doc["decisions"])
    assert decisions == {"deferred": 2, "sent": 1, "withdrawn": 1}


async def test_a_reminder_whose_template_reads_a_missing_field_is_not_sent_with_a_blank(world_factory):
    world = await world_factory()
    await world.publish_journey(_without_delay())
    await world.start()
    await world.profile("eve", consent={"purpose:Marketing": True}, email="eve@example.com")  # no first_name
    await world.event("eve", "Cart Abandoned", "e-cart-eve", cart_url="u")

    [decision] = await world.eventually(lambda: world.decisions("eve"))
    assert decision["kind"] == "failed"
    assert "traits.first_name" in decision["reason"] and "eve@example.com" not in decision["reason"]
    await world.eventually(world.settled)  # what the decision's batch published is stored
    assert await world.actions() == []


async def test_a_reminder_to_a_person_without_an_address_fails_naming_the_field_and_is_not_sent(world_factory):
    # Sent with no address, the channel could only refuse it (`invalid_address`) while decisions and the
    # journey's counters said "sent" (a marketer trial's push to people without a push token).
    world = await world_factory()
    await world.publish_journey(_without_delay())
    await world.start()
    await world.profile("gus", consent={"purpose:Marketing": True}, first_name="Gus")  # no email
    await world.event("gus", "Cart Abandoned", "e-cart-gus", cart_url="u")

    [decision] = await world.eventually(lambda: world.decisions("gus"))
    assert decision["kind"] == "failed" and "traits.email" in decision["reason"]
    await world.eventually(world.settled)  # what the decision's batch published is stored
    assert await world.actions() == []
    decisions: collections.Counter = collections.Counter()
    async for stored in world.store.scan_all("orchestration_stats"):
        decisions.update(stored.doc["decisions"])
    assert decisions == {"failed": 1}


async def test_a_deleted_profile_ends_its_instances_and_leaves_nothing_of_it_here(world_factory):
    world = await world_factory()
    await world.publish_journey({**CART, "nodes": [{**CART["nodes"][0], "duration": "1h"}, CART["nodes"][1]]})
    await world.start()
    await world.profile("fay", consent={"purpose:Marketing": True}, first_name="Fay", email="fay@example.com")
    await world.event("fay", "Cart Abandoned", "e-cart-fay", cart_url="u")
    await world.eventually(lambda: world.instances("fay"))
    await world.profile("fay", removed=True)

    [instance] = await world.eventually(lambda: _ended(world, "fay"))
    assert instance["end_reason"] == "profile_removed"
    stored = (await world.store.get("orchestration_persons", "fay")).doc
    assert stored["fields"] == {} and stored.get("live", []) == []  # a record leaves out what is empty


async def test_a_held_reminder_is_rendered_from_the_version_that_proposed_it(world_factory):
    # v1 proposes the reminder, held while the profile catches up with the cart (its change not there yet);
    # meanwhile v2 is published and the instance mapped to it by node id. Then the change comes at 07:59:59:
    # quiet hours defer the reminder to 08:00, when it is sent as v1 wrote it. The clock is the engine's, set
    # from the change as stored while the engine was stopped: nothing the test does has to beat a timer.
    tomorrow = datetime.now(UTC).date() + timedelta(days=1)
    eight = datetime(tomorrow.year, tomorrow.month, tomorrow.day, 8, tzinfo=UTC).timestamp()
    rules = parse_rules({"quiet_hours": {"from": "21:00", "to": "08:00"}})
    world = await world_factory(rules=rules, clock_offset=eight - 300 - time.time())  # 07:55, quiet hours
    await world.start()
    api = OrchestrationApi(journeys=world.journeys, store=world.store, bus=world.bus, partitions=2)
    first = _without_delay()
    await api.CreateJourney(pb.CreateJourneyRequest(definition=_definition(first)), None)
    await api.PublishJourney(pb.PublishJourneyRequest(journey_id="abandoned-cart"), None)
    await world.profile("gus", consent={"purpose:Marketing": True}, first_name="Gus", email="gus@example.com")
    await world.event("gus", "Cart Abandoned", "e-cart-gus", profiled=False, cart_url="u")
    [held] = await world.eventually(lambda: _held_for_the_profile(world, "gus"))
    assert held["action"]["journey_version"] == 1 and await world.decisions("gus") == []

    template = {"subject": "v2 for {{ traits.first_name }}", "body": "{{ entry.cart_url }}"}
    second = {**first, "version": 2, "nodes": [{**first["nodes"][0], "template": template}]}
    await api.UpdateJourney(pb.UpdateJourneyRequest(journey_id="abandoned-cart", definition=_definition(second)), None)
    await api.PublishJourney(
        pb.PublishJourneyRequest(journey_id="abandoned-cart", migration=pb.MIGRATION_MAP_BY_NODE_ID), None
    )
    await world.eventually(lambda: _on_version(world, "gus", 2))
    await world.stop()
    inputs = len(await world.inputs())
    await world.profile_applied("gus", ["e-cart-gus"])
    world.clock_offset = eight - 1 - await world.stored(inputs + 1)
    await world.start()

    [action] = await world.eventually(world.actions, timeout=15)
    assert action.journey_version == 1 and action.content["subject"] == "Gus, your cart is waiting"
    deferred, sent = await world.decisions("gus")
    assert (deferred["kind"], sent["kind"]) == ("deferred", "sent")
    assert "quiet hours" in deferred["reason"] and "08:00" in deferred["reason"]


async def _held_for_the_profile(world, person):
    stored = await world.store.get("orchestration_persons", person)
    return (
        [h for h in stored.doc["arbiter"]["deferred"] if h.get("profile")] if stored and "arbiter" in stored.doc else []
    )


async def _on_version(world, person, version):
    return [i for i in await world.instances(person) if i["version"] == version]


def _definition(document: dict) -> pb.JourneyDefinition:
    return pb.JourneyDefinition(json=orjson.dumps(document).decode())
