"""A page's or screen's top-level `category` (Segment's Python and Ruby SDKs send it: `page(user_id, category,
name, properties)`) reaches the person's timeline, as Segment's facade gives it to destinations: among the
page's properties. The Segment-migration trial found it on the bus event and nowhere in `ListEvents`."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.protobuf import json_format

from cdp.events.v1 import events_pb2
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_kit.bus import Bus, events_resolved_stream, identity_stream, partition_for, subjects
from cdp_kit.service import serving
from cdp_profile.__main__ import setup
from cdp_profile.settings import ProfileSettings

PARTITIONS = 2
PERSON = "p_grace"


def resolved(n: int, kind: int, name: str, category: str, properties: dict | None = None) -> events_pb2.ResolvedEvent:
    event = events_pb2.Event(
        message_id=f"m{n}", source_id="web", type=kind, user_id="u-1", name=name, category=category
    )
    event.timestamp.FromSeconds(int(time.time()) - 100 + n)
    if properties:
        event.properties.update(properties)
    return events_pb2.ResolvedEvent(event=event, person_id=PERSON, identifiers=["user_id:u-1"])


@pytest.fixture
async def profile(nats_server):
    settings = ProfileSettings(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="none",
        partitions=PARTITIONS, store_url="memory://", shutdown_grace=1.0,
    )  # fmt: skip
    async with Bus.connect(nats_server.url, name="page-category-test") as bus:
        await bus.ensure_streams(events_resolved_stream(), identity_stream())
        async with serving(settings, setup) as runtime:
            batch = events_pb2.ResolvedEventBatch(
                events=[
                    resolved(1, events_pb2.EVENT_TYPE_PAGE, "Pricing", "Docs", {"path": "/pricing"}),
                    resolved(2, events_pb2.EVENT_TYPE_SCREEN, "Cart", "Checkout"),
                    resolved(3, events_pb2.EVENT_TYPE_PAGE, "Home", ""),  # none sent: none added
                    resolved(4, events_pb2.EVENT_TYPE_PAGE, "Blog", "Content", {"category": "old"}),
                ]
            )
            subject = subjects.events_resolved(partition_for(PERSON, PARTITIONS))
            await bus.js.publish(subject, batch.SerializeToString())
            engine = runtime.parts["engine"]
            deadline = time.monotonic() + 15
            while PERSON not in engine.profiles or len(engine.profiles[PERSON].export()["timeline"]) < 4:
                assert time.monotonic() < deadline, "timed out waiting for the profile"
                await asyncio.sleep(0.02)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
                yield profile_pb2_grpc.ProfileServiceStub(channel)


async def test_the_timeline_keeps_a_pages_and_a_screens_category(profile):
    listed = await profile.ListEvents(profile_pb2.ListEventsRequest(person_id=PERSON))
    entries = [(e.type, e.name, json_format.MessageToDict(e.properties)) for e in reversed(listed.events)]
    assert entries == [
        ("page", "Pricing", {"path": "/pricing", "category": "Docs"}),
        ("screen", "Cart", {"category": "Checkout"}),
        ("page", "Home", {}),
        ("page", "Blog", {"category": "Content"}),  # the call's own category wins, as in Segment's facade
    ]
    exported = json_format.MessageToDict((await profile.Export(profile_pb2.ExportRequest(person_id=PERSON))).document)
    assert [entry["properties"].get("category") for entry in exported["timeline"]] == [
        "Docs",
        "Checkout",
        None,
        "Content",
    ]
