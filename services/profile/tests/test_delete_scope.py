"""What the services' tokens may not do. They carry `profile:read` and `profile:admin` (scoring,
segmentation and orchestration define computed traits with it), so:
- deleting a person needs `privacy:delete`, or any of them could erase and suppress anyone;
- a person's event history (`ListEvents`) needs `privacy:export`, as `Export` does;
- a computed trait is changed or deleted only by the caller that defined it, or an admin.
Admin tokens (`*`) keep all of it, so `cdpctl` works as before."""

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
OTHER = [("authorization", "Bearer other-token")]


@pytest.fixture
async def profile(nats_server, tmp_path):
    tokens = tmp_path / "tokens.json"
    write_tokens_file(
        tokens,
        [
            ("admin", "admin-token", ["*"]),
            ("services", "services-token", ["profile:read", "profile:admin"]),
            ("privacy", "privacy-token", ["privacy:delete"]),
            ("other", "other-token", ["profile:read", "profile:admin"]),
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


async def test_a_services_token_cannot_read_a_persons_event_history(profile):
    # A security trial read a person's whole timeline, properties and all, with scoring's token.
    request = profile_pb2.ListEventsRequest(person_id="p_someone")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await profile.ListEvents(request, metadata=SERVICES)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "privacy:export" in caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await profile.ListEvents(request, metadata=ADMIN)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # past the check: nobody there


def _count(name: str, window: str) -> profile_pb2.DefineComputedTraitRequest:
    return profile_pb2.DefineComputedTraitRequest(
        definition=profile_pb2.ComputedTraitDefinition(
            name=name, op="count", event_names=["Order Completed"], window=window
        )
    )


async def test_a_computed_trait_is_changed_only_by_who_defined_it_or_an_admin(profile):
    # A security trial redefined (30d -> 1d) and then deleted the operator's trait with scoring's token,
    # under a live segment that read it.
    await profile.DefineComputedTrait(_count("orders", "30d"), metadata=SERVICES)
    for change in (
        profile.DefineComputedTrait(_count("orders", "1d"), metadata=OTHER),
        profile.DeleteComputedTrait(profile_pb2.DeleteComputedTraitRequest(name="orders"), metadata=OTHER),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await change
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'services'" in caught.value.details() and "orders" in caught.value.details()
    # The same definition again changes nothing, so anyone holding profile:admin may send it.
    await profile.DefineComputedTrait(_count("orders", "30d"), metadata=OTHER)
    (held,) = (await profile.ListComputedTraits(profile_pb2.ListComputedTraitsRequest(), metadata=OTHER)).traits
    assert held.definition.window == "30d"

    # An admin may change it and it stays its owner's; the owner may still change and delete it.
    await profile.DefineComputedTrait(_count("orders", "7d"), metadata=ADMIN)
    await profile.DefineComputedTrait(_count("orders", "14d"), metadata=SERVICES)
    await profile.DeleteComputedTrait(profile_pb2.DeleteComputedTraitRequest(name="orders"), metadata=SERVICES)
    assert not (await profile.ListComputedTraits(profile_pb2.ListComputedTraitsRequest(), metadata=ADMIN)).traits
