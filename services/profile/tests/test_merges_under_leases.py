"""Merges and unmerges while person partitions move between two replicas (leases in a NATS KV bucket,
one shared store), as identity publishes them: on the partition of the merge's survivor.

Replica A starts alone and owns every partition; B joins while merges keep coming, the leases hand
half the partitions to B, and later B leaves and hands them back. Every merge must be applied exactly
once, by whoever owns the survivor's partition when it arrives or after: one skipped (a partition
between owners), one applied twice (two replicas, or a replay), or an unmerge undone by a merge
applied again fails the test."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from contextlib import AsyncExitStack

from cdp.events.v1 import events_pb2
from cdp.identity.v1 import identity_pb2
from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import (
    Bus,
    OutMessage,
    dead_letter_stream,
    events_resolved_stream,
    identity_stream,
    partition_for,
    profiles_stream,
    scores_stream,
    subjects,
)
from cdp_kit.ownership.nats_kv import nats_kv_ownership
from cdp_kit.storage import open_store
from cdp_profile.domain import Retention
from cdp_profile.engine import PROFILES, ProfileEngine, decode_profile
from cdp_profile.stream import partitioned_engines
from cdp_testing.fakes import Clock

PARTITIONS = 4
T0 = 1_790_000_000.0
PAIRS = [(f"p_w{i:02d}", f"p_l{i:02d}") for i in range(24)]


def visit(person: str, n: int) -> bytes:
    event = events_pb2.Event(message_id=f"v{n}", source_id="t", type=events_pb2.EVENT_TYPE_TRACK, event="Visit")
    event.timestamp.FromNanoseconds(int((T0 + n) * 1e9))
    event.received_at.FromNanoseconds(int((T0 + n) * 1e9))
    resolved = events_pb2.ResolvedEvent(event=event, person_id=person, identifiers=[f"user_id:{person}"])
    return events_pb2.ResolvedEventBatch(events=[resolved]).SerializeToString()


def merged(n: int, winner: str, loser: str) -> OutMessage:
    message = identity_pb2.IdentityMerged(merge_id=f"m{n}", winner=winner, loser=loser)
    return OutMessage(
        subjects.identity_merged(partition_for(winner, PARTITIONS)), message.SerializeToString(), f"merge:m{n}"
    )


def unmerged(n: int, winner: str, loser: str) -> OutMessage:
    message = identity_pb2.IdentityUnmerged(merge_id=f"m{n}", winner=winner, loser=loser)
    return OutMessage(
        subjects.identity_unmerged(partition_for(winner, PARTITIONS)), message.SerializeToString(), f"unmerge:m{n}"
    )


class Replica:
    def __init__(self, name: str, store, nats_url: str) -> None:
        self.name, self.store, self.nats_url = name, store, nats_url

    async def start(self, stack: AsyncExitStack) -> Replica:
        self.bus = await stack.enter_async_context(Bus.connect(self.nats_url, name=self.name))
        await self.bus.ensure_streams(
            events_resolved_stream(), identity_stream(), profiles_stream(), scores_stream(), dead_letter_stream()
        )
        self.engine = ProfileEngine(
            self.store,
            self.bus.publisher,
            partitions=PARTITIONS,
            owned=(),
            retention=Retention(max_events=100),
            telemetry=self.bus.telemetry,
            clock=Clock(T0 + 1000),
        )
        await self.engine.start()
        stack.push_async_callback(self.engine.stop)
        partitioned_engines(self.engine, self.bus, partitions=PARTITIONS, batch_size=4, ack_wait=30)
        self.ownership = await nats_kv_ownership(
            self.bus.js, group="profile", partitions=PARTITIONS, identity=self.name, ttl=1.0
        )
        await self.ownership.start(self.engine.start_partition, self.engine.stop_partition)
        stack.push_async_callback(self.stop)
        return self

    async def stop(self) -> None:
        await self.ownership.stop()  # every partition drained and its lease freed


async def wait_for(what: str, done, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await done():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        await asyncio.sleep(0.05)


async def profile_changes(js) -> list[profile_pb2.ProfileChanged]:
    info = await js.stream_info(subjects.PROFILES)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(subjects.PROFILES, seq)
        out.extend(profile_pb2.ProfileChangedBatch.FromString(msg.data).changes)
    return out


async def test_every_merge_is_applied_once_while_partitions_move(nats_server):
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(open_store("memory://"))
        a = await Replica("replica-a", store, nats_server.url).start(stack)

        async def a_owns_all() -> bool:
            return a.ownership.owned() == frozenset(range(PARTITIONS)) == a.engine.owned

        await wait_for("A acquires every partition", a_owns_all)
        js = a.bus.js
        persons = [p for pair in PAIRS for p in pair]
        for n, person in enumerate(persons):
            await js.publish(subjects.events_resolved(partition_for(person, PARTITIONS)), visit(person, n))

        async def all_stored() -> bool:
            return len(await store.get_many(PROFILES, persons)) == len(persons)

        await wait_for("every person's profile written", all_stored)

        async def merge_slowly(pairs: list[tuple[int, tuple[str, str]]]) -> None:
            for n, (winner, loser) in pairs:
                results = await a.bus.publisher.publish_batch([merged(n, winner, loser)])
                assert all(r.ok for r in results)
                await asyncio.sleep(0.05)

        numbered = list(enumerate(PAIRS))
        # B joins while the first half of the merges arrive; the leases hand it half the partitions.
        merging = asyncio.create_task(merge_slowly(numbered[:12]))
        b_stack = AsyncExitStack()
        b = await Replica("replica-b", store, nats_server.url).start(b_stack)

        async def b_took_some() -> bool:
            return bool(b.ownership.owned() and b.engine.owned)

        await wait_for("B acquires partitions", b_took_some)
        await merging
        # B leaves while the second half arrive: its partitions go back to A.
        merging = asyncio.create_task(merge_slowly(numbered[12:]))
        await asyncio.sleep(0.2)
        await b_stack.aclose()
        await merging

        async def all_merged() -> bool:
            records = await store.get_many(PROFILES, [loser for _, loser in PAIRS])
            return all(r.doc.get("merged_into") for r in records.values())

        await wait_for("every merge applied", all_merged)
        # Two of them split again: nothing must merge them back.
        await a.bus.publisher.publish_batch([unmerged(n, *PAIRS[n]) for n in (0, 12)])

        async def split() -> bool:
            records = await store.get_many(PROFILES, [PAIRS[0][1], PAIRS[12][1]])
            return all("profile" in r.doc for r in records.values())

        await wait_for("unmerges applied", split)
        await a.engine.flush()

        changes = await profile_changes(js)
        applied = Counter(loser for c in changes if c.cause == "merge" for loser in c.merged)
        assert applied == Counter({loser: 1 for _, loser in PAIRS}), "a merge skipped or applied twice"
        records = await store.get_many(PROFILES, persons)
        for n, (winner, loser) in enumerate(PAIRS):
            if n in (0, 12):
                assert "merged_into" not in records[loser].doc and loser not in records[winner].doc.get(
                    "merged_from", []
                )
            else:
                assert records[loser].doc["merged_into"] == winner
                assert records[winner].doc["merged_from"] == [loser]


async def test_a_merge_whose_survivor_moved_to_another_partition_is_applied_by_that_partitions_owner(nats_server):
    """Identity merged B into A, then A into C (another partition). Profile may see them the other way
    round: C has absorbed A when A's partition gets "B into A". The survivor is C now, held by the
    other replica: the notice is handed to C's partition rather than written from here, where C's
    owner's copy would silently go stale (its next write refused, its whole cache reloaded)."""
    persons = [f"p_{i:02d}" for i in range(40)]
    a = next(p for p in persons if partition_for(p, 2) == 0)
    b = next(p for p in persons if partition_for(p, 2) == 0 and p != a)
    c = next(p for p in persons if partition_for(p, 2) == 1)
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(open_store("memory://"))
        x, y = [await two_partition_replica(stack, store, nats_server.url, name) for name in ("replica-x", "replica-y")]
        await x.start_partition(0)
        await y.start_partition(1)
        for n, person in enumerate((a, b, c)):
            await x.bus.js.publish(subjects.events_resolved(partition_for(person, 2)), visit(person, n))

        async def stored(*who: str) -> bool:
            return len(await store.get_many(PROFILES, list(who))) == len(who)

        await wait_for("profiles written", lambda: stored(a, b, c))

        def merge(n: int, winner: str, loser: str) -> OutMessage:
            message = identity_pb2.IdentityMerged(merge_id=f"m{n}", winner=winner, loser=loser)
            return OutMessage(subjects.identity_merged(partition_for(winner, 2)), message.SerializeToString(), f"m{n}")

        async def merged_into(loser: str, winner: str) -> bool:
            record = await store.get(PROFILES, loser)
            return record is not None and record.doc.get("merged_into") == winner

        await x.bus.publisher.publish_batch([merge(2, c, a)])
        await wait_for("A merged into C", lambda: merged_into(a, c))
        await x.bus.publisher.publish_batch([merge(1, a, b)])
        await wait_for("B merged into C", lambda: merged_into(b, c))
        # C's owner goes on with C: its copy is the store's.
        await y.bus.js.publish(subjects.events_resolved(1), visit(c, 9))

        async def c_has_four_events() -> bool:
            record = await store.get(PROFILES, c)
            return (
                record is not None
                and len(decode_profile(record.doc, [], Retention()).parts) == 3
                and (c in y.profiles and y.profiles[c].view(now=y.clock()).event_count == 4)
            )

        await wait_for("C holds A, B and the new event", c_has_four_events)
        assert y.epoch == 0, "C's owner found its copy of C outdated: another replica wrote C"
        await x.flush()
        await y.flush()
        changes = await profile_changes(x.bus.js)
        assert Counter(p for ch in changes if ch.cause == "merge" for p in ch.merged) == Counter({a: 1, b: 1})
        await x.stop_partition(0)
        await y.stop_partition(1)


async def two_partition_replica(stack: AsyncExitStack, store, nats_url: str, name: str) -> ProfileEngine:
    bus = await stack.enter_async_context(Bus.connect(nats_url, name=name))
    await bus.ensure_streams(
        events_resolved_stream(), identity_stream(), profiles_stream(), scores_stream(), dead_letter_stream()
    )
    engine = ProfileEngine(
        store,
        bus.publisher,
        partitions=2,
        owned=(),
        retention=Retention(max_events=100),
        telemetry=bus.telemetry,
        clock=Clock(T0 + 1000),
    )
    await engine.start()
    stack.push_async_callback(engine.stop)
    partitioned_engines(engine, bus, partitions=2, batch_size=4, ack_wait=30)
    engine.bus = bus
    return engine
