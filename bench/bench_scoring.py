"""bench/scoring — the scoring service's hot paths, each against a raw onnxruntime session (or one bare
JetStream hop) on the same model, rows and machine, in the same run.

scoring-person     µs per person on the in-process path the engine takes for one person (feature vector
                   assembled from profile fields by the spec, then inference, then the scores read out),
                   against raw onnxruntime batch-1 inference on the same pre-built rows. Target ratio <= 2.
scoring-batch      rows/s through gRPC ScoreBatch (1,024 packed float32 rows per call, one call in flight,
                   the service in its own process), against raw onnxruntime on the same 1,024-row batches.
                   Target ratio >= 0.5.
scoring-freshness  p99 from a profile change published on profiles.changed to the person's new score
                   arriving on scores.updated, with 5,000 changes/s flowing through a scoring process;
                   baseline: the p99 of one bare JetStream hop at the same load. Target p99 <= 100 ms.
                   `params.stages` splits a batch's time stage by stage (mean and p99 per batch, over the
                   measured seconds, from the process' own histograms on /metrics): bus wait (stored by
                   JetStream -> fetched), slot wait, decode, apply (of which round wait and inference),
                   commit (outbox + checkpoint durable), publish, acknowledge.

Every path scores the shipped churn_risk model (LightGBM via ONNX), the same bytes for ours and raw.

    make bench-scoring     # writes bench/results/scoring-person.json, scoring-batch.json, scoring-freshness.json
    CDP_BENCH_RATE=1000 .venv/bin/python bench/bench_scoring.py   # freshness at another rate (target: 5,000/s)
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import nats
import numpy as np
import onnxruntime as ort
from benchlib import bench_hop, percentile, write_result

from cdp.profile.v1 import profile_pb2
from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp_kit.bus import partition_for, subjects
from cdp_kit.natsserver import NatsServer, free_port
from cdp_scoring.domain import ModelSpec
from cdp_scoring.modelstore import SHIPPED, shipped_models
from cdp_scoring.runtime import load_model, session_options
from cdp_testing.processes import ScoringProcess

MODEL = "churn_risk"
PERSONS = 20_000
SINGLE_ROUNDS = 20_000
BATCH_ROWS = 1024
BATCH_CALLS = 300
PARTITIONS = 8
RATE = int(os.environ.get("CDP_BENCH_RATE", "5000"))  # changes/s; the target is set at 5,000
TICK = 0.01
FRESH_SECONDS = 20
WARMUP_SECONDS = 3
FIELDS_PER_CHANGE = 5  # an order moves about ten computed traits, a page view three or four
NOW = 1_795_000_000.0
DAY = 86_400.0


# Where a batch's time goes, in pipeline order: (label, Prometheus histogram). The engine's stages are
# the kit's (`cdp_kit.engine`); round wait and inference are scoring's share of apply.
STAGES = (
    ("bus_wait", "cdp_engine_bus_wait_duration_milliseconds"),
    ("slot_wait", "cdp_engine_slot_wait_duration_milliseconds"),
    ("decode", "cdp_engine_decode_duration_milliseconds"),
    ("apply", "cdp_engine_batch_apply_duration_milliseconds"),
    ("apply.round_wait", "cdp_scoring_round_wait_duration_milliseconds"),
    ("apply.inference", "cdp_scoring_inference_duration_milliseconds"),
    ("commit", "cdp_engine_commit_duration_milliseconds"),
    ("publish", "cdp_engine_publish_duration_milliseconds"),
    ("ack", "cdp_engine_ack_duration_milliseconds"),
)
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)")


def scrape(port: int) -> dict[str, dict]:
    """The process' histograms: name -> {"buckets": {le: cumulative count}, "sum", "count"}, summed
    over every label set (partitions, models)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, dict] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.group(1), match.group(2) or "", float(match.group(3))
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix):
                base = out.setdefault(name[: -len(suffix)], {"buckets": {}, "sum": 0.0, "count": 0.0})
                if suffix == "_bucket":
                    le = float(re.search(r'le="([^"]+)"', labels).group(1).replace("+Inf", "inf"))
                    base["buckets"][le] = base["buckets"].get(le, 0.0) + value
                else:
                    base[suffix[1:]] += value
    return out


def stage_split(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """Per stage, over what happened between the two scrapes: batches (or rounds) observed, mean and
    p99 in ms (p99 interpolated within its histogram bucket)."""
    split = {}
    for label, name in STAGES:
        end, start = after.get(name), before.get(name, {"buckets": {}, "sum": 0.0, "count": 0.0})
        if end is None:
            continue
        count = end["count"] - start["count"]
        if count <= 0:
            continue
        bounds = sorted(end["buckets"])
        cumulative = [end["buckets"][b] - start["buckets"].get(b, 0.0) for b in bounds]
        target, lower, below, p99 = 0.99 * count, 0.0, 0.0, float("nan")
        for bound, cum in zip(bounds, cumulative, strict=True):
            if cum >= target:
                p99 = (
                    lower if bound == float("inf") else lower + (bound - lower) * (target - below) / max(cum - below, 1)
                )
                break
            lower, below = bound, cum
        split[label] = {
            "n": int(count),
            "mean_ms": round((end["sum"] - start["sum"]) / count, 2),
            "p99_ms": round(p99, 1),
        }
    return split


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def model_bytes() -> bytes:
    path = SHIPPED / f"{MODEL}.onnx"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `make models` first")
    return path.read_bytes()


def person_fields(spec: ModelSpec, rng: random.Random) -> dict:
    """Profile fields a real person might have for every input of the model (some left missing)."""
    return person_fields_of(list(spec.features), rng)


def person_fields_of(features: list, rng: random.Random) -> dict:
    fields = {}
    for feature in features:
        if rng.random() < 0.1:
            continue  # missing: the spec's default stands in
        if feature.transform == "days_since":
            fields[feature.path] = NOW - rng.uniform(0, 400) * DAY
        elif feature.transform == "bool":
            fields[feature.path] = rng.random() < 0.6
        elif feature.transform == "category":
            fields[feature.path] = rng.choice(feature.categories)
        else:
            fields[feature.path] = float(rng.randrange(0, 30))
    return fields


def bench_person(data: bytes) -> dict:
    model = load_model(data)
    rng = random.Random(7)
    people = [person_fields(model.spec, rng) for _ in range(PERSONS)]
    rows = model.assembler.matrix(people, NOW)
    raw = ort.InferenceSession(data, sess_options=session_options(1), providers=["CPUExecutionProvider"])
    singles = [rows[i : i + 1] for i in range(len(rows))]
    fetch = model.fetch
    name = model.spec.input

    def run_raw(n: int) -> float:
        started = time.perf_counter()
        for i in range(n):
            raw.run(fetch, {name: singles[i % PERSONS]})
        return (time.perf_counter() - started) / n * 1e6

    def run_ours(n: int) -> float:
        assembler, run_one = model.assembler, model.run_one
        started = time.perf_counter()
        for i in range(n):
            run_one(assembler.row(people[i % PERSONS], NOW))
        return (time.perf_counter() - started) / n * 1e6

    run_raw(2000), run_ours(2000)  # warm both
    raw_us, ours_us = [], []
    for _ in range(5):  # interleaved rounds: machine noise hits both alike
        raw_us.append(run_raw(SINGLE_ROUNDS // 5))
        ours_us.append(run_ours(SINGLE_ROUNDS // 5))
    return {
        "ours_us": float(np.median(ours_us)),
        "raw_us": float(np.median(raw_us)),
        "features": len(model.spec.features),
    }


def raw_batch_rate(data: bytes, batches: list[np.ndarray]) -> float:
    raw = ort.InferenceSession(data, sess_options=session_options(1), providers=["CPUExecutionProvider"])
    spec = load_model(data).spec
    for batch in batches[:10]:
        raw.run(None, {spec.input: batch})
    started = time.perf_counter()
    for batch in batches:
        raw.run(None, {spec.input: batch})
    return len(batches) * BATCH_ROWS / (time.perf_counter() - started)


async def grpc_batch_rate(address: str, batches: list[np.ndarray]) -> float:
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    ) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        requests = [scoring_pb2.ScoreBatchRequest(model=MODEL, packed_rows=b.tobytes()) for b in batches]
        for request in requests[:10]:
            await stub.ScoreBatch(request)
        started = time.perf_counter()
        for request in requests:
            reply = await stub.ScoreBatch(request)
            assert len(reply.values) == BATCH_ROWS * len(reply.scores)
        return len(requests) * BATCH_ROWS / (time.perf_counter() - started)


async def deploy(address: str, data: bytes) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        await stub.DeployModel(scoring_pb2.DeployModelRequest(onnx=data))


def change_message(
    features: list, person: str, at_ms: int, rng: random.Random, fields: int | None = None
) -> profile_pb2.ProfileChanged:
    """A profile change as profile publishes one: the deltas of one event. `fields` of the given features
    move (all of them when None)."""
    change = profile_pb2.ProfileChanged(person_id=person, cause="event", event_ids=[f"bench:{at_ms}"])
    change.at.FromMilliseconds(at_ms)
    chosen = features if fields is None else rng.sample(features, fields)
    for path, value in person_fields_of(chosen, rng).items():
        root, _, name = path.partition(".")
        if root == "computed":
            if isinstance(value, str):
                change.computed[name].string_value = value
            else:
                change.computed[name].number_value = float(value)
        elif root == "traits" and isinstance(value, str):
            change.traits[name].string_value = value
        elif root == "consent":
            change.consent[name] = bool(value)
    return change


async def bench_freshness(nats_url: str, specs: list[ModelSpec], metrics_port: int, pid: int) -> dict:
    """Profile changes at RATE/s into profiles.changed.<p>, as profile publishes them (one batch per partition
    per tick). Each carries the deltas of one event: FIELDS_PER_CHANGE of the deployed models' inputs move,
    so every change re-scores the models that read them."""
    features = list({f.path: f for spec in specs for f in spec.features}.values())
    readers = {path: {spec.name for spec in specs if path in spec.paths} for path in (f.path for f in features)}
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    # (person, change time) -> [published at, models still to answer]: a change counts once every model
    # reading what it moved has published its score.
    waiting: dict[tuple[str, int], list] = {}
    latencies: list[float] = []
    measuring = [False]

    async def on_scores(msg) -> None:
        arrived = time.perf_counter()
        message = scoring_pb2.ScoresUpdatedBatch.FromString(msg.data)
        for batch in (message, *message.more):  # a message carries every model of the round
            for person, at_ms in zip(batch.person_ids, batch.at_ms, strict=True):
                entry = waiting.get((person, at_ms))
                if entry is None:
                    continue
                entry[1].discard(batch.model)
                if not entry[1]:
                    del waiting[(person, at_ms)]
                    if entry[2]:
                        latencies.append((arrived - entry[0]) * 1000)

    await nc.subscribe(subjects.every_partition(subjects.SCORES_UPDATED_PREFIX), cb=on_scores)
    # Built before the clock starts: the load generator must not compete with the service for the CPU.
    rng = random.Random(3)
    persons = [f"p_{i:06d}" for i in range(PERSONS)]
    per_tick = int(RATE * TICK)
    ticks = int((WARMUP_SECONDS + FRESH_SECONDS) / TICK)
    plan: list[list[tuple[str, bytes, list[tuple[tuple[str, int], set[str]]]]]] = []
    sent = 0
    stamp = int(NOW * 1000)
    for _ in range(ticks):
        batches: dict[int, profile_pb2.ProfileChangedBatch] = {}
        for _ in range(per_tick):
            person = rng.choice(persons)
            sent += 1
            stamp += 1  # a distinct change time per change: (person, time) names the scores that answer it
            batch = batches.setdefault(partition_for(person, PARTITIONS), profile_pb2.ProfileChangedBatch())
            batch.changes.append(change_message(features, person, stamp, rng, FIELDS_PER_CHANGE))
        tick_plan = []
        for p, b in batches.items():
            keys = []
            for c in b.changes:
                moved = [
                    f"{root}.{name}"
                    for root, values in (("computed", c.computed), ("traits", c.traits), ("consent", c.consent))
                    for name in values
                ]
                keys.append(((c.person_id, c.at.ToMilliseconds()), set().union(*(readers[m] for m in moved))))
            tick_plan.append((subjects.profiles_changed(p), b.SerializeToString(), keys))
        plan.append(tick_plan)
    started = time.perf_counter()
    before = None
    sent_so_far = 0
    for i, messages in enumerate(plan):
        tick = started + i * TICK
        await asyncio.sleep(max(0.0, tick - time.perf_counter()))
        measuring[0] = tick > started + WARMUP_SECONDS
        if measuring[0] and before is None:
            before = await asyncio.to_thread(scrape, metrics_port)
            cpu_before, measured_from, sent_before = cpu_seconds(pid), time.perf_counter(), sent_so_far
        now = time.perf_counter()
        for _subject, _payload, keys in messages:
            for key, models in keys:
                waiting[key] = [now, set(models), measuring[0]]
        await asyncio.gather(*(js.publish(subject, payload) for subject, payload, _keys in messages))
        sent_so_far += sum(len(keys) for _subject, _payload, keys in messages)
    elapsed = time.perf_counter() - started
    cpu_used, wall = cpu_seconds(pid) - cpu_before, time.perf_counter() - measured_from
    await asyncio.sleep(2)  # the tail arrives
    stages = stage_split(before or {}, await asyncio.to_thread(scrape, metrics_port))
    await nc.close()
    return {
        # The machine is shared: the 1-minute load average at the end of the measured seconds (2 cores).
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "stages": stages,
        # What the scoring process costs whatever the machine's load: its CPU time over the measured
        # seconds, per 1,000 changes sent, and in cores.
        "cpu_ms_per_1000_changes": round(cpu_used * 1000 / max(1, sent_so_far - sent_before) * 1000, 1),
        "cpu_cores": round(cpu_used / wall, 2),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "scored": len(latencies),
        "changes": sent,
        "rate": round(sent / elapsed),
        "lost": len(waiting),
    }


async def main() -> None:
    data = model_bytes()
    spec = load_model(data).spec
    shipped = shipped_models()
    person = bench_person(data)
    print(f"person: ours {person['ours_us']:.1f} µs, raw batch-1 {person['raw_us']:.1f} µs")
    rng = np.random.default_rng(5)
    assembler_rows = load_model(data).assembler.matrix(
        [person_fields(spec, random.Random(i)) for i in range(BATCH_ROWS * 8)], NOW
    )
    batches = [assembler_rows[rng.choice(len(assembler_rows), BATCH_ROWS)] for _ in range(BATCH_CALLS)]
    raw_rate = raw_batch_rate(data, batches)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        server = NatsServer(workdir / "nats")
        server.start()
        try:
            metrics_port = free_port()
            scoring = ScoringProcess(
                server.url,
                workdir,
                store_url=f"sqlite:///{workdir / 'scoring.db'}",
                partitions=PARTITIONS,
                CDP_SCORING_SHIP_MODELS="false",
                CDP_METRICS_PORT=str(metrics_port),
            )
            with scoring:
                await deploy(scoring.grpc_address, data)
                for path in shipped:
                    if path.stem != MODEL:
                        await deploy(scoring.grpc_address, path.read_bytes())
                ours_rate = await grpc_batch_rate(scoring.grpc_address, batches)
                print(f"batch: ours {ours_rate:,.0f} rows/s, raw {raw_rate:,.0f} rows/s")
                fresh = await bench_freshness(
                    server.url, [load_model(p.read_bytes()).spec for p in shipped], metrics_port, scoring.proc.pid
                )
                print(f"freshness: {fresh}")
            hop = await bench_hop(
                server.url, 10, rate=RATE, payload=profile_pb2.ProfileChangedBatch().SerializeToString() + b"x" * 300
            )
        finally:
            server.stop()
    common = {"model": MODEL, "features": len(spec.features), "onnxruntime": ort.__version__, "threads": 1}
    write_result(
        "scoring-person",
        value=person["ours_us"],
        unit="µs/person",
        baseline=person["raw_us"],
        higher_is_better=False,
        params={
            **common,
            "persons": PERSONS,
            "calls": SINGLE_ROUNDS,
            "path": "FeatureAssembler.row (profile fields -> vector) + LoadedModel.run_one (inference, scores read out)",
            "baseline": "raw InferenceSession.run on pre-built 1-row float32 arrays, same model and session options",
            "target": "ratio <= 2",
        },
    )
    write_result(
        "scoring-batch",
        value=ours_rate,
        unit="rows/s",
        baseline=raw_rate,
        higher_is_better=True,
        params={
            **common,
            "rows_per_call": BATCH_ROWS,
            "calls": BATCH_CALLS,
            "in_flight": 1,
            "path": "gRPC ScoreBatch(packed_rows) to a scoring process on loopback",
            "baseline": "raw InferenceSession.run on the same 1,024-row batches, in the benchmark process",
            "target": "ratio >= 0.5",
        },
    )
    write_result(
        "scoring-freshness",
        value=fresh["p99_ms"],
        unit="ms p99",
        baseline=hop["p99_ms"],
        higher_is_better=False,
        params={
            **common,
            "p50_ms": round(fresh["p50_ms"], 2),
            "rate": fresh["rate"],
            "changes": fresh["changes"],
            "scored": fresh["scored"],
            "coalesced": fresh["lost"],
            "partitions": PARTITIONS,
            "seconds": FRESH_SECONDS,
            "path": "profiles.changed.<p> publish -> scoring process -> scores.updated.<p> received",
            "models": [p.stem for p in shipped],
            "fields_per_change": FIELDS_PER_CHANGE,
            "stages": fresh["stages"],
            "cpu_ms_per_1000_changes": fresh["cpu_ms_per_1000_changes"],
            "cpu_cores": fresh["cpu_cores"],
            "load_average_1_5_15m": fresh["load_average"],
            "baseline": f"one bare JetStream hop at {RATE}/s (p50 {hop['p50_ms']:.2f} ms)",
            "target": "p99 <= 100 ms",
        },
    )


if __name__ == "__main__":
    asyncio.run(main())
