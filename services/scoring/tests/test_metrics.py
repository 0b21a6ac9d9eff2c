"""What an operator's dashboard reads from scoring: its metrics under the OpenTelemetry dotted names
(`cdp.scoring.<thing>`, the unit in the instrument's unit), counting what the engine did."""

from __future__ import annotations

import asyncio

import pytest

from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import Bus, profiles_stream, scores_stream, subjects
from cdp_kit.storage import open_store
from cdp_kit.timestamps import set_seconds
from cdp_scoring.domain.registry import SHADOW
from cdp_scoring.engine import ScoringEngine
from cdp_scoring.modelstore import FolderModelStore
from cdp_scoring.stream import scoring_stream
from cdp_testing.fakes import T0, Clock
from cdp_testing.metrics import MetricsCapture
from cdp_testing.onnx_models import logistic_model


def changes(*persons: str, at: float) -> profile_pb2.ProfileChangedBatch:
    batch = profile_pb2.ProfileChangedBatch()
    for person in persons:
        change = batch.changes.add(person_id=person, cause="event")
        set_seconds(change.at, at)
        change.computed["orders_90d"].number_value = 2
        change.computed["sessions_30d"].number_value = 4
    return batch


async def test_rows_scores_inference_freshness_and_shadow_are_measured_under_dotted_names(nats_server, tmp_path):
    captured = MetricsCapture("scoring")
    telemetry = captured.telemetry
    clock = Clock(T0)
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="metrics-test") as bus:
        await bus.ensure_streams(profiles_stream(), scores_stream())
        engine = ScoringEngine(
            store,
            FolderModelStore(tmp_path / "models"),
            bus.publisher,
            partitions=1,
            telemetry=telemetry,
            clock=clock,
        )
        await engine.start()
        # The kit's partitioned engine on scoring's logic; its own cdp.engine.* metrics go to the bus'
        # telemetry, not to the capture.
        stream = scoring_stream(engine, bus, partitions=1, batch_size=64, ack_wait=30, snapshot_every=None)
        await stream.start_partition(0)
        try:
            await engine.deploy(logistic_model(weights=[0.5, -0.25]), role=None)
            await engine.deploy(logistic_model(version="2.0.0", weights=[0.5, 0.0]), role=SHADOW)
            clock.advance(0.25)  # the changes were made a quarter of a second ago
            ack = await bus.js.publish(subjects.profiles_changed(0), changes("p1", "p2", at=T0).SerializeToString())
            for _ in range(500):
                pipeline = stream.pipelines[0]
                if pipeline.checkpoint >= ack.seq and pipeline.idle.is_set():
                    break
                await asyncio.sleep(0.01)
        finally:
            await stream.close()
            await engine.stop()

    metrics = captured.collected()
    assert not [name for name in metrics if not name.startswith("cdp.scoring.")]
    unit, rows = metrics["cdp.scoring.rows"]
    assert unit == "{row}"
    by_role = {(p.attributes["version"], p.attributes["role"]): p.value for p in rows}
    assert by_role == {("1.0.0", "live"): 2, ("2.0.0", "shadow"): 2}
    unit, (published,) = metrics["cdp.scoring.scores.published"]
    assert unit == "{score}" and published.value == 2 and dict(published.attributes) == {"model": "churn_risk"}
    unit, inference = metrics["cdp.scoring.inference.duration"]
    assert unit == "ms" and sum(p.count for p in inference) == 2  # one model's rows of the round, per version
    unit, (freshness,) = metrics["cdp.scoring.freshness"]
    assert unit == "ms" and freshness.count == 1 and freshness.sum == pytest.approx(250)
    unit, shadow = metrics["cdp.scoring.shadow.abs_diff"]
    assert unit == "1" and sum(p.count for p in shadow) == 2
