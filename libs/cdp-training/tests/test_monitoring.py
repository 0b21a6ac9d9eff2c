"""What production watching reads from training: the drift reference a version carries (and the shipped
models' references), and the realised quality of a version on the latest closed label window."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cdp_kit.errors import FailedPrecondition, InvalidArgument
from cdp_scoring.domain.registry import LIVE, Version
from cdp_scoring.drift import DriftMonitor, build_reference, load_shipped_references
from cdp_scoring.runtime import load_model
from cdp_training import learn
from cdp_training.dataset import matrix
from cdp_training.drift import REFERENCES
from cdp_training.pipeline import MODELS_DIR
from cdp_training.pointintime import training_set
from cdp_training.realised import realised_quality

from .conftest import profiles_in

DAY = 86_400.0
LAPSE = {"kind": "no_activity", "after": "30d", "window": "60d"}


@pytest.fixture(scope="module")
def world(platform_store):
    """500 simulated customers' profiles as the profile service stores them (written once a run: conftest)."""
    population, url = platform_store(500, 23)
    return population, profiles_in(url)


@pytest.fixture(scope="module")
def churn_run(world):
    population, profiles = world
    return learn.train_run(
        "churn_risk", profiles, cutoff=population.cutoff - 120 * DAY, until=population.end, log=lambda _: None
    )


def _version(data: bytes) -> Version:
    loaded = load_model(data)
    return Version(loaded.spec, LIVE, loaded.sha256, loaded.size_bytes, 0.0)


def test_a_trained_version_carries_the_reference_of_its_own_training_rows(churn_run):
    version = _version(churn_run.built.data)
    reference = version.spec.training["reference"]
    assert reference["rows"] == churn_run.train.rows
    assert set(reference["features"]) == {f.name for f in version.spec.features}
    assert list(reference["scores"]) == ["churn_risk"]
    # taken at the cut-off, naming the features that move with the clock (drift compares them aged)
    assert reference["taken_at"] == churn_run.train.cutoff
    assert reference["aged"] == ["days_since_signup", "days_since_first_order"]
    for bins in [*reference["features"].values(), *reference["scores"].values()]:
        assert len(bins["shares"]) == len(bins["edges"]) + 2 and sum(bins["shares"]) == pytest.approx(1, abs=1e-4)
    # the service, shown the training rows themselves as it scores them, sees no drift at all
    monitor = DriftMonitor(min_rows=1)
    loaded = load_model(churn_run.built.data)
    monitor.observe(version, churn_run.train.X, loaded.run(churn_run.train.X))
    (report,) = monitor.check([version])
    assert max(value for _, _, value in report.values) < 1e-6


def test_realised_quality_judges_the_version_on_the_latest_closed_window_with_its_own_label(world, churn_run):
    population, profiles = world
    realised = realised_quality(profiles, churn_run.built.data, until=population.end)
    assert realised["label"] == LAPSE  # the version's training.label
    assert realised["cutoff"] == learn.iso(population.end - 90 * DAY)  # the end is a midnight
    assert realised["label_until"] == learn.iso(population.end)
    assert realised["rows"] > 400 and 0 < realised["positives"] < realised["rows"]
    assert realised["auc"] > 0.7 and 0 < realised["brier"] < 0.25 and realised["status"] == "ok"
    bins = realised["reliability"]
    assert sum(b["rows"] for b in bins) == realised["rows"]
    # where there are rows, the observed rate is a rate and the mean prediction lies in its bin
    for b in bins:
        if b["rows"]:
            assert 0 <= b["observed_rate"] <= 1 and b["from"] <= b["mean_predicted"] <= b["to"]


def test_the_platforms_churn_label_is_the_one_the_shipped_model_was_trained_on(world):
    population, profiles = world
    assert learn.TRAINABLE["churn_risk"].label == LAPSE
    spec = load_model((MODELS_DIR / "churn_risk.onnx").read_bytes()).spec
    rows = training_set(profiles, spec=spec, label=LAPSE, cutoff=population.cutoff, until=population.end)
    person = {population.person_id(p): p for p in range(population.size)}
    who = np.array([person[pid] for pid in rows.person_ids])
    assert rows.rows > 400
    # the same customers lapsed as the simulator says, the truth the shipped model learned
    np.testing.assert_array_equal(rows.y[:, 0].astype(bool), population.outcomes.lapsed[who])
    # and that is not "no activity in the next 90 days": some came back in the month of grace only
    assert (population.outcomes.lapsed[who] & ~population.outcomes.churned[who]).any()


def test_the_shipped_churn_model_is_judged_on_its_lapse_label_once_offset_and_window_have_closed(world):
    population, profiles = world
    shipped = (MODELS_DIR / "churn_risk.onnx").read_bytes()
    realised = realised_quality(profiles, shipped, until=population.end)
    assert realised["version"] == "1.1.0" and realised["label"] == LAPSE
    # the latest cut-off whose 30 days of grace and 60-day window the store has seen whole
    assert realised["cutoff"] == learn.iso(population.end - 90 * DAY)
    assert realised["label_from"] == learn.iso(population.end - 60 * DAY)
    assert realised["label_until"] == learn.iso(population.end)
    assert realised["status"] == "ok" and realised["auc"] > 0.8
    # calibrated for its own label: judged on "no activity in the next 90 days" it looks miscalibrated
    old = realised_quality(profiles, shipped, label={"kind": "no_activity", "window": "90d"}, until=population.end)
    assert realised["ece_10_bins"] < old["ece_10_bins"]
    # a later cut-off would read a window not yet observed as "nothing happened": refused
    with pytest.raises(InvalidArgument) as caught:
        realised_quality(profiles, shipped, cutoff=population.end - 70 * DAY, until=population.end)
    assert caught.value.field == "cutoff"


def test_a_shipped_model_is_judged_with_its_trainable_label(world):
    population, profiles = world
    realised = realised_quality(profiles, (MODELS_DIR / "purchase_propensity.onnx").read_bytes(), until=population.end)
    assert realised["label"]["kind"] == "goal_event" and realised["version"] == "1.1.0"
    assert "auc" in realised


def test_a_model_without_a_label_definition_cannot_be_judged(world):
    _, profiles = world
    with pytest.raises(FailedPrecondition) as caught:
        realised_quality(profiles, (MODELS_DIR / "fraud_anomaly.onnx").read_bytes())
    assert "no label definition" in caught.value.message


def test_every_shipped_model_has_the_reference_of_its_version():
    references = json.loads((MODELS_DIR / REFERENCES).read_text())
    monitor = DriftMonitor(shipped=load_shipped_references(MODELS_DIR / REFERENCES))
    for path in sorted(MODELS_DIR.glob("*.onnx")):
        version = _version(path.read_bytes())
        assert references["models"][version.spec.name]["version"] == version.version
        assert monitor.reference(version) is not None, version.spec.name
    churn = references["models"]["churn_risk"]["reference"]
    assert churn["rows"] == references["population"] == 16_000
    assert np.isclose(sum(churn["scores"]["churn_risk"]["shares"]), 1, atol=1e-4)


# --- drift of features that move with the clock -------------------------------------------------------------

YEAR = 365 * DAY
ACTIVITY = ("sessions_7d", "sessions_30d", "sessions_90d", "app_sessions_30d", "product_views_30d", "cart_adds_30d")


def _year_later(model: str, population, fields, change=None):
    """One scheduled drift check of shipped `model` a year after its reference was taken (the shipped way:
    models/reference.json's format, which names neither the aged features nor when it was taken), on the
    same persons behaving exactly as they did: every value the same, but a year more since they signed
    up and first ordered. `change` alters their behaviour as well."""
    loaded = load_model((MODELS_DIR / f"{model}.onnx").read_bytes())
    spec = loaded.spec
    X = matrix(spec, fields.at_cutoff, population.cutoff)
    assert learn.iso(population.cutoff) == spec.training["cutoff"]  # the rows are taken when its reference was
    names = [f.name for f in spec.features]
    scores = loaded.run(X)
    reference = build_reference(names, X, {n: scores[:, j] for j, n in enumerate(spec.score_names)})
    later = X.copy()
    for name in ("days_since_signup", "days_since_first_order"):
        column = later[:, names.index(name)]
        column[np.isfinite(column)] += 365
    if change is not None:
        change(later, names)
    version = Version(spec, LIVE, loaded.sha256, loaded.size_bytes, 0.0)
    monitor = DriftMonitor(
        min_rows=100,
        shipped={model: {"version": spec.version, "reference": reference}},
        clock=lambda: population.cutoff + YEAR,
        rescorer=lambda _version: loaded.run,
    )
    monitor.observe(version, later, loaded.run(later))
    (report,) = monitor.check([version])
    return report


@pytest.mark.parametrize("model", ["churn_risk", "clv"])
def test_an_unchanged_population_a_year_later_has_not_drifted(population, fields, model):
    report = _year_later(model, population, fields)
    psi = {f"{kind}:{name}": value for name, kind, value in report.values}
    assert report.status == "ok", {k: round(v, 3) for k, v in psi.items() if v > 0.1}
    # tenure was compared against the reference aged by the year, and so was the score
    assert {"feature:days_since_signup", "feature:days_since_first_order"} <= set(report.aged)
    assert psi["feature:days_since_signup"] < 0.05
    assert all(
        f"score:{name}" in report.aged
        for name in load_model((MODELS_DIR / f"{model}.onnx").read_bytes()).spec.score_names
        if psi[f"score:{name}"] > 1e-9
    )


def test_a_change_of_behaviour_a_year_later_is_still_flagged_at_the_first_check(population, fields):
    def less_active(X, names):
        for name in ACTIVITY:
            X[:, names.index(name)] = np.floor(X[:, names.index(name)] / 3)

    report = _year_later("churn_risk", population, fields, change=less_active)
    assert report.status == "drifted" and report.newly_drifted
    over = {name for name, _kind, _value in report.over}
    assert {"sessions_30d", "sessions_90d"} <= over and "days_since_signup" not in over
