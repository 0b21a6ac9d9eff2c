"""`cdpctl status` tells the operator a service is up but cannot write its store (a full disk): the
service's health `cdp.storage` (cdp_kit.storage.health) reads NOT_SERVING while its process stays SERVING;
and a dev companion that accepts connections but does not answer (stopped) is not shown UP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time

import grpc
from click.testing import CliRunner
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cdp_kit.natsserver import wait_for_port
from cdp_kit.storage.health import HEALTH_NAME
from cdp_testing.pausing import pause
from cdpctl.cli import main
from cdpctl.platform import (
    CHANNELS,
    COMPANIONS,
    Workspace,
    companion_command,
    companion_environment,
    companion_urls,
    pick_port,
)
from cdpctl.run import STORE_HEALTH


async def _platform_streams(url: str, services) -> None:
    """The streams `services` use, as the provisioner makes them (`cdpctl status` names missing ones)."""
    import nats

    from cdp_kit.streamtable import needed, stream_config

    nc = await nats.connect(url)
    try:
        for name in needed(services):
            await nc.jetstream().add_stream(stream_config(name, {}))
    finally:
        await nc.close()


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
    await _platform_streams(nats_server.url, ["profile"])
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


def test_a_stopped_companion_whose_ports_still_accept_connections_is_shown_not_answering(nats_server, tmp_path):
    """A SIGSTOPped companion's ports still accept connections (the kernel does it): `status` asks each listener
    a real request (HTTP, SMTP's greeting) with a short timeout, and shows it NOT ANSWERING until it answers."""
    ws = Workspace(tmp_path / "home")
    ws.prepare(())
    chosen = [CHANNELS, next(c for c in COMPANIONS if c.name == "crm-hubspot")]
    procs, companions = [], {}
    for companion in chosen:
        ports = {listener: pick_port(0) for listener in companion.ports}
        log = open(tmp_path / f"{companion.name}.log", "wb")
        procs.append(
            subprocess.Popen(
                companion_command(ws, companion, ports),
                env=companion_environment(ws, companion, ports),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        log.close()
        companions[companion.name] = {"ports": ports, "urls": companion_urls(companion, ports), "role": ""}
    ws.write_run({"pid": os.getpid(), "nats": nats_server.url, "services": {}, "companions": companions})
    runner = CliRunner()

    def shown() -> dict:
        result = runner.invoke(main, ["--home", str(ws.root), "status", "--json"])
        assert result.exit_code == 0, result.output  # companions never decide the platform's health
        return {name: (c["up"], c["health"]) for name, c in json.loads(result.output)["companions"].items()}

    def answering() -> None:
        deadline = time.monotonic() + 30  # a loaded machine: the first answer may take a while
        while shown() != {"channels": (True, "UP"), "crm-hubspot": (True, "UP")}:
            assert time.monotonic() < deadline, shown()
            time.sleep(0.2)

    try:
        for companion in chosen:
            for port in companions[companion.name]["ports"].values():
                assert wait_for_port("127.0.0.1", port, 30), (tmp_path / f"{companion.name}.log").read_text()
        answering()

        for proc in procs:
            pause(proc.pid)  # stopped for certain: os.kill returns before every thread has stopped
        assert shown() == {"channels": (False, "NOT ANSWERING"), "crm-hubspot": (False, "NOT ANSWERING")}
        result = runner.invoke(main, ["--home", str(ws.root), "status"])
        assert result.output.count("NOT ANSWERING") == 2, result.output

        for proc in procs:
            os.kill(proc.pid, signal.SIGCONT)
        answering()  # answering again
    finally:
        for proc in procs:
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
            proc.wait(10)
