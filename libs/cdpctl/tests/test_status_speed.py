"""`cdpctl status` asks everything at once, under one deadline: every service's gRPC health (and its stores'),
nats-server's client port and monitor, and every listener of every companion. It used to ask the services
first and the companions only then, each probe on a thread of asyncio's default pool (min(32, CPUs + 4)
threads: six on two cores), so a wedged service and a wedged companion took one timeout each, one after
the other, and more wedged listeners than threads took a timeout per round of threads (an on-call trial:
2 s with one service stopped, 5-6 s with nats-server stopped, where docs/architecture.md says about one
timeout).

No timing is asserted here. That the checks run at once is asserted structurally: every endpoint of the
platform answers only once every endpoint has been asked (a rendezvous), so checks asked one after another,
or some of them only once others are done, never all arrive and the first ones run out of time."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cdpctl.cli import main
from cdpctl.platform import COMPANIONS, Workspace

SERVICES = ("collector", "identity", "profile", "scoring", "segmentation", "orchestration", "crm")


class Rendezvous:
    """Counts the endpoints asked; each waits for all of them before it answers."""

    def __init__(self, expected: int) -> None:
        self.expected, self.asked, self.everyone = expected, 0, asyncio.Event()

    async def arrive(self) -> None:
        self.asked += 1
        if self.asked == self.expected:
            self.everyone.set()
        await self.everyone.wait()


class RendezvousHealth(health_pb2_grpc.HealthServicer):
    def __init__(self, rendezvous: Rendezvous) -> None:
        self.rendezvous = rendezvous

    async def Check(self, request, context) -> health_pb2.HealthCheckResponse:
        if request.service == "":  # liveness: what every status asks first; the stores' check is answered
            await self.rendezvous.arrive()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def _listener(rendezvous: Rendezvous, protocol: str) -> asyncio.Server:
    """A listener of `protocol` ("http", "nats", "smtp") that answers once every endpoint was asked."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if protocol == "http":
                await reader.readuntil(b"\r\n\r\n")
                await rendezvous.arrive()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            else:  # the server speaks first
                await rendezvous.arrive()
                writer.write(b'INFO {"server_id":"rendezvous"}\r\n' if protocol == "nats" else b"220 ready\r\n")
            await writer.drain()
            await reader.read(100)  # until the probe is done with it
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def _port(server: asyncio.Server) -> int:
    return server.sockets[0].getsockname()[1]


def _companion(ports: dict[str, int]) -> dict:
    return {"ports": ports, "urls": {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}}


def _write_run(ws: Workspace, nats: int, monitor: int, services: dict[str, int], companions: dict[str, dict]) -> None:
    ws.write_run(
        {
            "pid": os.getpid(),
            "nats": f"nats://127.0.0.1:{nats}",
            "nats_monitor": f"http://127.0.0.1:{monitor}",
            "services": {name: {"grpc": f"127.0.0.1:{port}"} for name, port in services.items()},
            "companions": {name: _companion(ports) for name, ports in companions.items()},
        }
    )


# The companions `make up` runs (nine listeners), and with one more of 40 listeners: more probes than
# asyncio's default pool has threads on any machine (32 at most).
@pytest.mark.parametrize("extra_listeners", [0, 40], ids=["as make up runs it", "more listeners than threads"])
async def test_status_asks_every_service_nats_server_and_companion_at_the_same_time(tmp_path, extra_listeners):
    listeners = {c.name: {n: c.protocols.get(n, "http") for n in c.ports} for c in COMPANIONS}
    if extra_listeners:
        listeners["wide"] = {f"l{n}": "http" for n in range(extra_listeners)}
    count = len(SERVICES) + 2 + sum(len(ports) for ports in listeners.values())
    rendezvous = Rendezvous(count)
    grpc_servers, servers = [], []
    try:
        services = {}
        for name in SERVICES:
            server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(RendezvousHealth(rendezvous), server)
            services[name] = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            grpc_servers.append(server)
        nats, monitor = await _listener(rendezvous, "nats"), await _listener(rendezvous, "http")
        servers += [nats, monitor]
        companions: dict[str, dict[str, int]] = {}
        for name, protocols in listeners.items():
            companions[name] = {}
            for listener, protocol in protocols.items():
                server = await _listener(rendezvous, protocol)
                servers.append(server)
                companions[name][listener] = _port(server)
        ws = Workspace(tmp_path / "home")
        ws.prepare(())
        _write_run(ws, _port(nats), _port(monitor), services, companions)
        invoke = asyncio.to_thread(CliRunner().invoke, main, ["--home", str(ws.root), "status", "--json"])
        # A hang guard only, far above status's own deadline: not a speed goal.
        result = await asyncio.wait_for(invoke, timeout=60)
    finally:
        for server in servers:
            server.close()
        for server in grpc_servers:
            await server.stop(0)
    document = json.loads(result.output)
    # Every service and listener asked at once; nats-server once more after them (the consumers' backlogs).
    assert rendezvous.asked == count + 1, (rendezvous.asked, count)
    assert document["nats"]["health"] == "UP", document["nats"]
    assert {name: s["health"] for name, s in document["services"].items()} == dict.fromkeys(SERVICES, "SERVING")
    assert {name: c["health"] for name, c in document["companions"].items()} == dict.fromkeys(listeners, "UP")
    assert result.exit_code == 0 and document["healthy"] is True


@pytest.fixture
def wedged_ports() -> Iterator[list[int]]:
    """Ports that accept TCP connections and never send a byte (a process stopped with SIGSTOP: the
    kernel still accepts for it), and one more that nothing listens on (a process gone)."""
    sockets = []
    for _ in range(8):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        sockets.append(listener)
    gone = socket.socket()
    gone.bind(("127.0.0.1", 0))
    closed = gone.getsockname()[1]
    gone.close()
    yield [s.getsockname()[1] for s in sockets] + [closed]
    for listener in sockets:
        listener.close()


def test_a_wedged_platform_is_shown_as_such(tmp_path, wedged_ports):
    """nats-server stopped (its client port and monitor accept and never answer), one service stopped and
    one gone, one companion stopped (all five of its listeners) and one gone: `cdpctl status` names each
    state and exits 1. Run as the operator runs it, in its own process."""
    *wedged, gone = wedged_ports
    ws = Workspace(tmp_path / "home")
    ws.prepare(())
    services = {"identity": wedged[2], "profile": gone}
    channels = dict(zip(("smtp", "twilio", "fcm", "webpush", "webhook"), wedged[3:8], strict=True))
    _write_run(ws, wedged[0], wedged[1], services, {"channels": channels, "crm-zoho": {"api": gone}})
    command = [sys.executable, "-c", "from cdpctl.cli import main; main()", "--home", str(ws.root), "status"]
    # A hang guard only (status's own deadline is a second or two): not a speed goal.
    shown = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=60)
    table = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    document = json.loads(shown.stdout)
    assert shown.returncode == 1 and document["healthy"] is False, shown.stdout + shown.stderr
    assert document["nats"]["health"] == "NOT ANSWERING"
    assert {name: s["health"] for name, s in document["services"].items()} == {
        "identity": "DEADLINE_EXCEEDED",
        "profile": "DOWN",
    }
    assert {name: c["health"] for name, c in document["companions"].items()} == {
        "channels": "NOT ANSWERING",
        "crm-zoho": "DOWN",
    }
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in table.stdout.splitlines() if "│" in line}
    assert rows == {
        "nats-server": "NOT ANSWERING",
        "identity": "DEADLINE_EXCEEDED",
        "profile": "DOWN",
        "channels (dev)": "NOT ANSWERING",
        "crm-zoho (dev)": "DOWN",
    }, table.stdout
    assert table.returncode == 1
