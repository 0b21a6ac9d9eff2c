"""Fault tests: restart the NATS server and kill the collector under load, then count every event.

Clients behave as the collector tells them to: on UNAVAILABLE / RESOURCE_EXHAUSTED they retry the same
batch. Afterwards the stream must hold every event exactly once — acknowledged ones were never lost,
retried ones were never stored twice.
"""

from __future__ import annotations

import asyncio

import grpc
import nats
import pytest

from cdp.collector.v1 import collector_pb2, collector_pb2_grpc
from cdp.events.v1 import events_pb2
from cdp_kit.bus.rawevents import events_of
from cdp_testing.processes import CollectorProcess
from cdp_testing.streams import stream_messages

WRITE_KEY = "wk_fault_0123456789"
BATCHES = 200  # per sender: enough load to still be running when the faults hit
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}


def batch(sender: int, number: int, size: int = 100) -> list[events_pb2.Event]:
    events = []
    for i in range(size):
        event = events_pb2.Event(
            message_id=f"s{sender}-b{number}-e{i}",
            type=events_pb2.EVENT_TYPE_TRACK,
            user_id=f"user-{(sender * 7 + i) % 50}",
            event="Fault Test",
        )
        event.properties.update({"sender": sender, "batch": number, "i": i})
        events.append(event)
    return events


async def send_until_stored(address: str, events, attempts: list[int]) -> None:
    request = collector_pb2.CollectRequest(write_key=WRITE_KEY, events=events)
    while True:
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                reply = await collector_pb2_grpc.CollectorServiceStub(channel).Collect(request, timeout=10)
            assert reply.rejected == 0
            assert reply.accepted + reply.duplicates == len(events)
            return
        except grpc.aio.AioRpcError as exc:
            assert exc.code() in RETRYABLE, exc
            attempts.append(1)
            await asyncio.sleep(0.2)


async def load(address: str, senders: int, batches: int, attempts: list[int]) -> None:
    async def sender(s: int) -> None:
        for b in range(batches):
            await send_until_stored(address, batch(s, b), attempts)

    await asyncio.gather(*(sender(s) for s in range(senders)))


async def stream_ids(url: str) -> list[str]:
    nc = await nats.connect(url)
    try:
        return [
            events_pb2.Event.FromString(event).message_id
            for m in await stream_messages(nc.jetstream(), "EVENTS_RAW")
            for event in events_of(m.data, m.headers)
        ]
    finally:
        await nc.close()


SENDERS = 4


async def under_load(nats_server, tmp_path, faults) -> list[int]:
    """Run the collector under load, inject `faults(collector)` while it runs, then check the stream
    holds every event exactly once. Returns the retried attempts the faults caused."""
    collector = CollectorProcess(nats_server.url, tmp_path, write_key=WRITE_KEY, source_id="fault", partitions=4)
    collector.start()
    attempts: list[int] = []
    try:
        sending = asyncio.create_task(load(collector.grpc_address, senders=SENDERS, batches=BATCHES, attempts=attempts))
        await faults(collector, sending)
        await asyncio.wait_for(sending, 150)
    finally:
        collector.stop()
    ids = await stream_ids(nats_server.url)
    assert len(ids) == len(set(ids)), "an event was stored twice"
    assert set(ids) == {e.message_id for s in range(SENDERS) for b in range(BATCHES) for e in batch(s, b)}
    return attempts


@pytest.mark.timeout(180)
async def test_nats_restart_under_load_loses_and_doubles_nothing(nats_server, tmp_path):
    async def faults(_collector, sending):
        await asyncio.sleep(1.0)
        assert not sending.done()
        nats_server.restart()  # graceful stop and start, mid-stream
        await asyncio.sleep(1.0)
        nats_server.kill()  # and a crash
        nats_server.start()

    attempts = await under_load(nats_server, tmp_path, faults)
    assert attempts, "the faults should have made some requests fail and be retried"


@pytest.mark.timeout(180)
async def test_killing_the_collector_under_load_loses_and_doubles_nothing(nats_server, tmp_path):
    async def faults(collector, sending):
        for _ in range(2):
            await asyncio.sleep(0.8)
            assert not sending.done()
            collector.kill()  # SIGKILL: requests in flight die with it
            collector.start()

    attempts = await under_load(nats_server, tmp_path, faults)
    assert attempts
