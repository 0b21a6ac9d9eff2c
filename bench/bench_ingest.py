"""bench/ingest — events/s through the collector's gRPC Collect (batches of 500) with durable JetStream
acknowledgement, against raw nats-py JetStream publishing of the same messages in the same run.

Both sides publish the same serialized events (same subjects, sizes and Nats-Msg-Id framing) with the
same number of batches in flight; the raw side skips gRPC, authentication, validation and clock-skew
correction. Also measured: p50/p99 batch latency at full load and p99 at half the maximum rate, and
the Segment HTTP path with the official `segment-analytics-python` SDK as client.

    make bench-ingest            # writes bench/results/ingest.json and ingest-http.json
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import nats
from benchlib import percentile, segment_event, write_result
from google.protobuf import json_format

from cdp.collector.v1 import collector_pb2
from cdp.events.v1 import events_pb2
from cdp_kit.bus import events_raw_stream, partition_for, subjects
from cdp_kit.bus.streams import ensure_stream
from cdp_kit.natsserver import NatsServer
from cdp_testing.processes import CollectorProcess
from cdp_testing.streams import raw_events

BATCH = 500
IN_FLIGHT = 8
EVENTS = 200_000
WARMUP = 20_000
PARTITIONS = 8
COLLECT = "/cdp.collector.v1.CollectorService/Collect"


def to_proto(body: dict) -> events_pb2.Event:
    event = events_pb2.Event(
        message_id=body["messageId"],
        type=events_pb2.EVENT_TYPE_TRACK,
        user_id=body["userId"],
        anonymous_id=body["anonymousId"],
        event=body["event"],
    )
    event.properties.update(body["properties"])
    ctx = body["context"]
    event.context.ip, event.context.user_agent = ctx["ip"], ctx["userAgent"]
    event.context.locale, event.context.timezone = ctx["locale"], ctx["timezone"]
    event.context.library.name, event.context.library.version = ctx["library"]["name"], ctx["library"]["version"]
    json_format.ParseDict(ctx["page"], event.context.page)
    event.original_timestamp.FromJsonString(body["timestamp"])
    return event


def make_events(n: int, seed: int) -> list[events_pb2.Event]:
    rng = random.Random(seed)
    return [to_proto(segment_event(rng)) for _ in range(n)]


def collect_requests(events: list[events_pb2.Event], write_key: str) -> list[bytes]:
    sent_at = datetime.now(UTC)
    requests = []
    for start in range(0, len(events), BATCH):
        request = collector_pb2.CollectRequest(write_key=write_key, events=events[start : start + BATCH])
        request.sent_at.FromDatetime(sent_at)
        requests.append(request.SerializeToString())
    return requests


def raw_batches(events: list[events_pb2.Event]) -> list[list[tuple[str, bytes, str]]]:
    """What the collector publishes for these events: same subject, payload size and message id."""
    now = datetime.now(UTC)
    batches = []
    for start in range(0, len(events), BATCH):
        batch = []
        for event in events[start : start + BATCH]:
            stored = events_pb2.Event()
            stored.CopyFrom(event)
            stored.source_id = "bench"
            stored.received_at.FromDatetime(now)
            stored.timestamp.FromDatetime(now)
            stored.sent_at.FromDatetime(now)
            key = stored.user_id or stored.anonymous_id
            batch.append(
                (
                    subjects.events_raw(partition_for(key, PARTITIONS)),
                    stored.SerializeToString(),
                    f"bench:{stored.message_id}",
                )
            )
        batches.append(batch)
    return batches


async def run_load(send, items: list, *, in_flight: int) -> tuple[float, list[float]]:
    """Keep `in_flight` calls running until every item was sent; returns (seconds, per-call latencies)."""
    queue = list(reversed(items))
    latencies: list[float] = []

    async def worker() -> None:
        while queue:
            item = queue.pop()
            started = time.perf_counter()
            await send(item)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return time.perf_counter() - started, latencies


async def run_paced(send, items: list, *, per_second: float) -> list[float]:
    """Send items at a fixed rate (open loop) and return each call's latency."""
    latencies: list[float] = []
    interval = 1.0 / per_second
    start = time.perf_counter()

    async def one(item) -> None:
        t0 = time.perf_counter()
        await send(item)
        latencies.append(time.perf_counter() - t0)

    tasks = []
    for i, item in enumerate(items):
        delay = start + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(item)))
    await asyncio.gather(*tasks)
    return latencies


async def fresh_stream(js) -> None:
    try:
        await js.delete_stream(subjects.EVENTS_RAW)
    except Exception:
        pass
    await ensure_stream(js, events_raw_stream())


async def bench_raw(nats_url: str, batches) -> tuple[float, list[float]]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream(publish_async_max_pending=IN_FLIGHT * BATCH * 2)
    await fresh_stream(js)

    async def send(batch) -> None:
        futures = [
            await js.publish_async(subject, payload, headers={"Nats-Msg-Id": msg_id})
            for subject, payload, msg_id in batch
        ]
        acks = await asyncio.gather(*futures)
        assert not any(a.duplicate for a in acks)

    await run_load(send, batches[: WARMUP // BATCH], in_flight=IN_FLIGHT)
    seconds, latencies = await run_load(send, batches[WARMUP // BATCH :], in_flight=IN_FLIGHT)
    await nc.close()
    return (len(batches) - WARMUP // BATCH) * BATCH / seconds, latencies


async def bench_grpc(collector: CollectorProcess, nats_url: str, requests: list[bytes], paced: list[bytes]) -> dict:
    nc = await nats.connect(nats_url)
    await fresh_stream(nc.jetstream())
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{collector.grpc_port}")
    call = channel.unary_unary(
        COLLECT, request_serializer=lambda b: b, response_deserializer=collector_pb2.CollectResponse.FromString
    )

    async def send(request: bytes) -> None:
        response = await call(request)
        assert response.accepted == BATCH, (response.accepted, response.duplicates, response.rejected)

    await run_load(send, requests[: WARMUP // BATCH], in_flight=IN_FLIGHT)
    seconds, latencies = await run_load(send, requests[WARMUP // BATCH :], in_flight=IN_FLIGHT)
    rate = (len(requests) - WARMUP // BATCH) * BATCH / seconds
    half_rate_latencies = await run_paced(send, paced, per_second=rate / 2 / BATCH)
    stored = len(await raw_events(nc.jetstream(), timeout=120.0))  # events (a message may carry several)
    await channel.close()
    await nc.close()
    return {"rate": rate, "latencies": latencies, "half_rate_latencies": half_rate_latencies, "stored": stored}


def bench_http_sdk(collector: CollectorProcess, n: int) -> float:
    from segment.analytics import Client

    client = Client(
        collector.write_key,
        host=f"http://127.0.0.1:{collector.http_port}",
        upload_size=500,
        max_queue_size=n + 1,
        max_retries=3,
        sync_mode=False,
    )
    rng = random.Random(7)
    calls = [segment_event(rng) for _ in range(n)]
    started = time.perf_counter()
    for body in calls:
        client.track(
            user_id=body["userId"],
            event=body["event"],
            properties=body["properties"],
            context=body["context"],
            anonymous_id=body["anonymousId"],
            message_id=body["messageId"],
        )
    client.flush()
    seconds = time.perf_counter() - started
    client.shutdown()
    return n / seconds


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="cdp-bench-ingest-") as tmp:
        workdir = Path(tmp)
        server = NatsServer(store_dir=workdir / "nats").start()
        try:
            total = WARMUP + EVENTS
            grpc_events = make_events(total, seed=1)
            paced_events = make_events(60 * BATCH, seed=3)
            raw_events = make_events(total, seed=2)
            with CollectorProcess(
                server.url, workdir, write_key="wk_bench_0123456789", source_id="bench", partitions=PARTITIONS
            ) as collector:
                requests = collect_requests(grpc_events, collector.write_key)
                paced = collect_requests(paced_events, collector.write_key)
                raw_rate, raw_latencies = await bench_raw(server.url, raw_batches(raw_events))
                ours = await bench_grpc(collector, server.url, requests, paced)
                http_rate = bench_http_sdk(collector, 20_000)
        finally:
            server.close()
    assert ours["stored"] == total + len(paced_events), f"stored {ours['stored']} of {total + len(paced_events)}"
    ms = [x * 1000 for x in ours["latencies"]]
    half_ms = [x * 1000 for x in ours["half_rate_latencies"]]
    raw_ms = [x * 1000 for x in raw_latencies]
    common = {
        "batch": BATCH,
        "in_flight": IN_FLIGHT,
        "events": EVENTS,
        "partitions": PARTITIONS,
        "event_bytes": len(grpc_events[0].SerializeToString()),
    }
    write_result(
        "ingest",
        value=ours["rate"],
        unit="events/s",
        baseline=raw_rate,
        higher_is_better=True,
        params={
            **common,
            "p50_batch_ms": round(percentile(ms, 50), 2),
            "p99_batch_ms": round(percentile(ms, 99), 2),
            "p99_batch_ms_at_half_rate": round(percentile(half_ms, 99), 2),
            "half_rate_events_per_s": round(ours["rate"] / 2),
            "baseline_p50_batch_ms": round(percentile(raw_ms, 50), 2),
            "baseline_p99_batch_ms": round(percentile(raw_ms, 99), 2),
            "baseline": "raw nats-py js.publish_async of the same messages, same batches in flight",
        },
    )
    write_result(
        "ingest-http",
        value=http_rate,
        unit="events/s",
        baseline=raw_rate,
        higher_is_better=True,
        params={
            **common,
            "events": 20_000,
            "client": "segment-analytics-python 2.4.0, upload_size=500, one thread",
            "baseline": "raw nats-py js.publish_async (same run)",
        },
    )


if __name__ == "__main__":
    asyncio.run(main())
