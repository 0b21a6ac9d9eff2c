"""`cdpctl up` and `cdpctl nats-rotate`: run the local platform under supervision; rotate NATS credentials.

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

`cdpctl status` and the health probes `up` waits on live in `cdpctl.status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

import click

from cdp_kit.natsserver import NatsServer
from cdpctl import tls
from cdpctl.common import console, out
from cdpctl.partitions import home_partitions
from cdpctl.partitions import record as record_partitions
from cdpctl.partitions import recorded as recorded_partitions
from cdpctl.platform import (
    COMPANIONS,
    SERVICES,
    Workspace,
    companion_command,
    companion_environment,
    companion_urls,
    fill,
    free_held,
    nats_server_config,
    next_nats_user,
    pick_port,
    private_umask,
    service_environment,
    write_service_files,
)
from cdpctl.restart import RESTART_GRACE
from cdpctl.restart import take as restart_requests

# `up` waits with the status command's probes and prints its table. STORE_HEALTH and `status` stay
# importable from here, as before they moved to cdpctl.status.
from cdpctl.status import (  # noqa: F401
    STORE_HEALTH,
    UP,
    _status_table,
    check_health,
    companion_health,
    status,
)
from cdpctl.supervise import (
    Exited,
    GaveUp,
    PortsTaken,
    Restarted,
    RestartPolicy,
    Stopped,
    Supervisor,
    restart_asked,
    restart_finished,
    restart_started,
)

# ---------------------------------------------------------------------------------------------- up


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# How many times `_ready` starts a service again that lost a port picked for it while it started.
PORT_LOSSES = 3


def _port_lost(log: Path, losses: int) -> bool:
    """The service whose log this is exited because it could not listen on a port (cdp_kit.service's bind
    error), and may be started again for it."""
    return losses < PORT_LOSSES and "the port is in use" in _tail(log, 5)


async def _ready(
    names: list[str],
    children: Supervisor,
    logs: dict[str, Path],
    is_ready,
    startup_timeout: float,
    stopping: asyncio.Event,
) -> int | None:
    """Wait until `is_ready(name)` for every name; an exit code (1, or 130 on Ctrl-C) when that fails.

    A service that exited because a port picked for it was taken meanwhile (its log says "the port is in
    use") is started again once the port is free, up to PORT_LOSSES times: a port in the kernel's ephemeral
    range (the gRPC ports, 50051-50057) is held for it until it starts, and any outgoing connection on the
    machine may be given it while the service starts (seconds). Not the service's fault, and the platform
    failed for it."""
    deadline = time.monotonic() + startup_timeout
    pending = set(names)
    lost: dict[str, int] = {}  # service -> how many times it lost a port while starting
    waiting: set[str] = set()  # those down, waiting for their port
    while pending:
        for name in sorted(pending):
            proc = children.process(name)
            if proc.poll() is not None:
                if name in waiting or _port_lost(logs[name], lost.get(name, 0)):
                    if name not in waiting:
                        lost[name] = lost.get(name, 0) + 1
                        waiting.add(name)
                        console.print(
                            f"[yellow]{name} could not listen: another socket took its port after it was picked "
                            "(an outgoing connection given it as its local port, or another program); it starts "
                            "again once the port is free.[/]"
                        )
                    if not children.ports_taken(name):
                        waiting.discard(name)
                        children.start_again(name)
                    continue
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


#: Seconds a start-up step interrupted by Ctrl-C is given to finish before it is cancelled (`_unless_stopped`).
FINISH_ON_STOP = 5.0


async def _unless_stopped(step, stopping: asyncio.Event) -> int | None:
    """`step`'s exit code, or 130 when Ctrl-C (or SIGTERM) comes first, within FINISH_ON_STOP s: a start-up
    step on a slow or wedged nats-server (provisioning waits up to 30 s to connect) does not hold the
    platform's stop."""
    task = asyncio.ensure_future(step)
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if task.done():
        return task.result()
    # A healthy server finishes in a moment, and a step cut off mid-way can leave its NATS client
    # reconnecting to a server that is stopping (the process then never ends): let it finish, for a while.
    done, _ = await asyncio.wait({task}, timeout=FINISH_ON_STOP)
    if not done:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    console.print("interrupted while the streams were provisioned")
    return 130


async def _provision(ws: Workspace, url: str, client: dict | None, *, quiet: bool = False) -> int | None:
    """Create and configure every stream as cdpctl's operator user, with the retention settings the
    services will get (cdpctl's environment and the services' own `env`); 1 when it cannot be done.
    `quiet`: say nothing when nothing had to change (before a crashed service is started again)."""
    from cdp_kit.natsauth import NatsClientSettings  # (it imports the bus)
    from cdp_kit.provision import run as provision
    from cdp_kit.streamtable import KNOBS, MODEL_STORE_VARIABLE

    shaping = {knob.variable for knob in KNOBS} | {MODEL_STORE_VARIABLE, "CDP_OWNERSHIP"}
    environ = dict(os.environ)
    for svc in SERVICES:
        environ.update({key: fill(value, ws, {}) for key, value in svc.env.items() if key in shaping})
    security = NatsClientSettings()
    if client is not None:
        security = NatsClientSettings(
            tls_ca_file=Path(client["ca_file"]),
            tls_cert_file=Path(client["cert_file"]),
            tls_key_file=Path(client["key_file"]),
        )
    try:
        done = await provision(ws.nats_operator_url(url), environ=environ, security=security)
    except Exception as exc:
        console.print(f"[red]provisioning the streams failed: {type(exc).__name__}: {exc}[/]", soft_wrap=True)
        return 1
    created = [line for line in done if line.startswith("created ")]
    if quiet and not done:
        return None
    console.print(f"streams provisioned ({len(created)} created, {len(done) - len(created)} updated)")
    for line in done:  # what an update changed, as it was and as it is now (never a message)
        if line not in created:
            console.print(f"  {line}", soft_wrap=True, markup=False)
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
    with private_umask(), _environment_kept("CDP_PARTITIONS"):
        return await _up_private(ws, startup_timeout, policy, companions=companions, use_tls=use_tls)


@contextlib.contextmanager
def _environment_kept(variable: str):
    """`variable` of cdpctl's environment as it was before, once the block is done."""
    before = os.environ.get(variable)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = before


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
    restart_requests(ws)  # left by a `cdpctl restart` of an earlier run that stopped before taking them
    # Before anything reads or writes the home's data: the count it was made with (a new home: 2).
    # Everything started from here gets it from cdpctl's environment: nats-server's users (their
    # permissions name each partition), the provisioner (which records it in the streams) and every service.
    partitions = home_partitions(ws.root, os.environ, data=(ws.nats_dir / "jetstream", ws.data_dir))
    os.environ["CDP_PARTITIONS"] = str(partitions)
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
    # Ctrl-C and SIGTERM are taken from here on: a process started with SIGINT ignored (a test runner's
    # worker, `nohup`) has no KeyboardInterrupt to fall back on, so one that came while nats-server started
    # was lost and the platform came up regardless.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    console.print(f"starting nats-server (JetStream, data in {ws.nats_dir}) …")
    try:
        nats.start()
    except RuntimeError as exc:  # it did not listen in time (its log is named)
        console.print(f"[red]{exc}[/]", soft_wrap=True)
        return 1
    children = Supervisor(policy)
    logs: dict[str, Path] = {}
    state: dict = {
        "pid": os.getpid(),
        # The home it serves: a copied or moved home's run.json names another platform (`Workspace.read_run`).
        "home": str(ws.root.resolve()),
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
    code = 0
    try:
        # Every stream and bucket, with its spec, before any service starts: no service's NATS user may
        # create or update a stream (cdp_kit.provision); each verifies at start what is made here.
        failed = await _unless_stopped(_provision(ws, nats.url, client), stopping)
        if failed is not None:
            return failed
        # A home from before the record: its count is written once the provisioner found it agrees with
        # what the streams show (a refused count leaves no record to undo).
        record_partitions(ws.root, int(os.environ["CDP_PARTITIONS"]))
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
        # Every service's gRPC address before any starts: profile calls segmentation and segmentation calls
        # orchestration, both started after it (each asks only when a deletion comes, never at start).
        grpc_ports = {svc.name: pick_port(svc.grpc_port) for svc in SERVICES}
        for svc in SERVICES:
            grpc_port, metrics_port = grpc_ports[svc.name], pick_port(svc.metrics_port)
            http_port = pick_port(svc.http_port) if svc.http_port else None
            health_port = pick_port(0) if use_tls else None
            env = service_environment(
                ws,
                svc,
                nats_url=nats.url,
                grpc_port=grpc_port,
                metrics_port=metrics_port,
                http_port=http_port,
                peers={name: f"127.0.0.1:{port}" for name, port in grpc_ports.items()},
                named_ports=named_ports,
            )
            if health_port is not None:
                env.update(tls.service_environment(ws.root, svc.name, health_port))
                env.update(tls.nats_client_environment(ws.root, svc.name))
            named_ports.update({f"{svc.name}.grpc": grpc_port, f"{svc.name}.metrics": metrics_port})
            if http_port is not None:
                named_ports[f"{svc.name}.http"] = http_port
            kept: list[Path] = []
            write_service_files(ws, svc, named_ports, kept)  # the CRM connections, ports filled in
            for path in kept:
                out.print(
                    f"[yellow]{path} was edited since cdpctl wrote it: kept as it is (its ports are not "
                    "brought up to date; delete it to have it written afresh)[/]"
                )
            logs[svc.name] = ws.logs_dir / f"{svc.name}.log"
            listens = (grpc_port, metrics_port, *(p for p in (http_port, health_port) if p is not None))
            free_held(*listens)
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
                # Its store may not have come back with it (lost, wiped, a fresh volume): then no stream
                # exists and every event was answered 503 for as long as the platform ran. Made again here,
                # bounded as before a service's restart; it says nothing when nothing had to change.
                try:
                    await asyncio.wait_for(_provision(ws, nats.url, client, quiet=True), 10.0)
                except TimeoutError:
                    console.print("[yellow]provisioning the streams again took over 10 s; left for now[/]")
            for name, request in restart_requests(ws):
                if name not in children.names:
                    console.print(f"[yellow]a restart was asked for {name!r}, which this platform does not run[/]")
                    continue
                children.restart(name, RESTART_GRACE)
                restart_asked(entry(name), request)  # `status` shows it restarting; `cdpctl restart` waits
                ws.write_run(state)
                console.print(f"[yellow]{name}: restarting, as asked (cdpctl restart)[/]")
            for event in children.tick():
                if isinstance(event, Stopped):
                    recovering.discard(event.name)
                    killed = f"; it did not stop within {RESTART_GRACE:.0f} s and was killed" if event.killed else ""
                    console.print(f"[yellow]{event.name} stopped ({event.how}{killed}); starting it again[/]")
                elif isinstance(event, Restarted):
                    entry(event.name)["pid"] = event.pid
                    ws.write_run(state)
                    recovering.add(event.name)
                    console.print(f"[yellow]{event.name} restarted (pid {event.pid})[/]")
                elif isinstance(event, Exited):
                    recovering.discard(event.name)
                    if event.name in state["services"] and nats.running:
                        # A stream someone changed since (a drifted retention, a republish) stops every
                        # service that verifies it at start: put it back before this one starts again
                        # (bounded: supervising, nats-server's own restart included, must go on).
                        try:
                            await asyncio.wait_for(_provision(ws, nats.url, client, quiet=True), 10.0)
                        except TimeoutError:
                            console.print("[yellow]provisioning the streams again took over 10 s; left for now[/]")
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
@click.option(
    "--startup-timeout",
    default=60.0,
    show_default=True,
    envvar="CDP_UP_STARTUP_TIMEOUT",
    help="seconds every service gets to become healthy",
)
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
@click.argument("service", type=click.Choice([*(svc.name for svc in SERVICES), "cdpctl"]))
@click.option("--timeout", default=30.0, show_default=True, help="seconds the service gets to reconnect")
@click.pass_obj
def nats_rotate(ws: Workspace, service: str, timeout: float) -> None:
    """Give SERVICE new NATS credentials while everything runs, without restarting anything.

    Make before break: nats-server learns the new user beside the old one, the service's credentials file
    is rewritten (the service reconnects with it by itself), then the old user is removed. `cdpctl`
    rotates the operator's own password (run.json's "nats" URL, used by cdpctl and tests): its
    connections are short, so the new password replaces the old at once.
    """
    from cdp_kit.natsauth import default_partitions  # (it imports the bus)

    state = ws.running()
    if state is None:
        raise click.ClickException(f"cdp is not running in {ws.root} (start it with `make up`)")
    with _environment_kept("CDP_PARTITIONS"):
        # The users' permissions name each partition: the home's count, whatever this shell says.
        os.environ["CDP_PARTITIONS"] = str(recorded_partitions(ws.root) or default_partitions())
        if service == "cdpctl":
            _rotate_operator(ws, state)
        else:
            _rotate(ws, state, service, timeout)


def _rotate_operator(ws: Workspace, state: dict) -> None:
    """A new operator password: its credentials file, nats-server's users (reloaded: connections with the
    old password are closed), then run.json's URL. `cdpctl up` refreshes the URL whenever it writes
    run.json again (`Workspace.write_run`), so a restart it supervises does not bring the old one back."""
    from cdp_kit.natsauth import OPERATOR, new_password, write_credentials  # (it imports the bus)
    from cdp_kit.urls import without_credentials

    write_credentials(ws.nats_credentials_file(OPERATOR), OPERATOR, new_password())
    ws.write_nats_auth()
    _reload_nats(state)
    current = ws.read_run() or state
    current["nats"] = ws.nats_operator_url(without_credentials(current["nats"]))
    ws.write_run(current)
    console.print(f"the operator {OPERATOR!r} has a new NATS password (in {ws.run_file}); the old one is refused.")


def _rotate(ws: Workspace, state: dict, service: str, timeout: float) -> None:
    from cdp_kit.natsauth import new_password, read_credentials, write_credentials  # (it imports the bus)

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
