"""CPU per input message of orchestration's and the CRM connector's engine logic, on the messages the
whole pipeline sends them (bench_pipeline.py's load), replayed in this process.

Two steps:

    .venv/bin/python bench/orch_crm_cost.py capture /tmp/inputs.pickle --rate 2000 --seconds 10
    .venv/bin/python bench/orch_crm_cost.py replay /tmp/inputs.pickle --service orchestration
    .venv/bin/python bench/orch_crm_cost.py replay /tmp/inputs.pickle --service crm

`capture` runs the platform as bench_pipeline does (`RunningPlatform`: every service a process, the same
segment "bench_hot", the same journey: a webhook and a HubSpot task on entering it, the dev CRM
connections of cdpctl/dev/crm.yaml), sends one identify per person and then `--seconds` of Segment track
batches (bench_pipeline's `Load`, probes included) at `--rate`, waits until every stage has caught up,
and writes what the two input streams hold - `ORCHESTRATION` (resolved events, profile changes, segment
changes, fired timers, as nats-server sourced them) and `CRM` (profile changes, segment changes,
`actions.crm`) - message by message: subject, headers, payload, stream time and position.

`replay` feeds those messages, in stream order, a partition's consecutive messages `--batch` at a time,
to the service's engine logic (`OrchestrationLogic` / `CrmLogic`) on a fresh SQLite store in this
process: `decode` each message, `apply` the batch, and write its `Effects` in one `bulk_write` (the
engine's commit, less its checkpoint and outbox records). The warm-up's messages (up to the last one
naming a "warm-" id: every person new everywhere) are applied first and not measured. Orchestration gets
the journey published and the default arbiter rules, and a profile service that knows nobody (no person
is ever read from it here: each is new, kept under the current set of fields); the CRM connector gets the
dev connections against a local HubSpot and Salesforce (the emulators, each its own process, their CPU
not counted; the budget waits for HubSpot's window as in the pipeline, so a replay takes ~30 s) and a
profile service that knows nobody. Printed per replay (JSON): CPU (this process' `time.process_time`,
every thread: the store's too) per message, per stage (decode / apply / commit) and per stream of a
batch's first message (`by_stream`: messages, then µs per message of each stage), the writes by
collection and the messages published; `--repeat N` replays N times, each on a fresh store; `--effects
FILE` writes every measured batch's writes and messages, to check that two commits decide the same
(ActionMessage payloads compared parsed: their maps' byte order differs between processes). Left out:
the kit's engine around the logic (fetching, acknowledging, the outbox, metrics), which
`engine_batch_cost.py` measures. To compare two commits, run `replay` with each commit's sources first on
the path (`PYTHONPATH=<worktree>/services/orchestration/src:<worktree>/services/crm/src`), alternating:
the machine's other load moves absolute figures by a third from one run to the next.

A measuring tool for people (no benchlib result file).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parent.parent
STREAMS = {"orchestration": ("ORCHESTRATION", "orchestration.in.>"), "crm": ("CRM", "crm.in.>")}


# --- capture ---------------------------------------------------------------------------------------------


async def capture(args: argparse.Namespace) -> None:
    from bench_pipeline import Load, Pipeline
    from pipeline_parts import settle

    from cdp_testing.platform_run import RunningPlatform

    load = Load(args.users, 50)
    with tempfile.TemporaryDirectory() as tmp, RunningPlatform(Path(tmp)) as platform:
        pipe = Pipeline(platform)
        pipe.set_up()
        await pipe.observer.start(platform.nats_url)
        try:
            await pipe.sender.offer([(b, []) for b in load.everyone()], 2000 / load.batch)
            bodies = load.bodies(args.rate, args.seconds, 0.1)
            sent = await pipe.sender.offer(bodies, args.rate / load.batch)
            print(f"sent {sent['posts']} batches: {sent['statuses']}", flush=True)
            js = pipe.observer.nc.jetstream()
            await settle(js, 120.0, ignore=("crm",))
            await asyncio.sleep(3.0)  # the sourcing into CRM (its consumer is not waited for)
            out = {}
            for name, (stream, subject) in STREAMS.items():
                out[name] = await dump(js, stream, subject)
                print(f"{stream}: {len(out[name])} messages", flush=True)
            out["partitions"] = partitions_of(out)
        finally:
            await pipe.observer.stop()
    await asyncio.to_thread(Path(args.file).write_bytes, pickle.dumps(out))


def partitions_of(found: dict) -> int:
    """The platform's partition count, as its input subjects show it (every partition gets some of the load)."""
    return 1 + max(int(m["subject"].rsplit(".", 1)[1]) for name in STREAMS for m in found[name])


async def dump(js, stream: str, subject: str) -> list[dict]:
    import nats.errors

    info = await js.stream_info(stream)
    last = info.state.last_seq
    sub = await js.pull_subscribe(subject, stream=stream)
    found: list[dict] = []
    while not found or found[-1]["seq"] < last:
        try:
            msgs = await sub.fetch(500, timeout=2)
        except nats.errors.TimeoutError:
            break
        for msg in msgs:
            found.append(
                {
                    "subject": msg.subject,
                    "headers": dict(msg.headers or {}),
                    "data": msg.data,
                    "at": msg.metadata.timestamp.timestamp(),
                    "seq": msg.metadata.sequence.stream,
                }
            )
            await msg.ack()
    await sub.unsubscribe()
    return found


# --- replay ----------------------------------------------------------------------------------------------


def deliveries(messages: list[dict]):
    """The captured messages as the engine's `Delivery` objects see them (subject, headers, payload, stream
    time and position)."""
    from cdp_kit.bus import Delivery

    out = []
    for m in messages:
        metadata = SimpleNamespace(
            timestamp=dt.datetime.fromtimestamp(m["at"], dt.UTC),
            sequence=SimpleNamespace(stream=m["seq"]),
            num_delivered=1,
        )
        msg = SimpleNamespace(subject=m["subject"], headers=m["headers"], data=m["data"], metadata=metadata)
        out.append((int(m["subject"].rsplit(".", 1)[1]), Delivery(msg)))
    return out


def batches(delivered: list, size: int) -> list[tuple[int, list]]:
    """A partition's consecutive messages, `size` at a time, in stream order."""
    out: list[tuple[int, list]] = []
    open_: dict[int, list] = {}
    for partition, delivery in delivered:
        group = open_.setdefault(partition, [])
        group.append(delivery)
        if len(group) >= size:
            out.append((partition, group))
            open_[partition] = []
    out.extend((p, g) for p, g in open_.items() if g)
    return out


async def nobody(person_ids):
    """The profile service's BatchGetProfiles, as orchestration and the CRM connector read it, knowing nobody."""
    return {}


async def orchestration_logic(store, partitions: int):
    from bench_pipeline import JOURNEY

    from cdp_kit.storage import Put
    from cdp_orchestration.arbiter_rules import compile_rules
    from cdp_orchestration.engine import OrchestrationLogic
    from cdp_orchestration.journeys import JOURNEYS, Journeys
    from cdp_orchestration.state import prepare_store

    await prepare_store(store)
    # The journey as PublishJourney stores it: active, version 1.
    doc = {"state": "active", "versions": {"1": {**JOURNEY, "version": 1}}, "draft": None, "counted": {},
           "draft_counted": [], "name": JOURNEY["name"], "priority": JOURNEY["priority"], "created_at": 0.0,
           "updated_at": 0.0, "published_at": 0.0}  # fmt: skip
    await store.bulk_write([Put(JOURNEYS, JOURNEY["id"], doc)])
    journeys = Journeys(store)
    await journeys.load()
    assert journeys.live(), f"the journey did not load: {journeys.invalid}"
    rules = await compile_rules(None, store, None)
    return OrchestrationLogic(store, journeys, rules, partitions=partitions, profile=nobody), []


class Emulators:
    """The local HubSpot and Salesforce, each its own process."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.ports: dict[str, int] = {}

    def start(self) -> dict[str, int]:
        from cdp_kit.natsserver import free_port, wait_for_port

        for crm in ("hubspot", "salesforce"):
            port = free_port()
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "cdp_crm_emulators", crm, f"--port={port}"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            self.ports[crm] = port
        for port in self.ports.values():
            wait_for_port("127.0.0.1", port, 30)
        return self.ports

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(10)


async def crm_logic(store, partitions: int, ports: dict[str, int], session):
    from cdp_crm.budgets import SharedBudget
    from cdp_crm.connectors import open_available
    from cdp_crm.delivery import Deliverer
    from cdp_crm.domain.mapping import load_connections
    from cdp_crm.engine import CrmLogic
    from cdp_crm.state import prepare_store

    text = (REPO / "libs/cdpctl/src/cdpctl/dev/crm.yaml").read_text()
    text = text.replace("{crm-hubspot.api}", str(ports["hubspot"])).replace(
        "{crm-salesforce.api}", str(ports["salesforce"])
    )
    text = text.replace("{crm.http}", "1")
    env = {
        "CDP_DEV_HUBSPOT_TOKEN": "pat-local-hubspot",
        "CDP_DEV_HUBSPOT_CLIENT_SECRET": "hubspot-app-secret",
        "CDP_DEV_HUBSPOT_DEVELOPER_KEY": "local-developer-key",
        "CDP_DEV_SALESFORCE_CLIENT_ID": "local-consumer-key",
        "CDP_DEV_SALESFORCE_CLIENT_SECRET": "local-consumer-secret",
    }
    await prepare_store(store)
    connections = load_connections(text, form="yaml")
    adapters, _ = open_available(connections, session, env, timeout=10.0)
    budgets = {c.id: SharedBudget(store, c) for c in connections}
    deliverer = Deliverer(adapters, budgets, retry_for=30.0)
    logic = CrmLogic(store, connections, deliverer, refresh=nobody, identifiers=nobody)
    return logic, [deliverer]


async def replay_once(args: argparse.Namespace, found: dict, ports: dict[str, int] | None) -> dict:
    import aiohttp

    from cdp_kit.bus.streams import source_of
    from cdp_kit.storage import open_store

    gc.set_threshold(50_000, 20, 100)  # as the services run
    messages = found[args.service]
    # The warm-up (one identify per person: each person new everywhere) is applied first, unmeasured.
    warm = 1 + max((i for i, m in enumerate(messages) if b"warm-" in m["data"]), default=-1)
    delivered = deliveries(messages)
    prelude, work = batches(delivered[:warm], args.batch), batches(delivered[warm:], args.batch)
    stages = {"decode": 0.0, "apply": 0.0, "commit": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        async with open_store(f"sqlite:///{tmp}/replay.db") as store, aiohttp.ClientSession() as session:
            if args.service == "orchestration":
                logic, closing = await orchestration_logic(store, found["partitions"])
            else:
                logic, closing = await crm_logic(store, found["partitions"], ports or {}, session)
            for partition, group in prelude:
                effects = await logic.apply(partition, [logic.decode(d) for d in group])
                if effects.writes:
                    await store.bulk_write(effects.writes)
            clock = time.process_time
            started = clock()
            wall = time.perf_counter()
            rejected = published = 0
            written: dict[str, int] = {}
            effects_seen: list = []
            by_kind: dict[str, list] = {}  # the first message's stream -> [messages, decode, apply, commit]
            for partition, group in work:
                t0 = clock()
                items = []
                for delivery in group:
                    try:
                        items.append(logic.decode(delivery))
                    except Exception:
                        rejected += 1
                t1 = clock()
                effects = await logic.apply(partition, items)
                t2 = clock()
                if effects.writes:
                    for op in effects.writes:
                        written[getattr(op, "collection", type(op).__name__)] = (
                            written.get(getattr(op, "collection", type(op).__name__), 0) + 1
                        )
                    await store.bulk_write(effects.writes)
                published += len(effects.messages)
                if args.effects:
                    effects_seen.append(
                        (
                            partition,
                            [(type(op).__name__, getattr(op, "collection", ""), getattr(op, "key", ""),
                              getattr(op, "doc", None)) for op in effects.writes],
                            [(m.subject, m.msg_id, m.payload, m.headers) for m in effects.messages],
                        )
                    )  # fmt: skip
                t3 = clock()
                stages["decode"] += t1 - t0
                stages["apply"] += t2 - t1
                stages["commit"] += t3 - t2
                kind = source_of(group[0].headers)[0] or "command"
                seen = by_kind.setdefault(kind, [0, 0.0, 0.0, 0.0])
                seen[0] += len(group)
                seen[1] += t1 - t0
                seen[2] += t2 - t1
                seen[3] += t3 - t2
            cpu = clock() - started
            wall = time.perf_counter() - wall
            for thing in closing:
                close = getattr(thing, "close", None)
                if close is not None:
                    await close()
    n = len(delivered) - warm
    if args.effects:
        await asyncio.to_thread(Path(args.effects).write_bytes, pickle.dumps(effects_seen))
    return {
        "messages": n,
        "warm_messages": warm,
        "batches": len(work),
        "rejected": rejected,
        "cpu_s": cpu,
        "wall_s": wall,
        "us_per_message": 1e6 * cpu / n,
        "stages_us_per_message": {k: round(1e6 * v / n, 1) for k, v in stages.items()},
        "written": written,
        # by the stream of a batch's first message: messages, then decode / apply / commit µs per message
        "by_stream": {k: [n, *(round(1e6 * v / n, 1) for v in times)] for k, (n, *times) in sorted(by_kind.items())},
        "published": published,
    }


async def replay(args: argparse.Namespace) -> None:
    found = pickle.loads(await asyncio.to_thread(Path(args.file).read_bytes))
    emulators = Emulators() if args.service == "crm" else None
    ports = emulators.start() if emulators else None
    try:
        for _ in range(args.repeat):
            result = await replay_once(args, found, ports)
            print(json.dumps({"service": args.service, **result}), flush=True)
    finally:
        if emulators:
            emulators.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cap = sub.add_parser("capture", help="run the platform under load and write its input streams to FILE")
    cap.add_argument("file")
    cap.add_argument("--rate", type=int, default=2000, help="events/s of the load")
    cap.add_argument("--seconds", type=float, default=10.0)
    cap.add_argument("--users", type=int, default=10_000)
    rep = sub.add_parser("replay", help="replay FILE's messages through one service's engine logic")
    rep.add_argument("file")
    rep.add_argument("--service", choices=sorted(STREAMS), required=True)
    rep.add_argument("--batch", type=int, default=1, help="a partition's consecutive messages per batch")
    rep.add_argument("--repeat", type=int, default=1)
    rep.add_argument("--effects", help="write every measured batch's effects (writes, messages) to this file")
    args = parser.parse_args()
    os.environ.setdefault("OTEL_SDK_DISABLED", "true")
    asyncio.run(capture(args) if args.command == "capture" else replay(args))


if __name__ == "__main__":
    main()
