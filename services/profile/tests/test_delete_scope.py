"""Deleting a person needs `privacy:delete`: the services' tokens carry `profile:admin` (scoring,
segmentation and orchestration define computed traits with it), and any of them could otherwise erase and
suppress anyone. Admin tokens (`*`) keep it, so `cdpctl delete` works as before."""

from __future__ import annotations

import grpc
import pytest

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_kit.auth import write_tokens_file
from cdp_kit.bus import Bus, events_resolved_stream, identity_stream
from cdp_kit.service import serving
from cdp_profile.__main__ import setup
from cdp_profile.settings import ProfileSettings

SERVICES = [("authorization", "Bearer services-token")]
PRIVACY = [("authorization", "Bearer privacy-token")]
ADMIN = [("authorization", "Bearer admin-token")]


@pytest.fixture
async def profile(nats_server, tmp_path):
    tokens = tmp_path / "tokens.json"
    write_tokens_file(
        tokens,
        [
            ("admin", "admin-token", ["*"]),
            ("services", "services-token", ["profile:read", "profile:admin"]),
            ("privacy", "privacy-token", ["privacy:delete"]),
        ],
    )
    settings = ProfileSettings(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="tokens",
        auth_tokens_file=tokens, partitions=2, store_url="memory://", shutdown_grace=1.0,
    )  # fmt: skip
    async with Bus.connect(nats_server.url, name="delete-scope-test") as bus:
        await bus.ensure_streams(events_resolved_stream(), identity_stream())
        async with serving(settings, setup) as runtime:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
                yield profile_pb2_grpc.ProfileServiceStub(channel)


async def test_a_services_token_with_profile_admin_cannot_delete_a_person(profile):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await profile.Delete(
            profile_pb2.DeleteRequest(person_id="p_someone", mode=profile_pb2.DELETE_MODE_DELETE), metadata=SERVICES
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "privacy:delete" in caught.value.details()


async def test_privacy_delete_and_admin_tokens_get_past_the_scope_check(profile):
    # An unknown person: the call reaches the engine (NOT_FOUND), past the scope check.
    for metadata in (PRIVACY, ADMIN):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await profile.Delete(
                profile_pb2.DeleteRequest(person_id="p_someone", mode=profile_pb2.DELETE_MODE_DELETE), metadata=metadata
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
