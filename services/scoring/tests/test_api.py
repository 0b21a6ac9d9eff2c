"""ScoringService over gRPC, in-process on a real nats-server: deploy, list, score by vector and in batch,
promote and roll back, ScoreAll progress, errors with the offending field; and a second replica reloads
a model another replica deployed (JetStream object store, shared store)."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp_kit.service import serving
from cdp_scoring.__main__ import setup
from cdp_testing.errors import bad_request_fields
from cdp_testing.onnx_models import expected, logistic_model

from .conftest import settings

W = [0.5, -0.25]


@pytest.fixture
async def scoring(nats_server, tmp_path):
    async with serving(settings(nats_server, tmp_path), setup) as runtime:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
            yield scoring_pb2_grpc.ScoringServiceStub(channel), runtime


async def test_deploy_list_and_score_a_vector(scoring):
    stub, _ = scoring
    model = await stub.DeployModel(scoring_pb2.DeployModelRequest(onnx=logistic_model(weights=W)))
    assert model.live_version == "1.0.0" and model.versions[0].role == scoring_pb2.ROLE_LIVE
    assert [f.path for f in model.versions[0].spec.features] == ["computed.orders_90d", "computed.sessions_30d"]
    listed = await stub.ListModels(scoring_pb2.ListModelsRequest())
    assert [m.name for m in listed.models] == ["churn_risk"]
    reply = await stub.Score(scoring_pb2.ScoreRequest(model="churn_risk", features=[2, 4]))
    [result] = reply.results
    assert result.scores["churn_risk"] == pytest.approx(expected(W, [2, 4]), abs=1e-6)
    named = await stub.Score(scoring_pb2.ScoreRequest(model="churn_risk", named_features={"orders": 2}))
    assert named.results[0].scores["churn_risk"] == pytest.approx(expected(W, [2, 0]), abs=1e-6)


async def test_score_batch_rows_and_packed_rows(scoring):
    stub, _ = scoring
    await stub.DeployModel(scoring_pb2.DeployModelRequest(onnx=logistic_model(weights=W)))
    matrix = np.random.default_rng(1).uniform(0, 5, size=(1024, 2)).astype(np.float32)
    packed = await stub.ScoreBatch(scoring_pb2.ScoreBatchRequest(model="churn_risk", packed_rows=matrix.tobytes()))
    assert list(packed.scores) == ["churn_risk"] and len(packed.values) == 1024
    assert packed.values[7] == pytest.approx(expected(W, matrix[7].tolist()), abs=1e-6)
    rows = await stub.ScoreBatch(
        scoring_pb2.ScoreBatchRequest(model="churn_risk", rows=[scoring_pb2.FeatureRow(values=[1, 1])])
    )
    assert rows.values[0] == pytest.approx(expected(W, [1, 1]), abs=1e-6)


@pytest.mark.parametrize(
    ("request_", "code", "field"),
    [
        (scoring_pb2.DeployModelRequest(onnx=b"junk"), grpc.StatusCode.INVALID_ARGUMENT, "onnx"),
        (scoring_pb2.DeployModelRequest(), grpc.StatusCode.INVALID_ARGUMENT, "onnx"),
        (
            scoring_pb2.DeployModelRequest(onnx=logistic_model(width=3, weights=[1, 1, 1])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "spec.features",
        ),
        (scoring_pb2.ScoreRequest(model="nope", features=[1, 2]), grpc.StatusCode.NOT_FOUND, None),
        (scoring_pb2.ScoreRequest(model="churn_risk", features=[1]), grpc.StatusCode.INVALID_ARGUMENT, "features"),
        (scoring_pb2.ScoreRequest(), grpc.StatusCode.INVALID_ARGUMENT, "person_id"),
        (scoring_pb2.ScoreRequest(person_id="ghost"), grpc.StatusCode.NOT_FOUND, None),
        (
            scoring_pb2.ScoreBatchRequest(model="churn_risk", packed_rows=b"\x00" * 12),
            grpc.StatusCode.INVALID_ARGUMENT,
            "packed_rows",
        ),
        (
            scoring_pb2.ScoreBatchRequest(model="churn_risk", rows=[scoring_pb2.FeatureRow(values=[1])]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "rows[0].values",
        ),
        (scoring_pb2.GetModelRequest(name="nope"), grpc.StatusCode.NOT_FOUND, None),
        (scoring_pb2.PromoteRequest(name="churn_risk", version="9"), grpc.StatusCode.NOT_FOUND, None),
        (scoring_pb2.RollbackRequest(name="churn_risk"), grpc.StatusCode.FAILED_PRECONDITION, None),
    ],
)
async def test_bad_requests_get_a_clear_status_naming_the_field(scoring, request_, code, field):
    stub, _ = scoring
    await stub.DeployModel(scoring_pb2.DeployModelRequest(onnx=logistic_model(weights=W)))
    method = {
        scoring_pb2.DeployModelRequest: stub.DeployModel,
        scoring_pb2.ScoreRequest: stub.Score,
        scoring_pb2.ScoreBatchRequest: stub.ScoreBatch,
        scoring_pb2.GetModelRequest: stub.GetModel,
        scoring_pb2.PromoteRequest: stub.Promote,
        scoring_pb2.RollbackRequest: stub.Rollback,
    }[type(request_)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await method(request_)
    assert caught.value.code() == code, caught.value.details()
    if field is not None:
        assert bad_request_fields(caught.value) == [field]


async def test_shadow_promote_rollback_over_grpc(scoring):
    stub, _ = scoring
    await stub.DeployModel(scoring_pb2.DeployModelRequest(onnx=logistic_model(weights=W)))
    model = await stub.DeployModel(
        scoring_pb2.DeployModelRequest(
            onnx=logistic_model(version="2.0.0", weights=[1, 1]), role=scoring_pb2.ROLE_SHADOW
        )
    )
    roles = {v.spec.version: v.role for v in model.versions}
    assert roles == {"1.0.0": scoring_pb2.ROLE_LIVE, "2.0.0": scoring_pb2.ROLE_SHADOW}
    promoted = await stub.Promote(scoring_pb2.PromoteRequest(name="churn_risk", version="2.0.0"))
    assert promoted.live_version == "2.0.0"
    reply = await stub.Score(scoring_pb2.ScoreRequest(model="churn_risk", features=[1, 1]))
    assert reply.results[0].version == "2.0.0"
    rolled = await stub.Rollback(scoring_pb2.RollbackRequest(name="churn_risk"))
    assert rolled.live_version == "1.0.0"


async def test_score_all_streams_progress(scoring):
    stub, runtime = scoring
    await stub.DeployModel(scoring_pb2.DeployModelRequest(onnx=logistic_model(weights=W)))
    engine = runtime.parts["engine"]
    engine.fields.update({f"p{i}": {"computed.orders_90d": 1.0} for i in range(3000)})
    progress = [p async for p in stub.ScoreAll(scoring_pb2.ScoreAllRequest(model="churn_risk", publish=True))]
    assert progress[-1].done and progress[-1].persons_done == progress[-1].persons_total == 3000
    assert progress[-1].scores_published == 3000
    assert len(progress) >= 3  # a report per chunk, then the final one


async def test_a_model_deployed_on_one_replica_is_live_on_the_other(nats_server, tmp_path):
    shared = dict(model_store="nats://cdp-models-test", store_url=f"sqlite:///{tmp_path / 'shared.db'}")
    first = settings(nats_server, tmp_path, **shared)
    second = settings(nats_server, tmp_path, **shared, pod_ordinal=1, replicas=2)
    async with serving(first, setup) as a, serving(second, setup) as b:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{a.grpc.port}") as ca,
            grpc.aio.insecure_channel(f"127.0.0.1:{b.grpc.port}") as cb,
        ):
            stub_a, stub_b = scoring_pb2_grpc.ScoringServiceStub(ca), scoring_pb2_grpc.ScoringServiceStub(cb)
            await stub_a.DeployModel(scoring_pb2.DeployModelRequest(onnx=logistic_model(weights=W)))
            for _ in range(100):
                listed = await stub_b.ListModels(scoring_pb2.ListModelsRequest())
                if listed.models:
                    break
                await asyncio.sleep(0.05)
            assert [m.live_version for m in listed.models] == ["1.0.0"]
            reply = await stub_b.Score(scoring_pb2.ScoreRequest(model="churn_risk", features=[2, 4]))
            assert reply.results[0].scores["churn_risk"] == pytest.approx(expected(W, [2, 4]), abs=1e-6)


async def test_a_training_label_holding_a_number_json_cannot_write_is_refused_naming_the_label(nats_server, tmp_path):
    """What the fuzz found: a label Struct holding NaN (or an infinity) failed TrainModel as INTERNAL: its JSON
    conversion raised before the label was read."""
    values = settings(nats_server, tmp_path, training_store=f"sqlite:///{tmp_path / 'profile.db'}")
    async with serving(values, setup) as runtime:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
            request = scoring_pb2.TrainModelRequest(model="churn_risk")
            request.label.update({"kind": "no_activity", "window": "90d", "weight": float("nan")})
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in scoring_pb2_grpc.ScoringServiceStub(channel).TrainModel(request):
                    pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == ["label"]
