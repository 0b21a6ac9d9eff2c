"""`events.raw`'s two forms (`cdp_kit.bus.rawevents`), and a part of a message of several dead-lettered
alone (`Delivery.reject_part`) against a real nats-server."""

from __future__ import annotations

import asyncio

import pytest

from cdp.events.v1 import events_pb2
from cdp_kit.bus import Bus, ConsumerSpec, OutMessage, dead_letter_stream, events_raw_stream, rawevents
from cdp_kit.bus import consumer as consumer_module
from cdp_testing.streams import next_dead_letters


def event(n: int, size: int = 10) -> bytes:
    return events_pb2.Event(message_id=f"m{n}", user_id="u", event="x" * size).SerializeToString()


def test_a_batch_body_is_an_event_batch_and_splits_back_into_the_same_events():
    events = [event(1), event(2, size=300), event(3, size=20_000), b""]
    body = rawevents.join(events)
    # The same bytes protobuf writes for EventBatch: any reader of the schema reads it.
    parsed = events_pb2.EventBatch.FromString(body)
    assert [e.SerializeToString() for e in parsed.events] == events
    assert body == events_pb2.EventBatch(events=parsed.events).SerializeToString()
    assert rawevents.split(body) == events
    assert rawevents.events_of(body, {rawevents.EVENTS_HEADER: "4"}) == events


def test_the_form_is_told_by_the_header_alone():
    one = event(7)
    # A single event's own bytes begin with field 1 too (its message_id): without the header it is one event.
    assert one[0] == 0x0A
    assert rawevents.events_of(one, {}) == [one] and rawevents.events_of(one, None) == [one]
    assert rawevents.events_of(one, {"Nats-Msg-Id": "web:m7"}) == [one]


@pytest.mark.parametrize(
    "body",
    [b"\x12\x01x", b"\x0a\x05abc", b"\x0a\xff\xff\xff\xff\xff\xff", b"\x0a"],
    ids=["another field", "past the end", "length too long", "length cut short"],
)
def test_a_body_that_is_not_a_batch_is_refused_naming_where_never_what(body):
    with pytest.raises(rawevents.NotABatch) as refused:
        rawevents.split(body)
    assert "byte" in str(refused.value) and "abc" not in str(refused.value)


def test_the_batch_id_is_the_same_for_the_same_events_in_the_same_order():
    assert rawevents.batch_id(["web:a", "web:b"]) == rawevents.batch_id(["web:a", "web:b"])
    assert rawevents.batch_id(["web:a", "web:b"]) != rawevents.batch_id(["web:b", "web:a"])
    assert rawevents.batch_id(["web:a", "web:b"]) != rawevents.batch_id(["web:a"])
    # The ids joined are not confused by where one ends: "a" + "b:c" differs from "a:b" + "c".
    assert rawevents.batch_id(["a", "b:c"]) != rawevents.batch_id(["a:b", "c"])


@pytest.fixture
async def bus(nats_server):
    async with Bus.connect(nats_server.url, name="test", connect_timeout=5) as bus:
        await bus.ensure_streams(events_raw_stream(), dead_letter_stream())
        yield bus


async def dead_letters(bus, expected):
    return await next_dead_letters(bus.js, expected)


@pytest.mark.parametrize("ordered", [False, True], ids=["explicit acks", "ordered"])
async def test_a_rejected_part_is_dead_lettered_alone_and_the_message_acknowledged(bus, ordered):
    parts = [event(n) for n in range(5)]
    applied: list[bytes] = []
    handled = asyncio.Event()

    async def handle(batch):
        for d in batch:
            for index, part in enumerate(rawevents.events_of(d.data, d.headers)):
                if index in (1, 3):
                    d.reject_part(index, part, "invalid_identifier", f"email: part {index} cannot be stored")
                else:
                    applied.append(part)
        handled.set()

    spec = ConsumerSpec(
        "EVENTS_RAW", "t", ("events.raw.>",), backoff=(0.05,), fetch_timeout=0.2, ordered=ordered, concurrency=1
    )
    runner = bus.consumer(spec, handle)
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(runner.wait_ready(), 5)
    await bus.publisher.publish_batch(
        [OutMessage("events.raw.0", rawevents.join(parts), "eb_1", {rawevents.EVENTS_HEADER: "5"})]
    )
    letters = await dead_letters(bus, 2)
    await asyncio.wait_for(handled.wait(), 5)
    for _ in range(250):
        info = await bus.js.consumer_info("EVENTS_RAW", "t")
        if info.num_ack_pending == 0 and info.ack_floor.stream_seq == 1:
            break
        await asyncio.sleep(0.02)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert applied == [parts[0], parts[2], parts[4]]
    assert info.num_ack_pending == 0 and info.ack_floor.stream_seq == 1, "the message is acknowledged"
    assert [m.data for m in letters] == [parts[1], parts[3]], "each letter is its part alone"
    for letter, index in zip(letters, (1, 3), strict=True):
        headers = letter.headers
        assert headers[consumer_module.DLQ_PART] == str(index)
        assert headers[consumer_module.DLQ_SEQ] == "1" and headers[consumer_module.DLQ_REASON] == "invalid_identifier"
        assert headers[consumer_module.DLQ_SUBJECT] == "events.raw.0"
        assert rawevents.EVENTS_HEADER not in headers, "a part's letter is one event, not marked as several"
    assert runner.dead_lettered == 2


async def test_a_part_rejected_again_on_a_redelivery_is_stored_once(bus):
    parts = [event(n) for n in range(3)]
    calls = 0

    async def handle(batch):
        nonlocal calls
        calls += 1
        for d in batch:
            d.reject_part(2, parts[2], "too_large", "event: too large")
            d.reject_part(2, parts[2], "too_large", "event: too large")  # the same part twice: one letter
            if calls == 1:
                raise RuntimeError("the store went away")  # handled again: the part rejected again

    spec = ConsumerSpec("EVENTS_RAW", "t", ("events.raw.>",), backoff=(0.05,), fetch_timeout=0.2, max_deliver=5)
    runner = bus.consumer(spec, handle)
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(runner.wait_ready(), 5)
    await bus.publisher.publish_batch(
        [OutMessage("events.raw.0", rawevents.join(parts), "eb_2", {rawevents.EVENTS_HEADER: "3"})]
    )
    (letter,) = await dead_letters(bus, 1)
    for _ in range(250):
        if calls >= 2 and (await bus.js.consumer_info("EVENTS_RAW", "t")).num_ack_pending == 0:
            break
        await asyncio.sleep(0.02)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert calls >= 2 and letter.data == parts[2]
    assert (await bus.js.stream_info("DLQ")).state.messages == 1
