"""The shipped models: each trained on one simulated population, judged on another, written as ONNX.

Every builder takes the same `Data` (both populations and their profile fields) and returns a `Built`:
the ONNX model with its spec in the metadata, the spec, and the figures for the report. Scores are always
read back through onnxruntime from the model as shipped, so the figures describe the file, not the
in-memory estimator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import lightgbm
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxmltools import convert_lightgbm
from onnxmltools.convert.common.data_types import FloatTensorType as MlFloatTensorType
from sklearn.ensemble import IsolationForest

from cdp_scoring.domain import ModelSpec
from cdp_training import clusters as clustering
from cdp_training import metrics
from cdp_training.bgnbd import OCCASION_DAYS, BgNbd, GammaGamma, summaries, terms_needed
from cdp_training.dataset import PopulationFields, matrix
from cdp_training.graphs import (
    append_nodes,
    batch_outputs,
    clv_graph,
    isolation_forest_graph,
    ratios,
    reference_clv,
    run,
    score_columns,
    with_ratios,
    with_spec,
)
from cdp_training.simulator import CHANNELS, CHURN_DAYS, LAPSE_GRACE_DAYS, PURCHASE_DAYS, RESPONSE_DAYS, Population
from cdp_training.traits import (
    CLUSTER_FEATURES,
    CLV_FEATURES,
    ENGAGEMENT_FEATURES,
    ENGAGEMENT_TRENDS,
    FRAUD_FEATURES,
    NBC_FEATURES,
    traits_for,
)

# A model whose bytes change gets its own new version: scoring's registry refuses a version number reused
# for different bytes, so a deployment can take the new file with DeployModel beside the old one.
# 1.1.0: every model retrained on customers who fade as they leave (frustrated ones with their tickets piling
# up), take quiet spells and come back, or come most days; churn risk predicts a lapse a month on.
VERSION = "1.1.0"
CLV_VERSION = "1.2.0"  # 1.1.0: repeat orders count as purchase occasions, at most one a day; 1.2.0: as VERSION
# 1.2.0: the fraud models read the profile the order lands on under identity's default rules (one user id
# per person: a ring's accounts are persons of their own) and the other accounts identity saw on its device.
# 1.3.0: shared_device_accounts_24h also reads identity's "Identifier Shared" events (an account learns of
# the accounts that joined its device after it).
FRAUD_VERSION = "1.3.0"
OWNER = "cdp"
INPUT = "features"
LIGHTGBM_OPSET = 15  # the newest onnxmltools converts LightGBM to
CLV_HORIZON_DAYS = 365
FRAUD_RECALL = 0.8
THREADS = 1  # one thread: deterministic, and OpenMP spinning stalls when other processes hold the cores


@dataclass(slots=True)
class Data:
    train: Population
    test: Population
    train_fields: PopulationFields
    test_fields: PopulationFields
    seed: int
    recovery_customers: int = 50_000  # simulated for the BG/NBD parameter-recovery figures


# The module path the shipped models name as their origin in their metadata (part of their bytes, so it
# changes only with a retrain that bumps every version, as 1.1.0 did).
SHIPPED_WITH = "cdp_training"


@dataclass(slots=True)
class Built:
    model: onnx.ModelProto
    spec: ModelSpec

    @property
    def data(self) -> bytes:
        return self.model.SerializeToString()


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


def _training_summary(data: Data, rows: int, positives: int | dict[str, int], label: str, algorithm: str) -> dict:
    train, test = data.train, data.test
    return {
        "algorithm": algorithm,
        "label": label,
        "data": f"simulated customers ({SHIPPED_WITH}.simulator); features computed by the profile domain",
        "population": train.size,
        "seed": train.seed,
        "rows": rows,
        "positives": positives,
        "holdout_population": test.size,
        "holdout_seed": test.seed,
        "cutoff": _iso(train.cutoff),
        "history_from": _iso(train.start),
        "outcome_until": _iso(train.end),
    }


def _finish(
    model: onnx.ModelProto,
    *,
    name: str,
    description: str,
    features: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    training: Mapping[str, Any],
    quality: Mapping[str, Any],
    test_row: np.ndarray,
    version: str = VERSION,
    computed_traits: list[dict[str, Any]] | None = None,
) -> Built:
    """Attach the spec, with a test vector whose expected scores onnxruntime computed from this model."""
    document: dict[str, Any] = {
        "name": name,
        "version": version,
        "owner": OWNER,
        "description": description,
        "input": INPUT,
        "features": features,
        "outputs": outputs,
        "computed_traits": traits_for(features) if computed_traits is None else computed_traits,
        "training": dict(training),
        "quality": dict(quality),
    }
    draft = ModelSpec.from_dict(document)
    row = np.asarray(test_row, dtype=np.float32)[None, :]
    scores = score_columns(draft, run(model, row))
    document["test_vector"] = {
        "features": [None if math.isnan(v) else float(v) for v in row[0]],
        "expected": {score: float(values[0]) for score, values in scores.items()},
        "tolerance": 1e-4,
    }
    spec = ModelSpec.from_dict(document)
    return Built(with_spec(model, spec), spec)


def population_row(X: np.ndarray) -> np.ndarray:
    """A test row that is no one's: each feature's median over the rows `X` (NaN where none has a value).

    The test vector goes with the model for good (its spec: the ONNX file, `GetModel`, every registry
    copy), and no deletion of a person reaches it. A model trained on the store's profiles took one person's
    row at the cut-off (their orders, spend, recency ...) as its test vector; an aggregate of the population
    identifies no one and tests the model's arithmetic as well. The shipped models, trained on the simulated
    population, may keep theirs."""
    X = np.asarray(X, dtype=np.float64)
    row = np.full(X.shape[1], np.nan)
    for column in range(X.shape[1]):
        values = X[:, column]
        values = values[~np.isnan(values)]
        if values.size:
            row[column] = float(np.median(values))
    return row


def _spec_for(name: str, features: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> ModelSpec:
    return ModelSpec.from_dict(
        {
            "name": name,
            "version": VERSION,
            "features": features,
            "outputs": outputs,
            "computed_traits": traits_for(features),
        }
    )


# Every tree is walked for every person on every change that moves the model's inputs: 150 trees at a
# higher learning rate score as well on the held-out population as 400 at 0.03 (churn AUC 0.918 both,
# propensity 0.878 vs 0.880) and cost a third of the time to serve.
TREES = {
    "n_estimators": 150,
    "learning_rate": 0.08,
    "num_leaves": 31,
    "min_child_samples": 40,
    "subsample": 0.8,
    "subsample_freq": 1,
    "colsample_bytree": 0.8,
    "reg_lambda": 1.0,
}
# The channel answered most is a noisy label and the counts already point at it: small, heavily
# regularised trees beat the "most answered channel" rule; the larger default ones do no better than it.
# 80 rounds (x4 classes) do as well as 200 at a lower rate, at 40 % of the serving cost.
NBC_TREES = {"n_estimators": 80, "learning_rate": 0.12, "num_leaves": 8, "min_child_samples": 100}


def _lightgbm(
    X: np.ndarray, y: np.ndarray, seed: int, objective: str = "binary", **params: Any
) -> lightgbm.LGBMClassifier:
    model = lightgbm.LGBMClassifier(
        objective=objective,
        **{**TREES, **params},
        random_state=seed,
        deterministic=True,
        force_row_wise=True,
        num_threads=THREADS,
        verbose=-1,
    )
    return model.fit(X, y)


def _trees_text(estimator: lightgbm.LGBMClassifier) -> str:
    """The trees as the `training.algorithm` line the model carries says them, from the parameters the fit
    was given: "150 trees", or per class "80 rounds of 8-leaf trees". Typed by hand, that line said 400
    trees and 200 rounds in the 1.1.0 models, which were fitted with 150 and 80."""
    params = estimator.get_params()
    if len(estimator.classes_) <= 2:
        return f"{params['n_estimators']} trees"
    return f"{params['n_estimators']} rounds of {params['num_leaves']}-leaf trees"


def _lightgbm_onnx(model: lightgbm.LGBMClassifier, width: int) -> onnx.ModelProto:
    converted = convert_lightgbm(
        model, initial_types=[(INPUT, MlFloatTensorType([None, width]))], zipmap=False, target_opset=LIGHTGBM_OPSET
    )
    return batch_outputs(converted)


def _probability_output(score: str, meaning: str) -> dict[str, Any]:
    return {"score": score, "output": "probabilities", "index": 1, "meaning": meaning}


# --- churn and purchase propensity ---------------------------------------------------------------------


def trend_pairs(features: Sequence[Mapping[str, Any]]) -> list[tuple[int, int]]:
    """The (numerator, denominator) columns of each engagement trend (`traits.ENGAGEMENT_TRENDS`)."""
    index = {feature["name"]: k for k, feature in enumerate(features)}
    return [(index[a], index[b]) for a, b in ENGAGEMENT_TRENDS]


def _binary_engagement_model(
    data: Data, *, name: str, score: str, meaning: str, description: str, label: Callable[[Population], np.ndarray]
) -> Built:
    outputs = [_probability_output(score, meaning)]
    spec = _spec_for(name, ENGAGEMENT_FEATURES, outputs)
    pairs = trend_pairs(ENGAGEMENT_FEATURES)
    X = matrix(spec, data.train_fields.at_cutoff, data.train.cutoff)
    y = label(data.train).astype(int)
    X_test = matrix(spec, data.test_fields.at_cutoff, data.test.cutoff)
    y_test = label(data.test).astype(int)
    # the trees also read the trends, which the graph computes from the features it is given
    wide = ratios(X, pairs)
    estimator = _lightgbm(wide, y, data.seed)
    model = with_ratios(_lightgbm_onnx(estimator, wide.shape[1]), INPUT, X.shape[1], pairs)
    p = score_columns(spec, run(model, X_test))[score]
    quality = {"holdout": metrics.binary_report(y_test, p), "holdout_rows": len(y_test)}
    quality["auc"] = quality["holdout"]["auc"]
    training = _training_summary(
        data,
        len(y),
        int(y.sum()),
        meaning,
        f"LightGBM {lightgbm.__version__} gradient-boosted trees ({_trees_text(estimator)})",
    )
    example = int(np.flatnonzero(y_test == 1)[0])
    return _finish(
        model,
        name=name,
        description=description,
        features=ENGAGEMENT_FEATURES,
        outputs=outputs,
        training=training,
        quality=quality,
        test_row=X_test[example],
    )


def churn_risk(data: Data) -> Built:
    return _binary_engagement_model(
        data,
        name="churn_risk",
        score="churn_risk",
        meaning=f"P(no activity in the {CHURN_DAYS - LAPSE_GRACE_DAYS} days after the next {LAPSE_GRACE_DAYS})",
        description=(
            "Churn risk: the probability that the customer has lapsed a month from now - no activity at all in the "
            "60 days after the next 30."
        ),
        label=lambda population: population.outcomes.lapsed,
    )


def purchase_propensity(data: Data) -> Built:
    return _binary_engagement_model(
        data,
        name="purchase_propensity",
        score="purchase_propensity",
        meaning=f"P(an order in the next {PURCHASE_DAYS} days)",
        description="Purchase propensity: the probability that the customer places an order in the next 30 days.",
        label=lambda population: population.outcomes.purchased,
    )


# --- customer lifetime value ------------------------------------------------------------------------------

CLV_OUTPUTS = [
    {"score": "clv_p_alive", "output": "p_alive", "index": 0, "meaning": "P(still a customer) under BG/NBD"},
    {
        "score": "clv_expected_purchases_365d",
        "output": "expected_purchases",
        "index": 0,
        "meaning": "expected orders in the next 365 days (BG/NBD conditional expectation)",
    },
    {
        "score": "clv_expected_order_value",
        "output": "expected_order_value",
        "index": 0,
        "meaning": "expected value of the customer's next orders (Gamma-Gamma), USD",
    },
    {
        "score": "clv_value_365d",
        "output": "clv",
        "index": 0,
        "meaning": "expected orders in the next 365 days x expected order value, USD, undiscounted",
    },
]

# Known parameters for the recovery check (weeks): a customer base like CDNOW's, with a longer history.
RECOVERY_BGNBD = BgNbd(r=0.75, alpha=4.0, a=0.8, b=2.5)
RECOVERY_GAMMA_GAMMA = GammaGamma(p=6.0, q=3.5, gamma=15.0)


def parameter_recovery(seed: int, customers: int) -> dict[str, Any]:
    """Fit both models to data drawn from them with known parameters; relative errors per parameter."""
    rng = np.random.default_rng(seed)
    ages = rng.uniform(26.0, 104.0, customers)
    x, t_x = RECOVERY_BGNBD.sample(ages, rng)
    fitted = BgNbd.fit(x, t_x, ages)
    buyers = x > 0
    mean_value = RECOVERY_GAMMA_GAMMA.sample(x[buyers], rng)
    spend = GammaGamma.fit(x[buyers], mean_value)

    def errors(true: Mapping[str, float], got: Mapping[str, float]) -> dict[str, float]:
        return {k: round(abs(got[k] / true[k] - 1), 4) for k in true}

    bgnbd_errors = errors(RECOVERY_BGNBD.as_dict(), fitted.as_dict())
    spend_errors = errors(RECOVERY_GAMMA_GAMMA.as_dict(), spend.as_dict())
    return {
        "customers": customers,
        "seed": seed,
        "bgnbd_true": RECOVERY_BGNBD.as_dict(),
        "bgnbd_fitted": {k: round(v, 4) for k, v in fitted.as_dict().items()},
        "bgnbd_relative_error": bgnbd_errors,
        "gamma_gamma_true": RECOVERY_GAMMA_GAMMA.as_dict(),
        "gamma_gamma_fitted": {k: round(v, 4) for k, v in spend.as_dict().items()},
        "gamma_gamma_relative_error": spend_errors,
        "max_relative_error": max([*bgnbd_errors.values(), *spend_errors.values()]),
    }


def _clv_inputs(data: Data, fields: PopulationFields, population: Population) -> np.ndarray:
    return matrix(_spec_for("clv", CLV_FEATURES, CLV_OUTPUTS), fields.at_cutoff, population.cutoff)


def clv(data: Data) -> Built:
    X = _clv_inputs(data, data.train_fields, data.train).astype(np.float64)
    orders, first, last, aov = X[:, 0], X[:, 1], X[:, 2], X[:, 3]
    buyers = orders > 0
    # x counts repeat purchase occasions (orders less than a day apart are one), in the fit as in the graph
    x, t_x, T = summaries(orders[buyers], first[buyers], last[buyers])
    bgnbd = BgNbd.fit(x, t_x, T)
    spend = GammaGamma.fit(orders[buyers], aov[buyers])
    # the series must be exact well beyond anyone in the data: twice the most repeat purchases and ages
    # up to the history plus a year
    horizon = CLV_HORIZON_DAYS / 7
    x_max = max(2 * float(x.max()), 50.0)
    T_max = (data.train.cutoff - data.train.start) / 86_400 / 7 + 52
    terms, series_error = terms_needed(bgnbd, horizon, x_max, T_max, tolerance=1e-7)
    model = clv_graph(
        bgnbd, spend, input_name=INPUT, horizon_days=CLV_HORIZON_DAYS, terms=terms, occasion_days=OCCASION_DAYS
    )

    X_test = _clv_inputs(data, data.test_fields, data.test)
    graph = run(model, X_test)
    reference = reference_clv(bgnbd, spend, X_test.astype(np.float64), CLV_HORIZON_DAYS)
    graph_error = max(
        float(np.max(np.abs(graph[k] - reference[k]) / np.maximum(1.0, np.abs(reference[k])))) for k in reference
    )
    # does the model predict the 90 days after the cutoff (what the simulation can check)?
    test_x, test_tx, test_T = summaries(X_test[:, 0], X_test[:, 1], X_test[:, 2])
    has = X_test[:, 0] > 0
    predicted_90 = bgnbd.expected(CHURN_DAYS / 7, test_x[has], test_tx[has], test_T[has])
    actual_90 = data.test.outcomes.orders_after[has].astype(np.float64)
    quality = {
        # full precision: the graph's parameters, so anyone can recompute its outputs from the spec
        "bgnbd": bgnbd.as_dict(),
        "gamma_gamma": spend.as_dict(),
        "purchase_occasion_days": OCCASION_DAYS,
        "bgnbd_parameter_recovery": parameter_recovery(data.seed, data.recovery_customers),
        "hyp2f1_series": {
            "terms": terms,
            "max_relative_error_vs_scipy": float(f"{series_error:.3g}"),
            "checked_range": {"repeat_purchases": [0, x_max], "age_weeks": [0, round(T_max, 1)]},
        },
        "onnx_vs_reference_max_error": float(f"{graph_error:.3g}"),
        "holdout_next_90_days": {
            "buyers": int(has.sum()),
            "predicted_orders": round(float(predicted_90.sum()), 1),
            "actual_orders": int(actual_90.sum()),
            "mean_absolute_error": round(float(np.mean(np.abs(predicted_90 - actual_90))), 4),
            "correlation": round(float(np.corrcoef(predicted_90, actual_90)[0, 1]), 4),
        },
        "discounting": "none (undiscounted 365-day value)",
    }
    training = _training_summary(
        data,
        int(buyers.sum()),
        {"repeat_buyers": int((x > 0).sum())},
        "order history at the cutoff (x repeat purchase occasions, t_x, T in weeks; mean order value)",
        "BG/NBD and Gamma-Gamma by maximum likelihood (scipy L-BFGS-B), served as a hand-built ONNX graph",
    )
    example = int(np.flatnonzero(X_test[:, 0] >= 3)[0])
    return _finish(
        model,
        name="clv",
        description=(
            "Customer lifetime value: BG/NBD (purchases, P(alive)) and Gamma-Gamma (order value) from the "
            "order history; CLV = expected orders in 365 days x expected order value, undiscounted. Repeat "
            "orders count at most one per day between the first and the last order (a burst is one purchase "
            "occasion). Without an order, x = 0 and T = days since sign-up."
        ),
        features=CLV_FEATURES,
        outputs=CLV_OUTPUTS,
        training=training,
        quality=quality,
        test_row=X_test[example],
        version=CLV_VERSION,
    )


# --- fraud -------------------------------------------------------------------------------------------------


def _fraud_rows(fields: PopulationFields, population: Population) -> np.ndarray:
    spec = _spec_for("fraud_risk", FRAUD_FEATURES, [_probability_output("fraud_risk", "")])
    return matrix(spec, fields.at_fraud, population.fraud_at)


def fraud_risk(data: Data) -> Built:
    outputs = [_probability_output("fraud_risk", "P(the order comes from a fraudster)")]
    X = _fraud_rows(data.train_fields, data.train)
    y = data.train.outcomes.is_fraudster.astype(int)
    X_test = _fraud_rows(data.test_fields, data.test)
    y_test = data.test.outcomes.is_fraudster.astype(int)
    # Fraudsters are few: the slower, longer fit keeps precision at recall 0.8 (0.81 against 0.75 with
    # the shorter one), worth its serving cost on the rarer order events.
    estimator = _lightgbm(X, y, data.seed, n_estimators=300, learning_rate=0.03)
    model = _lightgbm_onnx(estimator, X.shape[1])
    p = run(model, X_test)["probabilities"][:, 1]
    precision, threshold = metrics.precision_at_recall(y_test, p, FRAUD_RECALL)
    quality = {
        "auc": round(metrics.auc(y_test, p), 4),
        f"precision_at_recall_{FRAUD_RECALL}": round(precision, 4),
        "threshold_at_that_recall": round(threshold, 4),
        "holdout": metrics.binary_report(y_test, p),
        "holdout_rows": len(y_test),
        "scored_at": "the order being placed (fraudsters: the last order of their burst)",
    }
    training = _training_summary(
        data,
        len(y),
        int(y.sum()),
        "fraudster (fraud rings and account takeovers)",
        f"LightGBM {lightgbm.__version__} gradient-boosted trees ({_trees_text(estimator)})",
    )
    return _finish(
        model,
        name="fraud_risk",
        description="Fraud risk of the person's latest order, from the last 24 hours of devices, places, cards and accounts.",
        features=FRAUD_FEATURES,
        outputs=outputs,
        training=training,
        quality=quality,
        test_row=X_test[int(np.flatnonzero(y_test == 1)[0])],
        version=FRAUD_VERSION,
    )


def fraud_anomaly(data: Data) -> Built:
    outputs = [
        {
            "score": "fraud_anomaly",
            "output": "anomaly",
            "index": 0,
            "meaning": "isolation-forest anomaly score, higher = more unusual",
        }
    ]
    X = _fraud_rows(data.train_fields, data.train)
    X_test = _fraud_rows(data.test_fields, data.test)
    y_test = data.test.outcomes.is_fraudster.astype(int)
    forest = IsolationForest(n_estimators=200, max_samples=min(512, len(X)), random_state=data.seed).fit(X)
    model = isolation_forest_graph(forest, X.shape[1], input_name=INPUT)
    score = run(model, X_test)["anomaly"][:, 0]
    quality = {
        "auc": round(metrics.auc(y_test, score), 4),
        "holdout_rows": len(y_test),
        "note": "unsupervised: trained without labels; AUC measured against the simulated truth",
    }
    training = _training_summary(
        data,
        len(X),
        int(data.train.outcomes.is_fraudster.sum()),
        "none (unsupervised); the fraudster count is shown for reference",
        "scikit-learn IsolationForest (200 trees, 512 samples each)",
    )
    return _finish(
        model,
        name="fraud_anomaly",
        description="How unusual the last 24 hours of the person's activity look (isolation forest; higher = more anomalous).",
        features=FRAUD_FEATURES,
        outputs=outputs,
        training=training,
        quality=quality,
        test_row=X_test[int(np.flatnonzero(y_test == 1)[0])],
        version=FRAUD_VERSION,
    )


# --- next best channel and send time -----------------------------------------------------------------------

NBC_BASELINE = ("email_opens_90d", "sms_clicks_90d", "push_opens_90d", "inapp_clicks_90d")


def with_send_hour(model: onnx.ModelProto, column: int, fallback: int) -> onnx.ModelProto:
    """Add output `send_hour`: the row's feature `column` (best_hour), or `fallback` where it is unknown (< 0)."""
    return append_nodes(
        model,
        [
            helper.make_node("Gather", [INPUT, "send_hour_column"], ["send_hour_2d"], axis=1),
            helper.make_node("Reshape", ["send_hour_2d", "send_hour_flat"], ["send_hour_known"]),
            helper.make_node("Less", ["send_hour_known", "send_hour_zero"], ["send_hour_unknown"]),
            helper.make_node("Where", ["send_hour_unknown", "send_hour_fallback", "send_hour_known"], ["send_hour"]),
        ],
        [
            numpy_helper.from_array(np.array([column], dtype=np.int64), "send_hour_column"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "send_hour_flat"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "send_hour_zero"),
            numpy_helper.from_array(np.array(float(fallback), dtype=np.float32), "send_hour_fallback"),
        ],
        [helper.make_tensor_value_info("send_hour", TensorProto.FLOAT, ["N"])],
    )


def next_best_channel(data: Data) -> Built:
    outputs = [
        {
            "score": f"nbc_{channel}",
            "output": "probabilities",
            "index": k,
            "meaning": f"P({channel} is the channel the customer answers most in the next {RESPONSE_DAYS} days | they answer)",
        }
        for k, channel in enumerate(CHANNELS)
    ]
    outputs.append(
        {
            "score": "best_send_hour",
            "output": "send_hour",
            "index": 0,
            "meaning": "local hour (0-23) the customer most often answered at; the population's usual hour when unknown",
        }
    )
    spec = _spec_for("next_best_channel", NBC_FEATURES, outputs)
    names = [f["name"] for f in NBC_FEATURES]
    train_rows = np.flatnonzero(data.train.outcomes.response_channel >= 0)
    test_rows = np.flatnonzero(data.test.outcomes.response_channel >= 0)
    X = matrix(spec, [data.train_fields.at_cutoff[i] for i in train_rows], data.train.cutoff)
    y = data.train.outcomes.response_channel[train_rows]
    X_test = matrix(spec, [data.test_fields.at_cutoff[i] for i in test_rows], data.test.cutoff)
    y_test = data.test.outcomes.response_channel[test_rows]
    hour_test = data.test.outcomes.response_hour[test_rows]
    fallback = int(np.bincount(data.train.outcomes.response_hour[train_rows], minlength=24).argmax())

    estimator = _lightgbm(X, y, data.seed, "multiclass", **NBC_TREES)
    model = with_send_hour(_lightgbm_onnx(estimator, X.shape[1]), names.index("best_hour"), fallback)
    scores = score_columns(spec, run(model, X_test))
    probabilities = np.stack([scores[f"nbc_{c}"] for c in CHANNELS], axis=1)
    predicted = probabilities.argmax(axis=1)
    baseline = X_test[:, [names.index(n) for n in NBC_BASELINE]].argmax(axis=1)  # ties: email first
    send_hour = scores["best_send_hour"]
    accuracy = round(float(np.mean(predicted == y_test)), 4)
    baseline_accuracy = round(float(np.mean(baseline == y_test)), 4)
    hour_accuracy = round(metrics.hour_accuracy(send_hour, hour_test, 1), 4)
    hour_baseline = round(metrics.hour_accuracy(np.full(len(hour_test), fallback), hour_test, 1), 4)
    quality = {
        "holdout_responders": len(y_test),
        "top1_accuracy": accuracy,
        "baseline_top1_accuracy": baseline_accuracy,
        "top1_gain_over_baseline": round(accuracy - baseline_accuracy, 4),
        "baseline": "the channel with the most answers in the last 90 days (email when none)",
        "holdout_channel_shares": {c: round(float(np.mean(y_test == k)), 4) for k, c in enumerate(CHANNELS)},
        "send_hour_accuracy_within_1h": hour_accuracy,
        "send_hour_baseline_accuracy_within_1h": hour_baseline,
        "send_hour_gain_over_baseline": round(hour_accuracy - hour_baseline, 4),
        "send_hour_baseline": f"everyone at the population's most common answer hour ({fallback}h)",
        "send_hour_method": "deterministic: computed.best_hour (most frequent local hour of past answers)",
        "label": f"the channel answered most in the {RESPONSE_DAYS} days after the cutoff; hour of its first answer",
    }
    training = _training_summary(
        data,
        len(y),
        {c: int(np.sum(y == k)) for k, c in enumerate(CHANNELS)},
        "channel answered most in the next 30 days, among customers who answered",
        f"LightGBM {lightgbm.__version__} multiclass gradient-boosted trees ({_trees_text(estimator)}); "
        "send hour from best_hour",
    )
    return _finish(
        model,
        name="next_best_channel",
        description="Next best channel (email, sms, push, in-app: one probability each) and the best local hour to send.",
        features=NBC_FEATURES,
        outputs=outputs,
        training=training,
        quality=quality,
        test_row=X_test[0],
    )


# --- behavioural clusters ------------------------------------------------------------------------------


def clusters(data: Data) -> Built:
    """k-means on the training population's behaviour at the cut-off (`clusters`), judged on the held-out one."""
    spec = _spec_for(clustering.NAME, CLUSTER_FEATURES, clustering.OUTPUTS)
    X = matrix(spec, data.train_fields.at_cutoff, data.train.cutoff)
    X_test = matrix(spec, data.test_fields.at_cutoff, data.test.cutoff)
    names = [f["name"] for f in CLUSTER_FEATURES]
    fitted = clustering.fit(X, names, k=clustering.DEFAULT_K, seed=data.seed)
    model = clustering.graph(fitted, input_name=INPUT)
    quality = clustering.quality(fitted, model, X_test, seed=data.seed)
    training = _training_summary(
        data,
        len(X),
        0,
        "none (unsupervised)",
        f"k-means (k={fitted.k}, k-means++ starts, Lloyd's iterations) on log(1 + x), standardised",
    )
    training["data"] = "simulated customers (cdp_training.simulator); features computed by the profile domain"
    training.pop("positives", None)
    training["clustering"] = clustering.record(fitted)
    training["clusters"] = clustering.describe(fitted, X)
    return _finish(
        model,
        name=clustering.NAME,
        description=clustering.DESCRIPTION,
        features=CLUSTER_FEATURES,
        outputs=clustering.OUTPUTS,
        training=training,
        quality=quality,
        test_row=X_test[0],
    )


BUILDERS: Sequence[Callable[[Data], Built]] = (
    churn_risk,
    purchase_propensity,
    clv,
    fraud_risk,
    fraud_anomaly,
    next_best_channel,
    clusters,
)
