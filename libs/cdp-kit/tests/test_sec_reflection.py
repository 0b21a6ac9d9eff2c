"""gRPC reflection lists every method and message of a service: it answers only a caller with a valid
token (any scope); health stays open to token-less probes."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cdp_kit.auth import new_token, write_tokens_file
from cdp_kit.service import serving

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_service import Behaviour, reflected_services, settings, setup_with


@pytest.fixture
def tokens(tmp_path):
    reader, revoked = new_token(), new_token()
    path = tmp_path / "tokens.json"
    write_tokens_file(path, [("reader", reader, ["profile:read"])])
    return path, reader, revoked


async def test_reflection_without_a_valid_token_is_refused(tokens):
    path, reader, revoked = tokens
    async with serving(settings(auth_mode="tokens", auth_tokens_file=path), setup_with(Behaviour())) as rt:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{rt.grpc.port}") as channel:
            for token in (None, revoked, "not-a-token"):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await reflected_services(channel, token=token)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, token
            assert "cdp.collector.v1.CollectorService" in await reflected_services(channel, token=reader)
            # Token-less probes still read health.
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_without_authentication_in_dev_mode():
    async with serving(settings(auth_mode="none"), setup_with(Behaviour())) as rt:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{rt.grpc.port}") as channel:
            assert "cdp.collector.v1.CollectorService" in await reflected_services(channel)
