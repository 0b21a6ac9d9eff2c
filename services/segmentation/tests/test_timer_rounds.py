"""Timers fired where no batch clock records their time, across a crash: a quiet partition's timer loop, a
batch of messages the replay applied already (redelivered after a restart), and a partition arriving
brought to a segment that went live since its snapshot (engine.py, `_adopt_arrived`).

The predicate reads `now`, so what a timer finds depends on when it fires, not only on its instant: for
`traits.starts_at < now and traits.starts_at > now - 1m` a person enters when their start comes and exits a
minute later, and a timer fired after both finds them outside, as they were: nothing to publish. A timer
the loop fired (the enter published) and a restart fired again at its own, later time would leave the
enter on the bus and the person outside here, the exit never published. Such a round is recorded before
it publishes (its clock, where it ran among the partition's positions and logged moves), and the replay
fires the partition's timers there again at that time.

A partition's persons brought to a segment as the partition arrives are evaluated at the arrival's time,
with the memberships their snapshot and replay left: a membership of a time-based segment whose flip came
due since (while the partition was elsewhere, or the process down) is stale until its timer fires. A
segment referring to it would be entered (or left) on the stale one, then left (or entered) again when the
timer fires: a pair of transitions for a membership that never held. The due timers fire first, at the
arrival's time, as a recorded round. The clock here moves only when the test moves it."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2
from cdp_segmentation.engine import CLOCKS
from cdp_segmentation.stream import Changes
from cdp_testing.fakes import T0, Clock

from . import timer_world
from .test_stream import nothing_after, transitions, until
from .test_torn_snapshot import (
    Held,
    HeldStore,
    Replica,
    applied,
    applied_commit_held,
    change,
    events,
    in_partition,
    send,
)
from .timer_world import (
    PAYING_TRIAL,
    STARTS,
    WINDOW,
    handed,
    in_trial,
    live,
    never_snapshots,
    no_id_twice,
    quiet,
    restarted,
    started,
    window_snapshotted,
    without_timer_loop,
)

world, engines = timer_world.world, timer_world.engines  # the fixtures


def moves(published) -> list[tuple[str, bool, str, float]]:
    return [(e.segment_id, e.entered, e.reason, e.at.ToNanoseconds() / 1e9) for e in published]


async def published_count(js, count: int, what: str) -> list:
    async def there() -> bool:
        return len(await events(js)) >= count

    await until(there, what, timeout=5)
    return await events(js)


async def entered_by_the_loop(replica: Replica, js, clock: Clock) -> str:
    """`window` live, p (partition 0) starting at T0+30, snapshotted; at T0+40 the timer loop enters p and
    publishes it, and its round is over (it holds the stream's quiescence while it publishes)."""
    person = await window_sent(replica, js)
    assert await events(js) == []
    clock.advance(40)
    await published_count(js, 1, "the timer loop's enter")
    await quiet(replica)
    return person


async def window_sent(replica: Replica, js, *, snapshot: bool = True) -> str:
    """`window` live on `replica`, p (partition 0) starting at T0+30 sent and applied, snapshotted (before
    p's change unless `snapshot`)."""
    await live(replica.engine, "window", WINDOW)
    if not snapshot:
        await replica.engine.snapshot()
    person = in_partition(1, 0, "p")[0]
    await applied(replica, await send(js, change(person, T0, starts_at=STARTS)))
    if snapshot:
        await replica.engine.snapshot()
    return person


async def exit_after_restart(replica, clock: Clock, person: str, js) -> list:
    """A replica started at T0+140, past the window's end: what the bus holds once p's timers are done."""
    clock.advance(100)
    second = await replica()

    async def fired() -> bool:
        return person not in second.engine._due

    await until(fired, "p's timers fired", timeout=5)
    await quiet(second)
    published = await events(js)
    no_id_twice(published)
    assert not second.engine.membership(person)
    return published


WINDOW_MOVES = [("window", True, "time", STARTS), ("window", False, "time", STARTS + 60)]


async def test_an_enter_the_timer_loop_published_before_a_crash_is_followed_by_its_exit(world):
    """The loop enters p at T0+40 (published); the process dies before a snapshot includes it and comes back
    at T0+140. Fired again at T0+140, p's timer finds p outside (the minute is over): the enter stays on the
    bus, p outside here, and the exit is never published. Replayed at T0+40, the round enters p again (the
    same id: a duplicate), and the exit's timer fires at the restart."""
    replica, js, clock, _store = world
    first = await replica()
    person = await entered_by_the_loop(first, js, clock)
    await first.crash()

    published = await exit_after_restart(replica, clock, person, js)
    assert moves(published) == WINDOW_MOVES


async def test_a_timer_round_before_a_change_the_replay_publishes_first_is_replayed_before_it(world):
    """The loop enters p at T0+40; then q's change at T0+50 is applied and its commit never lands. The restart
    at T0+140 is the first to publish q's change (past the checkpoint), evaluated at the restart's time, and
    p's timer, fired before it at that time, finds nothing: the exit lost. Replayed where it ran (after the
    checkpoint's position, before q's change), the round enters p at T0+40, and the exit's timer fires
    before q's change."""
    replica, js, clock, store = world
    first = await replica(HeldStore(store, commits := Held()))
    person = await entered_by_the_loop(first, js, clock)
    other = in_partition(2, 0, "p")[1]
    clock.advance(10)
    commits.on = True
    seq = await send(js, change(other, T0 + 50, level=1))
    await applied_commit_held(first, seq, commits, "q's change applied, its commit held")
    await first.crash()

    published = await exit_after_restart(replica, clock, person, js)
    assert moves(published) == WINDOW_MOVES


async def test_a_timer_round_that_died_publishing_is_published_by_the_replay(world):
    """The loop's round at T0+40 is recorded and its publish never returns: the enter is held here only. The
    restart at T0+140 fires the round again at T0+40 and publishes the enter (past the checkpoint's position:
    nothing says the bus has it), then the exit."""
    replica, js, clock, _store = world
    first = await replica()
    person = await window_sent(first, js)
    publishes, real = Held(), first.bus.publisher.publish_batch

    async def publish_batch(messages, **options):
        await publishes()
        return await real(messages, **options)

    first.bus.publisher.publish_batch = publish_batch
    publishes.on = True
    clock.advance(40)
    await asyncio.wait_for(publishes.reached.wait(), 20)
    await first.crash()
    assert await events(js) == []

    published = await exit_after_restart(replica, clock, person, js)
    assert moves(published) == WINDOW_MOVES


async def test_a_committed_change_after_a_timer_round_publishes_the_same_across_a_crash(world):
    """The loop enters p at T0+40; q's change at T0+100 is committed, and its batch fires p's exit (due at
    T0+90). The restart replays the round at T0+40 and q's change at T0+100: nothing new is published, and
    p is outside, as before the crash."""
    replica, js, clock, _store = world
    first = await replica()
    person = await entered_by_the_loop(first, js, clock)
    other = in_partition(2, 0, "p")[1]
    clock.advance(60)
    await applied(first, await send(js, change(other, T0 + 100, level=1)))
    before = await published_count(js, 2, "the exit the batch fired")
    assert moves(before) == WINDOW_MOVES
    await first.crash()

    clock.advance(100)
    second = await replica()
    await quiet(second)
    published = await events(js)
    assert [e.id for e in published] == [e.id for e in before]
    assert not second.engine.membership(person)


async def test_timer_rounds_are_recorded_while_their_partition_is_not_snapshotted_after_them(world):
    """A round of the loop leaves one record (no person in it) until a snapshot includes it; a crashed
    replica's are read by the next owner's replay and pruned by its snapshot."""
    replica, js, clock, store = world

    async def rounds() -> list[dict]:
        return [record.doc async for record in store.scan_all(CLOCKS) if "timers" in record.doc]

    first = await replica()
    await entered_by_the_loop(first, js, clock)
    [record] = await rounds()
    assert record["timers"] == T0 + 40 and set(record) == {"timers", "position", "place", "generation"}
    await first.engine.snapshot()
    assert await rounds() == []
    clock.advance(60)  # the exit, at T0+90: a round of its own
    await published_count(js, 2, "the loop's exit")
    await quiet(first)
    assert [r["timers"] for r in await rounds()] == [T0 + 100]
    await first.crash()
    second = await replica()
    await applied(second, await send(js, change(in_partition(2, 0, "p")[1], T0 + 100, level=1)))
    await second.engine.snapshot()
    assert await rounds() == []


async def test_a_timer_round_after_a_go_live_at_its_position_is_replayed_after_it(world):
    """`inside` (in `window`) goes live while partition 0 is quiet, and its snapshot never comes (the process
    dies first): its go-live is in the round log at the partition's position. Then the loop enters p in
    `window`, and so in `inside`: one message of both entries. The replay at T0+140 must run the go-live,
    then the round, as they ran: the other way round, the round finds p entering `window` alone (`inside`
    not live yet), a message of another id, and p's enter is published twice. Then the exits, at the
    window's end."""
    replica, js, clock, _store = world
    first = await replica()
    person = await window_sent(first, js)
    never_snapshots(first.engine)  # the build's snapshot after its go-live: the process dies before it
    await live(first.engine, "inside", 'in_segment("window")')
    clock.advance(40)
    await published_count(js, 2, "the loop's enters")
    await quiet(first)
    await first.crash()

    published = await exit_after_restart(replica, clock, person, js)
    assert moves(published) == [
        ("window", True, "time", STARTS),
        ("inside", True, "time", STARTS),
        ("window", False, "time", STARTS + 60),
        ("inside", False, "time", STARTS + 60),
    ]


async def test_a_timer_round_runs_after_the_change_at_its_position_in_the_replay(world):
    """p's change (its start at T0+30) is committed at T0, after the last snapshot; the loop enters p at
    T0+40, a round at p's change's position. The replay at T0+140 runs the change at its clock, then the
    round, as they ran: the round fires p's timer, set by the change, at T0+40. Run before the change, the
    round finds no timer of p's, the change then sets it, and at T0+140 it finds p outside: the exit lost."""
    replica, js, clock, _store = world
    first = await replica()
    person = await window_sent(first, js, snapshot=False)
    clock.advance(40)
    await published_count(js, 1, "the timer loop's enter")
    await quiet(first)
    await first.crash()

    published = await exit_after_restart(replica, clock, person, js)
    assert moves(published) == WINDOW_MOVES


# --- engines without a stream, changes handed to them and partitions arriving when told ----------------------


async def test_timers_a_batch_of_messages_replayed_already_fired_are_replayed_at_its_clock(engines):
    """After a restart the consumer hands the pipeline again messages the replay applied: their batch applies
    none of them, and fires the partition's due timers at its clock (p enters `window` at T0+40). Its commit
    holds no batch clock (its positions were replayed at their own), so the round is recorded in it; the
    restart at T0+140 enters p there again and publishes the exit, instead of firing p's timer at its own
    time, finding p outside and leaving the enter without its exit."""
    engine, clock, url = engines
    person = in_partition(1, 0, "p")[0]
    first = await started(engine, [0])
    await live(first, "window", WINDOW)
    [delivery] = handed(person, T0, 0, 1, starts_at=STARTS)
    await first.handle([delivery])
    await first.snapshot()
    clock.now = T0 + 40
    writes: list = []
    message = profile_pb2.ProfileChangedBatch.FromString(delivery.data)
    messages = await first.apply_changes(0, [Changes(1, message)], writes)
    assert [op.doc.get("timers") for op in writes] == [T0 + 40]
    await first.store.bulk_write(writes)  # the batch's commit
    await first._publish(messages)
    await without_timer_loop(first)  # gone before its next snapshot

    async with restarted(engine, clock, T0 + 140, [0], 0) as second:
        published = await transitions(url)
        no_id_twice(published)
        assert moves(published) == WINDOW_MOVES
        assert not second.membership(person)


# --- a partition arriving, brought to a segment that went live since its snapshot -------------------------


async def test_a_partition_brought_to_a_segment_on_arrival_reads_memberships_time_has_moved(engines):
    """Partition 1's owner enters p in `trial` (it ends at T0+60), snapshots it and leaves. Another replica
    builds `paying_trial` (in `trial`, with a level) over its own partitions; at T0+100 partition 1 arrives
    there and is brought to it. p's trial has ended, p's exit not fired yet: evaluated on the membership
    the snapshot holds, p enters `paying_trial`, then leaves it when the timer fires. p was never a paying
    trial: no transition of `paying_trial`, the exit of `trial` at its end."""
    engine, clock, url = engines
    person = in_partition(1, 1, "p")[0]
    await (await in_trial(engine, person)).stop()

    builder = await started(engine, [0])
    try:
        await live(builder, "paying_trial", PAYING_TRIAL)
        clock.now = T0 + 100
        await builder.arrive(1, nothing_after)
        await builder.fire_timers()

        async def exited() -> bool:
            return any(not e.entered for e in await transitions(url))

        await until(exited, "p's trial exit")
        published = await transitions(url)
        assert moves(published) == [("trial", True, "event", T0), ("trial", False, "time", T0 + 60)]
        assert not builder.membership(person)
    finally:
        await builder.stop()


async def test_the_timers_an_arrival_fired_are_replayed_before_its_adoption(engines):
    """As above, and the replica dies after the arrival, before a snapshot includes it; started again at
    T0+200 it replays the round the arrival fired (T0+100) and then the adoption: the same transitions,
    none twice, nobody in `paying_trial`."""
    engine, clock, url = engines
    person = in_partition(1, 1, "p")[0]
    await (await in_trial(engine, person)).stop()

    builder = await started(engine, [0])
    await live(builder, "paying_trial", PAYING_TRIAL)
    clock.now = T0 + 100
    await builder.arrive(1, nothing_after)
    first = await transitions(url)
    await without_timer_loop(builder)  # gone before its next snapshot

    async with restarted(engine, clock, T0 + 200, [0, 1], 1) as again:
        published = await transitions(url)
        assert [e.id for e in published] == [e.id for e in first]
        assert moves(published) == [("trial", True, "event", T0), ("trial", False, "time", T0 + 60)]
        assert not again.membership(person)


# --- a partition handed over after a crash, to a replica whose count of moves is behind ----------------------


async def test_a_replica_behind_the_dead_ones_count_logs_after_the_timer_round_it_replayed(engines):
    """Counts of moves are each replica's own (percentiles.py): `a` counts `window`'s go-live, `b`, serving
    nothing then, counts none. `a`'s loop enters p at T0+40, a round recorded at a's count, and `a` dies
    before a snapshot includes it. `b` takes partition 0 over (replaying the round: a duplicate), and builds
    `inside` (in `window`): p enters it at its go-live, logged at b's count + 1. `b` dies before its snapshot
    too. The replay at T0+140 runs the round, then the go-live, as they ran, only if b's count was raised past
    the round's place when it replayed it: else the go-live sorts first, finds p outside `window` (the
    snapshot's state), and the round then enters p in both at once, a message of another id, p's enter in
    `window` published twice and in `inside` under the timer's cause too."""
    engine, clock, url = engines
    person = in_partition(1, 0, "p")[0]
    behind = await started(engine, [])
    dead = await window_snapshotted(engine, [0], person)
    clock.now = T0 + 40
    await dead.fire_timers()
    assert dead.membership(person)
    await without_timer_loop(dead)  # gone before its next snapshot

    await behind.reload(orjson.dumps({"segment": "window"}))
    assert behind.percentile_round < dead.percentile_round  # behind: what it logs next would sort first
    await behind.arrive(0, nothing_after)
    never_snapshots(behind)  # the build's snapshot after its go-live: the process dies before it
    await live(behind, "inside", 'in_segment("window")')
    before = await transitions(url)
    assert moves(before) == [("window", True, "time", STARTS), ("inside", True, "created", T0 + 40)]
    await without_timer_loop(behind)

    async with restarted(engine, clock, T0 + 140, [0], 0) as again:
        published = await transitions(url)
        no_id_twice(published)
        assert moves(published) == [
            *moves(before),
            ("window", False, "time", STARTS + 60),
            ("inside", False, "time", STARTS + 60),
        ]
        assert not again.membership(person)


class MarksGate:
    """The store, a snapshot's positions and marks (its last write) held at a gate until the test opens it."""

    def __init__(self, store) -> None:
        self.store, self.reached, self.open = store, asyncio.Event(), asyncio.Event()

    def __getattr__(self, name):
        return getattr(self.store, name)

    async def bulk_write(self, ops):
        if any(op.key.startswith("$percentiles") for op in ops):
            self.reached.set()
            await self.open.wait()
        return await self.store.bulk_write(ops)


async def round_records(store) -> list[dict]:
    return [record.doc async for record in store.scan_all(CLOCKS) if "timers" in record.doc]


async def test_a_timer_round_fired_while_a_snapshot_is_written_outlives_its_pruning(engines):
    """A snapshot lets the partitions go on once its cut is copied, and prunes the rounds of the generations
    its marks hold when written. A round the loop fires meanwhile (p enters at T0+40) is of the next
    generation, in no snapshot yet: still there after the pruning, so that a crash before the next snapshot
    replays it at T0+40 and publishes p's exit. Pruned with the snapshot, the restart at T0+140 fires p's
    timer at its own time, finds p outside, and the exit is never published."""
    engine, clock, url = engines
    person = in_partition(1, 0, "p")[0]
    first = await window_snapshotted(engine, [0], person)
    await first.handle(handed(in_partition(2, 0, "p")[1], T0, 0, 2, level=1))
    gate = first.held.store = MarksGate(first.held.store)
    writing = asyncio.create_task(first.snapshot())
    try:
        await asyncio.wait_for(gate.reached.wait(), 20)  # cut and copied; its marks not written yet
        clock.now = T0 + 40
        await first.fire_timers()
        assert moves(await transitions(url)) == WINDOW_MOVES[:1]
    finally:
        gate.open.set()
        await writing
    assert [r["timers"] for r in await round_records(first.store)] == [T0 + 40]
    await without_timer_loop(first)  # gone before its next snapshot

    async with restarted(engine, clock, T0 + 140, [0], 0):
        published = await transitions(url)
        no_id_twice(published)
        assert moves(published) == WINDOW_MOVES


class MarksFail:
    """The store, a snapshot's positions and marks (its last write) refused once."""

    def __init__(self, store) -> None:
        self.store, self.failed = store, False

    def __getattr__(self, name):
        return getattr(self.store, name)

    async def bulk_write(self, ops):
        if not self.failed and any(op.key.startswith("$percentiles") for op in ops):
            self.failed = True
            raise ConnectionError("store unavailable")
        return await self.store.bulk_write(ops)


async def test_the_next_owners_snapshot_prunes_a_round_of_a_generation_past_the_mark_it_loaded(engines):
    """A snapshot moves its generation on at its cut (what is recorded from there on is of the next one),
    whether or not its marks are then written: `a`'s second snapshot fails writing them, so its loop's round
    at T0+40 is two generations past the mark the store holds. `a` dies; the next owner of partition 0
    replays the round (p's enter, a duplicate) and snapshots: its marks include what it replayed (its
    generation raised past the round's), and its pruning deletes the round. Left (a generation past the new
    mark), it would outlive the snapshot that includes it, and every replay from that snapshot would run it
    again, at T0+40, among this replica's records of the same generation."""
    engine, clock, url = engines
    person = in_partition(1, 0, "p")[0]
    first = await window_snapshotted(engine, [0, 1], person)
    await first.handle(handed(in_partition(1, 1, "q")[0], T0, 1, 1, level=1))
    first.held.store = MarksFail(first.held.store)
    with pytest.raises(ConnectionError):
        await first.snapshot()
    clock.now = T0 + 40
    await first.fire_timers()
    [record] = await round_records(first.store)
    await without_timer_loop(first)  # gone before its next snapshot

    async with restarted(engine, clock, T0 + 50, [0], 0, fire=False) as second:
        assert moves(await transitions(url)) == WINDOW_MOVES[:1]
        assert second.membership(person)
        await second.handle(handed(in_partition(2, 0, "p")[1], T0 + 50, 0, 2, level=1))
        await second.snapshot()
        assert await round_records(second.store) == [], f"a round of generation {record['generation']} left"


class Recording:
    """The publisher, every message published through it kept."""

    def __init__(self, publisher) -> None:
        self.publisher, self.sent = publisher, []

    def __getattr__(self, name):
        return getattr(self.publisher, name)

    async def publish_batch(self, messages, **options):
        self.sent.extend(messages)
        return await self.publisher.publish_batch(messages, **options)


async def test_a_recorded_round_replayed_after_a_restart_fires_nothing_for_a_person_deleted_since(engines):
    """The loop enters p at T0+40, a recorded round; p is deleted (PRIVACY's notice; the `removed` change
    aged out of the stream, or a store file restored from before it) and the process dies before a snapshot.
    The partition arriving at T0+140 erases p before its replay (notices.py), and the replay's run of the
    round finds no timer of p's: nothing is published about p, not the enter again (a duplicate JetStream
    would drop, carrying p's id on the bus again), not an exit; the round's record names nobody."""
    engine, clock, url = engines
    person = in_partition(1, 0, "p")[0]
    first = await window_snapshotted(engine, [0], person)
    clock.now = T0 + 40
    await first.fire_timers()
    assert moves(await transitions(url)) == WINDOW_MOVES[:1]
    [record] = [r async for r in first.store.scan_all(CLOCKS) if "timers" in r.doc]
    assert person not in record.key and person.encode() not in orjson.dumps(record.doc)
    await without_timer_loop(first)  # gone before its next snapshot

    clock.now = T0 + 140
    again = engine([])
    again.deleted = {person: "request-1"}
    again.deleted_by_partition = {0: {person: "request-1"}}
    again.publisher = sent = Recording(again.publisher)
    await again.start()
    await without_timer_loop(again)
    try:
        await again.arrive(0, nothing_after)
        await again.fire_timers()
        named = [e.id for m in sent.sent for e in segmentation_pb2.SegmentEventBatch.FromString(m.payload).events]
        assert named == []
        assert person not in again.persons and not again.membership(person)
        assert moves(await transitions(url)) == WINDOW_MOVES[:1]
    finally:
        await again.stop()
