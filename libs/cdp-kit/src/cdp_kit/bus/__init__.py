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
from nats.js.client import JetStreamContext

from cdp_kit.bus import subjects
from cdp_kit.bus.consumer import ConsumerRunner, ConsumerSpec, Delivery, Handler, delivered_since
from cdp_kit.bus.partition import Partitioner, owned_partitions, partition_for
from cdp_kit.bus.publisher import OutMessage, Publisher, PubResult
from cdp_kit.bus.streams import (
    StreamSpec,
    dead_letter_stream,
    ensure_stream,
    events_raw_stream,
    events_resolved_stream,
    identity_stream,
    privacy_stream,
    profiles_stream,
    scores_stream,
    segments_stream,
)
from cdp_kit.errors import Unauthenticated, Unavailable
from cdp_kit.telemetry import Telemetry, setup_telemetry

if TYPE_CHECKING:
    from cdp_kit.natsauth import CredentialsFile, NatsClientSettings

log = logging.getLogger("cdp.bus")


def _without_credentials(url: str) -> str:
    """CDP_NATS_URL as logs and errors may show it: a user and password in it are left out."""
    return ", ".join(
        f"{part.partition('://')[0]}://{part.rpartition('@')[2]}" if "@" in part else part for part in url.split(",")
    )


def _refusal(exc: BaseException) -> str:
    """Why the server refused us, when it did ("" for anything a retry may cure)."""
    if isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in str(exc).lower():
        return "authorization violation"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or type(exc).__name__}"
    return ""


async def _follow_rotation(nc: NATS, credentials: CredentialsFile, every: float = 1.0) -> None:
    """Reconnect as soon as the credentials file holds new credentials (see cdp_kit.natsauth: rotation)."""
    while True:
        await asyncio.sleep(every)
        if credentials.changed() and nc.is_connected:
            log.info("nats credentials file changed; reconnecting with the new credentials")
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
    ) -> AsyncIterator[Bus]:
        """Connect (retrying for up to `connect_timeout` seconds: NATS may start after us), reconnect
        forever afterwards, drain on exit. `security`: credentials and TLS (default: from the environment)."""
        from cdp_kit.natsauth import NatsClientSettings

        security = security or NatsClientSettings.from_environment()
        credentials = security.credentials()
        secured = security.connect_options(credentials)
        telemetry = telemetry or setup_telemetry(name)

        # Refused credentials or a certificate that does not verify will not get better by retrying: at
        # start-up they stop the service with the reason (later, after a rotation, reconnects go on).
        refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

        async def on_error(exc: Exception) -> None:
            log.warning("nats: %s", exc)
            if not refused.done() and _refusal(exc):
                refused.set_result(exc)

        async def on_disconnected() -> None:
            log.warning("nats disconnected; reconnecting")

        async def on_reconnected() -> None:
            log.info("nats reconnected", extra={"server": str(nc.connected_url.netloc if nc.connected_url else "")})

        servers = [s.strip() for s in url.split(",") if s.strip()]
        deadline = time.monotonic() + connect_timeout
        attempt = 0
        while True:
            nc = NATS()
            connecting = asyncio.ensure_future(
                nc.connect(
                    servers=servers,
                    name=name,
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=on_error,
                    disconnected_cb=on_disconnected,
                    reconnected_cb=on_reconnected,
                    pending_size=64 * 1024 * 1024,
                    **secured,
                )
            )
            await asyncio.wait({connecting, refused}, return_when=asyncio.FIRST_COMPLETED)
            if refused.done() and not connecting.done():
                connecting.cancel()
                with contextlib.suppress(BaseException):
                    await connecting
                with contextlib.suppress(Exception):
                    await nc.close()
                raise Unauthenticated(
                    f"NATS at {_without_credentials(url)} refused this client ({_refusal(refused.result())}): check "
                    "CDP_NATS_CREDENTIALS_FILE and CDP_NATS_TLS_* against the server's users and certificates"
                )
            try:
                connecting.result()
                break
            except (nats.errors.NoServersError, OSError, TimeoutError) as exc:
                attempt += 1
                if time.monotonic() >= deadline:
                    raise Unavailable(
                        f"cannot connect to NATS at {_without_credentials(url)} (CDP_NATS_URL): {exc}"
                    ) from exc
                if attempt == 1:
                    log.warning("waiting for NATS at %s: %s", _without_credentials(url), exc)
                await asyncio.sleep(min(0.2 * attempt, 2.0))
        bus = cls(nc, telemetry, ack_timeout=ack_timeout, max_in_flight=max_in_flight)
        watching = asyncio.create_task(_follow_rotation(nc, credentials)) if credentials is not None else None
        try:
            await bus.publisher.start()
            yield bus
        finally:
            if watching is not None:
                watching.cancel()
                await asyncio.gather(watching, return_exceptions=True)
            await bus.publisher.close()
            if nc.is_connected:
                try:
                    # Acks and publishes already written must reach the server before we go.
                    await nc.flush(timeout=2)
                except Exception:
                    pass
            if not nc.is_closed:
                await nc.close()

    async def ensure_streams(self, *specs: StreamSpec) -> None:
        """The streams this service owns: created, and brought to `specs` when they differ."""
        for spec in specs:
            await ensure_stream(self.js, spec)

    async def ensure_read_streams(self, *specs: StreamSpec) -> None:
        """Streams another service owns and configures: created with `specs` when missing (start
        order does not matter), never changed when they exist."""
        for spec in specs:
            await ensure_stream(self.js, spec, update=False)

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
