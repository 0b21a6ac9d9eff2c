"""A request's events on `events.raw`: one message per partition it touches (`cdp_kit.bus.rawevents`),
and what a retry finds - against a real nats-server."""

from __future__ import annotations

import grpc
from opentelemetry import metrics, trace

from cdp.collector.v1 import collector_pb2, collector_pb2_grpc
from cdp.events.v1 import events_pb2
from cdp_collector.ingest import Ingestor
from cdp_kit.bus import Bus, events_raw_stream, partition_for, rawevents
from cdp_kit.telemetry import Telemetry

TELEMETRY = Telemetry("test", trace.get_tracer("test"), metrics.get_meter("test"))
PARTITIONS = 4  # the collector fixture's


def track(message_id: str, user_id: str, size: int = 0) -> events_pb2.Event:
    event = events_pb2.Event(
        message_id=message_id, type=events_pb2.EVENT_TYPE_TRACK, user_id=user_id, event="Order Completed"
    )
    event.properties.update({"total": 42.5, "note": "x" * size})
    return event


async def collect(collector, events):
    async with grpc.aio.insecure_channel(collector.grpc_address) as channel:
        request = collector_pb2.CollectRequest(write_key=collector.write_key, events=events)
        return await collector_pb2_grpc.CollectorServiceStub(channel).Collect(request)


async def messages(nats_url: str) -> list:
    async with Bus.connect(nats_url, name="reader") as bus:
        info = await bus.js.stream_info("EVENTS_RAW")
        return [await bus.js.get_msg("EVENTS_RAW", seq) for seq in range(info.state.first_seq, info.state.last_seq + 1)]


def users_on_distinct_partitions(n: int) -> list[str]:
    users: dict[int, str] = {}
    i = 0
    while len(users) < n:
        users.setdefault(partition_for(f"user-{i}", PARTITIONS), f"user-{i}")
        i += 1
    return list(users.values())


async def test_a_partition_with_several_events_of_a_request_gets_one_message_and_one_with_one_gets_it_alone(
    collector,
):
    busy, quiet = users_on_distinct_partitions(2)
    events = [track(f"m{i}", busy) for i in range(5)] + [track("alone", quiet)]
    reply = await collect(collector, events)
    assert reply.accepted == 6
    stored = {m.subject: m for m in await messages(collector.nats_url)}
    assert len(stored) == 2, "one message per partition the request touched"
    several = stored[f"events.raw.{partition_for(busy, PARTITIONS)}"]
    assert several.headers[rawevents.EVENTS_HEADER] == "5"
    assert several.headers["Nats-Msg-Id"] == rawevents.batch_id([f"web:m{i}" for i in range(5)])
    assert [events_pb2.Event.FromString(e).message_id for e in rawevents.split(several.data)] == [
        f"m{i}" for i in range(5)
    ]
    one = stored[f"events.raw.{partition_for(quiet, PARTITIONS)}"]
    assert rawevents.EVENTS_HEADER not in (one.headers or {}), "one event: the single form, as before batches"
    assert one.headers["Nats-Msg-Id"] == "web:alone" and events_pb2.Event.FromString(one.data).message_id == "alone"
    # Each event's answer is the position of the message that holds it.
    assert [r.sequence for r in reply.results] == [several.seq] * 5 + [one.seq]


async def test_an_id_repeated_in_a_request_is_stored_once_and_answered_as_a_duplicate(collector):
    events = [track("m1", "u1"), track("m2", "u1"), track("m1", "u1")]
    reply = await collect(collector, events)
    assert (reply.accepted, reply.duplicates) == (2, 1)
    assert [r.status for r in reply.results] == [
        collector_pb2.EVENT_STATUS_ACCEPTED,
        collector_pb2.EVENT_STATUS_ACCEPTED,
        collector_pb2.EVENT_STATUS_DUPLICATE,
    ]
    assert reply.results[2].sequence == reply.results[0].sequence
    assert [e.message_id for _, e in await collector.stored(expected=2)] == ["m1", "m2"]


async def test_a_retry_as_sent_is_stored_once_by_another_replica_too(nats_server):
    """A replica that never saw the first try (another one, or this one restarted) has no memory of its
    ids: the retry as it was sent carries the same messages, which JetStream drops as duplicates."""
    async with Bus.connect(nats_server.url, name="collector") as bus:
        await bus.ensure_streams(events_raw_stream())
        events = [track(f"m{i}", "u1") for i in range(3)] + [track("x", "u2")]
        first = await Ingestor(bus.publisher, PARTITIONS, TELEMETRY).store(events, None)
        other = await Ingestor(bus.publisher, PARTITIONS, TELEMETRY).store(events, None)
        assert not any(s.duplicate for s in first)
        assert all(s.duplicate for s in other) and [s.seq for s in other] == [s.seq for s in first]
        assert (await bus.js.stream_info("EVENTS_RAW")).state.messages == 2


async def test_a_partitions_share_larger_than_a_message_is_cut_into_messages_within_the_servers_limit(nats_server):
    async with Bus.connect(nats_server.url, name="collector") as bus:
        await bus.ensure_streams(events_raw_stream())
        ingestor = Ingestor(bus.publisher, PARTITIONS, TELEMETRY)
        events = [track(f"big-{i}", "u1", size=20_000) for i in range(40)]  # ~800 KB on one partition
        stored = await ingestor.store(events, None)
        assert not any(s.duplicate for s in stored)
        found = await messages(nats_server.url)
        assert len(found) > 1 and len({s.seq for s in stored}) == len(found)
        assert all(len(m.data) <= ingestor._batch_bytes() for m in found)
        ids = [events_pb2.Event.FromString(e).message_id for m in found for e in rawevents.events_of(m.data, m.headers)]
        assert ids == [f"big-{i}" for i in range(40)], "every event once, in the request's order"
