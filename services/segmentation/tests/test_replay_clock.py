"""A restart replays the messages after the snapshot: each must be evaluated with the time the live path
evaluated it with, not with the restart's. For a segment that compares a field with `now`, the restart's
time can find a person already past a flip that had not come yet when the change was applied: the timer
that would have published the flip is never set, and the transition is lost (an exit never seen
downstream, or an enter), since what the replay finds at or below the published position is on the bus
already and is not published again (engine.py, `replay`).

The clock each batch was applied with is committed with its checkpoint (`segmentation_batch_clocks`); a
message the replay is the first to publish (past the checkpoint) is evaluated at the restart's time, which
the replay records before publishing, so a later replay evaluates it the same way and finds the same ids.
The clock here moves only when the test moves it: "2 minutes later" is the restart's clock."""

from __future__ import annotations

import asyncio

from cdp.segmentation.v1 import segmentation_pb2
from cdp_kit.bus import subjects
from cdp_segmentation.domain import parse
from cdp_segmentation.engine import CLOCKS, PERSONS
from cdp_testing.fakes import T0, Clock

from . import timer_world
from .test_stream import until
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
from .timer_world import no_id_twice, quiet

TRIAL_ENDS = T0 + 60

world = timer_world.world  # the fixture


def moves(published) -> list[tuple[str, bool, str]]:
    return [(e.segment_id, e.entered, e.reason) for e in published]


async def timers_fired(replica: Replica, person: str) -> None:
    """The person's timer has fired on `replica` and its round has published (the round holds the stream's
    quiescence while it publishes)."""

    async def fired() -> bool:
        return person not in replica.engine._due

    await until(fired, "the timer fired", timeout=5)
    await quiet(replica)


async def settled_events(replica: Replica, js) -> list:
    """What the bus holds once `replica`'s stream is quiescent (what it replayed published), no id twice."""
    await quiet(replica)
    published = await events(js)
    no_id_twice(published)
    return published


async def crashed_and_back(running: Replica, replica, clock: Clock, later: float, person: str, js) -> list:
    """`running` crashes, a replica starts `later` seconds after, its timers for `person` fire: what the bus
    then holds, no transition id twice."""
    await running.crash()
    clock.advance(later)
    await timers_fired(await replica(), person)
    published = await events(js)
    no_id_twice(published)
    return published


async def changed_after_snapshot(first: Replica, js, segment: str, definition: str, **fields) -> tuple[Replica, str]:
    """`segment` live on `first` and snapshotted, then a change of p (`fields`, at T0) applied after it:
    what a crash then leaves to the replay."""
    await first.engine.create(segment, parse(definition))
    await first.engine.wait_live(segment)
    await first.engine.snapshot()
    person = in_partition(1, 0, "p")[0]
    await applied(first, await send(js, change(person, T0, **fields)))
    return first, person


async def test_an_exit_due_between_the_change_and_the_restart_is_published(world):
    """p's trial ends a minute after the change that starts it: p enters, and the timer would publish the
    exit at T0+60. The process dies before the snapshot includes the change and comes back at T0+120.
    Evaluated at T0+120 the replay finds p outside (as it was before: no transition), no timer is set, and
    the exit is never published. A second crash and restart publishes nothing new: the same ids."""
    replica, js, clock, _store = world
    first, person = await changed_after_snapshot(
        await replica(), js, "trial", "traits.trial_ends_at > now", trial_ends_at=TRIAL_ENDS
    )
    assert moves(await events(js)) == [("trial", True, "event")]
    await first.crash()

    clock.advance(120)
    second = await replica()

    async def exit_published() -> bool:
        return len(await events(js)) == 2

    await until(exit_published, "the exit at the trial's end published", timeout=5)
    published = await events(js)
    assert moves(published) == [("trial", True, "event"), ("trial", False, "time")]
    assert published[1].at.ToNanoseconds() == TRIAL_ENDS * 1e9  # the flip's instant, not the restart's
    assert not second.engine.membership(person)

    again = await crashed_and_back(second, replica, clock, 60, person, js)
    assert [e.id for e in again] == [e.id for e in published]


async def test_an_enter_due_between_the_change_and_the_restart_is_published(world):
    """The reverse: `lapsed` holds who was not seen for a minute. The change (seen at T0) leaves p outside,
    and the timer would publish the enter at T0+60. Evaluated at the restart's T0+120, the replay enters p
    under the change's id, at or below the published position: not published, and the enter is lost."""
    replica, js, clock, _store = world
    first, person = await changed_after_snapshot(await replica(), js, "lapsed", "traits.seen_at < now - 1m", seen_at=T0)
    assert await events(js) == []
    await first.crash()

    clock.advance(120)
    second = await replica()
    await timers_fired(second, person)
    published = await events(js)
    assert moves(published) == [("lapsed", True, "time")]
    assert published[0].at.ToNanoseconds() == (T0 + 60) * 1e9
    assert set(second.engine.membership(person)) == {"lapsed"}


async def test_a_message_the_replay_published_first_is_replayed_with_the_same_time(world):
    """p's change is applied and its commit never lands: the restart at T0+100 is the first to publish it
    (past the checkpoint), entering p with the restart's time (the trial ends at T0+150). The pipeline then
    commits past it, and the process dies before a snapshot. The next restart, at T0+200, must evaluate
    the change as the first restart did (p inside, the timer due at T0+150), not with its own time (p
    outside, no timer, the exit lost)."""
    replica, js, clock, store = world
    commits = Held()
    first = await replica(HeldStore(store, commits))
    await first.engine.create("trial", parse("traits.trial_ends_at > now"))
    await first.engine.wait_live("trial")
    await first.engine.snapshot()
    person, other = in_partition(2, 0, "p")
    commits.on = True
    seq = await send(js, change(person, T0, trial_ends_at=T0 + 150))
    # A second message of the partition after it: the replay records the clock of every position it is the
    # first to publish, not only its last.
    seq = max(seq, await send(js, change(other, T0, level=1)))

    await applied_commit_held(first, seq, commits, "the changes applied, their commits held")
    await first.crash()
    assert await events(js) == []

    clock.advance(100)
    second = await replica()

    async def entered() -> bool:
        return len(await events(js)) == 1

    await until(entered, "the replay's enter published")
    await applied(second, seq)  # the pipeline committed past it
    published = await crashed_and_back(second, replica, clock, 100, person, js)
    assert moves(published) == [("trial", True, "event"), ("trial", False, "time")]
    assert published[1].at.ToNanoseconds() == (T0 + 150) * 1e9


async def test_batch_clocks_are_written_while_a_time_segment_is_live_and_pruned_by_the_snapshot(world):
    """Nothing reads the time without a time-based segment: no record. With one, a record per batch, in the
    batch's commit, until a snapshot includes its position."""
    replica, js, _clock, store = world

    async def clocks() -> list[str]:
        return [record.key async for record in store.scan_all(CLOCKS)]

    first = await replica()
    await first.engine.create("high", parse("traits.level > 0"))
    await first.engine.wait_live("high")
    person = in_partition(1, 0, "p")[0]
    await applied(first, await send(js, change(person, T0, level=1)))
    assert await clocks() == []
    await first.engine.create("trial", parse("traits.trial_ends_at > now"))
    await first.engine.wait_live("trial")
    seq = await send(js, change(person, T0, trial_ends_at=TRIAL_ENDS))
    await applied(first, seq)
    assert await clocks() == [f"0:{seq:020d}"]
    await first.engine.snapshot()
    assert await clocks() == []
    # Those a crashed replica left are the next owner's to prune: its replay read them.
    seq = await send(js, change(person, T0, trial_ends_at=TRIAL_ENDS + 1))
    await applied(first, seq)
    assert await clocks() == [f"0:{seq:020d}"]
    await first.crash()
    second = await replica()
    await applied(second, await send(js, change(person, T0, level=2)))
    await second.engine.snapshot()
    assert await clocks() == []


class Holds:
    """The store, its writes that `which` selects held (`released` lets them go; never set, the process dies
    there). `reached` once one waits."""

    def __init__(self, store, which) -> None:
        self.store, self.which = store, which
        self.reached, self.released = asyncio.Event(), asyncio.Event()

    def __getattr__(self, name):
        return getattr(self.store, name)

    async def bulk_write(self, ops):
        if any(self.which(op) for op in ops):
            self.reached.set()
            await self.released.wait()
        return await self.store.bulk_write(ops)


def checkpoint(op) -> bool:
    """A batch's commit (the checkpoint of partition 0 moving)."""
    return op.key == subjects.profiles_changed(0) and not op.collection.startswith(CLOCKS)


async def test_timers_due_before_a_replayed_message_fire_before_it_again(world):
    """p's trial ends at T0+50 (its timer in the snapshot). p changes again (M); M's commit never lands and
    the restart at T0+100 is the first to publish M: p's timer fires first (the exit at T0+50, under its
    timer id), then M changes nothing. That replica dies before its pipeline commits past M. The next
    restart evaluates M at T0+100 again: the timer must fire before M again, or M itself would exit p,
    another message id, a second exit."""
    replica, js, clock, store = world
    first = await replica(HeldStore(store, commits := Held()))
    await first.engine.create("trial", parse("traits.trial_ends_at > now"))
    await first.engine.wait_live("trial")
    person = in_partition(1, 0, "p")[0]
    await applied(first, await send(js, change(person, T0, trial_ends_at=T0 + 50)))
    await first.engine.snapshot()
    commits.on = True
    seq = await send(js, change(person, T0 + 1, other=1))

    await applied_commit_held(first, seq, commits, "M applied, its commit held")
    await first.crash()

    clock.advance(100)
    hold = Holds(store, checkpoint)
    second = await replica(hold)
    exited = [("trial", True, "event"), ("trial", False, "time")]
    try:
        assert moves(await events(js)) == exited
        assert await store.get(CLOCKS, f"0:{seq:020d}") is not None  # the replay's clock, before it published
    finally:
        await second.crash()  # (its commits wait on the hold: a stop would wait for ever)

    clock.advance(100)
    third = await replica()
    published = await settled_events(third, js)
    assert moves(published) == exited
    assert not third.engine.membership(person)


async def snapshot_held(replica: Replica, store) -> tuple[asyncio.Task, Holds]:
    """A snapshot of `replica` under way, its first write of persons held."""
    hold = Holds(store, lambda op: op.collection.startswith(PERSONS))
    replica.engine.held.store = hold
    snapshot = asyncio.create_task(replica.engine.snapshot())
    await asyncio.wait_for(hold.reached.wait(), 20)
    return snapshot, hold


async def exit_after_restart(replica, clock: Clock, person: str, js) -> list:
    """A replica started at T0+120, after `person`'s trial ended: what the bus holds once its timer fired."""
    clock.advance(120)
    second = await replica()
    await timers_fired(second, person)
    published = await events(js)
    no_id_twice(published)
    return published


async def test_a_snapshot_keeps_the_clocks_of_the_batches_it_does_not_include(world):
    """The pipelines go on while a snapshot writes its cut: q's trial starts in a batch applied then, past
    the snapshot's positions. Its clock outlives the snapshot, so a crash after it still replays q's
    change at its batch's time and publishes the exit."""
    replica, js, clock, store = world
    first = await replica()
    await first.engine.create("trial", parse("traits.trial_ends_at > now"))
    await first.engine.wait_live("trial")
    await first.engine.snapshot()
    p, q = in_partition(2, 0, "p")
    await applied(first, await send(js, change(p, T0, other=1)))  # p to write: the snapshot writes persons
    snapshot, hold = await snapshot_held(first, store)
    seq = await send(js, change(q, T0, trial_ends_at=TRIAL_ENDS))
    await applied(first, seq)
    hold.released.set()
    await snapshot
    assert [record.key async for record in store.scan_all(CLOCKS)] == [f"0:{seq:020d}"]
    await first.crash()

    published = await exit_after_restart(replica, clock, q, js)
    assert moves(published) == [("trial", True, "event"), ("trial", False, "time")]


async def test_a_snapshot_that_dies_before_it_is_written_keeps_the_clocks(world):
    """The clocks of the positions a snapshot includes are deleted only once it is written: the process
    dies while it writes, and the restart replays q's change from the older snapshot, at its batch's time."""
    replica, js, clock, store = world
    first = await replica()
    await first.engine.create("trial", parse("traits.trial_ends_at > now"))
    await first.engine.wait_live("trial")
    await first.engine.snapshot()
    q = in_partition(1, 0, "q")[0]
    await applied(first, await send(js, change(q, T0, trial_ends_at=TRIAL_ENDS)))
    snapshot, _hold = await snapshot_held(first, store)
    await first.crash(snapshot)

    published = await exit_after_restart(replica, clock, q, js)
    assert moves(published) == [("trial", True, "event"), ("trial", False, "time")]


async def test_the_replay_records_its_clock_before_it_publishes(world, nats_server):
    """p's change is applied, never committed; the restart at T0+100 would be the first to publish its enter
    (the trial ends at T0+150) and dies while it records its clock. Had it published first, the restart at
    T0+200 would evaluate the change at its own time (p outside, no timer): an enter never followed by its
    exit. Recorded first, nothing is published until a replay has recorded the time it evaluated with."""
    replica, js, clock, store = world
    first = await replica(HeldStore(store, commits := Held()))
    await first.engine.create("trial", parse("traits.trial_ends_at > now"))
    await first.engine.wait_live("trial")
    await first.engine.snapshot()
    person = in_partition(1, 0, "p")[0]
    commits.on = True
    seq = await send(js, change(person, T0, trial_ends_at=T0 + 150))

    await applied_commit_held(first, seq, commits, "the change applied, its commit held")
    await first.crash()

    clock.advance(100)
    hold = Holds(store, lambda op: op.collection.startswith(CLOCKS))
    second = Replica(hold, nats_server.url, clock)
    second.serving = asyncio.create_task(second.start())  # its replay waits on the hold: `crash` ends it
    try:
        await asyncio.wait_for(hold.reached.wait(), 20)
    finally:
        await second.crash()

    clock.advance(100)
    third = await replica()
    published = await settled_events(third, js)
    assert moves(published) in ([], [("trial", True, "event"), ("trial", False, "time")])


async def test_timers_a_replay_fires_below_the_published_position_are_not_published_again(world):
    """p's trial ends at T0+50 (its timer in the snapshot); at T0+60 p changes (M), committed: the exit is on
    the bus. The restart replays M at T0+60 and fires p's timer before it, as the batch did; the exit is not
    published again: JetStream's duplicate window (10 minutes; here shortened, and passed) hides a copy only
    while a restart is that quick."""
    replica, js, clock, _store = world
    first = await replica()
    await first.engine.create("trial", parse("traits.trial_ends_at > now"))
    await first.engine.wait_live("trial")
    person = in_partition(1, 0, "p")[0]
    await applied(first, await send(js, change(person, T0, trial_ends_at=T0 + 50)))
    await first.engine.snapshot()
    clock.advance(60)
    await applied(first, await send(js, change(person, T0 + 60, other=1)))
    await timers_fired(first, person)
    exited = [("trial", True, "event"), ("trial", False, "time")]
    assert moves(await events(js)) == exited
    await first.crash()

    config = (await js.stream_info("SEGMENTS")).config
    config.duplicate_window = 0.1
    await js.update_stream(config)
    # A batch of no events (field 15, unknown, so the payload is not empty): what `events` reads is kept.
    probe = b"\x78\x01"
    assert not segmentation_pb2.SegmentEventBatch.FromString(probe).events
    await js.publish(subjects.segments_exited(0), probe, headers={"Nats-Msg-Id": "probe"})

    async def window_passed() -> bool:  # a copy is stored now
        ack = await js.publish(subjects.segments_exited(0), probe, headers={"Nats-Msg-Id": "probe"})
        return not ack.duplicate

    # nats-server purges the ids on a timer it re-arms when the window changes (a bound, not a pause: it
    # passes in ~0.1 s; 5 s timed out once in ~70 runs three to a core)
    await until(window_passed, "the duplicate window passed", timeout=20)

    second = await replica()
    published = await settled_events(second, js)
    assert moves(published) == exited
