"""Where a probe's time goes between the pipeline's streams: the whole platform at a low rate, each hop
timed from JetStream's own stored time of the probe's message in every stream it crosses.

    .venv/bin/python bench/pipeline_hops.py --rate 200 --seconds 10

The platform runs as `make up` runs it (`RunningPlatform`); the load is bench_pipeline's (Segment batches
to the collector, a probe - an identify of a new person entering "bench_hot" - every `--probe-interval`
seconds). After the load, every stream a probe crosses is read back and each probe's first message in it
found (by the probe's event id up to profiles.changed, by its person id after): EVENTS_RAW,
EVENTS_RESOLVED, PROFILES (profiles.changed), SEGMENTS (segments.entered), ORCHESTRATION (the server's
sourced copy of that segments.entered, orchestration.in), then actions.webhook - seen live by a
subscription here, since the dispatcher erases an action from ACTIONS once it is sent - and the webhook
receiver's own arrival time. Every time is this machine's clock (nats-server runs here), so the hops
subtract exactly. Before the measured load the platform is warmed (everyone identified, a short step)
and drained (a probe reached the receiver).

Prints a table: hop -> p50 / p99 / max of the time it added, over the probes, each service's cores and
engine stages (mean / p99 per batch) over the load, and how long each process (nats-server too) waited
for a CPU while runnable (Linux schedstat): on a shared machine that is where a hop's time goes; writes it all as JSON to `--out` when given. A
measuring tool for people (no benchlib result file); keep it to low rates on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_pipeline import Load, Pipeline
from benchlib import percentile
from pipeline_parts import backlog, schedstat, settle, window

from cdp.profile.v1 import profile_pb2
from cdp_kit.bus.streams import SOURCE_HEADER
from cdp_testing.platform_run import RunningPlatform

# The stops in the order a probe meets them: (label, stream, filter subject).
STOPS = (
    ("events.raw", "EVENTS_RAW", "events.raw.>"),
    ("events.resolved", "EVENTS_RESOLVED", "events.resolved.>"),
    ("profiles.changed", "PROFILES", "profiles.changed.>"),
    ("segments.entered", "SEGMENTS", "segments.entered.>"),
    ("orchestration.in", "ORCHESTRATION", "orchestration.in.>"),
    # The dispatcher erases an action from ACTIONS once its outcome is recorded: seen live instead.
    ("actions.webhook", "", "actions.webhook.>"),
)


async def read_stream(js, stream: str, subject: str) -> list[tuple[float, dict, bytes]]:
    """Every message of `subject` in `stream`: (stored time, headers, payload), in stream order."""
    from nats.js import api

    sub = await js.pull_subscribe(
        subject, stream=stream, config=api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, inactive_threshold=30.0)
    )
    out = []
    while True:
        try:
            msgs = await sub.fetch(1000, timeout=1.0)
        except Exception:
            break
        for m in msgs:
            out.append((m.metadata.timestamp.timestamp(), m.headers or {}, m.data))
        if not msgs:
            break
    await sub.unsubscribe()
    return out


async def measure(args: argparse.Namespace) -> dict:
    import nats

    load = Load(args.users, args.batch)
    with tempfile.TemporaryDirectory() as tmp, RunningPlatform(Path(tmp)) as platform:
        pipe = Pipeline(platform)
        pipe.set_up()
        await pipe.sender.offer([(b, []) for b in load.everyone()], 1000 / load.batch)
        # A short warm step, then the measured one.
        await pipe.sender.offer(load.bodies(args.rate, 2.0, None), args.rate / load.batch)
        nc = await nats.connect(platform.nats_url)
        js = nc.jetstream()
        # The warm-up drained: one probe through to the receiver, and (unless --no-settle) every
        # consumer on the bus caught up, before the measured load.
        warm = load.bodies(load.batch, 1.0, 0.5)
        await pipe.sender.offer(warm, 1.0)
        await wait_delivered(pipe, load.probes, 120.0)
        behind_at_warm = await backlog(js)
        settled_in, behind = None, behind_at_warm
        if not args.no_settle:
            settled_in, behind = await settle(js, 300.0)
        print(f"backlog after the warm-up: {behind_at_warm}; settled in {settled_in} s; still behind: {behind}")
        first_probe = load.probes + 1
        bodies = load.bodies(args.rate, args.seconds, args.probe_interval)
        live: list[tuple[float, bytes]] = []

        async def on_action(msg) -> None:
            live.append((time.time(), msg.data))

        await nc.subscribe(STOPS[-1][2], cb=on_action)
        pids = {name: info["pid"] for name, info in platform.run["services"].items() if info.get("pid")}
        pids["nats-server"] = platform.run.get("nats_pid")
        before = await pipe.scrape_all()
        sched0, clock0 = {name: schedstat(pid) for name, pid in pids.items()}, time.monotonic()
        sent = await pipe.sender.offer(bodies, args.rate / load.batch)
        sched1, wall = {name: schedstat(pid) for name, pid in pids.items()}, time.monotonic() - clock0
        after = await pipe.scrape_all()
        services = {name: window(before[name], after[name]) for name in before}
        scheduling = {name: scheduled(sched0[name], sched1[name], wall) for name in pids}
        await asyncio.sleep(args.settle)
        probes = [n for _, ns in bodies for n in ns]
        pattern = re.compile(rf"probe-{load.run}-(\d+)".encode())
        seen: dict[str, dict[int, float]] = {label: {} for label, _, _ in STOPS}
        person_of: dict[int, str] = {}
        for label, stream, subject in STOPS[:3]:
            for stored, _, data in await read_stream(js, stream, subject):
                for found in pattern.finditer(data):
                    n = int(found.group(1))
                    if n >= first_probe:
                        seen[label].setdefault(n, stored)
                if label == "profiles.changed" and pattern.search(data):
                    for change in profile_pb2.ProfileChangedBatch.FromString(data).changes:
                        for event_id in change.event_ids:
                            found = pattern.search(event_id.encode())
                            if found:
                                person_of.setdefault(int(found.group(1)), change.person_id)
        by_person = {person.encode(): n for n, person in person_of.items() if n >= first_probe}
        for label, stream, subject in STOPS[3:]:
            found = live if not stream else await read_stream(js, stream, subject)
            for stored, *rest in found:
                headers, data = rest if len(rest) == 2 else ({}, rest[0])
                if stream == "ORCHESTRATION" and not headers.get(SOURCE_HEADER, "").startswith("SEGMENTS "):
                    continue  # the person's profile change and event are sourced too
                for person, n in by_person.items():
                    if person in data:
                        seen[label].setdefault(n, stored)
        await nc.close()
        received = pipe.deliveries()
        seen["receiver"] = {n: received[p] for n, p in person_of.items() if p in received and n >= first_probe}
        seen["accepted"] = {n: t for n, t in sent["accepted_at"].items() if n >= first_probe}
    order = ["events.raw", *[label for label, _, _ in STOPS[1:]], "receiver"]
    table = []
    for earlier, later in itertools.pairwise(order):
        added = [(seen[later][n] - seen[earlier][n]) * 1000 for n in probes if n in seen[later] and n in seen[earlier]]
        table.append({"hop": f"{earlier} -> {later}", **summary(added)})
    total = [(seen["receiver"][n] - seen["events.raw"][n]) * 1000 for n in probes if n in seen["receiver"]]
    table.append({"hop": "events.raw -> receiver (total)", **summary(total)})
    accepted = [(seen["receiver"][n] - seen["accepted"][n]) * 1000 for n in probes if n in seen["receiver"]]
    table.append({"hop": "collector answered -> receiver", **summary(accepted)})
    return {
        "rate": args.rate,
        "seconds": args.seconds,
        "probes": len(probes),
        "hops": table,
        "services": services,
        "scheduling": scheduling,
    }


def scheduled(before, after, wall: float) -> dict:
    """Over `wall` seconds: the cores a process used, the share of the time it spent runnable but not
    running (summed over its threads), and how long it waited for a CPU each time it was given one."""
    if before is None or after is None or wall <= 0:
        return {}
    on_cpu, waiting, slices = (b - a for a, b in zip(before, after, strict=True))
    return {
        "cores": round(on_cpu / wall, 3),
        "run_queue_per_s_ms": round(1000 * waiting / wall, 1),
        "wait_per_slice_ms": round(1000 * waiting / slices, 2) if slices else None,
    }


async def wait_delivered(pipe: Pipeline, count: int, limit: float) -> None:
    """Until the webhook receiver holds `count` probes' calls (or `limit` seconds passed)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if len(await asyncio.to_thread(pipe.deliveries)) >= count:
            return
        await asyncio.sleep(0.5)


def summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 50), 1),
        "p99_ms": round(percentile(values, 99), 1),
        "max_ms": round(max(values), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=200, help="offered events/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of load")
    parser.add_argument("--batch", type=int, default=50, help="events per POST")
    parser.add_argument("--users", type=int, default=1000, help="distinct people in the background load")
    parser.add_argument("--probe-interval", type=float, default=0.25, help="seconds between probes")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to wait after the load")
    parser.add_argument("--no-settle", action="store_true", help="do not wait for every consumer to catch up")
    parser.add_argument("--out", help="write the table as JSON here")
    args = parser.parse_args()
    started = time.monotonic()
    result = asyncio.run(measure(args))
    for row in result["hops"]:
        cells = f"p50 {row.get('p50_ms', '-'):>7} p99 {row.get('p99_ms', '-'):>7} max {row.get('max_ms', '-'):>7}"
        print(f"{row['hop']:<40} {cells} ms  (n={row['n']})")
    for name, seen in result["services"].items():
        stages = ", ".join(
            f"{label} {v['mean_ms']:.1f}/{v['p99_ms']:.0f}" for label, v in sorted(seen["stages"].items())
        )
        print(f"  {name}: {seen['cores']} cores; stages mean/p99 ms: {stages}")
    for name, seen in result["scheduling"].items():
        if seen:
            print(
                f"  {name}: {seen['cores']} cores, runnable but waiting for a CPU {seen['run_queue_per_s_ms']} ms"
                f" per s, {seen['wait_per_slice_ms']} ms per time it got one"
            )
    print(f"{result['probes']} probes at {result['rate']}/s; {time.monotonic() - started:.0f} s in all")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
