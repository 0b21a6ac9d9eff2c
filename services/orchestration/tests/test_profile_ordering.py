"""A decision is made on profile fields at least as new as the person's events, on a real nats-server.

Events reach orchestration from `events.resolved` and, in parallel, through the profile: a new person's
consent arrives in the profile's change for the identify that carried it, usually a moment after the
events, and not at all while the profile is stopped. An action proposed meanwhile waits for that change;
a stalled profile delays it, at most `profile_wait`, then it is decided on what is known with a reason
naming `profile_unavailable`, never a silent `no_consent`."""

from __future__ import annotations

from cdp.events.v1 import events_pb2
from cdp_kit.storage import open_store
from cdp_orchestration.domain.arbiter import PersonState
from cdp_orchestration.domain.rules import parse_rules
from cdp_orchestration.inputs import ResolvedInput
from cdp_orchestration.state import PERSONS, Partition, Person, load_persons
from cdp_profile.events import event_id_of

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
            "template": {"subject": "{{ traits.first_name }}, your cart is waiting", "body": "{{ entry.cart_url }}"},
        },
    ],
}
CONSENT = {"purpose:Marketing": True}


async def _sent(world):
    return [a for a in await world.actions() if a.journey_id == "abandoned-cart"] or None


async def _decided(world, person, kind):
    decisions = await world.decisions(person)
    return decisions if any(d["kind"] == kind for d in decisions) else None


async def _waiting(world, person):
    """The actions the person's arbiter holds for the profile (none has a decision yet)."""
    stored = await world.store.get(PERSONS, person)
    # A person whose arbiter holds nothing has no arbiter part in their record.
    held = (stored.doc.get("arbiter") or {}).get("deferred", []) if stored is not None else []
    return [h for h in held if h.get("profile")] or None


async def test_a_new_person_s_reminder_waits_for_the_stalled_profile_and_leaves_once_it_resumes(world_factory):
    world = await world_factory()
    await world.publish_journey(CART)
    await world.start()
    # The profile is stopped: the identify with consent and the cart event reach orchestration, the
    # profile's change for them does not.
    await world.events(
        "zed",
        [("Signed Up", "e-identify-zed", {}), ("Cart Abandoned", "e-cart-zed", {"cart_url": "u"})],
        profiled=False,
    )
    await world.eventually(lambda: world.instances("zed"))
    await world.eventually(world.settled)  # nothing is decided while the profile stays stopped: the action waits
    assert await world.decisions("zed") == []
    assert await world.actions() == []
    [held] = await world.eventually(lambda: _waiting(world, "zed"))
    assert held["action"]["journey_id"] == "abandoned-cart"

    # The profile resumes: its change for those events carries the consent and traits.
    await world.profile_applied(
        "zed", ["e-identify-zed", "e-cart-zed"], consent=CONSENT, first_name="Zed", email="zed@example.com"
    )
    [action] = await world.eventually(lambda: _sent(world))
    assert action.person_id == "zed" and action.address["email"] == "zed@example.com"
    assert action.content["subject"] == "Zed, your cart is waiting"
    assert [d["kind"] for d in await world.decisions("zed")] == ["sent"]


async def test_the_profile_change_arriving_just_after_the_event_is_what_the_decision_reads(world_factory):
    # The everyday path with the profile up: events.resolved first, the profile's change a moment later.
    world = await world_factory()
    await world.publish_journey(CART)
    await world.start()
    await world.event("ann", "Cart Abandoned", "e-cart-ann", profiled=False, cart_url="u")
    await world.profile_applied("ann", ["e-cart-ann"], consent=CONSENT, first_name="Ann", email="ann@example.com")

    [action] = await world.eventually(lambda: _sent(world))
    assert action.person_id == "ann"
    kinds = [d["kind"] for d in await world.decisions("ann")]
    assert "no_consent" not in kinds and kinds[-1] == "sent"


async def test_a_profile_change_that_overtakes_its_event_starts_no_wait(world_factory):
    # Sources interleave: the profile's change may reach orchestration before the event it applied.
    world = await world_factory()  # the default wait (ten minutes) is far beyond this test's patience
    await world.publish_journey(CART)
    await world.start()
    await world.profile_applied("bea", ["e-cart-bea"], consent=CONSENT, first_name="Bea", email="bea@example.com")
    await world.eventually(lambda: world.store.get(PERSONS, "bea"))
    await world.event("bea", "Cart Abandoned", "e-cart-bea", profiled=False, cart_url="u")

    [action] = await world.eventually(lambda: _sent(world))
    assert action.person_id == "bea"
    assert [d["kind"] for d in await world.decisions("bea")] == ["sent"]


async def test_a_profile_stalled_past_the_wait_gets_a_decision_that_says_so(world_factory):
    world = await world_factory(rules=parse_rules({"profile_wait": "2s"}))
    await world.publish_journey(CART)
    await world.start()
    await world.event("kim", "Cart Abandoned", "e-cart-kim", profiled=False, cart_url="u")

    [decision] = await world.eventually(lambda: _decided(world, "kim", "no_consent"))
    assert decision["rule"] == "profile_unavailable"
    assert "profile_unavailable" in decision["reason"]
    assert await world.actions() == []


async def test_a_known_person_s_send_waits_for_the_profile_across_a_restart(world_factory):
    world = await world_factory()
    await world.publish_journey(CART)
    await world.start()
    await world.profile("lea", consent=CONSENT, first_name="Lea", email="lea@example.com")
    # A later identify withdraws the consent; the profile is stopped before it applies it.
    await world.events(
        "lea",
        [("Signed Up", "e-identify-lea", {}), ("Cart Abandoned", "e-cart-lea", {"cart_url": "u"})],
        profiled=False,
    )
    await world.eventually(lambda: _waiting(world, "lea"))
    await world.stop()
    await world.start()  # read back from the store: still waiting
    await world.eventually(world.settled)
    assert await world.decisions("lea") == []

    await world.profile_applied("lea", ["e-identify-lea", "e-cart-lea"], consent={"purpose:Marketing": False})
    [decision] = await world.eventually(lambda: _decided(world, "lea", "no_consent"))
    assert decision["rule"] == "Marketing"  # the person's own answer, read once the profile applied it
    assert await world.actions() == []


def test_the_person_lags_from_their_earliest_unconfirmed_event_until_a_change_lists_the_latest():
    person = Person("p1")
    person.saw_event("e1", 10.0)
    person.saw_event("e2", 11.0)
    assert person.view().behind == 10.0
    assert person.profile_applied(["e1"]) is False  # the profile applied the first only
    assert person.view().behind == 10.0
    assert person.profile_applied(["e2"]) is True
    assert person.view().behind is None
    person.saw_event("e2", 12.0)  # a copy of an event the profile applied already
    assert person.view().behind is None


def test_changes_that_overtook_their_events_leave_nothing_to_wait_for():
    person = Person("p1")
    assert person.profile_applied(["e1", "e2"]) is False
    person.saw_event("e1", 10.0)
    person.saw_event("e2", 10.1)
    assert person.view().behind is None
    person.saw_event("e3", 11.0)
    assert person.view().behind == 11.0


def test_the_lag_is_written_with_the_record_and_read_back():
    person = Person("p1", state=PersonState("p1"))
    person.saw_event("e1", 10.0)
    record = person.record()
    assert record["pending"] == 10.0
    assert person.profile_applied(["e1"]) and person.dirty  # the record says it lags: written again
    assert "pending" not in person.record()


async def test_a_lag_read_back_ends_with_the_next_change_of_the_person_s_events():
    record = Person("p1", state=PersonState("p1"))
    record.saw_event("e1", 10.0)
    record.saw_event("e2", 11.0)  # the record keeps no id: the latest may move on without a write
    hot = Partition()
    async with open_store("memory://") as store:
        await store.put(PERSONS, "p1", record.record())
        await load_persons(store, hot, {"p1"})
    person = hot.persons["p1"]
    assert person.view().behind == 10.0
    assert person.profile_applied(["e2"]) is True
    assert person.view().behind is None


def test_an_event_is_waited_for_under_the_id_the_profile_lists_it_by():
    # The profile applies an event under the collector's dedup id and lists that in its change; a waiting
    # action is released only when the ids agree.
    message = events_pb2.Event(source_id="src-web", message_id="m-1", event="Cart Abandoned")
    resolved = ResolvedInput(events_pb2.ResolvedEvent(event=message, person_id="p1"))
    assert resolved.profile_id == event_id_of(message) == "src-web:m-1"
