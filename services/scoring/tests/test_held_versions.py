"""What a person's profile ends up holding when scores come from both of scoring's paths: the stream path
(stamped with the time of the change scored) and the persons held scored when a version is made live or a
canary moves persons (stamped with scoring's clock: deployments.py). The profile keeps a score only if its
`(at, model, version)` is not older than the one it holds (cdp_profile's `Profile.take_scores`, run here on
what `scores.updated` carries), so a person's stamps must never go backwards (published.py); and persons a
replica holds must be scored with the live version even when it was made live while the replica was down.

Against a real nats-server and the memory store, through the engine and the kit's partitioned engine, as
test_engine.py does."""

from __future__ import annotations

import pytest

from cdp_profile.domain import Profile
from cdp_scoring import requests
from cdp_scoring.domain.registry import CANARY, canary_bucket
from cdp_scoring.engine import ScoringEngine
from cdp_scoring.modelstore import FolderModelStore
from cdp_testing.fakes import T0
from cdp_testing.onnx_models import expected, logistic_model

from . import test_engine
from .test_engine import W, change, changed, make_engine, published

setup = test_engine.setup  # the fixture: an engine on profiles.changed.0, the memory store, a fixed clock

W2 = [1.0, 1.0]


def held_by_profile(updates, person: str) -> float:
    """The churn_risk the profile holds once it has taken `updates` in stream order (its own rule)."""
    profile = Profile.new(person)
    for update in updates:
        if update.person_id == person:
            profile.take_scores(dict(update.scores), update.model, update.version, update.at, {})
    return profile.parts[person].scores["churn_risk"].value


async def test_a_change_in_flight_when_a_promotion_scores_the_held_persons_wins_over_it(setup, nats_server):
    engine, stream, _store, _bus, clock, _defined = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await engine.deploy(logistic_model(version="2.0.0", weights=W2), role=None)  # inactive
    await stream.feed(changed([change("p1", orders=1, sessions=1, at=T0 + 1)]))
    # The profile applies p1's next change at T0 + 5. Before scoring has applied it, 2.0.0 is promoted, and
    # the persons held are scored with scoring's clock at T0 + 10: p1 without the change.
    clock.now = T0 + 10
    await engine.promote("churn_risk", "2.0.0")
    await engine.held_scored()
    await stream.feed(changed([change("p1", orders=7, at=T0 + 5)]))
    updates = await published(nats_server.url)
    assert [u.version for u in updates] == ["1.0.0", "2.0.0", "2.0.0"]
    assert updates[1].scores["churn_risk"] == pytest.approx(expected(W2, [1, 1]), abs=1e-6)
    assert updates[2].at > updates[1].at, "the change's score is stamped after the promotion's"
    assert held_by_profile(updates, "p1") == pytest.approx(expected(W2, [7, 1]), abs=1e-6)


async def test_the_stamps_of_a_promotion_hold_after_a_restart(setup, tmp_path, nats_server):
    engine, stream, store, bus, clock, _defined = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await engine.deploy(logistic_model(version="2.0.0", weights=W2), role=None)
    await stream.feed(changed([change("p1", orders=1, sessions=1, at=T0 + 1)]))
    clock.now = T0 + 10
    await engine.promote("churn_risk", "2.0.0")
    await engine.held_scored()
    await stream.stop()  # drained and snapshotted as a replica that stops; p1 did not change meanwhile
    again, again_stream = await make_engine(store, bus, tmp_path, clock)
    try:
        await again.held_scored()  # nothing to score again: p1's record says 2.0.0
        # The change the profile applied at T0 + 5, applied by scoring only after its restart.
        await again_stream.feed(changed([change("p1", orders=7, at=T0 + 5)]))
        updates = await published(nats_server.url)
        assert [u.version for u in updates] == ["1.0.0", "2.0.0", "2.0.0"]
        assert held_by_profile(updates, "p1") == pytest.approx(expected(W2, [7, 1]), abs=1e-6)
    finally:
        await again_stream.stop()
        await again.stop()


async def other_replica(store, bus, tmp_path, clock) -> ScoringEngine:
    """Another replica on the same store and models, holding no partition (no stream), started."""
    other = ScoringEngine(
        store, FolderModelStore(tmp_path / "models"), bus.publisher, partitions=1, telemetry=bus.telemetry,
        clock=clock,
    )  # fmt: skip
    await other.start()
    return other


async def test_a_version_made_live_while_a_replica_was_down_scores_its_persons_when_it_starts(
    setup, tmp_path, nats_server
):
    engine, stream, store, bus, clock, _defined = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await engine.deploy(logistic_model(version="2.0.0", weights=W2), role=None)
    await stream.feed(changed([change("p1", orders=1, sessions=1, at=T0 + 1), change("p2", orders=3, at=T0 + 1)]))
    await stream.stop()
    await engine.stop()
    # Another replica, holding none of these persons, promotes 2.0.0 while this one is down.
    other = await other_replica(store, bus, tmp_path, clock)
    try:
        clock.now = T0 + 10
        await other.promote("churn_risk", "2.0.0")
        await other.held_scored()
    finally:
        await other.stop()
    assert [u.version for u in await published(nats_server.url)] == ["1.0.0", "1.0.0"]
    again, again_stream = await make_engine(store, bus, tmp_path, clock)
    try:
        await again.held_scored()
        # Neither person changed: both get the live version's score, once.
        updates = await published(nats_server.url)
        assert sorted((u.person_id, u.version) for u in updates[2:]) == [("p1", "2.0.0"), ("p2", "2.0.0")]
        assert held_by_profile(updates, "p1") == pytest.approx(expected(W2, [1, 1]), abs=1e-6)
        assert held_by_profile(updates, "p2") == pytest.approx(expected(W2, [3, 0]), abs=1e-6)
        # Its record now says so: a restart scores nobody again.
        await again_stream.stop()
        await again.stop()
        again, again_stream = await make_engine(store, bus, tmp_path, clock)
        await again.held_scored()
        assert len(await published(nats_server.url)) == len(updates)
    finally:
        await again_stream.stop()
        await again.stop()


async def test_a_partition_taken_over_after_a_promotion_is_scored_by_its_new_replica(setup, tmp_path, nats_server):
    engine, stream, store, bus, clock, _defined = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await engine.deploy(logistic_model(version="2.0.0", weights=W2), role=None)
    await stream.feed(changed([change("p1", orders=1, sessions=1, at=T0 + 1)]))
    await stream.stop()  # its replica goes away: the partition is snapshotted and held nowhere
    await engine.stop()
    # The replica that takes it over promoted 2.0.0 while holding nobody (its scoring of the held persons
    # scored none), then acquires the partition.
    other = await other_replica(store, bus, tmp_path, clock)
    other_stream = test_engine.Stream(other, bus)
    try:
        clock.now = T0 + 10
        await other.promote("churn_risk", "2.0.0")
        await other.held_scored()
        await other_stream.start()
        await other.held_scored()
        updates = await published(nats_server.url)
        assert [(u.person_id, u.version) for u in updates] == [("p1", "1.0.0"), ("p1", "2.0.0")]
        assert held_by_profile(updates, "p1") == pytest.approx(expected(W2, [1, 1]), abs=1e-6)
    finally:
        await other_stream.stop()
        await other.stop()


async def test_a_canary_deployed_publishes_its_share_of_the_held_persons_and_nobody_else(setup, nats_server):
    engine, stream, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    persons = [f"p{i}" for i in range(40)]
    await stream.feed(changed([change(p, orders=1, sessions=1, at=T0 + 1) for p in persons]))
    await engine.deploy(logistic_model(version="2.0.0", weights=W2), role=CANARY, canary_percent=50)
    await engine.held_scored()
    updates = await published(nats_server.url)
    last = {u.person_id: u for u in updates}
    share = [p for p in persons if canary_bucket(p, "churn_risk") < 50]
    assert 5 < len(share) < 35
    # Only the persons whose version moved are published again, once each.
    assert sorted(u.person_id for u in updates[len(persons) :]) == sorted(share)
    for person in persons:
        version = "2.0.0" if person in share else "1.0.0"
        assert last[person].version == version, person
        assert held_by_profile(updates, person) == pytest.approx(
            expected(W2 if person in share else W, [1, 1]), abs=1e-6
        )


async def test_what_was_published_for_the_persons_a_canary_leaves_alone_still_counts(setup, nats_server):
    """Also for the other models: the entries held are still true after the canary's pass (published.py)."""
    engine, stream, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await engine.deploy(logistic_model("buy_propensity", weights=W), role=None)
    persons = [f"p{i}" for i in range(40)]
    await stream.feed(changed([change(p, orders=1, sessions=1, at=T0 + 1) for p in persons]))
    await engine.deploy(logistic_model(version="2.0.0", weights=W2), role=CANARY, canary_percent=50)
    await engine.held_scored()
    before = len(await published(nats_server.url))
    outside = next(p for p in persons if canary_bucket(p, "churn_risk") >= 50)
    # W weighs orders +0.5 and sessions -0.25: orders +1 with sessions +2 leaves both scores where they were.
    await stream.feed(changed([change(outside, orders=2, sessions=3, at=T0 + 2)]))
    assert len(await published(nats_server.url)) == before, "an unchanged score of an unmoved person is not news"


async def test_the_stamps_of_a_score_all_hold_after_a_crash_right_after_it(setup, tmp_path, nats_server):
    """A pass snapshots the stamps it handed out as it ends (requests.py): the setup's stream takes no periodic
    snapshot, and the crash comes before any. (A process SIGKILLed after a promotion's pass:
    test_held_versions_killed.py.)"""
    engine, stream, store, bus, clock, _defined = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await stream.feed(changed([change("p1", orders=1, sessions=1, at=T0 + 1)]))
    clock.now = T0 + 10
    assert [p async for p in engine.score_all("churn_risk", publish=True)][-1]["published"] == 1
    stream.partitioned.abort()  # a crash right after the pass
    again, again_stream = await make_engine(store, bus, tmp_path, clock)
    try:
        # The change the profile applied at T0 + 5, before the ScoreAll, applied by scoring after its restart.
        await again_stream.feed(changed([change("p1", orders=7, at=T0 + 5)]))
        updates = await published(nats_server.url)
        assert len(updates) == 3
        assert updates[2].at > updates[1].at, "the change's score is stamped after the ScoreAll's"
        assert held_by_profile(updates, "p1") == pytest.approx(expected(W, [7, 1]), abs=1e-6)
    finally:
        await again_stream.stop()
        await again.stop()


async def test_the_stamps_of_the_chunks_a_score_all_published_hold_after_a_crash_partway(
    setup, tmp_path, nats_server, monkeypatch
):
    """A ScoreAll snapshots the stamps of each block of chunks before it publishes any of them (requests.py:
    STAMPED_AHEAD persons, two chunks of one here): a crash after three chunks were published, before the pass
    ends, keeps the stamps of both blocks' published persons. The pass is held where its progress is not asked
    for further, so the crash comes exactly there; the setup's stream takes no periodic snapshot. (A process
    SIGKILLed partway: test_held_versions_killed.py.)"""
    monkeypatch.setattr(requests, "STAMPED_AHEAD", 2, raising=False)
    engine, stream, store, bus, clock, _defined = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    persons = ["p1", "p2", "p3", "p4", "p5"]
    await stream.feed(changed([change(p, orders=1, sessions=1, at=T0 + 1) for p in persons]))
    clock.now = T0 + 10
    progress = engine.score_all("churn_risk", publish=True, chunk=1)
    done = [(p["done"], p["published"], p["finished"]) for p in [await anext(progress) for _ in range(3)]]
    assert done == [(1, 1, False), (2, 2, False), (3, 3, False)]
    stream.partitioned.abort()  # a crash partway: p1, p2 (the first block) and p3 (the second) published
    await progress.aclose()
    assert [u.person_id for u in await published(nats_server.url)] == [*persons, "p1", "p2", "p3"]
    again, again_stream = await make_engine(store, bus, tmp_path, clock)
    try:
        # The changes the profile applied at T0 + 5, before the ScoreAll, applied by scoring after its restart.
        await again_stream.feed(changed([change(p, orders=7, at=T0 + 5) for p in ("p1", "p3")]))
        updates = await published(nats_server.url)
        assert [u.person_id for u in updates[8:]] == ["p1", "p3"]
        for person in ("p1", "p3"):
            theirs = [u for u in updates if u.person_id == person]
            assert theirs[-1].at > theirs[-2].at, f"{person}'s change is stamped after the ScoreAll's update"
            assert held_by_profile(updates, person) == pytest.approx(expected(W, [7, 1]), abs=1e-6)
    finally:
        await again_stream.stop()
        await again.stop()
