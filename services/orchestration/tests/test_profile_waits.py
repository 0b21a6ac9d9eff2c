"""An action waits for the profile only while the profile has not covered the person's latest event: in
each story here the profile is up and has done its part, so the action is decided within seconds, not at
the end of `profile_wait` (ten minutes), as it was before, on a real nats-server.

- the profile's change overtook its event, and orchestration restarted between the two;
- a change overtook its event, and the ids listed by earlier changes were lost (more than a person keeps);
- an action held for the profile was handed to a merge's survivor, and the profile listed the event under
  the survivor;
- a copy of an event the profile applied already (same id): the profile lists it again
  (services/profile/tests/test_duplicate_listing.py), and that listing ends the wait here.
"""

from __future__ import annotations

from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2
from cdp_kit.bus import subjects
from cdp_kit.timestamps import from_seconds
from cdp_orchestration.domain.arbiter import PersonState
from cdp_orchestration.domain.rules import parse_rules
from cdp_orchestration.state import PERSONS, Person

CONSENT = {"purpose:Marketing": True}
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
            "template": {"subject": "{{ traits.first_name }}, your cart", "body": "{{ entry.cart_url }}"},
        }
    ],
}


async def _sent_to(world, person):
    return [a for a in await world.actions() if a.person_id == person] or None


async def _all_sourced(world) -> bool:
    """Everything published on the streams ORCHESTRATION sources so far is in it (no source lags)."""
    info = await world.bus.js.stream_info("ORCHESTRATION")
    return bool(info.sources) and all(source.lag == 0 for source in info.sources)


async def _caught_up(world, messages: int) -> bool:
    """ORCHESTRATION holds the `messages` published so far on the streams it sources, and the engine has
    worked every one (a source's `lag` alone is an estimate: it can read 0 before the source has seen the
    newest upstream message, and a fresh-clone CI run saw the first sign-up's listing land after the copy)."""
    info = await world.bus.js.stream_info("ORCHESTRATION")
    if info.state.messages < messages:
        return False
    consumers = await world.bus.js.consumers_info("ORCHESTRATION")
    return all(not c.num_pending and not c.num_ack_pending for c in consumers)


async def _held_for_profile(world, person):
    stored = await world.store.get(PERSONS, person)
    # A person whose arbiter holds nothing has no arbiter part in their record.
    held = (stored.doc.get("arbiter") or {}).get("deferred", []) if stored is not None else []
    return [h for h in held if h.get("profile")] or None


async def test_a_change_that_overtook_its_event_before_a_restart_starts_no_wait(world_factory):
    world = await world_factory()  # the default wait: ten minutes
    await world.publish_journey(CART)
    await world.start()
    await world.profile_applied("bea", ["e-cart-bea"], consent=CONSENT, first_name="Bea", email="bea@example.com")
    await world.eventually(lambda: world.store.get(PERSONS, "bea"))
    await world.stop()  # the change is applied and acknowledged; its event has not reached orchestration
    await world.start()
    await world.event("bea", "Cart Abandoned", "e-cart-bea", profiled=False, cart_url="u")

    [action] = await world.eventually(lambda: _sent_to(world, "bea"))
    assert action.content["subject"] == "Bea, your cart"
    assert [d["kind"] for d in await world.decisions("bea")] == ["sent"]


async def test_an_overtaking_change_read_back_with_the_record_ends_a_lag(world_factory):
    # The hot cache keeps one person: the change's ids must come back with the record, not from memory.
    world = await world_factory(hot_persons=1)
    await world.publish_journey(CART)
    await world.start()
    await world.profile_applied("cid", ["e-cart-cid"], consent=CONSENT, first_name="Cid", email="cid@example.com")
    await world.eventually(lambda: world.store.get(PERSONS, "cid"))
    for other in ("x1", "x2", "x3"):  # the cache lets Cid go
        await world.profile(other, first_name="X")
    await world.event("cid", "Cart Abandoned", "e-cart-cid", profiled=False, cart_url="u")
    await world.eventually(lambda: _sent_to(world, "cid"))


async def test_events_a_change_listed_before_they_arrived_start_no_wait(world_factory):
    # The risk story's first account: identity's "Identifier Shared" events reach it one after another, the
    # profile applies them in one batch, and its change (listing all) arrives after the first and before
    # the rest. Before, the second one started a wait no change would end: the hold waited ten minutes.
    world = await world_factory()
    await world.publish_journey(CART)
    await world.start()
    # (Her first event names her anonymous id: the record is written, so the test sees it applied.)
    await world.event("eve", "Identifier Shared", "e-shared-1", anonymous_id="anon-eve", profiled=False)
    await world.eventually(lambda: world.store.get(PERSONS, "eve"))
    await world.profile_applied(
        "eve", ["e-shared-1", "e-shared-2", "e-cart-eve"], consent=CONSENT, first_name="Eve", email="eve@example.com"
    )
    await world.eventually(
        lambda: _field(world, "eve", "traits.first_name")
    )  # the change is applied before the events below arrive
    await world.events(
        "eve",
        [("Identifier Shared", "e-shared-2", {}), ("Cart Abandoned", "e-cart-eve", {"cart_url": "u"})],
        profiled=False,
    )
    [action] = await world.eventually(lambda: _sent_to(world, "eve"))
    assert action.content["subject"] == "Eve, your cart"


async def _field(world, person, name):
    stored = await world.store.get(PERSONS, person)
    return stored is not None and stored.doc["fields"].get(name)


async def test_a_held_action_handed_to_the_survivor_of_a_merge_leaves_when_the_profile_lists_its_event(
    world_factory,
):
    world = await world_factory()
    await world.publish_journey(CART)
    await world.start()
    await world.profile("ada", consent=CONSENT, first_name="Ada", email="ada@example.com")
    # A visitor abandons a cart; the profile has not applied it when identity merges the visitor into Ada.
    await world.event("visitor", "Cart Abandoned", "e-cart-v", profiled=False, cart_url="u")
    await world.eventually(lambda: _held_for_profile(world, "visitor"))
    await merge(world, "ada", "visitor")
    await world.eventually(lambda: _held_for_profile(world, "ada"))
    # The profile applies the event to the survivor (the merge came first) and lists it there.
    await world.profile_applied("ada", ["e-cart-v"])

    [action] = await world.eventually(lambda: _sent_to(world, "ada"))
    assert action.content["subject"] == "Ada, your cart"


async def test_a_copy_of_an_applied_event_holds_the_action_until_the_profile_lists_the_copy(world_factory):
    world = await world_factory()
    await world.publish_journey(CART)
    await world.start()
    await world.profile("dot", consent=CONSENT, first_name="Dot", email="dot@example.com")
    await world.event("dot", "Signed Up", "e-signup-dot")
    await world.event("dot", "Page Viewed", "e-view-dot")
    # ORCHESTRATION sources events.resolved and profiles.changed each on its own: until the changes above are
    # in it, the first sign-up's listing may land after the copy below and cover it (a loaded CI run).
    await world.eventually(lambda: _all_sourced(world))
    await world.eventually(lambda: _caught_up(world, 5))  # the profile change, two events and their changes
    # The cart is abandoned, then the sign-up comes again under its id (a client's retry): the copy is the
    # person's latest event.
    await world.events(
        "dot", [("Cart Abandoned", "e-cart-dot", {"cart_url": "u"}), ("Signed Up", "e-signup-dot", {})], profiled=False
    )
    await world.eventually(lambda: _held_for_profile(world, "dot"))
    # The profile applied the cart event; the copy changed nothing. Listing only the cart event (what the
    # profile published before) leaves the action waiting for the copy's listing.
    await world.profile_applied("dot", ["e-cart-dot"])
    await world.eventually(world.settled)  # that change is applied
    assert await _sent_to(world, "dot") is None and await _held_for_profile(world, "dot")
    await world.profile_applied("dot", ["e-signup-dot"])  # the copy listed again (`ProfileChange.relisted`)
    [action] = await world.eventually(lambda: _sent_to(world, "dot"))
    assert action.content["subject"] == "Dot, your cart"


async def test_a_copy_of_an_event_whose_change_overtook_it_holds_the_action_until_the_profile_lists_the_copy(
    world_factory,
):
    # The order a loaded run gave the test above now and then (3 of 200 under load): the sign-up's listing
    # reached orchestration before the sign-up itself. Before, the sign-up stayed "early" after it came, so
    # its copy read as an event whose change came first and ended the lag of the cart event seen before it:
    # the action was decided at once on fields without the cart event, never held.
    world = await world_factory()
    await world.publish_journey(CART)
    await world.start()
    await world.profile("dot", consent=CONSENT, first_name="Dot", email="dot@example.com")
    await world.profile_applied("dot", ["e-signup-dot"])  # the change overtook its event
    await world.eventually(lambda: _caught_up(world, 2))
    await world.event("dot", "Signed Up", "e-signup-dot", profiled=False)
    await world.event("dot", "Page Viewed", "e-view-dot")  # listed after it came: the latest listing
    await world.eventually(lambda: _caught_up(world, 5))
    await world.events(
        "dot", [("Cart Abandoned", "e-cart-dot", {"cart_url": "u"}), ("Signed Up", "e-signup-dot", {})], profiled=False
    )
    await world.eventually(lambda: _held_for_profile(world, "dot"))
    assert await _sent_to(world, "dot") is None
    await world.profile_applied("dot", ["e-cart-dot", "e-signup-dot"])
    [action] = await world.eventually(lambda: _sent_to(world, "dot"))
    assert action.content["subject"] == "Dot, your cart"


def test_an_event_whose_change_came_first_is_no_longer_early_once_it_came():
    person = Person("p1")
    assert person.profile_applied(["e1"], 10.0) is False  # the change overtook its event
    assert person.saw_event("e1", 10.1) is False  # the event itself: nothing lagged
    person.saw_event("e2", 10.2)
    assert person.profile_applied(["e2"], 10.3) is True  # listed after it came
    person.saw_event("e3", 10.4)
    person.saw_event("e1", 10.5)  # a copy of e1, after e3: it covers nothing, e3's change is still to come
    assert person.view().behind == 10.4
    assert person.profile_applied(["e3", "e1"], 10.6) is True
    assert person.view().behind is None


def test_a_change_listing_events_not_seen_yet_ends_the_wait_for_them_too():
    # The profile applied three events in one batch; its change came after the first reached orchestration
    # and before the other two: they are covered, and start no wait when they come.
    person = Person("p1")
    person.saw_event("e1", 10.0)
    assert person.profile_applied(["e1", "e2", "e3"]) is True
    person.saw_event("e2", 10.2)
    person.saw_event("e3", 10.3)
    assert person.view().behind is None
    person.saw_event("e4", 10.4)  # a new one is waited for
    assert person.view().behind == 10.4


def test_a_copy_listed_twice_is_placed_by_its_latest_listing():
    person = Person("p1")
    person.saw_event("e1", 10.0)
    person.saw_event("e2", 10.1)
    person.saw_event("e1", 10.2)  # a copy of e1 after e2
    assert person.profile_applied(["e1", "e2", "e1", "e3"]) is True
    person.saw_event("e3", 10.4)
    assert person.view().behind is None


def test_an_event_whose_change_came_first_covers_the_events_seen_before_it():
    # A change listing more ids than a person keeps overtook its events: the first ones it listed are
    # forgotten and start a lag when they come; the next one, still known, ends it (the profile applies
    # a person's events in order: those seen before it are applied too).
    person = Person("p1")
    ids = [f"e{i:02d}" for i in range(20)]
    assert person.profile_applied(ids) is False
    for event_id in ids[:4]:
        assert person.saw_event(event_id, 11.0) is False
    assert person.view().behind == 11.0
    assert person.saw_event(ids[4], 11.0) is True
    assert person.view().behind is None
    for event_id in ids[5:]:
        person.saw_event(event_id, 11.0)
    assert person.view().behind is None


def test_early_ids_are_written_with_the_record_and_age_out():
    person = Person("p1", state=PersonState("p1"))
    person.profile_applied(["api:r1"], 100.0)
    assert person.record()["early"] == [["api:r1", 100.0]]
    person.profile_applied(["e5"], 100.0 + 601)  # the API write's id never comes as an event: it goes
    assert person.record()["early"] == [["e5", 701.0]]


HOLD = {
    "id": "hold",
    "version": 1,
    "name": "Hold",
    "priority": 100,
    "category": "transactional",
    "timezone": "UTC",
    "entry": {"segment": "fraud_review", "on": "entered"},
    "reentry": "never",
    "nodes": [
        {
            "id": "hold",
            "type": "action",
            "channel": "webhook",
            "purpose": "Fraud prevention",
            "template": {"subject": "HOLD", "body": "fraud_risk {{ scores.fraud_risk }}"},
        }
    ],
}


async def test_a_segment_entered_on_a_score_this_copy_lacks_waits_for_the_score(world_factory):
    # The risk story's failure: segmentation entered the person on the profile's score change, and its
    # segment event reached orchestration before that change (sources interleave). The hold's template
    # reads the score: it was rendered on fields without it, "failed", and the hold never went out.
    world = await world_factory(rules=parse_rules({"exempt_categories": ["transactional"]}))
    await world.publish_journey(HOLD)
    await world.start()
    await world.profile("ring", first_name="R")
    scored_at = world.now()
    await segment_event(world, "ring", "fraud_review", at=scored_at, reason="score")
    await world.eventually(lambda: _held_for_profile(world, "ring"))
    assert await _sent_to(world, "ring") is None
    await score_change(world, "ring", {"fraud_risk": 0.58}, at=scored_at)

    [action] = await world.eventually(lambda: _sent_to(world, "ring"))
    assert action.content["body"] == "fraud_risk 0.58"
    assert [d["kind"] for d in await world.decisions("ring")] == ["sent"]


async def test_a_segment_change_decided_on_a_change_applied_here_already_holds_nothing(world_factory):
    world = await world_factory(rules=parse_rules({"exempt_categories": ["transactional"]}))
    await world.publish_journey(HOLD)
    await world.start()
    scored_at = world.now()
    await score_change(world, "sam", {"fraud_risk": 0.61}, at=scored_at)
    await world.eventually(lambda: world.store.get(PERSONS, "sam"))
    await segment_event(world, "sam", "fraud_review", at=scored_at, reason="score")
    [action] = await world.eventually(lambda: _sent_to(world, "sam"))
    assert action.content["body"] == "fraud_risk 0.61"


def test_a_segment_change_ahead_of_the_profile_lags_until_that_change_arrives():
    person = Person("p1")
    person.change_seen(100.0)
    person.segment_ahead(100.0000004, 5.0)  # the same change, rounded to the microsecond by segmentation
    assert person.view().behind is None
    person.segment_ahead(101.0, 6.0)
    assert person.view().behind == 6.0
    assert person.change_seen(100.5) is False and person.view().behind == 6.0  # an earlier change
    assert person.change_seen(101.0) is True and person.view().behind is None


async def segment_event(world, person: str, segment: str, *, at: float, reason: str) -> None:
    event = segmentation_pb2.SegmentEvent(
        id=f"seg-{person}-{at!r}", person_id=person, segment_id=segment, entered=True, reason=reason
    )
    event.at.CopyFrom(from_seconds(at))
    batch = segmentation_pb2.SegmentEventBatch(events=[event])
    await world._publish(subjects.segments_entered(world.partition(person)), batch.SerializeToString())


async def score_change(world, person: str, scores: dict[str, float], *, at: float) -> None:
    change = profile_pb2.ProfileChanged(person_id=person, cause="score", at=from_seconds(at))
    change.scores.update(scores)
    batch = profile_pb2.ProfileChangedBatch(changes=[change])
    await world._publish(subjects.profiles_changed(world.partition(person)), batch.SerializeToString())


async def merge(world, survivor: str, absorbed: str) -> None:
    at = from_seconds(world.now())
    for person, change in (
        (survivor, profile_pb2.ProfileChanged(person_id=survivor, cause="merge", merged=[absorbed], at=at)),
        (absorbed, profile_pb2.ProfileChanged(person_id=absorbed, cause="merge", removed=True, at=at)),
    ):
        batch = profile_pb2.ProfileChangedBatch(changes=[change])
        await world._publish(subjects.profiles_changed(world.partition(person)), batch.SerializeToString())
