"""ListComputedTraitReaders (segmentation:read, which profile's and orchestration's own tokens hold) asked
orchestration's ListJourneys on every call: any such caller made segmentation call orchestration as often
as it liked. Now the answer is kept CDP_SEGMENTATION_READERS_CACHE_SECONDS, one call at a time, and
forgotten the moment orchestration announces a change (orchestration.journeys.changed), so a journey
published just before is named all the same. Real segmentation and orchestration services on a real
nats-server, each with its own token; the calls segmentation makes are counted on its client of
orchestration."""

from __future__ import annotations

import asyncio
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
from cdp_segmentation.cache import Cached
from cdp_segmentation.settings import SegmentationSettings

ADMIN = [("authorization", "Bearer admin-token")]
# What the profile service's own token holds: a reader of segmentation, nothing more.
READER = [("authorization", "Bearer profile-token")]


@pytest.fixture
async def platform(nats_server, tmp_path):
    tokens = tmp_path / "tokens.json"
    write_tokens_file(
        tokens,
        [
            ("admin", "admin-token", ["*"]),
            ("profile", "profile-token", ["segmentation:read"]),
            ("segmentation", "segmentation-token", ["orchestration:read"]),
            ("orchestration", "orchestration-token", ["segmentation:read"]),
        ],
    )
    segmentation_port, orchestration_port = free_port(), free_port()
    async with Bus.connect(nats_server.url, name="upstream") as bus:
        await bus.ensure_streams(events_resolved_stream(), segments_stream(), profiles_stream())
    segmentation = SegmentationSettings(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=segmentation_port, auth_mode="tokens",
        auth_tokens_file=tokens, partitions=1, shutdown_grace=1.0, store_url="memory://",
        orchestration_address=f"127.0.0.1:{orchestration_port}", orchestration_token="segmentation-token",
        readers_cache_seconds=600,  # far longer than the test: only an announced change renews it
    )  # fmt: skip
    orchestration = OrchestrationSettings(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=orchestration_port, auth_mode="tokens",
        auth_tokens_file=tokens, partitions=1, shutdown_grace=1.0, store_url=f"sqlite:///{tmp_path / 'o.db'}",
        segmentation_address=f"127.0.0.1:{segmentation_port}", segmentation_token="orchestration-token",
    )  # fmt: skip
    async with contextlib.AsyncExitStack() as stack:
        runtime = await stack.enter_async_context(serving(segmentation, segmentation_setup))
        await stack.enter_async_context(serving(orchestration, orchestration_setup))
        segments = segmentation_pb2_grpc.SegmentationServiceStub(
            await stack.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{segmentation_port}"))
        )
        journeys = orchestration_pb2_grpc.OrchestrationServiceStub(
            await stack.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{orchestration_port}"))
        )
        cached: Cached = runtime.parts["engine"].readers_journeys
        asked = []
        ask = cached._fetch

        async def counted():
            asked.append(1)
            return await ask()

        cached._fetch = counted
        forgotten = asyncio.Event()
        forget = cached.forget

        def forgetting():
            forget()
            forgotten.set()

        cached.forget = forgetting
        yield segments, journeys, asked, forgotten


async def _publish(journeys, journey_id: str, condition: str) -> None:
    document = {
        "id": journey_id, "version": 1, "name": journey_id, "priority": 10, "category": "lifecycle",
        "timezone": "UTC", "entry": {"event": "Visited", "if": condition},
        "nodes": [{"id": "later", "type": "delay", "duration": "1d"}],
    }  # fmt: skip
    definition = pb.JourneyDefinition(json=orjson.dumps(document).decode())
    await journeys.CreateJourney(pb.CreateJourneyRequest(definition=definition), metadata=ADMIN)
    await journeys.PublishJourney(pb.PublishJourneyRequest(journey_id=journey_id), metadata=ADMIN)


async def _readers(segments, name: str) -> list[str]:
    answer = await segments.ListComputedTraitReaders(
        segmentation_pb2.ListComputedTraitReadersRequest(name=name), metadata=READER
    )
    assert answer.journeys_checked
    return [j.id for j in answer.journeys]


async def test_a_reader_asking_again_and_again_makes_one_call_to_orchestration(platform):
    segments, _journeys, asked, _forgotten = platform
    for i in range(20):
        assert await _readers(segments, f"trait_{i}") == []
    assert len(asked) == 1
    # Concurrent askers share one call too.
    await asyncio.gather(*(_readers(segments, "orders") for _ in range(20)))
    assert len(asked) == 1


async def test_a_journey_published_after_an_answer_was_kept_is_named_at_once(platform):
    segments, journeys, asked, forgotten = platform
    assert await _readers(segments, "orders") == []
    await _publish(journeys, "first-order", "computed.orders < 1")
    await forgotten.wait()  # orchestration's announcement, on core NATS
    assert await _readers(segments, "orders") == ["first-order"]
    forgotten.clear()
    await journeys.ArchiveJourney(pb.JourneyRef(journey_id="first-order"), metadata=ADMIN)
    await forgotten.wait()
    assert await _readers(segments, "orders") == []
    assert len(asked) == 3
