"""What every benchmark shares: result files, percentiles, a collector process, realistic events.

Results land in bench/results/<name>.json as
{"name", "value", "unit", "baseline", "ratio", "higher_is_better", "params"}; the ratio is what to
compare across machines (ours / baseline, both measured in the same run).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import time
import uuid
from pathlib import Path

import grpc

from cdp_kit.bus import subjects

RESULTS = Path(__file__).resolve().parent / "results"
# The kit engine's histograms of one batch's way through a service, in the order a batch meets them.
ENGINE_STAGES = {
    "bus_wait": "cdp_engine_bus_wait_duration_milliseconds",
    "slot_wait": "cdp_engine_slot_wait_duration_milliseconds",
    "decode": "cdp_engine_decode_duration_milliseconds",
    "apply": "cdp_engine_batch_apply_duration_milliseconds",
    "commit": "cdp_engine_commit_duration_milliseconds",
    "publish": "cdp_engine_publish_duration_milliseconds",
    "ack": "cdp_engine_ack_duration_milliseconds",
}


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def write_result(name: str, *, value: float, unit: str, baseline: float, higher_is_better: bool, params: dict) -> dict:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "name": name,
        "value": round(value, 3),
        "unit": unit,
        "baseline": round(baseline, 3),
        "ratio": round(value / baseline, 4) if baseline else None,
        "higher_is_better": higher_is_better,
        "params": {**params, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}},
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def segment_event(rng: random.Random, users: int = 10_000) -> dict:
    """One realistic Segment track call as SDKs send it (about 700 bytes of JSON)."""
    user = rng.randrange(users)
    return {
        "type": "track",
        "messageId": str(uuid.UUID(int=rng.getrandbits(128))),
        "userId": f"user-{user}",
        "anonymousId": f"anon-{user:08x}",
        "event": rng.choice(["Product Viewed", "Product Added", "Order Completed", "Checkout Started"]),
        "properties": {
            "product_id": f"sku-{rng.randrange(5000)}",
            "price": round(rng.uniform(3, 300), 2),
            "quantity": rng.randrange(1, 4),
            "currency": "EUR",
            "category": rng.choice(["shoes", "books", "garden", "toys"]),
            "coupon": None,
        },
        "context": {
            "ip": f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}",
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
            "locale": "de-DE",
            "timezone": "Europe/Berlin",
            "library": {"name": "analytics.js", "version": "5.2.0"},
            "page": {"path": "/p/shoes", "url": "https://shop.example.com/p/shoes", "title": "Shoes"},
        },
        "timestamp": "2026-11-25T10:00:00.000Z",
    }


async def acknowledged(js, stream: str, service: str, partitions: int, total: int) -> int:
    """Messages of `stream` the partition consumers of `service` (`<service>-p<p>`) have handled and
    acknowledged (ours and the baseline's are counted the same way)."""
    remaining = 0
    for p in range(partitions):
        try:
            info = await js.consumer_info(stream, subjects.partition_durable(service, p))
        except Exception:
            return 0
        remaining += info.num_pending + info.num_ack_pending
    return total - remaining


async def wait_count(count_fn, target: int, timeout: float = 900) -> float:
    """perf_counter() at the first poll where `await count_fn()` reached `target`."""
    deadline = time.perf_counter() + timeout
    for _ in range(int(timeout / 0.02) + 1):
        if await count_fn() >= target:
            return time.perf_counter()
        if time.perf_counter() > deadline:
            break
        await asyncio.sleep(0.02)
    raise TimeoutError(f"stuck below {target}")


async def bare_server_calls(
    answer: bytes | None, requests, *, calls: int, in_flight: int, response_deserializer=None
) -> dict:
    """The baseline of an RPC benchmark: a bare grpc.aio unary server (no interceptors, no work) answering
    `answer` (None: the request itself), driven like the service: `calls` calls, `in_flight` at once,
    requests from `requests()` (bytes or a message), answers parsed with `response_deserializer`."""

    async def handle(request: bytes, context) -> bytes:
        return request if answer is None else answer

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(handle)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    latencies: list[float] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(
                "/bench.Echo/Call",
                request_serializer=lambda r: r if isinstance(r, bytes) else r.SerializeToString(),
                response_deserializer=response_deserializer,
            )
            remaining = [calls]

            async def worker() -> None:
                while remaining[0] > 0:
                    remaining[0] -= 1
                    started = time.perf_counter()
                    await call(requests())
                    latencies.append((time.perf_counter() - started) * 1000)

            started, cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(*(worker() for _ in range(in_flight)))
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        await server.stop(None)
    return {
        "rps": calls / elapsed,
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        # the process' CPU time per call (client, server and grpc's threads): less skewed by other work on
        # the machine than requests/s
        "cpu_us_per_call": round(cpu / calls * 1e6, 1),
    }


async def bench_hop(nats_url: str, seconds: float, *, rate: int, payload: bytes) -> dict:
    """The physical baseline of a freshness benchmark: one bare JetStream hop (publish, a push consumer
    receives) while `rate` messages/s of `payload` flow beside it, probed every 20 ms."""
    import nats

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(name="HOP", subjects=["hop.>"])
    arrivals: dict[str, float] = {}

    async def on_msg(msg) -> None:
        arrivals[msg.subject] = time.perf_counter()
        await msg.ack()

    sub = await js.subscribe("hop.>", cb=on_msg, manual_ack=True)
    latencies = []
    deadline = time.perf_counter() + seconds
    n = 0
    try:
        while time.perf_counter() < deadline:
            n += 1
            tick = time.perf_counter()
            await asyncio.gather(*(js.publish(f"hop.bg.{i % 8}", payload) for i in range(rate // 50)))
            sent = time.perf_counter()
            await js.publish(f"hop.probe.{n}", payload)
            for _ in range(1000):
                if f"hop.probe.{n}" in arrivals:
                    break
                await asyncio.sleep(0.001)
            latencies.append((arrivals[f"hop.probe.{n}"] - sent) * 1000)
            await asyncio.sleep(max(0.0, 0.02 - (time.perf_counter() - tick)))
    finally:
        await sub.unsubscribe()
        await js.delete_stream("HOP")
        await nc.close()
    return {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99), "probes": len(latencies)}


def bucket_quantile(cumulative: list[tuple[float, float]], count: float, q: float) -> float:
    """The q-quantile of a histogram given as cumulative (upper bound, count) pairs, linear within a bucket."""
    rank, lower, below = q * count, 0.0, 0.0
    for bound, n in cumulative:
        if n >= rank:
            if bound == float("inf"):
                return lower
            return round(lower + (bound - lower) * (rank - below) / max(n - below, 1e-9), 2)
        lower, below = bound, n
    return lower
