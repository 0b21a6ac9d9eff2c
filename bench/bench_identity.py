"""bench/identity — resolved events/s through the identity service, against the foundation's consumer
reading the same stream and doing nothing, in the same run; and p99 of the synchronous Resolve RPC.

The stream is filled before either side starts: a warm-up part (every user signs in once: user id,
anonymous id, email) and a measured part with a realistic identifier mix — 70 % known persons (user id
+ their anonymous id), 20 % anonymous → known (a new anonymous id signing in as a known user), 10 % new
anonymous visitors. Both sides run 8 partition consumers (batches of 500) over the same messages; the
measured rate is over the measured part only (timed from the moment the warm-up part is through).
Identity runs in-process on SQLite with write-behind, publishing every event to events.resolved (in
one ResolvedEventBatch message per person partition and applied batch). Progress on both sides is read
the same way: raw events acknowledged by the partition consumers.

    make bench-identity          # writes bench/results/identity.json and identity-resolve.json
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
import uuid
from pathlib import Path

import grpc
from benchlib import acknowledged, bare_server_calls, percentile, wait_count, write_result

from cdp.events.v1 import events_pb2
from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp_identity.__main__ import setup as identity_setup
from cdp_identity.settings import IdentitySettings
from cdp_kit.bus import Bus, ConsumerSpec, OutMessage, events_raw_stream, partition_for, subjects
from cdp_kit.natsserver import NatsServer
from cdp_kit.service import serving

PARTITIONS = 8
USERS = 20_000
MEASURED = 150_000
BATCH = 500
RESOLVE_CALLS = 3_000
RESOLVE_CONCURRENCY = 8


def event(kind: int, message_id: str, *, user: str = "", anon: str = "", email: str = "") -> events_pb2.Event:
    ev = events_pb2.Event(message_id=message_id, type=kind, user_id=user, anonymous_id=anon, source_id="bench")
    if kind == events_pb2.EVENT_TYPE_TRACK:
        ev.event = "Product Viewed"
        ev.properties.update({"product_id": "sku-1", "price": 19.99, "currency": "EUR", "category": "shoes"})
    if email:
        ev.traits.update({"email": email, "plan": "pro"})
    ev.context.ip = "10.1.2.3"
    ev.context.user_agent = "Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0"
    ev.context.page.url = "https://shop.example.com/p/shoes"
    ev.timestamp.GetCurrentTime()
    return ev


def workload(seed: int = 7) -> tuple[list[events_pb2.Event], list[events_pb2.Event], dict[str, int]]:
    rng = random.Random(seed)
    warmup = [
        event(events_pb2.EVENT_TYPE_IDENTIFY, f"w{u}", user=f"user-{u}", anon=f"anon-{u}", email=f"u{u}@example.com")
        for u in range(USERS)
    ]
    measured, mix = [], {"known": 0, "anonymous_to_known": 0, "new": 0}
    for i in range(MEASURED):
        roll = rng.random()
        u = rng.randrange(USERS)
        if roll < 0.70:
            measured.append(event(events_pb2.EVENT_TYPE_TRACK, f"k{i}", user=f"user-{u}", anon=f"anon-{u}"))
            mix["known"] += 1
        elif roll < 0.90:
            measured.append(event(events_pb2.EVENT_TYPE_IDENTIFY, f"a{i}", user=f"user-{u}", anon=f"anon-new-{i}"))
            mix["anonymous_to_known"] += 1
        else:
            measured.append(event(events_pb2.EVENT_TYPE_TRACK, f"n{i}", anon=f"visitor-{i}"))
            mix["new"] += 1
    return warmup, measured, mix


async def fill_stream(bus: Bus, events: list[events_pb2.Event]) -> None:
    await bus.ensure_streams(events_raw_stream())
    for start in range(0, len(events), 2_000):
        chunk = events[start : start + 2_000]
        results = await bus.publisher.publish_batch(
            [
                OutMessage(
                    subject=subjects.events_raw(partition_for(e.user_id or e.anonymous_id, PARTITIONS)),
                    payload=e.SerializeToString(),
                    msg_id=f"bench:{e.message_id}",
                )
                for e in chunk
            ],
            trace_headers=False,
        )
        assert all(r.ok for r in results)


async def bench_baseline(nats_url: str, warmup: int, total: int) -> float:
    """The foundation's consumer, 8 partition durables, handler does nothing: events/s over the measured part."""

    async def nothing(batch) -> None:
        return None

    async with Bus.connect(nats_url, name="bench-baseline") as bus:

        async def count() -> int:
            return await acknowledged(bus.js, subjects.EVENTS_RAW, "noop", PARTITIONS, total)

        tasks = []
        for p in range(PARTITIONS):
            runner = bus.consumer(
                ConsumerSpec(
                    stream=subjects.EVENTS_RAW,
                    durable=subjects.partition_durable("noop", p),
                    filter_subjects=(subjects.events_raw(p),),
                    batch_size=BATCH,
                ),
                nothing,
            )
            tasks.append(asyncio.create_task(runner.run()))
        t0 = await wait_count(count, warmup)
        t1 = await wait_count(count, total)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return (total - warmup) / (t1 - t0)


async def bench_identity(nats_url: str, workdir: Path, warmup: int, total: int) -> tuple[float, dict]:
    settings = IdentitySettings(
        nats_url=nats_url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        auth_mode="none",
        partitions=PARTITIONS,
        batch_size=BATCH,
        store_url=f"sqlite:///{workdir / 'identity.db'}",
        log_level="WARNING",
    )
    async with serving(settings, identity_setup) as runtime, Bus.connect(nats_url, name="bench-reader") as reader:

        async def resolved() -> int:
            return await acknowledged(reader.js, subjects.EVENTS_RAW, "identity", PARTITIONS, total)

        t0 = await wait_count(resolved, warmup)
        t1 = await wait_count(resolved, total)
        rate = (total - warmup) / (t1 - t0)
        latency = await bench_resolve(f"127.0.0.1:{runtime.grpc.port}")
    return rate, latency


async def bench_resolve(address: str) -> dict:
    """Resolve over gRPC: 3,000 calls, 8 in flight, mixing known users and new anonymous ids."""
    rng = random.Random(11)
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        queue = list(range(RESOLVE_CALLS))

        async def worker() -> None:
            while queue:
                i = queue.pop()
                u = rng.randrange(USERS)
                ids = [identity_pb2.Identifier(type="user_id", value=f"user-{u}")]
                if i % 5 == 0:
                    ids.append(identity_pb2.Identifier(type="anonymous_id", value=f"resolve-{uuid.uuid4()}"))
                started = time.perf_counter()
                await stub.Resolve(identity_pb2.ResolveRequest(identifiers=ids))
                latencies.append((time.perf_counter() - started) * 1000)

        await asyncio.gather(*(worker() for _ in range(RESOLVE_CONCURRENCY)))
    return {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99), "calls": len(latencies)}


async def bench_echo() -> dict:
    """A bare grpc.aio unary echo of a Resolve-sized payload, same call pattern: the latency floor."""
    payload = identity_pb2.ResolveRequest(
        identifiers=[identity_pb2.Identifier(type="user_id", value="user-1")]
    ).SerializeToString()
    return await bare_server_calls(None, lambda: payload, calls=RESOLVE_CALLS, in_flight=RESOLVE_CONCURRENCY)


async def main() -> None:
    warmup, measured, mix = workload()
    total = len(warmup) + len(measured)
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats")
        server.start()
        try:
            async with Bus.connect(server.url, name="bench-loader") as bus:
                await fill_stream(bus, warmup + measured)
            baseline = await bench_baseline(server.url, len(warmup), total)
            ours, resolve = await bench_identity(server.url, Path(tmp), len(warmup), total)
            print(f"baseline {baseline:,.0f} events/s, identity {ours:,.0f} events/s, resolve {resolve}")
            echo = await bench_echo()
        finally:
            server.stop()
    params = {
        "users": USERS,
        "warmup_events": len(warmup),
        "measured_events": len(measured),
        "mix": mix,
        "partitions": PARTITIONS,
        "batch": BATCH,
        "store": "sqlite",
        "baseline": "cdp_kit ConsumerRunner, same stream, 8 partition durables, handler does nothing",
        "resolve": resolve,
        "target": ">= 30,000 events/s, ratio >= 0.5",
    }
    write_result("identity", value=ours, unit="events/s", baseline=baseline, higher_is_better=True, params=params)
    write_result(
        "identity-resolve",
        value=resolve["p99_ms"],
        unit="ms p99",
        baseline=echo["p99_ms"],
        higher_is_better=False,
        params={
            "calls": RESOLVE_CALLS,
            "in_flight": RESOLVE_CONCURRENCY,
            "ours": resolve,
            "echo": echo,
            "baseline": "bare grpc.aio unary echo of a Resolve-sized payload",
        },
    )


if __name__ == "__main__":
    asyncio.run(main())
