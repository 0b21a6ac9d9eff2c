"""The event bus: NATS JetStream as backbone and log (docs/architecture.md, streams and subjects).

async with Bus.connect(settings.nats_url, name="collector", telemetry=t) as bus:
    await bus.ensure_streams(events_raw_stream())
    results = await bus.publisher.publish_batch([OutMessage(subjects.events_raw(3), payload, msg_id), ...])
    runner = bus.consumer(ConsumerSpec(...), handler)

Stream, subject and durable names: `cdp_kit.bus.subjects` (one owner; nothing else spells them).

Who connects, and how the server is checked: `Bus.connect` reads CDP_NATS_CREDENTIALS_FILE and
CDP_NATS_TLS_* itself (`cdp_kit.natsauth.NatsClientSettings`) unless `security` is given, so every
service connects as its own NATS user (with only the permissions `cdp_kit.natsauth.ROLES` gives it) and
over TLS when configured, without declaring those variables. A malformed one stops start-up naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import nats
from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.client import JetStreamContext

from cdp_kit.bus import subjects
from cdp_kit.bus.consumer import ConsumerRunner, ConsumerSpec, Delivery, Handler, delivered_since
from cdp_kit.bus.partition import Partitioner, owned_partitions, partition_for
from cdp_kit.bus.publisher import OutMessage, Publisher, PubResult
from cdp_kit.bus.streams import (
    ROUTED,
    StreamMismatch,
    StreamSpec,
    dead_letter_stream,
    ensure_created,
    ensure_stream,
    events_raw_stream,
    events_resolved_stream,
    identity_stream,
    privacy_stream,
    profiles_stream,
    scores_stream,
    segments_stream,
    verify_stream,
)
from cdp_kit.errors import Unauthenticated, Unavailable
from cdp_kit.telemetry import Telemetry, setup_telemetry
from cdp_kit.urls import without_credentials as _without_credentials

if TYPE_CHECKING:
    from cdp_kit.natsauth import CredentialsFile, NatsClientSettings


log = logging.getLogger("cdp.bus")

# docs/privacy.md: the streams' copies of personal data age out within 30 days by default, and an erasure
# reaches a stream's copy only when it ages out. A longer retention is the operator's choice; it is said.
PROMISED_RETENTION = 30 * 86_400.0


def _warn_long_retention(stream: str, max_age: float) -> None:
    """A stream this service owns kept longer than the platform promises (0: kept for ever on purpose,
    as PRIVACY's notices and the timers are)."""
    if max_age > PROMISED_RETENTION:
        log.warning(
            "stream %s keeps messages %.0f days, longer than the 30 days docs/privacy.md promises: a deleted "
            "person's copies in it last that long",
            stream,
            max_age / 86_400,
            extra={"stream": stream, "max_age_days": round(max_age / 86_400, 1)},
        )


# How long nats.py waits on each step of a connection (TCP, INFO line, TLS, PONG) before it tries again.
STEP_TIMEOUT = 2.0
# A server that stops answering while connected (stopped, wedged, a link that drops packets) is left when
# MAX_OUTSTANDING_PINGS pings, one each PING_INTERVAL seconds, are still unanswered at the next: within
# 30 s (nats.py's defaults, 120 s and 2, took 4 to 6 minutes). A PING each 10 s costs nothing.
PING_INTERVAL = 10.0
MAX_OUTSTANDING_PINGS = 2
# nats.py reports the same error at each attempt (twice a second against a port that refuses, each
# 2.5 s against one that never answers): a line is logged once, then at most once a minute.
REPEAT_LOG_SECONDS = 60.0


def _refusal(exc: BaseException) -> str:
    """Why the server refused us, when it did ("" for anything a retry may cure)."""
    if isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in str(exc).lower():
        return "authorization violation"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or type(exc).__name__}"
    return ""


def _described(exc: BaseException) -> str:
    """An error as a log line or message names it: its text, or its type when it has none (asyncio's
    TimeoutError, which is what a server that accepts and never answers gives)."""
    return str(exc).strip() or type(exc).__name__


class _Repeats:
    """Which lines to log: a line the first time, then at most once each `every` seconds. `admit` answers
    how many times the line came since it was last logged (0 the first time), or None to leave it out."""

    def __init__(self, every: float = REPEAT_LOG_SECONDS, clock=time.monotonic, remember: int = 32) -> None:
        self._every = every
        self._clock = clock
        self._remember = remember
        self._lines: dict[str, tuple[float, int]] = {}  # line -> (when last logged, how many left out since)

    def admit(self, line: str) -> int | None:
        now = self._clock()
        seen = self._lines.pop(line, None)
        if seen is not None and now - seen[0] < self._every:
            self._lines[line] = (seen[0], seen[1] + 1)
            return None
        self._lines[line] = (now, 0)
        while len(self._lines) > self._remember:
            del self._lines[next(iter(self._lines))]  # the line not seen for longest
        return 0 if seen is None else seen[1]

    def clear(self) -> None:
        self._lines.clear()


async def _follow_rotation(nc: NATS, credentials: CredentialsFile, every: float = 1.0) -> None:
    """Reconnect as soon as the credentials file holds new credentials (see cdp_kit.natsauth: rotation),
    and again at each look while the connection still runs on the old ones."""
    asked = 0
    while True:
        await asyncio.sleep(every)
        if not nc.is_connected:
            continue  # a reconnect under way reads the file itself
        if not credentials.changed():
            asked = 0
            continue
        asked += 1
        if asked == 1:
            log.info("nats credentials file changed; reconnecting with the new credentials")
        elif asked % 30 == 2:
            log.warning("nats still connected with the old credentials; reconnecting again (attempt %d)", asked)
        await nc.force_reconnect()


class Bus:
    def __init__(
        self, nc: NATS, telemetry: Telemetry, *, ack_timeout: float = 5.0, max_in_flight: int = 50_000
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.telemetry = telemetry
        self.publisher = Publisher(nc, telemetry, ack_timeout=ack_timeout, max_in_flight=max_in_flight)

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        url: str,
        *,
        name: str,
        telemetry: Telemetry | None = None,
        connect_timeout: float = 30.0,
        ack_timeout: float = 5.0,
        max_in_flight: int = 50_000,
        security: NatsClientSettings | None = None,
        ping_interval: float = PING_INTERVAL,
        max_outstanding_pings: int = MAX_OUTSTANDING_PINGS,
    ) -> AsyncIterator[Bus]:
        """Connect (retrying for up to `connect_timeout` seconds in all: NATS may start after us, or accept
        connections and never answer), reconnect forever afterwards, drain on exit. `security`: credentials
        and TLS (default: from the environment). A connected server that stops answering is left, and
        reconnected to, when `max_outstanding_pings` pings (one each `ping_interval` s) are unanswered at the next."""
        from cdp_kit.natsauth import ROLES, NatsClientSettings, role_of

        security = security or NatsClientSettings.from_environment()
        credentials = security.credentials()
        secured = security.connect_options(credentials)
        telemetry = telemetry or setup_telemetry(name)

        # Refused credentials or a certificate that does not verify will not get better by retrying: at
        # start-up they stop the service with the reason (later, after a rotation, reconnects go on).
        refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()
        repeats = _Repeats()
        closing = False  # we close the connection: not a disconnection to report

        async def on_error(exc: Exception) -> None:
            line = f"nats: {_described(exc).removeprefix('nats: ')}"  # not "nats: nats: unexpected EOF"
            left_out = repeats.admit(line)
            if left_out is None:
                log.debug("%s (again; logged at most once each %.0f s)", line, REPEAT_LOG_SECONDS)
            elif left_out:
                log.warning("%s (and %d more times since it was last logged)", line, left_out)
            else:
                log.warning("%s", line)
            if not refused.done() and _refusal(exc):
                refused.set_result(exc)

        async def on_disconnected() -> None:
            if not closing:
                log.warning("nats disconnected; reconnecting")

        async def on_reconnected() -> None:
            repeats.clear()  # the next failure is news again
            log.info("nats reconnected", extra={"server": str(nc.connected_url.netloc if nc.connected_url else "")})

        async def abandon(nc: NATS, connecting: asyncio.Future[None]) -> None:
            nonlocal closing
            closing = True
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), STEP_TIMEOUT)

        servers = [s.strip() for s in url.split(",") if s.strip()]
        deadline = time.monotonic() + connect_timeout
        attempt = 0
        while True:
            nc = NATS()
            connecting = asyncio.ensure_future(
                nc.connect(
                    servers=servers,
                    name=name,
                    connect_timeout=min(STEP_TIMEOUT, connect_timeout),
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=on_error,
                    disconnected_cb=on_disconnected,
                    reconnected_cb=on_reconnected,
                    ping_interval=ping_interval,
                    max_outstanding_pings=max_outstanding_pings,
                    pending_size=64 * 1024 * 1024,
                    **secured,
                )
            )
            # nats.py itself retries forever (max_reconnect_attempts=-1): the deadline is ours to keep,
            # whatever step it waits on (a server that accepts and never answers holds it at the INFO line).
            remaining = max(deadline - time.monotonic(), 0.0)
            await asyncio.wait({connecting, refused}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if not connecting.done():
                last_error = nc.last_error
                await abandon(nc, connecting)
                if refused.done():
                    raise Unauthenticated(
                        f"NATS at {_without_credentials(url)} refused this client ({_refusal(refused.result())}): "
                        "check CDP_NATS_CREDENTIALS_FILE and CDP_NATS_TLS_* against the server's users and "
                        "certificates"
                    )
                if last_error is None:
                    why = "not answering"
                elif isinstance(last_error, TimeoutError):
                    why = f"not answering ({_described(last_error)})"
                else:
                    why = _described(last_error)
                raise Unavailable(
                    f"cannot connect to NATS at {_without_credentials(url)} (CDP_NATS_URL): {why}; "
                    f"tried for {connect_timeout:g} s"
                ) from None  # the reason is in the message; nats.py's frames would only hide it
            try:
                connecting.result()
                break
            except (nats.errors.NoServersError, OSError, TimeoutError) as exc:
                attempt += 1
                if time.monotonic() >= deadline:
                    raise Unavailable(
                        f"cannot connect to NATS at {_without_credentials(url)} (CDP_NATS_URL): {_described(exc)}"
                    ) from exc
                if attempt == 1:
                    log.warning("waiting for NATS at %s: %s", _without_credentials(url), _described(exc))
                await asyncio.sleep(min(0.2 * attempt, 2.0))
        bus = cls(nc, telemetry, ack_timeout=ack_timeout, max_in_flight=max_in_flight)
        bus.provisioned = credentials is not None and role_of(credentials.user()) in ROLES
        bus.provision_wait = security.provision_wait
        watching = asyncio.create_task(_follow_rotation(nc, credentials)) if credentials is not None else None
        try:
            await bus.publisher.start()
            yield bus
        finally:
            if watching is not None:
                watching.cancel()
                await asyncio.gather(watching, return_exceptions=True)
            await bus.publisher.close()
            closing = True
            if nc.is_connected:
                try:
                    # Acks and publishes already written must reach the server before we go.
                    await nc.flush(timeout=2)
                except Exception:
                    pass
            if not nc.is_closed:
                await nc.close()

    # True when connected as a service's NATS user (CDP_NATS_CREDENTIALS_FILE): it may not create or
    # update streams (cdp_kit.natsauth), so the ensure_* calls verify what the provisioner made instead.
    provisioned: bool = False
    # How long the verification waits for the provisioner (CDP_NATS_PROVISION_WAIT) before it gives up.
    provision_wait: float = 0.0

    async def _verify(self, config: api.StreamConfig, fields: tuple[str, ...] | None = None) -> None:
        deadline = time.monotonic() + self.provision_wait
        waited = False
        while True:
            try:
                await verify_stream(self.js, config, *(() if fields is None else (fields,)))
                return
            except StreamMismatch as exc:
                if time.monotonic() >= deadline:
                    raise
                if not waited:
                    log.warning("waiting up to %.0f s for the provisioner: %s", self.provision_wait, exc)
                    waited = True
                await asyncio.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))

    async def ensure_streams(self, *specs: StreamSpec) -> None:
        """The streams this service owns: created, and brought to `specs` when they differ. As a service's
        NATS user: verified instead, every compared setting (retention, subjects, sources, mirror,
        republish, subject transform); StreamMismatch (the service does not start) names what differs."""
        for spec in specs:
            _warn_long_retention(spec.name, spec.max_age)
            if self.provisioned:
                await self._verify(spec.config())
            else:
                await ensure_stream(self.js, spec)

    async def ensure_read_streams(self, *specs: StreamSpec) -> None:
        """Streams another service owns and configures: created with `specs` when missing (start
        order does not matter), never changed when they exist. As a service's NATS user: verified
        instead, their subjects, sources, mirror, republish and subject transform (the owner's retention is
        not this service's to check)."""
        for spec in specs:
            if self.provisioned:
                await self._verify(spec.config(), ROUTED)
            else:
                await ensure_stream(self.js, spec, update=False)

    async def ensure_created(self, *configs: api.StreamConfig) -> None:
        """Streams made from full configurations (sourced input streams, timers): created when missing,
        left as they are when they exist (`streams.ensure_created`). As a service's NATS user: verified
        instead, their subjects and routing (a sourced stream must source exactly what its spec says)."""
        for config in configs:
            _warn_long_retention(config.name or "", config.max_age or 0.0)
        if not self.provisioned:
            await ensure_created(self.js, *configs)
            return
        for config in configs:
            await self._verify(config, ROUTED)

    def consumer(self, spec: ConsumerSpec, handler: Handler) -> ConsumerRunner:
        return ConsumerRunner(self.js, spec, handler, self.telemetry)


__all__ = [
    "Bus",
    "ConsumerRunner",
    "ConsumerSpec",
    "Delivery",
    "OutMessage",
    "Partitioner",
    "PubResult",
    "Publisher",
    "StreamMismatch",
    "StreamSpec",
    "dead_letter_stream",
    "delivered_since",
    "ensure_stream",
    "events_raw_stream",
    "events_resolved_stream",
    "identity_stream",
    "owned_partitions",
    "partition_for",
    "privacy_stream",
    "profiles_stream",
    "scores_stream",
    "segments_stream",
    "subjects",
]
