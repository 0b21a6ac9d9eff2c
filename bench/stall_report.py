"""What held up the slowest probes of a `bench_pipeline.py --trace DIR` run, from DIR alone.

    PYTHONPATH=bench/stallwatch CDP_STALLWATCH_DIR=/tmp/run1 \\
        .venv/bin/python bench/bench_pipeline.py --rates 1000 --step-seconds 30 --trace /tmp/run1
    .venv/bin/python bench/stall_report.py /tmp/run1 [--slowest 6]

Per step: each hop's p50/p99 over the probes (collector's answer -> events.raw -> events.resolved ->
profiles.changed -> segments.entered -> actions.webhook -> the receiver; all stamped on this machine's
clock), then the slowest probes, each with its hops and what every process was doing while its slowest
hop lasted: event-loop stalls whose own CPU was >= 30 ms (`late`: wall, the main thread's own CPU, its
time runnable and waiting for a core, and the stack most sampled), garbage collections (`gc`: wall and
CPU ms, generation) and store writes of >= 100 ms (`commit`). A stall whose own CPU is large is work that held the loop (noise on a shared
machine inflates wall and runnable time, not that); a generation-1 or -2 collection is named as such.
Then, per process over the step: its stalls, collections by generation (with their CPU) and slow writes.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

HOPS = ("accepted", "raw", "resolved", "profile", "segment", "webhook", "action")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def records(folder: Path) -> list[dict]:
    """Every stallwatch record, each with `proc` (<name>-<pid>) and `end` (epoch seconds)."""
    out = []
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            record["proc"] = path.stem
            if record["kind"] != "cpu":
                record["end"] = record["at"] + (record.get("wall_ms") or record.get("ms") or 0) / 1000
            out.append(record)
    return out


def describe(record: dict, t0: float) -> str:
    at = f"+{record['at'] - t0:6.2f}s"
    if record["kind"] == "late":
        stack = record["stacks"][0][0][:180] if record["stacks"] else "-"
        return (
            f"{record['proc']:24s} loop held {record['wall_ms']:5.0f} ms at {at} (own cpu {record['cpu_ms']:.0f}, "
            f"runnable {record['runnable_ms']:.0f}) | {stack}"
        )
    if record["kind"] == "gc":
        return f"{record['proc']:24s} gc gen{record['gen']} {record['ms']:5.0f} ms (cpu {record.get('cpu_ms', 0):.0f}) at {at}"
    return f"{record['proc']:24s} store write {record['ms']:5.0f} ms (cpu {record['cpu_ms']:.0f}, {record['ops']} ops) at {at}"


def notable(record: dict) -> bool:
    if record["kind"] == "late":
        return record["cpu_ms"] >= 30
    if record["kind"] == "gc":
        return (record["gen"] >= 1 and record["ms"] >= 10) or record["ms"] >= 20
    return record["kind"] == "commit" and record["ms"] >= 100


def report(folder: Path, slowest: int) -> None:
    trace = json.loads((folder / "trace.json").read_text())
    stalls = records(folder)
    for step in trace["steps"]:
        probes = [p for p in step["probes"] if p["accepted"]]
        if not probes:
            continue
        t0 = min(p["accepted"] for p in probes)
        t1 = max(p["action"] or p["accepted"] for p in probes)
        print(f"step {step['rate']}/s: {len(probes)} probes over {t1 - t0:.0f} s")
        hops = [
            (f"{a} -> {b}", [(p[b] - p[a]) * 1000 for p in probes if p[a] and p[b]])
            for a, b in itertools.pairwise(HOPS)
        ]
        hops.append(("accepted -> action", [(p["action"] - p["accepted"]) * 1000 for p in probes if p["action"]]))
        for label, values in hops:
            print(f"  {label:22s} p50 {percentile(values, 50):7.1f}  p99 {percentile(values, 99):7.1f}  max "
                  f"{max(values, default=float('nan')):7.1f} ms (n={len(values)})")  # fmt: skip
        done = sorted((p for p in probes if p["action"]), key=lambda p: p["accepted"] - p["action"])
        for p in done[:slowest]:
            steps = " ".join(
                f"{b} +{(p[b] - p[a]) * 1000:.0f}" if p[a] and p[b] else f"{b} ?" for a, b in itertools.pairwise(HOPS)
            )
            print(
                f"  probe {p['n']} at +{p['accepted'] - t0:.2f}s: {(p['action'] - p['accepted']) * 1000:.0f} ms ({steps})"
            )
            pairs = [(a, b) for a, b in itertools.pairwise(HOPS) if p[a] and p[b]]
            a, b = max(pairs, key=lambda ab: p[ab[1]] - p[ab[0]])
            for record in stalls:
                if record["kind"] != "cpu" and record["at"] < p[b] and record["end"] > p[a] and notable(record):
                    print("      " + describe(record, t0))
        print("  per process over the step:")
        for proc in sorted({r["proc"] for r in stalls}):
            mine = [r for r in stalls if r["proc"] == proc and t0 <= r["at"] <= t1]
            late = [r for r in mine if r["kind"] == "late"]
            gcs = [r for r in mine if r["kind"] == "gc"]
            writes = [r for r in mine if r["kind"] == "commit"]
            cpu = [r for r in stalls if r["proc"] == proc and r["kind"] == "cpu" and "gcs" in r]
            inside = [r for r in cpu if t0 <= r["at"] <= t1]
            counted = ""
            if len(inside) >= 2:
                counted = "collections by generation " + str(
                    [b - a for a, b in zip(inside[0]["gcs"], inside[-1]["gcs"], strict=True)]
                )
            if not late and not gcs and not writes:
                continue
            by_gen = {g: [r for r in gcs if r["gen"] == g] for g in (0, 1, 2)}
            gc_text = ", ".join(
                f"gen{g} max {max(r['ms'] for r in rs):.0f} ms (cpu {max(r.get('cpu_ms', 0) for r in rs):.0f})"
                for g, rs in by_gen.items()
                if rs
            )
            print(
                f"    {proc:24s} {len(late):3d} stalls (own cpu {sum(r['cpu_ms'] for r in late):5.0f} ms, max "
                f"{max((r['cpu_ms'] for r in late), default=0):4.0f}); {counted}; {gc_text or 'no slow gc'}; "
                f"{len(writes)} writes >= 20 ms (max {max((r['ms'] for r in writes), default=0):.0f})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--slowest", type=int, default=6)
    args = parser.parse_args()
    report(args.folder, args.slowest)


if __name__ == "__main__":
    main()
