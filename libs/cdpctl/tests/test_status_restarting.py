"""While `cdpctl up` restarts a service that crashed, `cdpctl status` says so (`restarting (crash n of N)`)
rather than DOWN as if nobody were on it; the platform is not healthy meanwhile (exit code 1). The
supervisor records the restart in run.json from the crash until the service is SERVING again."""

from __future__ import annotations

import asyncio
import json
import os

import grpc
from click.testing import CliRunner
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cdpctl.cli import main
from cdpctl.platform import Workspace, pick_port
from cdpctl.supervise import Exited, RestartPolicy, restart_finished, restart_started


def _platform(tmp_path, nats_url: str, services: dict[str, dict], companions: dict | None = None) -> Workspace:
    ws = Workspace(tmp_path / "home")
    ws.prepare(())
    ws.write_run({"pid": os.getpid(), "nats": nats_url, "services": services, "companions": companions or {}})
    return ws


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


def _row(output: str, name: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(f"│ {name} "))


def test_the_supervisor_records_a_restart_from_the_crash_until_the_service_serves_again():
    entry = {"grpc": "127.0.0.1:1", "pid": 10}
    restart_started(entry, Exited("profile", "exit code 1", 2.0, 2), RestartPolicy(give_up_after=5))
    assert entry["restarting"] == {"crash": 2, "of": 5}
    restart_finished(entry)
    assert "restarting" not in entry and entry["pid"] == 10


async def test_status_shows_a_service_being_restarted_as_restarting(nats_server, tmp_path):
    down = pick_port(0)  # nothing listens: the restarted process has not bound its port yet
    services = {
        "profile": {"grpc": f"127.0.0.1:{down}", "restarting": {"crash": 2, "of": 5}},
        "identity": {"grpc": f"127.0.0.1:{pick_port(0)}"},  # down, and nobody restarting it
    }
    ws = _platform(tmp_path, nats_server.url, services)
    runner = CliRunner()
    result = await asyncio.to_thread(runner.invoke, main, ["--home", str(ws.root), "status"])
    assert result.exit_code == 1
    assert "restarting (crash 2 of 5)" in _row(result.output, "profile"), result.output
    assert "DOWN" in _row(result.output, "identity") and "restarting" not in _row(result.output, "identity")

    result = await asyncio.to_thread(runner.invoke, main, ["--home", str(ws.root), "status", "--json"])
    document = json.loads(result.output)
    assert result.exit_code == 1 and document["healthy"] is False
    profile = document["services"]["profile"]
    assert profile["health"] == "DOWN" and profile["restarting"] == {"crash": 2, "of": 5}


async def test_a_service_serving_again_is_shown_serving_even_before_the_record_is_cleared(nats_server, tmp_path):
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    services = {"profile": {"grpc": f"127.0.0.1:{port}", "restarting": {"crash": 1, "of": 5}}}
    await _platform_streams(nats_server.url, list(services))
    ws = _platform(tmp_path, nats_server.url, services)
    try:
        result = await asyncio.to_thread(CliRunner().invoke, main, ["--home", str(ws.root), "status"])
    finally:
        await server.stop(0)
    assert result.exit_code == 0, result.output
    assert "SERVING" in _row(result.output, "profile") and "restarting" not in result.output


async def test_a_companion_being_restarted_is_shown_restarting(nats_server, tmp_path):
    down = pick_port(0)
    companions = {
        "crm-hubspot": {
            "ports": {"api": down},
            "urls": {"api": f"http://127.0.0.1:{down}"},
            "role": "HubSpot",
            "restarting": {"crash": 1, "of": 5},
        }
    }
    ws = _platform(tmp_path, nats_server.url, {}, companions)
    result = await asyncio.to_thread(CliRunner().invoke, main, ["--home", str(ws.root), "status"])
    assert "restarting (crash 1 of 5)" in _row(result.output, "crm-hubspot"), result.output
