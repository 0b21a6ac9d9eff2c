"""bench/store_commit — commit latency of the SQLite store: p99 of many small write batches from a few
concurrent writers, with checkpoints in the background (``background_checkpoints=True``; not the default, see `cdp_kit.storage.sqlite`) against SQLite's own
auto-checkpoint inside the commit (``background_checkpoints=False``), in the same run; the baseline is
raw sqlite3 committing the same rows (WAL, synchronous=NORMAL, SQLite's defaults otherwise).

The shape is a service's group commits: `--writers` partitions each commit a batch of `--batch` profile
documents (about 1.5 kB of JSON each, drawn from `--users` already stored) plus the partition's stream
checkpoint, `--rate` batches a second between them, `--commits` batches per run. A batch's latency runs
from the bulk_write call to its return, so it includes waiting behind the other writers' batches on the
store's one writer thread - which is what a partition waits for. The raw baseline runs the same batches
on one connection in one thread at the same pace (no queueing: nothing else writes).

`value` is the p99 with background checkpoints; `params` has p50/p99/max for both modes and the raw
baseline, and how many checkpoints each mode ran. Every run starts from a fresh copy of the same file.
The raw baseline pays SQLite's auto-checkpoint in its commits like `checkpoint_in_commit` does (without
the store's encoding, version reads and thread hops), so the ratio can be below 1: it says how much of
the commit tail the store adds or removes against plain SQLite.

    make bench-store_commit      # writes bench/results/store_commit.json (about 30 s)
    .venv/bin/python bench/bench_store_commit.py --commits 500   # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

import orjson
from benchlib import percentile, write_result

from cdp_kit.storage import Put
from cdp_kit.storage.sqlite import SqliteStore


def profile(rng: random.Random, n: int) -> dict:
    return {
        "id": f"user-{n}",
        "email": f"user-{n}@example.com",
        "traits": {f"trait_{i}": rng.choice(["a", "bb", "ccc"]) * rng.randrange(1, 8) for i in range(24)},
        "counters": {f"event_{i}": rng.randrange(1000) for i in range(16)},
        "last_seen": "2026-11-25T10:00:00.000Z",
        "pad": "x" * 600,
    }


def batches(seed: int, args: argparse.Namespace) -> list[list[Put]]:
    """Every batch of a run, in the order they are sent: writer w's batches are those with index % writers == w."""
    rng = random.Random(seed)
    out = []
    for i in range(args.commits):
        writer = i % args.writers
        ops = [Put("profiles", f"user-{n}", profile(rng, n)) for n in rng.sample(range(args.users), args.batch)]
        ops.append(Put("checkpoints", f"profile/{writer}", {"seq": i}))
        out.append(ops)
    return out


async def run_store(template: Path, work: Path, args: argparse.Namespace, *, background: bool) -> dict:
    path = work / ("background.db" if background else "inline.db")
    shutil.copyfile(template, path)
    plan = batches(7, args)
    latencies: list[float] = []
    store = SqliteStore(path, background_checkpoints=background)
    try:
        per_writer_gap = args.writers / args.rate

        async def writer(w: int) -> None:
            due = time.perf_counter()
            for ops in plan[w :: args.writers]:
                due += per_writer_gap
                started = time.perf_counter()
                await store.bulk_write(ops)
                latencies.append((time.perf_counter() - started) * 1000)
                await asyncio.sleep(max(0.0, due - time.perf_counter()))

        started = time.perf_counter()
        await asyncio.gather(*(writer(w) for w in range(args.writers)))
        elapsed = time.perf_counter() - started
        counts = store.wal_checkpoints
    finally:
        await store.close()
    return {
        **summary(latencies),
        "batches_per_s": round(len(latencies) / elapsed, 1),
        "background_checkpoints": counts.background,
        "blocking_checkpoints": counts.blocking,
    }


def run_raw(template: Path, work: Path, args: argparse.Namespace) -> dict:
    """The same batches as raw sqlite3 upserts, one connection, SQLite's own checkpoints."""
    path = work / "raw.db"
    shutil.copyfile(template, path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    upsert = (
        "INSERT INTO documents (collection, key, version, doc) VALUES (?, ?, 1, ?) "
        "ON CONFLICT (collection, key) DO UPDATE SET version = version + 1, doc = excluded.doc"
    )
    plan = [[(op.collection, op.key, orjson.dumps(op.doc).decode()) for op in ops] for ops in batches(7, args)]
    latencies = []
    gap = 1 / args.rate
    due = time.perf_counter()
    for rows in plan:
        due += gap
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(upsert, rows)
        conn.execute("COMMIT")
        latencies.append((time.perf_counter() - started) * 1000)
        time.sleep(max(0.0, due - time.perf_counter()))
    conn.close()
    return summary(latencies)


def summary(latencies: list[float]) -> dict:
    return {
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "max_ms": round(max(latencies), 2),
        "batches": len(latencies),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=10, help="profile documents per batch")
    parser.add_argument("--rate", type=float, default=250.0, help="batches per second, all writers together")
    parser.add_argument("--commits", type=int, default=2000, help="batches per run")
    parser.add_argument("--users", type=int, default=10_000, help="profiles in the store before the runs")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-store-commit-") as tmp:
        work = Path(tmp)
        template = work / "template.db"
        rng = random.Random(1)
        async with SqliteStore(template) as store:
            for start in range(0, args.users, 2000):
                await store.bulk_write(
                    [Put("profiles", f"user-{n}", profile(rng, n)) for n in range(start, min(args.users, start + 2000))]
                )
        raw = await asyncio.to_thread(run_raw, template, work, args)
        inline = await run_store(template, work, args, background=False)
        background = await run_store(template, work, args, background=True)
        size_mb = round(template.stat().st_size / 1e6, 1)

    write_result(
        "store_commit",
        value=background["p99_ms"],
        unit="ms",
        baseline=raw["p99_ms"],
        higher_is_better=False,
        params={
            "writers": args.writers,
            "batch": args.batch,
            "rate": args.rate,
            "commits": args.commits,
            "users": args.users,
            "database_mb": size_mb,
            "background_checkpoints": background,
            "checkpoint_in_commit": inline,
            "raw_sqlite3": raw,
        },
    )


if __name__ == "__main__":
    asyncio.run(main())
