"""A person merged into another: their running instances go on as the survivor's (or end "merged" when the
survivor already runs that journey), and the caps they used count for the survivor."""

from __future__ import annotations

from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import subjects
from cdp_kit.timestamps import from_seconds
from cdp_orchestration.domain.rules import parse_rules
from cdp_orchestration.state import PERSONS

EMAIL = {"channel": "email", "purpose": "Marketing", "template": {"subject": "Hi {{ traits.first_name }}", "body": "x"}}
WELCOME = {
    "id": "welcome",
    "version": 1,
    "name": "Welcome",
    "priority": 10,
    "timezone": "UTC",
    "entry": {"event": "Signed Up"},
    "reentry": "always",
    "nodes": [{"id": "hello", "type": "action", **EMAIL}],
}
CART = {
    "id": "cart",
    "version": 1,
    "name": "Cart",
    "priority": 50,
    "timezone": "UTC",
    "entry": {"event": "Cart Abandoned"},
    "reentry": "always",
    "nodes": [
        {"id": "wait", "type": "delay", "duration": "3s", "next": "remind"},
        {"id": "remind", "type": "action", **EMAIL},
    ],
}


async def merge(world, survivor: str, absorbed: str) -> None:
    """What profile publishes once it applied identity.merged: the survivor's change naming the absorbed
    person, and the absorbed person's change saying it is gone."""
    at = from_seconds(world.now())
    for person, change in (
        (survivor, profile_pb2.ProfileChanged(person_id=survivor, cause="merge", merged=[absorbed], at=at)),
        (absorbed, profile_pb2.ProfileChanged(person_id=absorbed, cause="merge", removed=True, at=at)),
    ):
        batch = profile_pb2.ProfileChangedBatch(changes=[change])
        await world._publish(subjects.profiles_changed(world.partition(person)), batch.SerializeToString())


async def _running(world, person, journey_id):
    return [i for i in await world.instances(person) if i["journey_id"] == journey_id and i["status"] == "running"]


async def test_the_absorbed_persons_journey_goes_on_as_the_survivors_and_their_caps_count(world_factory):
    rules = parse_rules({"caps": [{"id": "email-daily", "channel": "email", "per": "day", "limit": 1}]})
    world = await world_factory(rules=rules)
    await world.publish_journey(WELCOME)
    await world.publish_journey(CART)
    await world.start()
    consent = {"purpose:Marketing": True}
    # The visitor got today's email already, then abandoned a cart; then they turn out to be Ada.
    await world.profile("visitor", consent=consent, first_name="V", email="v@example.com")
    await world.event("visitor", "Signed Up", "e-signup-v", anonymous_id="anon-v")
    await world.eventually(world.actions)
    await world.event("visitor", "Cart Abandoned", "e-cart-v", anonymous_id="anon-v")
    await world.eventually(lambda: _running(world, "visitor", "cart"))
    # Bob and his other device both run the cart journey when they are merged.
    for person in ("bob", "bob-phone"):
        await world.profile(person, consent=consent, first_name="B", email="b@example.com")
        await world.event(person, "Cart Abandoned", f"e-cart-{person}")
        await world.eventually(lambda p=person: _running(world, p, "cart"))
    await world.profile("ada", consent=consent, first_name="Ada", email="ada@example.com")
    await merge(world, "ada", "visitor")
    await merge(world, "bob", "bob-phone")

    await world.eventually(lambda: _running(world, "ada", "cart"))
    # After the delay the reminder is decided for Ada, and the email the visitor got today counts: the cap is
    # full, so the reminder waits for tomorrow's place.
    decisions = await world.eventually(lambda: world.decisions("ada"), timeout=15)
    assert [(d["journey_id"], d["kind"], d["rule"]) for d in decisions] == [("cart", "deferred", "email-daily")]
    # The cart instance record is Ada's now (the welcome one had ended: it stays the visitor's history).
    assert [i["journey_id"] for i in await world.instances("visitor")] == ["welcome"]
    ada = (await world.store.get(PERSONS, "ada")).doc
    assert ada["ids"] == {"anonymous_id": "anon-v"}  # outcome events of the moved journey land on Ada
    sent = [(a.person_id, a.journey_id) for a in await world.actions()]
    assert ("visitor", "welcome") in sent and not [s for s in sent if s[0] in ("ada", "visitor") and s[1] == "cart"]
    # Bob already runs the journey: the moved instance ends, his own goes on.
    [ended] = await world.eventually(lambda: _ended_merged(world, "bob"))
    assert ended["journey_id"] == "cart" and await world.instances("bob-phone") == []
    bobs = [i for i in await world.instances("bob") if i["end_reason"] != "merged"]
    assert len(bobs) == 1 and bobs[0]["id"] != ended["id"]


async def _ended_merged(world, person):
    return [i for i in await world.instances(person) if i["end_reason"] == "merged"]
