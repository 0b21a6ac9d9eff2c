"""`cdpctl status`: the health of the platform `cdpctl up` runs, and the probes it (and `up`) use.

`status` checks each service's gRPC health and asks each companion's listeners a request of their protocol
(`probe`: an HTTP GET, SMTP's greeting) with a short timeout: a companion whose ports accept connections
but do not answer (stopped with SIGSTOP, wedged) is NOT ANSWERING, not UP. nats-server likewise: its client
port must send its INFO line and its monitor answer /healthz (`nats_health`), or it is NOT ANSWERING (or
UNHEALTHY, its /healthz an error), and the platform is not healthy. The platform is healthy when
nats-server and every service are, and every service's stores can write (the health of `cdp.storage`:
a service whose store cannot write - a full disk - is shown "SERVING, store cannot write"); a companion
that is down is shown DOWN but does not make it unhealthy (it stands in for something outside the
platform).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import click
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.table import Table

from cdpctl import tls
from cdpctl.common import console, out
from cdpctl.platform import COMPANIONS, Companion, Workspace
from cdpctl.supervise import restart_label

# The health service name a service reads NOT_SERVING under while one of its stores cannot write (a full
# disk, a read-only volume: cdp_kit.storage.health, not imported here to keep `status` quick).
STORE_HEALTH = "cdp.storage"


async def check_health(address: str, timeout: float = 1.0, service: str = "") -> str:
    try:
        async with tls.aio_channel(address) as channel:
            request = health_pb2.HealthCheckRequest(service=service)
            reply = await health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.aio.AioRpcError as exc:
        return "DOWN" if exc.code() == grpc.StatusCode.UNAVAILABLE else exc.code().name


# A companion's health: UP when every listener answers, DOWN when one does not accept connections, NOT
# ANSWERING when one accepts them but says nothing in time (the kernel accepts for a stopped process).
UP, DOWN, NOT_ANSWERING = "UP", "DOWN", "NOT ANSWERING"
UNHEALTHY = "UNHEALTHY"  # nats-server answers its monitor's /healthz with an error (JetStream not ready)
PROBE_TIMEOUT = 1.5  # seconds for the connection and the first bytes of the answer, per listener


def _first_bytes(sock: socket.socket, count: int, deadline: float) -> bytes:
    data = b""
    while len(data) < count:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(count - len(data))
        if not chunk:
            break  # closed before answering
        data += chunk
    return data


def probe(port: int, protocol: str = "http", path: str = "/", timeout: float = PROBE_TIMEOUT) -> str:
    """UP when the listener on `port` answers a request of its protocol within `timeout`: an HTTP listener
    any status line to `GET <path>` (a 404 is an answer), an SMTP listener its greeting, a NATS client port
    its INFO line."""
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError:
        return DOWN
    with sock:
        try:
            if protocol == "nats":  # the server speaks first: its INFO line
                answered = _first_bytes(sock, 5, deadline) == b"INFO "
            elif protocol == "smtp":
                answered = _first_bytes(sock, 4, deadline)[:1] in (b"2", b"4", b"5")  # 220, or 421 busy
                if answered:
                    sock.sendall(b"QUIT\r\n")
            else:
                request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
                sock.sendall(request.encode())
                answered = _first_bytes(sock, 5, deadline) == b"HTTP/"
        except OSError:  # a timeout, or reset
            return NOT_ANSWERING
    return UP if answered else NOT_ANSWERING


def _healthz(monitor: str, timeout: float = PROBE_TIMEOUT) -> str:
    """nats-server's own word (its monitor's /healthz, JetStream included): UP on 200, UNHEALTHY on another
    status, NOT ANSWERING without an answer in `timeout`, DOWN when nothing listens."""
    try:
        with urllib.request.urlopen(f"{monitor}/healthz", timeout=timeout) as reply:
            return UP if reply.status == 200 else UNHEALTHY
    except urllib.error.HTTPError:
        return UNHEALTHY
    except TimeoutError:
        return NOT_ANSWERING
    except urllib.error.URLError as exc:
        return NOT_ANSWERING if isinstance(exc.reason, TimeoutError) else DOWN
    except OSError:  # reset while answering
        return NOT_ANSWERING


async def nats_health(state: dict) -> str:
    """nats-server's health, probed as the companions are (both at once, `PROBE_TIMEOUT` each): its client
    port must send its INFO line, and its monitor (when run.json lists one) answer /healthz with 200."""
    where = urlsplit(state["nats"])
    checks = [asyncio.to_thread(probe, where.port or 4222, "nats")]
    if state.get("nats_monitor"):
        checks.append(asyncio.to_thread(_healthz, state["nats_monitor"]))
    found = await asyncio.gather(*checks)
    return next((h for h in (DOWN, NOT_ANSWERING, UNHEALTHY) if h in found), UP)


_COMPANIONS = {companion.name: companion for companion in COMPANIONS}


async def companion_health(name: str, companion: dict) -> str:
    """The health of a companion run.json lists (its ports), probed as its definition says (`Companion`)."""
    definition = _COMPANIONS.get(name) or Companion(name, "", (), {})
    found = await asyncio.gather(
        *(
            asyncio.to_thread(
                probe, port, definition.protocols.get(listener, "http"), definition.health_path, PROBE_TIMEOUT
            )
            for listener, port in companion["ports"].items()
        )
    )
    return DOWN if DOWN in found else NOT_ANSWERING if NOT_ANSWERING in found else UP


def _status_table(state: dict, health: dict[str, str], *, nats: str, companions: dict[str, str] | None = None) -> Table:
    table = Table(title="cdp")
    for column in ("service", "health", "gRPC", "HTTP", "metrics"):
        table.add_column(column)
    table.add_row(
        "nats-server",
        f"[{'green' if nats == UP else 'red'}]{nats}[/]",
        _without_credentials(state["nats"]),
        state.get("nats_monitor", ""),
        "",
    )
    for name, svc in state["services"].items():
        status = health.get(name, "?")
        colour = "green" if status == "SERVING" else "red"
        if status != "SERVING" and restart_label(svc):  # the supervisor is on it (exit code stays 1)
            status, colour = restart_label(svc), "yellow"
        table.add_row(name, f"[{colour}]{status}[/]", svc["grpc"], svc.get("http") or "", svc.get("metrics") or "")
    # Development companions: no gRPC, UP while their listeners answer (see the module docstring).
    for name, companion in state.get("companions", {}).items():
        now = (companions or {}).get(name, DOWN)
        if now != UP and restart_label(companion):
            now = restart_label(companion)
        urls = companion["urls"]
        where = (
            next(iter(urls.values())) if len(urls) == 1 else " ".join(f"{k}:{p}" for k, p in companion["ports"].items())
        )
        table.add_row(f"{name} [dim](dev)[/]", f"[{'green' if now == UP else 'yellow'}]{now}[/]", "", where, "")
    return table


async def _status(ws: Workspace) -> tuple[dict | None, dict[str, str], str, dict[str, str]]:
    state = ws.running()
    if state is None:
        return None, {}, DOWN, {}
    nats = asyncio.ensure_future(nats_health(state))  # probed while the services are asked
    # Every service asked at once (at most STATUS_CONCURRENCY at a time): a wedged platform answers in about
    # one timeout, not one per service. The table keeps run.json's order.
    bound = asyncio.Semaphore(STATUS_CONCURRENCY)

    async def service_health(address: str) -> str:
        async with bound:
            found = await check_health(address)
            if found == "SERVING" and await check_health(address, service=STORE_HEALTH) == "NOT_SERVING":
                return STORE_CANNOT_WRITE
            return found

    services = state["services"]
    found = await asyncio.gather(*(service_health(svc["grpc"]) for svc in services.values()))
    health = dict(zip(services, found, strict=True))
    listed = state.get("companions", {})
    found = await asyncio.gather(*(companion_health(name, companion) for name, companion in listed.items()))
    companions = dict(zip(listed, found, strict=True))
    return state, health, await nats, companions


STORE_CANNOT_WRITE = "SERVING, store cannot write"
STATUS_CONCURRENCY = 16  # services `status` asks at the same time (the platform runs seven)


def _without_credentials(url: str) -> str:
    where = urlsplit(url)
    return f"{where.scheme}://{where.hostname}:{where.port}" if where.password else url


@click.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_obj
def status(ws: Workspace, as_json: bool) -> None:
    """Health of every service of the platform `cdpctl up` runs here (and whether its dev companions are up)."""
    state, health, nats, companions = asyncio.run(_status(ws))
    if state is None:
        if as_json:
            out.print_json(json.dumps({"running": False, "home": str(ws.root)}))
        else:
            console.print(f"cdp is not running in {ws.root} (start it with `make up`).", soft_wrap=True)
        raise SystemExit(1)
    # Companions stand in for what is outside the platform: one that is down does not make it unhealthy.
    healthy = nats == UP and all(h == "SERVING" for h in health.values())
    if as_json:
        services = {
            name: {
                **svc,
                "health": "SERVING" if health[name] == STORE_CANNOT_WRITE else health[name],
                # Whether its stores write: known only of a service that answers.
                "store": {STORE_CANNOT_WRITE: "cannot write", "SERVING": "ok"}.get(health[name]),
            }
            for name, svc in state["services"].items()
        }
        out.print_json(
            json.dumps(
                {
                    "running": True,
                    "healthy": healthy,
                    "home": str(ws.root),
                    "nats": {"url": _without_credentials(state["nats"]), "up": nats == UP, "health": nats},
                    "services": services,
                    "companions": {
                        name: {**companion, "up": companions[name] == UP, "health": companions[name]}
                        for name, companion in state.get("companions", {}).items()
                    },
                    "write_key": state.get("write_key"),
                    "admin_token_file": state.get("admin_token_file"),
                }
            )
        )
    else:
        out.print(f"cdp home: {ws.root}", soft_wrap=True, highlight=False, markup=False)
        out.print(_status_table(state, health, nats=nats, companions=companions))
    raise SystemExit(0 if healthy else 1)
