"""A profile replica frozen past its lease with commits on their way, then woken, with real processes: the
next owner's work stands, no event is lost, none applied twice, and each person's events stay in the
order they were published; the woken replica stops working on what it lost (fenced or cut, at ERROR).

What runs: as in test_profile_scaling (whose load, lease watch and read-backs this reuses): a real
nats-server, two `python -m cdp_profile` processes with `CDP_OWNERSHIP=nats` and a short
`CDP_OWNERSHIP_TTL`, on one SQLite file, under a steady load of events carrying per-person sequence
numbers. Each replica logs to a file of its own.

The story: A and B share the partitions under load. The test takes the SQLite file's write lock (BEGIN
IMMEDIATE on a connection of its own), so every commit either replica submits waits in its writer thread
for the lock; once A has applied a batch since (its `cdp.engine.batch.apply` count on /metrics moved: that
batch's commit was submitted after the lock was taken, so it waits) and each of A's partitions has
messages delivered and not acknowledged, A is frozen with SIGSTOP (a long GC pause, a frozen VM) and,
once every thread of it reads stopped, the lock is let go. A's commits stay where they were: its writer
thread is frozen with the rest of it. B goes on; A's leases expire (a TTL without renewal), B takes every
partition and commits on each of A's (its checkpoint moves past where it was when A froze). Then A is
woken with SIGCONT: the first thing it does, before its event loop has read the KV bucket, is the commit
its writer thread was waiting to make - a commit of what B has since applied again and moved on from. The load goes on while A finds it lost its leases and
takes its share back; then it stops.

At the end, as test_profile_scaling asserts: every person's stored timeline is exactly the events
published for them, each once, in order, and `profiles.changed` lists each person's events once each in
sequence order. And A logged, at ERROR, each partition it had to give up while frozen: fenced (its
commit refused, another owner's token on the checkpoint) or its release cut (its lease taken while it
drained), naming the partition.

Both conditions on the freeze are what the story needs, not timing. os.kill returns once SIGSTOP is
queued: the kernel wakes one of A's threads to take it, and the others stop only after that one has run.
On a loaded machine A's writer could take the lock as the test let it go and be frozen inside its
transaction, holding the file's write lock: B could write nothing while A was frozen (its claims of
A's partitions each waited busy_timeout, "restarting after Unavailable" every ~5 s) and the test timed
out (1 full-suite run in 9; forced with gdb, the same). And messages delivered and not acknowledged are
not a commit waiting (they may still sit in A's pull, unapplied): one run in 20 under load froze A with
no commit of it waiting, and A, woken, gave its partitions up cleanly and logged no fence and no cut.

What it found, beyond the fence (cdp_kit.engine): profile releases its inputs' partitions together
(`asyncio.gather`), and the cut, its deadline passed when A woke, cancelled those drains before they
began - the pipelines worked on and stayed the engines' own, so when A took its share back it held the
leases and worked on nothing ("all at work" never came). And A's standing pulls, finding no heartbeat for
longer than they wait, asked again of the consumers B had restarted under the same names: what the
server handed A, B never saw, went past, and skipped as applied when it came again (events missing, one
run in three).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import sqlite3
import time
import urllib.request
from pathlib import Path

import nats
import pytest

from cdp_kit.bus.streams import ensure_stream, events_resolved_stream
from cdp_kit.natsserver import free_port
from cdp_kit.ownership.nats_kv import NatsKvLeaseStore
from cdp_testing.pausing import pause, resume
from cdp_testing.processes import ProfileProcess


def _scaling():
    """test_profile_scaling's load and read-backs (a sibling test module: loaded from its file)."""
    path = Path(__file__).with_name("test_profile_scaling.py")
    spec = importlib.util.spec_from_file_location("_cdp_profile_scaling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


scaling = _scaling()
PARTITIONS = scaling.PARTITIONS
TTL = scaling.TTL
FENCED = "another owner has claimed checkpoint"  # the engine's line (pipeline._fence)
CUT = "ownership release cut short"  # the ownership's line (leased._chain)
APPLIED = "cdp_engine_batch_apply_duration_milliseconds_count{"  # batches applied (PartitionedEngine.m_apply)
EVENTS = 'service="profile"'  # of events.resolved (scores and merges are profile-scores, profile-merges)


class WriteLock:
    """The store file's write lock, held by the test: every replica's commit waits for it (busy_timeout)."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=10, check_same_thread=False)

    async def take(self) -> None:
        await asyncio.to_thread(self.conn.execute, "BEGIN IMMEDIATE")

    async def release(self) -> None:
        if self.conn.in_transaction:
            await asyncio.to_thread(self.conn.execute, "ROLLBACK")

    def close(self) -> None:
        self.conn.close()


def checkpoints(path: Path) -> dict[int, int]:
    """Per partition, the stream position profile's checkpoint record holds."""
    conn = sqlite3.connect(path, timeout=10)
    try:
        rows = conn.execute("SELECT key, doc FROM documents WHERE collection = 'profile_checkpoints'").fetchall()
    finally:
        conn.close()
    return {int(key.rsplit(".", 1)[1]): json.loads(doc).get("stream_seq", 0) for key, doc in rows}


async def until(condition, what: str, timeout: float) -> None:
    """Until `condition()` (awaited if need be) is true; fails after `timeout` seconds naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"not {what} in {timeout:g} s"
        await asyncio.sleep(0.02)


def batches_applied(metrics_port: int) -> int:
    """How many batches of events the replica serving /metrics on `metrics_port` has applied so far."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
        lines = answer.read().decode().splitlines()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in lines if line.startswith(APPLIED) and EVENTS in line)


def error_lines(log: Path, text: str) -> list[dict]:
    """The ERROR records of a replica's JSON log whose message holds `text`."""
    out = []
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("level") == "ERROR" and text in str(record.get("msg", "")):
                out.append(record)
    return out


@pytest.mark.timeout(120)
async def test_replica_frozen_past_its_lease_with_commits_in_flight_loses_nothing_and_undoes_nothing(
    nats_server, tmp_path
):
    db = tmp_path / "profile.db"
    store_url = f"sqlite:///{db}"

    def replica(name: str, ordinal: int, **env: str) -> ProfileProcess:
        workdir = tmp_path / name  # a log file of its own
        workdir.mkdir()
        return ProfileProcess(
            nats_server.url,
            workdir,
            store_url=store_url,
            partitions=PARTITIONS,
            CDP_OWNERSHIP="nats",
            CDP_OWNERSHIP_TTL=str(TTL),
            CDP_POD_NAME=name,
            CDP_POD_ORDINAL=str(ordinal),  # its own identity.* durable
            CDP_PROFILE_BATCH_SIZE="16",
            CDP_IDENTITY_ADDRESS="127.0.0.1:1",
            **env,
        )

    a_metrics = free_port()
    a, b = replica("profile-a", 0, CDP_METRICS_PORT=str(a_metrics)), replica("profile-b", 1)
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    leases = scaling.Leases((await NatsKvLeaseStore.open(js, "profile")).kv)
    load = scaling.Load(js)
    lock: WriteLock | None = None
    frozen = False
    began = time.monotonic()
    try:
        await ensure_stream(js, events_resolved_stream())
        await leases.start()
        await asyncio.gather(asyncio.to_thread(a.start), asyncio.to_thread(b.start))
        await leases.settled({"profile-a", "profile-b"})
        load.start()
        # Both at work: every partition has a checkpoint past its first messages.
        await until(lambda: len(c := checkpoints(db)) == PARTITIONS and min(c.values()) > 0, "all committed", 20)

        # A's commits on their way: the lock held, a batch A applied since then (its commit, submitted
        # after the lock was taken, waits for it in A's writer thread), and each of A's partitions with
        # messages delivered and not acknowledged. Delivered is not applied: they may still sit in A's pull.
        mine = sorted(p for p in range(PARTITIONS) if leases.holders.get(p) == "profile-a")
        assert mine, f"A holds no partition: {leases.holders}"
        lock = WriteLock(db)
        await lock.take()
        applied_before = await asyncio.to_thread(batches_applied, a_metrics)

        async def a_waits_on_commits() -> bool:
            if await asyncio.to_thread(batches_applied, a_metrics) == applied_before:
                return False
            infos = [await js.consumer_info("EVENTS_RESOLVED", f"profile-p{p}") for p in mine]
            return all(info.num_ack_pending for info in infos)

        # Within busy_timeout (5 s): a commit waiting longer fails, and A would recover before it froze.
        await until(a_waits_on_commits, "A with a batch applied and its commit waiting", 4)
        frozen = True
        # Every thread of A stopped before the lock is let go: one still running could take the lock and be
        # frozen inside its transaction (B could write nothing), or land the commit before A froze.
        await asyncio.to_thread(pause, a.proc.pid)
        at_freeze = checkpoints(db)  # read under the test's own lock: nobody wrote since it was taken
        await lock.release()

        # B takes every lease once A's expire, and commits on each of A's partitions.
        await leases.settled({"profile-b"}, timeout=TTL * 3 + 10)
        await until(
            lambda: all(checkpoints(db).get(p, 0) > at_freeze.get(p, 0) for p in mine), "B committed on A's", 20
        )

        # A wakes (its frozen commits first), finds its leases gone, and takes its share back.
        resume(a.proc.pid)
        frozen = False
        await leases.settled({"profile-a", "profile-b"}, timeout=TTL * 5 + 10)
        # The load goes on until every partition has moved on since (A's back at work on its share).
        back = {p: checkpoints(db).get(p, 0) for p in range(PARTITIONS)}
        await until(lambda: all(checkpoints(db).get(p, 0) > back[p] for p in range(PARTITIONS)), "all at work", 20)
        await load.stop()

        await scaling.drained(js)
        changes = await scaling.published_changes(js)
        await asyncio.gather(asyncio.to_thread(a.stop), asyncio.to_thread(b.stop))
        timelines = await scaling.stored_timelines(store_url)
        elapsed = time.monotonic() - began

        expected = {person: [f"scale:{person}-{seq}" for seq in seqs] for person, seqs in load.sent.items()}
        assert len(expected) == scaling.PERSONS
        lost = {p: sorted(set(ids) - set(timelines.get(p, []))) for p, ids in expected.items()}
        assert {p: ids for p, ids in lost.items() if ids} == {}, "events missing from the stored profiles"
        assert {p: ids for p, ids in timelines.items() if ids != expected.get(p)} == {}, (
            "a stored timeline differs from what was published (doubled, extra or out of order)"
        )
        assert {p: ids for p, ids in changes.items() if ids != expected.get(p)} == {}, (
            "profiles.changed lists a person's events other than exactly once each, in publication order"
        )

        # A logged each partition it gave up while frozen, at ERROR, by number: fenced or cut.
        fenced = {int(r["partition"]) for r in error_lines(a.log_path, FENCED) if "partition" in r}
        cut = {int(r["partition"]) for r in error_lines(a.log_path, CUT) if "partition" in r}
        assert fenced | cut, f"A logged no fenced or cut partition; see {a.log_path}"
        assert (fenced | cut) <= set(mine), f"A logged partitions it did not hold: {sorted(fenced | cut)} {mine}"
        # B never stalled: nobody overtook its claims.
        assert error_lines(b.log_path, FENCED) == []
        print(
            f"\nstalled replica: {load.events} events for {scaling.PERSONS} persons over {PARTITIONS} partitions; "
            f"A held {mine}, fenced {sorted(fenced)}, cut {sorted(cut)}; {elapsed:.1f}s in all"
        )
    finally:
        if frozen:
            resume(a.proc.pid)
        if lock is not None:
            with contextlib.suppress(Exception):
                await lock.release()
            lock.close()
        with contextlib.suppress(Exception):
            await load.stop()
        for r in (a, b):
            await asyncio.to_thread(r.stop)
        await leases.stop()
        await nc.close()
