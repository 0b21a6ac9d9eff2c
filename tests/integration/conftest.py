"""The edge of the platform, in-process on a real nats-server: the collector (Segment HTTP API) and
identity, as the integration tests of identity and of the services behind it start them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from cdp_collector.__main__ import setup as collector_setup
from cdp_collector.settings import CollectorSettings
from cdp_identity.__main__ import setup as identity_setup
from cdp_identity.settings import IdentitySettings
from cdp_kit.service import ServiceRuntime, serving

WRITE_KEY = "wk_integration_00001"
PARTITIONS = 4


@dataclass
class Edge:
    http: str
    nats_url: str
    identity: ServiceRuntime
    # Settings every in-process service of the test shares (NATS, loopback, no auth, partitions).
    common: dict[str, Any]

    async def send(self, *events: dict) -> dict:
        """POST events to /v1/batch as a Segment SDK does; returns the collector's answer."""
        async with aiohttp.ClientSession() as session:
            body = {"batch": list(events), "writeKey": WRITE_KEY}
            async with session.post(f"{self.http}/v1/batch", json=body) as response:
                assert response.status == 200, await response.text()
                return await response.json()


@pytest.fixture
async def edge(nats_server, tmp_path):
    sources = tmp_path / "sources.json"
    sources.write_text(json.dumps({"sources": [{"id": "web", "write_key": WRITE_KEY}]}))
    common = dict(
        nats_url=nats_server.url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        auth_mode="none",
        partitions=PARTITIONS,
        shutdown_grace=1.0,
    )
    collector = CollectorSettings(**common, sources_file=sources, http_host="127.0.0.1", http_port=0)
    identity = IdentitySettings(**common, store_url=f"sqlite:///{tmp_path / 'identity.db'}", batch_size=100)
    async with serving(collector, collector_setup) as c, serving(identity, identity_setup) as i:
        yield Edge(http=f"http://127.0.0.1:{c.ports['http']}", nats_url=nats_server.url, identity=i, common=common)
