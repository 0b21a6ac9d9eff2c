"""The edge of the platform, in-process on a real nats-server: the collector (Segment HTTP API) and
identity, as the integration tests of identity and of the services behind it start them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import nats
import pytest
from nats.js.errors import NotFoundError

from cdp.collector.v1 import collector_pb2, collector_pb2_grpc
from cdp.identity.v1 import identity_pb2_grpc
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_collector.__main__ import setup as collector_setup
from cdp_collector.settings import CollectorSettings
from cdp_identity.__main__ import setup as identity_setup
from cdp_identity.settings import IdentitySettings
from cdp_kit.bus.consumer import DLQ_DETAIL, DLQ_REASON, DLQ_SUBJECT
from cdp_kit.service import ServiceRuntime, serving
from cdp_profile.__main__ import setup as profile_setup
from cdp_profile.settings import ProfileSettings

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


@contextlib.asynccontextmanager
async def running_edge(nats_url: str, tmp_path) -> AsyncIterator[tuple[Edge, ServiceRuntime]]:
    """The collector (with one source, `WRITE_KEY`) and identity; yields the edge and the collector."""
    sources = tmp_path / "sources.json"
    sources.write_text(json.dumps({"sources": [{"id": "web", "write_key": WRITE_KEY}]}))
    common = dict(
        nats_url=nats_url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        auth_mode="none",
        partitions=PARTITIONS,
        shutdown_grace=1.0,
    )
    collector = CollectorSettings(**common, sources_file=sources, http_host="127.0.0.1", http_port=0)
    identity = IdentitySettings(**common, store_url=f"sqlite:///{tmp_path / 'identity.db'}", batch_size=100)
    async with serving(collector, collector_setup) as c, serving(identity, identity_setup) as i:
        yield Edge(http=f"http://127.0.0.1:{c.ports['http']}", nats_url=nats_url, identity=i, common=common), c


@pytest.fixture
async def edge(nats_server, tmp_path):
    async with running_edge(nats_server.url, tmp_path) as (started, _collector):
        yield started


# --- the whole chain: collector → identity → profile, and what it dead-letters ------------------------


def nested(depth: int, leaf: object = "bottom") -> dict:
    """An object `depth` levels deep counting itself as level 1: nested(1) == {"leaf": ...},
    nested(2) == {"a": {"leaf": ...}}. Put it under `properties` (level 2 of an event) and the event
    nests depth + 1 levels, the event object being level 1 as the collector counts."""
    inner: dict = {"leaf": leaf}
    for _ in range(depth - 1):
        inner = {"a": inner}
    return inner


@dataclass
class DeadLetter:
    subject: str
    reason: str
    detail: str
    original_subject: str
    data: bytes

    def __str__(self) -> str:
        return f"{self.subject} [{self.reason}] {self.detail[:300]} (from {self.original_subject})"


async def dead_letters(nats_url: str) -> list[DeadLetter]:
    """Everything in the DLQ stream (every `dlq.*` subject); empty if the stream does not exist yet."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info("DLQ")
        except NotFoundError:
            return []
        out = []
        if info.state.messages:
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg("DLQ", seq)
                headers = msg.headers or {}
                out.append(
                    DeadLetter(
                        subject=msg.subject or "",
                        reason=headers.get(DLQ_REASON, ""),
                        detail=headers.get(DLQ_DETAIL, ""),
                        original_subject=headers.get(DLQ_SUBJECT, ""),
                        data=msg.data or b"",
                    )
                )
        return out
    finally:
        await nc.close()


@dataclass
class Chain:
    """The collector, identity and profile in-process on one nats-server, with gRPC stubs to each."""

    edge: Edge
    profile_runtime: ServiceRuntime
    collector: Any  # CollectorServiceStub
    identity: Any  # IdentityServiceStub
    profile: Any  # ProfileServiceStub

    @property
    def nats_url(self) -> str:
        return self.edge.nats_url

    async def post(self, *events: dict, path: str = "/v1/batch") -> tuple[int, dict]:
        """POST to the Segment HTTP API; the status and the JSON answer, whatever they are."""
        async with aiohttp.ClientSession() as session:
            body = {"batch": list(events), "writeKey": WRITE_KEY} if path == "/v1/batch" else events[0]
            auth = aiohttp.BasicAuth(WRITE_KEY, "") if path != "/v1/batch" else None
            async with session.post(f"{self.edge.http}{path}", json=body, auth=auth) as response:
                return response.status, await response.json()

    async def collect(self, *events) -> Any:
        """CollectorService.Collect with these `cdp.events.v1.Event`s."""
        return await self.collector.Collect(collector_pb2.CollectRequest(write_key=WRITE_KEY, events=list(events)))

    async def profile_of(self, kind: str, value: str) -> Any | None:
        """The profile of whoever holds the identifier now, or None (not resolved or not built yet)."""
        try:
            return await self.profile.LookupProfile(
                profile_pb2.LookupProfileRequest(identifier_type=kind, identifier_value=value)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    async def profiles_when(self, user_ids, ready, *, timeout: float) -> dict[str, Any]:
        """Poll LookupProfile(user_id) for each id until `ready(profile)` holds for all of them or the
        deadline passes; returns the ids that got there, with their profiles."""
        waiting = set(user_ids)
        found: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for user_id in sorted(waiting):
                profile = await self.profile_of("user_id", user_id)
                if profile is not None and ready(profile):
                    found[user_id] = profile
            waiting -= set(found)
            if waiting:
                await asyncio.sleep(0.2)
        return found

    async def timeline(self, person_id: str) -> list:
        response = await self.profile.ListEvents(profile_pb2.ListEventsRequest(person_id=person_id, page_size=1000))
        return list(response.events)

    async def dead_letters(self) -> list[DeadLetter]:
        return await dead_letters(self.nats_url)

    async def settled(self, *, timeout: float, streams=("EVENTS_RAW", "EVENTS_RESOLVED")) -> str | None:
        """Wait until every consumer of `streams` has been given every message and acknowledged (or
        dead-lettered) each; None then, else what was still outstanding at the deadline. A profile read
        alone can answer from memory before a batch's write failed; this is when the outcome is final."""
        nc = await nats.connect(self.nats_url)
        try:
            js = nc.jetstream()
            deadline = time.monotonic() + timeout
            while True:
                outstanding = []
                for stream in streams:
                    try:
                        consumers = await js.consumers_info(stream)
                    except NotFoundError:
                        continue
                    for info in consumers:
                        if info.num_pending or info.num_ack_pending:
                            outstanding.append(
                                f"{info.name}: {info.num_pending} undelivered, {info.num_ack_pending} unacknowledged"
                            )
                if not outstanding:
                    return None
                if time.monotonic() >= deadline:
                    return "; ".join(outstanding)
                await asyncio.sleep(0.2)
        finally:
            await nc.close()


@contextlib.asynccontextmanager
async def running_chain(nats_url: str, tmp_path) -> AsyncIterator[Chain]:
    """Start collector, identity and profile as the `edge` fixture and test_profile_flow.py do."""
    async with running_edge(nats_url, tmp_path) as (started, c):
        i, common = started.identity, started.common
        profile = ProfileSettings(
            **common,
            store_url=f"sqlite:///{tmp_path / 'profile.db'}",
            identity_address=f"127.0.0.1:{i.grpc.port}",
        )
        async with serving(profile, profile_setup) as p:
            channels = [grpc.aio.insecure_channel(f"127.0.0.1:{r.grpc.port}") for r in (c, i, p)]
            try:
                yield Chain(
                    edge=started,
                    profile_runtime=p,
                    collector=collector_pb2_grpc.CollectorServiceStub(channels[0]),
                    identity=identity_pb2_grpc.IdentityServiceStub(channels[1]),
                    profile=profile_pb2_grpc.ProfileServiceStub(channels[2]),
                )
            finally:
                for channel in channels:
                    await channel.close()


@pytest.fixture
async def chain(nats_server, tmp_path):
    async with running_chain(nats_server.url, tmp_path) as running:
        yield running
