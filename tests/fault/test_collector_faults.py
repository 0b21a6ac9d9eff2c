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
from cdp_testing.waiting import until

WRITE_KEY = "wk_fault_0123456789"
# Batches stored between one fault and the next (and before the first), per sender on average: the load
# runs when a fault hits, and the collector stores again after it (the sum of all senders': a request in
# flight across a fault may wait out its deadline while the others go on). Once the faults are over each sender sends TAIL
# more and stops: the count at the end covers batches acknowledged before, across and after every fault,
# and a load longer than the faults would only add batches that no fault came near.
BETWEEN = 3
TAIL = 5
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


class Load:
    """`senders` clients sending batch after batch until the faults are over, then TAIL more each."""

    def __init__(self, address: str, senders: int) -> None:
        self.address = address
        self.stored = [0] * senders  # per sender: its batches 0 .. stored - 1 were acknowledged
        self.attempts: list[int] = []  # retried requests
        self.in_flight = 0  # requests sent and not answered yet
        self.over = asyncio.Event()  # set once the faults are over

    def start(self) -> asyncio.Future:
        self.sending = asyncio.gather(*(self.sender(s) for s in range(len(self.stored))))
        return self.sending

    async def sender(self, s: int) -> None:
        after = 0
        while after < TAIL:
            after += self.over.is_set()
            await self.send_until_stored(batch(s, self.stored[s]))
            self.stored[s] += 1

    async def send_until_stored(self, events) -> None:
        request = collector_pb2.CollectRequest(write_key=WRITE_KEY, events=events)
        while True:
            try:
                async with grpc.aio.insecure_channel(self.address) as channel:
                    self.in_flight += 1
                    try:
                        reply = await collector_pb2_grpc.CollectorServiceStub(channel).Collect(request, timeout=10)
                    finally:
                        self.in_flight -= 1
                assert reply.rejected == 0
                assert reply.accepted + reply.duplicates == len(events)
                return
            except grpc.aio.AioRpcError as exc:
                assert exc.code() in RETRYABLE, exc
                self.attempts.append(1)
                await asyncio.sleep(0.2)

    async def flowing(self) -> None:
        """Until BETWEEN more batches per sender have been stored from now, and then until every sender has
        a request in flight (a fault then finds requests being stored: the retries it makes are those a
        loss or a double would come from). A guard of 60 s."""
        marks = list(self.stored)

        def moved() -> bool:
            if self.sending.done():
                self.sending.result()  # a sender's failure, rather than a wait for batches that never come
                raise AssertionError("the load ended before the faults did")
            return sum(self.stored) - sum(marks) >= BETWEEN * len(marks) and self.in_flight == len(marks)

        await until(moved, f"{BETWEEN} batches per sender stored, then a request of each in flight", timeout=60)

    def sent(self) -> set[str]:
        return {e.message_id for s, count in enumerate(self.stored) for b in range(count) for e in batch(s, b)}


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
    """Run the collector under load, inject `faults(collector, load, sending)` while it runs, then check
    the stream holds every event exactly once. Returns the retried attempts the faults caused."""
    collector = CollectorProcess(nats_server.url, tmp_path, write_key=WRITE_KEY, source_id="fault", partitions=4)
    collector.start()
    load = Load(collector.grpc_address, SENDERS)
    try:
        sending = load.start()
        await faults(collector, load, sending)
        load.over.set()
        await asyncio.wait_for(sending, 150)
    finally:
        collector.stop()
    ids = await stream_ids(nats_server.url)
    assert len(ids) == len(set(ids)), "an event was stored twice"
    assert set(ids) == load.sent()
    return load.attempts


@pytest.mark.timeout(180)
async def test_nats_restart_under_load_loses_and_doubles_nothing(nats_server, tmp_path):
    async def faults(_collector, load, sending):
        await load.flowing()
        assert not sending.done()
        nats_server.restart()  # graceful stop and start, mid-stream
        await load.flowing()
        nats_server.kill()  # and a crash
        nats_server.start()
        await load.flowing()

    attempts = await under_load(nats_server, tmp_path, faults)
    assert attempts, "the faults should have made some requests fail and be retried"


@pytest.mark.timeout(180)
async def test_killing_the_collector_under_load_loses_and_doubles_nothing(nats_server, tmp_path):
    async def faults(collector, load, sending):
        for _ in range(2):
            await load.flowing()
            assert not sending.done()
            collector.kill()  # SIGKILL: requests in flight die with it
            collector.start()
        await load.flowing()

    attempts = await under_load(nats_server, tmp_path, faults)
    assert attempts
