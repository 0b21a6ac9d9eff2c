"""A computed trait that segments or live journeys read is not deleted from under them. Deleting one a
segment read (`computed.orders < 1`) succeeded, and the segment then read it as missing: 0 for a count,
so it took in everyone. Now the profile service asks segmentation what reads the trait (segmentation asks
orchestration for the live journeys) and refuses with FAILED_PRECONDITION naming them, unless the caller
forces it; a segmentation that cannot be asked is UNAVAILABLE, never a blind deletion. Real profile,
segmentation and orchestration services on a real nats-server, with each service's own token."""

from __future__ import annotations

import contextlib

import grpc
import orjson
import pytest

from cdp.orchestration.v1 import orchestration_pb2, orchestration_pb2_grpc
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_kit.auth import write_tokens_file
from cdp_kit.bus import Bus, events_resolved_stream, identity_stream, segments_stream
from cdp_kit.natsserver import free_port
from cdp_kit.service import serving
from cdp_orchestration.__main__ import setup as orchestration_setup
from cdp_orchestration.settings import OrchestrationSettings
from cdp_profile.__main__ import setup as profile_setup
from cdp_profile.settings import ProfileSettings
from cdp_segmentation.__main__ import setup as segmentation_setup
from cdp_segmentation.settings import SegmentationSettings

ADMIN = [("authorization", "Bearer admin-token")]
ORDERS = profile_pb2.ComputedTraitDefinition(name="orders", op="count", event_names=["Order Completed"])


def _tokens(path):
    write_tokens_file(
        path,
        [
            ("admin", "admin-token", ["*"]),
            ("profile", "profile-token", ["identity:read", "segmentation:read"]),
            ("segmentation", "segmentation-token", ["profile:read", "profile:admin", "orchestration:read"]),
            ("orchestration", "orchestration-token", ["profile:read", "profile:admin", "segmentation:read"]),
        ],
    )
    return path


@contextlib.asynccontextmanager
async def _profile(nats_server, tmp_path, tokens, segmentation_address: str):
    settings = ProfileSettings(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="tokens", auth_tokens_file=tokens,
        partitions=1, store_url=f"sqlite:///{tmp_path / 'profile.db'}", shutdown_grace=1.0,
        identity_address=f"127.0.0.1:{free_port()}",  # LookupProfile only; not asked here
        segmentation_address=segmentation_address, segmentation_token="profile-token",
    )  # fmt: skip
    async with Bus.connect(nats_server.url, name="trait-readers-test") as bus:
        await bus.ensure_streams(events_resolved_stream(), identity_stream(), segments_stream())
    async with serving(settings, profile_setup) as runtime:
        yield f"127.0.0.1:{runtime.grpc.port}"


@pytest.fixture
async def platform(nats_server, tmp_path):
    """(profile, segmentation, orchestration) stubs: profile asks segmentation, which asks orchestration."""
    tokens = _tokens(tmp_path / "tokens.json")
    segmentation_port, orchestration_port = free_port(), free_port()
    segmentation_address = f"127.0.0.1:{segmentation_port}"
    orchestration_address = f"127.0.0.1:{orchestration_port}"
    async with contextlib.AsyncExitStack() as stack:
        profile_address = await stack.enter_async_context(_profile(nats_server, tmp_path, tokens, segmentation_address))
        segmentation = SegmentationSettings(
            nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=segmentation_port, auth_mode="tokens",
            auth_tokens_file=tokens, partitions=1, shutdown_grace=1.0, store_url="memory://",
            profile_address=profile_address, profile_token="segmentation-token",
            orchestration_address=orchestration_address, orchestration_token="segmentation-token",
        )  # fmt: skip
        await stack.enter_async_context(serving(segmentation, segmentation_setup))
        orchestration = OrchestrationSettings(
            nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=orchestration_port, auth_mode="tokens",
            auth_tokens_file=tokens, partitions=1, shutdown_grace=1.0,
            store_url=f"sqlite:///{tmp_path / 'orchestration.db'}",
            profile_address=profile_address, profile_token="orchestration-token",
            segmentation_address=segmentation_address, segmentation_token="orchestration-token",
        )  # fmt: skip
        await stack.enter_async_context(serving(orchestration, orchestration_setup))
        channels = [
            await stack.enter_async_context(grpc.aio.insecure_channel(address))
            for address in (profile_address, segmentation_address, orchestration_address)
        ]
        yield (
            profile_pb2_grpc.ProfileServiceStub(channels[0]),
            segmentation_pb2_grpc.SegmentationServiceStub(channels[1]),
            orchestration_pb2_grpc.OrchestrationServiceStub(channels[2]),
        )


async def _names(profiles) -> set[str]:
    listed = await profiles.ListComputedTraits(profile_pb2.ListComputedTraitsRequest(), metadata=ADMIN)
    return {t.definition.name for t in listed.traits}


async def _delete(profiles, name: str, *, force: bool = False):
    return await profiles.DeleteComputedTrait(
        profile_pb2.DeleteComputedTraitRequest(name=name, force=force), metadata=ADMIN
    )


async def _publish(journeys, journey_id: str, entry: dict, nodes: list | None = None) -> None:
    document = {
        "id": journey_id, "version": 1, "name": f"{journey_id} journey", "priority": 10, "category": "lifecycle",
        "timezone": "UTC", "entry": entry, "nodes": nodes or [{"id": "later", "type": "delay", "duration": "1d"}],
    }  # fmt: skip
    definition = orchestration_pb2.JourneyDefinition(json=orjson.dumps(document).decode())
    await journeys.CreateJourney(orchestration_pb2.CreateJourneyRequest(definition=definition), metadata=ADMIN)
    published = await journeys.PublishJourney(
        orchestration_pb2.PublishJourneyRequest(journey_id=journey_id), metadata=ADMIN
    )
    assert published.state == orchestration_pb2.JOURNEY_STATE_ACTIVE


async def test_a_trait_a_segment_or_a_live_journey_reads_is_not_deleted_unless_forced(platform):
    profiles, segments, journeys = platform
    await profiles.DefineComputedTrait(profile_pb2.DefineComputedTraitRequest(definition=ORDERS), metadata=ADMIN)
    await segments.CreateSegment(
        segmentation_pb2.CreateSegmentRequest(
            id="never-ordered",
            name="Never ordered",
            definition=segmentation_pb2.Definition(text="computed.orders < 1"),
            wait=True,
        ),
        metadata=ADMIN,
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _delete(profiles, "orders")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "segments 'never-ordered' (Never ordered)" in refused.value.details()
    assert "force" in refused.value.details()
    assert "orders" in await _names(profiles)

    # The segment goes; a live journey still reads the trait (its entry's `if`), so it is still refused.
    await segments.DeleteSegment(segmentation_pb2.DeleteSegmentRequest(id="never-ordered"), metadata=ADMIN)
    await _publish(journeys, "first-order", {"event": "Visited", "if": "computed.orders < 1"})
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _delete(profiles, "orders")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "live journeys 'first-order' (first-order journey)" in refused.value.details()
    assert "segments" not in refused.value.details()
    assert "orders" in await _names(profiles)

    # Forced: deleted, readers or not.
    await _delete(profiles, "orders", force=True)
    assert "orders" not in await _names(profiles)


async def test_a_trait_nothing_reads_is_deleted_and_a_journey_in_draft_does_not_hold_it(platform):
    profiles, _segments, journeys = platform
    await profiles.DefineComputedTrait(profile_pb2.DefineComputedTraitRequest(definition=ORDERS), metadata=ADMIN)
    document = {
        "id": "draft", "version": 1, "name": "draft", "priority": 10, "category": "lifecycle", "timezone": "UTC",
        "entry": {"event": "Visited", "if": "computed.orders > 2"},
        "nodes": [{"id": "later", "type": "delay", "duration": "1d"}],
    }  # fmt: skip
    definition = orchestration_pb2.JourneyDefinition(json=orjson.dumps(document).decode())
    await journeys.CreateJourney(orchestration_pb2.CreateJourneyRequest(definition=definition), metadata=ADMIN)
    await _delete(profiles, "orders")
    assert "orders" not in await _names(profiles)


async def test_an_event_condition_trait_a_live_journey_shares_outlives_the_segment_that_defined_it(platform):
    # A journey's `count(...)` compiles to the same computed trait (seg_<hash>) as a segment's with the same
    # condition. Deleting the segment released it on the profile service, and the journey's condition then
    # read 0 orders for everyone.
    profiles, segments, journeys = platform
    condition = 'count(event = "Order Completed", within 30d) >= 1'
    created = await segments.CreateSegment(
        segmentation_pb2.CreateSegmentRequest(
            id="buyers", definition=segmentation_pb2.Definition(text=condition), wait=True
        ),
        metadata=ADMIN,
    )
    [trait] = created.computed_traits
    branch = [{"id": "check", "type": "branch", "branches": [{"if": condition, "next": None}]}]
    await _publish(journeys, "thanks", {"event": "Visited"}, branch)
    await segments.DeleteSegment(segmentation_pb2.DeleteSegmentRequest(id="buyers"), metadata=ADMIN)
    assert trait in await _names(profiles)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _delete(profiles, trait)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "live journeys 'thanks'" in refused.value.details()


async def test_a_deletion_segmentation_cannot_be_asked_about_is_unavailable_unless_forced(nats_server, tmp_path):
    tokens = _tokens(tmp_path / "tokens.json")
    nobody = f"127.0.0.1:{free_port()}"  # segmentation is down
    async with _profile(nats_server, tmp_path, tokens, nobody) as address:
        async with grpc.aio.insecure_channel(address) as channel:
            profiles = profile_pb2_grpc.ProfileServiceStub(channel)
            await profiles.DefineComputedTrait(
                profile_pb2.DefineComputedTraitRequest(definition=ORDERS), metadata=ADMIN
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _delete(profiles, "orders")
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "could not be learnt from the segmentation service" in refused.value.details()
            assert "orders" in await _names(profiles)
            # An unknown trait is still NOT_FOUND, without asking anyone.
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await _delete(profiles, "nothing")
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            await _delete(profiles, "orders", force=True)
            assert "orders" not in await _names(profiles)
