"""`cdpctl status`: the health of the platform `cdpctl up` runs, and the probes it (and `up`) use.

`status` checks each service's gRPC health and asks each companion's listeners a request of their protocol
(`probe`: an HTTP GET, SMTP's greeting) with a short timeout: a companion whose ports accept connections
but do not answer (stopped with SIGSTOP, wedged) is NOT ANSWERING, not UP. nats-server likewise: its client
port must send its INFO line and its monitor answer /healthz (`nats_health`), or it is NOT ANSWERING (or
UNHEALTHY, its /healthz an error), and the platform is not healthy. The platform is healthy when
nats-server and every service are, and every service's stores can write (the health of `cdp.storage`:
a service whose store cannot write - a full disk - is shown "SERVING, store cannot write"); a companion
that is down or not answering is shown so but does not make it unhealthy (it stands in for a provider
outside the platform, as a mail relay or a CRM is in production). The output says so when one is not UP:
`--json` has `companions_counted: false` and a `note` naming each such companion (its state is in its
row), and the table is followed by that note, so "healthy" with a wedged mail relay is never read as "sending mail" (what
orchestration sends to it fails and is dead-lettered on its schedule: `cdpctl lag`, `cdpctl dlq`).

Then, of a nats-server that answers, every durable consumer's backlog (`stuck_backlogs`): one whose oldest
unacknowledged message is older than STUCK_AFTER (5 minutes; orchestration's dispatchers, which hold
deferred actions on purpose, aside) is named below the table (`--json`: `stuck`) and the platform is not
healthy - a consumer that stopped moving, which the health checks of live processes cannot see. A listing
that fails (nats-server refuses the operator's credentials, or a request) or has no answer by its deadline
is said below the table (`--json`: `backlogs` "not checked: <why>", `stuck` null). A failed listing makes
the platform not healthy (a backlog not seen is not one found moving, and the refusal will not pass by
itself); a late one does not (a loaded nats-server: `cdpctl lag` waits longer).

Every check starts at once and all end by one deadline (`STATUS_TIMEOUT` after the start): a service's
health gets `HEALTH_TIMEOUT` of it, a listener's probe `PROBE_TIMEOUT`, and whatever has not answered
by the deadline is shown as not answering. The probes are asyncio connections, not threads: a platform
with more listeners than a thread pool has threads still answers within the one deadline.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import click
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.table import Table

from cdp_kit.urls import without_credentials
from cdpctl import tls
from cdpctl.common import console, out
from cdpctl.platform import COMPANIONS, Companion, Workspace
from cdpctl.supervise import restart_label

# The health service name a service reads NOT_SERVING under while one of its stores cannot write (a full
# disk, a read-only volume: cdp_kit.storage.health, not imported here to keep `status` quick).
STORE_HEALTH = "cdp.storage"
STORE_CANNOT_WRITE = "SERVING, store cannot write"

# A companion's health: UP when every listener answers, DOWN when one does not accept connections, NOT
# ANSWERING when one accepts them but says nothing in time (the kernel accepts for a stopped process).
UP, DOWN, NOT_ANSWERING = "UP", "DOWN", "NOT ANSWERING"
UNHEALTHY = "UNHEALTHY"  # nats-server answers its monitor's /healthz with an error (JetStream not ready)

HEALTH_TIMEOUT = 1.0  # seconds a service's gRPC health check gets
PROBE_TIMEOUT = 1.5  # seconds for the connection and the first bytes of the answer, per listener
# The one deadline of `status`: every check starts at once and ends by then (the longest of the above).
STATUS_TIMEOUT = max(HEALTH_TIMEOUT, PROBE_TIMEOUT)
# Past the deadline, for a check to report its own timeout before it is given up on (`_by`).
_GRACE = 0.25
# A consumer whose oldest unacknowledged message is older than this is stuck, not busy: `status` says so and
# the platform is not healthy. Orchestration's dispatchers hold deferred actions (quiet hours, a provider's
# Retry-After) unacknowledged on purpose, for up to a day: theirs is not counted.
STUCK_AFTER = 300.0


async def _check(stub: health_pb2_grpc.HealthStub, service: str, timeout: float) -> str:
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.aio.AioRpcError as exc:
        return "DOWN" if exc.code() == grpc.StatusCode.UNAVAILABLE else exc.code().name


async def check_health(address: str, timeout: float = HEALTH_TIMEOUT, service: str = "") -> str:
    """A service's gRPC health (of `service`, "" its liveness): SERVING, NOT_SERVING, DOWN (nothing
    listens) or the RPC's error code (DEADLINE_EXCEEDED: it accepts and does not answer in `timeout`)."""
    async with tls.aio_channel(address) as channel:
        return await _check(health_pb2_grpc.HealthStub(channel), service, timeout)


async def service_health(address: str, timeout: float = HEALTH_TIMEOUT) -> str:
    """A service's health as `status` shows it: its liveness, and its stores' (`STORE_HEALTH`) asked at the
    same time on one connection; STORE_CANNOT_WRITE when it serves and a store cannot write."""
    async with tls.aio_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        alive, store = await asyncio.gather(_check(stub, "", timeout), _check(stub, STORE_HEALTH, timeout))
    return STORE_CANNOT_WRITE if alive == "SERVING" and store == "NOT_SERVING" else alive


# Bytes of an answer a probe reads: enough for an HTTP status line's code ("HTTP/1.1 200"), NATS's "INFO "
# and SMTP's code; less when the line ends or the listener closes first.
_ANSWER_BYTES = 12


async def _answer(port: int, protocol: str, path: str, host: str) -> bytes | None:
    """The start of what the listener on `port` says to a request of `protocol` (b"" when it closes
    without a word), or None when it does not accept connections."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:  # refused, unreachable (a timeout is the caller's: a cancellation here)
        return None
    try:
        if protocol == "http":
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        # nats and SMTP speak first: their INFO line, their greeting
        answer = b""
        while len(answer) < _ANSWER_BYTES and b"\n" not in answer:
            chunk = await reader.read(_ANSWER_BYTES - len(answer))
            if not chunk:
                break  # closed
            answer += chunk
        if protocol == "smtp" and answer[:1] in (b"2", b"4", b"5"):
            writer.write(b"QUIT\r\n")
        return answer
    finally:
        writer.transport.abort()  # nothing more to say or hear: no wait on a peer that has stopped


async def probe(
    port: int, protocol: str = "http", path: str = "/", timeout: float = PROBE_TIMEOUT, host: str = "127.0.0.1"
) -> str:
    """UP when the listener on `port` answers a request of its protocol within `timeout`: an HTTP listener
    any status line to `GET <path>` (a 404 is an answer), an SMTP listener its greeting (220, or 421 busy),
    a NATS client port its INFO line. DOWN when nothing listens; NOT ANSWERING otherwise."""
    try:
        async with asyncio.timeout(timeout):
            line = await _answer(port, protocol, path, host)
    except OSError:  # no answer in time (TimeoutError is an OSError), or reset while answering
        return NOT_ANSWERING
    if line is None:
        return DOWN
    if protocol == "nats":
        return UP if line.startswith(b"INFO ") else NOT_ANSWERING
    if protocol == "smtp":
        return UP if line[:1] in (b"2", b"4", b"5") else NOT_ANSWERING
    return UP if line.startswith(b"HTTP/") else NOT_ANSWERING


async def _healthz(monitor: str, timeout: float = PROBE_TIMEOUT) -> str:
    """nats-server's own word (its monitor's /healthz, JetStream included): UP on 200, UNHEALTHY on another
    status, NOT ANSWERING without an answer in `timeout`, DOWN when nothing listens."""
    where = urlsplit(monitor)
    host, port = where.hostname or "127.0.0.1", where.port or 80
    try:
        async with asyncio.timeout(timeout):
            line = await _answer(port, "http", f"{where.path.rstrip('/')}/healthz", host)
    except OSError:
        return NOT_ANSWERING
    if line is None:
        return DOWN
    if not line.startswith(b"HTTP/"):
        return NOT_ANSWERING
    return UP if line.split(b" ")[1:2] == [b"200"] else UNHEALTHY


async def nats_health(state: dict, timeout: float = PROBE_TIMEOUT) -> str:
    """nats-server's health, probed as the companions are (both at once, `timeout` each): its client port
    must send its INFO line, and its monitor (when run.json lists one) answer /healthz with 200."""
    where = urlsplit(state["nats"])
    checks = [probe(where.port or 4222, "nats", timeout=timeout)]
    if state.get("nats_monitor"):
        checks.append(_healthz(state["nats_monitor"], timeout))
    found = await asyncio.gather(*checks)
    return next((h for h in (DOWN, NOT_ANSWERING, UNHEALTHY) if h in found), UP)


_COMPANIONS = {companion.name: companion for companion in COMPANIONS}


async def companion_health(name: str, companion: dict, timeout: float = PROBE_TIMEOUT) -> str:
    """The health of a companion run.json lists (its ports), probed as its definition says (`Companion`),
    every listener at once."""
    definition = _COMPANIONS.get(name) or Companion(name, "", (), {})
    found = await asyncio.gather(
        *(
            probe(port, definition.protocols.get(listener, "http"), definition.health_path, timeout)
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
        without_credentials(state["nats"]),
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


def companions_note(companions: dict[str, str]) -> str | None:
    """What `status` says about the companions not UP (none: None): that they do not count, and which."""
    off = [name for name, health in companions.items() if health != UP]
    if not off:
        return None
    return (
        f"not counted toward health: {', '.join(off)} (dev, not up) - dev companions stand in for providers "
        "outside the platform; what is sent to them fails and is retried, then dead-lettered (cdpctl lag, "
        "cdpctl dlq)"
    )


async def _by(deadline: float, check: Awaitable[str], late: str) -> str:
    """`check`'s answer, or `late` when it has none by `deadline` (loop time): what a check's own timeout
    does not bound (a name to resolve, a loop too busy to run it) cannot hold `status` past it."""
    try:
        async with asyncio.timeout_at(deadline):
            return await check
    except TimeoutError:
        return late


def bus_age(seconds: float | None) -> str:
    from cdpctl.bus import age_text

    return age_text(seconds)


@dataclass
class Backlogs:
    """What `status` found on the bus of a nats-server that answers its probes."""

    # Consumers whose oldest unacknowledged message is older than STUCK_AFTER; None: not looked at.
    stuck: list[dict] | None = None
    # The streams the services of run.json use that nats-server does not hold: nothing published there is
    # stored (the collector answers 503), and no consumer of them exists to be stuck.
    missing: list[str] = field(default_factory=list)
    unchecked: str | None = None  # why they were not looked at
    failed: bool = False  # ... the listing failed (refused: the operator's credentials), not a late answer


async def stuck_backlogs(ws: Workspace, services: Iterable[str] = ()) -> tuple[list[dict], list[str]]:
    """The durable consumers whose oldest unacknowledged message is older than STUCK_AFTER: what an on-call
    trial could not tell from a busy one without sampling `cdpctl lag` twice. Raises what stopped the
    listing (nats-server refused the operator's credentials, a request failed): `_backlogs` says so."""
    from cdp_kit.natsroles import ACTION_CHANNELS, ROLES, dispatch_durable
    from cdp_kit.streamtable import needed
    from cdpctl import bus
    from cdpctl.common import nats_tls, nats_url

    deferring = {dispatch_durable(channel) for channel in ACTION_CHANNELS}
    url = nats_url(ws, None)
    streams, rows = await bus.streams_and_lag(url, nats_tls(ws, url))
    missing = [name for name in needed([s for s in services if s in ROLES]) if name not in streams]
    stuck = [
        row for row in rows if row["consumer"] not in deferring and (row["oldest_age_seconds"] or 0.0) > STUCK_AFTER
    ]
    return stuck, missing


async def _backlogs(ws: Workspace, services: Iterable[str], deadline: float) -> Backlogs:
    """The bus as `stuck_backlogs` finds it by `deadline` (loop time), or why it could not be looked at and
    whether that was a refusal. `status` used to say nothing either way, and to call the platform healthy
    while the operator's credentials were refused."""
    try:
        async with asyncio.timeout_at(deadline):
            stuck, missing = await stuck_backlogs(ws, services)
            return Backlogs(stuck=stuck, missing=missing)
    except TimeoutError:  # nats.py's own timeouts are TimeoutErrors too
        return Backlogs(unchecked=f"nats-server gave no answer listing the consumers within {STATUS_TIMEOUT:g} s")
    except Exception as exc:
        text = str(exc).strip() or type(exc).__name__
        password = urlsplit((ws.read_run() or {}).get("nats") or "").password
        if password:
            text = text.replace(password, "***")  # what an error quotes of the URL, never the operator's password
        return Backlogs(unchecked=f"listing the consumers failed: {text}", failed=True)


async def _status(ws: Workspace) -> tuple[dict | None, dict[str, str], str, dict[str, str], Backlogs]:
    state = ws.running()
    if state is None:
        return None, {}, DOWN, {}, Backlogs()
    # Everything at once, under one deadline: a wedged platform answers in one timeout, whatever is wedged
    # and however many listeners there are. The table keeps run.json's order.
    deadline = asyncio.get_running_loop().time() + STATUS_TIMEOUT + _GRACE
    services, listed = state["services"], state.get("companions", {})
    checks = [
        _by(deadline, nats_health(state), NOT_ANSWERING),
        *(_by(deadline, service_health(svc["grpc"]), "DEADLINE_EXCEEDED") for svc in services.values()),
        *(_by(deadline, companion_health(name, companion), NOT_ANSWERING) for name, companion in listed.items()),
    ]
    nats, *found = await asyncio.gather(*checks)
    health = dict(zip(services, found[: len(services)], strict=True))
    companions = dict(zip(listed, found[len(services) :], strict=True))
    # Then, only of a nats-server that answers, the consumers' backlogs, under a deadline of their own: run
    # beside the probes, its imports and requests on a loaded machine made quick probes miss the deadline.
    backlogs = Backlogs(unchecked=f"nats-server {nats}")
    if nats == UP:
        later = asyncio.get_running_loop().time() + STATUS_TIMEOUT + _GRACE
        backlogs = await _backlogs(ws, services, later)
    return state, health, nats, companions, backlogs


@click.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_obj
def status(ws: Workspace, as_json: bool) -> None:
    """Health of every service of the platform `cdpctl up` runs here (and whether its dev companions are up)."""
    state, health, nats, companions, backlogs = asyncio.run(_status(ws))
    stuck, unchecked = backlogs.stuck, backlogs.unchecked
    if state is None:
        if as_json:
            out.print_json(json.dumps({"running": False, "home": str(ws.root)}))
        else:
            console.print(f"cdp is not running in {ws.root} (start it with `make up`).", soft_wrap=True)
        raise SystemExit(1)
    # Companions stand in for what is outside the platform: one that is down or not answering does not make
    # it unhealthy, and the output says so (`companions_note`).
    healthy = (
        nats == UP
        and all(h == "SERVING" for h in health.values())
        and not stuck
        and not backlogs.failed
        and not backlogs.missing
    )
    note = companions_note({name: companions[name] for name in state.get("companions", {})})
    stuck_note = (
        "stuck: "
        + "; ".join(
            f"{row['consumer']} on {row['stream']}: {row['pending'] + row['ack_pending']} waiting, oldest "
            f"{bus_age(row['oldest_age_seconds'])}"
            for row in stuck
        )
        + " (cdpctl lag --watch 30 says whether it moves; the consumer's service log says why)"
        if stuck
        else None
    )
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
                    "nats": {"url": without_credentials(state["nats"]), "up": nats == UP, "health": nats},
                    "services": services,
                    "companions": {
                        name: {**companion, "up": companions[name] == UP, "health": companions[name]}
                        for name, companion in state.get("companions", {}).items()
                    },
                    "companions_counted": False,
                    **({"note": note} if note else {}),
                    # Consumers whose oldest unacknowledged message is older than STUCK_AFTER (null: unknown,
                    # and `backlogs` says why).
                    "stuck": stuck,
                    "backlogs": "checked" if unchecked is None else f"not checked: {unchecked}",
                    "missing_streams": backlogs.missing,
                    "write_key": state.get("write_key"),
                    "admin_token_file": state.get("admin_token_file"),
                }
            )
        )
    else:
        out.print(f"cdp home: {ws.root}", soft_wrap=True, highlight=False, markup=False)
        out.print(_status_table(state, health, nats=nats, companions=companions))
        if note:
            out.print(note, soft_wrap=True, highlight=False, markup=False)
        if stuck_note:
            out.print(stuck_note, soft_wrap=True, highlight=False, markup=False)
        if backlogs.missing:
            out.print(
                f"streams missing on nats-server: {', '.join(backlogs.missing)} - nothing published there is "
                "stored (the collector answers 503) and their consumers wait; the provisioner makes them "
                "(`make up` at its start, after nats-server restarts and before a crashed service starts again; the "
                "chart's provisioning Job)",
                soft_wrap=True,
                highlight=False,
                markup=False,
            )
        if unchecked is not None and nats == UP:  # nats-server's own row says why when it is not up
            out.print(
                f"consumers' backlogs not checked: {unchecked}"
                + ("; the platform is not counted healthy" if backlogs.failed else "")
                + " (cdpctl lag lists them)",
                soft_wrap=True,
                highlight=False,
                markup=False,
            )
    raise SystemExit(0 if healthy else 1)
