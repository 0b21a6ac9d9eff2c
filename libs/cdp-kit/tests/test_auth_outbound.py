"""The token a service presents to a peer comes from a file (CDP_<PEER>_TOKEN_FILE), re-read when the
file changes: a rotated Secret is what the next call carries, without a restart."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from cdp_kit.auth import TokenFile
from cdp_kit.service import client_channel
from cdp_kit.settings import ServiceSettings, SettingsError, env

METHOD = "/test.Echo/Authorization"


@dataclasses.dataclass(frozen=True)
class CallerSettings(ServiceSettings):
    profile_address: str = env("CDP_PROFILE_ADDRESS", "")


@pytest.fixture
async def peer():
    """A gRPC server answering with the authorization metadata it received."""

    async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return dict(context.invocation_metadata()).get("authorization", "").encode()

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Authorization": grpc.unary_unary_rpc_method_handler(answer)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def settings_for(address: str) -> CallerSettings:
    return CallerSettings(nats_url="nats://unused:4222", auth_mode="none", profile_address=address)


async def authorization(channel: grpc.aio.Channel, metadata=()) -> str:
    call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
    return (await call(b"", metadata=metadata, timeout=5)).decode()


async def test_calls_carry_the_token_of_the_file_and_follow_its_rotation(peer, tmp_path):
    token = tmp_path / "profile.token"
    token.write_text("cdp_first\n")
    environ = {"CDP_PROFILE_TOKEN_FILE": str(token)}
    async with client_channel(settings_for(peer), peer, environ=environ) as channel:
        assert await authorization(channel) == "Bearer cdp_first"
        # A client that still sets the token of CDP_PROFILE_TOKEN: the file wins.
        assert await authorization(channel, (("authorization", "Bearer from-env"),)) == "Bearer cdp_first"
        rotated = tmp_path / "profile.token.new"
        rotated.write_text("cdp_second\n")
        rotated.replace(token)  # as a Secret volume swaps its files
        assert await authorization(channel) == "Bearer cdp_second"
        token.write_text("")  # caught mid-rewrite: the last good token stays
        assert await authorization(channel) == "Bearer cdp_second"


async def test_without_a_file_the_callers_own_token_is_sent(peer):
    async with client_channel(settings_for(peer), peer, environ={}) as channel:
        assert await authorization(channel, (("authorization", "Bearer from-env"),)) == "Bearer from-env"


def test_a_missing_token_file_stops_start_up_naming_the_variable(tmp_path):
    with pytest.raises(SettingsError, match="CDP_PROFILE_TOKEN_FILE"):
        client_channel(
            settings_for("127.0.0.1:1"),
            "127.0.0.1:1",
            environ={"CDP_PROFILE_TOKEN_FILE": str(tmp_path / "missing")},
        )
    with pytest.raises(ValueError, match="CDP_PROFILE_TOKEN_FILE"):
        TokenFile(tmp_path / "missing", variable="CDP_PROFILE_TOKEN_FILE")
