"""The models the project ships (services/scoring/src/cdp_scoring/models, written by
`python -m cdp_training`): each loads, carries a valid spec that fits its input, reproduces its
test vector, declares computed traits the profile service accepts, and report.json shows the quality
floors met."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest

from cdp_profile.domain import ComputedTraits
from cdp_scoring.domain import METADATA_KEY, ModelSpec
from cdp_scoring.runtime import load_model
from cdp_training.graphs import run, score_columns
from cdp_training.pipeline import FLOORS, MODELS_DIR, REPORT, check_floors
from cdp_training.traits import COMPUTED_TRAITS

MODELS = ("churn_risk", "purchase_propensity", "clv", "fraud_risk", "fraud_anomaly", "next_best_channel", "clusters")
SCORES = {
    "churn_risk": ["churn_risk"],
    "purchase_propensity": ["purchase_propensity"],
    "clv": ["clv_p_alive", "clv_expected_purchases_365d", "clv_expected_order_value", "clv_value_365d"],
    "fraud_risk": ["fraud_risk"],
    "fraud_anomaly": ["fraud_anomaly"],
    "next_best_channel": ["nbc_email", "nbc_sms", "nbc_push", "nbc_in_app", "best_send_hour"],
    "clusters": ["cluster"],
}


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads((MODELS_DIR / REPORT).read_text())


def _load(name: str) -> tuple[bytes, onnx.ModelProto, ModelSpec]:
    data = (MODELS_DIR / f"{name}.onnx").read_bytes()
    model = onnx.load_from_string(data)
    props = {p.key: p.value for p in model.metadata_props}
    return data, model, ModelSpec.from_json(props[METADATA_KEY])


@pytest.mark.parametrize("name", MODELS)
def test_model_loads_and_matches_its_spec(name, report):
    data, model, spec = _load(name)
    assert spec.name == name and list(spec.score_names) == SCORES[name]
    (graph_input,) = model.graph.input
    assert graph_input.name == spec.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert len(dims) == 2 and not dims[0].HasField("dim_value") and dims[1].dim_value == len(spec.features)
    # the test vector reproduces through onnxruntime
    vector = spec.test_vector
    row = np.array([[np.nan if v is None else v for v in vector["features"]]], dtype=np.float32)
    scores = score_columns(spec, run(data, row))
    assert scores.keys() == vector["expected"].keys()
    for score, expected in vector["expected"].items():
        assert scores[score][0] == pytest.approx(expected, rel=vector["tolerance"], abs=vector["tolerance"])
    # the scoring service's deploy gate accepts the file
    assert load_model(data).spec.key == spec.key
    # the report describes this very file
    entry = report["models"][name]
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["scores"] == SCORES[name]
    assert {k: v for k, v in entry["quality"].items() if k in spec.quality} == dict(spec.quality)


@pytest.mark.parametrize("name", MODELS)
def test_computed_traits_are_the_shared_definitions_and_valid_for_the_profile(name):
    _, _, spec = _load(name)
    read = {f.path.split(".", 1)[1] for f in spec.features if f.root == "computed"}
    assert {t["name"] for t in spec.computed_traits} == read
    for trait in spec.computed_traits:
        assert dict(trait) == COMPUTED_TRAITS[trait["name"]]  # one meaning per name across models
    ComputedTraits.from_dicts([dict(t) for t in spec.computed_traits])


def test_scores_are_unique_across_models():
    names = [score for name in MODELS for score in _load(name)[2].score_names]
    assert len(names) == len(set(names))


def test_report_holds_the_quality_figures_and_the_floors_are_met(report):
    assert set(report["models"]) == set(MODELS)
    assert set(report["scores"]) == {s for scores in SCORES.values() for s in scores}
    floors = check_floors(report["models"])
    assert len(floors) == len(FLOORS)
    assert floors == report["floors"]
    failed = {key: floor for key, floor in floors.items() if not floor["met"]}
    assert not failed
    quality = {name: report["models"][name]["quality"] for name in MODELS}
    assert quality["churn_risk"]["holdout"]["brier"] < quality["churn_risk"]["holdout"]["base_rate"] * (
        1 - quality["churn_risk"]["holdout"]["base_rate"]
    )  # better than always saying the base rate
    assert quality["next_best_channel"]["top1_accuracy"] >= quality["next_best_channel"]["baseline_top1_accuracy"]
    recovery = quality["clv"]["bgnbd_parameter_recovery"]
    assert recovery["max_relative_error"] <= 0.10
    assert set(report["computed_traits"]) >= {t for name in MODELS for t in report["models"][name]["computed_traits"]}


def test_shipped_clv_graph_agrees_with_the_reference():
    from cdp_training.bgnbd import BgNbd, GammaGamma
    from cdp_training.graphs import reference_clv

    data, _, spec = _load("clv")
    bgnbd = BgNbd(**spec.quality["bgnbd"])
    spend = GammaGamma(**spec.quality["gamma_gamma"])
    rng = np.random.default_rng(3)
    first = rng.uniform(0, 800, 2000)
    rows = np.stack(
        [rng.integers(0, 60, 2000), first, first * rng.random(2000), rng.uniform(0, 300, 2000), first + 5], axis=1
    ).astype(np.float32)
    got = run(data, rows)
    expected = reference_clv(bgnbd, spend, rows.astype(np.float64), 365)
    for name, values in expected.items():
        assert np.max(np.abs(got[name] - values) / np.maximum(1.0, np.abs(values))) < 1e-4, name


NOW = 1_750_000_000.0  # epoch seconds: the time of the change being scored
DAY = 86_400.0


def _customer(orders: int, first_order_ago: float, last_order_ago: float, order_value: float = 40.0) -> dict:
    """A person's flat profile fields as the scoring service holds them (epoch seconds)."""
    return {
        "computed.orders_total": orders,
        "computed.first_order_at": NOW - first_order_ago,
        "computed.last_order_at": NOW - last_order_ago,
        "computed.avg_order_value": order_value,
        "computed.signed_up_at": NOW - first_order_ago - 60.0,
    }


def test_shipped_clv_does_not_extrapolate_a_burst_of_orders_from_a_customer_seconds_old():
    """Three orders placed seconds apart by a customer a few seconds old are one purchase occasion: they say
    nothing about how often the customer buys. So the shipped model (onnxruntime session and feature
    assembly as the service runs them) must give that customer no more expected purchases than a customer
    of the same age with one order, and a value of at most that many purchases at its own expected order
    value. Read as a Poisson rate, three orders in five seconds gave 24 orders in the next year."""
    model = load_model((MODELS_DIR / "clv.onnx").read_bytes())
    people = {
        "burst": _customer(3, 5.0, 1.0),
        "one order": _customer(1, 5.0, 5.0),
        "steady": _customer(3, 14 * DAY, 1.0),  # three orders a week apart: a real purchase rate
    }
    scores = model.run(model.assembler.matrix(list(people.values()), NOW))
    column = {name: j for j, name in enumerate(model.spec.score_names)}
    got = {person: {score: float(scores[i, j]) for score, j in column.items()} for i, person in enumerate(people)}
    burst, one = got["burst"], got["one order"]
    assert burst["clv_expected_purchases_365d"] <= one["clv_expected_purchases_365d"] * (1 + 1e-5)
    assert burst["clv_value_365d"] <= one["clv_expected_purchases_365d"] * burst["clv_expected_order_value"] * (
        1 + 1e-5
    )
    assert burst["clv_p_alive"] == pytest.approx(1.0)  # no repeat purchase occasion, so no dropout yet
    # orders spread over days still tell the model how often the customer buys
    assert got["steady"]["clv_expected_purchases_365d"] > 2 * one["clv_expected_purchases_365d"]
