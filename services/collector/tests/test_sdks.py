"""The official Segment and RudderStack Python SDKs, unchanged, pointed at the collector with `host=`."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from google.protobuf.json_format import MessageToDict

from cdp.events.v1 import events_pb2


def segment_client(collector, **options):
    from segment.analytics import Client

    return Client(collector.write_key, host=collector.http_url, sync_mode=False, **options)


def rudder_client(collector, **options):
    from rudderstack.analytics import Client

    return Client(collector.write_key, host=collector.http_url, sync_mode=False, **options)


def drive(client):
    """Every call type, as an app would make them."""
    client.identify("user-42", {"email": "Ada@Example.com", "plan": "pro"}, anonymous_id="anon-7")
    client.track(
        "user-42",
        "Order Completed",
        {"order_id": "o-1", "total": 99.5, "items": 2},
        context={"ip": "203.0.113.9", "locale": "de-DE"},
    )
    client.page("user-42", category="Docs", name="Pricing", properties={"path": "/pricing"})
    client.screen("user-42", name="Cart", properties={"items": 2})
    client.group("user-42", "acme", {"name": "Acme Inc", "employees": 120})
    client.alias("anon-7", "user-42")
    client.flush()
    client.shutdown()


@pytest.mark.parametrize(
    ("make_client", "library"),
    [(segment_client, "analytics-python"), (rudder_client, "analytics-python")],
    ids=["segment", "rudderstack"],
)
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
async def test_sdk_calls_arrive_complete(collector, make_client, library, compress):
    errors = []
    client = make_client(collector, gzip=compress, on_error=lambda e, batch: errors.append(e))
    await asyncio.to_thread(drive, client)
    assert errors == []
    stored = {e.type: e for _, e in await collector.stored(expected=6)}
    identify = stored[events_pb2.EVENT_TYPE_IDENTIFY]
    assert identify.user_id == "user-42" and identify.anonymous_id == "anon-7"
    assert identify.traits["email"] == "Ada@Example.com" and identify.traits["plan"] == "pro"
    order = stored[events_pb2.EVENT_TYPE_TRACK]
    assert order.event == "Order Completed" and order.properties["total"] == 99.5
    assert order.context.ip == "203.0.113.9" and order.context.locale == "de-DE"
    assert order.context.library.name == library
    page = stored[events_pb2.EVENT_TYPE_PAGE]
    assert page.name == "Pricing" and page.properties["path"] == "/pricing"
    assert stored[events_pb2.EVENT_TYPE_SCREEN].name == "Cart"
    group = stored[events_pb2.EVENT_TYPE_GROUP]
    assert group.group_id == "acme" and group.traits["employees"] == 120
    alias = stored[events_pb2.EVENT_TYPE_ALIAS]
    assert alias.previous_id == "anon-7" and alias.user_id == "user-42"
    for event in stored.values():
        assert event.source_id == "web" and event.message_id
        assert abs(event.timestamp.ToDatetime(tzinfo=UTC) - datetime.now(UTC)).total_seconds() < 60
        assert MessageToDict(event)  # round-trips through JSON for every downstream consumer


async def test_sdk_retries_through_a_bus_outage_and_nothing_is_lost(collector, nats_server):
    """While JetStream is down the collector says 503; the SDK retries; every event lands once."""
    errors = []
    client = segment_client(collector, max_retries=8, on_error=lambda e, batch: errors.append(e))
    nats_server.stop()

    def send():
        for i in range(20):
            client.track(f"user-{i}", "Outage Test", {"i": i})
        client.flush()
        client.shutdown()

    sending = asyncio.create_task(asyncio.to_thread(send))
    await asyncio.sleep(1.5)  # the first attempts fail with 503
    nats_server.start()
    await asyncio.wait_for(sending, 60)
    assert errors == []
    stored = await collector.stored(expected=20)
    assert sorted(e.properties["i"] for _, e in stored) == list(range(20))
