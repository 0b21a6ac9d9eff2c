"""What the engine does with a template that breaks only when it runs, and with a stored journey that an
upgrade's validation now refuses: the one action, or the one journey, fails; everything else carries on."""

from __future__ import annotations

import logging
import time

import orjson
import pytest

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.errors import FailedPrecondition
from cdp_kit.storage import open_store
from cdp_orchestration.api import OrchestrationApi
from cdp_orchestration.journeys import JOURNEYS, Journeys

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
    await world.eventually(world.settled)
    assert [i["journey_id"] for i in await world.instances("ada")] == ["abandoned-cart"]


async def test_a_running_instance_of_a_refused_version_carries_on_and_its_action_fails_naming_the_field(
    world_factory,
):
    world = await world_factory()
    waiting = {**CART, "nodes": [{"id": "wait", "type": "delay", "duration": "2s", "next": "remind"}, CART["nodes"][0]]}
    await world.publish_journey(waiting)
    await world.start()
    await world.profile("ada", consent={"purpose:Marketing": True}, first_name="Ada", email="ada@x.io")
    await world.event("ada", "Cart Abandoned", "e-ada", cart_url="u")
    await world.eventually(lambda: world.instances("ada"))
    await world.stop()

    # the upgrade: the same stored version now holds a template the validation refuses
    stored = await world.store.get(JOURNEYS, "abandoned-cart")
    refused = {**waiting["nodes"][1], "template": {"subject": "Hi", "body": "{{ lipsum(1) }}"}}
    doc = {**stored.doc, "versions": {"1": {**waiting, "nodes": [waiting["nodes"][0], refused]}}}
    await world.store.put(JOURNEYS, "abandoned-cart", doc)
    world.journeys = Journeys(world.store)
    await world.start()
    assert world.journeys.live() == []  # no new entries

    [decision] = await world.eventually(lambda: world.decisions("ada"), timeout=10)
    assert decision["kind"] == "failed"
    assert "nodes.remind.template.body" in decision["reason"] and "lipsum" not in decision["reason"]
    await world.eventually(world.settled)  # what the decision's batch published is stored
    assert await world.actions() == []


async def test_a_refused_journey_is_listed_and_its_stored_draft_is_not_published_until_fixed(tmp_path):
    async with open_store(f"sqlite:///{tmp_path}/o.db") as store:
        doc = {**_stored(_with_body("old", "Cart Abandoned", "{{ lipsum(1) }}"))}
        doc["draft"] = {**_with_body("old", "Cart Abandoned", "{{ lipsum(2) }}"), "version": 2}
        await store.put(JOURNEYS, "old", doc)
        api = OrchestrationApi(journeys=Journeys(store), store=store, bus=None, partitions=2)
        [listed] = (await api.ListJourneys(pb.ListJourneysRequest(), None)).journeys
        assert listed.id == "old" and listed.state == pb.JOURNEY_STATE_ACTIVE and listed.version == 1
        # What an operator reads in `cdpctl journey list`: which versions no longer validate, and where.
        assert listed.invalid.startswith("draft: JourneyInvalid (field nodes."), listed.invalid
        assert "; v1: JourneyInvalid (field nodes." in listed.invalid and "lipsum" not in listed.invalid
        with pytest.raises(FailedPrecondition, match=r"no longer validates \(JourneyInvalid \(field nodes"):
            await api.PublishJourney(pb.PublishJourneyRequest(journey_id="old"), None)
        fixed = {**_with_body("old", "Cart Abandoned", "{{ traits.first_name }}"), "version": 2}
        await api.UpdateJourney(pb.UpdateJourneyRequest(journey_id="old", definition=_definition(fixed)), None)
        published = await api.PublishJourney(pb.PublishJourneyRequest(journey_id="old"), None)
        assert published.version == 2
        assert [j.id for j in api.journeys.live()] == ["old"]  # back in service
        [listed] = (await api.ListJourneys(pb.ListJourneysRequest(), None)).journeys
        assert "draft" not in listed.invalid  # the fixed version validates (v1, kept for its instances, is named)


def _definition(document: dict) -> pb.JourneyDefinition:
    return pb.JourneyDefinition(json=orjson.dumps(document).decode())
