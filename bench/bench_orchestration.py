"""Orchestration benchmarks, each beside its baseline measured in the same run.

orchestration-dispatch   p99 from a resolved event published on events.resolved.<p> to the action it
                         causes stored on actions.<channel>.<p>, while 5,000 events/s flow into an
                         orchestration process with 100 live journeys (99 entering on the everyday events
                         under a filter, about 2% of events entering one and waiting in a delay; one probe
                         journey sending at once, ~100 probes/s timed). Baseline: the p99 of one bare JetStream
                         hop at the same load. Target p99 <= 100 ms. The split (`params.stages`): publish_in
                         (publishing a tick's events, here), sourcing (event published -> stored in
                         orchestration.in, from its JetStream time which the action carries as decided_at),
                         then the service's engine per batch from its /metrics (bus wait, slot wait, decode,
                         apply = journeys and the arbiter, commit, publish, ack), and decided -> action
                         stored. Also in process (`params.apply_us_per_event`): µs to apply one
                         everyday event with the 100 journeys and with the probe journey alone, and the
                         same p50 / p99 at a rate this machine keeps up with (BENCH_ORCHESTRATION_LOW_RATE,
                         1000). The arbiter alone is orchestration-arbiter's figure.
orchestration-waiting    N instances waiting in a 30-day delay (each one durable timer): the service's RSS
orchestration-restart    holding them, and the time from a restart (SIGTERM, start) to serving (a probe
                         event's action stored; gRPC listening is in params). Baseline: the same service
                         with the same journeys and no instances: its RSS idle, and the same restart.
                         Targets (at N = 1,000,000): memory <= 2 GB, restart to serving <= 30 s.
orchestration-timers     lateness (due second -> fire stored) of 100,000 timers due within one minute, as
                         the service writes them (streams.schedule: JetStream message schedules on
                         ORCHESTRATION_TIMERS, which ORCHESTRATION sources), p99. Baseline: the same count of
                         the same payloads published plainly and then consumed at once (ms from the start of
                         consumption to each message's arrival: moving them without schedules). Target p99
                         <= 1.5 s.
orchestration-arbiter    proposals decided per second in process (`arbiter.decide`, which also decides the
                         held actions due at that instant, on person states with sends in the
                         last week, held actions, watched events, over rules with caps, quiet hours,
                         suppressions and an approval gate); baseline: a do-nothing decision taking the same
                         inputs. Higher is better.

    make bench-orchestration          # all of them; each writes bench/results/<name>.json
    BENCH_ORCHESTRATION_ONLY=dispatch,arbiter python bench/bench_orchestration.py
    BENCH_ORCHESTRATION_WAITING=1000000 python bench/bench_orchestration.py   # the full size

Sizes by environment: BENCH_ORCHESTRATION_RATE (5000), _LOW_RATE (1000), _SECONDS (10), _WAITING (100000),
_TIMERS (100000), _TIMER_WINDOW (60 s), _DECISIONS (20000). Each result's params say what ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import nats
import orjson
from google.protobuf import struct_pb2

sys.path.insert(0, str(Path(__file__).parent))
from bench_segmentation import process_cpu_seconds, scrape, stage_split
from benchlib import bench_hop, percentile, write_result

from cdp.events.v1 import events_pb2
from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp.orchestration.v1 import orchestration_pb2_grpc
from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import Bus, events_resolved_stream, partition_for, profiles_stream, segments_stream, subjects
from cdp_kit.natsserver import NatsServer, free_port
from cdp_kit.timestamps import from_seconds
from cdp_orchestration import streams
from cdp_testing.processes import ServiceProcess

RATE = int(os.environ.get("BENCH_ORCHESTRATION_RATE", "5000"))
LOW_RATE = int(os.environ.get("BENCH_ORCHESTRATION_LOW_RATE", "1000"))
SECONDS = float(os.environ.get("BENCH_ORCHESTRATION_SECONDS", "10"))
WAITING = int(os.environ.get("BENCH_ORCHESTRATION_WAITING", "100000"))
TIMERS = int(os.environ.get("BENCH_ORCHESTRATION_TIMERS", "100000"))
TIMER_WINDOW = float(os.environ.get("BENCH_ORCHESTRATION_TIMER_WINDOW", "60"))
DECISIONS = int(os.environ.get("BENCH_ORCHESTRATION_DECISIONS", "20000"))
ONLY = {s for s in os.environ.get("BENCH_ORCHESTRATION_ONLY", "").split(",") if s}
PARTITIONS = 8
PERSONS = 20_000
JOURNEYS = 100
TICK = 0.01
WARMUP_SECONDS = 3.0
EVENT_NAMES = ("Product Viewed", "Product Added", "Checkout Started", "Order Completed")
CATEGORIES = ("shoes", "books", "garden", "toys")
PROBE = "Bench Probe"


def wanted(name: str) -> bool:
    return not ONLY or name in ONLY


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- the service -----------------------------------------------------------------------------------------


def service(nats_url: str, workdir: Path, name: str, metrics_port: int = 0) -> ServiceProcess:
    return ServiceProcess(
        "orchestration",
        "cdp_orchestration",
        workdir,
        {
            "CDP_NATS_URL": nats_url,
            "CDP_STORE_URL": f"sqlite:///{workdir / f'{name}.db'}",
            "CDP_PARTITIONS": str(PARTITIONS),
            "CDP_METRICS_PORT": str(metrics_port),
        },
    )


async def upstream_streams(nats_url: str) -> None:
    """The streams orchestration sources, created as their publishers (identity, segmentation, profile) would."""
    async with Bus.connect(nats_url, name="bench-upstream") as bus:
        await bus.ensure_streams(events_resolved_stream(), segments_stream(), profiles_stream())


def probe_journey() -> dict:
    """Sends at once on every probe event; the body carries the probe's number, to find its send time."""
    return {
        "id": "probe",
        "name": "Probe",
        "priority": 90,
        "category": "reminder",
        "entry": {"event": PROBE},
        "reentry": "always",
        "nodes": [
            {
                "id": "send",
                "type": "action",
                "channel": "email",
                "purpose": "Marketing",
                "template": {"subject": "probe", "body": "{{ entry.seq }}"},
            }
        ],
    }


def everyday_journey(i: int) -> dict:
    """Enters on an everyday event under a filter (about one such event in 300 of its category), waits a day,
    sends; leaves on a purchase."""
    return {
        "id": f"j{i:02d}",
        "name": f"Journey {i}",
        "priority": i % 60,
        "category": "offer" if i % 2 else "reminder",
        "entry": {
            "event": EVENT_NAMES[i % 4],
            "where": f'properties.category = "{CATEGORIES[(i // 4) % 4]}" and properties.price > 299',
        },
        "reentry": {"cooldown": "7d"},
        "exit": [{"id": "purchased", "event": "Order Completed"}],
        "nodes": [
            {"id": "wait", "type": "delay", "duration": "1d", "next": "send"},
            {
                "id": "send",
                "type": "action",
                "channel": "email",
                "purpose": "Marketing",
                "template": {"subject": "{{ traits.first_name }}", "body": "hello"},
            },
        ],
    }


def waiting_journey() -> dict:
    return {
        "id": "cart",
        "name": "Cart",
        "priority": 50,
        "category": "reminder",
        "entry": {"event": "Cart Abandoned"},
        "exit": [{"id": "purchased", "event": "Order Completed"}],
        "nodes": [
            {"id": "wait", "type": "delay", "duration": "30d", "next": "send"},
            {
                "id": "send",
                "type": "action",
                "channel": "email",
                "purpose": "Marketing",
                "template": {"subject": "your cart", "body": "{{ entry.cart_url }}"},
            },
        ],
    }


async def publish_journeys(address: str, documents: list[dict]) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = orchestration_pb2_grpc.OrchestrationServiceStub(channel)
        for document in documents:
            definition = pb.JourneyDefinition(json=json.dumps(document))
            await stub.CreateJourney(pb.CreateJourneyRequest(definition=definition), timeout=60)
            await stub.PublishJourney(pb.PublishJourneyRequest(journey_id=document["id"]), timeout=60)


async def backlog(js) -> tuple[int, int]:
    """(messages stored in ORCHESTRATION, of which the engine has not yet acknowledged)."""
    info = await js.stream_info(subjects.ORCHESTRATION)
    remaining = 0
    for p in range(PARTITIONS):
        try:
            consumer = await js.consumer_info(subjects.ORCHESTRATION, subjects.partition_durable("orchestration", p))
        except Exception:
            return info.state.messages, info.state.messages
        remaining += consumer.num_pending + consumer.num_ack_pending
    return info.state.messages, remaining


async def drained(js, at_least: int, timeout: float = 900) -> float:
    """Wait until ORCHESTRATION holds `at_least` messages and the engine acknowledged them all."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stored, remaining = await backlog(js)
        if stored >= at_least and remaining == 0:
            return time.perf_counter()
        await asyncio.sleep(0.1)
    raise TimeoutError(f"orchestration did not apply {at_least} inputs in {timeout} s (backlog {remaining})")


def profile_change(person: str, at: float) -> profile_pb2.ProfileChanged:
    change = profile_pb2.ProfileChanged(person_id=person, cause="api", at=from_seconds(at))
    change.traits["first_name"].CopyFrom(struct_pb2.Value(string_value=f"P{person[-4:]}"))
    change.traits["email"].CopyFrom(struct_pb2.Value(string_value=f"{person}@example.com"))
    change.traits["timezone"].CopyFrom(struct_pb2.Value(string_value="UTC"))
    change.consent.update({"purpose:Marketing": True})
    return change


def applied(person: str, message_id: str, at: float) -> tuple[str, bytes]:
    """The profile's change for an event it applied (listing its id), as profile publishes it: orchestration
    decides an action on fields at least as new as the event that triggered it, so the probe's send waits
    for this."""
    change = profile_pb2.ProfileChanged(person_id=person, cause="event", at=from_seconds(at))
    change.event_ids.append(f":{message_id}")  # as profile lists an event: "<source id>:<message id>", no source here
    batch = profile_pb2.ProfileChangedBatch(changes=[change])
    return subjects.profiles_changed(partition_for(person, PARTITIONS)), batch.SerializeToString()


def event(person: str, name: str, message_id: str, at: float, properties: dict) -> events_pb2.ResolvedEvent:
    message = events_pb2.Event(
        message_id=message_id, type=events_pb2.EVENT_TYPE_TRACK, event=name, timestamp=from_seconds(at)
    )
    message.properties.update(properties)
    return events_pb2.ResolvedEvent(event=message, person_id=person)


def everyday_properties(rng: random.Random) -> dict:
    return {
        "product_id": f"sku-{rng.randrange(5000)}",
        "price": round(rng.uniform(3, 300), 2),
        "quantity": rng.randrange(1, 4),
        "currency": "EUR",
        "category": rng.choice(CATEGORIES),
    }


# --- 1. dispatch ---------------------------------------------------------------------------------------------


async def load_profiles(nats_url: str, persons: list[str]) -> None:
    """The persons' profiles (names, addresses, consent), as profile publishes them, applied."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    now = time.time()
    batches: dict[int, profile_pb2.ProfileChangedBatch] = {}
    for person in persons:
        batches.setdefault(partition_for(person, PARTITIONS), profile_pb2.ProfileChangedBatch()).changes.append(
            profile_change(person, now)
        )
    published = 0
    for p, batch in batches.items():
        for start in range(0, len(batch.changes), 500):
            chunk = profile_pb2.ProfileChangedBatch(changes=batch.changes[start : start + 500])
            await js.publish(subjects.profiles_changed(p), chunk.SerializeToString())
            published += 1
    await drained(js, published)
    await nc.close()


async def bench_dispatch(nats_url: str, metrics_url: str, pid: int, rate: int, seed: int) -> dict:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    persons = [f"p_{i:06d}" for i in range(PERSONS)]
    now = time.time()
    rng = random.Random(seed)
    per_tick = int(rate * TICK)
    ticks = int((WARMUP_SECONDS + SECONDS) / TICK)
    plan: list[tuple[list[tuple[str, bytes]], int]] = []  # per tick: messages, and the probe's number
    stamp = now
    for tick in range(ticks):
        by_partition: dict[int, events_pb2.ResolvedEventBatch] = {}
        for n in range(per_tick - 1):
            person = rng.choice(persons)
            stamp += 1e-4
            name = rng.choice(EVENT_NAMES)
            resolved = event(person, name, f"e-{seed}-{tick}-{n}", stamp, everyday_properties(rng))
            by_partition.setdefault(partition_for(person, PARTITIONS), events_pb2.ResolvedEventBatch()).events.append(
                resolved
            )
        person = rng.choice(persons)
        seq = seed * 1_000_000 + tick  # apart from the other runs' probes, which the ACTIONS stream also holds
        probe = event(person, PROBE, f"probe-{seq}", stamp, {"seq": seq})
        by_partition.setdefault(partition_for(person, PARTITIONS), events_pb2.ResolvedEventBatch()).events.append(probe)
        messages = [(subjects.events_resolved(p), b.SerializeToString()) for p, b in by_partition.items()]
        plan.append(([*messages, applied(person, f"probe-{seq}", stamp)], seq))

    sent_at: dict[int, tuple[float, bool]] = {}
    results: list[tuple[float, float, float]] = []  # (sent, decided, stored) wall seconds
    timed = sum(1 for i in range(ticks) if i * TICK > WARMUP_SECONDS)  # the ticks `measuring` below
    complete = asyncio.Event()

    async def on_action(msg) -> None:
        action = pb.ActionMessage.FromString(msg.data)
        if action.journey_id != "probe":
            return
        entry = sent_at.get(int(float(action.content["body"])))  # a JSON number: "12.0"
        if entry is not None and entry[1]:
            stored = msg.metadata.timestamp.timestamp()
            results.append((entry[0], action.decided_at.ToMicroseconds() / 1e6, stored))
            if len(results) >= timed:
                complete.set()

    subscription = await js.subscribe(f"{subjects.ACTIONS_PREFIX}.>", cb=on_action, ordered_consumer=True)
    publish_in: list[float] = []
    scrapes: list = []
    cpu: list[tuple[float, float]] = []
    timed_events = 0
    started = time.perf_counter()
    for i, (messages, seq) in enumerate(plan):
        tick = started + i * TICK
        await asyncio.sleep(max(0.0, tick - time.perf_counter()))
        measuring = tick > started + WARMUP_SECONDS
        if measuring and not scrapes:
            scrapes.append(asyncio.create_task(asyncio.to_thread(scrape, metrics_url)))
            cpu.append((process_cpu_seconds(pid), time.perf_counter()))
        if measuring:
            timed_events += per_tick
        sent_at[seq] = (time.time(), measuring)
        before = time.perf_counter()
        await asyncio.gather(*(js.publish(subject, payload) for subject, payload in messages))
        if measuring:
            publish_in.append((time.perf_counter() - before) * 1000)
    elapsed = time.perf_counter() - started
    # A service slower than the load works through its backlog after the last publish: wait for it.
    caught_up = await drained(js, 0, timeout=300)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(complete.wait(), 10)
    cpu.append((process_cpu_seconds(pid), time.perf_counter()))
    after = await asyncio.to_thread(scrape, metrics_url)
    await subscription.unsubscribe()
    await nc.close()
    latencies = [(stored - sent) * 1000 for sent, _decided, stored in results]
    sourcing = [(decided - sent) * 1000 for sent, decided, _stored in results]
    engine = [(stored - decided) * 1000 for _sent, decided, stored in results]
    stages = {
        "publish_in": {"p50_ms": percentile(publish_in, 50), "p99_ms": percentile(publish_in, 99)},
        "sourcing": {"p50_ms": percentile(sourcing, 50), "p99_ms": percentile(sourcing, 99)},
        **stage_split(await scrapes[0], after),
        "decided_to_stored": {"p50_ms": percentile(engine, 50), "p99_ms": percentile(engine, 99)},
    }
    used, wall = cpu[1][0] - cpu[0][0], cpu[1][1] - cpu[0][1]
    return {
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "probes_timed": timed,
        "probes_stored": len(results),
        "events": len(plan) * per_tick,
        "rate": round(len(plan) * per_tick / elapsed),
        # Events the service applied per second, from the first publish to its backlog empty.
        "applied_rate": round(len(plan) * per_tick / (caught_up - started)),
        "stages": stages,
        "process": {"cpu_ms_per_1000_events": round(used / timed_events * 1e6, 1), "cores": round(used / wall, 2)},
    }


async def run_dispatch(per_event: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        server = NatsServer(workdir / "nats")
        server.start()
        try:
            await upstream_streams(server.url)
            metrics_port = free_port()
            with service(server.url, workdir, "dispatch", metrics_port) as proc:
                await publish_journeys(
                    proc.grpc_address, [probe_journey(), *(everyday_journey(i) for i in range(JOURNEYS - 1))]
                )
                await load_profiles(server.url, [f"p_{i:06d}" for i in range(PERSONS)])
                metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
                load = load_average()
                ours = await bench_dispatch(server.url, metrics_url, proc.proc.pid, RATE, 1)
                # The same at a rate this machine's service keeps up with, to tell queueing from the path.
                low = await bench_dispatch(server.url, metrics_url, proc.proc.pid, LOW_RATE, 2)
            hop = await bench_hop(server.url, SECONDS, rate=RATE, payload=b"x" * 700)
        finally:
            server.stop()
    print(f"dispatch: {ours}; at {LOW_RATE}/s: {low}; bare hop {hop}")
    write_result(
        "orchestration-dispatch",
        value=ours["p99_ms"],
        unit="ms p99",
        baseline=hop["p99_ms"],
        higher_is_better=False,
        params={
            "rate": RATE,
            "achieved_rate": ours["rate"],
            "applied_rate": ours["applied_rate"],
            "seconds": SECONDS,
            "journeys": JOURNEYS,
            "persons": PERSONS,
            "partitions": PARTITIONS,
            "p50_ms": ours["p50_ms"],
            "probes_timed": ours["probes_timed"],
            "probes_stored": ours["probes_stored"],
            "hop_p50_ms": hop["p50_ms"],
            f"at_{LOW_RATE}_per_s": {
                key: low[key] for key in ("p50_ms", "p99_ms", "probes_timed", "probes_stored", "applied_rate", "stages")
            },
            "baseline": "one bare JetStream hop (publish -> push consumer) at the same load",
            "stages": ours["stages"],
            "process": ours["process"],
            # In process, per everyday event: the apply stage with all journeys, and with the probe journey
            # alone (the difference is the entry checks of the 99 others).
            "apply_us_per_event": per_event,
            "stages_note": "publish_in = publishing a tick's events into EVENTS_RESOLVED (here); sourcing = "
            "event published -> its copy stored in orchestration.in (the action's decided_at is that JetStream "
            "time); then the engine per batch from /metrics (bus_wait, slot_wait, decode, apply = journeys and "
            "arbiter, commit = store writes and checkpoint durable, publish = actions and timers stored, ack; "
            "mean exact, p50/p99 interpolated within buckets); decided_to_stored = orchestration.in stored -> "
            "action stored on ACTIONS (the engine's whole path for the probe's batch)",
            "load_average": load,
            "target": "p99 <= 100 ms",
        },
    )


def bench_per_event(journey_count: int) -> float:
    """µs to apply one everyday event in process (`OrchestrationLogic.apply` on a memory store, no bus), with
    `journey_count` live journeys: the engine's apply stage without the load around it."""
    from cdp_kit.storage import open_store
    from cdp_orchestration.domain import lifecycle
    from cdp_orchestration.domain.document import parse_journey
    from cdp_orchestration.domain.rules import Rules
    from cdp_orchestration.engine import OrchestrationLogic
    from cdp_orchestration.inputs import decode
    from cdp_orchestration.journeys import Journeys

    async def run() -> float:
        async with open_store("memory://") as store:
            journeys = Journeys(store)
            documents = [probe_journey(), *(everyday_journey(i) for i in range(JOURNEYS - 1))][:journey_count]
            for document in documents:
                await journeys.save(lifecycle.publish(lifecycle.create(parse_journey(document))))
            await journeys.load()
            logic = OrchestrationLogic(store, journeys, Rules(), partitions=1)
            persons = [f"p_{i:06d}" for i in range(2000)]
            now = time.time()
            profiles = profile_pb2.ProfileChangedBatch(changes=[profile_change(p, now) for p in persons])
            await logic.apply(0, [decode(subjects.PROFILES, "", profiles.SerializeToString(), now)])
            rng = random.Random(5)
            batches = []
            for k in range(40):
                batch = events_pb2.ResolvedEventBatch()
                for n in range(250):
                    name = rng.choice(EVENT_NAMES)
                    batch.events.append(event(rng.choice(persons), name, f"e-{k}-{n}", now, everyday_properties(rng)))
                batches.append(decode(subjects.EVENTS_RESOLVED, "", batch.SerializeToString(), now))
            for inputs in batches[:10]:
                await logic.apply(0, [inputs])
            started = time.perf_counter()
            for inputs in batches[10:]:
                await logic.apply(0, [inputs])
            return (time.perf_counter() - started) / (30 * 250) * 1e6

    return asyncio.run(run())


# --- 2. waiting instances ------------------------------------------------------------------------------------


async def probe_once(nats_url: str, person: str, seq: int) -> float:
    """Publish a probe event and return perf_counter() when its action is stored (the person's profile, with
    consent, must be applied already: sources interleave, so one published now might land after the event)."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    arrived = asyncio.get_running_loop().create_future()

    async def on_action(msg) -> None:
        action = pb.ActionMessage.FromString(msg.data)
        if action.journey_id == "probe" and float(action.content["body"]) == seq and not arrived.done():
            arrived.set_result(time.perf_counter())

    subscription = await js.subscribe(f"{subjects.ACTIONS_PREFIX}.>", cb=on_action, ordered_consumer=True)
    batch = events_pb2.ResolvedEventBatch(events=[event(person, PROBE, f"probe-{seq}", time.time(), {"seq": seq})])
    await js.publish(subjects.events_resolved(partition_for(person, PARTITIONS)), batch.SerializeToString())
    await js.publish(*applied(person, f"probe-{seq}", time.time()))
    try:
        return await asyncio.wait_for(arrived, 120)
    finally:
        await subscription.unsubscribe()
        await nc.close()


async def restart(proc: ServiceProcess, nats_url: str, seq: int) -> dict:
    """SIGTERM, start again: seconds to gRPC listening and to a probe's action stored, and the RSS then."""
    proc.stop()
    started = time.perf_counter()
    proc.start(timeout=300)
    listening = time.perf_counter()
    # The probe's person has a profile stored already: the probe's send is the service's first answer to
    # something new after the restart.
    served = await probe_once(nats_url, f"probe-person-{seq}", seq)
    return {
        "listening_s": round(listening - started, 3),
        "serving_s": round(served - started, 3),
        "rss_mb_after_restart": round(rss_mb(proc.proc.pid), 1),
    }


async def run_waiting_one(instances: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        server = NatsServer(workdir / "nats")
        server.start()
        try:
            await upstream_streams(server.url)
            with service(server.url, workdir, "waiting") as proc:
                await publish_journeys(proc.grpc_address, [probe_journey(), waiting_journey()])
                nc = await nats.connect(server.url)
                js = nc.jetstream()
                profiles = profile_pb2.ProfileChangedBatch(
                    changes=[profile_change(f"probe-person-{n}", time.time()) for n in range(2)]
                )
                for change in profiles.changes:
                    one = profile_pb2.ProfileChangedBatch(changes=[change])
                    subject = subjects.profiles_changed(partition_for(change.person_id, PARTITIONS))
                    await js.publish(subject, one.SerializeToString())
                await drained(js, 2)
                await probe_once(server.url, "probe-person-0", 0)  # every path warm, nothing waiting
                stored_before, _ = await backlog(js)
                loaded_s = 0.0
                if instances:
                    published = 0
                    now = time.time()
                    started = time.perf_counter()
                    pending = []
                    for start in range(0, instances, 500):
                        batches: dict[int, events_pb2.ResolvedEventBatch] = {}
                        for n in range(start, min(instances, start + 500)):
                            person = f"w_{n:07d}"
                            batches.setdefault(
                                partition_for(person, PARTITIONS), events_pb2.ResolvedEventBatch()
                            ).events.append(event(person, "Cart Abandoned", f"cart-{n}", now, {"cart_url": "u"}))
                        for p, batch in batches.items():
                            pending.append(js.publish(subjects.events_resolved(p), batch.SerializeToString()))
                            published += 1
                        if len(pending) >= 64:
                            await asyncio.gather(*pending)
                            pending = []
                    await asyncio.gather(*pending)
                    await drained(js, stored_before + published, timeout=1800)
                    loaded_s = time.perf_counter() - started
                await asyncio.sleep(2)
                timers = (await js.stream_info(subjects.ORCHESTRATION_TIMERS)).state.messages
                await nc.close()
                held = {"rss_mb": round(rss_mb(proc.proc.pid), 1), "timers_pending": timers}
                restarted = await restart(proc, server.url, 1)
        finally:
            server.stop()
    return {**held, **restarted, "load_s": round(loaded_s, 1)}


async def run_waiting() -> None:
    load = load_average()
    idle = await run_waiting_one(0)
    print(f"waiting, none: {idle}")
    held = await run_waiting_one(WAITING)
    print(f"waiting, {WAITING:,}: {held}")
    common = {
        "instances": WAITING,
        "store": "sqlite",
        "hot_persons": 100_000,
        "partitions": PARTITIONS,
        "load_average": load,
        "held": held,
        "idle": idle,
        "note": "instances enter through the bus (one Cart Abandoned event each, a 30-day delay: one durable "
        "timer each); RSS = VmRSS of the service process once they are applied; restart = SIGTERM, start, "
        "then listening (gRPC bound: set-up done) and serving (a probe event's action stored)",
    }
    write_result(
        "orchestration-waiting",
        value=held["rss_mb"],
        unit="MB RSS",
        baseline=idle["rss_mb"],
        higher_is_better=False,
        params={**common, "target": "<= 2048 MB at 1,000,000 instances"},
    )
    write_result(
        "orchestration-restart",
        value=held["serving_s"],
        unit="s restart to serving",
        baseline=idle["serving_s"],
        higher_is_better=False,
        params={**common, "target": "<= 30 s at 1,000,000 instances"},
    )


# --- 3. timers ---------------------------------------------------------------------------------------------


async def read_all(js, stream: str, subject: str, count: int, timeout: float) -> list[tuple[float, float, dict]]:
    """(stored, arrived, payload) of the first `count` messages of `subject` in `stream`, via a pull consumer."""
    consumer = await js.pull_subscribe(subject, stream=stream)
    out: list[tuple[float, float, dict]] = []
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        try:
            messages = await consumer.fetch(min(1000, count - len(out)), timeout=2)
        except nats.errors.TimeoutError:
            continue
        arrived = time.time()
        for msg in messages:
            out.append((msg.metadata.timestamp.timestamp(), arrived, orjson.loads(msg.data)))
        await asyncio.gather(*(msg.ack() for msg in messages))
    await consumer.unsubscribe()
    return out


async def bench_timers(nats_url: str) -> dict:
    async with Bus.connect(nats_url, name="bench-timers") as bus:
        js = bus.js
        await streams.ensure_streams(js)  # ORCHESTRATION sources the fires, as in production
        lead = max(10.0, TIMERS / 6000)  # time to publish them all before the first is due
        first_due = int(time.time() + lead) + 1
        rng = random.Random(13)
        plan = []
        for n in range(TIMERS):
            person = f"t_{n:07d}"
            due = float(first_due + int(rng.random() * TIMER_WINDOW))
            timer_id = f"timer-{n}"
            payload = {"t": timer_id, "i": f"i-{n}", "p": person, "d": due}
            plan.append(streams.schedule(partition_for(person, PARTITIONS), timer_id, due, payload))
        load = load_average()
        started = time.perf_counter()
        for start in range(0, TIMERS, 1000):
            results = await bus.publisher.publish_batch(plan[start : start + 1000])
            assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
        publish_s = time.perf_counter() - started
        late_publish = time.time() > first_due
        await asyncio.sleep(max(0.0, first_due + TIMER_WINDOW + 3 - time.time()))
        fired = await read_all(
            js, subjects.ORCHESTRATION_TIMERS, f"{subjects.ORCHESTRATION_FIRED_PREFIX}.>", TIMERS, timeout=120
        )
        lateness = [(stored - body["d"]) * 1000 for stored, _arrived, body in fired]
        early = sum(1 for x in lateness if x < 0)

        # The baseline: the same payloads published without schedules, then consumed at once.
        await js.add_stream(name="BENCH_PLAIN", subjects=["plain.>"])
        plain = [type(m)(subject=f"plain.{m.subject.split('.')[2]}", payload=m.payload, msg_id=m.msg_id) for m in plan]
        for start in range(0, TIMERS, 1000):
            await bus.publisher.publish_batch(plain[start : start + 1000])
        consume_started = time.time()
        delivered = await read_all(js, "BENCH_PLAIN", "plain.>", TIMERS, timeout=300)
        plain_ms = [(arrived - consume_started) * 1000 for _stored, arrived, _body in delivered]
        await js.delete_stream("BENCH_PLAIN")
    return {
        "p50_ms": percentile(lateness, 50),
        "p99_ms": percentile(lateness, 99),
        "max_ms": max(lateness, default=float("nan")),
        "fired": len(fired),
        "early": early,
        "publish_s": round(publish_s, 1),
        "published_late": late_publish,
        "plain_p50_ms": percentile(plain_ms, 50),
        "plain_p99_ms": percentile(plain_ms, 99),
        "plain_delivered": len(delivered),
        "load_average": load,
    }


async def run_timers() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats")
        server.start()
        try:
            result = await bench_timers(server.url)
        finally:
            server.stop()
    print(f"timers: {result}")
    write_result(
        "orchestration-timers",
        value=result["p99_ms"],
        unit="ms p99 lateness",
        baseline=result["plain_p99_ms"],
        higher_is_better=False,
        params={
            "timers": TIMERS,
            "window_s": TIMER_WINDOW,
            "fired": result["fired"],
            "early": result["early"],
            "p50_ms": result["p50_ms"],
            "max_ms": result["max_ms"],
            "publish_s": result["publish_s"],
            "published_after_first_due": result["published_late"],
            "plain_p50_ms": result["plain_p50_ms"],
            "plain_delivered": result["plain_delivered"],
            "load_average": result["load_average"],
            "ours": "streams.schedule messages (Nats-Schedule @at, whole seconds) on ORCHESTRATION_TIMERS with "
            "ORCHESTRATION sourcing the fires; lateness = the fire's JetStream time - its due second",
            "baseline": "the same payloads published to a plain stream, then one pull consumer reading them all "
            "(1000 per fetch): ms from the start of consumption to each message's arrival",
            "target": "p99 <= 1500 ms",
        },
    )


# --- 4. arbiter ------------------------------------------------------------------------------------------------


def arbiter_inputs(count: int) -> tuple[list[tuple], object]:
    from cdp_orchestration.domain.arbiter import Held, PersonState, ProposedAction, Sent
    from cdp_orchestration.domain.rules import parse_rules
    from cdp_orchestration.domain.view import PersonView

    rules = parse_rules(
        {
            "timezone": "UTC",
            "caps": [
                {"id": "email-daily", "channel": "email", "per": "day", "limit": 2},
                {"id": "sms-weekly", "channel": "sms", "per": "week", "limit": 2},
                {"id": "all-weekly", "per": "week", "limit": 6},
            ],
            "quiet_hours": {"from": "21:00", "to": "08:00", "channels": ["email", "sms", "push"]},
            "suppressions": [
                {
                    "id": "no-offer-after-ticket",
                    "categories": ["offer"],
                    "after_event": "Support Ticket Opened",
                    "within": "1d",
                },
                {
                    "id": "no-promo-at-risk",
                    "categories": ["promotion"],
                    "condition": "scores.churn_risk > 0.8 and traits.open_tickets > 0",
                },
            ],
            "approval": {"above": 100, "expires_after": "2d"},
        }
    )
    rng = random.Random(17)
    zones = ["Europe/Berlin", "America/New_York", "Asia/Tokyo", "UTC", "Australia/Sydney"]
    channels = ["email", "sms", "push", "inapp"]
    now = 1_796_000_000.0
    inputs = []
    for n in range(count):
        person = f"p{n}"
        sends = tuple(
            Sent(now - rng.uniform(0, 8 * 86400), rng.choice(channels), f"old-{n}-{k}")
            for k in range(rng.randrange(0, 8))
        )
        sends = tuple(sorted(sends, key=lambda s: s.at))
        held = []
        for k in range(rng.choice([0, 0, 0, 1, 2])):
            action = ProposedAction(
                f"held-{n}-{k}", person, f"j{k}", 1, f"i-h{k}", "send", "email", "reminder", "Marketing", 10, now - 600
            )
            held.append(Held(action, now + rng.uniform(-300, 36_000)))
        last_seen = {"Support Ticket Opened": now - rng.uniform(0, 5 * 86400)} if rng.random() < 0.2 else {}
        state = PersonState(person, sent=sends, deferred=tuple(held), last_seen=last_seen)
        fields = {
            "traits.timezone": rng.choice(zones),
            "traits.email": f"{person}@example.com",
            "traits.open_tickets": float(rng.randrange(0, 2)),
            "consent.purpose:Marketing": rng.random() < 0.9,
            "scores.churn_risk": rng.random(),
            "scores.conversion": rng.random(),
        }
        view = PersonView(person, fields)
        action = ProposedAction(
            f"a-{n}",
            person,
            f"j{rng.randrange(100)}",
            1,
            f"i-{n}",
            "send",
            rng.choice(channels),
            rng.choice(["reminder", "offer", "promotion", "transactional"]),
            "Marketing",
            rng.randrange(100),
            now,
            value=rng.choice([None, 20.0, 150.0]),
            rank_by="scores.conversion" if rng.random() < 0.5 else None,
        )
        inputs.append((state, action, view, now + rng.uniform(0, 86400)))
    return inputs, rules


def decisions_per_second(decide: Callable, inputs: list[tuple], rules: object) -> float:
    best = 0.0
    for _ in range(3):
        started = time.perf_counter()
        for state, action, view, now in inputs:
            decide(state, action, view, rules, now)
        best = max(best, len(inputs) / (time.perf_counter() - started))
    return best


def run_arbiter() -> None:
    from collections import Counter

    from cdp_orchestration.domain import arbiter

    inputs, rules = arbiter_inputs(DECISIONS)

    def nothing(state, action, view, rules, now):
        return arbiter.Ruling(state, ())

    kinds = Counter(d.kind.value for s, a, v, n in inputs for d in arbiter.decide(s, a, v, rules, n).decisions)
    load = load_average()
    ours = decisions_per_second(arbiter.decide, inputs, rules)
    baseline = decisions_per_second(nothing, inputs, rules)
    print(f"arbiter: {ours:,.0f} decisions/s, do-nothing {baseline:,.0f}/s; {dict(kinds)}")
    write_result(
        "orchestration-arbiter",
        value=ours,
        unit="decisions/s",
        baseline=baseline,
        higher_is_better=True,
        params={
            "persons": DECISIONS,
            "repeat": "best of 3",
            "us_per_decision": round(1e6 / ours, 1),
            "decisions_by_kind": dict(kinds),
            "rules": "3 caps (day, week, overall), quiet hours 21:00-08:00 on 3 channels, 2 suppressions (after "
            "an event, on a condition), approval above 100",
            "states": "0-7 sends in the last 8 days, 0-2 deferred actions (some due), a watched event for 1 in 5; "
            "5 time zones; 90% with consent; rank_by for half",
            "baseline": "a do-nothing decide(state, action, view, rules, now) returning the state unchanged",
            "load_average": load,
        },
    )


def main() -> None:
    if wanted("arbiter"):
        run_arbiter()
    if wanted("dispatch"):
        per_event = {f"{n}_journeys": round(bench_per_event(n), 1) for n in (JOURNEYS, 1)}
        print(f"apply per event: {per_event} µs")
        asyncio.run(run_dispatch(per_event))
    if wanted("waiting"):
        asyncio.run(run_waiting())
    if wanted("timers"):
        asyncio.run(run_timers())


if __name__ == "__main__":
    main()
