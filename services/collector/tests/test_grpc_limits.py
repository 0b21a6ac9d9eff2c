"""The gRPC port faces the internet too (Collect takes a public write key): what a caller may hold there is
bounded. Connections past the cap are closed at once while those within it are served; a connection that
never begins HTTP/2 is closed after the handshake time; the server announces how many calls one connection
may carry at once. Real sockets, the bounds lowered for the test (cdp_kit.service.GrpcServer)."""

from __future__ import annotations

import asyncio
import contextlib
import struct

import grpc

from cdp.collector.v1 import collector_pb2, collector_pb2_grpc
from cdp.events.v1 import events_pb2
from cdp_collector.__main__ import setup
from cdp_kit.service import serving

from .conftest import WRITE_KEY, RunningCollector, collector_settings

GIVE_UP = 10.0  # seconds: a test that fails does not hang


@contextlib.asynccontextmanager
async def collector_with(nats_server, tmp_path, **bounds):
    async def setup_bounded(runtime) -> None:
        for name, value in bounds.items():
            setattr(runtime.grpc, name, value)
        await setup(runtime)

    async with serving(collector_settings(nats_server.url, tmp_path), setup_bounded) as runtime:
        yield RunningCollector(runtime, nats_server.url)


def channel(collector) -> grpc.aio.Channel:
    # Its own connection: channels would otherwise share one to the same address.
    return grpc.aio.insecure_channel(collector.grpc_address, options=[("grpc.use_local_subchannel_pool", 1)])


async def collect(ch: grpc.aio.Channel, message_id: str) -> collector_pb2.CollectResponse:
    event = events_pb2.Event(message_id=message_id, type=events_pb2.EVENT_TYPE_TRACK, user_id="u", event="E")
    request = collector_pb2.CollectRequest(write_key=WRITE_KEY, events=[event])
    return await collector_pb2_grpc.CollectorServiceStub(ch).Collect(request, timeout=GIVE_UP)


async def test_connections_past_the_cap_are_closed_while_those_within_it_are_served(nats_server, tmp_path):
    async with collector_with(nats_server, tmp_path, max_connections=3) as collector:
        held = [channel(collector) for _ in range(3)]
        for n, ch in enumerate(held):
            assert (await collect(ch, f"held-{n}")).accepted == 1
        extra = channel(collector)
        try:
            await collect(extra, "extra")
            raise AssertionError("a fourth connection was served")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
        for n, ch in enumerate(held):  # the connections within the cap go on serving
            assert (await collect(ch, f"again-{n}")).accepted == 1
        await held.pop().close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GIVE_UP
        while True:  # a place is free: the caller's retry gets it
            try:
                assert (await collect(extra, "extra")).accepted == 1
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE and loop.time() < deadline
                await asyncio.sleep(0.2)
        for ch in [*held, extra]:
            await ch.close()
        await collector.stored(expected=7)


async def test_a_connection_that_never_begins_http2_is_closed(nats_server, tmp_path):
    # grpc's own wait is 120 s: a close within GIVE_UP comes from the bound.
    async with collector_with(nats_server, tmp_path, handshake_seconds=1.0) as collector:
        host, _, port = collector.grpc_address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        with contextlib.suppress(ConnectionError):
            while await asyncio.wait_for(reader.read(65536), GIVE_UP):
                pass  # what the server says before closing (its SETTINGS, a GOAWAY) does not matter
        writer.close()
        async with channel(collector) as ch:
            assert (await collect(ch, "after")).accepted == 1


async def server_settings(address: str) -> dict[int, int]:
    """The HTTP/2 SETTINGS the server sends a new connection (identifier -> value)."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + struct.pack(">I", 0)[1:] + bytes([4, 0]) + bytes(4))
        while True:
            head = await asyncio.wait_for(reader.readexactly(9), GIVE_UP)
            length, kind, flags = int.from_bytes(head[:3]), head[3], head[4]
            payload = await reader.readexactly(length)
            if kind == 4 and not flags & 1:  # SETTINGS, not an acknowledgement
                return {
                    int.from_bytes(payload[i : i + 2]): int.from_bytes(payload[i + 2 : i + 6])
                    for i in range(0, length, 6)
                }
    finally:
        writer.close()


async def test_the_calls_one_connection_may_carry_at_once_are_announced(nats_server, tmp_path):
    max_concurrent_streams = 0x3
    async with collector_with(nats_server, tmp_path) as collector:
        assert (await server_settings(collector.grpc_address)).get(max_concurrent_streams) == 1000
    async with collector_with(nats_server, tmp_path, max_calls_per_connection=7) as collector:
        assert (await server_settings(collector.grpc_address)).get(max_concurrent_streams) == 7
