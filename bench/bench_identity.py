"""bench/identity — resolved events/s through the identity service, against the foundation's consumer
reading the same stream and doing nothing, in the same run; and p99 of the synchronous Resolve RPC.

The stream is filled before either side starts: a warm-up part (every user signs in once: user id,
anonymous id, email) and a measured part with a realistic identifier mix — 70 % known persons (user id
+ their anonymous id), 20 % anonymous → known (a new anonymous id signing in as a known user), 10 % new
anonymous visitors. Both sides run 8 partition consumers (batches of 500) over the same messages; the
measured rate is over the measured part only (timed from the moment the warm-up part is through).
Identity runs in-process on SQLite with write-behind, publishing every event to events.resolved (in
one ResolvedEventBatch message per person partition and applied batch). Progress on both sides is read
the same way: raw messages acknowledged by the partition consumers. The stream holds what the collector
writes: SDK requests of 50 events, each one message per person partition it touches (a `Cdp-Events`
batch; one event alone as itself), so each side handles about six events a message, as in the pipeline.

`params.stages` splits the time of identity's batches over the measured part, per batch: `decode`
(parse and check each message), `resolve` (identity's `apply`: the engine lock, `load` - reading
missing records from the store -, resolving in memory and encoding the resolved events), `commit`
(from submitting a batch's write to it being durable: waiting behind earlier groups, then `store`, the
SQLite bulk write itself), `publish` (until JetStream stored the batch's messages). Each with mean,
p50 and p99 in ms and `busy`: its summed time over the measured wall time (stages overlap: batches are
pipelined and SQLite runs on its own threads). `cpu` is the process' CPU time over the wall time, and
`cpu_us_per_event` (with `baseline_cpu_us_per_event`) its CPU time per measured event, of which
`loop_cpu_us_per_event` on the event loop's thread (the rest: SQLite's threads): on a machine shared
with other work the rates move with the load, the CPU cost per event much less.

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
from cdp_identity.engine import IdentityEngine
from cdp_identity.settings import IdentitySettings
from cdp_kit.bus import Bus, ConsumerSpec, OutMessage, events_raw_stream, partition_for, rawevents, subjects
from cdp_kit.engine.pipeline import PartitionPipeline
from cdp_kit.natsserver import NatsServer
from cdp_kit.service import serving
from cdp_kit.storage.sqlite import SqliteStore

PARTITIONS = 8
USERS = 20_000
MEASURED = 150_000
BATCH = 500
REQUEST = 50  # events an SDK sends in one request (the collector writes one message a partition of it)
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


def raw_messages(events: list[events_pb2.Event]) -> list[OutMessage]:
    """`events` as the collector writes them to events.raw: SDK requests of REQUEST events, each one message
    per person partition the request touches (`cdp_kit.bus.rawevents`: several events in one message, one
    alone as itself)."""
    messages = []
    for start in range(0, len(events), REQUEST):
        groups: dict[int, list[events_pb2.Event]] = {}
        for e in events[start : start + REQUEST]:
            groups.setdefault(partition_for(e.user_id or e.anonymous_id, PARTITIONS), []).append(e)
        for p, group in groups.items():
            ids = [f"bench:{e.message_id}" for e in group]
            bodies = [e.SerializeToString() for e in group]
            if len(group) == 1:
                messages.append(OutMessage(subjects.events_raw(p), bodies[0], ids[0]))
            else:
                headers = {rawevents.EVENTS_HEADER: str(len(group))}
                messages.append(
                    OutMessage(subjects.events_raw(p), rawevents.join(bodies), rawevents.batch_id(ids), headers)
                )
    return messages


async def fill_stream(bus: Bus, messages: list[OutMessage]) -> None:
    await bus.ensure_streams(events_raw_stream())
    for start in range(0, len(messages), 500):
        results = await bus.publisher.publish_batch(messages[start : start + 500], trace_headers=False)
        assert all(r.ok for r in results)


async def bench_baseline(nats_url: str, warmup: int, total: int, events: int) -> tuple[float, float]:
    """The foundation's consumer, 8 partition durables, handler does nothing: events/s over the measured
    part (its `events` in the messages after the first `warmup` of `total`), and this process' CPU
    microseconds per event meanwhile."""

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
        cpu0 = time.process_time()
        t1 = await wait_count(count, total)
        cpu_us = (time.process_time() - cpu0) / events * 1e6
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return events / (t1 - t0), cpu_us


class Stages:
    """Per-batch durations of identity's stages, from wrappers around the methods that run them."""

    NAMES = ("decode", "resolve", "load", "commit", "store", "publish")

    def __init__(self) -> None:
        self.samples: dict[str, list[tuple[float, float]]] = {name: [] for name in self.NAMES}
        self._undo: list[tuple[type, str, object]] = []

    def _wrap(self, cls: type, method: str, stage: str) -> None:
        original = getattr(cls, method)
        samples = self.samples[stage]
        if asyncio.iscoroutinefunction(original):

            async def timed(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return await original(*args, **kwargs)
                finally:
                    samples.append((started, time.perf_counter() - started))
        else:

            def timed(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    samples.append((started, time.perf_counter() - started))

        setattr(cls, method, timed)
        self._undo.append((cls, method, original))

    def install(self) -> None:
        self._wrap(PartitionPipeline, "_decode", "decode")
        self._wrap(IdentityEngine, "apply", "resolve")
        self._wrap(IdentityEngine, "_load", "load")
        self._wrap(SqliteStore, "bulk_write", "store")
        self._wrap(PartitionPipeline, "_publish", "publish")
        # Commit: the kit records submit -> durable per batch in cdp.engine.commit.duration; read the
        # same interval off the batch settling.
        original = PartitionPipeline._settle
        samples = self.samples["commit"]

        async def settle(pipeline, batch):
            if batch.commit is not None and not batch.commit.done():
                try:
                    await asyncio.shield(batch.commit)
                except Exception:
                    pass
            if batch.commit is not None:
                samples.append((batch.submitted, time.perf_counter() - batch.submitted))
            return await original(pipeline, batch)

        PartitionPipeline._settle = settle
        self._undo.append((PartitionPipeline, "_settle", original))

    def uninstall(self) -> None:
        for cls, method, original in reversed(self._undo):
            setattr(cls, method, original)
        self._undo.clear()

    def split(self, t0: float, t1: float) -> dict:
        wall = t1 - t0
        out = {}
        for name, samples in self.samples.items():
            durations = [d * 1000 for started, d in samples if t0 <= started <= t1]
            if not durations:
                continue
            out[name] = {
                "calls": len(durations),
                "mean_ms": round(sum(durations) / len(durations), 3),
                "p50_ms": round(percentile(durations, 50), 3),
                "p99_ms": round(percentile(durations, 99), 3),
                "busy": round(sum(durations) / 1000 / wall, 3),
            }
        return out


async def bench_identity(
    nats_url: str, workdir: Path, warmup: int, total: int, events: int
) -> tuple[float, dict, dict]:
    """Identity's events/s over the measured part (its `events` in the messages after the first `warmup`
    of `total`), the Resolve RPC's latency, and where a batch's time goes."""
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
    stages = Stages()
    stages.install()
    try:
        async with (
            serving(settings, identity_setup) as runtime,
            Bus.connect(nats_url, name="bench-reader") as reader,
        ):

            async def resolved() -> int:
                return await acknowledged(reader.js, subjects.EVENTS_RAW, "identity", PARTITIONS, total)

            t0 = await wait_count(resolved, warmup)
            cpu0, loop0 = time.process_time(), time.thread_time()
            t1 = await wait_count(resolved, total)
            cpu, loop_cpu = time.process_time() - cpu0, time.thread_time() - loop0
            rate = events / (t1 - t0)
            split = {
                **stages.split(t0, t1),
                "cpu": round(cpu / (t1 - t0), 3),
                "cpu_us_per_event": round(cpu / events * 1e6, 1),
                "loop_cpu_us_per_event": round(loop_cpu / events * 1e6, 1),
            }
            latency = await bench_resolve(f"127.0.0.1:{runtime.grpc.port}")
    finally:
        stages.uninstall()
    return rate, latency, split


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
    first, then = raw_messages(warmup), raw_messages(measured)
    total = len(first) + len(then)
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats")
        server.start()
        try:
            async with Bus.connect(server.url, name="bench-loader") as bus:
                await fill_stream(bus, first + then)
            baseline, baseline_cpu_us = await bench_baseline(server.url, len(first), total, len(measured))
            ours, resolve, split = await bench_identity(server.url, Path(tmp), len(first), total, len(measured))
            print(f"baseline {baseline:,.0f} events/s, identity {ours:,.0f} events/s, resolve {resolve}")
            print(f"  cpu per event: baseline {baseline_cpu_us:.1f} us, identity {split['cpu_us_per_event']:.1f} us")
            for stage, figures in split.items():
                print(f"  {stage}: {figures}")
            echo = await bench_echo()
        finally:
            server.stop()
    params = {
        "users": USERS,
        "warmup_events": len(warmup),
        "measured_events": len(measured),
        "request": REQUEST,
        "raw_messages": total,
        "mix": mix,
        "partitions": PARTITIONS,
        "batch": BATCH,
        "store": "sqlite",
        "baseline": "cdp_kit ConsumerRunner, same stream, 8 partition durables, handler does nothing",
        "resolve": resolve,
        "stages": split,
        "baseline_cpu_us_per_event": round(baseline_cpu_us, 1),
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
