"""How many HTTP connections the collector holds at once: a cap in all, and optionally one per client address.

Every connection costs a file descriptor and some memory for as long as it is open, whether or not it
ever sends a request. Timeouts bound how long one lasts (the header timeout also closes an idle
keep-alive connection); the cap bounds how many there are, so a flood of connections opened faster than
they time out ends at the cap, not at the process's open-file limit, where accept() starts failing and
every caller is turned away alike.

A connection past a cap is refused at once, cheaply, and never reaches the HTTP server:
  - past `max_connections` (every connection): 503 `too_many_connections` with Retry-After;
  - past `per_client` (connections from one address, 0: no such cap): 429 `too_many_connections`.
The answer is written when the request starts to arrive (a response follows a request), the sending side
is then closed and whatever else the client sends is read and dropped until it closes the connection, so
its HTTP client reads the answer rather than a reset. None of it is parsed. A refusal lasts at most
REFUSAL_SECONDS (a client that sends nothing is cut off then without an answer), and at most
`max_refusing()` are under way at once: past that, a connection is closed the moment it is accepted.
Segment's and RudderStack's SDKs retry both answers, and a closed connection too: nothing is lost that
they hold; Segment's waits the Retry-After out without spending its retry budget.

Behind a load balancer or a proxy every client has the proxy's address: a per-client cap would then cap
all of them together, so it is off (0) unless set.

Each refusal is counted in `cdp.collector.http.refused` (attribute `reason`: `max_connections`,
`max_connections_per_client`) and said at WARNING at most once a minute; `cdp.collector.http.connections`
is how many connections are open.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from aiohttp import web

from cdp_collector.abandoned import EveryMinute
from cdp_kit.service import open_file_limit
from cdp_kit.telemetry import Telemetry, observe_on

#: The most connections unset CDP_COLLECTOR_HTTP_MAX_CONNECTIONS allows whatever the open-file limit: an
#: idle connection costs about 10 KB of the process's memory (more while it carries a request).
DEFAULT_CEILING = 10_000
REFUSAL_SECONDS = 2.0  # the longest a refused connection is held (waiting for its request, then its close)
RETRY_AFTER = 5  # seconds: about when an idle connection times out and frees its place


def default_max_connections(files: int | None = None) -> int:
    """Half the open-file limit, at most DEFAULT_CEILING: the other half is for refusals under way, gRPC
    callers (a quarter: cdp_kit.service), the bus and the process's own files."""
    files = open_file_limit() if files is None else files
    return max(1, min(files // 2, DEFAULT_CEILING))


def most_connections_allowed(files: int | None = None) -> int:
    """The largest cap the open-file limit leaves room for: a quarter of it stays for everything else."""
    files = open_file_limit() if files is None else files
    return files - files // 4


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int  # every connection, from anywhere
    per_client: int = 0  # connections from one client address; 0: no per-client cap

    def max_refusing(self) -> int:
        """Refusals under way at once (each holds its connection up to REFUSAL_SECONDS)."""
        return max(64, self.max_connections // 4)


def _answer(status: str, code: str, message: str) -> bytes:
    body = orjson.dumps(
        {"success": False, "code": code, "message": message, "error": {"code": code, "message": message}}
    )
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nRetry-After: {RETRY_AFTER}\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class ConnectionGate:
    """Admits a connection to the HTTP server (`server`, aiohttp's protocol factory) while the caps allow,
    and refuses it otherwise; `protocol` is the factory to listen with."""

    def __init__(
        self,
        server: Callable[[], asyncio.Protocol],
        limits: ConnectionLimits,
        telemetry: Telemetry,
        log: logging.Logger,
    ) -> None:
        self.server = server
        self.limits = limits
        self.open = 0
        self.by_client: dict[str, int] = {}
        self.refusing: set[asyncio.BaseTransport] = set()
        self.answers = {
            "max_connections": _answer(
                "503 Service Unavailable",
                "too_many_connections",
                f"the collector has as many HTTP connections open as it takes ({limits.max_connections}, "
                f"CDP_COLLECTOR_HTTP_MAX_CONNECTIONS); nothing was stored: send again after Retry-After seconds",
            ),
            "max_connections_per_client": _answer(
                "429 Too Many Requests",
                "too_many_connections",
                f"this address has as many HTTP connections open to the collector as one address may "
                f"({limits.per_client}, CDP_COLLECTOR_HTTP_MAX_CONNECTIONS_PER_CLIENT); nothing was stored: "
                "send over a connection already open, or again after Retry-After seconds",
            ),
        }
        self.refused = telemetry.meter.create_counter(
            "cdp.collector.http.refused",
            unit="{connection}",
            description="HTTP connections refused because the collector or their client address held its most, "
            "by reason",
        )
        meter = telemetry.meter
        observe_on(
            meter,
            "cdp.collector.http.connections",
            self,
            ConnectionGate._observe_open,
            lambda callback: meter.create_observable_gauge(
                "cdp.collector.http.connections",
                callbacks=[callback],
                unit="{connection}",
                description="HTTP connections open (refused ones not counted)",
            ),
        )
        self.report = EveryMinute(
            log,
            first="refused an HTTP connection: the collector, or the caller's address, has as many open as it "
            "may; callers are told to retry (raise the cap if the open-file limit and memory allow, or add "
            "collector replicas)",
            summary="refused %d HTTP connections in the last minute: too many open",
            unit="connections",
            level=logging.WARNING,
        )

    def _observe_open(self):
        from opentelemetry.metrics import Observation

        return [Observation(self.open)]

    def protocol(self) -> asyncio.Protocol:
        return _Connection(self)

    def _admit(self, client: str) -> str | None:
        """Why a new connection from `client` is refused, or None (it is then counted as open)."""
        if self.open >= self.limits.max_connections:
            return "max_connections"
        held = self.by_client.get(client, 0)
        if self.limits.per_client and held >= self.limits.per_client:
            return "max_connections_per_client"
        self.open += 1
        self.by_client[client] = held + 1
        return None

    def _release(self, client: str) -> None:
        self.open -= 1
        held = self.by_client[client] - 1
        if held:
            self.by_client[client] = held
        else:
            del self.by_client[client]

    def _refuse(self, transport: asyncio.Transport, why: str) -> None:
        self.refused.add(1, {"reason": why})
        limit = self.limits.max_connections if why == "max_connections" else self.limits.per_client
        self.report(why, limit=limit)
        if len(self.refusing) >= self.limits.max_refusing():
            transport.abort()  # a flood of refusals: not even an answer
            return
        self.refusing.add(transport)
        asyncio.get_running_loop().call_later(REFUSAL_SECONDS, transport.abort)

    def close(self) -> None:
        """At shutdown: end the refusals under way and the report's minute."""
        for transport in list(self.refusing):
            transport.abort()
        self.refusing.clear()
        self.report.close()


class GatedSite(web.BaseSite):
    """aiohttp's TCP site, its connections admitted or refused by a ConnectionGate."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, gate: ConnectionGate) -> None:
        super().__init__(runner)
        self.host = host
        self.port = port
        self.gate = gate

    @property
    def name(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = await asyncio.get_running_loop().create_server(
            self.gate.protocol, self.host, self.port, reuse_address=True
        )
        self._server = server
        if server.sockets:
            self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await super().stop()
        self.gate.close()


class _Connection(asyncio.Protocol):
    """One accepted connection: the HTTP server's handler's, once admitted (every event is passed on), or a
    refusal (its request dropped unread)."""

    __slots__ = ("answered", "client", "gate", "handler", "refusal", "transport")

    def __init__(self, gate: ConnectionGate) -> None:
        self.gate = gate
        self.client = ""
        self.handler: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.refusal = ""  # the reason, when refused
        self.answered = False

    def connection_made(self, transport) -> None:
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if isinstance(peer, tuple) else str(peer)
        why = self.gate._admit(self.client)
        if why is None:
            self.handler = self.gate.server()
            self.handler.connection_made(transport)
        else:
            self.transport = transport
            self.refusal = why
            self.gate._refuse(transport, why)

    def data_received(self, data: bytes) -> None:
        if self.handler is not None:
            self.handler.data_received(data)
        elif not self.answered and self.transport is not None and not self.transport.is_closing():
            self.answered = True
            self.transport.write(self.gate.answers[self.refusal])
            if self.transport.can_write_eof():
                self.transport.write_eof()

    def eof_received(self):
        if self.handler is not None:
            return self.handler.eof_received()
        return None  # refused: the client has finished, close

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.handler is not None:
            self.gate._release(self.client)
            self.handler.connection_lost(exc)
        else:
            self.gate.refusing.discard(self.transport)
