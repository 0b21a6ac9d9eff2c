"""bench/profile — the profile service's three hot paths, each against its physical baseline in the same run.

profile-apply      events/s applied from events.resolved with 10 computed traits defined, against the
                   foundation's consumer reading the same stream and doing nothing. The stream is filled
                   first, as identity publishes it: one ResolvedEventBatch message per person partition
                   (50 events each), realistic track/identify/page events of 10,000 persons. The service
                   runs in-process on SQLite; progress on both sides is messages acknowledged.
profile-read       GetProfile requests/s at 64 in flight (and p99) on the profiles just built, against a
                   bare grpc.aio echo server answering with a payload of the same size.
profile-freshness  p99 from collector acceptance to the trait being visible in GetProfile, with the
                   collector, identity and profile running as separate processes and 5,000 events/s of
                   background load entering through the collector (and again at 1,000 events/s);
                   baseline: the p99 of one bare JetStream hop (publish -> a push consumer sees it) at
                   the same load.

Each benchmark runs twice in one run, on the standard asyncio loop and on uvloop (`CDP_EVENT_LOOP`, for
this process and the service processes it starts); the headline figure is the runtime's default loop's,
both are in the JSON under `event_loops`. Where the time goes is in the JSON too (`stages`):

- read: per call, the whole call against the echo's, and the service's own part split into finding the
  profile, building the answer (view + message) or reusing it, and serialising it;
- freshness: per probe, identity's stage (accepted -> on events.resolved), profile's (-> visible in
  GetProfile) and the change published on profiles.changed; and per batch in the profile process, its
  engine's stages (bus wait, slot wait, decode, apply, commit, publish, acknowledge) from its metrics.

    make bench-profile     # writes bench/results/profile-apply.json, profile-read.json, profile-freshness.json

One part alone, for measuring a change (writes no results; the ratio and the CPU per event are printed): the
pipeline's shape at 2,500 events/s, ~22 events a batch, one record write per event (the default shape, 50 x 64,
coalesces several events per person per batch and hides that cost):

    python bench/bench_profile.py --only apply --loops uvloop --per-message 11 --batch-messages 2 --events 100000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import os
import random
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import nats
from benchlib import (
    ENGINE_STAGES,
    acknowledged,
    bare_server_calls,
    bench_hop,
    percentile,
    wait_count,
    write_result,
)

from cdp.collector.v1 import collector_pb2, collector_pb2_grpc
from cdp.events.v1 import events_pb2
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_kit.bus import Bus, ConsumerSpec, OutMessage, events_resolved_stream, partition_for, subjects
from cdp_kit.natsserver import NatsServer, free_port
from cdp_kit.service import event_loop_factory, serving
from cdp_kit.storage import Put, open_store
from cdp_profile.__main__ import setup as profile_setup
from cdp_profile.api import current_message, profile_message
from cdp_profile.settings import ProfileSettings
from cdp_testing.processes import CollectorProcess, IdentityProcess, ProfileProcess

PARTITIONS = 8
PERSONS = 10_000
EVENTS = 200_000
WARMUP = 20_000
PER_MESSAGE = 50
BATCH = 64
READS = 20_000
IN_FLIGHT = 64
FRESH_RATE = 5_000
FRESH_RATES = (FRESH_RATE, 1_000)  # the target: p99 <= 100 ms at 5,000/s, <= 50 ms at 1,000/s
FRESH_SECONDS = 20
LOOPS = tuple(os.environ.get("BENCH_LOOPS", "asyncio,uvloop").split(","))
SPLIT_SAMPLE = 2_000  # profiles timed one by one for the read split
POLL = 0.003  # GetProfile polling interval of the freshness probe (its resolution; polling is load too)
NOW = 1_795_000_000  # 2026-11-18: events are spread over the 60 days before

NAMES = ("Product Viewed", "Product Added", "Order Completed", "Checkout Started")

# Ten definitions of the kinds a marketing team declares, several matching every order.
DEFINITIONS = [
    {"name": "orders_30d", "op": "count", "event_names": ["Order Completed"], "window": "30d"},
    {"name": "revenue_90d", "op": "sum", "event_names": ["Order Completed"], "property": "price", "window": "90d"},
    {"name": "aov_90d", "op": "avg", "event_names": ["Order Completed"], "property": "price", "window": "90d"},
    {"name": "max_order", "op": "max", "event_names": ["Order Completed"], "property": "price"},
    {"name": "first_order_sku", "op": "first", "event_names": ["Order Completed"], "property": "product_id"},
    {"name": "last_viewed_sku", "op": "last", "event_names": ["Product Viewed"], "property": "product_id"},
    {"name": "favourite_category", "op": "most_frequent", "event_names": ["Product Viewed"], "property": "category"},
    {"name": "categories_bought", "op": "unique", "event_names": ["Order Completed"], "property": "category"},
    {"name": "carts_7d", "op": "count", "event_names": ["Product Added"], "window": "7d"},
    {"name": "pages_30d", "op": "count", "event_type": "page", "window": "30d"},
]


def resolved_event(rng: random.Random, n: int) -> tuple[str, bytes]:
    person = f"p_{rng.randrange(PERSONS):06d}"
    event = events_pb2.Event(message_id=f"m{n}", source_id="bench", user_id=f"user-{person}")
    event.timestamp.FromSeconds(NOW - rng.randrange(60 * 86_400))
    event.received_at.FromSeconds(NOW)
    roll = rng.random()
    if roll < 0.1:
        event.type = events_pb2.EVENT_TYPE_IDENTIFY
        event.traits.update({"plan": rng.choice(["free", "pro", "team"]), "city": rng.choice(["Berlin", "Lyon"])})
    elif roll < 0.25:
        event.type = events_pb2.EVENT_TYPE_PAGE
        event.name = rng.choice(["Home", "Shoes", "Checkout"])
        event.properties.update({"path": "/p/shoes", "title": "Shoes"})
    else:
        event.type = events_pb2.EVENT_TYPE_TRACK
        event.event = rng.choice(NAMES)
        event.properties.update(
            {
                "product_id": f"sku-{rng.randrange(5000)}",
                "price": round(rng.uniform(3, 300), 2),
                "quantity": rng.randrange(1, 4),
                "currency": "EUR",
                "category": rng.choice(["shoes", "books", "garden", "toys"]),
            }
        )
    resolved = events_pb2.ResolvedEvent(event=event, person_id=person, identifiers=[f"user_id:user-{person}"])
    return person, resolved.SerializeToString()


async def fill_resolved(bus: Bus) -> int:
    """EVENTS events as identity publishes them; returns the number of messages."""
    await bus.ensure_streams(events_resolved_stream())
    rng = random.Random(5)
    grouped: dict[int, list[bytes]] = {p: [] for p in range(PARTITIONS)}
    messages = 0
    pending: list[OutMessage] = []
    for n in range(EVENTS):
        person, payload = resolved_event(rng, n)
        bucket = grouped[partition_for(person, PARTITIONS)]
        bucket.append(payload)
        if len(bucket) == PER_MESSAGE or n == EVENTS - 1:
            for p, events in grouped.items():
                if events and (len(events) == PER_MESSAGE or n == EVENTS - 1):
                    batch = events_pb2.ResolvedEventBatch()
                    for raw in events:
                        batch.events.add().ParseFromString(raw)
                    pending.append(
                        OutMessage(
                            subject=subjects.events_resolved(p),
                            payload=batch.SerializeToString(),
                            msg_id=f"rb{messages}",
                        )
                    )
                    messages += 1
                    grouped[p] = []
        if len(pending) >= 200:
            assert all(r.ok for r in await bus.publisher.publish_batch(pending, trace_headers=False))
            pending = []
    if pending:
        assert all(r.ok for r in await bus.publisher.publish_batch(pending, trace_headers=False))
    return messages


async def bench_baseline(nats_url: str, warmup: int, total: int) -> float:
    async def nothing(batch) -> None:
        return None

    async with Bus.connect(nats_url, name="bench-baseline") as bus:

        async def count() -> int:
            return await acknowledged(bus.js, subjects.EVENTS_RESOLVED, "noop", PARTITIONS, total)

        tasks = [
            asyncio.create_task(
                bus.consumer(
                    ConsumerSpec(
                        stream=subjects.EVENTS_RESOLVED,
                        durable=subjects.partition_durable("noop", p),
                        filter_subjects=(subjects.events_resolved(p),),
                        batch_size=BATCH,
                        max_ack_pending=BATCH,
                    ),
                    nothing,
                ).run()
            )
            for p in range(PARTITIONS)
        ]
        t0 = await wait_count(count, warmup)
        t1 = await wait_count(count, total)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return (total - warmup) * PER_MESSAGE / (t1 - t0)


async def seed_definitions(store_url: str) -> None:
    async with open_store(store_url) as store:
        await store.bulk_write(
            [
                Put("profile_computed_traits", d["name"], {"definition": d, "defined_at": NOW, "state": "ready"})
                for d in DEFINITIONS
            ]
        )


async def bench_apply_and_read(
    nats_url: str, workdir: Path, warmup: int, total: int, *, reads: bool = True, cprofile: str | None = None
) -> tuple[float, float, dict]:
    store_url = f"sqlite:///{workdir / 'profile.db'}"
    await seed_definitions(store_url)
    settings = ProfileSettings(
        nats_url=nats_url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        auth_mode="none",
        partitions=PARTITIONS,
        batch_size=BATCH,
        store_url=store_url,
        log_level="WARNING",
    )
    async with serving(settings, profile_setup) as runtime, Bus.connect(nats_url, name="bench-reader") as reader:

        async def applied() -> int:
            return await acknowledged(reader.js, subjects.EVENTS_RESOLVED, "profile", PARTITIONS, total)

        t0 = await wait_count(applied, warmup)
        cpu, profiler = time.process_time(), cprofile and cProfile.Profile()
        if profiler:
            profiler.enable()
        t1 = await wait_count(applied, total)
        cpu = time.process_time() - cpu
        if profiler:
            profiler.disable()
            profiler.dump_stats(cprofile)
        rate = (total - warmup) * PER_MESSAGE / (t1 - t0)
        # This process's CPU time (the service in-process, its store's threads, the progress polls) per event
        cpu_us_per_event = round(cpu / ((total - warmup) * PER_MESSAGE) * 1e6, 1)
        if not reads:
            return rate, cpu_us_per_event, {}
        engine = runtime.parts["engine"]
        persons = sorted(engine.profiles)
        sample = engine.profiles[persons[0]]
        assert len(sample.view(now=time.time()).computed) == len(DEFINITIONS), "every definition applied"
        engine.hot.views.clear()
        read = await bench_reads(f"127.0.0.1:{runtime.grpc.port}", persons)
        read["answers_built"] = len(engine.hot.views)  # no profile changes while reading: one per person read
        read["split"] = await read_split(engine, persons)
    return rate, cpu_us_per_event, read


async def read_split(engine, persons: list[str]) -> dict:
    """The service's own work per GetProfile, step by step, on SPLIT_SAMPLE profiles (µs per call)."""
    sample = persons[:SPLIT_SAMPLE]
    now = time.time()

    def per_call(started: float) -> float:
        return round((time.perf_counter() - started) / len(sample) * 1e6, 2)

    started = time.perf_counter()
    profiles = [await engine.profile(person) for person in sample]
    lookup = per_call(started)
    started = time.perf_counter()
    for profile in profiles:
        profile.view(now=now)
    view = per_call(started)
    started = time.perf_counter()
    messages = [profile_message(profile, now=now, as_of=None, history=False) for profile in profiles]
    built = per_call(started)
    started = time.perf_counter()
    for message in messages:
        message.SerializeToString()
    serialise = per_call(started)
    views: dict = {}
    for profile in profiles:
        current_message(views, profile, now=now)
    started = time.perf_counter()
    for profile in profiles:
        current_message(views, profile, now=now)
    reused = per_call(started)
    return {
        "lookup_us": lookup,
        "view_us": view,
        "answer_built_us": built,  # view + the Profile message
        "answer_reused_us": reused,  # the answer built at the last change, still valid
        "serialise_us": serialise,
    }


async def bench_reads(address: str, persons: list[str]) -> dict:
    rng = random.Random(3)
    latencies: list[float] = []
    sizes: list[int] = []
    sample: list[bytes] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = profile_pb2_grpc.ProfileServiceStub(channel)
        queue = list(range(READS))

        async def worker() -> None:
            while queue:
                queue.pop()
                started = time.perf_counter()
                profile = await stub.GetProfile(profile_pb2.GetProfileRequest(person_id=rng.choice(persons)))
                latencies.append((time.perf_counter() - started) * 1000)
                if len(sizes) < 500:
                    sizes.append(profile.ByteSize())
                if not sample and profile.ByteSize() >= 400:
                    sample.append(profile.SerializeToString())

        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "rps": READS / elapsed,
        "cpu_us_per_call": round(cpu / READS * 1e6, 1),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "payload_bytes": int(sum(sizes) / len(sizes)),
        "sample": sample[0] if sample else b"",
    }


async def bench_echo(answer: bytes) -> dict:
    """A bare grpc.aio unary server answering every call with a stored profile's bytes. The client is the
    same as against the service (it serializes a GetProfileRequest and parses a Profile), so the gap is
    the service's own work: finding the profile, building the answer, and its interceptors."""
    rng = random.Random(3)
    return await bare_server_calls(
        answer,
        lambda: profile_pb2.GetProfileRequest(person_id=f"p_{rng.randrange(PERSONS):06d}"),
        calls=READS,
        in_flight=IN_FLIGHT,
        response_deserializer=profile_pb2.Profile.FromString,
    )


# --- freshness ------------------------------------------------------------------------------------------


def background_event(rng: random.Random, n: int) -> events_pb2.Event:
    event = events_pb2.Event(
        message_id=f"bg{n}",
        type=events_pb2.EVENT_TYPE_TRACK,
        event=rng.choice(NAMES),
        user_id=f"shopper-{rng.randrange(PERSONS)}",
    )
    event.properties.update({"product_id": f"sku-{rng.randrange(5000)}", "price": round(rng.uniform(3, 300), 2)})
    return event


async def load(collector, rate: int, seconds: float, stop: asyncio.Event) -> tuple[int, float]:
    """`rate` events/s into the collector over gRPC, in batches every 20 ms."""
    rng = random.Random(9)
    per_tick = max(1, rate // 50)
    sent = 0
    started = time.perf_counter()
    for tick in range(int(seconds * 50)):
        if stop.is_set():
            break
        events = [background_event(rng, sent + i) for i in range(per_tick)]
        await collector.Collect(collector_pb2.CollectRequest(write_key="wk_bench_profile_0001", events=events))
        sent += per_tick
        delay = started + (tick + 1) / 50 - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    return sent, sent / (time.perf_counter() - started)


async def probe_person(collector, profile) -> str:
    """Create the probe user (one identify) and find its person id through LookupProfile."""
    event = events_pb2.Event(message_id="probe0", type=events_pb2.EVENT_TYPE_IDENTIFY, user_id="probe-user")
    event.traits.update({"probe": 0})
    await collector.Collect(collector_pb2.CollectRequest(write_key="wk_bench_profile_0001", events=[event]))
    for _ in range(2000):
        try:
            found = await profile.LookupProfile(
                profile_pb2.LookupProfileRequest(identifier_type="user_id", identifier_value="probe-user")
            )
            return found.person_id
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.005)
    raise TimeoutError("the probe user never reached the profile service")


async def probe_freshness(collector, profile, person: str, seconds: float) -> list[tuple[int, float, float]]:
    """Every 100 ms, an identify with a new trait value: (n, accepted, visible in GetProfile) in ms of
    perf_counter() for each probe."""
    probes = []
    deadline = time.perf_counter() + seconds
    for n in range(1, 1_000_000):
        if time.perf_counter() >= deadline:
            break
        event = events_pb2.Event(message_id=f"probe{n}", type=events_pb2.EVENT_TYPE_IDENTIFY, user_id="probe-user")
        event.traits.update({"probe": n})
        sent = time.perf_counter()
        response = await collector.Collect(
            collector_pb2.CollectRequest(write_key="wk_bench_profile_0001", events=[event])
        )
        accepted = time.perf_counter()
        assert response.accepted == 1, response
        for _ in range(5000):
            got = await profile.GetProfile(profile_pb2.GetProfileRequest(person_id=person))
            if got.traits["probe"].value.number_value >= n:
                probes.append((n, accepted * 1000, time.perf_counter() * 1000))
                break
            await asyncio.sleep(POLL)
        await asyncio.sleep(max(0.0, 0.1 - (time.perf_counter() - sent)))
    return probes


def engine_histograms(metrics_port: int, service: str) -> dict[str, dict]:
    """The engine's stage histograms of one input (`service` label), summed over partitions:
    {stage: {"count", "sum", "buckets": {le: cumulative count}}}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out = {stage: {"count": 0.0, "sum": 0.0, "buckets": {}} for stage in ENGINE_STAGES}
    names = {name: stage for stage, name in ENGINE_STAGES.items()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("service") != service:
                continue
            for suffix, field in (("_bucket", "buckets"), ("_sum", "sum"), ("_count", "count")):
                if sample.name.endswith(suffix) and sample.name[: -len(suffix)] in names:
                    entry = out[names[sample.name[: -len(suffix)]]]
                    if field == "buckets":
                        le = float(sample.labels["le"])
                        entry["buckets"][le] = entry["buckets"].get(le, 0.0) + sample.value
                    else:
                        entry[field] += sample.value
    return out


def stage_split(before: dict[str, dict], after: dict[str, dict]) -> dict:
    """Per stage, over the batches between two scrapes: mean, and the bucket bounds holding p50 / p99."""
    split = {}
    for stage in ENGINE_STAGES:
        count = after[stage]["count"] - before[stage]["count"]
        if not count:
            continue
        buckets = sorted((le, n - before[stage]["buckets"].get(le, 0.0)) for le, n in after[stage]["buckets"].items())

        split[stage] = {
            "batches": int(count),
            "mean_ms": round((after[stage]["sum"] - before[stage]["sum"]) / count, 3),
            "p50_le_ms": next((le for le, n in buckets if n >= 0.5 * count), None),
            "p99_le_ms": next((le for le, n in buckets if n >= 0.99 * count), None),
        }
    return split


async def bench_freshness(nats_url: str, workdir: Path, rate: int) -> dict:
    for name in ("c", "i", "p"):
        (workdir / name).mkdir(parents=True, exist_ok=True)
    collector = CollectorProcess(nats_url, workdir / "c", write_key="wk_bench_profile_0001", source_id="bench")
    identity = IdentityProcess(nats_url, workdir / "i", store_url=f"sqlite:///{workdir / 'fi.db'}")
    with collector, identity:
        metrics_port = free_port()
        profile = ProfileProcess(
            nats_url,
            workdir / "p",
            store_url=f"sqlite:///{workdir / 'fp.db'}",
            CDP_IDENTITY_ADDRESS=identity.grpc_address,
            CDP_METRICS_PORT=str(metrics_port),
        )
        with profile:
            async with (
                grpc.aio.insecure_channel(collector.grpc_address) as c_channel,
                grpc.aio.insecure_channel(profile.grpc_address) as p_channel,
            ):
                collector_stub = collector_pb2_grpc.CollectorServiceStub(c_channel)
                profile_stub = profile_pb2_grpc.ProfileServiceStub(p_channel)
                stop = asyncio.Event()
                loader = asyncio.create_task(load(collector_stub, rate, FRESH_SECONDS + 5, stop))
                await asyncio.sleep(2)  # the load reaches a steady state first
                person = await probe_person(collector_stub, profile_stub)
                resolved_at: dict[str, float] = {}
                changed_at: dict[str, float] = {}

                async def on_resolved(msg) -> None:
                    for resolved in events_pb2.ResolvedEventBatch.FromString(msg.data).events:
                        if resolved.event.message_id.startswith("probe"):
                            resolved_at[resolved.event.message_id] = time.perf_counter() * 1000

                async def on_changed(msg) -> None:
                    for change in profile_pb2.ProfileChangedBatch.FromString(msg.data).changes:
                        for event_id in change.event_ids:  # "<source>:<message id>"
                            message_id = event_id.partition(":")[2]
                            if message_id.startswith("probe"):
                                changed_at.setdefault(message_id, time.perf_counter() * 1000)

                partition = partition_for(person, PARTITIONS)
                nc = await nats.connect(nats_url)
                await nc.subscribe(subjects.events_resolved(partition), cb=on_resolved)
                await nc.subscribe(subjects.profiles_changed(partition), cb=on_changed)
                before = await asyncio.to_thread(engine_histograms, metrics_port, "profile")
                probes = await probe_freshness(collector_stub, profile_stub, person, FRESH_SECONDS)
                after = await asyncio.to_thread(engine_histograms, metrics_port, "profile")
                stop.set()
                sent, load_rate = await loader
                await asyncio.sleep(0.5)  # the last probes' change messages
                await nc.close()
    latencies = [visible - accepted for _n, accepted, visible in probes]
    identity_stage, profile_stage, published = [], [], []
    for n, accepted, visible in probes:
        if f"probe{n}" in resolved_at:
            identity_stage.append(resolved_at[f"probe{n}"] - accepted)
            profile_stage.append(visible - resolved_at[f"probe{n}"])
        if f"probe{n}" in changed_at:
            published.append(changed_at[f"probe{n}"] - accepted)

    def p(values: list[float], q: float) -> float:
        return round(percentile(values, q), 2)

    return {
        "p50_ms": p(latencies, 50),
        "p99_ms": p(latencies, 99),
        "probes": len(latencies),
        "load_events": sent,
        "load_rate": round(load_rate),
        "stages": {
            "identity_p50_ms": p(identity_stage, 50),
            "identity_p99_ms": p(identity_stage, 99),
            "profile_visible_p50_ms": p(profile_stage, 50),
            "profile_visible_p99_ms": p(profile_stage, 99),
            "poll_ms": POLL * 1000,
            "change_published_p50_ms": p(published, 50),
            "change_published_p99_ms": p(published, 99),
            "profile_engine": stage_split(before, after),
        },
    }


@contextlib.asynccontextmanager
async def filled_stream(folder: Path):
    """A nats-server whose events.resolved holds the benchmark's stream, and the do-nothing consumer's rate over
    it: (url, warm-up messages, messages, baseline events/s); the server stopped on the way out."""
    server = NatsServer(folder / "nats")
    server.start()
    try:
        async with Bus.connect(server.url, name="bench-loader") as bus:
            messages = await fill_resolved(bus)
        warmup = WARMUP // PER_MESSAGE
        yield server.url, warmup, messages, await bench_baseline(server.url, warmup, messages)
    finally:
        server.stop()


async def measure() -> dict:
    """Every benchmark once, on the running loop (the service processes it starts use CDP_EVENT_LOOP)."""
    with tempfile.TemporaryDirectory() as tmp:
        async with filled_stream(Path(tmp)) as (url, warmup, messages, baseline):
            ours, cpu_us, reads = await bench_apply_and_read(url, Path(tmp), warmup, messages)
            sample = reads.pop("sample")
            print(
                f"apply: baseline {baseline:,.0f} events/s, profile {ours:,.0f} events/s ({cpu_us} µs CPU per event); "
                f"reads {reads}"
            )
            echo = await bench_echo(sample)
        fresh = {}
        for rate in FRESH_RATES:
            server = NatsServer(Path(tmp) / f"nats-{rate}")
            server.start()
            try:
                ours_fresh = await bench_freshness(server.url, Path(tmp) / f"fresh-{rate}", rate)
                hop = await bench_hop(
                    server.url, 10, rate=rate, payload=background_event(random.Random(1), 0).SerializeToString()
                )
            finally:
                server.stop()
            fresh[rate] = {"ours": ours_fresh, "hop": hop}
            print(f"freshness at {rate}/s: {ours_fresh}")
    per_call, echo_per_call = 1e6 / reads["rps"], 1e6 / echo["rps"]
    reads["split"].update(
        per_call_us=round(per_call, 1),
        echo_per_call_us=round(echo_per_call, 1),
        # client and grpc are the same on both sides (one process): the rest is the service's own
        service_extra_us=round(per_call - echo_per_call, 1),
        # the same in CPU time (client, server and grpc's threads): what other work on the machine skews least
        cpu_us_per_call=reads["cpu_us_per_call"],
        echo_cpu_us_per_call=echo["cpu_us_per_call"],
        service_extra_cpu_us=round(reads["cpu_us_per_call"] - echo["cpu_us_per_call"], 1),
        answers_reused=READS - reads["answers_built"],
    )
    return {
        "apply": ours,
        "apply_baseline": baseline,
        "apply_cpu_us_per_event": cpu_us,
        "reads": reads,
        "echo": echo,
        "fresh": fresh,
    }


async def measure_apply(cprofile: str | None) -> dict:
    """profile-apply alone (`--only apply`): the ratio and the CPU per event, nothing written to results/."""
    with tempfile.TemporaryDirectory() as tmp:
        async with filled_stream(Path(tmp)) as (url, warmup, messages, baseline):
            ours, cpu_us, _ = await bench_apply_and_read(
                url, Path(tmp), warmup, messages, reads=False, cprofile=cprofile
            )
    return {
        "events_per_s": round(ours),
        "baseline_events_per_s": round(baseline),
        "ratio": round(ours / baseline, 5),
        "cpu_us_per_event": cpu_us,
    }


def runtime_default_loop() -> str:
    loop = event_loop_factory("auto")()
    try:
        return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
    finally:
        loop.close()


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        choices=["apply"],
        help="run profile-apply alone and print its figures (events/s, ratio, CPU per event); writes no results",
    )
    parser.add_argument(
        "--loops", default=",".join(LOOPS), help="event loops to run on, comma-separated (default: %(default)s)"
    )
    parser.add_argument("--cprofile", help="with --only apply: a cProfile of the measured part, written to this file")
    # The pipeline's profile sees small batches (at 2,500 events/s, ~11 events a message and a message or two a
    # partition per round): each event then costs a write of its person's record, which 50 x 64 hides.
    parser.add_argument(
        "--per-message", type=int, default=PER_MESSAGE, help="with --only apply: events per ResolvedEventBatch"
    )
    parser.add_argument(
        "--batch-messages", type=int, default=BATCH, help="with --only apply: messages per fetch (both sides)"
    )
    parser.add_argument("--events", type=int, default=EVENTS, help="with --only apply: events in the stream")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    loops_run = tuple(args.loops.split(","))
    if args.only == "apply":
        global PER_MESSAGE, BATCH, EVENTS
        PER_MESSAGE, BATCH, EVENTS = args.per_message, args.batch_messages, args.events
        for name in loops_run:
            with asyncio.Runner(loop_factory=event_loop_factory(name)) as runner:
                print(name, runner.run(measure_apply(args.cprofile)), flush=True)
        return
    runs: dict[str, dict] = {}
    for name in loops_run:
        os.environ["CDP_EVENT_LOOP"] = name  # the service processes the freshness benchmark starts
        with asyncio.Runner(loop_factory=event_loop_factory(name)) as runner:
            runs[name] = runner.run(measure())
    default = runtime_default_loop()
    run = runs[default if default in runs else loops_run[-1]]
    loops = {
        "runtime_default": default,
        "apply_events_per_s": {n: round(r["apply"]) for n, r in runs.items()},
        "read_ratio": {n: round(r["reads"]["rps"] / r["echo"]["rps"], 4) for n, r in runs.items()},
        **{
            f"freshness_p99_ms_at_{rate}": {n: r["fresh"][rate]["ours"]["p99_ms"] for n, r in runs.items()}
            for rate in FRESH_RATES
        },
    }
    write_result(
        "profile-apply",
        value=run["apply"],
        unit="events/s",
        baseline=run["apply_baseline"],
        higher_is_better=True,
        params={
            "persons": PERSONS,
            "events": EVENTS,
            "warmup_events": WARMUP,
            "events_per_message": PER_MESSAGE,
            "computed_traits": len(DEFINITIONS),
            "partitions": PARTITIONS,
            "batch_messages": BATCH,
            "store": "sqlite",
            "baseline": "cdp_kit ConsumerRunner, same stream, 8 partition durables, handler does nothing",
            "target": ">= 20,000 events/s",
            "event_loops": loops,
        },
    )
    write_result(
        "profile-read",
        value=run["reads"]["rps"],
        unit="requests/s",
        baseline=run["echo"]["rps"],
        higher_is_better=True,
        params={
            "calls": READS,
            "in_flight": IN_FLIGHT,
            "ours": {k: v for k, v in run["reads"].items() if k != "split"},
            "echo": run["echo"],
            "stages": run["reads"]["split"],
            "baseline": "bare grpc.aio unary server answering with a payload of the same size",
            "target": "ratio >= 0.8, p99 <= 20 ms",
            "event_loops": loops,
        },
    )
    fresh = run["fresh"]
    write_result(
        "profile-freshness",
        value=fresh[FRESH_RATE]["ours"]["p99_ms"],
        unit="ms p99",
        baseline=fresh[FRESH_RATE]["hop"]["p99_ms"],
        higher_is_better=False,
        params={
            "load_events_per_s": FRESH_RATE,
            "ours": fresh[FRESH_RATE]["ours"],
            "hop": fresh[FRESH_RATE]["hop"],
            "at_other_rates": {str(rate): fresh[rate] for rate in FRESH_RATES if rate != FRESH_RATE},
            "path": "collector gRPC -> events.raw -> identity -> events.resolved -> profile -> GetProfile",
            "baseline": "one bare JetStream hop (publish -> push consumer) at the same load",
            "target": "p99 <= 100 ms at 5,000 events/s, <= 50 ms at 1,000 events/s",
            "event_loops": loops,
        },
    )


if __name__ == "__main__":
    main()
