"""The scoring engine against a real nats-server and the memory store: profile changes in, scores out.

Models are exact logistic models (cdp_testing.onnx_models), so every published score is checked to the
number: it is the model's answer on the person's current fields."""

from __future__ import annotations

from dataclasses import dataclass

import nats
import pytest

from cdp.profile.v1 import profile_pb2
from cdp.scoring.v1 import scoring_pb2
from cdp_kit.bus import Bus, profiles_stream, scores_stream, subjects
from cdp_kit.errors import InvalidArgument, Unavailable
from cdp_kit.storage import open_store
from cdp_kit.timestamps import set_seconds
from cdp_scoring.domain.registry import CANARY, LIVE, SHADOW, canary_bucket
from cdp_scoring.engine import CHANGED_AT, FIELDS, ScoringEngine
from cdp_scoring.modelstore import FolderModelStore
from cdp_testing.fakes import T0, Clock, Delivery
from cdp_testing.onnx_models import expected, logistic_model

W = [0.5, -0.25]


def changed(changes: list[profile_pb2.ProfileChanged], seq: int, delivered: int = 1) -> Delivery:
    """One `profiles.changed.0` message as the consumer hands it to the engine."""
    batch = profile_pb2.ProfileChangedBatch(changes=changes)
    return Delivery(batch, subjects.profiles_changed(0), seq, delivered=delivered)


def change(person: str, *, orders=None, sessions=None, email=None, removed=False, at=T0, events=()):
    message = profile_pb2.ProfileChanged(person_id=person, removed=removed, cause="event", event_ids=list(events))
    set_seconds(message.at, at)
    if orders is not None:
        message.computed["orders_90d"].number_value = orders
    if sessions is not None:
        message.computed["sessions_30d"].number_value = sessions
    if email is not None:
        message.traits["email"].string_value = email
    return message


class Defined:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.fail = False

    async def __call__(self, definitions) -> None:
        if self.fail:
            raise Unavailable("profile is down")
        self.calls.append([d["name"] for d in definitions])


async def make_engine(store, bus, tmp_path, clock, defined=None) -> ScoringEngine:
    engine = ScoringEngine(
        store,
        FolderModelStore(tmp_path / "models"),
        bus.publisher,
        partitions=1,
        owned=[0],
        telemetry=bus.telemetry,
        define_traits=defined,
        clock=clock,
    )
    await engine.start()
    return engine


@pytest.fixture
async def setup(nats_server, tmp_path):
    clock = Clock(T0)
    defined = Defined()
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="scoring-test") as bus:
        await bus.ensure_streams(profiles_stream(), scores_stream())
        engine = await make_engine(store, bus, tmp_path, clock, defined)
        try:
            yield engine, store, bus, clock, defined
        finally:
            await engine.stop()


@dataclass
class Update:
    person_id: str
    model: str
    version: str
    scores: dict[str, float]
    at: float


async def published(nats_url: str) -> list[Update]:
    """Every score published on scores.updated, one row per person and model version."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("SCORES")
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            if info.state.messages == 0:
                break
            batch = scoring_pb2.ScoresUpdatedBatch.FromString((await js.get_msg("SCORES", seq)).data)
            width = len(batch.scores)
            for i, person in enumerate(batch.person_ids):
                values = batch.values[i * width : (i + 1) * width]
                scores = dict(zip(batch.scores, values, strict=True))
                out.append(Update(person, batch.model, batch.version, scores, batch.at_ms[i] / 1000))
        return out
    finally:
        await nc.close()


async def test_a_change_to_a_model_input_publishes_the_exact_score(setup, nats_server):
    engine, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await engine.handle([changed([change("p1", orders=2, sessions=4, events=["web:e1"])], 1)])
    [update] = await published(nats_server.url)
    assert (update.person_id, update.model, update.version) == ("p1", "churn_risk", "1.0.0")
    assert update.scores["churn_risk"] == pytest.approx(expected(W, [2, 4]), abs=1e-6)
    assert update.at == pytest.approx(T0)


async def test_a_change_no_model_reads_scores_nothing(setup, nats_server):
    engine, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await engine.handle([changed([change("p1", email="a@example.com")], 1)])
    assert await published(nats_server.url) == []
    assert engine.fields["p1"] == {"traits.email": "a@example.com", CHANGED_AT: T0}


async def test_a_burst_for_one_person_is_scored_once_on_its_final_fields(setup, nats_server):
    engine, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    burst = [changed([change("p1", orders=i, sessions=1)], seq) for seq, i in enumerate(range(1, 6), start=1)]
    await engine.handle(burst)
    [update] = await published(nats_server.url)
    assert update.scores["churn_risk"] == pytest.approx(expected(W, [5, 1]), abs=1e-6)


async def test_a_change_redelivered_after_newer_ones_does_not_take_the_fields_back(setup, nats_server):
    engine, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await engine.handle([changed([change("p1", orders=1, at=T0)], 1)])
    await engine.handle([changed([change("p1", orders=2, at=T0 + 1)], 2)])
    # Message 1 again (its acknowledgement was lost before newer ones were handled): not applied again.
    await engine.handle([changed([change("p1", orders=1, at=T0)], 1, delivered=2)])
    assert engine.fields["p1"]["computed.orders_90d"] == 2
    last = (await published(nats_server.url))[-1]
    assert last.at == pytest.approx(T0 + 1)
    assert last.scores["churn_risk"] == pytest.approx(expected(W, [2, 0]), abs=1e-6)


async def test_a_redelivered_batch_is_scored_again_and_deduplicated(setup, nats_server):
    engine, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    batch = [changed([change("p1", orders=1)], 1), changed([change("p2", orders=3)], 2)]
    await engine.handle(batch)
    # Redelivered (the acknowledgement was lost): the fields did not change, but a redelivery re-scores in
    # case the first attempt's scores were never stored; JetStream keeps one copy of the same message.
    again = [changed([change("p1", orders=1)], 1, delivered=2), changed([change("p2", orders=3)], 2, delivered=2)]
    await engine.handle(again)
    assert sorted(u.person_id for u in await published(nats_server.url)) == ["p1", "p2"]


async def test_shadow_versions_are_compared_never_published(setup, nats_server):
    engine, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await engine.deploy(logistic_model(version="2.0.0", weights=[0.5, 0.0]), role=SHADOW)
    await engine.handle([changed([change("p1", orders=1, sessions=2)], 1)])
    updates = await published(nats_server.url)
    assert [(u.model, u.version) for u in updates] == [("churn_risk", "1.0.0")]
    stats = engine.stats[("churn_risk", "2.0.0")]
    assert stats.rows == 1
    assert stats.mean_abs_diff == pytest.approx(abs(expected([0.5, 0.0], [1, 2]) - expected(W, [1, 2])), abs=1e-6)


async def test_a_canary_scores_its_share_of_persons_in_place_of_live(setup, nats_server):
    engine, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await engine.deploy(logistic_model(version="2.0.0", weights=[1.0, 1.0]), role=CANARY, canary_percent=30)
    persons = [f"p{i}" for i in range(200)]
    await engine.handle([changed([change(p, orders=1, sessions=1) for p in persons], 1)])
    updates = {u.person_id: u for u in await published(nats_server.url)}
    assert len(updates) == 200
    for person, update in updates.items():
        canary = canary_bucket(person, "churn_risk") < 30
        assert update.version == ("2.0.0" if canary else "1.0.0")
        assert update.scores["churn_risk"] == pytest.approx(expected([1, 1] if canary else W, [1, 1]), abs=1e-6)
    assert 40 < sum(u.version == "2.0.0" for u in updates.values()) < 80


async def test_promote_and_rollback_switch_what_is_published(setup, nats_server):
    engine, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await engine.deploy(logistic_model(version="2.0.0", weights=[1.0, 1.0]), role=None)
    assert engine.registry.get("churn_risk").versions["2.0.0"].role != LIVE
    await engine.promote("churn_risk", "2.0.0")
    await engine.handle([changed([change("p1", orders=1, sessions=1)], 1)])
    await engine.rollback("churn_risk")
    await engine.handle([changed([change("p1", orders=2)], 2)])
    assert [u.version for u in await published(nats_server.url)] == ["2.0.0", "1.0.0"]


async def test_fields_come_back_from_the_snapshot_plus_a_replay_of_the_stream(setup, tmp_path):
    engine, store, bus, clock, _defined = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await engine.handle([changed([change("p1", orders=2, sessions=4)], 1)])
    await engine.snapshot()
    await engine.handle([changed([change("p1", orders=5), change("p2", orders=1)], 2)])
    await engine.handle([changed([change("p2", removed=True)], 3)])
    engine._tasks.clear()  # a crash: no final snapshot
    again = await make_engine(store, bus, tmp_path, clock)
    try:
        assert again.fields["p1"] == {"computed.orders_90d": 2.0, "computed.sessions_30d": 4.0, CHANGED_AT: T0}
        assert again.registry.get("churn_risk").live.version == "1.0.0"

        async def stream():  # what the PROFILES stream holds after the snapshot's position
            yield (
                "profiles.changed.0",
                1,
                profile_pb2.ProfileChangedBatch(changes=[change("p1", orders=2)]).SerializeToString(),
            )
            yield (
                "profiles.changed.0",
                2,
                profile_pb2.ProfileChangedBatch(
                    changes=[change("p1", orders=5), change("p2", orders=1)]
                ).SerializeToString(),
            )
            yield (
                "profiles.changed.0",
                3,
                profile_pb2.ProfileChangedBatch(changes=[change("p2", removed=True)]).SerializeToString(),
            )

        assert await again.replay(stream()) == 3  # the first message is in the snapshot already
        assert again.fields == {"p1": {"computed.orders_90d": 5.0, "computed.sessions_30d": 4.0, CHANGED_AT: T0}}
        [result] = await again.score_person("p1")
        assert result.scores["churn_risk"] == pytest.approx(expected(W, [5, 4]), abs=1e-6)
        await again.snapshot()
        assert {r.key async for r in store.scan_all(FIELDS)} == {"p1"}
    finally:
        await again.stop()


class FailingPublisher:
    """A publisher whose next batch JetStream does not store (the server went away mid-batch)."""

    def __init__(self, publisher) -> None:
        self.publisher = publisher
        self.fail_next = False

    async def publish_batch(self, messages):
        results = await self.publisher.publish_batch(messages)
        if self.fail_next:
            self.fail_next = False
            for result in results:
                result.error = "timeout"
        return results


async def test_a_failed_publish_is_retried_with_the_scores_computed_again(nats_server, tmp_path):
    clock = Clock(T0)
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="t") as bus:
        await bus.ensure_streams(profiles_stream(), scores_stream())
        engine = await make_engine(store, bus, tmp_path, clock)
        publisher = engine.publisher = FailingPublisher(bus.publisher)
        try:
            await engine.deploy(logistic_model(weights=W), role=None)
            publisher.fail_next = True
            with pytest.raises(Unavailable):
                await engine.handle([changed([change("p1", orders=3, sessions=1)], 1)])
            # JetStream redelivers: the fields are already applied, the redelivery still scores them.
            await engine.handle([changed([change("p1", orders=3, sessions=1)], 1, delivered=2)])
            updates = await published(nats_server.url)
            assert [u.person_id for u in updates] == ["p1"]
            assert updates[0].scores["churn_risk"] == pytest.approx(expected(W, [3, 1]), abs=1e-6)
        finally:
            await engine.stop()


async def test_a_removed_person_is_forgotten(setup, nats_server):
    engine, store, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await engine.handle([changed([change("p1", orders=1)], 1)])
    await engine.snapshot()
    assert await store.get(FIELDS, "p1") is not None
    await engine.handle([changed([change("p1", removed=True)], 2)])
    assert "p1" not in engine.fields
    await engine.snapshot()
    assert await store.get(FIELDS, "p1") is None


async def test_score_all_rescores_everyone_with_progress(setup, nats_server):
    engine, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    engine.fields.update({f"p{i}": {"computed.orders_90d": float(i)} for i in range(2500)})
    progress = [p async for p in engine.score_all("churn_risk", publish=True, chunk=1000)]
    assert [p["done"] for p in progress] == [1000, 2000, 2500, 2500]
    assert progress[-1]["finished"] and progress[-1]["published"] == 2500
    updates = {u.person_id: u for u in await published(nats_server.url)}
    assert len(updates) == 2500
    assert updates["p7"].scores["churn_risk"] == pytest.approx(expected(W, [7, 0]), abs=1e-6)


async def test_deploy_defines_the_models_computed_traits_and_fails_whole_when_it_cannot(setup):
    engine, _store, _bus, _clock, defined = setup
    traits = [
        {"name": "orders_90d", "op": "count", "event_names": ["Order Completed"], "window": "90d"},
        {"name": "sessions_30d", "op": "count", "event_type": "page", "window": "30d"},
    ]
    defined.fail = True
    with pytest.raises(Unavailable):
        await engine.deploy(logistic_model(weights=W, spec_overrides={"computed_traits": traits}), role=None)
    assert "churn_risk" not in engine.registry.models
    defined.fail = False
    await engine.deploy(logistic_model(weights=W, spec_overrides={"computed_traits": traits}), role=None)
    assert defined.calls == [["orders_90d", "sessions_30d"]]


async def test_errors_name_what_is_wrong(setup):
    engine, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    with pytest.raises(InvalidArgument, match="takes 2 features"):
        await engine.score_vector("churn_risk", "", [1.0])
    with pytest.raises(InvalidArgument) as caught:
        await engine.deploy(b"not a model", role=None)
    assert caught.value.field == "onnx"
