"""`cdpctl definitions import --replace` against the real orchestration service: a journey is changed only
while it is still as the import read it. An edit someone saves between the import's read and its write
stops the import of that journey with a message naming what to do, and the edit stays."""

from __future__ import annotations

import json

import grpc
import pytest

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp.orchestration.v1 import orchestration_pb2_grpc
from cdpctl.definitions_apply import FAILED, REPLACED, Apply
from cdpctl.definitions_read import Services, read_journeys
from cdpctl.platform import Workspace

V1 = {
    "id": "slow-welcome",
    "version": 1,
    "name": "Slow welcome",
    "entry": {"api": True},
    "nodes": [{"id": "later", "type": "delay", "duration": "1h"}],
}
V2 = {**V1, "version": 2, "name": "Slower welcome", "nodes": [{"id": "later", "type": "delay", "duration": "2h"}]}
V3 = {**V2, "version": 3, "name": "Slowest welcome"}
THEIRS = {**V1, "version": 2, "name": "Someone else's welcome"}


def definition(journey: dict) -> pb.JourneyDefinition:
    return pb.JourneyDefinition(json=json.dumps(journey))


class EditBeforeFirstWrite(Services):
    """The platform as another operator edits it: their draft is saved just before the import's first write."""

    edited = False

    async def call(self, service: str, rpc: str, request, **options):
        if rpc in ("UpdateJourney", "PublishJourney", "PauseJourney") and not self.edited:
            self.edited = True
            await self.stubs[service].UpdateJourney(
                pb.UpdateJourneyRequest(journey_id=V1["id"], definition=definition(THEIRS))
            )
        return await super().call(service, rpc, request, **options)


@pytest.fixture
async def stub(orchestration_cli):
    address = Workspace(orchestration_cli.home).read_run()["services"]["orchestration"]["grpc"]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = orchestration_pb2_grpc.OrchestrationServiceStub(channel)
        await stub.CreateJourney(pb.CreateJourneyRequest(definition=definition(V1)))
        await stub.PublishJourney(pb.PublishJourneyRequest(journey_id=V1["id"]))
        yield stub


@pytest.mark.parametrize("versions", [[V1, V2], [V1, V2, V3]], ids=["update first", "pause first"])
async def test_an_edit_saved_after_the_import_read_the_journey_is_never_overwritten(stub, versions):
    """One new version: the import's first write is the draft's update, which the service refuses. Two: the
    import pauses the journey first (a call that takes no revision), sees from its answer that it was not
    the only change, and stops there."""
    services = EditBeforeFirstWrite({"orchestration": stub}, ())
    present = await read_journeys(services)
    wanted = [{"id": V1["id"], "state": "active", "versions": versions, "draft": None}]

    [outcome] = await Apply(services, dry_run=False, replace=True).journeys(wanted, present)

    assert services.edited
    assert outcome.status == FAILED
    assert "changed on the platform since this import read it" in outcome.detail
    assert f"cdpctl journey get {V1['id']}" in outcome.detail
    draft = await stub.GetJourney(pb.GetJourneyRequest(journey_id=V1["id"], draft=True))
    assert draft.definition["name"] == THEIRS["name"]  # theirs stays; v2 was not published
    assert (await stub.GetJourney(pb.GetJourneyRequest(journey_id=V1["id"]))).version == 1


async def test_an_import_that_nobody_interrupts_makes_every_change(stub):
    services = Services({"orchestration": stub}, ())
    present = await read_journeys(services)
    wanted = [{"id": V1["id"], "state": "paused", "versions": [V1, V2], "draft": None}]

    [outcome] = await Apply(services, dry_run=False, replace=True).journeys(wanted, present)

    assert outcome.status == REPLACED, outcome.detail
    journey = await stub.GetJourney(pb.GetJourneyRequest(journey_id=V1["id"]))
    assert journey.version == 2 and journey.state == pb.JOURNEY_STATE_PAUSED
