"""`cdpctl status` tells the operator a service is up but cannot write its store (a full disk): the
service's health `cdp.storage` (cdp_kit.storage.health) reads NOT_SERVING while its process stays SERVING."""

from __future__ import annotations

import asyncio
import json
import os

import grpc
from click.testing import CliRunner
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cdp_kit.storage.health import HEALTH_NAME
from cdpctl.cli import main
from cdpctl.platform import Workspace
from cdpctl.run import STORE_HEALTH


async def test_a_service_whose_store_cannot_write_is_shown_so_and_the_platform_is_not_healthy(nats_server, tmp_path):
    assert STORE_HEALTH == HEALTH_NAME  # cdpctl spells it without importing the kit's storage
    servicer = health.aio.HealthServicer()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await servicer.set(HEALTH_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    ws = Workspace(tmp_path / "home")
    ws.prepare(())
    ws.write_run({"pid": os.getpid(), "nats": nats_server.url, "services": {"profile": {"grpc": f"127.0.0.1:{port}"}}})
    runner = CliRunner()
    try:
        result = await asyncio.to_thread(runner.invoke, main, ["--home", str(ws.root), "status", "--json"])
        document = json.loads(result.output)
        assert result.exit_code == 1 and document["healthy"] is False
        assert document["services"]["profile"]["health"] == "SERVING"
        assert document["services"]["profile"]["store"] == "cannot write"
        result = await asyncio.to_thread(runner.invoke, main, ["--home", str(ws.root), "status"])
        assert "store cannot write" in result.output and result.exit_code == 1

        await servicer.set(HEALTH_NAME, health_pb2.HealthCheckResponse.SERVING)  # space again
        result = await asyncio.to_thread(runner.invoke, main, ["--home", str(ws.root), "status", "--json"])
        document = json.loads(result.output)
        assert result.exit_code == 0 and document["services"]["profile"]["store"] == "ok"
    finally:
        await server.stop(0)
