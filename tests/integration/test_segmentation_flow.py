"""Collector → identity → profile → segmentation as real processes on a real nats-server, with bearer
tokens as in production: a segment with an event condition gets its computed trait defined on the
profile service (segmentation's own token carries profile:admin), Segment-spec track events through the
collector move that trait, and the person enters the segment on `segments.entered` with reason "event";
a segment created later over persons already known enters them with reason "created"; an estimate of
another event condition counts the person.
"""

from __future__ import annotations

import asyncio
import inspect
import secrets
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import grpc
import nats
import pytest
from nats.js.errors import NotFoundError

from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_kit.auth import new_token, write_tokens_file
from cdp_testing.processes import (
    CollectorProcess,
    IdentityProcess,
    ProfileProcess,
    SegmentationProcess,
    ServiceProcess,
)

pb = segmentation_pb2
PARTITIONS = 2
WRITE_KEY = "wk_segmentation_flow_01"
BUYERS = 'count(event = "Order Completed" and properties.total > 50, within 30d) >= 2'


async def eventually(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """Poll `check` (plain or async) until it returns something truthy; fail with `what` (and the last
    value) at the deadline."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} within {timeout:.0f}s (last seen: {last!r}); see the service logs")


class Platform:
    def __init__(self, http: str, channels: dict[str, grpc.aio.Channel], token: str, js) -> None:
        self.http = http
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.identity = identity_pb2_grpc.IdentityServiceStub(channels["identity"])
        self.profile = profile_pb2_grpc.ProfileServiceStub(channels["profile"])
        self.segmentation = segmentation_pb2_grpc.SegmentationServiceStub(channels["segmentation"])
        self.js = js

    async def send(self, *events: dict) -> None:
        async with aiohttp.ClientSession() as session:
            body = {"batch": list(events), "writeKey": WRITE_KEY}
            async with session.post(f"{self.http}/v1/batch", json=body) as response:
                assert response.status == 200, await response.text()

    async def person_of(self, user_id: str) -> str:
        async def lookup() -> str | None:
            request = identity_pb2.LookupRequest(identifier=identity_pb2.Identifier(type="user_id", value=user_id))
            try:
                return (await self.identity.Lookup(request, metadata=self.metadata, timeout=5)).person_id
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
                return None

        return await eventually(lookup, f"identity never resolved user {user_id!r}")

    async def profile_when(self, person: str, ready: Callable[[profile_pb2.Profile], bool], what: str):
        async def read() -> profile_pb2.Profile | None:
            try:
                profile = await self.profile.GetProfile(
                    profile_pb2.GetProfileRequest(person_id=person), metadata=self.metadata, timeout=5
                )
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
                return None
            return profile if ready(profile) else None

        return await eventually(read, what)

    async def segmentation_caught_up(self) -> None:
        """Every segmentation consumer of profiles.changed has acknowledged all there is."""

        async def drained() -> bool:
            for p in range(PARTITIONS):
                try:
                    info = await self.js.consumer_info("PROFILES", f"segmentation-p{p}")
                except NotFoundError:
                    return False
                if info.num_pending or info.num_ack_pending:
                    return False
            return True

        await eventually(drained, "segmentation never consumed every profile change")

    async def segments_of(self, person: str) -> list[str]:
        membership = await self.segmentation.GetMembership(
            pb.GetMembershipRequest(person_id=person), metadata=self.metadata, timeout=5
        )
        return [m.segment_id for m in membership.segments]


class Watch:
    """What the test watches on NATS: segment transitions and profile changes, as they are published."""

    def __init__(self) -> None:
        self.entered: list[pb.SegmentEvent] = []
        self.changes: list[profile_pb2.ProfileChanged] = []

    async def on_entered(self, msg) -> None:
        self.entered.extend(pb.SegmentEventBatch.FromString(msg.data).events)

    async def on_change(self, msg) -> None:
        self.changes.extend(profile_pb2.ProfileChangedBatch.FromString(msg.data).changes)

    def entries(self, person: str, segment: str) -> list[pb.SegmentEvent]:
        return [e for e in self.entered if e.person_id == person and e.segment_id == segment]

    def changed(self, person: str, test: Callable[[profile_pb2.ProfileChanged], bool]) -> bool:
        return any(c.person_id == person and test(c) for c in self.changes)


@pytest.fixture
async def platform(nats_server, tmp_path):
    operator, profile_token, segmentation_token = new_token(), new_token(), new_token()
    tokens = tmp_path / "tokens.json"
    write_tokens_file(
        tokens,
        [
            ("operator", operator, ["segmentation:*", "identity:read", "profile:read"]),
            ("profile", profile_token, ["identity:read"]),
            # Segmentation reads profiles and defines the computed traits its event conditions need.
            ("segmentation", segmentation_token, ["profile:read", "profile:admin"]),
        ],
    )
    key = tmp_path / "privacy-hash.key"  # deletion notices' identifier hash key, required with tokens
    key.write_text(secrets.token_hex(32) + "\n")
    auth = {"CDP_AUTH_MODE": "tokens", "CDP_AUTH_TOKENS_FILE": str(tokens), "CDP_PRIVACY_HASH_KEY_FILE": str(key)}
    collector = CollectorProcess(nats_server.url, tmp_path, write_key=WRITE_KEY, partitions=PARTITIONS)
    identity = IdentityProcess(
        nats_server.url, tmp_path, store_url=f"sqlite:///{tmp_path / 'identity.db'}", partitions=PARTITIONS, **auth
    )
    profile = ProfileProcess(
        nats_server.url,
        tmp_path,
        store_url=f"sqlite:///{tmp_path / 'profile.db'}",
        partitions=PARTITIONS,
        CDP_IDENTITY_ADDRESS=identity.grpc_address,
        CDP_IDENTITY_TOKEN=profile_token,
        **auth,
    )
    segmentation = SegmentationProcess(
        nats_server.url,
        tmp_path,
        store_url=f"sqlite:///{tmp_path / 'segmentation.db'}",
        partitions=PARTITIONS,
        CDP_PROFILE_ADDRESS=profile.grpc_address,
        CDP_PROFILE_TOKEN=segmentation_token,
        **auth,
    )
    processes: list[ServiceProcess] = [collector, identity, profile, segmentation]
    nc = await nats.connect(nats_server.url)
    try:
        # Each only dials the others when called: they start side by side.
        started = await asyncio.gather(*(asyncio.to_thread(p.start) for p in processes), return_exceptions=True)
        failed = [e for e in started if isinstance(e, BaseException)]
        if failed:
            raise failed[0]
        channels = {p.name: grpc.aio.insecure_channel(p.grpc_address) for p in (identity, profile, segmentation)}
        try:
            yield Platform(f"http://127.0.0.1:{collector.http_port}", channels, operator, nc.jetstream())
        finally:
            for channel in channels.values():
                await channel.close()
    finally:
        await nc.close()
        for process in processes:
            process.stop()


@pytest.fixture
async def watch(nats_server):
    watched = Watch()
    nc = await nats.connect(nats_server.url)
    await nc.subscribe("segments.entered.>", cb=watched.on_entered)
    await nc.subscribe("profiles.changed.>", cb=watched.on_change)
    await nc.flush()
    try:
        yield watched
    finally:
        await nc.close()


def track(message_id: str, user: str, event: str, **properties) -> dict:
    return {"type": "track", "messageId": message_id, "userId": user, "event": event, "properties": properties}


def identify(message_id: str, user: str, **traits) -> dict:
    return {"type": "identify", "messageId": message_id, "userId": user, "traits": traits}


@pytest.mark.timeout(90)
async def test_orders_through_the_collector_enter_a_person_into_an_event_segment(platform, watch):
    seg, md = platform.segmentation, platform.metadata
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await seg.CreateSegment(pb.CreateSegmentRequest(id="buyers", definition=pb.Definition(text=BUYERS)))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    buyers = await seg.CreateSegment(
        pb.CreateSegmentRequest(id="buyers", definition=pb.Definition(text=BUYERS), wait=True), metadata=md, timeout=30
    )
    assert buyers.state == pb.SEGMENT_STATE_LIVE, buyers.error
    [trait] = buyers.computed_traits
    defined = await platform.profile.ListComputedTraits(profile_pb2.ListComputedTraitsRequest(), metadata=md)
    assert {t.definition.name: t.state for t in defined.traits} == {trait: "ready"}

    # An order of 30 does not match `properties.total > 50`; one of 80 does: one counted, not yet a buyer.
    await platform.send(
        track("o1", "ada", "Order Completed", total=30), track("o2", "ada", "Order Completed", total=80)
    )
    person = await platform.person_of("ada")
    profile = await platform.profile_when(person, lambda p: p.event_count == 2, "the profile never held both orders")
    assert profile.computed[trait].number_value == 1
    await eventually(
        lambda: watch.changed(person, lambda c: trait in c.computed),
        "the profile never published the counted order",
    )
    await platform.segmentation_caught_up()
    assert await platform.segments_of(person) == []
    assert watch.entries(person, "buyers") == []

    # The second order over 50 makes two: the person enters, caused by an event.
    await platform.send(track("o3", "ada", "Order Completed", total=80))
    [entered] = await eventually(
        lambda: watch.entries(person, "buyers"), "ada never entered buyers on segments.entered"
    )
    assert (entered.person_id, entered.segment_id, entered.entered, entered.reason) == (person, "buyers", True, "event")
    assert entered.segment_version == 1
    assert await platform.segments_of(person) == ["buyers"]

    # A segment created over persons already known enters them at once, with reason "created".
    await platform.send(identify("i1", "ada", plan="pro"))
    await eventually(
        lambda: watch.changed(person, lambda c: "plan" in c.traits and c.traits["plan"].string_value == "pro"),
        "the profile never published ada's plan",
    )
    await platform.segmentation_caught_up()
    pro = await seg.CreateSegment(
        pb.CreateSegmentRequest(id="pro", definition=pb.Definition(text='traits.plan = "pro"'), wait=True),
        metadata=md,
        timeout=30,
    )
    assert (pro.state, pro.size) == (pb.SEGMENT_STATE_LIVE, 1)
    [created] = await eventually(lambda: watch.entries(person, "pro"), "ada never entered pro on segments.entered")
    assert (created.entered, created.reason) == (True, "created")
    assert await platform.segments_of(person) == ["buyers", "pro"]

    # An estimate over another event condition: its trait is defined and backfilled from the stored events.
    estimate = await seg.Estimate(
        pb.EstimateRequest(definition=pb.Definition(text='performed("Order Completed")')), metadata=md, timeout=30
    )
    assert (estimate.size, estimate.population, list(estimate.sample)) == (1, 1, [person])
    assert len(estimate.computed_traits) == 1 and estimate.computed_traits[0] != trait
    assert len(watch.entries(person, "buyers")) == 1
