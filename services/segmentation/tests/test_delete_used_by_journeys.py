"""A segment a live journey uses is not deleted from under it. Deleting one a published journey entered on
succeeded, and the journey then never entered anyone (its only sign a warning on GetJourney). Now
segmentation asks orchestration (ListJourneys) and refuses with FAILED_PRECONDITION naming the active or
paused journeys that enter on it, are scheduled over it or read its membership, unless the caller forces
it; an orchestration that cannot be asked is UNAVAILABLE. Drafts and archived journeys do not hold a
segment. Real segmentation and orchestration services on a real nats-server, with each one's token."""

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
from cdp_orchestration.settings import OrchestrationSettings
from cdp_segmentation.__main__ import setup as segmentation_setup
from cdp_segmentation.settings import SegmentationSettings

ADMIN = [("authorization", "Bearer admin-token")]


@contextlib.asynccontextmanager
async def _segmentation(nats_server, tokens, orchestration_address: str, port: int = 0):
    async with Bus.connect(nats_server.url, name="upstream") as bus:
        await bus.ensure_streams(events_resolved_stream(), segments_stream(), profiles_stream())
    settings = SegmentationSettings(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=port, auth_mode="tokens", auth_tokens_file=tokens,
        partitions=1, shutdown_grace=1.0, store_url="memory://",
        orchestration_address=orchestration_address, orchestration_token="segmentation-token",
    )  # fmt: skip
    async with serving(settings, segmentation_setup) as runtime:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
            yield segmentation_pb2_grpc.SegmentationServiceStub(channel)


def _tokens(path):
    write_tokens_file(
        path,
        [
            ("admin", "admin-token", ["*"]),
            ("segmentation", "segmentation-token", ["orchestration:read"]),
            ("orchestration", "orchestration-token", ["segmentation:read"]),
        ],
    )
    return path


@pytest.fixture
async def platform(nats_server, tmp_path):
    tokens = _tokens(tmp_path / "tokens.json")
    segmentation_port, orchestration_port = free_port(), free_port()
    orchestration = OrchestrationSettings(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=orchestration_port, auth_mode="tokens",
        auth_tokens_file=tokens, partitions=1, shutdown_grace=1.0, store_url=f"sqlite:///{tmp_path / 'o.db'}",
        segmentation_address=f"127.0.0.1:{segmentation_port}", segmentation_token="orchestration-token",
    )  # fmt: skip
    async with _segmentation(nats_server, tokens, f"127.0.0.1:{orchestration_port}", segmentation_port) as segments:
        async with serving(orchestration, orchestration_setup):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{orchestration_port}") as channel:
                yield segments, orchestration_pb2_grpc.OrchestrationServiceStub(channel)


async def _segment(segments, segment_id: str) -> None:
    definition = segmentation_pb2.Definition(text='traits.plan = "pro"')
    await segments.CreateSegment(
        segmentation_pb2.CreateSegmentRequest(id=segment_id, definition=definition, wait=True), metadata=ADMIN
    )


async def _journey(journeys, journey_id: str, entry: dict, nodes: list | None = None, *, publish: bool = True):
    document = {
        "id": journey_id, "version": 1, "name": f"{journey_id} journey", "priority": 10, "category": "lifecycle",
        "timezone": "UTC", "entry": entry, "nodes": nodes or [{"id": "later", "type": "delay", "duration": "1d"}],
    }  # fmt: skip
    definition = pb.JourneyDefinition(json=orjson.dumps(document).decode())
    await journeys.CreateJourney(pb.CreateJourneyRequest(definition=definition), metadata=ADMIN)
    if publish:
        await journeys.PublishJourney(pb.PublishJourneyRequest(journey_id=journey_id), metadata=ADMIN)


async def _delete(segments, segment_id: str, *, force: bool = False) -> segmentation_pb2.DeleteSegmentResponse:
    return await segments.DeleteSegment(
        segmentation_pb2.DeleteSegmentRequest(id=segment_id, force=force), metadata=ADMIN
    )


async def _ids(segments) -> set[str]:
    listed = await segments.ListSegments(segmentation_pb2.ListSegmentsRequest(), metadata=ADMIN)
    return {s.id for s in listed.segments}


async def test_a_segment_a_live_journey_uses_is_not_deleted_unless_forced(platform):
    segments, journeys = platform
    await _segment(segments, "vip")
    await _journey(journeys, "welcome-vip", {"segment": "vip", "on": "entered"})
    branch = [{"id": "check", "type": "branch", "branches": [{"if": 'in_segment("vip")', "next": None}]}]
    await _journey(journeys, "reads-vip", {"event": "Visited"}, branch)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _delete(segments, "vip")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = refused.value.details()
    assert "live journeys 'reads-vip' (reads-vip journey), 'welcome-vip' (welcome-vip journey)" in details
    assert "force" in details
    assert "vip" in await _ids(segments)

    # Paused is still live (it resumes on the same version); archived is not.
    for journey_id in ("welcome-vip", "reads-vip"):
        await journeys.PauseJourney(pb.JourneyRef(journey_id=journey_id), metadata=ADMIN)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _delete(segments, "vip")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await journeys.ArchiveJourney(pb.JourneyRef(journey_id="reads-vip"), metadata=ADMIN)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _delete(segments, "vip")
    assert "'welcome-vip'" in refused.value.details() and "reads-vip" not in refused.value.details()

    await _delete(segments, "vip", force=True)
    assert "vip" not in await _ids(segments)


async def test_a_segment_only_a_draft_or_a_scheduled_journey_names(platform):
    segments, journeys = platform
    await _segment(segments, "drafted")
    await _segment(segments, "weekly")
    await _journey(journeys, "not-yet", {"segment": "drafted", "on": "exited"}, publish=False)
    await _journey(journeys, "monday", {"schedule": {"cron": "0 9 * * 1", "segment": "weekly"}})
    await _delete(segments, "drafted")  # a draft is not live: nothing is checked against it
    assert "drafted" not in await _ids(segments)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _delete(segments, "weekly")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'monday' (monday journey)" in refused.value.details()


async def test_a_deletion_orchestration_cannot_be_asked_about_is_unavailable_unless_forced(nats_server, tmp_path):
    tokens = _tokens(tmp_path / "tokens.json")
    nobody = f"127.0.0.1:{free_port()}"  # orchestration is down
    async with _segmentation(nats_server, tokens, nobody) as segments:
        await _segment(segments, "vip")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _delete(segments, "vip")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "orchestration service could not be asked" in refused.value.details()
        assert "vip" in await _ids(segments)
        # An unknown segment is still NOT_FOUND, without asking anyone.
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await _delete(segments, "nothing")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        await _delete(segments, "vip", force=True)
        assert "vip" not in await _ids(segments)
