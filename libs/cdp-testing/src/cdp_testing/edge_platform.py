"""The real collector, identity and profile in this process on a real nats-server: what the edge accepts
and what a profile ends up holding, for tests that follow an SDK call from HTTP to the profile.

    async with edge_platform(nats_server.url, tmp_path, sources) as platform:
        await platform.send(WRITE_KEY, "identify", {"userId": "ada", "traits": {...}})
        ada = await platform.profile_of("user_id", "ada", events=1)
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_testing.waiting import eventually

_eventually = functools.partial(eventually, timeout=30.0, every=0.1)


class EdgePlatform:
    def __init__(self, collector_url: str, profiles: profile_pb2_grpc.ProfileServiceStub, nats_url: str) -> None:
        self.collector_url = collector_url
        self.profiles = profiles
        self.nats_url = nats_url

    async def send(self, write_key: str, kind: str, body: dict[str, Any]) -> None:
        """One Segment HTTP call (`/v1/<kind>`) with the write key as Basic user; it must be stored (200)."""
        auth = {"Authorization": "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()}
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{self.collector_url}/v1/{kind}", json=body, headers=auth) as r,
        ):
            assert r.status == 200, await r.text()

    async def lookup(self, kind: str, value: str) -> profile_pb2.Profile | None:
        try:
            return await self.profiles.LookupProfile(
                profile_pb2.LookupProfileRequest(identifier_type=kind, identifier_value=value)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    async def profile_of(self, kind: str, value: str, events: int) -> profile_pb2.Profile:
        """The profile identity resolves the identifier to, once it has applied `events` events."""

        async def read():
            found = await self.lookup(kind, value)
            return found if found is not None and found.event_count >= events else None

        return await _eventually(read)


@contextlib.asynccontextmanager
async def edge_platform(nats_url: str, tmp_path: Path, sources: list[dict[str, Any]]) -> AsyncIterator[EdgePlatform]:
    """Collector (with these sources), identity and profile, 2 partitions, no auth, stores under tmp_path."""
    from cdp_collector.__main__ import setup as collector_setup
    from cdp_collector.settings import CollectorSettings
    from cdp_identity.__main__ import setup as identity_setup
    from cdp_identity.settings import IdentitySettings
    from cdp_kit.service import serving
    from cdp_profile.__main__ import setup as profile_setup
    from cdp_profile.settings import ProfileSettings

    sources_file = tmp_path / "sources.json"
    sources_file.write_text(json.dumps({"sources": sources}))
    common = dict(
        nats_url=nats_url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="none", partitions=2, shutdown_grace=1.0
    )
    collector = CollectorSettings(**common, sources_file=sources_file, http_host="127.0.0.1", http_port=0)
    identity = IdentitySettings(**common, store_url=f"sqlite:///{tmp_path / 'identity.db'}", batch_size=100)
    async with serving(collector, collector_setup) as c, serving(identity, identity_setup) as i:
        profile = ProfileSettings(
            **common, store_url=f"sqlite:///{tmp_path / 'profile.db'}", identity_address=f"127.0.0.1:{i.grpc.port}"
        )
        async with serving(profile, profile_setup) as p, grpc.aio.insecure_channel(f"127.0.0.1:{p.grpc.port}") as ch:
            yield EdgePlatform(f"http://127.0.0.1:{c.ports['http']}", profile_pb2_grpc.ProfileServiceStub(ch), nats_url)
