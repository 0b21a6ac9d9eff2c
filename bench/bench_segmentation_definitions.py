"""Segmentation at a customer's scale of definitions: what one profile change costs with many segments.

segmentation-definitions  CPU per profile change applied (evaluated, transitions found; not published) in
                          process, with 3,000 live segments; baseline: DuckDB (in process, 2 threads)
                          evaluating the same 3,000 definitions as boolean columns of one prepared SELECT
                          over the held persons' rows, its CPU divided by the persons (the same SELECT for
                          one person by id, as a change would run it, is `params.duckdb_by_id_us`: its
                          fixed cost per expression dominates). `params.scaling_ratio` is the same
                          change's cost at 3,000 segments against 10: how much a change costs more
                          because many segments are defined. The segments mix
                          what a mid-size customer runs: one per country (`traits.country = "C12"`), one
                          per score (`scores.s7 > 0.5`), plan and age (`traits.plan in [...] and traits.age
                          > 40`), text either side of an `or`, and inactivity windows (`traits.last_seen_at
                          < now - 12d`). The changes: a country moved, a score moved, last_seen_at moved
                          within the day (an active person's event: no window crossed), last_seen_at moved
                          by up to 90 days (a person coming back, or going: the windows crossed are
                          evaluated, and most flip), and a person first seen with two traits. Also,
                          per count (10, 100, 1,000, 3,000) and per kind: CPU per change and segments
                          evaluated per change and window segments decided without an evaluation
                          (`params.curve`), and CPU per segment created (to live) at each count
                          (`params.create_ms`: each create builds over every person held, and the first-seen
                          changes add 2,000 persons per count, so it grows with the population too).
                          Target scaling ratio <= 2, not met: a country, a score and a person first seen
                          evaluate 2, 1 and 1 segments at any count (the word, threshold and need indexes),
                          last_seen_at moved and a person coming back evaluate none (the windows crossed are
                          decided), but every window crossed flips, and those transitions are the output:
                          359 a change for a person coming back at 3,000 segments, about 300 us. last_seen
                          follows the returning changes of the count before, so its first change per person
                          crosses back about 10 windows a change on average. A person first seen costs
                          12-14 us at 3,000 segments in a fresh engine, more here with a larger heap.

    make bench-segmentation_definitions   # writes bench/results/segmentation-definitions.json
    BENCH_DEFINITIONS_COUNTS=10,100,1000 python bench/bench_segmentation_definitions.py

A real nats-server (the engine publishes builds' transitions) and the memory store; one process.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import duckdb
from benchlib import write_result

from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import Bus, profiles_stream, segments_stream, subjects
from cdp_kit.natsserver import NatsServer
from cdp_kit.storage import open_store
from cdp_kit.timestamps import set_seconds
from cdp_segmentation.domain import parse
from cdp_segmentation.engine import SegmentationEngine
from cdp_testing.fakes import Clock, Delivery

COUNTS = [int(c) for c in os.environ.get("BENCH_DEFINITIONS_COUNTS", "10,100,1000,3000").split(",")]
NOW = 1_790_000_000.0
DAY = 86_400.0
PERSONS = 200  # held before the segments are created (each create builds over them)
CHANGES = 2_000  # per kind and count
CREATES = 20  # timed creates at each count


# The five kinds of segment, each as the segment language writes it and as DuckDB SQL over a row of the
# baseline's persons table (now fixed at NOW): segment i is of kind i % 5.
DEFINITIONS = (
    (lambda i: f'traits.country = "C{i}"', lambda i: f"country = 'C{i}'"),
    (lambda i: f"scores.s{i} > 0.5", lambda i: f"s{i} > 0.5"),
    (
        lambda i: f'traits.plan in ["p{i}", "q{i}"] and traits.age > {i % 90}',
        lambda i: f"plan IN ('p{i}', 'q{i}') AND age > {i % 90}",
    ),
    (lambda i: f'traits.city = "X{i}" or traits.tier = "T{i}"', lambda i: f"city = 'X{i}' OR tier = 'T{i}'"),
    (
        lambda i: f"traits.last_seen_at < now - {i % 60 + 1}d",
        lambda i: f"last_seen_at < {NOW - (i % 60 + 1) * DAY}",
    ),
)


def definition(i: int) -> str:
    return DEFINITIONS[i % 5][0](i)


def sql_predicate(i: int) -> str:
    """`definition(i)` as DuckDB SQL."""
    return DEFINITIONS[i % 5][1](i)


def change(person: str, at: float, *, traits: dict | None = None, scores: dict | None = None):
    message = profile_pb2.ProfileChanged(person_id=person, cause="event")
    set_seconds(message.at, at)
    for name, value in (traits or {}).items():
        if isinstance(value, str):
            message.traits[name].string_value = value
        else:
            message.traits[name].number_value = value
    for name, value in (scores or {}).items():
        message.scores[name] = value
    return message


KINDS = {
    "country": lambda r: {"traits": {"country": f"C{(r % 40) * 5}"}},
    "score": lambda r: {"scores": {"s1": float(r // 50 % 2)}},
    "last_seen": lambda r: {"traits": {"last_seen_at": NOW - (r % 24) * 3600.0}},  # an active person's event
    "returning": lambda r: {"traits": {"last_seen_at": NOW - (r % 90) * DAY}},  # back after up to 90 days
    "first_seen": lambda r: {"traits": {"plan": "p2", "age": 30.0}},
}


async def create(engine: SegmentationEngine, n: int) -> None:
    segment = await engine.create(f"s{n}", parse(definition(n)))
    await engine.wait_live(segment.id)


async def measure(url: str) -> dict:
    curve: dict[str, dict[str, dict[str, float]]] = {}
    create_ms: dict[str, float] = {}
    async with open_store("memory://") as store, Bus.connect(url, name="bench-definitions") as bus:
        await bus.ensure_streams(profiles_stream(), segments_stream())
        engine = SegmentationEngine(
            store,
            bus.publisher,
            partitions=1,
            owned=[0],
            telemetry=bus.telemetry,
            snapshot_interval=3600,
            timer_resolution=3600,
            clock=Clock(NOW),
        )
        await engine.start()
        try:
            held = [change(f"p{j}", NOW, traits={"country": "C0", "age": float(j % 90)}) for j in range(PERSONS)]
            batch = profile_pb2.ProfileChangedBatch(changes=held)
            await engine.handle([Delivery(batch, subjects.profiles_changed(0), 1)])
            n, seq = 0, 10
            for count in COUNTS:
                while n < count - CREATES:
                    await create(engine, n)
                    n += 1
                started = time.process_time()
                while n < count:
                    await create(engine, n)
                    n += 1
                create_ms[str(count)] = round((time.process_time() - started) / CREATES * 1000, 2)
                curve[str(count)] = {}
                for kind, make in KINDS.items():
                    messages = []
                    for r in range(CHANGES):
                        seq += 1
                        person = f"new{seq}" if kind == "first_seen" else f"p{r % 50}"
                        one = change(person, NOW + seq, **make(r))
                        messages.append((seq, profile_pb2.ProfileChangedBatch(changes=[one])))
                    evaluations, decided = engine.evaluations, getattr(engine, "decided", 0)
                    started = time.process_time()
                    for position, message in messages:
                        await engine._apply_message(0, position, message, NOW + position, [])
                    cpu = (time.process_time() - started) / CHANGES * 1e6
                    curve[str(count)][kind] = {
                        "cpu_us": round(cpu, 1),
                        "evaluated": round((engine.evaluations - evaluations) / CHANGES, 1),
                        # window segments crossed, decided without an evaluation (before 0ec37971: evaluated)
                        "decided": round((getattr(engine, "decided", 0) - decided) / CHANGES, 1),
                    }
                print(f"{count:>5} segments: create {create_ms[str(count)]} ms, {curve[str(count)]}", flush=True)
        finally:
            await engine.stop()
    return {"curve": curve, "create_ms": create_ms}


def duckdb_per_change(count: int, rounds: int = 5) -> dict[str, float]:
    """CPU (us) DuckDB takes to evaluate `count` definitions for a person: `per_person`, one SELECT of them
    over every held person's row, divided by the persons (vectorised: the baseline), and `by_id`, the
    same SELECT prepared and run for one person by id, as a change would (its fixed cost per expression
    and query dominates)."""
    con = duckdb.connect()
    con.execute("SET threads TO 2")
    scores = [f"s{i}" for i in range(count) if i % 5 == 1]
    columns = ", ".join(
        ["id VARCHAR", "country VARCHAR", "plan VARCHAR", "age DOUBLE", "city VARCHAR", "tier VARCHAR"]
        + ["last_seen_at DOUBLE"]
        + [f"{name} DOUBLE" for name in scores]
    )
    con.execute(f"CREATE TABLE persons ({columns})")
    rows = [
        (f"p{j}", f"C{j % 40 * 5}", "p2", float(j % 90), "X3", "T8", NOW - j * 3600.0, *[float(j % 2)] * len(scores))
        for j in range(PERSONS)
    ]
    con.executemany(f"INSERT INTO persons VALUES ({', '.join('?' * (7 + len(scores)))})", rows)
    select = ", ".join(f"({sql_predicate(i)}) AS m{i}" for i in range(count))
    con.execute(f"PREPARE every AS SELECT {select} FROM persons")  # parsed once
    con.execute(f"PREPARE one AS SELECT {select} FROM persons WHERE id = $1")
    found: dict[str, float] = {"per_person": math.inf, "by_id": math.inf}
    for name, run, per in (
        ("per_person", lambda _r: "EXECUTE every", PERSONS),
        ("by_id", lambda r: f"EXECUTE one('p{r % 50}')", 1),
    ):
        con.execute(run(0)).fetchall()  # warm
        for _ in range(3):
            started = time.process_time()
            for r in range(rounds):
                con.execute(run(r)).fetchall()
            found[name] = min(found[name], (time.process_time() - started) / rounds / per * 1e6)
    con.close()
    return {name: round(us, 1) for name, us in found.items()}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(store_dir=Path(tmp) / "nats").start()
        try:
            found = asyncio.run(measure(server.url))
        finally:
            server.close()
    curve = found["curve"]
    first, last = str(COUNTS[0]), str(COUNTS[-1])

    def mean(count: str) -> float:
        return sum(kind["cpu_us"] for kind in curve[count].values()) / len(curve[count])

    duck = duckdb_per_change(COUNTS[-1])
    baseline = duck["per_person"]
    print(f"DuckDB over {COUNTS[-1]} definitions: {duck} us a person", flush=True)
    write_result(
        "segmentation-definitions",
        value=mean(last),
        unit="us_cpu_per_change",
        baseline=baseline,
        higher_is_better=False,
        params={
            "segments": COUNTS[-1],
            "baseline": f"DuckDB {duckdb.__version__} (2 threads): one prepared SELECT of the {COUNTS[-1]} "
            f"definitions as boolean columns over the {PERSONS} held persons' rows, CPU divided by the persons",
            "duckdb_by_id_us": duck["by_id"],
            "scaling_ratio": round(mean(last) / mean(first), 2),
            "scaling_baseline_segments": COUNTS[0],
            "scaling_baseline_us": round(mean(first), 1),
            "persons": PERSONS,
            "changes_per_kind": CHANGES,
            "definitions": [definition(i) for i in range(5)],
            "curve": curve,
            "create_ms": found["create_ms"],
            "target_scaling_ratio": 2.0,
        },
    )


if __name__ == "__main__":
    main()
