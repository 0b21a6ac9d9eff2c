"""Profile scaled 1 -> 3 -> 2 replicas under a steady load, with real processes: no event lost, none
applied twice, and each person's events applied in the order they were published.

What runs: a real nats-server (`cdp_testing`), and `python -m cdp_profile` processes started the way the
fault tests start services (`cdp_testing.processes`), with `CDP_OWNERSHIP=nats` and a short
`CDP_OWNERSHIP_TTL`, all on one SQLite file, as `make up` gives profile one file (`.cdp/data/profile.db`).
The embedded store supports that: every write is one `BEGIN IMMEDIATE` transaction that reads the
versions it checks inside the transaction, and WAL lets readers of other processes run beside it.

The story: replica 0 takes every partition; the load starts (persons spread over the partitions, each
event carrying its person's sequence number); replicas 1 and 2 join and take their share; replica 1
then leaves - by SIGTERM (it drains and frees its leases: the others take over at once) or by SIGKILL
(it frees nothing: its leases move once they have not been renewed for the TTL); the load stops.

At the end, from the store and from `profiles.changed`: every person's timeline holds exactly the
events published for it, and the changes published for each person list its events exactly once, in
sequence order (a change is published after its batch is applied, in the order of application). The
lease history in the KV bucket shows the moves.

On a loaded machine a replica whose renewals come late fences itself (`cdp_kit.ownership.leased`): it stops
working on its partitions without freeing their leases, and takes them back on its next round. Stopped
between the two, it has nothing left to hand over: those leases are taken once they have expired. The
SIGTERM leg tells them from a hand-over that failed by the replica's own log (`let_go_by_a_fence`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import defaultdict
from datetime import datetime
from itertools import pairwise

import nats
import pytest

from cdp.events.v1 import events_pb2
from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import events_resolved_stream, partition_for
from cdp_kit.bus.streams import ensure_stream
from cdp_kit.ownership.nats_kv import NatsKvLeaseStore
from cdp_kit.storage import open_store
from cdp_profile.domain import Retention
from cdp_profile.records import decode_profile, row_entries
from cdp_testing.processes import ProfileProcess

PARTITIONS = 8
PERSONS = 120
EVENTS_PER_TICK = 20
TICK = 0.05  # 400 events/s
TTL = 3.0  # short, yet long enough that a busy 2-core machine does not expire a live replica's leases
START = time.time() - 86_400  # event times: START + the person's sequence number (seconds)


class Load:
    """Events for many persons, published on events.resolved.<p> at a steady rate; per person, the
    sequence numbers in publication order."""

    def __init__(self, js) -> None:
        self.js = js
        self.sent: dict[str, list[int]] = defaultdict(list)
        self.events = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def _run(self) -> None:
        turn = 0
        while not self._stop.is_set():
            started = time.monotonic()
            by_partition: dict[int, list[events_pb2.ResolvedEvent]] = defaultdict(list)
            for _ in range(EVENTS_PER_TICK):
                person = f"person-{turn % PERSONS:03d}"
                turn += 1
                seq = len(self.sent[person])
                self.sent[person].append(seq)
                by_partition[partition_for(person, PARTITIONS)].append(event(person, seq))
            for p, events in by_partition.items():
                batch = events_pb2.ResolvedEventBatch(events=events)
                await self.js.publish(f"events.resolved.{p}", batch.SerializeToString())
            self.events += EVENTS_PER_TICK
            await asyncio.sleep(max(0.0, TICK - (time.monotonic() - started)))


def event(person: str, seq: int) -> events_pb2.ResolvedEvent:
    ev = events_pb2.Event(
        message_id=f"{person}-{seq}", source_id="scale", user_id=person, type=events_pb2.EVENT_TYPE_TRACK
    )
    ev.event = "Viewed"
    ev.properties.update({"seq": seq})
    ev.timestamp.FromMilliseconds(int((START + seq) * 1000))
    ev.received_at.FromMilliseconds(int(time.time() * 1000))
    return events_pb2.ResolvedEvent(event=ev, person_id=person, identifiers=[f"user_id:{person}"])


class Leases:
    """The holders of profile's partition leases, from a watch on the KV bucket, and their history."""

    def __init__(self, kv) -> None:
        self.kv = kv
        self.holders: dict[int, str] = {}
        self.history: dict[int, list[str]] = defaultdict(list)  # every value written, "" when freed
        # Every write: (when the server stored it, wall clock; holder or ""; revision).
        self.writes: dict[int, list[tuple[float, str, int]]] = defaultdict(list)
        self.began = time.time()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        watcher = await self.kv.watch("profile.partitions.>")

        async def follow() -> None:
            try:
                async for entry in watcher:
                    if entry is None:
                        continue
                    p = int(entry.key.rsplit(".", 1)[1])
                    holder = (entry.value or b"").decode() if entry.operation not in ("DEL", "PURGE") else ""
                    self.writes[p].append((entry.created.timestamp(), holder, entry.revision))
                    if not self.history[p] or self.history[p][-1] != holder:
                        self.history[p].append(holder)
                    self.holders[p] = holder
            finally:
                await watcher.stop()

        self._task = asyncio.create_task(follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def settled(self, members: set[str], timeout: float = 20.0) -> float:
        """Wait until every partition is held by one of `members`, each holding its share; seconds taken."""
        started = time.monotonic()
        share = PARTITIONS // len(members)
        while True:
            held = [self.holders.get(p, "") for p in range(PARTITIONS)]
            if set(held) <= members and all(held.count(m) >= share for m in members):
                return time.monotonic() - started
            assert time.monotonic() - started < timeout, f"leases not settled on {sorted(members)}: {held}"
            await asyncio.sleep(0.05)

    def moves(self) -> int:
        """Partitions that changed hands (a holder followed by another, freed in between or not)."""
        count = 0
        for values in self.history.values():
            owners = [v for v in values if v]
            count += sum(1 for a, b in pairwise(owners) if a != b)
        return count

    def taken_without_free(self, holder: str | None = None) -> int:
        """Leases that passed straight from one holder (`holder`, or any) to another: taken after the
        TTL, not handed over."""
        count = 0
        for values in self.history.values():
            count += sum(1 for a, b in pairwise(values) if a and b and a != b and holder in (None, a))
        return count

    def taken_from(self, holder: str) -> list[tuple[int, float]]:
        """Each lease another took straight from `holder`: (partition, when `holder`'s last write to it
        before that was stored)."""
        taken = []
        for p, writes in self.writes.items():
            for (at, old, _), (_, new, _) in pairwise(writes):
                if old == holder and new and new != holder:
                    taken.append((p, at))
        return taken

    def story(self, holder: str) -> str:
        """Each lease `holder` ever held: its writes with their times (seconds since the watch began)."""
        return "; ".join(
            f"p{p}: "
            + ", ".join(f"{at - self.began:.2f}s {value or 'free'} r{revision}" for at, value, revision in writes)
            for p, writes in sorted(self.writes.items())
            if holder in self.history[p]
        )


FENCE_MESSAGE = "ownership leases not renewed in time: releasing all"  # cdp_kit.ownership.leased


def ownership_lines(process: ProfileProcess) -> list[str]:
    """What the replicas' shared log says of their ownership (warnings and errors: fences, cut releases,
    leases not freed; not every line names its member)."""
    if not process.log_path.exists():
        return []
    return [line for line in process.log_path.read_text().splitlines() if "ownership" in line]


def fenced_at(process: ProfileProcess, member: str) -> list[float]:
    """When `member` fenced itself (wall clock, as its log says: to the millisecond, rounded down)."""
    times = []
    for line in ownership_lines(process):
        record = json.loads(line)
        if record.get("msg") == FENCE_MESSAGE and record.get("member") == member:
            times.append(datetime.fromisoformat(record["ts"]).timestamp())
    return times


def let_go_by_a_fence(taken: list[tuple[int, float]], fences: list[float], stopped: float) -> list[int]:
    """The partitions of `taken` whose lease its holder had let go by fencing itself before it was stopped
    (at `stopped`), and not taken back since: such a lease is no longer its holder's to hand over
    (`LeasedOwnership._fence_if_stale`); still its in the store, it is taken once it has expired.
    A member that fenced itself holds nothing and sleeps a whole round (`interval`, TTL/3) before the next
    one, the first that may take a lease back: a write of it stored before that is no retake. It was made
    before the fence, or was a renewal of the round the fence cut, landing after it."""
    interval = TTL / 3
    return [
        p
        for p, last_write in taken
        if any(fence + 0.001 < stopped and last_write < fence + interval for fence in fences)
    ]


async def drained(js, timeout: float = 30.0) -> None:
    """Every partition's events delivered to profile and acknowledged (so applied, stored and published)."""
    deadline = time.monotonic() + timeout
    while True:
        busy = []
        for p in range(PARTITIONS):
            try:
                info = await js.consumer_info("EVENTS_RESOLVED", f"profile-p{p}")
            except Exception:
                busy.append(p)
                continue
            if info.num_pending or info.num_ack_pending:
                busy.append(p)
        if not busy:
            return
        assert time.monotonic() < deadline, f"partitions {busy} not drained in {timeout}s"
        await asyncio.sleep(0.2)


async def published_changes(js) -> dict[str, list[str]]:
    """Per person, the event ids of every profiles.changed change, in stream order."""
    out: dict[str, list[str]] = defaultdict(list)
    sub = await js.subscribe("profiles.changed.>", ordered_consumer=True, deliver_policy="all")
    try:
        last = (await js.stream_info("PROFILES")).state.last_seq
        seen = 0
        while seen < last:
            msg = await sub.next_msg(timeout=5)
            seen = msg.metadata.sequence.stream
            for change in profile_pb2.ProfileChangedBatch.FromString(msg.data).changes:
                out[change.person_id].extend(change.event_ids)
    finally:
        await sub.unsubscribe()
    return out


async def stored_timelines(store_url: str) -> dict[str, list[str]]:
    retention = Retention(max_events=10_000, max_age_seconds=None)
    async with open_store(store_url) as store:
        entries = defaultdict(list)
        async for record in store.scan_all("profile_timeline", page_size=5000):
            for entry in row_entries(record.doc):  # a page, or one entry (older releases)
                entries[entry.origin].append(entry)
        out = {}
        async for record in store.scan_all("profiles"):
            profile = decode_profile(record.doc, entries.get(record.key, []), retention)
            out[record.key] = [e.event_id for e in profile.timeline()]
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("leave", ["SIGTERM", "SIGKILL"])
async def test_scaling_1_3_2_under_load_loses_doubles_and_reorders_nothing(nats_server, tmp_path, leave):
    store_url = f"sqlite:///{tmp_path / 'profile.db'}"

    def replica(i: int) -> ProfileProcess:
        return ProfileProcess(
            nats_server.url,
            tmp_path,
            store_url=store_url,
            partitions=PARTITIONS,
            CDP_OWNERSHIP="nats",
            CDP_OWNERSHIP_TTL=str(TTL),
            CDP_POD_NAME=f"profile-{i}",
            CDP_POD_ORDINAL=str(i),  # its own identity.* durable
            CDP_PROFILE_BATCH_SIZE="16",
            CDP_IDENTITY_ADDRESS="127.0.0.1:1",
        )

    replicas = [replica(i) for i in range(3)]
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    leases = Leases((await NatsKvLeaseStore.open(js, "profile")).kv)
    load = Load(js)
    began = time.monotonic()
    try:
        await ensure_stream(js, events_resolved_stream())
        await leases.start()
        await asyncio.to_thread(replicas[0].start)
        await leases.settled({"profile-0"})
        load.start()
        await asyncio.sleep(1.5)

        # 1 -> 3
        await asyncio.gather(*(asyncio.to_thread(r.start) for r in replicas[1:]))
        joined = await leases.settled({"profile-0", "profile-1", "profile-2"})
        await asyncio.sleep(1.5)

        # 3 -> 2
        left, stopped = time.monotonic(), time.time()
        await asyncio.to_thread(replicas[1].stop if leave == "SIGTERM" else replicas[1].kill)
        await leases.settled({"profile-0", "profile-2"}, timeout=TTL * 5 + 10)
        took_over = time.monotonic() - left
        await asyncio.sleep(1.5)
        await load.stop()

        await drained(js)
        changes = await published_changes(js)
        for r in replicas:
            await asyncio.to_thread(r.stop)
        timelines = await stored_timelines(store_url)
        elapsed = time.monotonic() - began

        expected = {person: [f"scale:{person}-{seq}" for seq in seqs] for person, seqs in load.sent.items()}
        assert len(expected) == PERSONS
        lost = {p: sorted(set(ids) - set(timelines.get(p, []))) for p, ids in expected.items()}
        assert {p: ids for p, ids in lost.items() if ids} == {}, "events missing from the stored profiles"
        assert {p: ids for p, ids in timelines.items() if ids != expected.get(p)} == {}, (
            "a stored timeline differs from what was published (doubled, extra or out of order)"
        )
        assert {p: ids for p, ids in changes.items() if ids != expected.get(p)} == {}, (
            "profiles.changed lists a person's events other than exactly once each, in publication order"
        )
        if leave == "SIGTERM":
            # It handed its partitions over: every one of its leases was freed before another took it. Only a
            # lease it had let go by fencing itself before the stop (renewals late on a loaded machine) is not
            # its to free: that one is taken once it has expired.
            taken = leases.taken_from("profile-1")
            fenced = let_go_by_a_fence(taken, fenced_at(replicas[1], "profile-1"), stopped)
            assert sorted(p for p, _ in taken) == sorted(fenced), (
                f"replica 1 stopped at {stopped - leases.began:.2f}s; its leases: {leases.story('profile-1')}; "
                f"ownership log: {ownership_lines(replicas[1])}"
            )
            print(f"\nreplica 1 let {len(fenced)} leases go by a fence before the stop")
        else:
            # It could not: its leases were taken once they had not been renewed for the TTL.
            assert leases.taken_without_free("profile-1") >= 1
            # A lease expires one TTL after the last renewal the others saw, at most a round (TTL/3)
            # before the kill.
            assert took_over >= TTL * 2 / 3 - 0.1
        print(
            f"\nscaling 1->3->2 ({leave}): {load.events} events for {PERSONS} persons over {PARTITIONS} partitions, "
            f"{leases.moves()} partition moves ({leases.taken_without_free('profile-1')} of replica 1's leases taken "
            f"after the TTL, {leases.taken_without_free() - leases.taken_without_free('profile-1')} of the others' "
            "after a missed renewal), "
            f"3 replicas settled in {joined:.1f}s, replica 1's partitions moved in {took_over:.1f}s, "
            f"{elapsed:.1f}s in all"
        )
    finally:
        with contextlib.suppress(Exception):
            await load.stop()
        for r in replicas:
            await asyncio.to_thread(r.stop)
        await leases.stop()
        await nc.close()
