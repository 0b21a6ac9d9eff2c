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


def _two_months(drop: bool, tickets: int) -> tuple[list, float]:
    """The customer-success story's customer as the profile applies her events: signed up 90 days ago on the
    pro plan, five sessions a day for 60 days (three in the last week when `drop`), three orders, `tickets`
    support tickets over the last five days."""
    from cdp_profile.domain import ProfileEvent

    now, day = 1_750_000_000.0, 86_400.0
    rows = [("identify", "", now - 90 * day, {"plan": "pro"}), ("track", "Signed Up", now - 90 * day + 1, {})]
    for back in range(60, 0, -1):
        rows += [("page", "Home", now - back * day + 3600.0 * k, {}) for k in range(3 if drop and back <= 7 else 5)]
    rows += [("track", "Order Completed", now - back * day, {"total": 80}) for back in (75, 45, 15)]
    rows += [("track", "Support Ticket Opened", now - back * day, {}) for back in (5, 3, 1, 0.1)[:tickets]]
    events = [
        ProfileEvent(
            event_id=f"web:m{k}",
            type=kind,
            name=name,
            at=at,
            source="web",
            properties={} if kind == "identify" else payload,
            traits=payload if kind == "identify" else {},
            identifiers=("user_id:u-1",),
            user_id="u-1",
        )
        for k, (kind, name, at, payload) in enumerate(sorted(rows, key=lambda r: r[2]))
    ]
    return events, now


def test_shipped_churn_risk_sees_a_customer_fading_with_tickets_piling_up():
    """A customer whose daily use drops by 40 % in her last week while four tickets pile up is at risk (above
    the customer-success story's 0.5); her twin who carries on as before is not; the drop alone raises the
    risk without making it a verdict, and the tickets alone raise it less than both."""
    from cdp_profile.domain import ComputedTraits
    from cdp_scoring.domain import FeatureAssembler
    from cdp_training.dataset import fields_at

    data, _, spec = _load("churn_risk")
    assembler = FeatureAssembler(spec)
    definitions = ComputedTraits.from_dicts([dict(t) for t in spec.computed_traits])

    def risk(drop: bool, tickets: int) -> float:
        events, now = _two_months(drop, tickets)
        (fields,) = fields_at("p-1", events, definitions, [now])
        row = np.array([assembler.row(fields, now)], dtype=np.float32)
        return float(score_columns(spec, run(data, row))["churn_risk"][0])

    fading, steady = risk(drop=True, tickets=4), risk(drop=False, tickets=0)
    assert fading > 0.5 and steady < 0.05
    assert steady < risk(drop=True, tickets=0) < 0.5
    assert risk(drop=False, tickets=4) < fading


def test_the_trend_columns_the_graph_computes_are_those_the_trees_were_trained_on():
    """`with_ratios` (served) and `ratios` (training) agree bit for bit, a share of nothing being missing."""
    from onnx import helper

    from cdp_training.graphs import ratios, with_ratios

    wide = helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["N", 5])
    out = helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["N", 5])
    graph = helper.make_graph([helper.make_node("Identity", ["features"], ["out"])], "echo", [wide], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = with_ratios(model, "features", 3, [(0, 1), (1, 2)])
    rows = np.array([[18, 135, 286], [30, 150, 300], [0, 0, 0], [3, 0, 7], [1, 3, 0]], dtype=np.float32)
    got, expected = run(model, rows)["out"], ratios(rows, [(0, 1), (1, 2)])
    assert got.shape == (5, 5)
    np.testing.assert_array_equal(got, expected)
    assert np.isnan(got[2, 3:]).all() and np.isnan(got[3, 3]) and np.isnan(got[4, 4]) and got[3, 4] == 0
