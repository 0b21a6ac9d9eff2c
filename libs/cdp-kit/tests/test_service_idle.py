"""What a caller that connects and then does nothing may hold (cdp_kit.service.GrpcServer): a connection
with no call is closed after `idle_seconds`, so idle sockets cannot keep the connection cap full; the
plaintext health port is capped as well. Real sockets, the bounds lowered for the test."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cdp.collector.v1 import collector_pb2, collector_pb2_grpc
from cdp_kit import service
from cdp_kit.natsserver import free_port
from cdp_kit.service import serving

from .test_service import Behaviour, settings, setup_with

GIVE_UP = 15.0  # seconds: a test that fails does not hang


def own_channel(address: str) -> grpc.aio.Channel:
    # Its own connection: channels would otherwise share one to the same address.
    return grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


async def test_connections_that_stay_idle_are_closed_so_they_cannot_keep_other_callers_out():
    # As many idle connections as the cap held every slot for good: a later caller failed UNAVAILABLE for
    # as long as they stayed (60 s of idleness is the default; 1 s here).
    setup = setup_with(Behaviour())

    async def bounded(runtime):
        await setup(runtime)
        runtime.grpc.max_connections = 3
        runtime.grpc.idle_seconds = 1.0

    async with serving(settings(), bounded) as runtime:
        address = f"127.0.0.1:{runtime.grpc.port}"
        idle = [own_channel(address) for _ in range(3)]
        try:
            for channel in idle:
                await asyncio.wait_for(channel.channel_ready(), GIVE_UP)
            async with own_channel(address) as caller:
                stub = collector_pb2_grpc.CollectorServiceStub(caller)
                reply = await stub.Collect(collector_pb2.CollectRequest(), timeout=GIVE_UP, wait_for_ready=True)
                assert reply.accepted == 0
        finally:
            for channel in idle:
                await channel.close()


async def test_a_call_in_progress_keeps_its_connection_past_the_idle_time():
    setup = setup_with(Behaviour())

    async def bounded(runtime):
        await setup(runtime)
        runtime.grpc.idle_seconds = 0.2

    async with serving(settings(), bounded) as runtime:
        async with own_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
            stub = collector_pb2_grpc.CollectorServiceStub(channel)
            slow = await stub.Collect(collector_pb2.CollectRequest(write_key="slow"), timeout=GIVE_UP)  # 0.5 s
            assert slow.accepted == 0


async def test_the_health_port_takes_a_bounded_number_of_connections(monkeypatch):
    # It took every connection offered (3,000 held by one client): a process's file descriptors with them.
    monkeypatch.setattr(service, "HEALTH_MAX_CONNECTIONS", 2, raising=False)
    health_port = free_port()
    async with serving(settings(health_port=health_port), setup_with(Behaviour())):
        address = f"127.0.0.1:{health_port}"
        held = [own_channel(address) for _ in range(2)]
        try:
            for channel in held:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=GIVE_UP
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            async with own_channel(address) as extra:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await health_pb2_grpc.HealthStub(extra).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        finally:
            for channel in held:
                await channel.close()
