"""The shipped behavioural clusters model as the service serves it: deployed with the other shipped models on
first start, a person's profile fields give a whole cluster number (`scores.cluster`, which segments compare
with `scores.cluster = 3`), and the cluster a person lands in is the one whose description says what sets
them apart."""

from __future__ import annotations

import pytest
from opentelemetry import metrics

from cdp_kit.storage import open_store
from cdp_scoring.engine import ScoringEngine
from cdp_scoring.modelstore import FolderModelStore, shipped_models
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
