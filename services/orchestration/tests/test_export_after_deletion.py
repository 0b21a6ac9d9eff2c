"""After a privacy deletion, orchestration says the person was deleted rather than "no decisions": a support
trial read `cdpctl decisions` of a deleted person as "no journey has tried to reach them". ListDecisions
answers NOT_FOUND with reason `person_deleted` (naming the privacy request) while the deletion's marker is
kept (CDP_ORCHESTRATION_TOMBSTONE_DAYS); a person orchestration never reached still gets an empty list."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp.orchestration.v1 import orchestration_pb2_grpc
from cdp.privacy.v1 import privacy_pb2
from cdp_kit.auth import write_tokens_file
from cdp_kit.bus import (
    Bus,
    OutMessage,
    events_resolved_stream,
    privacy_stream,
    profiles_stream,
    segments_stream,
    subjects,
)
from cdp_orchestration.privacy import consumer_spec

from .test_api import WELCOME, definition, profile, served

ADMIN = [("authorization", "Bearer admin-token")]


@pytest.fixture
async def service(nats_server, tmp_path):
    tokens = tmp_path / "tokens.json"
    write_tokens_file(tokens, [("admin", "admin-token", ["*"])])
    async with Bus.connect(nats_server.url, name="upstream") as bus:
        await bus.ensure_streams(events_resolved_stream(), segments_stream(), profiles_stream(), privacy_stream())
        async with served(nats_server, tmp_path, tokens=tokens) as (channel, runtime):
            yield orchestration_pb2_grpc.OrchestrationServiceStub(channel), runtime, bus


async def _decisions(stub, person: str) -> list:
    request = pb.ListDecisionsRequest(person_id=person, page_size=100)
    return list((await stub.ListDecisions(request, metadata=ADMIN)).decisions)


def _reason(error: grpc.aio.AioRpcError) -> str:
    (packed,) = [d for d in rpc_status.from_call(error).details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    info = error_details_pb2.ErrorInfo()
    packed.Unpack(info)
    return info.reason


async def test_the_decisions_of_a_deleted_person_say_they_were_deleted(service):
    stub, runtime, bus = service
    await stub.CreateJourney(pb.CreateJourneyRequest(definition=definition(WELCOME)), metadata=ADMIN)
    await stub.PublishJourney(pb.PublishJourneyRequest(journey_id=WELCOME["id"]), metadata=ADMIN)
    for person in ("p_ada", "p_bob"):
        await profile(runtime, person, first_name="Someone")
        enroll = pb.EnrollRequest(journey_id=WELCOME["id"], person_id=person, idempotency_key=f"k-{person}")
        assert (await stub.Enroll(enroll, metadata=ADMIN)).entered
    for _ in range(300):
        if await _decisions(stub, "p_ada") and await _decisions(stub, "p_bob"):
            break
        await asyncio.sleep(0.05)
    assert await _decisions(stub, "p_ada")  # awaiting approval

    notice = privacy_pb2.PrivacyDeleted(request_id="req-ada-7", person_id="p_ada", merged_person_ids=["p_ada-old"])
    [published] = await bus.publisher.publish_batch(
        [OutMessage(subjects.PRIVACY_DELETED, notice.SerializeToString(), "privacy:req-ada-7")]
    )
    assert published.ok
    for _ in range(600):
        info = await bus.js.consumer_info(subjects.PRIVACY, consumer_spec().durable)
        if info.ack_floor.stream_seq == published.seq and not info.num_ack_pending:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the deletion was not handled")

    for person in ("p_ada", "p_ada-old"):  # a person merged into the deleted one went with them
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _decisions(stub, person)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert _reason(refused.value) == "person_deleted"
        details = refused.value.details()
        assert f"person {person} was deleted" in details and "req-ada-7" in details
    # Filtered to one journey, the same answer: nothing of theirs is kept at all.
    with pytest.raises(grpc.aio.AioRpcError) as filtered:
        await stub.ListDecisions(pb.ListDecisionsRequest(person_id="p_ada", journey_id=WELCOME["id"]), metadata=ADMIN)
    assert _reason(filtered.value) == "person_deleted"
    # Others are as they were: Bob's decisions, and nothing (not an error) for a person never reached.
    assert await _decisions(stub, "p_bob")
    assert await _decisions(stub, "p_nobody") == []
