"""The event bus: NATS JetStream as backbone and log (docs/architecture.md, streams and subjects).

async with Bus.connect(settings.nats_url, name="collector", telemetry=t) as bus:
    await bus.ensure_streams(events_raw_stream())
    results = await bus.publisher.publish_batch([OutMessage(subjects.events_raw(3), payload, msg_id), ...])
    runner = bus.consumer(ConsumerSpec(...), handler)

Stream, subject and durable names: `cdp_kit.bus.subjects` (one owner; nothing else spells them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

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
from cdp_kit.errors import Unavailable
from cdp_kit.telemetry import Telemetry, setup_telemetry

log = logging.getLogger("cdp.bus")


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
    ) -> AsyncIterator[Bus]:
        """Connect (retrying for up to `connect_timeout` seconds: NATS may start after us), reconnect
        forever afterwards, drain on exit."""
        telemetry = telemetry or setup_telemetry(name)

        async def on_error(exc: Exception) -> None:
            log.warning("nats: %s", exc)

        async def on_disconnected() -> None:
            log.warning("nats disconnected; reconnecting")

        async def on_reconnected() -> None:
            log.info("nats reconnected", extra={"server": str(nc.connected_url.netloc if nc.connected_url else "")})

        servers = [s.strip() for s in url.split(",") if s.strip()]
        deadline = time.monotonic() + connect_timeout
        attempt = 0
        while True:
            nc = NATS()
            try:
                await nc.connect(
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
                )
                break
            except (nats.errors.NoServersError, OSError, TimeoutError) as exc:
                attempt += 1
                if time.monotonic() >= deadline:
                    raise Unavailable(f"cannot connect to NATS at {url} (CDP_NATS_URL): {exc}") from exc
                if attempt == 1:
                    log.warning("waiting for NATS at %s: %s", url, exc)
                await asyncio.sleep(min(0.2 * attempt, 2.0))
        bus = cls(nc, telemetry, ack_timeout=ack_timeout, max_in_flight=max_in_flight)
        try:
            await bus.publisher.start()
            yield bus
        finally:
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
