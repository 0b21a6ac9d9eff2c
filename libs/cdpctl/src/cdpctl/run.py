"""`cdpctl up` and `cdpctl status`: run the local platform under supervision and report its health.

`up` starts nats-server, then the development companions (`platform.COMPANIONS`: local channel servers
and CRM emulators), waits until each accepts connections, then every service, and waits until each is
SERVING. It writes where everything listens to `.cdp/run.json` (services under "services", companions
under "companions") and supervises: a service or companion that exits is restarted with backoff
(`cdpctl.supervise`); after too many fast crashes in a row the platform stops. nats-server that exits is
started again at once on the same port and store, as the chart's StatefulSet would. Ctrl-C stops everything.

nats-server runs with one user per service (`cdp_kit.natsauth`: each may publish only what it owns);
each service gets its own credentials file, cdpctl and tests the operator's through run.json's "nats"
URL. `nats-rotate SERVICE` gives a service new credentials while everything runs (make before break).

`up --tls` (CDP_UP_TLS=1) adds mutual TLS between the services (`cdpctl.tls`): each serves gRPC only to
clients with a certificate from the workspace's CA and dials its peers with its own; cdpctl's calls and
health checks present cdpctl's certificate (run.json's "tls"), and each service's plaintext health-only
port is its "health" in run.json. NATS too: nats-server serves TLS with its own certificate and requires a
client certificate from the same CA; each service connects with its own (CDP_NATS_TLS_*), cdpctl's bus
commands (`dlq`, `lag`, `delete --wait`) with cdpctl's.

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
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import click
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.table import Table

from cdp_kit.natsserver import NatsServer
from cdpctl import tls
from cdpctl.common import console, out
from cdpctl.platform import (
    COMPANIONS,
    SERVICES,
    Companion,
    Workspace,
    companion_command,
    companion_environment,
    companion_urls,
    nats_server_config,
    next_nats_user,
    pick_port,
    private_umask,
    service_environment,
    write_service_files,
)
from cdpctl.supervise import (
    Exited,
    GaveUp,
    PortsTaken,
    Restarted,
    RestartPolicy,
    Supervisor,
    restart_finished,
    restart_label,
    restart_started,
)

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


# ---------------------------------------------------------------------------------------------- up


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


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


async def _ready(
    names: list[str],
    children: Supervisor,
    logs: dict[str, Path],
    is_ready,
    startup_timeout: float,
    stopping: asyncio.Event,
) -> int | None:
    """Wait until `is_ready(name)` for every name; an exit code (1, or 130 on Ctrl-C) when that fails."""
    deadline = time.monotonic() + startup_timeout
    pending = set(names)
    while pending:
        for name in sorted(pending):
            proc = children.process(name)
            if proc.poll() is not None:
                console.print(f"[red]{name} exited with code {proc.returncode} while starting. Last log lines:[/]")
                console.print(_tail(logs[name]), markup=False, highlight=False)
                return 1
            if await is_ready(name):
                pending.discard(name)
        if pending and time.monotonic() > deadline:
            console.print(f"[red]not ready after {startup_timeout:.0f}s: {', '.join(sorted(pending))}[/]")
            for name in pending:
                console.print(f"--- {logs[name]}", markup=False)
                console.print(_tail(logs[name]), markup=False, highlight=False)
            return 1
        if stopping.is_set():
            return 130
        await asyncio.sleep(0.2)
    return None


async def _up(
    ws: Workspace, startup_timeout: float, policy: RestartPolicy, *, companions: bool = True, use_tls: bool = False
) -> int:
    previous = ws.running()
    if previous:
        console.print(
            f"[red]cdp is already running in {ws.root} (cdpctl pid {previous['pid']}); `cdpctl status` shows it.[/]",
            soft_wrap=True,
        )
        return 1
    # Everything made from here on - by cdpctl, nats-server (its JetStream store), the services (their
    # stores) and the companions, who inherit the umask - is the owner's only (cdpctl.platform).
    with private_umask():
        return await _up_private(ws, startup_timeout, policy, companions=companions, use_tls=use_tls)


async def _up_private(
    ws: Workspace, startup_timeout: float, policy: RestartPolicy, *, companions: bool, use_tls: bool
) -> int:
    loosened = ws.make_private()
    if loosened:
        console.print(
            f"[yellow]{ws.root} was readable by other users ({loosened} files and folders, left so by an older "
            "cdpctl): now its owner's only.[/]"
        )
    ws.prepare()
    ws.write_nats_auth()
    client = None
    if use_tls:
        # Before anything starts: every service serves and dials with its certificate, cdpctl with its own.
        tls.ensure_certificates(ws.root, [svc.name for svc in SERVICES])
        client = tls.files(ws.root, tls.CLIENT)
    tls.use_client(client)
    nats = NatsServer(
        store_dir=ws.nats_dir,
        port=pick_port(4222),
        monitor_port=pick_port(8222),
        config=nats_server_config(ws, use_tls=use_tls),
        die_with_parent=True,
    )
    console.print(f"starting nats-server (JetStream, data in {ws.nats_dir}) …")
    nats.start()
    children = Supervisor(policy)
    logs: dict[str, Path] = {}
    state: dict = {
        "pid": os.getpid(),
        "nats": ws.nats_operator_url(nats.url),  # the operator's user: cdpctl and tests
        "nats_pid": nats._proc.pid if nats._proc is not None else None,
        "nats_monitor": f"http://127.0.0.1:{nats.monitor_port}",
        "write_key": ws.write_key(),
        "admin_token_file": str(ws.admin_token_file),
        "services": {},
        "companions": {},
    }
    if client is not None:
        state["tls"] = client  # cdpctl's certificate, key and the CA: what commands and tests present
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    code = 0
    try:
        # Companions first: the services' environment names their ports and files (and services started
        # earlier: orchestration posts outcome events to the collector's HTTP port).
        named_ports: dict[str, int] = {}
        for companion in COMPANIONS if companions else ():
            ports = {listener: pick_port(port) for listener, port in companion.ports.items()}
            named_ports.update({f"{companion.name}.{listener}": port for listener, port in ports.items()})
            logs[companion.name] = ws.logs_dir / f"{companion.name}.log"
            process = children.start(
                companion.name,
                companion_command(ws, companion, ports),
                companion_environment(ws, companion, ports),  # its secrets: never on its command line
                logs[companion.name],
                tuple(ports.values()),
            )
            state["companions"][companion.name] = {
                "pid": process.pid,
                "role": companion.role,
                "ports": ports,
                "urls": companion_urls(companion, ports),
                "log": str(logs[companion.name]),
            }

        async def companion_ready(name: str) -> bool:
            return await companion_health(name, state["companions"][name]) == UP

        failed = await _ready(list(state["companions"]), children, logs, companion_ready, startup_timeout, stopping)
        if failed is not None:
            return failed
        for svc in SERVICES:
            grpc_port, metrics_port = pick_port(svc.grpc_port), pick_port(svc.metrics_port)
            http_port = pick_port(svc.http_port) if svc.http_port else None
            health_port = pick_port(0) if use_tls else None
            env = service_environment(
                ws,
                svc,
                nats_url=nats.url,
                grpc_port=grpc_port,
                metrics_port=metrics_port,
                http_port=http_port,
                peers={name: info["grpc"] for name, info in state["services"].items()},
                named_ports=named_ports,
            )
            if health_port is not None:
                env.update(tls.service_environment(ws.root, svc.name, health_port))
                env.update(tls.nats_client_environment(ws.root, svc.name))
            named_ports.update({f"{svc.name}.grpc": grpc_port, f"{svc.name}.metrics": metrics_port})
            if http_port is not None:
                named_ports[f"{svc.name}.http"] = http_port
            write_service_files(ws, svc, named_ports)  # the CRM connections, ports filled in
            logs[svc.name] = ws.logs_dir / f"{svc.name}.log"
            listens = (grpc_port, metrics_port, *(p for p in (http_port, health_port) if p is not None))
            process = children.start(svc.name, [sys.executable, "-m", svc.module], env, logs[svc.name], listens)
            state["services"][svc.name] = {
                "pid": process.pid,
                "grpc": f"127.0.0.1:{grpc_port}",
                "http": f"http://127.0.0.1:{http_port}" if http_port else None,
                "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
                "log": str(logs[svc.name]),
            }
            if health_port is not None:
                # Plaintext, grpc.health.v1 only: for probes that present no certificate.
                state["services"][svc.name]["health"] = f"127.0.0.1:{health_port}"

        async def service_ready(name: str) -> bool:
            return await check_health(state["services"][name]["grpc"], timeout=0.5) == "SERVING"

        failed = await _ready(list(state["services"]), children, logs, service_ready, startup_timeout, stopping)
        if failed is not None:
            return failed
        ws.write_run(state)
        ws.record_current()
        out.print(
            _status_table(
                state,
                {name: "SERVING" for name in state["services"]},
                nats=UP,
                companions={name: UP for name in state["companions"]},
            )
        )
        out.print(f"write key (HTTP Basic user / gRPC write_key): [bold]{state['write_key']}[/]")
        out.print(f"admin bearer token: {ws.admin_token_file}")
        if state["companions"]:
            out.print(f"mail sent by journeys: {ws.root / 'mail'} (a maildir: one file per message in new/)")
        out.print(f"addresses, write key and token path for scripts: {ws.run_file}")
        out.print("[green]cdp is up.[/] Ctrl-C stops everything.")

        # Supervision: a process that exits is started again with backoff (see cdpctl.supervise).
        recovering: set[str] = set()

        def entry(name: str) -> dict:
            return state["services"].get(name) or state["companions"][name]

        while not stopping.is_set():
            if not nats.running:
                # As the chart's StatefulSet would: the same port and JetStream store, started again at
                # once (the services reconnect by themselves). One that cannot start stops the platform.
                console.print(f"[yellow]nats-server exited; restarting it (data in {ws.nats_dir})[/]")
                try:
                    await asyncio.to_thread(nats.start)
                except RuntimeError as exc:
                    console.print(f"[red]{exc}; stopping the platform.[/]")
                    code = 1
                    break
                state["nats_pid"] = nats._proc.pid if nats._proc is not None else None
                ws.write_run(state)
                console.print(f"[green]nats-server is UP again (pid {state['nats_pid']})[/]")
            for event in children.tick():
                if isinstance(event, Restarted):
                    entry(event.name)["pid"] = event.pid
                    ws.write_run(state)
                    recovering.add(event.name)
                    console.print(f"[yellow]{event.name} restarted (pid {event.pid})[/]")
                elif isinstance(event, Exited):
                    recovering.discard(event.name)
                    restart_started(entry(event.name), event, policy)  # `status` shows it restarting
                    ws.write_run(state)
                    console.print(
                        f"[yellow]{event.name} exited ({event.how}); restarting it in {event.delay:.0f} s "
                        f"(crash {event.crashes} of {policy.give_up_after} allowed in a row). "
                        f"Last log lines ({logs[event.name]}):[/]"
                    )
                    console.print(_tail(logs[event.name], 5), markup=False, highlight=False)
                elif isinstance(event, PortsTaken):
                    ports = ", ".join(str(port) for port in event.ports)
                    console.print(
                        f"[yellow]{event.name} waits to start: another socket has its port {ports} (an outgoing "
                        f"connection given it while {event.name} was down, or another program listening: "
                        f"`ss -tanp | grep :PORT` shows which); it starts once the port is free.[/]"
                    )
                elif isinstance(event, GaveUp):
                    console.print(
                        f"[red]{event.name} exited ({event.how}): {event.crashes} crashes in a row, each within "
                        f"{policy.stable_after:.0f} s of starting; giving up and stopping the platform. "
                        f"Last log lines ({logs[event.name]}):[/]"
                    )
                    console.print(_tail(logs[event.name]), markup=False, highlight=False)
                    code = 1
                    stopping.set()
            if stopping.is_set():
                break
            for name in list(recovering):
                ready = service_ready if name in state["services"] else companion_ready
                if await ready(name):
                    recovering.discard(name)
                    restart_finished(entry(name))
                    ws.write_run(state)
                    what = "SERVING" if name in state["services"] else "UP"
                    console.print(f"[green]{name} is {what} again[/]")
            try:
                await asyncio.wait_for(stopping.wait(), 0.5)
            except TimeoutError:
                pass
        return code
    finally:
        console.print("stopping …")
        # Services first (they may still be sending through a companion), then the companions.
        order = [n for n in children.names if n not in state["companions"]] + list(state["companions"])
        children.stop(
            order, 20, on_kill=lambda name: console.print(f"[yellow]{name} did not stop in time; killing it[/]")
        )
        nats.stop()
        try:
            ws.run_file.unlink()
        except OSError:
            pass
        ws.forget_current()
        console.print("stopped.")


@click.command()
@click.option("--startup-timeout", default=60.0, show_default=True, help="seconds every service gets to become healthy")
@click.option("--restart-limit", default=5, show_default=True, help="crashes in a row before giving up on a service")
@click.option(
    "--no-companions",
    is_flag=True,
    help="do not start the local channel servers and CRM emulators (orchestration then sends in-app only)",
)
@click.option(
    "--tls",
    "use_tls",
    is_flag=True,
    envvar="CDP_UP_TLS",
    help="mutual TLS between the services and for cdpctl: a development CA and one certificate per service "
    "under the workspace's secrets/tls/",
)
@click.pass_obj
def up(ws: Workspace, startup_timeout: float, restart_limit: int, no_companions: bool, use_tls: bool) -> None:
    """Start nats-server, the local channel servers and CRM emulators, and every service on the embedded
    store; show where they listen.

    A service or companion that exits is restarted with backoff (1 s, 2 s, 4 s … up to 30 s); after
    --restart-limit crashes in a row, each within a minute of starting, the platform stops. Ctrl-C stops
    everything.
    """
    policy = RestartPolicy(give_up_after=restart_limit)
    raise SystemExit(asyncio.run(_up(ws, startup_timeout, policy, companions=not no_companions, use_tls=use_tls)))


# ------------------------------------------------------------------------------------------ status


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


# ------------------------------------------------------------------------------------- nats-rotate


def _monitor(state: dict, path: str) -> dict:
    with urllib.request.urlopen(f"{state['nats_monitor']}{path}", timeout=5) as reply:
        return json.loads(reply.read())


def _reload_nats(state: dict, timeout: float = 10.0) -> None:
    """SIGHUP nats-server and wait until it has read its configuration again."""
    before = _monitor(state, "/varz").get("config_load_time")
    os.kill(state["nats_pid"], signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while _monitor(state, "/varz").get("config_load_time") == before:
        if time.monotonic() > deadline:
            raise click.ClickException(f"nats-server did not reload its configuration within {timeout:.0f}s")
        time.sleep(0.1)


def _users_connected(state: dict) -> set[str]:
    return {c.get("authorized_user", "") for c in _monitor(state, "/connz?auth=true&limit=1024").get("connections", [])}


@click.command("nats-rotate")
@click.argument("service", type=click.Choice([svc.name for svc in SERVICES]))
@click.option("--timeout", default=30.0, show_default=True, help="seconds the service gets to reconnect")
@click.pass_obj
def nats_rotate(ws: Workspace, service: str, timeout: float) -> None:
    """Give SERVICE new NATS credentials while everything runs, without restarting anything.

    Make before break: nats-server learns the new user beside the old one, the service's credentials file
    is rewritten (the service reconnects with it by itself), then the old user is removed.
    """
    from cdp_kit.natsauth import new_password, read_credentials, write_credentials  # (it imports the bus)

    state = ws.running()
    if state is None:
        raise click.ClickException(f"cdp is not running in {ws.root} (start it with `make up`)")
    path = ws.nats_credentials_file(service)
    old, _password = read_credentials(path)
    new, password = next_nats_user(old), new_password()
    ws.write_nats_auth(extra={new: password})
    _reload_nats(state)
    write_credentials(path, new, password)
    deadline = time.monotonic() + timeout
    while True:
        users = _users_connected(state)
        if new in users and old not in users:
            break
        if time.monotonic() > deadline:
            raise click.ClickException(
                f"{service} still connects as {old!r} after {timeout:.0f}s; both users stay valid (run again)"
            )
        time.sleep(0.2)
    ws.write_nats_auth()
    _reload_nats(state)
    console.print(f"{service} now connects to NATS as {new!r}; {old!r} is gone.")
