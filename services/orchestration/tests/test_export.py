"""PrivacyService/ExportPerson on orchestration, over gRPC with bearer tokens: the person's instances,
decisions, approvals, inbox, sends, Enroll answers and held profile view, with those of the persons merged into them;
nobody else's; an empty document for a person orchestration never saw; refused without privacy:export."""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp.orchestration.v1 import orchestration_pb2_grpc
from cdp.privacy.v1 import privacy_pb2, privacy_pb2_grpc
from cdp_kit.auth import write_tokens_file
from cdp_kit.bus import Bus, events_resolved_stream, profiles_stream, segments_stream
from cdp_testing.person_export import assert_person_required, assert_read_scope_refused, assert_unstorable_ids_named

from .test_api import SLOW, WELCOME, definition, profile, served

ADMIN = [("authorization", "Bearer admin-token")]
READER = [("authorization", "Bearer reader-token")]
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@pytest.fixture
async def service(nats_server, tmp_path):
    tokens = tmp_path / "tokens.json"
    write_tokens_file(
        tokens, [("admin", "admin-token", ["*"]), ("reader", "reader-token", ["orchestration:read", "profile:read"])]
    )
    async with Bus.connect(nats_server.url, name="upstream") as bus:
        await bus.ensure_streams(events_resolved_stream(), segments_stream(), profiles_stream())
    async with served(nats_server, tmp_path, tokens=tokens) as (channel, runtime):
        yield (
            orchestration_pb2_grpc.OrchestrationServiceStub(channel),
            privacy_pb2_grpc.PrivacyServiceStub(channel),
            runtime,
        )


async def _export(privacy, person: str, merged: list[str] | None = None) -> dict:
    request = privacy_pb2.ExportPersonRequest(person_id=person, merged_person_ids=merged or [])
    response = await privacy.ExportPerson(request, metadata=ADMIN)
    assert response.service == "orchestration"
    return json_format.MessageToDict(response.document)


async def _publish(stub, *journeys: dict) -> None:
    for journey in journeys:
        await stub.CreateJourney(pb.CreateJourneyRequest(definition=definition(journey)), metadata=ADMIN)
        await stub.PublishJourney(pb.PublishJourneyRequest(journey_id=journey["id"]), metadata=ADMIN)


async def test_a_person_gets_everything_orchestration_keeps_about_them_and_nothing_of_anyone_else(service):
    stub, privacy, runtime = service
    await _publish(stub, WELCOME, SLOW)
    # "p_ada:x" is someone else whose id starts with p_ada's and the store's key separator.
    for person in ("p_ada", "p_bob", "p_ada:x"):
        await profile(runtime, person, first_name=f"{person.removeprefix('p_').title()}-name")
        properties = struct_pb2.Struct()
        properties.update({"amount": 250})
        enroll = pb.EnrollRequest(
            journey_id="welcome-bonus", person_id=person, idempotency_key=f"k-{person}", properties=properties
        )
        assert (await stub.Enroll(enroll, metadata=ADMIN)).entered
    # ada-old is a person identity merged into ada: what orchestration keeps under that id is ada's too.
    old = await stub.Enroll(
        pb.EnrollRequest(journey_id="slow", person_id="p_ada-old", idempotency_key="k"), metadata=ADMIN
    )
    approvals = (await stub.ListApprovals(pb.ListApprovalsRequest(), metadata=ADMIN)).approvals
    [ada_bonus] = [a for a in approvals if a.person_id == "p_ada"]
    await stub.ApproveAction(pb.DecideApprovalRequest(action_id=ada_bonus.action_id, decided_by="lead"), metadata=ADMIN)
    for _ in range(300):
        document = await _export(privacy, "p_ada", ["p_ada-old"])
        if document.get("inbox") and document.get("sends"):
            break
        await asyncio.sleep(0.05)

    assert [p["person_id"] for p in document["persons"]] == ["p_ada", "p_ada-old"]
    person = document["persons"][0]
    assert person["fields"]["traits.first_name"] == "Ada-name"
    assert person["fields"]["consent.purpose:Marketing"] is True
    assert [sent["channel"] for sent in person["frequency"]] == ["inapp"]
    instances = {i["journey_id"]: i for i in document["instances"]}
    assert set(instances) == {"welcome-bonus", "slow"}
    assert instances["slow"]["person_id"] == "p_ada-old" and instances["slow"]["id"] == old.instance_id
    assert instances["slow"]["state"] == "running" and instances["slow"]["step"] == "later"
    assert RFC3339.match(instances["welcome-bonus"]["entered_at"])
    assert {d["kind"] for d in document["decisions"]} >= {"awaiting_approval"}
    [approval] = document["approvals"]
    assert approval["state"] == "approved" and RFC3339.match(approval["decided_at"])
    [message] = document["inbox"]
    assert message["title"] == "A bonus for you" and message["body"] == "250 credits, Ada-name"
    assert RFC3339.match(message["created_at"]) and message["read_at"] is None
    [send] = document["sends"]
    assert send["channel"] == "inapp" and send["status"] and send["attempts"] >= 1 and RFC3339.match(send["at"])

    text = str(document)
    assert (
        "bob" not in text.lower() and "p_ada:x" not in text
    )  # nothing of Bob: not his name, his instance, decision or approval

    bob = await _export(privacy, "p_bob")
    assert "ada" not in str(bob).lower()
    assert [i["person_id"] for i in bob["instances"]] == ["p_bob"] and "inbox" not in bob
    # Without the merged id, ada-old's instance is not ada's answer.
    assert {i["journey_id"] for i in (await _export(privacy, "p_ada"))["instances"]} == {"welcome-bonus"}


async def test_a_persons_enroll_answers_are_exported_with_their_idempotency_keys_and_nobody_elses(service):
    """A support trial: Enroll's answers (kept under the caller's idempotency key, which may carry personal
    data) are erased with the person but were not in their export."""
    stub, privacy, runtime = service
    await _publish(stub, WELCOME, SLOW)
    for person in ("p_ada", "p_bob", "p_ada:x"):
        await profile(runtime, person, first_name=f"{person.removeprefix('p_').title()}-name")
        enroll = pb.EnrollRequest(journey_id="slow", person_id=person, idempotency_key=f"order-{person}@example.org")
        assert (await stub.Enroll(enroll, metadata=ADMIN)).entered
    # ada-old is merged into ada (identity's graph): its answer is ada's too.
    old = await stub.Enroll(
        pb.EnrollRequest(journey_id="slow", person_id="p_ada-old", idempotency_key="old-key"), metadata=ADMIN
    )
    # An answer that entered nothing is kept (and exported) as well.
    await stub.PauseJourney(pb.JourneyRef(journey_id="welcome-bonus"), metadata=ADMIN)
    paused = await stub.Enroll(
        pb.EnrollRequest(journey_id="welcome-bonus", person_id="p_ada", idempotency_key="k:paused"), metadata=ADMIN
    )
    assert not paused.entered

    document = await _export(privacy, "p_ada", ["p_ada-old"])

    answers = {(a["journey_id"], a["idempotency_key"]): a for a in document["enrollments"]}
    assert set(answers) == {
        ("slow", "order-p_ada@example.org"),
        ("slow", "old-key"),
        ("welcome-bonus", "k:paused"),
    }
    ada = answers["slow", "order-p_ada@example.org"]
    assert ada["person_id"] == "p_ada" and ada["entered"] is True and ada["instance_id"]
    assert ada["key"] == "slow:order-p_ada@example.org" and RFC3339.match(ada["at"])
    assert answers["slow", "old-key"]["person_id"] == "p_ada-old"
    assert answers["slow", "old-key"]["instance_id"] == old.instance_id
    refused = answers["welcome-bonus", "k:paused"]
    assert refused["entered"] is False and refused["reason"] == paused.reason and refused["instance_id"] == ""
    assert "bob" not in str(document).lower() and "p_ada:x" not in str(document)
    bob = await _export(privacy, "p_bob")
    assert [(a["idempotency_key"], a["person_id"]) for a in bob["enrollments"]] == [
        ("order-p_bob@example.org", "p_bob")
    ]


async def test_an_unknown_person_gets_an_empty_document(service):
    _, privacy, _ = service
    assert await _export(privacy, "nobody-known", ["nobody-either"]) == {}


async def test_a_read_scope_cannot_export_a_person(service):
    _, privacy, _ = service
    await assert_read_scope_refused(privacy, READER)


async def test_a_read_scope_reads_journeys_but_not_a_persons_instances_decisions_or_held_actions(service):
    """orchestration:read is what another service holds to see which journeys use a segment or a computed
    trait (segmentation's token); a person's instances, decisions and held actions are theirs, read with
    orchestration:people (the second security trial: segmentation's token could list anyone's)."""
    stub, _, _ = service
    await stub.CreateJourney(pb.CreateJourneyRequest(definition=definition(WELCOME)), metadata=ADMIN)
    assert [j.id for j in (await stub.ListJourneys(pb.ListJourneysRequest(), metadata=READER)).journeys] == [
        WELCOME["id"]
    ]
    for call, request in (
        (stub.ListDecisions, pb.ListDecisionsRequest(person_id="p_ada")),
        (stub.ListInstances, pb.ListInstancesRequest(person_id="p_ada")),
        (stub.GetInstance, pb.GetInstanceRequest(instance_id="i-1")),
        (stub.ListApprovals, pb.ListApprovalsRequest()),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(request, metadata=READER)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "orchestration:people" in refused.value.details()
    await stub.ListDecisions(pb.ListDecisionsRequest(person_id="p_ada"), metadata=ADMIN)


async def test_a_person_id_is_required(service):
    _, privacy, _ = service
    await assert_person_required(privacy, ADMIN)


async def test_an_id_the_store_cannot_hold_is_refused_naming_the_field(service):
    _, privacy, _ = service
    await assert_unstorable_ids_named(privacy, ADMIN)


def test_an_exempt_send_is_exported_as_exempt_not_as_a_send_on_no_channel():
    """A privacy trial read `channel: ""` on every send of a transactional journey: the arbiter keeps an exempt
    send without its channel (it counts toward no cap), and the export said nothing of why."""
    from cdp_orchestration.export import _person

    person = _person("p-1", {"arbiter": {"sent": [[1.0, "", "a-receipt"], [2.0, "email", "a-offer"]]}})
    assert [(s["action_id"], s["channel"], s["exempt"]) for s in person["frequency"]] == [
        ("a-receipt", "", True),
        ("a-offer", "email", False),
    ]
