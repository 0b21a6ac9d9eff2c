"""A flood of connections against a real collector process whose open-file limit is small (256, as a
container's default can be): far more connections than it may open files are opened to its HTTP port and
held. The process never runs out of file descriptors: it holds at most its cap (half the limit, the
default) and refuses the rest at once; its gRPC port serves a caller during the flood (before the caps, it
could not accept one until the flood's connections timed out); and the official Segment SDK, turned away
while the flood holds every place, waits as told and delivers its event once the flood ends. Nothing is
asserted on timing but "not hung"."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import resource
import socket
import urllib.request

import grpc
import nats
import pytest

from cdp.collector.v1 import collector_pb2, collector_pb2_grpc
from cdp.events.v1 import events_pb2
from cdp_kit.bus.rawevents import events_of
from cdp_kit.natsserver import free_port
from cdp_testing.processes import CollectorProcess
from cdp_testing.waiting import eventually

WRITE_KEY = "wk_flood_0123456789abcdef"
FILES = 256  # the collector's open-file limit: it may hold 128 HTTP connections (the default cap)
CAP = FILES // 2
FLOOD = 600  # connections opened to it and held, more than it may open files
GIVE_UP = 60.0


@contextlib.contextmanager
def open_file_limit(files: int):
    """Processes started meanwhile inherit this open-file limit (this one's is restored after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (files, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def flood(port: int) -> list[socket.socket]:
    held = []
    for _ in range(FLOOD):
        # A guard, not a figure: a stalled collector (a loaded machine) accepts late.
        sock = socket.create_connection(("127.0.0.1", port), timeout=GIVE_UP)
        sock.setblocking(False)
        held.append(sock)
    return held


async def collect(address: str, message_id: str) -> int:
    event = events_pb2.Event(message_id=message_id, type=events_pb2.EVENT_TYPE_TRACK, user_id="u", event="E")
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await collector_pb2_grpc.CollectorServiceStub(channel).Collect(
            collector_pb2.CollectRequest(write_key=WRITE_KEY, events=[event]), timeout=GIVE_UP / 4
        )
    return reply.accepted


async def stored_ids(url: str) -> set[str]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("EVENTS_RAW")
        ids = set()
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg("EVENTS_RAW", seq)
            ids.update(events_pb2.Event.FromString(e).message_id for e in events_of(msg.data, msg.headers))
        return ids
    finally:
        await nc.close()


async def refused_for_cap(metrics_port: int) -> int:
    """HTTP connections the collector refused for its cap (`cdp.collector.http.refused`, reason
    `max_connections`), from its /metrics."""

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
            return answer.read().decode()

    pattern = r'^cdp_collector_http_refused_total\{[^}]*reason="max_connections"[^}]*\} (\S+)$'
    return sum(int(float(m.group(1))) for m in re.finditer(pattern, await asyncio.to_thread(scrape), re.M))


@pytest.mark.timeout(180)
async def test_a_connection_flood_leaves_the_collector_serving(nats_server, tmp_path):
    from segment.analytics import Client

    collector = CollectorProcess(nats_server.url, tmp_path, write_key=WRITE_KEY)
    # The flood's idle connections outlast the test's patience: what is served is served during the flood.
    collector.env["CDP_COLLECTOR_HTTP_HEADER_TIMEOUT"] = "120"
    collector.env["CDP_LOG_FORMAT"] = "json"
    metrics_port = free_port()
    collector.env["CDP_METRICS_PORT"] = str(metrics_port)
    with open_file_limit(FILES):
        collector.start()
    held: list[socket.socket] = []
    try:
        held = await asyncio.to_thread(flood, collector.http_port)

        # The collector has taken every connection of the flood: its cap's worth held, the rest refused.
        async def flood_taken() -> int:
            return (count := await refused_for_cap(metrics_port)) >= FLOOD - CAP and count

        before = await eventually(flood_taken, timeout=GIVE_UP)
        # Meanwhile the gRPC port serves (it has its own cap, a quarter of the limit).
        assert await collect(collector.grpc_address, "grpc-during-flood") == 1
        errors: list = []
        sdk = Client(WRITE_KEY, host=f"http://127.0.0.1:{collector.http_port}", on_error=lambda e, _b: errors.append(e))
        sdk.track("u-1", "Order Completed", message_id="sdk-during-flood")
        sdk.flush_at = 1

        # The SDK is turned away meanwhile (told to come back in 5 s): its connection is one more refused.
        async def sdk_refused() -> bool:
            return await refused_for_cap(metrics_port) > before

        await eventually(sdk_refused, timeout=GIVE_UP)
        for sock in held:  # the flood ends
            sock.close()
        await asyncio.wait_for(asyncio.to_thread(sdk.shutdown), GIVE_UP)
        assert errors == []
        assert {"grpc-during-flood", "sdk-during-flood"} <= await stored_ids(nats_server.url)
    finally:
        for sock in held:
            sock.close()
        collector.stop()
    text = collector.log_path.read_text()
    assert "File descriptor limit" not in text and "Too many open files" not in text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert [line for line in lines if line.get("level") in ("ERROR", "CRITICAL")] == []
    refused = [line for line in lines if "refused" in line.get("msg", "")]
    assert refused and refused[0]["level"] == "WARNING"
