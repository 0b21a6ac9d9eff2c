"""A person merged into another: their running instances go on as the survivor's (or end "merged" when the
survivor already runs that journey), and the caps they used count for the survivor."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import subjects
from cdp_kit.timestamps import from_seconds
from cdp_orchestration.api import OrchestrationApi
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
        {"id": "wait", "type": "delay", "duration": "1h", "next": "remind"},
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


def _ten_today() -> float:
    """10:00 UTC today: the engine's clock, which reads the time its inputs were stored plus the world's
    offset, reads it (and a few seconds more) for everything a test publishes after it sets the offset."""
    today = datetime.now(UTC).date()
    return datetime(today.year, today.month, today.day, 10, tzinfo=UTC).timestamp()


async def _running(world, person, journey_id):
    return [i for i in await world.instances(person) if i["journey_id"] == journey_id and i["status"] == "running"]


async def test_the_absorbed_persons_journey_goes_on_as_the_survivors_and_their_caps_count(world_factory):
    rules = parse_rules({"caps": [{"id": "email-daily", "channel": "email", "per": "day", "limit": 1}]})
    # The engine's clock reads 10:00 UTC: the cart's hour-long delay ends the same day.
    world = await world_factory(rules=rules, clock_offset=_ten_today() - time.time())
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
    # The merges reach an engine whose clock has moved on an hour: the delays are over, and the moved
    # instance's timer, scheduled again on Ada's partition, fires at once. The timers the carts set first are
    # an hour away on the server's clock, so none fires before the merges are applied, however slow they are.
    await world.stop()
    await merge(world, "ada", "visitor")
    await merge(world, "bob", "bob-phone")
    world.clock_offset += 3600
    await world.start()

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


NUDGE = {
    "id": "nudge",
    "version": 1,
    "name": "Nudge",
    "priority": 50,
    "timezone": "UTC",
    "entry": {"event": "Cart Abandoned"},
    "reentry": "always",
    "nodes": [
        {"id": "wait", "type": "wait", "event": "Nudge Now", "timeout": "2d", "next": "remind", "timeout_next": "out"},
        {"id": "remind", "type": "action", **EMAIL, "next": "out"},
        {"id": "out", "type": "exit"},
    ],
}


async def unmerge(world, survivor: str, restored: str, **traits) -> None:
    """What profile publishes once it applied identity.unmerged: the restored person's change (everything
    it holds, `split_from` the survivor) and the survivor's (what it lost)."""
    at = from_seconds(world.now())
    back = profile_pb2.ProfileChanged(person_id=restored, cause="unmerge", split_from=survivor, at=at)
    for name, value in traits.items():
        back.traits[name].string_value = value
    back.consent["purpose:Marketing"] = True
    lost = profile_pb2.ProfileChanged(person_id=survivor, cause="unmerge", at=at)
    for person, change in ((restored, back), (survivor, lost)):
        batch = profile_pb2.ProfileChangedBatch(changes=[change])
        await world._publish(subjects.profiles_changed(world.partition(person)), batch.SerializeToString())


async def test_an_unmerge_gives_the_restored_person_back_their_journeys_and_their_caps(world_factory):
    rules = parse_rules({"caps": [{"id": "email-daily", "channel": "email", "per": "day", "limit": 1}]})
    # The engine's clock reads 10:00 UTC: the day the caps count is the same for every step, whenever it runs.
    world = await world_factory(rules=rules, clock_offset=_ten_today() - time.time())
    await world.publish_journey(WELCOME)
    await world.publish_journey(NUDGE)
    await world.start()
    consent = {"purpose:Marketing": True}
    # The visitor got today's email, then abandoned a cart (waiting for a nudge); Ada has had nothing yet.
    await world.profile("visitor", consent=consent, first_name="V", email="v@example.com")
    await world.event("visitor", "Signed Up", "e-signup-v", anonymous_id="anon-v")
    await world.eventually(world.actions)
    await world.event("visitor", "Cart Abandoned", "e-cart-v", anonymous_id="anon-v")
    [waiting] = await world.eventually(lambda: _running(world, "visitor", "nudge"))
    await world.profile("ada", consent=consent, first_name="Ada", email="ada@example.com")
    await merge(world, "ada", "visitor")
    await world.eventually(lambda: _running(world, "ada", "nudge"))

    # The merge was wrong: the visitor is a person again.
    await unmerge(world, "ada", "visitor", first_name="V", email="v@example.com")
    [back] = await world.eventually(lambda: _running(world, "visitor", "nudge"))
    assert back["id"] == waiting["id"] and await _running(world, "ada", "nudge") == []
    visitor = (await world.store.get(PERSONS, "visitor")).doc
    assert waiting["id"] in visitor["live"] and visitor["ids"] == {"anonymous_id": "anon-v"}

    # The journey goes on as the visitor's, with the visitor's cap: today's email was theirs.
    await world.event("visitor", "Nudge Now", "e-nudge-v", anonymous_id="anon-v")
    decided = await world.eventually(lambda: _of(world, "visitor", "nudge"))
    assert [(d["kind"], d["rule"]) for d in decided] == [("deferred", "email-daily")]  # to tomorrow
    # Ada's cap is hers alone again: her first email of the day goes out.
    await world.event("ada", "Signed Up", "e-signup-ada", user_id="ada-uid")
    [sent] = await world.eventually(lambda: _of(world, "ada", "welcome"))
    assert sent["kind"] == "sent"
    ada = (await world.store.get(PERSONS, "ada")).doc
    assert ada["ids"] == {"user_id": "ada-uid"}  # the visitor's anonymous id went back with them


async def _of(world, person, journey_id):
    return [d for d in await world.decisions(person) if d["journey_id"] == journey_id]


async def test_decisions_follow_the_person_they_were_merged_into(world_factory):
    world = await world_factory()
    await world.publish_journey(WELCOME)
    await world.start()
    api = OrchestrationApi(journeys=world.journeys, store=world.store, bus=world.bus, partitions=2)
    consent = {"purpose:Marketing": True}
    await world.profile("visitor", consent=consent, first_name="V", email="v@example.com")
    await world.event("visitor", "Signed Up", "e-signup-v", anonymous_id="anon-v")
    await world.eventually(lambda: world.decisions("visitor"))
    await world.profile("ada", consent=consent, first_name="Ada", email="ada@example.com")
    await merge(world, "ada", "visitor")
    await world.eventually(lambda: _merged_into(world, "visitor", "ada"))
    await world.event("ada", "Signed Up", "e-signup-ada", user_id="ada-uid")
    await world.eventually(lambda: world.decisions("ada"))

    async def history(person: str, page_size: int = 0) -> list[tuple[str, str]]:
        """(person decided for, kind) of every decision ListDecisions gives for `person`, page by page."""
        out, token = [], ""
        while True:
            request = pb.ListDecisionsRequest(person_id=person, page_size=page_size, page_token=token)
            response = await api.ListDecisions(request, None)
            out += [(d.person_id, d.action_id) for d in response.decisions]
            token = response.next_page_token
            if not token:
                return out

    ada_action = (await world.decisions("ada"))[0]["action_id"]
    visitor_action = (await world.decisions("visitor"))[0]["action_id"]
    # Ada's history holds what was decided for the visitor before the merge, newest first...
    both = [("ada", ada_action), ("visitor", visitor_action)]
    assert await history("ada") == both
    assert await history("ada", page_size=1) == both
    # ...and the visitor's id, merged away, reads the person it went to.
    assert await history("visitor") == both

    # Undone: each reads their own again.
    await unmerge(world, "ada", "visitor", first_name="V", email="v@example.com")
    await world.eventually(lambda: _merged_into(world, "visitor", ""))
    await world.eventually(lambda: _no_merges(world, "ada"))
    assert await history("ada") == [("ada", ada_action)]
    assert await history("visitor") == [("visitor", visitor_action)]


async def _merged_into(world, person, survivor):
    stored = await world.store.get(PERSONS, person)
    return stored is not None and stored.doc.get("merged_into", "") == survivor


async def _no_merges(world, person):
    stored = await world.store.get(PERSONS, person)
    return stored is not None and not stored.doc.get("merged_from")
