"""A journey's draft over gRPC, with bearer tokens, in-process on a real nats-server: GetJourney reads it
(draft=true) beside the live version, DiscardDraft throws it away (idempotent: a journey without a draft
answers OK, discarded=false), with the scope that edits a draft; an unknown journey is NOT_FOUND naming
it, a journey never published (its draft is all it holds) is FAILED_PRECONDITION saying to archive it."""

from __future__ import annotations

import grpc
import orjson
import pytest

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp.orchestration.v1 import orchestration_pb2_grpc
from cdp_kit.auth import write_tokens_file
from cdp_kit.bus import Bus, events_resolved_stream, profiles_stream, segments_stream
from cdp_orchestration.api import SCOPES
from cdp_orchestration.journeys import Journeys

from .test_api import served

EDITOR = [("authorization", "Bearer editor-token")]
READER = [("authorization", "Bearer reader-token")]

SLOW = {
    "id": "slow",
    "version": 1,
    "name": "Slow",
    "priority": 1,
    "category": "reminder",
    "timezone": "UTC",
    "entry": {"api": True},
    "reentry": "always",
    "nodes": [{"id": "later", "type": "delay", "duration": "1h"}],
}
SLOWER = {**SLOW, "version": 2, "nodes": [{"id": "later", "type": "delay", "duration": "2h"}]}


@pytest.fixture
async def service(nats_server, tmp_path):
    tokens = tmp_path / "tokens.json"
    write_tokens_file(
        tokens,
        [
            ("editor", "editor-token", ["orchestration:admin"]),
            ("reader", "reader-token", ["orchestration:read", "orchestration:write", "orchestration:approve"]),
        ],
    )
    async with Bus.connect(nats_server.url, name="upstream") as bus:
        await bus.ensure_streams(events_resolved_stream(), segments_stream(), profiles_stream())
    async with served(nats_server, tmp_path, tokens=tokens) as (channel, runtime):
        yield orchestration_pb2_grpc.OrchestrationServiceStub(channel), runtime


def definition(document: dict) -> pb.JourneyDefinition:
    return pb.JourneyDefinition(json=orjson.dumps(document).decode())


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value


async def test_a_discarded_draft_leaves_the_live_version_and_discarding_again_is_ok(service):
    stub, runtime = service
    await stub.CreateJourney(pb.CreateJourneyRequest(definition=definition(SLOW)), metadata=EDITOR)
    await stub.PublishJourney(pb.PublishJourneyRequest(journey_id="slow"), metadata=EDITOR)
    edited = await stub.UpdateJourney(
        pb.UpdateJourneyRequest(journey_id="slow", definition=definition(SLOWER)), metadata=EDITOR
    )
    assert (edited.version, edited.draft_version) == (1, 2)

    # The draft is read beside the live version (what `cdpctl definitions export` keeps).
    draft = await stub.GetJourney(pb.GetJourneyRequest(journey_id="slow", draft=True), metadata=READER)
    assert (draft.version, draft.draft_version) == (1, 2)
    assert draft.definition["nodes"][0]["duration"] == "2h"
    live = await stub.GetJourney(pb.GetJourneyRequest(journey_id="slow"), metadata=READER)
    assert live.definition["nodes"][0]["duration"] == "1h"

    answer = await stub.DiscardDraft(pb.DiscardDraftRequest(journey_id="slow"), metadata=EDITOR)
    assert answer.discarded and answer.discarded_version == 2
    assert (answer.journey.state, answer.journey.version, answer.journey.draft_version) == (
        pb.JOURNEY_STATE_ACTIVE,
        1,
        0,
    )
    assert answer.journey.definition["nodes"][0]["duration"] == "1h"
    error = await refused(stub.GetJourney(pb.GetJourneyRequest(journey_id="slow", draft=True), metadata=READER))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "slow has no draft" in error.details()

    # Idempotent: nothing left to discard answers OK, saying nothing was discarded.
    again = await stub.DiscardDraft(pb.DiscardDraftRequest(journey_id="slow"), metadata=EDITOR)
    assert not again.discarded and again.discarded_version == 0 and again.journey.version == 1

    # Stored, not only this replica's memory: the journeys as another replica (or a restart) reads them.
    fresh = Journeys(runtime.parts["store"])
    await fresh.load()
    assert fresh.records["slow"].draft is None and sorted(fresh.records["slow"].versions) == [1]

    # The next edit is version 2 again, and publishes as any draft does.
    await stub.UpdateJourney(pb.UpdateJourneyRequest(journey_id="slow", definition=definition(SLOWER)), metadata=EDITOR)
    published = await stub.PublishJourney(pb.PublishJourneyRequest(journey_id="slow"), metadata=EDITOR)
    assert published.version == 2 and published.draft_version == 0


async def test_discard_draft_names_the_journey_it_cannot_find_and_what_to_do_with_one_never_published(service):
    stub, _ = service
    error = await refused(stub.DiscardDraft(pb.DiscardDraftRequest(journey_id="nowhere"), metadata=EDITOR))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "journey nowhere does not exist" in error.details()
    error = await refused(stub.DiscardDraft(pb.DiscardDraftRequest(), metadata=EDITOR))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "journey_id" in error.details()

    # Never published: the draft is the whole journey; discarding it would leave a journey of nothing.
    await stub.CreateJourney(pb.CreateJourneyRequest(definition=definition(SLOW)), metadata=EDITOR)
    error = await refused(stub.DiscardDraft(pb.DiscardDraftRequest(journey_id="slow"), metadata=EDITOR))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "never been published" in error.details() and "cdpctl journey archive slow" in error.details()
    kept = await stub.GetJourney(pb.GetJourneyRequest(journey_id="slow", draft=True), metadata=READER)
    assert kept.draft_version == 1

    error = await refused(
        stub.GetJourney(pb.GetJourneyRequest(journey_id="slow", draft=True, version=1), metadata=READER)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "version" in error.details()


async def test_discarding_a_draft_takes_the_scope_that_edits_one(service):
    assert SCOPES["DiscardDraft"] == SCOPES["UpdateJourney"] == "orchestration:admin"
    stub, _ = service
    await stub.CreateJourney(pb.CreateJourneyRequest(definition=definition(SLOW)), metadata=EDITOR)
    await stub.PublishJourney(pb.PublishJourneyRequest(journey_id="slow"), metadata=EDITOR)
    await stub.UpdateJourney(pb.UpdateJourneyRequest(journey_id="slow", definition=definition(SLOWER)), metadata=EDITOR)
    error = await refused(stub.DiscardDraft(pb.DiscardDraftRequest(journey_id="slow"), metadata=READER))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    still = await stub.GetJourney(pb.GetJourneyRequest(journey_id="slow"), metadata=READER)
    assert still.draft_version == 2
