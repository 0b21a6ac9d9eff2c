"""What several profile test modules start the same way."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from cdp.events.v1 import events_pb2
from cdp_kit.bus import (
    Bus,
    dead_letter_stream,
    events_resolved_stream,
    identity_stream,
    privacy_stream,
    profiles_stream,
    scores_stream,
)
from cdp_kit.identifier_hash import IdentifierHashKeys
from cdp_kit.storage import open_store
from cdp_profile.domain import Retention
from cdp_profile.engine import ProfileEngine
from cdp_profile.privacy import Privacy
from cdp_profile.stream import partitioned_engines


@pytest.fixture
def running_engine(nats_server):
    """Starts a profile engine owning its one partition, its deletions hashed with `hash_key`, on the store at
    `store_url`: `async with running_engine(url, hash_key=..., name=...) as engine`. `await engine.feed(*events)`
    publishes resolved events on events.resolved.0 and returns once the engine applied them."""

    @contextlib.asynccontextmanager
    async def start(store_url: str, *, hash_key: str, name: str):
        async with open_store(store_url) as store, Bus.connect(nats_server.url, name=name) as bus:
            await bus.ensure_streams(
                events_resolved_stream(),
                identity_stream(),
                scores_stream(),
                profiles_stream(),
                privacy_stream(),
                dead_letter_stream(),
            )
            engine = ProfileEngine(
                store,
                bus.publisher,
                partitions=1,
                owned=[0],
                retention=Retention(max_events=100),
                telemetry=bus.telemetry,
            )
            engine.privacy = Privacy(engine, IdentifierHashKeys.of(hash_key))
            await engine.start()
            partitioned = partitioned_engines(engine, bus, partitions=1, batch_size=64, ack_wait=30)[0]
            await partitioned.start_partition(0)
            await partitioned.wait_ready()

            async def feed(*events: events_pb2.ResolvedEvent) -> None:
                batch = events_pb2.ResolvedEventBatch(events=events).SerializeToString()
                ack = await bus.js.publish("events.resolved.0", batch)
                deadline = time.monotonic() + 30  # a guard against waiting for ever, not a speed figure
                while partitioned.pipelines[0].checkpoint < ack.seq:
                    assert time.monotonic() < deadline, "the events were not applied in 30 s"
                    await asyncio.sleep(0.01)

            engine.feed = feed
            try:
                yield engine
            finally:
                await partitioned.close()
                await engine.stop()

    return start
