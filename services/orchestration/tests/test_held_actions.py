"""An action held until the profile applies the person's latest event has no decision yet, so it used to
show nowhere an operator looks (only in ExportPerson's `deferred`). Now ListDecisions (`cdpctl decisions`)
lists it first, as DEFERRED with the rule `profile_wait` and the time it is decided at the latest, and two
metrics say how many are held now (`cdp.orchestration.held`) and how many were decided because the wait
ran out (`cdp.orchestration.held.expired`). On a real nats-server."""

from __future__ import annotations

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_orchestration.api import OrchestrationApi
from cdp_orchestration.domain.rules import parse_rules
from cdp_orchestration.journeys import Journeys
from cdp_orchestration.state import PERSONS
from cdp_testing.metrics import MetricsCapture

CART = {
    "id": "cart",
    "version": 1,
    "name": "Cart",
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
            "template": {"subject": "Your cart", "body": "{{ entry.cart_url }}"},
        }
    ],
}


def _value(captured: MetricsCapture, name: str, **attributes) -> float | None:
    found = captured.collected().get(name)
    if found is None:
        return None
    points = [p for p in found[1] if all(p.attributes.get(k) == v for k, v in attributes.items())]
    return sum(p.value for p in points) if points else None


async def test_a_held_action_is_listed_and_counted_until_its_wait_runs_out(world_factory):
    captured = MetricsCapture("orchestration")
    world = await world_factory(rules=parse_rules({"profile_wait": "3s"}), meter=captured.telemetry.meter)
    await world.publish_journey(CART)
    await world.start()
    api = OrchestrationApi(journeys=Journeys(world.store), store=world.store, bus=None, partitions=2)

    async def listed(**filters):
        request = pb.ListDecisionsRequest(person_id="kim", **filters)
        return list((await api.ListDecisions(request, None)).decisions)

    await world.event("kim", "Cart Abandoned", "e-cart-kim", profiled=False, cart_url="u")
    [held] = await world.eventually(listed)
    assert (held.kind, held.rule, held.journey_id, held.channel) == (
        pb.DECISION_KIND_DEFERRED,
        "profile_wait",
        "cart",
        "email",
    )
    assert "waiting for the profile" in held.reason
    assert held.until.ToSeconds() > held.decided_at.ToSeconds()  # decided by then at the latest
    assert await listed(journey_id="other") == []
    assert await world.eventually(lambda: _value(captured, "cdp.orchestration.held") == 1)

    # The profile stays stopped: the wait runs out and the action is decided on what is known.
    decided = await world.eventually(lambda: _decided(world))
    assert decided["rule"] == "profile_unavailable"
    [entry] = await listed()  # the decision, no longer the held action
    assert entry.kind == pb.DECISION_KIND_NO_CONSENT and entry.rule == "profile_unavailable"
    assert _value(captured, "cdp.orchestration.held") == 0
    assert _value(captured, "cdp.orchestration.held.expired", kind="no_consent") == 1


async def _decided(world):
    decisions = await world.decisions("kim")
    return decisions[0] if decisions else None


async def test_an_action_released_by_the_profile_is_not_counted_as_held_too_long(world_factory):
    captured = MetricsCapture("orchestration")
    world = await world_factory(meter=captured.telemetry.meter)
    await world.publish_journey(CART)
    await world.start()
    await world.profile("ann", consent={"purpose:Marketing": True}, email="ann@example.com")
    await world.event("ann", "Cart Abandoned", "e-cart-ann", profiled=False, cart_url="u")
    await world.eventually(lambda: _value(captured, "cdp.orchestration.held") == 1)
    await world.profile_applied("ann", ["e-cart-ann"])
    await world.eventually(world.actions)
    assert _value(captured, "cdp.orchestration.held") == 0
    assert _value(captured, "cdp.orchestration.held.expired") is None


class _DecidedMidway:
    """The store as ListDecisions reads it, with the held action decided while the call is between its reads:
    the first scan of the decisions waits until the profile has released the action and it is decided."""

    def __init__(self, store, release):
        self._store, self._release, self._done = store, release, False

    def __getattr__(self, name):
        return getattr(self._store, name)

    async def scan(self, *args, **kwargs):
        if not self._done:
            self._done = True
            await self._release()
        return await self._store.scan(*args, **kwargs)


async def test_an_action_decided_while_the_list_is_read_is_listed_once_as_decided(world_factory):
    world = await world_factory()
    await world.publish_journey(CART)
    await world.start()
    await world.profile("lou", consent={"purpose:Marketing": True}, email="lou@example.com")
    await world.event("lou", "Cart Abandoned", "e-cart-lou", profiled=False, cart_url="u")

    async def release():
        await world.profile_applied("lou", ["e-cart-lou"])
        await world.eventually(lambda: world.decisions("lou"))

    api = OrchestrationApi(
        journeys=Journeys(world.store), store=_DecidedMidway(world.store, release), bus=None, partitions=2
    )
    await world.eventually(lambda: _held_now(world, "lou"))
    listed = (await api.ListDecisions(pb.ListDecisionsRequest(person_id="lou"), None)).decisions
    assert [(d.kind, d.rule) for d in listed] == [(pb.DECISION_KIND_SENT, "")]


async def _held_now(world, person: str) -> bool:
    record = await world.store.get(PERSONS, person)
    return bool(record and (record.doc.get("arbiter") or {}).get("deferred"))
