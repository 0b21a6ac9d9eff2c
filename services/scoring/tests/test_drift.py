"""Drift: the population a model scores, against the one it was trained on.

The index itself (population stability, per feature and score, against reference bins kept with the
version), then the service as it runs: a model deployed with its training reference, persons changed on
`profiles.changed` from the training distribution (no alert), then a shifted population - the next
scheduled check flags the feature and the score, publishes the alert on `models.drift`, and exports
the figures as `cdp.scoring.drift.psi`."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from cdp.profile.v1 import profile_pb2
from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp_kit.bus import Bus, Partitioner, subjects
from cdp_kit.service import serving
from cdp_kit.timestamps import set_seconds
from cdp_scoring.__main__ import setup
from cdp_scoring.api import alert_message, drift_message
from cdp_scoring.domain import ModelSpec
from cdp_scoring.domain.registry import LIVE, Version
from cdp_scoring.drift import DRIFTED, NO_REFERENCE, OK, DriftMonitor, DriftReport, bins_of, build_reference, psi
from cdp_testing.fakes import T0
from cdp_testing.metrics import MetricsCapture
from cdp_testing.onnx_models import logistic_model

from .conftest import settings

W = np.array([0.5, -0.25])


def population(rng: np.random.Generator, n: int, orders_mean: float = 2.0) -> np.ndarray:
    return np.column_stack([rng.poisson(orders_mean, n), rng.poisson(4.0, n)]).astype(np.float64)


def scores(X: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-(X @ W)))


def trained_model(version: str = "1.0.0") -> bytes:
    """A churn model carrying, as a training run writes it, the reference of 5,000 training rows."""
    X = population(np.random.default_rng(1), 5000)
    reference = build_reference(["orders", "sessions"], X, {"churn_risk": scores(X)})
    return logistic_model(version=version, weights=list(W), spec_overrides={"training": {"reference": reference}})


# --- the index -------------------------------------------------------------------------------------------


def test_same_population_is_stable_and_a_shifted_one_is_not():
    rng = np.random.default_rng(3)
    reference = bins_of(rng.normal(0, 1, 20_000))
    counts = lambda values: np.bincount(  # noqa: E731
        np.where(np.isnan(values), len(reference["edges"]) + 1, np.searchsorted(reference["edges"], values, "right")),
        minlength=len(reference["edges"]) + 2,
    )
    assert psi(counts(rng.normal(0, 1, 5000)), reference["shares"]) < 0.02
    assert 0.1 < psi(counts(rng.normal(0.5, 1, 5000)), reference["shares"]) < 0.4
    assert psi(counts(rng.normal(1.5, 1, 5000)), reference["shares"]) > 1.0


def test_reference_bins_keep_missing_values_and_few_distinct_values_apart():
    values = np.array([0.0] * 70 + [1.0] * 20 + [np.nan] * 10)
    bins = bins_of(values)
    assert bins["edges"] == [0.0, 0.5]  # below 0, 0, 1, missing: no value sits on a cut
    assert bins["shares"] == [0.0, 0.7, 0.2, 0.1]


def _version(data: bytes, role: str = LIVE) -> Version:
    from cdp_scoring.runtime import load_model

    loaded = load_model(data)
    return Version(loaded.spec, role, loaded.sha256, loaded.size_bytes, T0)


def test_a_check_needs_enough_rows_then_describes_the_rows_since_the_previous_one():
    monitor = DriftMonitor(threshold=0.2, min_rows=200)
    version = _version(trained_model())
    rng = np.random.default_rng(5)
    X = population(rng, 150)
    monitor.observe(version, X, scores(X)[:, None])
    assert monitor.check([version]) == []  # 150 rows: keeps counting
    X = population(rng, 150)
    monitor.observe(version, X, scores(X)[:, None])
    (report,) = monitor.check([version])
    assert report.status == OK and report.rows == 300 and report.reference_rows == 5000
    shifted = population(rng, 300, orders_mean=6.0)
    monitor.observe(version, shifted, scores(shifted)[:, None])
    (report,) = monitor.check([version])
    assert report.status == DRIFTED and report.rows == 300  # only the rows since the last check
    over = {f"{kind}:{name}" for name, kind, _ in report.over}
    assert over == {"feature:orders", "score:churn_risk"}


def test_a_version_without_reference_says_so():
    monitor = DriftMonitor()
    version = _version(logistic_model())
    monitor.observe(version, np.zeros((10, 2)), np.zeros((10, 1)))
    assert monitor.check([version]) == [] and monitor.status(version).status == NO_REFERENCE


def test_a_reference_that_does_not_describe_the_versions_features_is_not_used():
    X = population(np.random.default_rng(1), 100)
    reference = build_reference(["orders", "other"], X, {"churn_risk": scores(X)})
    spec = ModelSpec.from_json(
        '{"name": "churn_risk", "version": "1", "input": "features", '
        '"features": [{"name": "orders", "path": "computed.orders_90d"}, {"name": "sessions", "path": "computed.s"}],'
        ' "outputs": [{"score": "churn_risk", "output": "probability"}]}'
    )
    version = Version(spec, LIVE, "x", 1, T0)
    assert DriftMonitor(shipped={"churn_risk": {"version": "1", "reference": reference}}).reference(version) is None


# --- the service ---------------------------------------------------------------------------------------


def changed(people: dict[str, np.ndarray], at: float) -> dict[int, profile_pb2.ProfileChangedBatch]:
    by_partition: dict[int, profile_pb2.ProfileChangedBatch] = {}
    partition = Partitioner(2)
    for person, (orders, sessions) in people.items():
        change = by_partition.setdefault(partition(person), profile_pb2.ProfileChangedBatch()).changes.add(
            person_id=person, cause="event"
        )
        set_seconds(change.at, at)
        change.computed["orders_90d"].number_value = float(orders)
        change.computed["sessions_30d"].number_value = float(sessions)
    return by_partition


async def publish(bus: Bus, people: dict[str, np.ndarray], at: float) -> None:
    for p, batch in changed(people, at).items():
        await bus.js.publish(subjects.profiles_changed(p), batch.SerializeToString())


async def wait_for(stub, predicate, timeout: float = 15.0) -> scoring_pb2.ModelDrift:
    deadline = time.monotonic() + timeout
    while True:
        (drift,) = (await stub.GetDrift(scoring_pb2.GetDriftRequest(model="churn_risk"))).models
        if predicate(drift):
            return drift
        assert time.monotonic() < deadline, f"drift never reached the state asked for: {drift}"
        await asyncio.sleep(0.05)


async def scored(stub, rows: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (await stub.GetModel(scoring_pb2.GetModelRequest(name="churn_risk"))).versions[0].rows_scored < rows:
        assert time.monotonic() < deadline, f"{rows} rows never scored"
        await asyncio.sleep(0.05)


async def test_a_shifted_population_is_flagged_and_alerted_at_the_next_scheduled_check(nats_server, tmp_path):
    captured = MetricsCapture("scoring")
    config = settings(nats_server, tmp_path, drift_check_seconds=0.5, drift_min_rows=200)
    alerts: list[scoring_pb2.DriftAlert] = []
    async with (
        serving(config, setup, telemetry=captured.telemetry) as runtime,
        grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel,
        Bus.connect(nats_server.url, name="drift-test") as bus,
    ):

        async def on_alert(msg) -> None:
            alerts.append(scoring_pb2.DriftAlert.FromString(msg.data))

        await bus.nc.subscribe(subjects.MODELS_DRIFT, cb=on_alert)
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        await stub.DeployModel(scoring_pb2.DeployModelRequest(onnx=trained_model()))
        rng = np.random.default_rng(11)

        before = await wait_for(stub, lambda d: d.status == "too_few_rows")
        assert before.reference_rows == 5000 and before.threshold == pytest.approx(0.2)
        usual = {f"u{i}": row for i, row in enumerate(population(rng, 400))}
        await publish(bus, usual, T0)
        await scored(stub, 400)
        # Every usual row counted, and fewer left than a check needs: this is the last check before the shift.
        stable = await wait_for(stub, lambda d: d.status == OK and d.pending_rows < 200)
        assert all(v.psi < 0.2 for v in stable.values), stable.values
        assert {(v.kind, v.name) for v in stable.values} == {
            ("feature", "orders"),
            ("feature", "sessions"),
            ("score", "churn_risk"),
        }
        assert alerts == []

        shifted = {f"s{i}": row for i, row in enumerate(population(rng, 400, orders_mean=6.0))}
        await publish(bus, shifted, T0 + 60)
        deadline = time.monotonic() + 15
        while not alerts:
            assert time.monotonic() < deadline, "no drift alert on models.drift"
            await asyncio.sleep(0.05)

        alert = alerts[0]
        assert alert.drift.model == "churn_risk" and alert.drift.version == "1.0.0"
        assert alert.drift.status == DRIFTED and alert.drift.role == scoring_pb2.ROLE_LIVE
        # the first check after the last stable one: its rows start where that one's ended
        assert alert.drift.since.ToSeconds() == stable.checked_at.ToSeconds()
        assert [v.name for v in alert.over][:1] == ["orders"] and alert.over[0].psi > 0.2
        assert "churn_risk" in {v.name for v in alert.over if v.kind == "score"}
        assert not alert.retrain_started
        drifted = await wait_for(stub, lambda d: d.status == DRIFTED)
        assert {v.name: v.psi for v in drifted.values}["orders"] > 0.2

        unit, points = captured.collected()["cdp.scoring.drift.psi"]
        by_feature = {p.attributes.get("feature") or p.attributes.get("score"): p.value for p in points}
        assert unit == "1" and by_feature["orders"] > 0.2 and by_feature["sessions"] < 0.2
        assert {p.attributes["model"] for p in points} == {"churn_risk"}


async def test_get_drift_names_an_unknown_model(nats_server, tmp_path):
    async with serving(settings(nats_server, tmp_path), setup) as runtime:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetDrift(scoring_pb2.GetDriftRequest(model="nope"))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_with_retrain_a_live_model_that_becomes_drifted_starts_one_training_run(nats_server, tmp_path):
    config = settings(nats_server, tmp_path, drift_min_rows=200, drift_retrain=True)
    alerts: list[scoring_pb2.DriftAlert] = []
    async with (
        serving(config, setup) as runtime,
        grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel,
        Bus.connect(nats_server.url, name="drift-retrain-test") as bus,
    ):

        async def on_alert(msg) -> None:
            alerts.append(scoring_pb2.DriftAlert.FromString(msg.data))

        await bus.nc.subscribe(subjects.MODELS_DRIFT, cb=on_alert)
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        await stub.DeployModel(scoring_pb2.DeployModelRequest(onnx=trained_model()))
        started: list[tuple[str, str]] = []
        runtime.parts["training"].start = lambda model, trigger: started.append((model, trigger)) or True
        engine = runtime.parts["engine"]
        shifted = population(np.random.default_rng(2), 300, orders_mean=6.0)
        engine.drift.observe(engine.registry.get("churn_risk").live, shifted, scores(shifted))

        reply = await stub.GetDrift(scoring_pb2.GetDriftRequest(model="churn_risk", check_now=True))
        assert reply.models[0].status == DRIFTED
        assert started == [("churn_risk", "drift")]
        # still drifted at the next check: alerted again, but no second run on the same data
        engine.drift.observe(engine.registry.get("churn_risk").live, shifted, scores(shifted))
        await stub.GetDrift(scoring_pb2.GetDriftRequest(model="churn_risk", check_now=True))
        assert started == [("churn_risk", "drift")]
        deadline = time.monotonic() + 5
        while len(alerts) < 2:
            assert time.monotonic() < deadline, "no drift alerts on models.drift"
            await asyncio.sleep(0.02)
        assert [(a.newly_drifted, a.retrain_started) for a in alerts] == [(True, True), (False, False)]


def test_get_drift_and_the_alert_say_which_values_were_compared_against_the_aged_reference():
    """A clock feature (days since sign-up) and the score judged against the reference aged by the time
    since it was taken: GetDrift's values and the alert's say so per value, as the drift report does."""
    report = DriftReport(
        "churn_risk",
        "1.1.0",
        LIVE,
        DRIFTED,
        0.2,
        rows=500,
        values=[
            ("sessions_30d", "feature", 0.41),
            ("days_since_signup", "feature", 0.02),
            ("churn_risk", "score", 0.25),
        ],
        aged=["feature:days_since_signup", "score:churn_risk"],
    )
    message = drift_message(report)
    assert {(v.kind, v.name): v.aged for v in message.values} == {
        ("feature", "sessions_30d"): False,
        ("feature", "days_since_signup"): True,
        ("score", "churn_risk"): True,
    }
    alert = alert_message(report, retrain_started=False)
    assert [(v.name, v.aged) for v in alert.over] == [("sessions_30d", False), ("churn_risk", True)]
