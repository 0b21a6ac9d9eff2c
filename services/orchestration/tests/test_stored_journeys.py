"""What the engine does with a template that breaks only when it runs, and with a stored journey that an
upgrade's validation now refuses: the one action, or the one journey, fails; everything else carries on."""

from __future__ import annotations

import asyncio
import logging
import time

from cdp_orchestration.journeys import JOURNEYS

CART = {
    "id": "abandoned-cart",
    "version": 1,
    "name": "Abandoned cart",
    "priority": 50,
    "category": "reminder",
    "timezone": "UTC",
    "entry": {"event": "Cart Abandoned"},
    "reentry": "always",
    "nodes": [
        {
            "id": "remind",
            "type": "action",
            "channel": "email",
            "purpose": "Marketing",
            "category": "reminder",
            "template": {"subject": "{{ traits.first_name }}, your cart", "body": "{{ entry.cart_url }}"},
        },
    ],
}


def _with_body(journey_id: str, event: str, body: str) -> dict:
    node = {**CART["nodes"][0], "template": {"subject": "Hi", "body": body}}
    return {**CART, "id": journey_id, "entry": {"event": event}, "nodes": [node]}


async def test_a_template_failing_at_send_fails_that_action_naming_the_part(world_factory):
    # 100 // 0 for a three-letter name, a number for any other: only Ada's action can fail
    world = await world_factory()
    await world.publish_journey(_with_body("cart", "Cart Abandoned", "{{ 100 // (traits.first_name | length - 3) }}"))
    await world.start()
    for person, name in (("ada", "Ada"), ("cleo", "Cleo")):
        await world.profile(person, consent={"purpose:Marketing": True}, first_name=name, email=f"{person}@x.io")
    await world.event("ada", "Cart Abandoned", "e-ada")
    [decision] = await world.eventually(lambda: world.decisions("ada"))
    assert decision["kind"] == "failed"
    assert "template part 'body'" in decision["reason"] and "ZeroDivisionError" in decision["reason"]
    assert "Ada" not in decision["reason"]

    await world.event("cleo", "Cart Abandoned", "e-cleo")
    [action] = await world.eventually(world.actions, timeout=10)
    assert action.person_id == "cleo" and action.content["body"] == "100"
    assert [d["kind"] for d in await world.decisions("cleo")] == ["sent"]


def _stored(document: dict) -> dict:
    now = time.time()
    return {
        "state": "active",
        "versions": {"1": document},
        "draft": None,
        "name": document["name"],
        "priority": document["priority"],
        "created_at": now,
        "updated_at": now,
        "published_at": now,
    }


async def test_a_stored_journey_the_validation_now_refuses_is_kept_out_and_the_others_run(world_factory, caplog):
    world = await world_factory()
    # stored by an earlier version, before `lipsum` was refused
    await world.store.put(JOURNEYS, "old", _stored(_with_body("old", "Cart Abandoned", "{{ lipsum(1) }}")))
    await world.publish_journey(CART)
    with caplog.at_level(logging.WARNING, logger="cdp.orchestration"):
        await world.start()
        await world.journeys.load()  # ListJourneys reads them again: the problem is not logged twice
    logged = [r for r in caplog.records if "old" in r.getMessage() and "JourneyInvalid" in r.getMessage()]
    assert len(logged) == 1
    assert "lipsum" not in logged[0].getMessage()

    assert [j.id for j in world.journeys.live()] == ["abandoned-cart"]
    assert world.journeys.invalid == {("old", 1): "JourneyInvalid (field nodes.remind.template.body)"}
    assert world.journeys.records["old"].live is not None  # shown (GetJourney, ListJourneys), kept as stored

    await world.profile("ada", consent={"purpose:Marketing": True}, first_name="Ada", email="ada@x.io")
    await world.event("ada", "Cart Abandoned", "e-ada", cart_url="u")
    [action] = await world.eventually(world.actions, timeout=10)
    assert action.journey_id == "abandoned-cart"
    await asyncio.sleep(0.5)
    assert [i["journey_id"] for i in await world.instances("ada")] == ["abandoned-cart"]
