"""A scoring process SIGKILLed right after a version made live scored the persons it holds: the stamps that
pass handed out (published.py: a person's stamps never go backwards) must survive, or a change the profile
applied before the promotion and scoring applies only after the restart is stamped before the promotion's
update and refused by the profile (`Profile.take_scores`), the person keeping the promotion's score computed
without the change until their next change.

The periodic snapshot is set to an hour, so the only snapshot the restarted process can find is one the
pass took itself: the kill never races a timer."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
import pytest
from nats.js import api

from cdp.profile.v1 import profile_pb2
from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp_testing.onnx_models import expected, logistic_model
from cdp_testing.processes import ScoringProcess, started_on_profiles

from .test_engine import T0_MS, W, published
from .test_held_versions import W2, held_by_profile

# What scoring logs once a version made live has scored the persons it holds (deployments.py).
HELD_SCORED = "held persons scored with a version made live"


def orders_and_sessions(orders: float, sessions: float, at_ms: int) -> bytes:
    change = profile_pb2.ProfileChanged(person_id="p1", cause="event")
    change.computed["orders_90d"].number_value = orders
    change.computed["sessions_30d"].number_value = sessions
    change.at.FromMilliseconds(at_ms)
    return profile_pb2.ProfileChangedBatch(changes=[change]).SerializeToString()


async def until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"{what}; see scoring.log"
        await asyncio.sleep(0.1)


def killable_scoring(nats_server, tmp_path) -> ScoringProcess:
    """One partition on SQLite, snapshots an hour apart (the only snapshot a restart finds is one a pass
    took itself), INFO logs (the scoring of the persons held is read from the log)."""
    return ScoringProcess(
        nats_server.url,
        tmp_path,
        store_url=f"sqlite:///{tmp_path / 'scoring.db'}",
        partitions=1,
        CDP_SCORING_SHIP_MODELS="false",
        CDP_SCORING_SNAPSHOT_SECONDS="3600",
        CDP_LOG_LEVEL="INFO",
    )


def scored_at_least(nats_url: str):
    """`scored(n)`: a condition for `until`, true once scores.updated holds at least n updates."""

    def scored(count: int):
        async def enough() -> bool:
            return len(await published(nats_url)) >= count

        return enough

    return scored


@pytest.mark.timeout(180)
async def test_the_stamps_of_a_promotion_survive_a_kill_right_after_it(nats_server, tmp_path):
    service = killable_scoring(nats_server, tmp_path)
    scored = scored_at_least(nats_server.url)

    async with started_on_profiles(service, nats_server.url) as js:
        async with grpc.aio.insecure_channel(service.grpc_address) as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            await stub.DeployModel(scoring_pb2.DeployModelRequest(onnx=logistic_model(weights=W)), timeout=30)
            await service.logged(HELD_SCORED)  # the deploy's scoring of the persons held
            await js.publish("profiles.changed.0", orders_and_sessions(1, 1, T0_MS + 1000))

            await until(scored(1), "p1's change was never scored")
            await stub.DeployModel(
                scoring_pb2.DeployModelRequest(
                    onnx=logistic_model(version="2.0.0", weights=W2), role=scoring_pb2.ROLE_INACTIVE
                ),
                timeout=30,
            )
            before = service.logged_count(HELD_SCORED)
            # The profile applies p1's next change at T0 + 5 s; scoring has not applied it yet when 2.0.0 is
            # promoted and the persons held are scored with the service's clock (later): p1 without the change.
            await stub.Promote(scoring_pb2.PromoteRequest(name="churn_risk", version="2.0.0"), timeout=30)
            await service.logged(HELD_SCORED, before + 1)  # the promotion's
        service.kill()  # before any periodic snapshot: an hour away
        updates = await published(nats_server.url)
        assert [(u.person_id, u.version) for u in updates] == [("p1", "1.0.0"), ("p1", "2.0.0")]
        assert updates[1].at > T0_MS / 1000 + 5, "the promotion is stamped with the service's clock"

        service.start()
        await js.publish("profiles.changed.0", orders_and_sessions(7, 1, T0_MS + 5000))
        await until(scored(3), "p1's change in flight was never scored after the restart")
        updates = await published(nats_server.url)
        assert [u.version for u in updates] == ["1.0.0", "2.0.0", "2.0.0"]
        assert updates[2].scores["churn_risk"] == pytest.approx(expected(W2, [7, 1]), abs=1e-6)
        assert updates[2].at > updates[1].at, "the change's score is stamped after the promotion's"
        assert held_by_profile(updates, "p1") == pytest.approx(expected(W2, [7, 1]), abs=1e-6)


@pytest.mark.timeout(180)
async def test_the_stamps_of_the_chunks_a_score_all_published_survive_a_kill_partway(nats_server, tmp_path):
    """A ScoreAll run by hand snapshots the stamps of each block of chunks before it publishes any of them
    (requests.py: STAMPED_AHEAD persons, eight chunks of 1,024): killed after chunks of two blocks were
    published and before the pass ends, the process comes back with their stamps, and a change the profile
    applied before the ScoreAll, scored after the restart, is stamped after the ScoreAll's update and kept -
    for a person of the first block and one of the second.

    The pass is held partway without timing: once scoring has started, scores.updated takes nine messages
    more and refuses the next (discard new). Nine chunks are published (one message each), the tenth is
    refused and the call fails; the process is SIGKILLed then, before any periodic snapshot (an hour away),
    and the stream's limit lifted before it starts again."""
    persons = [f"p{n:05d}" for n in range(10_300)]  # eleven chunks of the 1,024 ScoreAll reads at a time
    service = killable_scoring(nats_server, tmp_path)
    scored = scored_at_least(nats_server.url)

    async with started_on_profiles(service, nats_server.url) as js:
        async with grpc.aio.insecure_channel(service.grpc_address) as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            await stub.DeployModel(scoring_pb2.DeployModelRequest(onnx=logistic_model(weights=W)), timeout=30)
            await service.logged(HELD_SCORED)
            for start in range(0, len(persons), 500):
                batch = profile_pb2.ProfileChangedBatch()
                for person in persons[start : start + 500]:
                    change = batch.changes.add(person_id=person, cause="event")
                    change.computed["orders_90d"].number_value = 1
                    change.computed["sessions_30d"].number_value = 1
                    change.at.FromMilliseconds(T0_MS + 1000)
                await js.publish("profiles.changed.0", batch.SerializeToString())
            await until(scored(len(persons)), "the persons' changes were never scored")

            config = (await js.stream_info("SCORES")).config
            state = (await js.stream_info("SCORES")).state
            await js.update_stream(
                dataclasses.replace(config, max_msgs=state.messages + 9, discard=api.DiscardPolicy.NEW)
            )
            progress = []
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for message in stub.ScoreAll(scoring_pb2.ScoreAllRequest(publish=True), timeout=60):
                    progress.append(message)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            done = [(p.persons_done, p.scores_published, p.done) for p in progress]
            assert done == [(n * 1024, n * 1024, False) for n in range(1, 10)]
        service.kill()  # before any periodic snapshot: an hour away
        await js.update_stream(config)
        updates = await published(nats_server.url)
        passed = updates[len(persons) :]
        assert [u.person_id for u in passed] == persons[: 9 * 1024], "nine chunks published; no other"
        assert passed[0].at > T0_MS / 1000 + 5, "the ScoreAll is stamped with the service's clock"

        service.start()
        # The profile applied these persons' changes at T0 + 5 s, before the ScoreAll; scoring applies them only
        # now. p00000 is of the pass's first block, p08192 the first of its second.
        batch = profile_pb2.ProfileChangedBatch()
        for person in ("p00000", "p08192"):
            change = batch.changes.add(person_id=person, cause="event")
            change.computed["orders_90d"].number_value = 7
            change.at.FromMilliseconds(T0_MS + 5000)
        await js.publish("profiles.changed.0", batch.SerializeToString())
        await until(scored(len(updates) + 2), "the changes in flight were never scored after the restart")
        after = await published(nats_server.url)
        assert sorted(u.person_id for u in after[len(updates) :]) == ["p00000", "p08192"]
        for person in ("p00000", "p08192"):
            theirs = [u for u in after if u.person_id == person]
            assert theirs[-1].scores["churn_risk"] == pytest.approx(expected(W, [7, 1]), abs=1e-6)
            assert theirs[-1].at > theirs[-2].at, f"{person}'s change is stamped after the ScoreAll's update"
            assert held_by_profile(theirs, person) == pytest.approx(expected(W, [7, 1]), abs=1e-6)
