"""A stream the platform's services use missing on nats-server (restarted on an empty store, deleted by
hand): every probe answered and no consumer was stuck, so `cdpctl status` said healthy while the collector
answered every request 503. With the patch it names the streams missing, and the platform is not healthy."""

from __future__ import annotations

import asyncio
import json
import os

import grpc
import nats
from click.testing import CliRunner
from grpc_health.v1 import health, health_pb2_grpc

from cdp_kit.bus import Bus, events_raw_stream, privacy_stream
from cdpctl.cli import main
from cdpctl.platform import Workspace


def _status(ws: Workspace, *args: str):
    return CliRunner().invoke(main, ["--home", str(ws.root), "status", *args], env={"COLUMNS": "200"})


async def _serving_health() -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)  # "" SERVING
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def test_a_stream_the_platform_needs_missing_on_nats_server_is_named_and_not_healthy(nats_server, tmp_path):
    """nats-server restarted on an empty JetStream store (a lost volume), or EVENTS_RAW deleted by hand:
    nats-server answers, every service is SERVING, no consumer is stuck (there are none), and the collector
    answers every request 503. `status` said healthy; it now names the streams missing."""
    async with Bus.connect(nats_server.url, name="test", connect_timeout=5) as bus:
        await bus.ensure_streams(events_raw_stream(), privacy_stream())
    server, port = await _serving_health()
    try:
        ws = Workspace(tmp_path / "home")
        ws.prepare(())
        services = {"collector": {"grpc": f"127.0.0.1:{port}"}}
        ws.write_run({"pid": os.getpid(), "nats": nats_server.url, "services": services, "companions": {}})
        result = await asyncio.to_thread(_status, ws, "--json")
        document = json.loads(result.output)
        assert result.exit_code == 0 and document["healthy"] is True, result.output  # the control

        nc = await nats.connect(nats_server.url)
        try:
            await nc.jetstream().delete_stream("EVENTS_RAW")
        finally:
            await nc.close()
        result = await asyncio.to_thread(_status, ws, "--json")
        document = json.loads(result.output)
        assert document["services"]["collector"]["health"] == "SERVING" and document["nats"]["up"] is True
        assert (result.exit_code, document["healthy"]) == (1, False), result.output
        assert document["missing_streams"] == ["EVENTS_RAW"]
        table = await asyncio.to_thread(_status, ws)
        assert table.exit_code == 1 and "streams missing on nats-server: EVENTS_RAW" in table.output, table.output
    finally:
        await server.stop(0)
