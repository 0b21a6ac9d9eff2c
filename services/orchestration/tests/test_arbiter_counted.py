"""A named computed trait of kind count or sum that a person lacks reads as 0 in the arbiter's suppression
rules, as in journeys' conditions (01e9a37) and segments: `computed.tickets_today < 1` holds for someone
with no ticket today. Before, the rules read it as missing, so the rule below let through exactly the
people it was written to hold back. The kinds come from the profile service's ListComputedTraits; the set
a rules document was compiled with is kept in the store, so a restart (or another replica) with no profile
service to ask compiles the same rules the same way. A real profile service computing the trait,
orchestration's engine, on a real nats-server."""

from __future__ import annotations

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_kit.storage import open_store
from cdp_orchestration.arbiter_rules import RULES, compile_rules, digest
from cdp_orchestration.catalogue import profile_computed_traits
from cdp_orchestration.domain.view import PersonView
from cdp_orchestration.state import PERSONS

from .test_counted_traits import profile_service

RULES_DOCUMENT = {
    "suppressions": [
        # The satisfaction survey goes only to people who opened a support ticket today.
        {"id": "survey-needs-a-ticket", "categories": ["survey"], "condition": "computed.tickets_today < 1"}
    ]
}
SURVEY = {
    "id": "survey",
    "version": 1,
    "name": "How did we do?",
    "priority": 10,
    "timezone": "UTC",
    "entry": {"event": "Visited"},
    "reentry": "always",
    "nodes": [
        {
            "id": "ask",
            "type": "action",
            "channel": "email",
            "category": "survey",
            "purpose": "Service",
            "template": {"subject": "How did we do?", "body": "Tell us"},
        }
    ],
}


async def _failing() -> dict[str, str]:
    raise ConnectionError("the profile service is not there")


async def test_a_count_trait_a_person_lacks_reads_as_zero_in_a_suppression_rule(world_factory, nats_server, tmp_path):
    probe = await world_factory()  # only its store, to compile the rules before the engine's world starts
    async with profile_service(nats_server, tmp_path, partitions=2) as channel:
        profiles = profile_pb2_grpc.ProfileServiceStub(channel)
        tickets = profile_pb2.ComputedTraitDefinition(
            name="tickets_today", op="count", event_names=["Support Ticket Opened"]
        )
        await profiles.DefineComputedTrait(profile_pb2.DefineComputedTraitRequest(definition=tickets))
        rules = await compile_rules(RULES_DOCUMENT, probe.store, profile_computed_traits(channel, ""))
        assert rules.counted == frozenset({"computed.tickets_today"})

        world = await world_factory(rules=rules)
        await world.publish_journey(SURVEY)
        await world.start()
        # bob opened a ticket: the profile service counts it and tells orchestration.
        await world.events("bob", [("Support Ticket Opened", "t-1", {})], profiled=False)

        async def counted() -> bool:
            stored = await world.store.get(PERSONS, "bob")
            return stored is not None and stored.doc["fields"].get("computed.tickets_today") == 1

        await world.eventually(counted)
        # ada opened none: she has no computed.tickets_today at all, which is 0 tickets.
        for person in ("ada", "bob"):
            await world.profile(person, consent={"purpose:Service": True}, email=f"{person}@example.com")
            await world.event(person, "Visited", f"v-{person}")

        async def decided(person: str):
            async def one() -> list[dict]:
                return [d for d in await world.decisions(person) if d["journey_id"] == "survey"]

            return await world.eventually(one)

        [ada] = await decided("ada")
        [bob] = await decided("bob")
        assert (ada["kind"], ada["reason"]) == ("suppressed", "suppressed by rule survey-needs-a-ticket")
        assert bob["kind"] == "sent"

        async def acted() -> list[str] | None:
            # The action is published after its decision is stored (the engine's outbox): wait for it.
            return [a.person_id for a in await world.actions()] or None

        assert await world.eventually(acted) == ["bob"]

    # Kept with the rules: a restart with no profile service to ask compiles them the same.
    stored = await probe.store.get(RULES, digest(RULES_DOCUMENT))
    assert stored is not None and stored.doc["counted"] == ["computed.tickets_today"]
    again = await compile_rules(RULES_DOCUMENT, probe.store, _failing)
    assert again.counted == frozenset({"computed.tickets_today"})
    condition = again.suppressions[0].condition
    assert condition is not None and condition.holds(PersonView("cy", {}), world.now())
    assert not condition.holds(PersonView("cy", {"computed.tickets_today": 2.0}), world.now())


async def test_rules_never_compiled_with_the_profile_s_answer_read_the_trait_as_missing(tmp_path):
    """No profile service configured, or none answering, and no set kept: as before, and nothing is kept,
    so a start where it answers asks it."""
    async with open_store(f"sqlite:///{tmp_path}/rules.db") as store:
        for computed in (None, _failing):
            rules = await compile_rules(RULES_DOCUMENT, store, computed)
            assert rules.counted == frozenset()
            condition = rules.suppressions[0].condition
            assert condition is not None and not condition.holds(PersonView("cy", {}), 0.0)
        assert await store.get(RULES, digest(RULES_DOCUMENT)) is None
