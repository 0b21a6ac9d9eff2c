"""The scoring engine against a real nats-server and the memory store: profile changes in, scores out.

Changes come the way they do in production: published on `profiles.changed.0` and applied by the kit's
partitioned engine running scoring's logic (`cdp_scoring.stream`). Models are exact logistic models
(cdp_testing.onnx_models), so every published score is checked to the number: it is the model's answer
on the person's current fields."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import nats
import orjson
import pytest

from cdp.profile.v1 import profile_pb2
from cdp.scoring.v1 import scoring_pb2
from cdp_kit.bus import Bus, profiles_stream, scores_stream, subjects
from cdp_kit.bus.consumer import StandingPull
from cdp_kit.errors import InvalidArgument, Unavailable
from cdp_kit.storage import Put, open_store
from cdp_kit.timestamps import set_seconds
from cdp_scoring.domain.registry import CANARY, LIVE, SHADOW, canary_bucket
from cdp_scoring.engine import CHANGED_AT, CHECKPOINTS, FIELDS, SNAPSHOTS, ScoringEngine
from cdp_scoring.modelstore import FolderModelStore
from cdp_scoring.published import STAMP
from cdp_scoring.stream import ScoringStream, scoring_stream
from cdp_testing.fakes import T0, Clock
from cdp_testing.onnx_models import expected, logistic_model

W = [0.5, -0.25]
T0_MS = round(T0 * 1000)  # T0 as `at_ms` carries it


def changed(changes: list[profile_pb2.ProfileChanged]) -> profile_pb2.ProfileChangedBatch:
    """One `profiles.changed.0` message."""
    return profile_pb2.ProfileChangedBatch(changes=changes)


class Stream:
    """`profiles.changed.0` of one engine: the kit's partitioned engine on scoring's logic."""

    def __init__(self, engine: ScoringEngine, bus: Bus) -> None:
        self.engine = engine
        self.bus = bus
        self.partitioned: ScoringStream = scoring_stream(
            engine, bus, partitions=1, batch_size=64, ack_wait=30, snapshot_every=None
        )

    async def start(self) -> None:
        await self.partitioned.start_partition(0)
        await self.partitioned.wait_ready()

    async def stop(self) -> None:
        """Release the partition as a replica does: drained, snapshotted, its fields forgotten."""
        await self.partitioned.close()

    async def feed(self, *messages: profile_pb2.ProfileChangedBatch) -> int:
        """Publish the messages (several are applied as one batch) and wait until their scores are
        published; the last one's stream position."""
        together = len(messages) > 1
        if together:
            await self.stop()  # so that the next fetch takes them all
        for message in messages:
            seq = (await self.bus.js.publish(subjects.profiles_changed(0), message.SerializeToString())).seq
        if together:
            with whole_first_fetch(len(messages)):
                await self.start()
                await self.settled(seq)
        else:
            await self.settled(seq)
        return seq

    async def settled(self, seq: int, timeout: float = 10.0) -> None:
        """Position `seq` durable, its scores published and acknowledged."""
        deadline = time.monotonic() + timeout
        while True:
            pipeline = self.partitioned.pipelines[0]
            if pipeline.checkpoint >= seq and pipeline.idle.is_set():
                return
            assert time.monotonic() < deadline, f"position {seq} not settled in {timeout}s"
            await asyncio.sleep(0.01)

    async def redeliver_everything(self) -> None:
        """As if every acknowledgement had been lost: the consumer starts again from the stream's
        beginning, and everything it delivers again is acknowledged."""
        await self.stop()
        await self.bus.js.delete_consumer(subjects.PROFILES, "scoring-p0")
        await self.start()
        deadline = time.monotonic() + 10
        while True:
            info = await self.bus.js.consumer_info(subjects.PROFILES, "scoring-p0")
            if not info.num_pending and not info.num_ack_pending and self.partitioned.pipelines[0].idle.is_set():
                return
            assert time.monotonic() < deadline, "the redelivered messages were never acknowledged"
            await asyncio.sleep(0.01)

    async def snapshot(self) -> None:
        await self.partitioned.snapshot_now()


@contextlib.contextmanager
def whole_first_fetch(count: int):
    """A partition's first fetch waits until `count` messages have reached its pull's inbox. A fetch
    returns what has arrived: the server delivers a pull's messages one by one, so on a busy machine the
    first can be taken before the rest are in, and one burst is applied as two batches."""
    fetch = StandingPull.fetch
    waited = False

    async def whole(pull: StandingPull, timeout: float) -> list:
        nonlocal waited
        if not waited:
            waited = True
            await pull._top_up()  # the pull's request, which the fetch would send first
            deadline = time.monotonic() + 10
            while pull.inbox._pending_queue.qsize() < count and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            assert pull.inbox._pending_queue.qsize() >= count, f"{count} messages never reached the inbox"
        return await fetch(pull, timeout)

    StandingPull.fetch = whole
    try:
        yield
    finally:
        StandingPull.fetch = fetch


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


async def make_engine(store, bus, tmp_path, clock, defined=None) -> tuple[ScoringEngine, Stream]:
    engine = ScoringEngine(
        store,
        FolderModelStore(tmp_path / "models"),
        bus.publisher,
        partitions=1,
        telemetry=bus.telemetry,
        define_traits=defined,
        clock=clock,
    )
    await engine.start()
    stream = Stream(engine, bus)
    await stream.start()
    return engine, stream


@pytest.fixture
async def setup(nats_server, tmp_path):
    clock = Clock(T0)
    defined = Defined()
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="scoring-test") as bus:
        await bus.ensure_streams(profiles_stream(), scores_stream())
        engine, stream = await make_engine(store, bus, tmp_path, clock, defined)
        try:
            yield engine, stream, store, bus, clock, defined
        finally:
            await stream.stop()
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
            message = scoring_pb2.ScoresUpdatedBatch.FromString((await js.get_msg("SCORES", seq)).data)
            for batch in (message, *message.more):  # one message per partition carries every model's columns
                width = len(batch.scores)
                for i, person in enumerate(batch.person_ids):
                    values = batch.values[i * width : (i + 1) * width]
                    scores = dict(zip(batch.scores, values, strict=True))
                    out.append(Update(person, batch.model, batch.version, scores, batch.at_ms[i] / 1000))
        return out
    finally:
        await nc.close()


async def test_a_change_to_a_model_input_publishes_the_exact_score(setup, nats_server):
    engine, stream, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await stream.feed(changed([change("p1", orders=2, sessions=4, events=["web:e1"])]))
    [update] = await published(nats_server.url)
    assert (update.person_id, update.model, update.version) == ("p1", "churn_risk", "1.0.0")
    assert update.scores["churn_risk"] == pytest.approx(expected(W, [2, 4]), abs=1e-6)
    assert update.at == pytest.approx(T0)


async def test_a_round_publishes_one_message_per_partition_carrying_every_model(setup, nats_server):
    engine, stream, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await engine.deploy(logistic_model("buy_propensity", weights=[1.0, 0.5]), role=None)
    await stream.feed(changed([change("p1", orders=2, sessions=4), change("p2", orders=1, sessions=1)]))
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jetstream().stream_info("SCORES")
        assert info.state.messages == 1, "one partition, one round: one message, not one per model"
    finally:
        await nc.close()
    updates = await published(nats_server.url)
    assert sorted((u.person_id, u.model) for u in updates) == [
        ("p1", "buy_propensity"),
        ("p1", "churn_risk"),
        ("p2", "buy_propensity"),
        ("p2", "churn_risk"),
    ]
    buy = {u.person_id: u.scores["buy_propensity"] for u in updates if u.model == "buy_propensity"}
    assert buy == {
        "p1": pytest.approx(expected([1.0, 0.5], [2, 4]), abs=1e-6),
        "p2": pytest.approx(expected([1.0, 0.5], [1, 1]), abs=1e-6),
    }


async def test_a_large_round_scores_every_person_exactly_whatever_each_models_share(setup, nats_server):
    """A round where one model has rows enough for a worker thread and another a few (run inline)."""
    engine, stream, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    tickets = [{"name": "tickets", "path": "computed.tickets_90d", "default": 0}]
    await engine.deploy(logistic_model("support_risk", features=tickets, weights=[0.75]), role=None)
    changes = [change(f"p{i}", orders=i % 7, sessions=i % 5) for i in range(100)]
    for i in (3, 40, 97):
        changes[i].computed["tickets_90d"].number_value = i
    await stream.feed(changed(changes))
    updates = await published(nats_server.url)
    churn = {u.person_id: u.scores["churn_risk"] for u in updates if u.model == "churn_risk"}
    assert churn == {f"p{i}": pytest.approx(expected(W, [i % 7, i % 5]), abs=1e-6) for i in range(100)}
    support = {u.person_id: u.scores["support_risk"] for u in updates if u.model == "support_risk"}
    assert support == {f"p{i}": pytest.approx(expected([0.75], [i]), abs=1e-6) for i in (3, 40, 97)}


async def test_a_change_no_model_reads_scores_nothing(setup, nats_server):
    engine, stream, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await stream.feed(changed([change("p1", email="a@example.com")]))
    assert await published(nats_server.url) == []
    assert engine.fields["p1"] == {"traits.email": "a@example.com", CHANGED_AT: T0}


async def test_a_burst_for_one_person_is_scored_once_on_its_final_fields(setup, nats_server):
    engine, stream, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await stream.feed(*(changed([change("p1", orders=i, sessions=1)]) for i in range(1, 6)))
    [update] = await published(nats_server.url)
    assert update.scores["churn_risk"] == pytest.approx(expected(W, [5, 1]), abs=1e-6)


async def test_a_change_redelivered_after_newer_ones_does_not_take_the_fields_back(setup, nats_server):
    engine, stream, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await stream.feed(changed([change("p1", orders=1, at=T0)]))
    await stream.feed(changed([change("p1", orders=2, at=T0 + 1)]))
    # Messages 1 and 2 again (their acknowledgements were lost): not applied again.
    await stream.redeliver_everything()
    assert engine.fields["p1"]["computed.orders_90d"] == 2
    last = (await published(nats_server.url))[-1]
    assert last.at == pytest.approx(T0 + 1)
    assert last.scores["churn_risk"] == pytest.approx(expected(W, [2, 0]), abs=1e-6)


async def test_a_redelivered_batch_publishes_its_scores_once(setup, nats_server):
    engine, stream, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await stream.feed(changed([change("p1", orders=1)]), changed([change("p2", orders=3)]))
    # Redelivered (the acknowledgement was lost): its scores were made durable with the checkpoint and
    # published from there; the redelivery is skipped, nothing is published twice.
    await stream.redeliver_everything()
    assert sorted(u.person_id for u in await published(nats_server.url)) == ["p1", "p2"]


async def test_shadow_versions_are_compared_never_published(setup, nats_server):
    engine, stream, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await engine.deploy(logistic_model(version="2.0.0", weights=[0.5, 0.0]), role=SHADOW)
    await stream.feed(changed([change("p1", orders=1, sessions=2)]))
    updates = await published(nats_server.url)
    assert [(u.model, u.version) for u in updates] == [("churn_risk", "1.0.0")]
    stats = engine.stats[("churn_risk", "2.0.0")]
    assert stats.rows == 1
    assert stats.mean_abs_diff == pytest.approx(abs(expected([0.5, 0.0], [1, 2]) - expected(W, [1, 2])), abs=1e-6)


async def test_a_canary_scores_its_share_of_persons_in_place_of_live(setup, nats_server):
    engine, stream, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await engine.deploy(logistic_model(version="2.0.0", weights=[1.0, 1.0]), role=CANARY, canary_percent=30)
    persons = [f"p{i}" for i in range(200)]
    await stream.feed(changed([change(p, orders=1, sessions=1) for p in persons]))
    updates = {u.person_id: u for u in await published(nats_server.url)}
    assert len(updates) == 200
    for person, update in updates.items():
        canary = canary_bucket(person, "churn_risk") < 30
        assert update.version == ("2.0.0" if canary else "1.0.0")
        assert update.scores["churn_risk"] == pytest.approx(expected([1, 1] if canary else W, [1, 1]), abs=1e-6)
    assert 40 < sum(u.version == "2.0.0" for u in updates.values()) < 80


async def test_promote_and_rollback_switch_what_is_published(setup, nats_server):
    engine, stream, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await engine.deploy(logistic_model(version="2.0.0", weights=[1.0, 1.0]), role=None)
    assert engine.registry.get("churn_risk").versions["2.0.0"].role != LIVE
    await engine.promote("churn_risk", "2.0.0")
    await engine.held_scored()  # nobody held yet: nothing published
    await stream.feed(changed([change("p1", orders=1, sessions=1)]))
    await engine.rollback("churn_risk")
    await engine.held_scored()  # p1, held, is published under the version made live again (deployments.py)
    await stream.feed(changed([change("p1", orders=2)]))
    updates = await published(nats_server.url)
    assert [u.version for u in updates] == ["2.0.0", "1.0.0", "1.0.0"]
    assert [u.scores["churn_risk"] for u in updates] == pytest.approx(
        [expected([1, 1], [1, 1]), expected(W, [1, 1]), expected(W, [2, 1])], abs=1e-6
    )


async def test_fields_come_back_from_the_snapshot_plus_a_replay_of_the_stream(setup, tmp_path, nats_server):
    engine, stream, store, bus, clock, _defined = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await stream.feed(changed([change("p1", orders=2, sessions=4)]))
    await stream.snapshot()
    await stream.feed(changed([change("p1", orders=5), change("p2", orders=1)]))
    await stream.feed(changed([change("p2", removed=True)]))
    stream.partitioned.abort()  # a crash: no final snapshot
    before = len(await published(nats_server.url))
    again, again_stream = await make_engine(store, bus, tmp_path, clock)
    try:
        # The snapshot (p1 as of the first message, with the stamp of its update), then the two messages
        # after it, not scored again.
        assert again.fields == {
            "p1": {
                "computed.orders_90d": 5.0,
                "computed.sessions_30d": 4.0,
                CHANGED_AT: T0,
                STAMP + "churn_risk": T0_MS,
            }
        }
        assert again.registry.get("churn_risk").live.version == "1.0.0"
        [result] = await again.score_person("p1")
        assert result.scores["churn_risk"] == pytest.approx(expected(W, [5, 4]), abs=1e-6)
        await again_stream.snapshot()
        assert {r.key async for r in store.scan_all(FIELDS)} == {"p1"}
        assert len(await published(nats_server.url)) == before
    finally:
        await again_stream.stop()
        await again.stop()


class FailingPublisher:
    """A publisher whose next batch JetStream does not store (the server went away mid-batch)."""

    def __init__(self, publisher) -> None:
        self.publisher = publisher
        self.fail_next = False

    def __getattr__(self, name: str):
        return getattr(self.publisher, name)

    async def publish_batch(self, messages):
        results = await self.publisher.publish_batch(messages)
        if self.fail_next:
            self.fail_next = False
            for result in results:
                result.error = "timeout"
        return results


async def test_a_failed_publish_is_retried_until_the_scores_are_stored(nats_server, tmp_path):
    clock = Clock(T0)
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="t") as bus:
        await bus.ensure_streams(profiles_stream(), scores_stream())
        publisher = bus.publisher = FailingPublisher(bus.publisher)
        engine, stream = await make_engine(store, bus, tmp_path, clock)
        try:
            await engine.deploy(logistic_model(weights=W), role=None)
            publisher.fail_next = True
            # The first attempt is not stored; the same messages are published again (same ids).
            await stream.feed(changed([change("p1", orders=3, sessions=1)]))
            updates = await published(nats_server.url)
            assert [u.person_id for u in updates] == ["p1"]
            assert updates[0].scores["churn_risk"] == pytest.approx(expected(W, [3, 1]), abs=1e-6)
        finally:
            await stream.stop()
            await engine.stop()


async def test_a_removed_person_is_forgotten(setup, nats_server):
    engine, stream, store, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await stream.feed(changed([change("p1", orders=1)]))
    await stream.snapshot()
    assert await store.get(FIELDS, "p1") is not None
    await stream.feed(changed([change("p1", removed=True)]))
    assert "p1" not in engine.fields
    await stream.snapshot()
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
    engine, _stream, _store, _bus, _clock, defined = setup
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


async def test_a_version_is_registered_only_once_its_file_is_in_the_model_store(setup):
    """A deploy stores the file before anyone can list, train beside or promote the version: fresh-clone CI
    once trained `clusters` while the shipped file was still being written, and lost the file's read."""
    engine, *_ = setup
    stored, release = asyncio.Event(), asyncio.Event()
    put = engine.model_store.put

    async def slow_put(name: str, version: str, data: bytes) -> str:
        stored.set()
        await release.wait()
        return await put(name, version, data)

    engine.model_store.put = slow_put
    deploying = asyncio.create_task(engine.deploy(logistic_model(weights=W), role=None))
    await stored.wait()
    assert "churn_risk" not in engine.registry.models
    release.set()
    version = await deploying
    assert engine.registry.get("churn_risk").live is version
    assert await engine.model_store.get("churn_risk", version.version, version.sha256)


async def test_errors_name_what_is_wrong(setup):
    engine, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    with pytest.raises(InvalidArgument, match="takes 2 features"):
        await engine.score_vector("churn_risk", "", [1.0])
    with pytest.raises(InvalidArgument) as caught:
        await engine.deploy(b"not a model", role=None)
    assert caught.value.field == "onnx"


async def test_an_upgrade_keeps_the_snapshot_taken_before_the_engine(nats_server, tmp_path):
    """Before the partitioned engine, the snapshot's positions were scoring's only checkpoints, kept in
    `scoring_checkpoints`, whose keys the engine's checkpoints now use: on the first start they move to
    `scoring_snapshots`, the fields come back from that snapshot, and what came after it is scored."""
    clock = Clock(T0)
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="upgrade") as bus:
        await bus.ensure_streams(profiles_stream(), scores_stream())
        for message in (changed([change("p1", orders=1, sessions=2)]), changed([change("p1", orders=3)])):
            await bus.js.publish(subjects.profiles_changed(0), message.SerializeToString())
        fields = {"computed.orders_90d": 3.0, "computed.sessions_30d": 2.0, CHANGED_AT: T0}
        await store.bulk_write(
            [
                Put(FIELDS, "p1", {"fields": orjson.dumps(fields).decode()}),
                Put(CHECKPOINTS, subjects.profiles_changed(0), {"stream_seq": 2, "at": T0}),
            ]
        )
        engine, stream = await make_engine(store, bus, tmp_path, clock)
        try:
            await engine.deploy(logistic_model(weights=W), role=None)
            assert engine.fields["p1"] == fields
            assert (await store.get(SNAPSHOTS, subjects.profiles_changed(0))).doc["stream_seq"] == 2
            await engine.held_scored()  # the model's first version scores p1, held from the snapshot
            await stream.feed(changed([change("p1", sessions=5, at=T0 + 1)]))
            first, update = await published(nats_server.url)
            assert first.scores["churn_risk"] == pytest.approx(expected(W, [3, 2]), abs=1e-6)
            assert update.at == pytest.approx(T0 + 1)
            assert update.scores["churn_risk"] == pytest.approx(expected(W, [3, 5]), abs=1e-6)
        finally:
            await stream.stop()
            await engine.stop()


# --- score updates that change nothing (published.py) ------------------------------------------------
# W weighs orders +0.5 and sessions -0.25: orders +1 with sessions +2 leaves the score exactly where it was.
# Each change has its own time: the same scores of another change are another message (not a duplicate).


async def test_a_score_that_did_not_move_is_not_published_again(setup, nats_server):
    engine, stream, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await stream.feed(changed([change("p1", orders=2, sessions=4, at=T0 + 1)]))
    await stream.feed(changed([change("p1", orders=3, sessions=6, at=T0 + 2)]))  # inputs moved, the score did not
    assert [u.person_id for u in await published(nats_server.url)] == ["p1"]
    await stream.feed(changed([change("p1", orders=4, at=T0 + 3)]))  # it moved: news
    updates = await published(nats_server.url)
    assert len(updates) == 2
    assert updates[-1].scores["churn_risk"] == pytest.approx(expected(W, [4, 6]), abs=1e-6)


async def test_a_new_version_publishes_equal_scores_under_its_own_version(setup, nats_server):
    engine, stream, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await engine.deploy(logistic_model(version="2.0.0", weights=W), role=None)
    await stream.feed(changed([change("p1", orders=2, sessions=4, at=T0 + 4)]))
    await engine.promote("churn_risk", "2.0.0")
    await engine.held_scored()  # p1 published under the version made live: the same value (deployments.py)
    await stream.feed(changed([change("p1", orders=3, sessions=6, at=T0 + 5)]))  # the same value: not news
    updates = await published(nats_server.url)
    assert [u.version for u in updates] == ["1.0.0", "2.0.0"]
    assert updates[0].scores == updates[1].scores


async def test_what_was_published_survives_a_restart_with_the_fields(setup, tmp_path, nats_server):
    engine, stream, store, bus, clock, _defined = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await stream.feed(changed([change("p1", orders=2, sessions=4, at=T0 + 6)]))
    await stream.stop()  # drained and snapshotted as a replica that stops
    again, again_stream = await make_engine(store, bus, tmp_path, clock)
    try:
        await again_stream.feed(changed([change("p1", orders=3, sessions=6, at=T0 + 7)]))
        assert len(await published(nats_server.url)) == 1
    finally:
        await again_stream.stop()
        await again.stop()


async def test_scores_published_after_the_snapshot_are_not_taken_for_the_last_after_a_crash(
    setup, tmp_path, nats_server
):
    engine, stream, store, bus, clock, _defined = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await stream.feed(changed([change("p1", orders=2, sessions=4, at=T0 + 8)]))  # A, in the snapshot
    await stream.snapshot()
    await stream.feed(changed([change("p1", orders=5, at=T0 + 9)]))  # B, published after it
    stream.partitioned.abort()  # a crash: the snapshot still says A
    again, again_stream = await make_engine(store, bus, tmp_path, clock)
    try:
        # Back to A's inputs: the profile holds B, so A is news, whatever the snapshot remembered.
        await again_stream.feed(changed([change("p1", orders=2, at=T0 + 10)]))
        updates = await published(nats_server.url)
        assert len(updates) == 3
        assert updates[-1].scores["churn_risk"] == pytest.approx(expected(W, [2, 4]), abs=1e-6)
    finally:
        await again_stream.stop()
        await again.stop()


async def test_a_profile_score_other_than_the_last_published_makes_the_next_update_news(setup, nats_server):
    engine, stream, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await stream.feed(changed([change("p1", orders=2, sessions=4, at=T0 + 11)]))
    # A merge brought another person's newer score: the profile no longer holds what was published.
    merged = change("p1", at=T0 + 12)
    merged.scores["churn_risk"] = 0.9
    await stream.feed(changed([merged]))
    await stream.feed(changed([change("p1", orders=3, sessions=6, at=T0 + 13)]))
    updates = await published(nats_server.url)
    assert len(updates) == 2
    assert updates[-1].scores["churn_risk"] == pytest.approx(expected(W, [3, 6]), abs=1e-6)


async def test_the_profiles_own_copy_of_the_published_score_changes_nothing(setup, nats_server):
    engine, stream, *_ = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await stream.feed(changed([change("p1", orders=2, sessions=4, at=T0 + 14)]))
    [update] = await published(nats_server.url)
    stored = change("p1", at=T0 + 15)
    stored.scores["churn_risk"] = update.scores["churn_risk"]
    await stream.feed(changed([stored]))
    await stream.feed(changed([change("p1", orders=3, sessions=6, at=T0 + 16)]))
    assert len(await published(nats_server.url)) == 1


async def test_score_all_publishes_everyone_and_what_was_remembered_before_it_counts_no_more(
    setup, tmp_path, nats_server
):
    engine, stream, store, bus, clock, _defined = setup
    await engine.deploy(logistic_model(weights=W), role=None)
    await stream.feed(changed([change("p1", orders=2, sessions=4, at=T0 + 17)]))
    await stream.snapshot()  # remembers the score published for p1
    progress = engine.score_all("churn_risk", publish=True)
    assert (await anext(progress))["published"] == 1  # an explicit refresh publishes even an unchanged score
    # A crash before the next snapshot: before the pass has ended (as it ends, it takes one).
    stream.partitioned.abort()
    await progress.aclose()
    again, again_stream = await make_engine(store, bus, tmp_path, clock)
    try:
        assert again.published.entry("p1", "churn_risk") is None  # written before the ScoreAll
        await again_stream.feed(changed([change("p1", orders=3, sessions=6, at=T0 + 18)]))
        assert len(await published(nats_server.url)) == 3
    finally:
        await again_stream.stop()
        await again.stop()


async def test_scores_are_published_at_the_resolution_and_a_move_below_it_is_not_news(nats_server, tmp_path):
    clock = Clock(T0)
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="t") as bus:
        await bus.ensure_streams(profiles_stream(), scores_stream())
        engine = ScoringEngine(
            store, FolderModelStore(tmp_path / "models"), bus.publisher, partitions=1, telemetry=bus.telemetry,
            clock=clock, resolution=2,
        )  # fmt: skip
        await engine.start()
        stream = Stream(engine, bus)
        await stream.start()
        try:
            await engine.deploy(logistic_model(weights=[0.001, 0.0]), role=None)
            await stream.feed(changed([change("p1", orders=1, at=T0 + 19)]))  # 0.50025: published as 0.5
            await stream.feed(changed([change("p1", orders=2, at=T0 + 20)]))  # 0.50050: 0.5 still
            await stream.feed(changed([change("p1", orders=30, at=T0 + 21)]))  # 0.50750: 0.51
            updates = await published(nats_server.url)
            assert [u.scores["churn_risk"] for u in updates] == [0.5, 0.51]
        finally:
            await stream.stop()
            await engine.stop()


def test_a_resolution_that_is_not_decimal_places_is_refused_naming_it(nats_server, tmp_path):
    from .conftest import settings

    assert any("CDP_SCORING_RESOLUTION" in p for p in settings(nats_server, tmp_path, resolution="0.001").validate())
    assert settings(nats_server, tmp_path, resolution="4").resolution_decimals == 4
    assert settings(nats_server, tmp_path).resolution_decimals is None
