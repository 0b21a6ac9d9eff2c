"""A segment another replica built, adopted here (builds.py, `Builds.adopt`), brought to each served
partition's persons with the memberships time has not ended: the partition's due timers fire first, at the
adoption's time, as a recorded round, as an arriving partition's do (engine.py, `_adopt_arrived`).

Without them, `paying_trial = in_segment("trial") and traits.level > 0` adopted after p's trial ended and
before the timer loop fired p's exit reads the membership the loop has not ended yet: p enters
`paying_trial` under the build's id, then leaves it when the timer fires, a pair of transitions for a
membership that never held. The clock here moves only when the test moves it; the timer loops are ended."""

from __future__ import annotations

import orjson
import pytest

from cdp_testing.fakes import T0

from . import timer_world
from .test_stream import transitions
from .test_timer_rounds import MarksFail, moves, round_records
from .test_torn_snapshot import in_partition
from .timer_world import (
    PAYING_TRIAL,
    STARTS,
    WINDOW,
    handed,
    in_trial,
    live,
    never_snapshots,
    no_id_twice,
    restarted,
    started,
)

engines = timer_world.engines  # the fixture: engines without a stream, one store and clock

TRIAL_MOVES = [("trial", True, "event", T0), ("trial", False, "time", T0 + 60)]


async def trial_then_adopted(engine, clock, *, adoption_snapshot: bool = True):
    """`adopter` serves partition 1, p in `trial` (it ends at T0+60), snapshotted, its timer loop ended;
    `builder` (partition 0) builds `paying_trial`; at T0+100 `adopter` adopts it on the announcement (the
    process dying before the adoption's snapshot unless `adoption_snapshot`)."""
    person = in_partition(1, 1, "p")[0]
    adopter = await in_trial(engine, person, loops=False)
    await adopter.snapshot()

    builder = await started(engine, [0], loops=False)
    await live(builder, "paying_trial", PAYING_TRIAL)
    if not adoption_snapshot:
        never_snapshots(adopter)
    clock.now = T0 + 100
    await adopter.reload(orjson.dumps({"segment": "paying_trial"}))
    assert adopter.get("paying_trial").serving
    return person, adopter, builder


async def test_an_adoption_reads_memberships_time_has_ended(engines):
    """p's trial ended at T0+60, its exit not fired by T0+100, when `paying_trial` is adopted: p was never a
    paying trial. No transition of `paying_trial`; the exit of `trial` at its end."""
    engine, clock, url = engines
    person, adopter, builder = await trial_then_adopted(engine, clock)
    try:
        await adopter.fire_timers()
        published = await transitions(url)
        no_id_twice(published)
        assert moves(published) == TRIAL_MOVES
        assert not adopter.membership(person)
    finally:
        await builder.stop()
        await adopter.stop()


async def test_the_timers_an_adoption_fired_are_replayed_before_its_turn(engines):
    """As above, and the adopter dies before a snapshot includes the adoption (`adopt` snapshots once every
    partition is done: its snapshot never comes). Started again at T0+200, the replay runs the round the
    adoption fired (T0+100) and then its turn: the same transitions, none twice, nobody in `paying_trial`."""
    engine, clock, url = engines
    person, adopter, builder = await trial_then_adopted(engine, clock, adoption_snapshot=False)
    try:
        first = await transitions(url)
        assert [r["timers"] for r in await round_records(adopter.store) if r["position"] == 1] == [T0 + 100]

        async with restarted(engine, clock, T0 + 200, [1], 1) as again:
            published = await transitions(url)
            no_id_twice(published)
            assert [e.id for e in published] == [e.id for e in first]
            assert moves(published) == TRIAL_MOVES
            assert not again.membership(person)
    finally:
        await builder.stop()


# --- the snapshot after one that failed: the cut it prunes on ------------------------------------------------


async def test_the_snapshot_after_a_failed_one_prunes_nothing_the_stored_mark_does_not_hold(engines):
    """`window` (in from `starts_at` for a minute), built on another replica, is adopted at T0+40: p
    (partition 0) enters it, the turn logged at the generation after the stored mark. The adoption's
    snapshot fails writing its marks (its cut taken, the mark not written), and partition 0 goes to
    another owner (`leave`, as `stop_partition` does after its snapshot, which logs a failure and returns).
    The next snapshot here prunes on its own cut, which it writes (the failed one's marks are due again:
    `marks_dirty` outlives the failure, so it is not a snapshot with nothing to do), and which holds the
    partitions served here only. Pruned on the failed one's cut, whose generations the stored mark does not
    hold, the next owner's replay from the stored mark finds no turn at T0+40, brings p to `window` at T0+140
    (outside: nothing), and p's enter stays on the bus without its exit."""
    engine, clock, url = engines
    person = in_partition(1, 0, "p")[0]
    adopter = await started(engine, [0, 1], loops=False)
    await adopter.handle(handed(person, T0, 0, 1, starts_at=STARTS))
    await adopter.snapshot()

    builder = await started(engine, [], loops=False)
    try:
        await live(builder, "window", WINDOW)
        clock.now = T0 + 40
        adopter.held.store = MarksFail(adopter.held.store)
        with pytest.raises(ConnectionError):
            await adopter.reload(orjson.dumps({"segment": "window"}))
        assert adopter.membership(person)
        entered = await transitions(url)
        assert [m[:2] for m in moves(entered)] == [("window", True)]
        adopter.leave(0)

        async def turns() -> list[dict]:
            return [
                r.doc
                async for r in adopter.store.scan_all(adopter.rounds)
                if r.doc["partition"] == 0 and (r.doc.get("live") or {}).get("adopt")
            ]

        assert len(await turns()) == 1
        assert await adopter.snapshot() > 0
        assert len(await turns()) == 1, "the adoption's turn of partition 0 pruned on a cut no mark holds"

        async with restarted(engine, clock, T0 + 140, [0], 0) as again:
            published = await transitions(url)
            no_id_twice(published)
            assert moves(published) == [*moves(entered), ("window", False, "time", STARTS + 60)]
            assert not again.membership(person)
    finally:
        await builder.stop()
        await adopter.stop()
