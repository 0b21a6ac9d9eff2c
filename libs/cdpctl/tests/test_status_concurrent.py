"""`cdpctl status` asks every service at once: a wedged platform (services stopped, their ports still
accepting connections) answered after one health timeout per service, one after another."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import grpc
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cdp_testing.pausing import pause
from cdpctl.cli import main
from cdpctl.platform import Workspace

# A service as the kernel sees it: a gRPC health server in its own process, its port on stdout.
SERVER = """
import sys, time
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
server = grpc.server(futures.ThreadPoolExecutor(2))
servicer = health.HealthServicer()
servicer.set("", health_pb2.HealthCheckResponse.SERVING)
health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
time.sleep(600)
"""


class Rendezvous(health_pb2_grpc.HealthServicer):
    """Answers SERVING only once every service's check has arrived: checks asked one after another never
    all arrive, and the first one runs out of time."""

    def __init__(self, arrived: asyncio.Event, count: list[int], expected: int) -> None:
        self.arrived, self.count, self.expected = arrived, count, expected

    async def Check(self, request, context) -> health_pb2.HealthCheckResponse:
        if request.service == "":
            self.count[0] += 1
            if self.count[0] == self.expected:
                self.arrived.set()
            await self.arrived.wait()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def _workspace(tmp_path, nats_url: str, ports: dict[str, int]) -> Workspace:
    ws = Workspace(tmp_path / "home")
    ws.prepare(())
    services = {name: {"grpc": f"127.0.0.1:{port}"} for name, port in ports.items()}
    ws.write_run({"pid": os.getpid(), "nats": nats_url, "services": services})
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


async def test_status_asks_the_services_at_the_same_time(nats_server, tmp_path):
    names = ["identity", "profile", "scoring"]
    arrived, count = asyncio.Event(), [0]
    servers, ports = [], {}
    for name in names:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(Rendezvous(arrived, count, len(names)), server)
        ports[name] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
    await _platform_streams(nats_server.url, names)
    ws = _workspace(tmp_path, nats_server.url, ports)
    try:
        result = await asyncio.to_thread(CliRunner().invoke, main, ["--home", str(ws.root), "status", "--json"])
    finally:
        for server in servers:
            await server.stop(0)
    document = json.loads(result.output)
    assert {name: s["health"] for name, s in document["services"].items()} == dict.fromkeys(names, "SERVING")
    assert result.exit_code == 0 and document["healthy"] is True
    # run.json's order, whichever answered first.
    assert list(document["services"]) == names


class Wedged(health_pb2_grpc.HealthServicer):
    """Never answers (a service whose gRPC threads are all stuck): each check ends by its deadline. Notes, as
    each check arrives, how many checks had ended by then."""

    def __init__(self, ended_before: list[int], ended: list[int]) -> None:
        self.ended_before, self.ended = ended_before, ended

    async def Check(self, request, context) -> health_pb2.HealthCheckResponse:
        if request.service != "":
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        self.ended_before.append(self.ended[0])
        try:
            await asyncio.Event().wait()  # cancelled at the check's deadline
        finally:
            self.ended[0] += 1
        raise AssertionError("never reached")


async def test_wedged_services_are_asked_at_the_same_time(nats_server, tmp_path):
    # One after another, each check was asked only once the one before it ran out of time (a wedged
    # platform answered after one health timeout per service): every check arrives before any ends, which
    # says so without timing the command.
    names = ["identity", "profile", "scoring"]
    ended_before, ended = [], [0]
    servers, ports = [], {}
    for name in names:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(Wedged(ended_before, ended), server)
        ports[name] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
    ws = _workspace(tmp_path, nats_server.url, ports)
    try:
        result = await asyncio.to_thread(CliRunner().invoke, main, ["--home", str(ws.root), "status", "--json"])
    finally:
        for server in servers:
            await server.stop(0)
    document = json.loads(result.output)
    assert {name: s["health"] for name, s in document["services"].items()} == dict.fromkeys(names, "DEADLINE_EXCEEDED")
    assert result.exit_code == 1 and list(document["services"]) == names
    assert ended_before == [0, 0, 0]


def test_two_wedged_services_answer_deadline_exceeded_in_order(nats_server, tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        ports = {name: int(proc.stdout.readline()) for name, proc in zip(("identity", "profile"), procs, strict=True)}
        ws = _workspace(tmp_path, nats_server.url, ports)
        runner = CliRunner()
        answered = json.loads(runner.invoke(main, ["--home", str(ws.root), "status", "--json"]).output)
        assert {s["health"] for s in answered["services"].values()} == {"SERVING"}
        for proc in procs:
            # The kernel still accepts connections on its port; stopped for certain, every gRPC thread.
            pause(proc.pid)
        result = runner.invoke(main, ["--home", str(ws.root), "status"])
        document = json.loads(runner.invoke(main, ["--home", str(ws.root), "status", "--json"]).output)
    finally:
        for proc in procs:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if "DEADLINE_EXCEEDED" in line]
    assert [line.split("│")[1].strip() for line in lines] == ["identity", "profile"], result.output
    assert {s["health"] for s in document["services"].values()} == {"DEADLINE_EXCEEDED"}
