"""Journeys are checked against the segments segmentation has, not only a catalogue file: a journey entering
on a segment that does not exist used to be accepted and published, and then never fired; a segment deleted
under an active journey left nothing saying so. Now saving and publishing refuse it (INVALID_ARGUMENT naming
the field), a publish waits for segmentation when the journey names segments (UNAVAILABLE while it cannot
be asked), and GetJourney / ListJourneys say when a live journey's segment was deleted since. A real
segmentation service and a real orchestration service, on a real nats-server, with tokens."""

from __future__ import annotations

import contextlib

import grpc
import orjson
import pytest

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp.orchestration.v1 import orchestration_pb2_grpc
from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_kit.auth import write_tokens_file
from cdp_kit.bus import Bus, events_resolved_stream, profiles_stream, segments_stream
from cdp_kit.natsserver import free_port
from cdp_kit.service import serving
from cdp_orchestration.__main__ import setup as orchestration_setup
from cdp_orchestration.catalogue import Catalogues
from cdp_orchestration.settings import OrchestrationSettings
from cdp_segmentation.__main__ import setup as segmentation_setup
from cdp_segmentation.settings import SegmentationSettings

ADMIN = [("authorization", "Bearer admin-token")]


def journey(journey_id: str, entry: dict, nodes: list | None = None) -> pb.JourneyDefinition:
    document = {
        "id": journey_id,
        "version": 1,
        "name": journey_id,
        "priority": 10,
        "category": "lifecycle",
        "timezone": "UTC",
        "entry": entry,
        "nodes": nodes or [{"id": "later", "type": "delay", "duration": "1d"}],
    }
    return pb.JourneyDefinition(json=orjson.dumps(document).decode())


@contextlib.asynccontextmanager
async def orchestration(nats_server, tmp_path, tokens, segmentation_address: str):
    settings = OrchestrationSettings(
        nats_url=nats_server.url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        auth_mode="tokens",
        auth_tokens_file=tokens,
        partitions=2,
        shutdown_grace=1.0,
        store_url=f"sqlite:///{tmp_path / 'orchestration.db'}",
        segmentation_address=segmentation_address,
        segmentation_token="orchestration-token",
    )
    async with serving(settings, orchestration_setup) as runtime:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
            yield orchestration_pb2_grpc.OrchestrationServiceStub(channel)


@pytest.fixture
async def platform(nats_server, tmp_path):
    tokens = tmp_path / "tokens.json"
    write_tokens_file(
        tokens,
        [("admin", "admin-token", ["*"]), ("orchestration", "orchestration-token", ["segmentation:read"])],
    )
    async with Bus.connect(nats_server.url, name="upstream") as bus:
        await bus.ensure_streams(events_resolved_stream(), segments_stream(), profiles_stream())
    segmentation_settings = SegmentationSettings(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="tokens", auth_tokens_file=tokens,
        partitions=1, shutdown_grace=1.0, store_url="memory://",
    )  # fmt: skip
    async with serving(segmentation_settings, segmentation_setup) as runtime:
        address = f"127.0.0.1:{runtime.grpc.port}"
        async with grpc.aio.insecure_channel(address) as channel:
            segments = segmentation_pb2_grpc.SegmentationServiceStub(channel)
            async with orchestration(nats_server, tmp_path, tokens, address) as journeys:
                yield segments, journeys


async def create_segment(segments, segment_id: str) -> None:
    definition = segmentation_pb2.Definition(text='traits.plan = "pro"')
    request = segmentation_pb2.CreateSegmentRequest(id=segment_id, definition=definition, wait=True)
    await segments.CreateSegment(request, metadata=ADMIN)


async def delete_segment(segments, segment_id: str) -> None:
    await segments.DeleteSegment(segmentation_pb2.DeleteSegmentRequest(id=segment_id), metadata=ADMIN)


async def test_a_journey_on_a_segment_that_does_not_exist_is_refused_naming_the_field(platform):
    segments, journeys = platform
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await journeys.CreateJourney(
            pb.CreateJourneyRequest(definition=journey("ghost", {"segment": "ghost"})), metadata=ADMIN
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "entry.segment" in refused.value.details() and "'ghost' is not a known segment" in refused.value.details()

    # Saved while the segment existed, deleted before the publish: the publish checks again.
    await create_segment(segments, "vip")
    await journeys.CreateJourney(pb.CreateJourneyRequest(definition=journey("vip", {"segment": "vip"})), metadata=ADMIN)
    await delete_segment(segments, "vip")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await journeys.PublishJourney(pb.PublishJourneyRequest(journey_id="vip"), metadata=ADMIN)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "entry.segment" in refused.value.details() and "'vip' is not a known segment" in refused.value.details()
    shown = await journeys.GetJourney(pb.GetJourneyRequest(journey_id="vip"), metadata=ADMIN)
    assert shown.state == pb.JOURNEY_STATE_DRAFT  # not published

    # A condition reading a segment's membership is checked the same way.
    branch = [{"id": "check", "type": "branch", "branches": [{"if": 'in_segment("gone")', "next": None}]}]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await journeys.CreateJourney(
            pb.CreateJourneyRequest(definition=journey("reads", {"event": "Visited"}, branch)), metadata=ADMIN
        )
    assert "segment 'gone', which does not exist" in refused.value.details()


async def test_a_segment_deleted_under_an_active_journey_shows_on_the_journey(platform):
    segments, journeys = platform
    await create_segment(segments, "vip")
    await journeys.CreateJourney(pb.CreateJourneyRequest(definition=journey("vip", {"segment": "vip"})), metadata=ADMIN)
    published = await journeys.PublishJourney(pb.PublishJourneyRequest(journey_id="vip"), metadata=ADMIN)
    assert published.state == pb.JOURNEY_STATE_ACTIVE and list(published.warnings) == []

    await delete_segment(segments, "vip")
    shown = await journeys.GetJourney(pb.GetJourneyRequest(journey_id="vip"), metadata=ADMIN)
    [warning] = shown.warnings
    assert warning.startswith("enters on segment 'vip', which does not exist any more (deleted in segmentation)")
    [listed] = (await journeys.ListJourneys(pb.ListJourneysRequest(), metadata=ADMIN)).journeys
    assert list(listed.warnings) == [warning]

    await create_segment(segments, "vip")
    shown = await journeys.GetJourney(pb.GetJourneyRequest(journey_id="vip"), metadata=ADMIN)
    assert list(shown.warnings) == []


async def test_a_publish_naming_segments_waits_for_segmentation(nats_server, tmp_path):
    tokens = tmp_path / "tokens.json"
    write_tokens_file(tokens, [("admin", "admin-token", ["*"])])
    async with Bus.connect(nats_server.url, name="upstream") as bus:
        await bus.ensure_streams(events_resolved_stream(), segments_stream(), profiles_stream())
    nobody = f"127.0.0.1:{free_port()}"  # segmentation is down
    async with orchestration(nats_server, tmp_path, tokens, nobody) as journeys:
        # Editing goes on (the segments are not checked while segmentation cannot be asked)...
        await journeys.CreateJourney(
            pb.CreateJourneyRequest(definition=journey("vip", {"segment": "vip"})), metadata=ADMIN
        )
        # ...but a journey naming a segment does not go live unchecked.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await journeys.PublishJourney(pb.PublishJourneyRequest(journey_id="vip"), metadata=ADMIN)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "segmentation service could not be asked" in refused.value.details()
        # A journey naming no segment does not need it.
        await journeys.CreateJourney(
            pb.CreateJourneyRequest(definition=journey("cart", {"event": "C"})), metadata=ADMIN
        )
        published = await journeys.PublishJourney(pb.PublishJourneyRequest(journey_id="cart"), metadata=ADMIN)
        assert published.state == pb.JOURNEY_STATE_ACTIVE
        assert list((await journeys.GetJourney(pb.GetJourneyRequest(journey_id="vip"), metadata=ADMIN)).warnings) == []


async def test_scores_are_checked_against_the_deployed_models_when_scoring_lists_any():
    from cdp_orchestration.domain.document import JourneyInvalid, parse_journey

    document = orjson.loads(
        journey(
            "churn",
            {"event": "Visited", "if": "scores.churn_risk > 0.8"},
        ).json
    )

    async def deployed() -> frozenset[str]:
        return frozenset({"conversion"})

    async def none_yet() -> None:
        return None

    with pytest.raises(JourneyInvalid, match=r"scores\.churn_risk, which is not a known profile field"):
        parse_journey(document, await Catalogues(scores=deployed).current())
    parse_journey(document, await Catalogues(scores=none_yet).current())  # no model yet: not checked
