"""pytest plugin loaded for every test (`-p cdp_testing.plugin`): shared fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from cdp_kit.natsserver import NatsServer


@pytest.fixture
def nats_server(tmp_path) -> Iterator[NatsServer]:
    """A real nats-server with JetStream on a free port and a temporary store."""
    server = NatsServer(store_dir=tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def nats_client(nats_server: NatsServer) -> AsyncIterator:
    import nats

    nc = await nats.connect(nats_server.url, max_reconnect_attempts=2, reconnect_time_wait=0.1)
    try:
        yield nc
    finally:
        await nc.close()
