"""Orchestration keeps, per person, only the profile fields something in it reads (`reads.py`).

Most profile changes move a computed trait or a score no journey reads; keeping them rewrote the person
record for each. With a profile service configured, those are dropped at decode; a journey published later
that reads one gets its value from the profile service (BatchGetProfiles) before anything evaluates it,
never reads it as missing. Without a profile service, and for records written before this (no fingerprint),
every field is kept. On a real nats-server and a sqlite store, the profile service over real gRPC.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_kit.bus import subjects
from cdp_kit.storage import open_store
from cdp_kit.timestamps import from_seconds
from cdp_orchestration.domain import lifecycle
from cdp_orchestration.domain.document import parse_journey
from cdp_orchestration.domain.rules import Rules
from cdp_orchestration.domain.templates import compile_template, whole_roots
from cdp_orchestration.journeys import Journeys
from cdp_orchestration.reads import profile_fetch, read_set
from cdp_orchestration.state import PERSONS

from .conftest import journey_document


def journey(journey_id: str, event: str, condition: str, **more) -> dict:
    return journey_document(journey_id, {"event": event, "if": condition}, **more)


# What the shipped journeys read: traits (and consent, which the arbiter reads).
PLAN = journey("plan", "Plan Changed", 'traits.plan = "pro"')
ORDERS = journey("orders", "Go", "computed.orders > 3")
CHURN = journey("churn", "Go", "scores.churn > 0.5")


class ProfileService(profile_pb2_grpc.ProfileServiceServicer):
    """The profile service's BatchGetProfiles over persons given as computed traits and scores."""

    def __init__(self) -> None:
        self.people: dict[str, dict[str, dict[str, float]]] = {}
        self.asked: list[str] = []
        self.down = False  # answers UNAVAILABLE

    async def BatchGetProfiles(self, request, context):
        self.asked.extend(request.person_ids)
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        answer = profile_pb2.BatchGetProfilesResponse()
        for person in request.person_ids:
            if person not in self.people:
                answer.missing.append(person)
                continue
            profile = answer.profiles.add(person_id=person)
            for name, value in self.people[person].get("computed", {}).items():
                profile.computed[name].number_value = value
            for name, value in self.people[person].get("scores", {}).items():
                profile.scores[name].value = value
        return answer


@pytest.fixture
async def profile_service():
    service = ProfileService()
    server = grpc.aio.server()
    profile_pb2_grpc.add_ProfileServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield service, profile_fetch(channel, "token")
    await channel.close()
    await server.stop(None)


async def changed(world, person: str, *, computed=None, scores=None, traits=None, consent=None) -> None:
    """A profile change of `person` (as profile publishes it) moving the given fields."""
    change = profile_pb2.ProfileChanged(person_id=person, cause="event", at=from_seconds(world._change_time(person)))
    for name, value in (computed or {}).items():
        change.computed[name].number_value = value
    for name, value in (scores or {}).items():
        change.scores[name] = value
    for name, value in (traits or {}).items():
        change.traits[name].string_value = value
    change.consent.update(consent or {})
    batch = profile_pb2.ProfileChangedBatch(changes=[change])
    await world._publish(subjects.profiles_changed(world.partition(person)), batch.SerializeToString())


async def record(world, person: str):
    return await world.store.get(PERSONS, person)


async def started(world, person: str, journey_id: str) -> int:
    return len([i for i in await world.instances(person) if i["journey_id"] == journey_id])


async def test_a_change_moving_only_computed_traits_and_scores_no_journey_reads_writes_no_person_record(
    world_factory, profile_service
):
    service, fetch = profile_service
    world = await world_factory(profile_fetch=fetch)
    await world.publish_journey(PLAN)
    await world.start()
    await changed(
        world, "ada", traits={"plan": "free"}, consent={"purpose:Marketing": True}, computed={"orders": 1.0},
        scores={"churn": 0.2},
    )  # fmt: skip
    first = await world.eventually(lambda: record(world, "ada"))
    assert first.doc["fields"] == {"traits.plan": "free", "consent.purpose:Marketing": True}
    assert first.doc["reads"]

    for n in range(5):
        await changed(world, "ada", computed={"orders": 2.0 + n, "views_7d": 10.0 + n}, scores={"churn": 0.3 + n / 10})
    await world.eventually(world.settled)
    assert (await record(world, "ada")).version == first.version  # not written again
    # A trait moving is written, as before.
    await changed(world, "ada", traits={"plan": "pro"})
    await world.eventually(lambda: _holds(world, "ada", "traits.plan", "pro"))
    assert service.asked == []  # a person new here holds what the changes bring: nothing to read again


async def _holds(world, person: str, key: str, value) -> bool:
    stored = await record(world, person)
    return stored is not None and stored.doc["fields"].get(key) == value


async def test_a_journey_published_later_reads_a_computed_trait_and_a_score_from_the_profile_service(
    world_factory, profile_service
):
    service, fetch = profile_service
    world = await world_factory(profile_fetch=fetch)
    await world.publish_journey(PLAN)
    await world.start()
    # Kept under the set before ORDERS and CHURN: their computed trait and score are dropped.
    await changed(world, "bo", traits={"plan": "free"}, computed={"orders": 5.0}, scores={"churn": 0.9})
    await changed(world, "cy", traits={"plan": "free"}, computed={"orders": 1.0}, scores={"churn": 0.1})
    for person in ("bo", "cy"):
        await world.eventually(lambda person=person: _holds(world, person, "traits.plan", "free"))
        assert "computed.orders" not in (await record(world, person)).doc["fields"]
    service.people = {"bo": {"computed": {"orders": 5.0}, "scores": {"churn": 0.9}},
                      "cy": {"computed": {"orders": 1.0}, "scores": {"churn": 0.1}}}  # fmt: skip

    await world.publish_journey(ORDERS)
    await world.publish_journey(CHURN)
    await world.event("bo", "Go", "go-bo")
    await world.event("cy", "Go", "go-cy")
    assert await world.eventually(lambda: started(world, "bo", "orders")) == 1
    assert await world.eventually(lambda: started(world, "bo", "churn")) == 1
    await world.eventually(world.settled)
    assert await started(world, "cy", "orders") == 0 and await started(world, "cy", "churn") == 0
    assert sorted(set(service.asked)) == ["bo", "cy"]
    fields = (await record(world, "bo")).doc["fields"]
    assert (fields["computed.orders"], fields["scores.churn"]) == (5.0, 0.9)

    # From now on the changes bring them.
    await changed(world, "cy", computed={"orders": 7.0})
    await world.eventually(lambda: _holds(world, "cy", "computed.orders", 7.0))


async def test_a_person_the_profile_service_does_not_have_keeps_the_fields_held_here(world_factory, profile_service):
    # Read again for a journey published since, the profile service answers that it does not have them (a
    # store restored from an older copy): what orchestration held and still reads stays, so ORDERS starts.
    service, fetch = profile_service
    world = await world_factory(profile_fetch=fetch)
    await world.publish_journey(ORDERS)
    await world.start()
    await changed(world, "di", traits={"plan": "free"}, computed={"orders": 5.0}, scores={"churn": 0.9})
    await world.eventually(lambda: _holds(world, "di", "computed.orders", 5.0))
    await world.publish_journey(CHURN)  # reads scores.churn, which di's record was not kept with
    await world.event("di", "Go", "go-di")
    assert await world.eventually(lambda: started(world, "di", "orders")) == 1
    await world.eventually(world.settled)
    assert service.asked == ["di"]
    assert await started(world, "di", "churn") == 0  # its score was never held here and is not known
    stored = (await record(world, "di")).doc
    assert stored["fields"] == {"traits.plan": "free", "computed.orders": 5.0}


async def test_without_a_profile_service_every_field_is_kept(world_factory):
    world = await world_factory()
    await world.publish_journey(PLAN)
    await world.start()
    await changed(world, "dee", traits={"plan": "free"}, computed={"orders": 2.0}, scores={"churn": 0.4})
    stored = await world.eventually(lambda: record(world, "dee"))
    assert stored.doc["fields"] == {"traits.plan": "free", "computed.orders": 2.0, "scores.churn": 0.4}
    assert "reads" not in stored.doc
    await changed(world, "dee", computed={"orders": 3.0})
    await world.eventually(lambda: _holds(world, "dee", "computed.orders", 3.0))


async def test_a_record_written_before_without_a_fingerprint_is_used_as_it_is(world_factory, profile_service):
    service, fetch = profile_service
    world = await world_factory(profile_fetch=fetch)
    # As an earlier build wrote it: every field, no fingerprint.
    old = {"fields": {"traits.plan": "free", "computed.orders": 5.0, "computed.views_7d": 40.0}, "segments": []}
    await world.store.put(PERSONS, "eli", old)
    await world.publish_journey(PLAN)
    await world.publish_journey(ORDERS)
    await world.start()
    await world.event("eli", "Go", "go-eli")
    assert await world.eventually(lambda: started(world, "eli", "orders")) == 1
    assert service.asked == []  # complete: nothing read again
    stored = (await record(world, "eli")).doc
    # Written again under the set read now: what nothing reads is gone.
    assert stored["fields"] == {"traits.plan": "free", "computed.orders": 5.0}
    assert stored["reads"]


async def test_a_template_reading_a_whole_root_keeps_that_root_and_a_crm_task_without_signals_no_score():
    async with open_store("memory://") as store:
        journeys = Journeys(store)
        assert (read_set(journeys, Rules()).computed, read_set(journeys, Rules()).scores) == (frozenset(), frozenset())
        named = journey("named", "Go", 'traits.plan = "pro"')
        named["nodes"] = [
            {"id": "mail", "type": "action", "channel": "email", "purpose": "Marketing",
             "template": {"subject": "hi {{ computed.orders }}", "body": "{{ computed[traits.pick] }}"}},
        ]  # fmt: skip
        await journeys.save(lifecycle.publish(lifecycle.create(parse_journey(named))))
        keep = read_set(journeys, Rules())
        assert (keep.computed, keep.scores) == (None, frozenset())
        task = journey("task", "Go", "scores.churn > 0.5")
        task["nodes"] = [
            {"id": "task", "type": "action", "channel": "crm", "purpose": "Service", "category": "transactional",
             "template": {"kind": "task", "subject": "call", "body": "call them"}},
        ]  # fmt: skip
        await journeys.save(lifecycle.publish(lifecycle.create(parse_journey(task))))
        keep = read_set(journeys, Rules())
        # Its task carries the person's top scores, read by the CRM connector when it takes it (a test
        # below): only the score its condition reads is kept.
        assert (keep.computed, keep.scores) == (None, frozenset({"churn"}))


def test_whole_roots_names_a_root_read_other_than_field_by_field():
    cases = {
        "{{ computed.orders }} {{ scores['churn'] }}": frozenset(),
        "{% for name, value in scores.items() %}{{ name }}{% endfor %}": frozenset({"scores"}),
        "{{ computed[traits.pick] }}": frozenset({"computed"}),
        "{% set all = computed %}{{ all.orders }}": frozenset({"computed"}),
    }
    for body, roots in cases.items():
        assert whole_roots(compile_template({"subject": "s", "body": body}, "template")) == roots, body


# A CRM task naming no signals: it carries the person's top scores (`signals.top_signals`).
TASK = journey("call", "Call", 'traits.first_name = "Fay"')
TASK.pop("entry")
TASK["entry"] = {"segment": "at_risk", "on": "entered"}
TASK["nodes"] = [
    {"id": "task", "type": "action", "channel": "crm", "purpose": "Service", "category": "transactional",
     "template": {"kind": "task", "subject": "Call {{ traits.first_name }}"}},
]  # fmt: skip


async def _task(world, person: str):
    async def sent():
        found = [a for a in await world.actions() if a.person_id == person]
        return found[0] if found else None

    return await world.eventually(sent)


async def test_a_crm_task_naming_no_signals_goes_with_the_scores_held_marked_for_the_crm_connector(
    world_factory, profile_service
):
    """Its top scores are the CRM connector's to read (`signals_from_profile`), not orchestration's: read
    here, every action of the batch waited for the profile service (a webhook decided beside the task as
    long as the profile service's event loop was held). The task goes at once with the scores held here,
    none of which is kept for it, and nothing is asked of the profile service, even one that never answers."""
    service, _fetch = profile_service

    async def hung(person_ids):
        service.asked.extend(person_ids)
        await asyncio.Event().wait()

    world = await world_factory(profile_fetch=hung)
    await world.publish_journey(TASK)
    await world.start()
    await changed(world, "fay", traits={"first_name": "Fay"}, consent={"purpose:Service": True}, scores={"churn": 0.2})
    first = await world.eventually(lambda: record(world, "fay"))
    # No score is kept for the task: a change moving only scores writes nothing.
    assert first.doc["fields"] == {"traits.first_name": "Fay", "consent.purpose:Service": True}
    await changed(world, "fay", scores={"churn": 0.9, "upsell": 0.3})
    await world.eventually(world.settled)
    assert (await record(world, "fay")).version == first.version

    await world.segment("fay", "at_risk")
    task = await _task(world, "fay")
    assert task.content["subject"] == "Call Fay"
    assert list(task.signals) == [] and task.signals_from_profile
    assert [d["kind"] for d in await world.decisions("fay")] == ["sent"]
    assert service.asked == []


async def test_a_crm_task_naming_its_signals_is_not_marked(world_factory, profile_service):
    # Its node names what it carries: orchestration keeps those and puts them on it; nothing to read later.
    _service, fetch = profile_service
    named = dict(TASK, id="named")
    named["nodes"] = [dict(TASK["nodes"][0], signals=["scores.churn"])]
    world = await world_factory(profile_fetch=fetch)
    await world.publish_journey(named)
    await world.start()
    await changed(world, "gus", traits={"first_name": "Gus"}, consent={"purpose:Service": True}, scores={"churn": 0.7})
    await world.eventually(lambda: record(world, "gus"))
    await world.segment("gus", "at_risk")
    task = await _task(world, "gus")
    assert [(s.name, s.value) for s in task.signals] == [("scores.churn", "0.7")]
    assert not task.signals_from_profile
