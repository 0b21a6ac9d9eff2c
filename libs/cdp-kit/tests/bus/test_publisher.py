"""Publishing to a real JetStream: ids, dedup, errors, bounds."""

import asyncio

import pytest

from cdp_kit.bus import Bus, OutMessage, events_raw_stream
from cdp_kit.bus.publisher import Publisher
from cdp_kit.errors import ResourceExhausted, Unavailable
from cdp_kit.telemetry import setup_telemetry


def batch(n, start=0, subject="events.raw.0"):
    return [OutMessage(subject, f"event-{i}".encode(), f"src:{i}") for i in range(start, start + n)]


@pytest.fixture
async def bus(nats_server):
    async with Bus.connect(nats_server.url, name="test", connect_timeout=5) as bus:
        await bus.ensure_streams(events_raw_stream())
        yield bus


async def test_every_message_is_stored_once_with_its_own_id(bus):
    results = await bus.publisher.publish_batch(batch(500))
    assert [r.seq for r in results] == list(range(1, 501))
    assert all(r.ok and not r.duplicate and r.stream == "EVENTS_RAW" for r in results)
    stored = await bus.js.get_msg("EVENTS_RAW", 42)
    assert stored.data == b"event-41" and stored.headers["Nats-Msg-Id"] == "src:41"


async def test_a_retried_batch_is_deduplicated_by_jetstream(bus):
    first = await bus.publisher.publish_batch(batch(100))
    again = await bus.publisher.publish_batch(batch(150))  # a retry that also carries 50 new events
    assert all(r.duplicate for r in again[:100])
    assert [r.seq for r in again[:100]] == [r.seq for r in first]
    assert all(r.ok and not r.duplicate for r in again[100:])
    info = await bus.js.stream_info("EVENTS_RAW")
    assert info.state.messages == 150


async def test_a_subject_no_stream_accepts_fails_per_message_not_silently(bus):
    results = await bus.publisher.publish_batch(
        [OutMessage("events.raw.1", b"ok", "a"), OutMessage("nowhere.1", b"lost?", "b")]
    )
    assert results[0].ok
    assert not results[1].ok and "no responders" in results[1].error


async def test_disconnected_bus_answers_unavailable_at_once(nats_server):
    async with Bus.connect(nats_server.url, name="test", connect_timeout=5) as bus:
        await bus.ensure_streams(events_raw_stream())
        nats_server.stop()
        for _ in range(100):
            if not bus.connected:
                break
            await asyncio.sleep(0.05)
        with pytest.raises(Unavailable) as info:
            await bus.publisher.publish_batch(batch(3))
        assert info.value.retry_after > 0
        nats_server.start()
        for _ in range(200):
            if bus.connected:
                break
            await asyncio.sleep(0.05)
        results = await bus.publisher.publish_batch(batch(3))
        assert all(r.ok for r in results)


async def test_in_flight_messages_are_bounded(nats_server, nats_client):
    js = nats_client.jetstream()
    await js.add_stream(name="SLOW", subjects=["slow.>"])
    publisher = Publisher(nats_client, setup_telemetry("test"), max_in_flight=10, queue_wait=0.2, ack_timeout=2)
    await publisher.start()
    # Hold the budget: messages to a subject without responders still wait for their (error) replies,
    # so fill it from a batch that is itself waiting.
    publisher._budget.used = 10
    with pytest.raises(ResourceExhausted) as info:
        await publisher.publish_batch([OutMessage("slow.a", b"x", "1")])
    assert "publish queue full" in info.value.message
    await publisher._budget.give(10)
    results = await publisher.publish_batch([OutMessage("slow.a", b"x", "1")])
    assert results[0].ok
    await publisher.close()


async def test_trace_context_travels_in_headers(bus):
    from opentelemetry import trace

    tracer = bus.telemetry.tracer
    with tracer.start_as_current_span("collect") as span:
        await bus.publisher.publish_batch(batch(1))
        trace_id = format(span.get_span_context().trace_id, "032x")
    stored = await bus.js.get_msg("EVENTS_RAW", 1)
    assert trace_id in stored.headers["traceparent"]
    assert trace.get_current_span().get_span_context().is_valid is False


async def test_a_client_chosen_id_cannot_inject_headers_or_protocol_lines(bus):
    evil = "abc\r\nNats-Expected-Stream: OTHER\r\n\r\nPUB x 1\r\n"
    (result,) = await bus.publisher.publish_batch([OutMessage("events.raw.0", b"payload", evil)])
    assert result.ok
    stored = await bus.js.get_msg("EVENTS_RAW", result.seq)
    assert stored.data == b"payload"
    assert "\r" not in stored.headers["Nats-Msg-Id"] and "\n" not in stored.headers["Nats-Msg-Id"]
    assert "Nats-Expected-Stream" not in stored.headers


async def test_per_message_headers_are_kept(bus):
    (result,) = await bus.publisher.publish_batch(
        [OutMessage("events.raw.0", b"x", "id-1", headers={"Cdp-Type": "cdp.events.v1.Event"})]
    )
    stored = await bus.js.get_msg("EVENTS_RAW", result.seq)
    assert stored.headers["Cdp-Type"] == "cdp.events.v1.Event" and stored.headers["Nats-Msg-Id"] == "id-1"


async def test_a_message_over_max_payload_is_never_reported_stored(bus):
    too_big = b"x" * (bus.nc.max_payload + 1)
    results = await bus.publisher.publish_batch(
        [OutMessage("events.raw.0", b"small", "ok"), OutMessage("events.raw.0", too_big, "big")]
    )
    assert results[0].ok and not results[1].ok
