"""ExplainScore: why a person has the score they have, over gRPC on the process as `__main__` sets it up (a
real nats-server, tokens on), with real onnxruntime: the test kit's logistic model (trained weights the test
knows, a training reference built as training runs build it) and the shipped churn_risk with its shipped
reference.

Per output score: the person's score (`Score`'s), the baseline score (the model on the baseline vector),
and per feature its occlusion contribution, checked against the model's ONNX run directly with
onnxruntime; for a logistic model, whose score is monotone in each feature, each contribution's sign is
the weight's sign times the direction of the person's value from the baseline. Missing fields are flagged.
Never a value of the person's (asserted on the serialized answer). Errors name the field; the scope is a
reader's; a person of another replica's partition is asked of that replica."""

from __future__ import annotations

import asyncio
import math
import struct
import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from cdp.profile.v1 import profile_pb2
from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp_kit.auth import write_tokens_file
from cdp_kit.bus import Bus, partition_for, profiles_stream, subjects
from cdp_kit.natsserver import free_port
from cdp_kit.service import serving
from cdp_scoring.__main__ import setup
from cdp_scoring.api import SCOPES
from cdp_scoring.domain import FeatureAssembler, ModelSpec
from cdp_scoring.drift import bins_of, build_reference, load_shipped_references
from cdp_scoring.explain import DEFAULT, TRAINING_MEDIAN, baseline, median_of, most_frequent_category
from cdp_scoring.modelstore import shipped_models
from cdp_testing.errors import bad_request_fields
from cdp_testing.onnx_models import logistic_model

from .conftest import settings

pb = scoring_pb2
ADMIN = [("authorization", "Bearer admin-token")]
READER = [("authorization", "Bearer reader-token")]
PROFILE_ONLY = [("authorization", "Bearer profile-token")]
PROFILE_READER = [("authorization", "Bearer profile-reader-token")]
DAY = 86_400.0

# The logistic model: sigmoid(0.5 orders - 0.25 sessions + 0.75 plan_index - 0.2 tenure), plan a category.
FEATURES = (
    {"name": "orders", "path": "computed.orders_90d", "default": 0},
    {"name": "sessions", "path": "computed.sessions_30d", "default": 0},
    {"name": "plan", "path": "traits.plan", "transform": "category", "categories": ["free", "plus", "pro"],
     "default": -1},
    {"name": "tenure", "path": "computed.signed_up_at", "transform": "days_since", "default": 0},
)  # fmt: skip
WEIGHTS = [0.5, -0.25, 0.75, -0.2]
BIAS = -0.5


def training_rows(n: int = 4001) -> np.ndarray:
    """The rows the logistic model's reference describes: continuous counts, a category mostly "plus"."""
    rng = np.random.default_rng(7)
    plan = rng.choice([0.0, 1.0, 2.0], size=n, p=[0.2, 0.7, 0.1])
    return np.column_stack([rng.gamma(3.0, 1.5, n), rng.normal(8.0, 2.0, n), plan, rng.uniform(1, 60, n)])


def logistic(version: str = "1.0.0", *, reference: bool = True) -> bytes:
    X = training_rows()
    z = X @ np.asarray(WEIGHTS) + BIAS
    training = {}
    if reference:
        training["reference"] = build_reference([f["name"] for f in FEATURES], X, {"churn_risk": 1 / (1 + np.exp(-z))})
    return logistic_model(
        version=version, features=FEATURES, weights=WEIGHTS, bias=BIAS, spec_overrides={"training": training}
    )


def shipped(name: str) -> bytes:
    return next(path for path in shipped_models() if path.stem == name).read_bytes()


def onnx_scores(data: bytes, rows: np.ndarray) -> np.ndarray:
    """The model's own answer for `rows`, straight from onnxruntime (its spec's first output, column index)."""
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    spec = ModelSpec.from_metadata(session.get_modelmeta().custom_metadata_map)
    output = spec.outputs[0]
    [tensor] = session.run([output.output], {spec.input: np.asarray(rows, dtype=np.float32)})
    return tensor.reshape(len(rows), -1)[:, output.index if tensor.ndim == 2 and tensor.shape[1] > 1 else 0]


def spec_of(data: bytes) -> ModelSpec:
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return ModelSpec.from_metadata(session.get_modelmeta().custom_metadata_map)


def error_reason(error: grpc.aio.AioRpcError) -> str:
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


def write_tokens(tmp_path):
    tokens = tmp_path / "tokens.json"
    write_tokens_file(
        tokens,
        [
            ("admin", "admin-token", ["*"]),
            ("reader", "reader-token", ["scoring:read"]),
            ("profile", "profile-token", ["profile:read"]),
            ("profile-reader", "profile-reader-token", ["scoring:read", "profile:read"]),
        ],
    )
    return tokens


@pytest.fixture
async def scoring(nats_server, tmp_path):
    config = settings(nats_server, tmp_path, auth_mode="tokens", auth_tokens_file=write_tokens(tmp_path))
    async with serving(config, setup) as runtime:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
            yield scoring_pb2_grpc.ScoringServiceStub(channel), runtime.parts["engine"]


async def explain(stub, model: str, person: str, version: str = "", metadata=READER) -> pb.ExplainScoreResponse:
    return await stub.ExplainScore(
        pb.ExplainScoreRequest(model=model, person_id=person, version=version), metadata=metadata
    )


def by_name(explained: pb.ExplainedScore) -> dict[str, pb.FeatureContribution]:
    return {feature.name: feature for feature in explained.features}


# --- baselines from a reference's deciles ---------------------------------------------------------------


def test_a_median_read_from_the_deciles_is_the_training_rows_median():
    rng = np.random.default_rng(11)
    # Whole numbers (counts, flags): the median itself where its decile bin holds one value, never a cut.
    for values in (rng.poisson(0.4, 1001), rng.poisson(2.5, 2001), rng.random(1001) < 0.8):
        column = bins_of(values.astype(np.float64))
        assert median_of(column["edges"], column["shares"]) == np.median(values), column
    # A bin holding several values (38.5-40.5: 39 and 40): a whole number of it, the median or next to it.
    values = rng.poisson(40, 999)
    column = bins_of(values.astype(np.float64))
    found = median_of(column["edges"], column["shares"])
    assert found == round(found) and abs(found - np.median(values)) <= 1
    # Continuous values: within a small part of the spread around the median.
    for values in (rng.gamma(2.0, 30.0, 2001), rng.normal(50.0, 10.0, 1001)):
        column = bins_of(values)
        spread = np.quantile(values, 0.6) - np.quantile(values, 0.4)
        assert abs(median_of(column["edges"], column["shares"]) - np.median(values)) < 0.05 * spread
    # More than half without a value: the median row has none.
    column = bins_of(np.where(rng.random(1001) < 0.7, np.nan, rng.uniform(0, 9, 1001)))
    assert math.isnan(median_of(column["edges"], column["shares"]))
    # The shipped churn_risk reference: a typical customer has one session in 30 days and consents to email.
    shipped_features = load_shipped_references()["churn_risk"]["reference"]["features"]
    assert median_of(**shipped_features["sessions_30d"]) == 1.0
    assert median_of(**shipped_features["consent_email"]) == 1.0
    assert median_of(**shipped_features["sessions_7d"]) == 0.0
    assert most_frequent_category(**shipped_features["plan"], categories=["free", "plus", "pro"]) == 0.0


# --- the contributions are the model's own ------------------------------------------------------------


async def test_a_logistic_models_contributions_are_its_own_and_follow_its_weights(scoring):
    stub, engine = scoring
    data = logistic()
    await stub.DeployModel(pb.DeployModelRequest(onnx=data), metadata=ADMIN)
    now = engine.clock()
    # Above the median in orders and sessions, "pro" against the usual "plus", a newer customer than most.
    engine.fields["p_ann"] = {
        "computed.orders_90d": 17.375,
        "computed.sessions_30d": 13.625,
        "traits.plan": "pro",
        "computed.signed_up_at": now - 4.5 * DAY,
    }

    answer = await explain(stub, "churn_risk", "p_ann")

    assert (answer.model, answer.version, answer.role, answer.person_id) == (
        "churn_risk",
        "1.0.0",
        pb.ROLE_LIVE,
        "p_ann",
    )
    [explained] = answer.scores
    assert explained.score == "churn_risk"
    features = by_name(explained)
    assert set(features) == {"orders", "sessions", "plan", "tenure"}
    assert all(f.baseline == TRAINING_MEDIAN and not f.missing for f in features.values())
    assert [f.path for f in explained.features] == [features[f.name].path for f in explained.features]
    assert features["plan"].path == "traits.plan"
    # Sorted by |contribution|, largest first.
    sizes = [abs(f.contribution) for f in explained.features]
    assert sizes == sorted(sizes, reverse=True)

    # The baseline: the training rows' medians (read from the reference's deciles), "plus" for the plan.
    spec = spec_of(data)
    base = baseline(
        spec, FeatureAssembler(spec).defaults(), engine.drift.reference(engine.registry.get("churn_risk").live)
    )
    X = training_rows()
    assert base.values[0] == pytest.approx(np.median(X[:, 0]), abs=0.05)
    assert base.values[1] == pytest.approx(np.median(X[:, 1]), abs=0.05)
    assert base.values[2] == 1.0  # "plus", the most frequent category
    assert base.values[3] == pytest.approx(np.median(X[:, 3]), abs=0.5)

    # Checked against the ONNX file run directly: the person, each feature at its baseline, the baseline.
    person = np.asarray([17.375, 13.625, 2.0, (now - (now - 4.5 * DAY)) / DAY], dtype=np.float32)
    rows = np.tile(person, (6, 1))
    for i in range(4):
        rows[i + 1, i] = base.values[i]
    rows[5] = base.values
    direct = onnx_scores(data, rows)
    assert explained.value == pytest.approx(direct[0], abs=1e-6)
    assert explained.baseline_value == pytest.approx(direct[5], abs=1e-6)
    for i, name in enumerate(["orders", "sessions", "plan", "tenure"]):
        assert features[name].contribution == pytest.approx(direct[0] - direct[i + 1], abs=1e-6), name
        # The score is monotone in each feature: the sign is the weight's times the direction from the baseline.
        assert math.copysign(1, features[name].contribution) == math.copysign(
            1, WEIGHTS[i] * (person[i] - base.values[i])
        ), name
        assert features[name].contribution != 0
    assert features["orders"].contribution > 0 and features["sessions"].contribution < 0
    assert features["plan"].contribution > 0 and features["tenure"].contribution > 0


async def test_the_person_score_is_scores_and_the_baseline_score_is_the_model_on_the_baseline_vector(scoring):
    stub, engine = scoring
    data = shipped("churn_risk")
    await stub.DeployModel(pb.DeployModelRequest(onnx=data), metadata=ADMIN)
    now = engine.clock()
    engine.fields["p_bob"] = {
        "computed.sessions_7d": 1,
        "computed.sessions_30d": 3,
        "computed.sessions_90d": 11,
        "computed.last_session_at": now - 9.25 * DAY,
        "computed.signed_up_at": now - 431.5 * DAY,
        "computed.orders_total": 4,
        "computed.first_order_at": now - 300 * DAY,
        "computed.last_order_at": now - 61 * DAY,
        "traits.plan": "pro",
        "consent.channel:email": True,
    }

    answer = await explain(stub, "churn_risk", "p_bob")
    [scored] = (
        await stub.Score(pb.ScoreRequest(person_id="p_bob", model="churn_risk"), metadata=PROFILE_READER)
    ).results

    [explained] = answer.scores
    assert explained.value == scored.scores["churn_risk"]  # row 0 of the run is what Score gives, bit for bit
    spec = spec_of(data)
    version = engine.registry.get("churn_risk").live
    base = baseline(spec, FeatureAssembler(spec).defaults(), engine.drift.reference(version))
    assert explained.baseline_value == pytest.approx(onnx_scores(data, base.values[None, :])[0], abs=1e-6)
    assert explained.value == pytest.approx(onnx_scores(data, np.asarray([scored.features]))[0], abs=1e-6)
    features = by_name(explained)
    assert len(features) == len(spec.features) == 32
    # The shipped reference gives every feature its training median; the plan's is its most frequent ("free").
    assert {f.baseline for f in features.values()} == {TRAINING_MEDIAN}
    assert base.values[[f.name for f in spec.features].index("plan")] == 0.0
    # Every contribution is the model's own difference (ONNX run directly, one feature at its baseline).
    rows = np.tile(np.asarray(scored.features, dtype=np.float32), (len(spec.features) + 1, 1))
    for i in range(len(spec.features)):
        rows[i + 1, i] = base.values[i]
    direct = onnx_scores(data, rows)
    for i, feature in enumerate(spec.features):
        assert features[feature.name].contribution == pytest.approx(direct[0] - direct[i + 1], abs=1e-6), feature.name


async def test_a_version_without_a_reference_takes_the_defaults_as_baseline(scoring):
    stub, engine = scoring
    data = logistic(reference=False)
    await stub.DeployModel(pb.DeployModelRequest(onnx=data), metadata=ADMIN)
    engine.fields["p_cid"] = {"computed.orders_90d": 2.0}
    [explained] = (await explain(stub, "churn_risk", "p_cid")).scores
    assert {f.baseline for f in explained.features} == {DEFAULT}
    defaults = FeatureAssembler(spec_of(data)).defaults()
    assert explained.baseline_value == pytest.approx(onnx_scores(data, np.asarray([defaults]))[0], abs=1e-6)
    # Only orders differs from its default: the rest contribute nothing.
    features = by_name(explained)
    assert explained.features[0].name == "orders" and features["orders"].contribution > 0
    assert [features[n].contribution for n in ("sessions", "plan", "tenure")] == [0.0, 0.0, 0.0]


async def test_missing_marks_the_fields_absent_or_unreadable(scoring):
    stub, engine = scoring
    await stub.DeployModel(pb.DeployModelRequest(onnx=logistic()), metadata=ADMIN)
    # sessions absent, tenure not a time, plan not a string; an unseen plan is a value (-1), not missing.
    engine.fields["p_dan"] = {"computed.orders_90d": 3.0, "computed.signed_up_at": "soon", "traits.plan": 7}
    engine.fields["p_eve"] = {"computed.sessions_30d": "12", "traits.plan": "enterprise"}
    dan = by_name((await explain(stub, "churn_risk", "p_dan")).scores[0])
    assert {n: f.missing for n, f in dan.items()} == {"orders": False, "sessions": True, "plan": True, "tenure": True}
    eve = by_name((await explain(stub, "churn_risk", "p_eve")).scores[0])
    assert {n: f.missing for n, f in eve.items()} == {"orders": True, "sessions": False, "plan": False, "tenure": True}


async def test_every_output_of_a_model_is_explained(scoring):
    stub, engine = scoring
    await stub.DeployModel(pb.DeployModelRequest(onnx=shipped("next_best_channel")), metadata=ADMIN)
    engine.fields["p_fay"] = {"computed.email_opens_30d": 9, "traits.plan": "plus"}
    answer = await explain(stub, "next_best_channel", "p_fay")
    [scored] = (
        await stub.Score(pb.ScoreRequest(person_id="p_fay", model="next_best_channel"), metadata=READER)
    ).results
    # One per output, in the spec's order.
    assert [s.score for s in answer.scores] == list(engine.registry.get("next_best_channel").live.spec.score_names)
    assert {s.score for s in answer.scores} == set(scored.scores)
    for explained in answer.scores:
        assert explained.value == scored.scores[explained.score], explained.score
        assert len(explained.features) == 20


async def test_the_answer_holds_no_value_of_the_persons(scoring):
    stub, engine = scoring
    await stub.DeployModel(pb.DeployModelRequest(onnx=logistic()), metadata=ADMIN)
    now = engine.clock()
    values = {"computed.orders_90d": 17.375, "computed.sessions_30d": 13.625, "computed.signed_up_at": now - 4.5 * DAY}
    engine.fields["p_gus"] = dict(values, **{"traits.plan": "pro"})
    answer = await explain(stub, "churn_risk", "p_gus")
    raw = answer.SerializeToString()
    # (The plan's index, 2.0, is not looked for: as float32 it is the last bytes of many a double.)
    for value in (17.375, 13.625, 4.5, now - 4.5 * DAY):
        assert struct.pack("<d", value) not in raw and struct.pack("<f", value) not in raw, value
        assert repr(value).encode() not in raw
    assert b"pro" not in raw.replace(b"probability", b"")
    # Score returns a person's feature vector (their profile's values) only to a caller that may also read
    # the profile; to scoring:read alone, the scores without it, as ExplainScore answers.
    scored = await stub.Score(pb.ScoreRequest(person_id="p_gus", model="churn_risk"), metadata=READER)
    assert scored.results[0].scores and not scored.results[0].features
    raw = scored.SerializeToString()
    for value in (17.375, 13.625, now - 4.5 * DAY):
        assert struct.pack("<d", value) not in raw, value
    scored = await stub.Score(pb.ScoreRequest(person_id="p_gus", model="churn_risk"), metadata=PROFILE_READER)
    assert 17.375 in scored.results[0].features
    # A vector the caller sent comes back to any scoring:read caller: it is theirs, not a person's.
    sent = await stub.Score(
        pb.ScoreRequest(model="churn_risk", features=list(scored.results[0].features)), metadata=READER
    )
    assert list(sent.results[0].features) == list(scored.results[0].features)


# --- versions -----------------------------------------------------------------------------------------


async def test_an_empty_version_is_the_one_scoring_the_person_and_a_named_one_is_that_one(scoring):
    stub, engine = scoring
    await stub.DeployModel(pb.DeployModelRequest(onnx=logistic()), metadata=ADMIN)
    await stub.DeployModel(
        pb.DeployModelRequest(onnx=logistic("2.0.0"), role=pb.ROLE_CANARY, canary_percent=50), metadata=ADMIN
    )
    persons = [f"p_{i}" for i in range(40)]
    for person in persons:
        engine.fields[person] = {"computed.orders_90d": 1.0}
    routed = set()
    for person in persons:
        answer = await explain(stub, "churn_risk", person)
        [scored] = (await stub.Score(pb.ScoreRequest(person_id=person, model="churn_risk"), metadata=READER)).results
        assert (answer.version, answer.role) == (scored.version, scored.role)
        routed.add(answer.version)
        named = await explain(stub, "churn_risk", person, version="1.0.0")
        assert (named.version, named.role) == ("1.0.0", pb.ROLE_LIVE)
    assert routed == {"1.0.0", "2.0.0"}


# --- errors and scope ---------------------------------------------------------------------------------


async def test_errors_name_the_field(scoring):
    stub, engine = scoring
    await stub.DeployModel(pb.DeployModelRequest(onnx=logistic()), metadata=ADMIN)
    engine.fields["p_ann"] = {"computed.orders_90d": 1.0}

    for model, person, version, field, reason in (
        ("nope", "p_ann", "", "model", "unknown_model"),
        ("churn_risk", "p_ann", "9.9.9", "version", "unknown_version"),
        ("churn_risk", "p_ghost", "", "person_id", "unknown_person"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await explain(stub, model, person, version)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()
        assert caught.value.details().startswith(f"{field}: "), caught.value.details()
        assert error_reason(caught.value) == reason

    for request, field in (
        (pb.ExplainScoreRequest(person_id="p_ann"), "model"),
        (pb.ExplainScoreRequest(model="churn_risk"), "person_id"),
        (pb.ExplainScoreRequest(model="churn_risk", person_id="p\x00ann"), "person_id"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.ExplainScore(request, metadata=READER)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(bad.value) == [field]


async def test_a_person_scoring_has_not_seen_change_is_explained_from_the_profile_service(scoring):
    # Held persons are those whose profile changed since scoring started; any other is read from the
    # profile service, as Score reads them (cdp_kit.held's fetch): an operator asking about a customer who
    # has been quiet since the last restart gets an answer, not NOT_FOUND.
    stub, engine = scoring
    await stub.DeployModel(pb.DeployModelRequest(onnx=logistic()), metadata=ADMIN)
    engine.fields["p_held"] = {"computed.orders_90d": 4.0}
    asked: list[str] = []

    async def profile_service(person_id: str):
        asked.append(person_id)
        return {"computed.orders_90d": 4.0} if person_id == "p_quiet" else None

    engine.held.fetch_source = profile_service
    quiet = await explain(stub, "churn_risk", "p_quiet")
    held = await explain(stub, "churn_risk", "p_held")
    assert asked == ["p_quiet"]  # the held person is explained from what scoring holds
    assert quiet.person_id == "p_quiet"
    assert [s.value for s in quiet.scores] == pytest.approx([s.value for s in held.scores], abs=1e-6)
    assert "p_quiet" not in engine.fields  # read for the answer, not held
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await explain(stub, "churn_risk", "p_ghost")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and error_reason(caught.value) == "unknown_person"


async def test_a_token_without_scoring_read_is_refused(scoring):
    stub, engine = scoring
    await stub.DeployModel(pb.DeployModelRequest(onnx=logistic()), metadata=ADMIN)
    engine.fields["p_ann"] = {"computed.orders_90d": 1.0}
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await explain(stub, "churn_risk", "p_ann", metadata=PROFILE_ONLY)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "scoring:read" in refused.value.details()
    assert SCOPES["ExplainScore"] == SCOPES["Score"] == "scoring:read"
    assert (await explain(stub, "churn_risk", "p_ann", metadata=READER)).scores


# --- two replicas splitting the partitions (static: p % 2 == ordinal, a store each) ------------------------

PARTITIONS = 2
ANN = next(f"p_ann_{n}" for n in range(100) if partition_for(f"p_ann_{n}", PARTITIONS) == 0)
BOB = next(f"p_bob_{n}" for n in range(100) if partition_for(f"p_bob_{n}", PARTITIONS) == 1)


def replica(nats_server, tmp_path, tokens, ports: list[int], ordinal: int):
    return settings(
        nats_server, tmp_path, auth_mode="tokens", auth_tokens_file=tokens, grpc_port=ports[ordinal],
        partitions=PARTITIONS, replicas=2, pod_ordinal=ordinal, peers=",".join(f"127.0.0.1:{p}" for p in ports),
        store_url=f"sqlite:///{tmp_path / f'scoring-{ordinal}.db'}",
    )  # fmt: skip


def change(person: str, orders: float) -> profile_pb2.ProfileChanged:
    message = profile_pb2.ProfileChanged(person_id=person, cause="event")
    message.at.GetCurrentTime()
    message.computed["orders_90d"].number_value = orders
    return message


async def _hold(bus, engines, persons: dict[str, float]) -> None:
    """Publish a change per person and wait until the replica owning it holds it."""
    for person, orders in persons.items():
        batch = profile_pb2.ProfileChangedBatch(changes=[change(person, orders)])
        await bus.js.publish(subjects.profiles_changed(partition_for(person, PARTITIONS)), batch.SerializeToString())
    deadline = time.monotonic() + 15
    while not all(
        p in engine.fields for p in persons for engine in engines if partition_for(p, PARTITIONS) in engine.ready
    ):
        assert time.monotonic() < deadline, "the changes were not applied"
        await asyncio.sleep(0.02)


async def test_either_replica_explains_a_person_whichever_replica_holds_them(nats_server, tmp_path):
    tokens = write_tokens(tmp_path)
    ports = [free_port(), free_port()]
    async with Bus.connect(nats_server.url, name="explain-test") as bus:
        await bus.ensure_streams(profiles_stream())
        async with (
            serving(replica(nats_server, tmp_path, tokens, ports, 0), setup) as r0,
            serving(replica(nats_server, tmp_path, tokens, ports, 1), setup) as r1,
        ):
            engines = [r0.parts["engine"], r1.parts["engine"]]
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as c0,
                grpc.aio.insecure_channel(f"127.0.0.1:{ports[1]}") as c1,
            ):
                stubs = [scoring_pb2_grpc.ScoringServiceStub(c0), scoring_pb2_grpc.ScoringServiceStub(c1)]
                for stub in stubs:  # a store each: the model deployed on both
                    await stub.DeployModel(pb.DeployModelRequest(onnx=logistic()), metadata=ADMIN)
                await _hold(bus, engines, {ANN: 3.0, BOB: 9.0})
                assert ANN in engines[0].fields and ANN not in engines[1].fields
                assert BOB in engines[1].fields and BOB not in engines[0].fields
                answers = {}
                for stub in stubs:
                    for person in (ANN, BOB):
                        answer = await explain(stub, "churn_risk", person)
                        answer.ClearField("evaluated_at")
                        answers.setdefault(person, []).append(answer)
                    # The owner checks the caller's token too.
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await explain(stub, "churn_risk", BOB, metadata=PROFILE_ONLY)
                    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
                    # A person neither holds: NOT_FOUND naming person_id, from the owner.
                    with pytest.raises(grpc.aio.AioRpcError) as ghost:
                        await explain(stub, "churn_risk", BOB + "_ghost")
                    assert ghost.value.code() == grpc.StatusCode.NOT_FOUND
                    assert ghost.value.details().startswith("person_id: ")
                for person, (first, second) in answers.items():
                    assert first.person_id == person
                    # Contributions differ by the microseconds between the two days_since clocks at most.
                    assert [s.value for s in first.scores] == pytest.approx([s.value for s in second.scores], abs=1e-6)
                    assert [f.name for f in first.scores[0].features] == [f.name for f in second.scores[0].features]


async def test_a_replica_that_cannot_reach_the_owner_names_the_partition(nats_server, tmp_path):
    tokens = write_tokens(tmp_path)
    ports = [free_port(), free_port()]  # nobody listens on the second: replica 1 is down
    async with Bus.connect(nats_server.url, name="explain-test") as bus:
        await bus.ensure_streams(profiles_stream())
        async with serving(replica(nats_server, tmp_path, tokens, ports, 0), setup) as r0:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as channel:
                stub = scoring_pb2_grpc.ScoringServiceStub(channel)
                await stub.DeployModel(pb.DeployModelRequest(onnx=logistic()), metadata=ADMIN)
                await _hold(bus, [r0.parts["engine"]], {ANN: 3.0})
                assert (await explain(stub, "churn_risk", ANN)).scores
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await explain(stub, "churn_risk", BOB)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "partition 1" in caught.value.details()
