"""gRPC Collect against a real nats-server: stored means acknowledged by JetStream."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from cdp.collector.v1 import collector_pb2, collector_pb2_grpc
from cdp.events.v1 import events_pb2
from cdp_collector.domain import MAX_DEPTH
from cdp_kit.bus import partition_for


def track(message_id: str, user_id: str = "u1", **fields) -> events_pb2.Event:
    event = events_pb2.Event(
        message_id=message_id, type=events_pb2.EVENT_TYPE_TRACK, user_id=user_id, event="Order Completed", **fields
    )
    event.properties.update({"total": 42.5, "currency": "EUR"})
    return event


async def collect(collector, events, write_key=None, sent_at=None):
    async with grpc.aio.insecure_channel(collector.grpc_address) as channel:
        request = collector_pb2.CollectRequest(write_key=write_key or collector.write_key, events=events)
        if sent_at is not None:
            request.sent_at.FromDatetime(sent_at)
        return await collector_pb2_grpc.CollectorServiceStub(channel).Collect(request)


async def test_accepted_events_are_in_jetstream_on_the_users_partition(collector):
    events = [track(f"m{i}", user_id=f"user-{i % 7}") for i in range(50)]
    reply = await collect(collector, events)
    assert reply.accepted == 50 and reply.rejected == 0
    assert [r.status for r in reply.results] == [collector_pb2.EVENT_STATUS_ACCEPTED] * 50
    stored = await collector.stored_at(expected=50)
    # One message per partition the request touches (cdp_kit.bus.rawevents); each event's answer is the
    # position of the message that holds it, and a partition's events keep the request's order.
    assert {r.sequence for r in reply.results} == {seq for seq, _, _ in stored}
    position = {event.message_id: seq for seq, _, event in stored}
    assert [r.sequence for r in reply.results] == [position[e.message_id] for e in events]
    by_subject: dict[str, list[str]] = {}
    for _, subject, event in stored:
        by_subject.setdefault(subject, []).append(event.message_id)
    sent_by_subject: dict[str, list[str]] = {}
    for sent in events:
        sent_by_subject.setdefault(f"events.raw.{partition_for(sent.user_id, 4)}", []).append(sent.message_id)
    assert by_subject == sent_by_subject
    sent_ids = {e.message_id for e in events}
    for _, _, event in stored:
        assert event.message_id in sent_ids and event.source_id == "web"
        assert event.received_at.seconds > 0 and event.timestamp.seconds > 0
        assert dict(event.properties) == {"total": 42.5, "currency": "EUR"}


async def test_anonymous_events_partition_by_anonymous_id(collector):
    event = events_pb2.Event(message_id="a1", type=events_pb2.EVENT_TYPE_PAGE, anonymous_id="anon-9", name="Home")
    await collect(collector, [event])
    ((subject, _),) = await collector.stored(expected=1)
    assert subject == f"events.raw.{partition_for('anon-9', 4)}"


async def test_a_retried_batch_is_reported_duplicate_and_stored_once(collector):
    first = await collect(collector, [track("m1"), track("m2")])
    again = await collect(collector, [track("m1"), track("m2"), track("m3")])
    assert first.accepted == 2
    assert [r.status for r in again.results] == [
        collector_pb2.EVENT_STATUS_DUPLICATE,
        collector_pb2.EVENT_STATUS_DUPLICATE,
        collector_pb2.EVENT_STATUS_ACCEPTED,
    ]
    assert again.duplicates == 2 and again.accepted == 1
    await collector.stored(expected=3)


async def test_invalid_events_are_rejected_by_field_and_the_rest_stored(collector):
    no_name = events_pb2.Event(message_id="bad1", type=events_pb2.EVENT_TYPE_TRACK, user_id="u1")
    no_person = events_pb2.Event(message_id="bad2", type=events_pb2.EVENT_TYPE_IDENTIFY)
    huge = track("bad3")
    huge.properties.update({"blob": "x" * 40_000})
    reply = await collect(collector, [track("ok1"), no_name, no_person, huge, track("ok2")])
    assert (reply.accepted, reply.rejected) == (2, 3)
    by_index = {r.index: r for r in reply.results}
    assert by_index[1].status == collector_pb2.EVENT_STATUS_REJECTED and by_index[1].error.field == "events[1].event"
    assert by_index[2].error.field.startswith("events[2].") and "user_id" in by_index[2].error.message
    assert by_index[3].error.code == "event_too_large" and "32768" in by_index[3].error.message
    stored = await collector.stored(expected=2)
    assert [e.message_id for _, e in stored] == ["ok1", "ok2"]


async def test_what_no_downstream_service_can_hold_is_rejected_alone(collector):
    nul_id = track("bad1", user_id="u\x00")
    nul_key = track("bad2")
    nul_key.traits.update({"e\x00mail": "a@b.co"})
    too_deep = track("bad3")
    deep: object = 1
    for _ in range(MAX_DEPTH - 1):
        deep = {"a": deep}
    too_deep.properties.update({"a": deep})
    reply = await collect(collector, [track("ok1"), nul_id, nul_key, too_deep, track("ok2")])
    assert (reply.accepted, reply.rejected) == (2, 3)
    errors = {r.index: (r.status, r.error.code, r.error.field) for r in reply.results if r.index in (1, 2, 3)}
    rejected = collector_pb2.EVENT_STATUS_REJECTED
    assert errors == {
        1: (rejected, "invalid_character", "events[1].user_id"),
        2: (rejected, "invalid_character", "events[2].traits.e\\u0000mail"),
        3: (rejected, "nesting_too_deep", "events[3].properties" + ".a" * (MAX_DEPTH - 1)),
    }
    assert f"deeper than {MAX_DEPTH} levels" in reply.results[3].error.message
    stored = await collector.stored(expected=2)
    assert [e.message_id for _, e in stored] == ["ok1", "ok2"]


async def test_unknown_or_disabled_write_keys_are_refused(collector):
    for key, words in (("wk_nobody_000000", "unknown write key"), ("wk_disabled_0000", "disabled")):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(collector, [track("m1")], write_key=key)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and words in info.value.details()
    await collector.stored(expected=0)


async def test_too_many_events_is_refused_naming_the_limit(collector):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(collector, [track(f"m{i}") for i in range(2501)])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2500" in info.value.details()
    status = rpc_status.from_call(info.value)
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    assert fields == ["events"]


async def test_clock_skew_is_corrected_from_sent_at(collector):
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    # The device clock runs one hour fast: it stamped the event 10 s before sending, by its clock.
    event = track("skewed")
    event.original_timestamp.FromDatetime(now + timedelta(hours=1) - timedelta(seconds=10))
    await collect(collector, [event], sent_at=now + timedelta(hours=1))
    ((_, stored),) = await collector.stored(expected=1)
    corrected = stored.timestamp.ToDatetime(tzinfo=UTC)
    assert abs((corrected - (now - timedelta(seconds=10))).total_seconds()) < 2
    assert stored.original_timestamp.ToDatetime(tzinfo=UTC) > now + timedelta(minutes=59)


async def test_bus_down_means_unavailable_with_retry_hint_never_success(collector, nats_server):
    nats_server.stop()
    # Whether the collector already noticed the disconnect (fails at once) or not (the publish finds no
    # acknowledgement within CDP_COLLECTOR_ACK_TIMEOUT), the answer is UNAVAILABLE.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(collector, [track("m1")])
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    retry = [d for d in rpc_status.from_call(info.value).details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert retry, "UNAVAILABLE must carry RetryInfo"
    nats_server.start()
    for _ in range(100):
        try:
            reply = await collect(collector, [track("m1")])
            break
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.1)
    assert reply.accepted + reply.duplicates == 1
    await collector.stored(expected=1)


async def test_the_callers_trace_continues_into_the_stored_message(collector):
    import nats

    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with grpc.aio.insecure_channel(collector.grpc_address) as channel:
        request = collector_pb2.CollectRequest(write_key=collector.write_key, events=[track("traced")])
        await collector_pb2_grpc.CollectorServiceStub(channel).Collect(
            request, metadata=[("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01")]
        )
    nc = await nats.connect(collector.nats_url)
    stored = await nc.jetstream().get_msg("EVENTS_RAW", 1)
    await nc.close()
    assert stored.headers["traceparent"].split("-")[1] == trace_id


async def test_a_request_longer_than_the_limit_can_be_is_refused_before_it_is_read(collector):
    """Collect takes a write key, which is public (it ships in web pages): the gRPC port is the internet's.
    It accepts messages as long as a request within the 500 KB limit can be, not the 16 MB of the other
    services' ports, so one call cannot make it hold 30 times the limit: the transport refuses the rest
    from the length the client announces."""
    padded = track("m1")
    padded.properties["pad"] = "y" * 30_300
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(collector, [padded] * 70)  # about 2 MB
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Within that length, over the limit: still the collector's own answer, naming it.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(collector, [padded] * 17)  # about 515 KB
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "512000 bytes (500 KB)" in info.value.details()
    await collector.stored(expected=0)
