"""The shipped behavioural clusters model as the service serves it: deployed with the other shipped models on
first start, a person's profile fields give a whole cluster number (`scores.cluster`, which segments compare
with `scores.cluster = 3`), and the cluster a person lands in is the one whose description says what sets
them apart."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from opentelemetry import metrics

from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp_kit.service import serving
from cdp_kit.storage import open_store
from cdp_scoring.__main__ import setup
from cdp_scoring.engine import ScoringEngine
from cdp_scoring.modelstore import FolderModelStore, shipped_models
from cdp_scoring.settings import ScoringSettings
from cdp_testing.fakes import T0

DAY = 86_400.0
# Profile fields as the service holds them (epoch seconds for times)
PEOPLE = {
    "app fan": {
        "computed.sessions_30d": 25,
        "computed.app_sessions_30d": 22,
        "computed.product_views_30d": 15,
        "computed.inapp_clicks_90d": 14,
        "computed.last_session_at": T0 - DAY,
        "computed.signed_up_at": T0 - 300 * DAY,
    },
    "lapsed": {
        "computed.last_session_at": T0 - 500 * DAY,
        "computed.signed_up_at": T0 - 900 * DAY,
    },
}


class _Telemetry:
    meter = metrics.get_meter("scoring-test")


@pytest.fixture
async def engine(tmp_path):
    async with open_store("memory://") as store:

        async def fields(person: str):
            return dict(PEOPLE[person]) if person in PEOPLE else None

        engine = ScoringEngine(
            store,
            FolderModelStore(tmp_path / "models"),
            None,
            partitions=1,
            telemetry=_Telemetry(),
            profile_source=fields,
            clock=lambda: T0,
        )
        await engine.start()
        try:
            yield engine
        finally:
            await engine.stop()


async def test_the_shipped_clusters_model_is_served_as_a_whole_cluster_number(engine):
    deployed = await engine.ensure_shipped(path.read_bytes() for path in shipped_models())
    assert "clusters" in {v.spec.name for v in deployed}
    spec = engine.registry.get("clusters").live.spec
    described = {item["cluster"]: item for item in spec.training["clusters"]}
    k = spec.training["clustering"]["k"]
    clusters = {}
    for person in PEOPLE:
        [result] = await engine.score_person(person, model="clusters")
        value = result.scores["cluster"]
        assert value == int(value) and 0 <= value < k
        clusters[person] = int(value)
    assert clusters["app fan"] != clusters["lapsed"]
    fan = {f["feature"]: f["direction"] for f in described[clusters["app fan"]]["distinguishing"]}
    assert "high" in fan.values() and set(fan) & {"app_sessions_30d", "inapp_clicks_90d", "sessions_30d"}
    lapsed = {f["feature"]: f["direction"] for f in described[clusters["lapsed"]]["distinguishing"]}
    assert lapsed.get("days_since_last_session") == "high" or "low" in lapsed.values()


async def test_a_clustering_trained_by_the_service_waits_in_shadow_beside_the_shipped_one(
    nats_server, tmp_path, platform_store
):
    """TrainModel for `clusters` clusters the profile store's persons (point in time, at the last day it
    holds); with the shipped version live, the candidate goes to shadow with the reason: segments name
    cluster numbers, a person promotes it. The store is test_training_runs' 400 people (conftest: written
    once a run), not 300 of its own: any population's clustering waits in shadow beside a live one."""
    url = platform_store
    config = ScoringSettings(
        nats_url=nats_server.url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        auth_mode="none",
        partitions=1,
        shutdown_grace=1.0,
        store_url=f"sqlite:///{tmp_path / 'scoring.db'}",
        model_store=str(tmp_path / "models"),
        training_store=url,
    )
    async with serving(config, setup) as runtime:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            for _ in range(200):  # the shipped models go live in the background
                listed = await stub.ListModels(scoring_pb2.ListModelsRequest())
                if "clusters" in [m.name for m in listed.models]:
                    break
                await asyncio.sleep(0.05)
            progress = [p async for p in stub.TrainModel(scoring_pb2.TrainModelRequest(model="clusters"))]
            done = progress[-1]
            assert done.done and done.role == scoring_pb2.ROLE_SHADOW
            assert "promoted by hand" in done.reason
            model = await stub.GetModel(scoring_pb2.GetModelRequest(name="clusters"))
            assert model.live_version == "1.1.0"
            assert done.version in [v.spec.version for v in model.versions]
