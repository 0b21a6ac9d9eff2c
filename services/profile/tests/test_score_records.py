"""A model score from `scores.updated` is written as the person's scores record, not as the whole profile
again (records.py): the profile record is left as it was, and whatever reads the store back (a restart,
a recovery, a partition arriving, a read on a replica that does not own the person) sees the newest
scores. Merging a person away or deleting it leaves no scores record behind.

The profile's logic is driven directly (no bus): events and scores are applied as the partitioned engine
applies them, and their writes are committed on the engine's write chain."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cdp.events.v1 import events_pb2
from cdp.identity.v1 import identity_pb2
from cdp_kit.storage import open_store
from cdp_kit.telemetry import setup_telemetry
from cdp_profile.apply import ScoreUpdate, apply_identity_notices, decode_identity
from cdp_profile.domain import Retention
from cdp_profile.engine import PROFILES, ProfileEngine
from cdp_profile.records import SCORES
from cdp_profile.state import HotProfiles
from cdp_profile.stream import EventsLogic, ScoresLogic
from cdp_testing.fakes import T0, Clock, Delivery


@dataclass
class _Stored:
    """JetStream's answer as `cdp_kit.bus.PubResult` gives it: stored."""

    ok: bool = True
    error: str | None = None
    seq: int = 1


class Publisher:
    """Stores everything (the change messages are not what these tests look at)."""

    async def publish_batch(self, messages):
        return [_Stored() for _ in messages]


def events(*persons: str, at: float = T0) -> Delivery:
    batch = events_pb2.ResolvedEventBatch()
    for i, person in enumerate(persons):
        event = events_pb2.Event(
            message_id=f"{person}-{i}-{at}", source_id="t", type=events_pb2.EVENT_TYPE_TRACK, event="Order Completed"
        )
        event.timestamp.FromNanoseconds(int(at * 1e9))
        event.received_at.FromNanoseconds(int(at * 1e9))
        event.properties.update({"revenue": 10})
        batch.events.add(event=event, person_id=person, identifiers=[f"user_id:{person}"])
    return Delivery(batch, "events.resolved.0", 1)


def churn(person: str, value: float, at: float) -> ScoreUpdate:
    return ScoreUpdate(model="churn", version="1", persons=[person], values=[{"churn": value}], at=[at])


@pytest.fixture
async def engine():
    async with open_store("memory://") as store:
        engine = ProfileEngine(
            store,
            Publisher(),
            partitions=1,
            owned=[0],
            retention=Retention(max_events=100),
            telemetry=_telemetry(),
            clock=Clock(T0),
        )
        await engine.start()
        try:
            yield engine
        finally:
            await engine.stop()


def _telemetry():
    return setup_telemetry("profile-test")


async def commit(engine: ProfileEngine, effects) -> None:
    await engine.chain.submit(effects.writes)


async def apply_events(engine: ProfileEngine, *persons: str, at: float = T0) -> None:
    logic = EventsLogic(engine)
    await commit(engine, await logic.apply(0, [logic.decode(events(*persons, at=at))]))


async def apply_scores(engine: ProfileEngine, *updates: ScoreUpdate) -> None:
    await commit(engine, await ScoresLogic(engine).apply(0, [list(updates)]))


def reloaded(engine: ProfileEngine) -> HotProfiles:
    return HotProfiles(engine.store, retention=engine.retention, owns=engine.owns)


def churn_of(hot: HotProfiles, person: str) -> float | None:
    score = hot.profiles[person].view(now=T0).scores.get("churn")
    return None if score is None else score.value


async def test_a_score_leaves_the_profile_record_as_it_was_and_every_reload_shows_the_newest(engine):
    await apply_events(engine, "p1")
    before = await engine.store.get(PROFILES, "p1")
    await apply_scores(engine, churn("p1", 0.5, T0 + 1))
    await apply_scores(engine, churn("p1", 0.75, T0 + 2))
    after = await engine.store.get(PROFILES, "p1")
    # Not rewritten for a few numbers: the profile record is the one the event wrote.
    assert (after.version, after.doc) == (before.version, before.doc)
    assert churn_of(engine.hot, "p1") == 0.75

    # A warm start (start-up, recovery) and a load of one person (arrival, a read elsewhere) see it.
    warm = reloaded(engine)
    await warm.warm()
    assert churn_of(warm, "p1") == 0.75
    one = reloaded(engine)
    await one.load(["p1"])
    assert churn_of(one, "p1") == 0.75

    # A late score changes nothing, and a later event's write keeps the newest score.
    await apply_scores(engine, churn("p1", 0.1, T0 + 1.5))
    await apply_events(engine, "p1", at=T0 + 3)
    await apply_scores(engine, churn("p1", 0.2, T0 + 1.7))
    again = reloaded(engine)
    await again.warm()
    assert churn_of(again, "p1") == churn_of(engine.hot, "p1") == 0.75


async def test_a_recovery_rebuilds_the_scores_written_since_the_profile(engine):
    await apply_events(engine, "p1", "p2")
    await apply_scores(engine, churn("p1", 0.5, T0 + 1), churn("p2", 0.25, T0 + 1))
    await engine.recover()
    assert churn_of(engine.hot, "p1") == 0.5
    assert churn_of(engine.hot, "p2") == 0.25


def merged(winner: str, loser: str, merge_id: str) -> Delivery:
    return Delivery(identity_pb2.IdentityMerged(winner=winner, loser=loser, merge_id=merge_id), "identity.merged.0", 1)


async def test_a_merged_away_person_leaves_no_scores_record_and_the_survivor_reloads_as_it_is(engine):
    await apply_events(engine, "p1", "p2")
    await apply_scores(engine, churn("p1", 0.5, T0 + 1), churn("p2", 0.9, T0 + 2))
    step = apply_identity_notices(
        engine.hot, [decode_identity(merged("p1", "p2", "m1"))], engine.defs, here=lambda *_: True, now=T0 + 3
    )
    await engine.chain.submit(engine.writes(step.changes, ops=step.ops))
    assert await engine.store.get(SCORES, "p2") is None
    assert churn_of(engine.hot, "p1") == 0.9  # the newest of the parts' scores
    warm = reloaded(engine)
    await warm.warm()
    assert churn_of(warm, "p1") == 0.9
    assert "p2" in warm.tombstones


async def test_a_deleted_person_leaves_no_scores_record(engine):
    await apply_events(engine, "p1")
    await apply_scores(engine, churn("p1", 0.5, T0 + 1))
    assert await engine.store.get(SCORES, "p1") is not None
    await engine.delete("p1", suppress=False, request_id="r1")
    assert await engine.store.get(SCORES, "p1") is None
    warm = reloaded(engine)
    await warm.warm()
    assert "p1" in warm.deleted and "p1" not in warm.profiles
