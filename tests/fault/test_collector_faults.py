"""Fault tests: restart the NATS server and kill the collector under load, then count every event.

Clients behave as the collector tells them to: on UNAVAILABLE / RESOURCE_EXHAUSTED they retry the same
batch. Afterwards the stream must hold every event exactly once — acknowledged ones were never lost,
retried ones were never stored twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import grpc
import nats
import pytest

from cdp.collector.v1 import collector_pb2, collector_pb2_grpc
from cdp.events.v1 import events_pb2
from cdp_kit.natsserver import free_port, wait_for_port

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
    js = nc.jetstream()
    info = await js.stream_info("EVENTS_RAW")
    ids = [
        events_pb2.Event.FromString((await js.get_msg("EVENTS_RAW", seq)).data).message_id
        for seq in range(info.state.first_seq, info.state.last_seq + 1)
    ]
    await nc.close()
    return ids


class Collector:
    """The collector as a real process, killable with SIGKILL and restartable on the same ports."""

    def __init__(self, nats_url: str, tmp_path) -> None:
        sources = tmp_path / "sources.json"
        sources.write_text(json.dumps({"sources": [{"id": "fault", "write_key": WRITE_KEY}]}))
        self.port = free_port()
        self.env = {
            **os.environ,
            "CDP_NATS_URL": nats_url,
            "CDP_GRPC_HOST": "127.0.0.1",
            "CDP_GRPC_PORT": str(self.port),
            "CDP_HTTP_HOST": "127.0.0.1",
            "CDP_HTTP_PORT": str(free_port()),
            "CDP_AUTH_MODE": "none",
            "CDP_COLLECTOR_SOURCES_FILE": str(sources),
            "CDP_LOG_LEVEL": "WARNING",
            "CDP_PARTITIONS": "4",
        }
        self.log = tmp_path / "collector.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cdp_collector"], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        assert wait_for_port("127.0.0.1", self.port, 30), self.log.read_text()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


@pytest.mark.timeout(180)
async def test_nats_restart_under_load_loses_and_doubles_nothing(nats_server, tmp_path):
    collector = Collector(nats_server.url, tmp_path)
    collector.start()
    attempts: list[int] = []
    try:
        sending = asyncio.create_task(
            load(f"127.0.0.1:{collector.port}", senders=4, batches=BATCHES, attempts=attempts)
        )
        await asyncio.sleep(1.0)
        assert not sending.done()
        nats_server.restart()  # graceful stop and start, mid-stream
        await asyncio.sleep(1.0)
        nats_server.kill()  # and a crash
        nats_server.start()
        await asyncio.wait_for(sending, 150)
    finally:
        collector.stop()
    ids = await stream_ids(nats_server.url)
    assert len(ids) == len(set(ids)), "an event was stored twice"
    assert set(ids) == {e.message_id for s in range(4) for b in range(BATCHES) for e in batch(s, b)}
    assert attempts, "the faults should have made some requests fail and be retried"


@pytest.mark.timeout(180)
async def test_killing_the_collector_under_load_loses_and_doubles_nothing(nats_server, tmp_path):
    collector = Collector(nats_server.url, tmp_path)
    collector.start()
    attempts: list[int] = []
    try:
        sending = asyncio.create_task(
            load(f"127.0.0.1:{collector.port}", senders=4, batches=BATCHES, attempts=attempts)
        )
        for _ in range(2):
            await asyncio.sleep(0.8)
            assert not sending.done()
            collector.kill()  # SIGKILL: requests in flight die with it
            collector.start()
        await asyncio.wait_for(sending, 150)
    finally:
        collector.stop()
    ids = await stream_ids(nats_server.url)
    assert len(ids) == len(set(ids)), "an event was stored twice"
    assert set(ids) == {e.message_id for s in range(4) for b in range(BATCHES) for e in batch(s, b)}
    assert attempts
