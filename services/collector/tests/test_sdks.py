"""The official Segment and RudderStack Python SDKs, unchanged, pointed at the collector with `host=`."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from google.protobuf.json_format import MessageToDict

from cdp.events.v1 import events_pb2
from cdp_testing.waiting import until


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


# --- errors, as each SDK reads them ---------------------------------------------------------------------
#
# The SDKs' consumers (what a `Client` runs in its thread) drive the real collector, unchanged; only
# their HTTP session is wrapped to count the POSTs. A 4xx other than 429 must reach the application
# once, with the collector's code and message; 429 and 503 must be retried until the events are stored.


class CountingSession:
    def __init__(self, real) -> None:
        self.real = real
        self.posts = 0

    def post(self, url, **kwargs):
        self.posts += 1
        return self.real.post(url, **kwargs)


def sdk_consumer(sdk: str, monkeypatch, collector, *, write_key=None, retries=2):
    """(consumer, its queue, its POST counter, the SDK's APIError)."""
    from queue import Queue

    if sdk == "segment":
        from segment.analytics import consumer as module
        from segment.analytics import request
    else:
        from rudderstack.analytics import consumer as module
        from rudderstack.analytics import request
    session = CountingSession(request._session)
    monkeypatch.setattr(request, "_session", session)
    queue: Queue = Queue()
    consumer = module.Consumer(queue, write_key or collector.write_key, host=collector.http_url, retries=retries)
    return consumer, queue, session, request.APIError


def item(n: int, **fields) -> dict:
    return {
        "type": "track",
        "event": "Order Completed",
        "userId": f"user-{n}",
        "messageId": f"sdk-{n}",
        "timestamp": datetime.now(UTC).isoformat(),
        "properties": {"n": n},
        **fields,
    }


REFUSALS = {
    "whole-body-400": (lambda: [item(n) for n in range(2501)], None, 400, "too_many_events", "2500 events"),
    "per-event-400": (lambda: [item(0), item(1, userId="user\x00")], None, 400, "invalid_events", "batch[1].userId"),
    "bad-write-key-401": (lambda: [item(0)], "wk_nobody_000000", 401, "unauthorized", "write key"),
    "too-large-413": (
        lambda: [item(n, properties={"pad": "x" * 20_000}) for n in range(30)],
        None,
        413,
        "request_too_large",
        "500 KB",
    ),
}


@pytest.mark.parametrize("sdk", ["segment", "rudderstack"])
@pytest.mark.parametrize("case", REFUSALS)
async def test_sdks_read_a_refusal_and_do_not_retry_it(collector, monkeypatch, sdk, case):
    make_batch, write_key, status, code, words = REFUSALS[case]
    consumer, _, session, api_error = sdk_consumer(sdk, monkeypatch, collector, write_key=write_key)
    with pytest.raises(api_error) as raised:
        await asyncio.to_thread(consumer.request, make_batch())
    error = raised.value
    assert (error.status, error.code) == (status, code)
    assert words in error.message
    assert session.posts == 1  # given up at once: a retry cannot fix it
    if case == "per-event-400":
        ((_, stored),) = await collector.stored(expected=1)  # the valid event of the batch was stored
        assert stored.message_id == "sdk-0"


async def saturate(collector):
    publisher = collector.runtime.parts["bus"].publisher
    publisher.queue_wait = 0.1
    publisher._budget.used = publisher._budget.capacity

    def release():
        publisher._budget.used = 0

    return release


async def stop_bus(nats_server):
    nats_server.stop()
    return nats_server.start


@pytest.mark.parametrize("sdk", ["segment", "rudderstack"])
@pytest.mark.parametrize(
    ("status", "code", "make_trouble"),
    [
        (429, "rate_limited", lambda collector, nats_server: saturate(collector)),
        (503, "unavailable", lambda collector, nats_server: stop_bus(nats_server)),
    ],
    ids=["429", "503"],
)
async def test_sdks_read_try_again_later_and_retry_until_stored(
    collector, nats_server, monkeypatch, sdk, status, code, make_trouble
):
    recover = await make_trouble(collector, nats_server)
    # What the SDK makes of the answer: the collector's code, and a status it treats as temporary.
    consumer, queue, session, api_error = sdk_consumer(sdk, monkeypatch, collector, retries=0)
    with pytest.raises(api_error) as raised:
        await asyncio.to_thread(consumer.request, [item(0)])
    assert (raised.value.status, raised.value.code) == (status, code)
    # And it keeps the batch and sends it again once the collector can store it.
    consumer, queue, session, _ = sdk_consumer(sdk, monkeypatch, collector, retries=6)
    for n in range(3):
        queue.put(item(n))

    def deliver() -> bool:
        # Segment hands a rate-limited batch back to its queue for the next upload; RudderStack retries inside.
        return any(consumer.upload() for _ in range(6))

    delivering = asyncio.create_task(asyncio.to_thread(deliver))
    # The SDKs gather a batch for upload_interval (0.5 s) before they post, so 1 s after the start left the
    # thread half a second to be scheduled and post on a loaded machine: wait for the first post (a guard),
    # then the SDK is still at it a while later.
    await until(lambda: session.posts >= 1 or delivering.done(), "the SDK's first post")
    await asyncio.sleep(0.5)
    assert session.posts >= 1 and not delivering.done()
    recover()
    assert await asyncio.wait_for(delivering, 30)
    assert session.posts >= 2
    stored = await collector.stored(expected=3)
    assert sorted(e.message_id for _, e in stored) == ["sdk-0", "sdk-1", "sdk-2"]
