"""A training run on the platform's own customers: train at a cut-off, judge on a later slice, register in
shadow, promote only on evidence.

    python -m cdp_training train churn_risk --store sqlite:///.cdp/data/profile.db --cutoff 2025-03-01
    cdpctl models train churn_risk --cutoff 2025-03-01        (the same run, registered on the running platform)

1. The training set is `pointintime.training_set` at the cut-off T, with the features of the live version
   (so the candidate is a drop-in for it) and the label of the model's spec (`TRAINABLE`, or `--label`).
2. The evaluation set is the same at a later cut-off E >= T + after + window (the label's horizon; default
   exactly that): its features start where the training labels end, its labels are later still, so no
   training row saw the slice.
3. The candidate (LightGBM, the shipped models' settings) and the live version are both scored on E's
   rows, each through its own spec's assembler from the same profile fields. The candidate is promoted
   only when it beats live by at least `margin` (AUC for binary labels, top-1 accuracy for
   channel_answered; stated in the decision); otherwise it stays in shadow and the decision says why.
   No live version: the candidate is the model's first version.
4. The version carries everything needed to answer for it in its spec: `training` holds the label, the
   training and evaluation windows, row and label counts, both data hashes, the feature importances
   (share of split gain) and the promotion decision; `quality` the evaluation figures and live's.

The version name is `t<cut-off date>-<hash of the data hash and seed, 10 digits>`: the same data trains the
same bytes under the same name (LightGBM runs deterministic on one thread), so running twice deploys
nothing new.

Trained here: binary labels (no_activity, goal_event, label_event: churn, propensity, fraud) and
channel_answered (next best channel: multiclass trees, plus the send-hour output when the spec has one, its
fallback the most common best_hour of the training rows). orders_and_value sets can be built
(`pointintime`); the CLV run (BG/NBD from the store's orders) is not written yet.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import lightgbm
import numpy as np

from cdp_kit.durations import format_duration
from cdp_kit.errors import FailedPrecondition, InvalidArgument
from cdp_scoring.domain import ModelSpec
from cdp_scoring.drift import build_reference, clock_features
from cdp_scoring.schedule import parse_time as parse_time  # where callers have read it
from cdp_training import feedback, metrics
from cdp_training.graphs import run, score_columns
from cdp_training.labels import BINARY_KINDS, CHANNEL_ANSWERED, LabelSpec
from cdp_training.models import (
    NBC_TREES,
    OWNER,
    Built,
    _finish,
    _lightgbm,
    _lightgbm_onnx,
    population_row,
    with_send_hour,
)
from cdp_training.pointintime import StoredProfile, TrainingSet, observed_until, training_set
from cdp_training.simulator import CHANNELS, CHURN_DAYS, LAPSE_GRACE_DAYS
from cdp_training.traits import ENGAGEMENT_FEATURES, FRAUD_FEATURES, NBC_FEATURES, traits_for

DEFAULT_MARGIN = 0.005  # points of the metric (AUC; top-1 accuracy for channels) to gain over live


@dataclass(frozen=True, slots=True)
class Trainable:
    """A model the platform can retrain on its own data: default features and outputs (used when it has
    no live version), its label (data)."""

    features: Sequence[Mapping[str, Any]]
    outputs: Sequence[Mapping[str, Any]]
    description: str
    label: Mapping[str, Any]


def _probability(score: str, meaning: str) -> list[dict[str, Any]]:
    return [{"score": score, "output": "probabilities", "index": 1, "meaning": meaning}]


# What a person answers (`feedback.ANSWERS`): the Segment response events and orchestration's answers to
# the messages it sent, the channel in `channel` under orchestration's names or the classes' own.
ANSWERS = feedback.ANSWERS


_LAPSE_WINDOW = CHURN_DAYS - LAPSE_GRACE_DAYS

TRAINABLE: dict[str, Trainable] = {
    # The shipped model's target (models.churn_risk: `Outcomes.lapsed`): lapsed a month on, no event of any
    # kind in (T + 30d, T + 90d], so a model retrained here predicts what the shipped one does.
    "churn_risk": Trainable(
        ENGAGEMENT_FEATURES,
        _probability("churn_risk", f"P(no activity in the {_LAPSE_WINDOW} days after the next {LAPSE_GRACE_DAYS})"),
        "Churn risk, trained on this platform's customers: the probability that the customer has lapsed a month "
        f"from now - no activity at all in the {_LAPSE_WINDOW} days after the next {LAPSE_GRACE_DAYS}.",
        {"kind": "no_activity", "after": f"{LAPSE_GRACE_DAYS}d", "window": f"{_LAPSE_WINDOW}d"},
    ),
    "purchase_propensity": Trainable(
        ENGAGEMENT_FEATURES,
        _probability("purchase_propensity", "P(an order in the next 30 days)"),
        "Purchase propensity, trained on this platform's customers: P(an order in the next 30 days).",
        {"kind": "goal_event", "window": "30d", "events": [{"name": "Order Completed"}]},
    ),
    "fraud_risk": Trainable(
        FRAUD_FEATURES,
        _probability("fraud_risk", "P(a chargeback or a case closed as fraud in the next 90 days)"),
        "Fraud risk, trained on this platform's customers: a chargeback or a CRM case closed as fraud.",
        {
            "kind": "label_event",
            "window": "90d",
            "events": [{"name": "Chargeback"}, {"name": "CRM Ticket Closed", "where": {"resolution": "fraud"}}],
        },
    ),
    "next_best_channel": Trainable(
        NBC_FEATURES,
        [
            *(
                {"score": f"nbc_{c}", "output": "probabilities", "index": k, "meaning": f"P({c} is answered most)"}
                for k, c in enumerate(CHANNELS)
            ),
            {"score": "best_send_hour", "output": "send_hour", "index": 0, "meaning": "local hour most answered at"},
        ],
        "Next best channel, trained on this platform's customers: the channel answered most in the next 30 days.",
        {
            "kind": "channel_answered",
            "window": "30d",
            "events": ANSWERS,
            "property": "channel",
            "classes": list(CHANNELS),
            "aliases": dict(feedback.CHANNEL_ALIASES),
        },
    ),
}


@dataclass(slots=True)
class LiveModel:
    """The version a candidate must beat: its spec, and its scores (by name) for rows assembled by that spec."""

    version: str
    spec: ModelSpec
    scores: Callable[[np.ndarray], Mapping[str, np.ndarray]]


class ModelRegistry(Protocol):
    """Where versions are registered: the scoring service (DeployModel / Promote), or a fake in tests."""

    async def live(self, name: str) -> LiveModel | None: ...
    async def deploy(self, data: bytes, role: str) -> None: ...
    async def promote(self, name: str, version: str) -> None: ...


def live_from_onnx(data: bytes) -> LiveModel:
    """A live version read from its ONNX file (the API-less run compares against a file)."""
    from cdp_scoring.runtime import load_model

    loaded = load_model(data)
    names = [o.score for o in loaded.spec.outputs]

    def scores(rows: np.ndarray) -> dict[str, np.ndarray]:
        values = loaded.run(rows)
        return {name: values[:, j] for j, name in enumerate(names)}

    return LiveModel(loaded.spec.version, loaded.spec, scores)


@dataclass(slots=True)
class RunResult:
    built: Built
    decision: dict[str, Any]
    train: TrainingSet
    evaluation: TrainingSet
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.built.spec.version


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


def _template(name: str, trainable: Trainable | None, live: LiveModel | None) -> dict[str, Any]:
    if live is not None:
        spec = live.spec.to_dict()
        return {k: spec[k] for k in ("features", "outputs", "computed_traits")} | {
            "description": trainable.description if trainable else spec.get("description", "")
        }
    if trainable is None:
        raise InvalidArgument(
            "model", f"{name!r} has no live version and no default features: known: {', '.join(TRAINABLE)}"
        )
    outputs = [dict(o) for o in trainable.outputs]
    features = [dict(f) for f in trainable.features]
    return {
        "features": features,
        "outputs": outputs,
        "computed_traits": traits_for(features),
        "description": trainable.description,
    }


def _importances(estimator: lightgbm.LGBMClassifier, names: Sequence[str]) -> dict[str, float]:
    gain = estimator.booster_.feature_importance(importance_type="gain")
    total = float(gain.sum()) or 1.0
    ranked = sorted(zip(names, gain, strict=True), key=lambda item: -item[1])
    return {name: round(float(value) / total, 4) for name, value in ranked}


def decide(
    metric: str, candidate: float, live: float | None, live_version: str | None, margin: float
) -> dict[str, Any]:
    """Promote only when the candidate beats live by `margin` on the evaluation slice; say why either way."""
    decision: dict[str, Any] = {"metric": metric, "margin": margin, "candidate": round(candidate, 4)}
    if live is None:
        decision.update(promote=True, reason="no live version: the candidate is the model's first version")
        return decision
    decision.update(live=round(live, 4), live_version=live_version)
    gain = candidate - live
    decision["gain"] = round(gain, 4)
    if gain >= margin:
        decision.update(
            promote=True,
            reason=f"{metric} {candidate:.4f} beats live {live_version}'s {live:.4f} by {gain:.4f} >= {margin}",
        )
    else:
        decision.update(
            promote=False,
            reason=f"{metric} {candidate:.4f} does not beat live {live_version}'s {live:.4f} by the margin {margin} "
            f"(gain {gain:+.4f}): stays in shadow",
        )
    return decision


def _check_observed(
    profiles: Sequence[StoredProfile],
    label: LabelSpec,
    cutoff: float,
    evaluate_at: float,
    given_evaluate_at: bool,
    until: float | None,
) -> None:
    """Refuse, in the terms the run was asked in, a run whose training labels or evaluation slice's labels
    close after the last event the store holds. (training_set checks each slice's own cut-off: for the
    evaluation slice that is cutoff + the label window, a time nobody gave, and its figure read as if about
    the cutoff given.)"""
    end = observed_until(profiles) if until is None else until
    if not math.isfinite(end) or evaluate_at + label.horizon <= end:
        return  # no events at all: training_set says so
    window = format_duration(label.horizon)
    if given_evaluate_at:
        raise InvalidArgument(
            "evaluate_at",
            f"{iso(evaluate_at)}: its labels (a label window closing {window} after a cut-off) close at "
            f"{iso(evaluate_at + label.horizon)}, after the last event the store holds ({iso(end)}); the latest "
            f"evaluate_at that works now is {iso(end - label.horizon)}, with a cutoff at least {window} before it",
        )
    raise InvalidArgument(
        "cutoff",
        f"{iso(cutoff)}, with a label window closing {window} after a cut-off: the training labels close at "
        f"{iso(cutoff + label.horizon)} and the evaluation slice (at cutoff + {window}) needs its own labels, "
        f"closing at {iso(evaluate_at + label.horizon)}, after the last event the store holds ({iso(end)}); "
        f"the latest cutoff that works now is {iso(end - 2 * label.horizon)} (the last event less two label windows), "
        "or give no cutoff: the latest UTC midnight that works",
    )


def train_run(
    name: str,
    profiles: Sequence[StoredProfile],
    *,
    cutoff: float,
    evaluate_at: float | None = None,
    label: Mapping[str, Any] | None = None,
    live: LiveModel | None = None,
    margin: float = DEFAULT_MARGIN,
    until: float | None = None,
    seed: int = 7,
    log: Callable[[str], None] = print,
    progress: Callable[[str, int], None] | None = None,
) -> RunResult:
    """Train `name` at `cutoff`, judge it and live on the slice at `evaluate_at` (see the module docstring).

    `progress(phase, rows)` is told when each phase ends: training_set, evaluation_set, fitting."""
    step = progress or (lambda phase, rows: None)
    trainable = TRAINABLE.get(name)
    if label is None:
        if trainable is None:
            raise InvalidArgument("label", f"model {name!r} has no default label: give one")
        label = trainable.label
    spec_label = LabelSpec.from_dict(label)
    if spec_label.kind not in BINARY_KINDS and spec_label.kind != CHANNEL_ANSWERED:
        raise InvalidArgument("label.kind", f"training runs for {spec_label.kind} labels are not built yet")
    if not math.isfinite(margin) or margin < 0:
        raise InvalidArgument("margin", f"{margin!r} must be a number of AUC points >= 0")
    given_evaluate_at = evaluate_at is not None
    if evaluate_at is None:
        evaluate_at = cutoff + spec_label.horizon
    if evaluate_at < cutoff + spec_label.horizon:
        raise InvalidArgument(
            "evaluate_at",
            f"must be at least the end of the label window ({format_duration(spec_label.horizon)}) after the cut-off, "
            "or the evaluation slice would share labels with the training rows",
        )
    _check_observed(profiles, spec_label, cutoff, evaluate_at, given_evaluate_at, until)
    template = _template(name, trainable, live)
    draft = ModelSpec.from_dict({"name": name, "version": "draft", **template})
    train = training_set(profiles, spec=draft, label=spec_label, cutoff=cutoff, until=until)
    log(f"training set at {iso(cutoff)}: {train.rows} rows, label counts {train.summary().get('label_counts')}")
    step("training_set", train.rows)
    evaluation = training_set(profiles, spec=draft, label=spec_label, cutoff=evaluate_at, until=until)
    log(f"evaluation slice at {iso(evaluate_at)}: {evaluation.rows} rows")
    step("evaluation_set", evaluation.rows)
    classes = len(spec_label.classes) or 2
    for where, data in (("cutoff", train), ("evaluate_at", evaluation)):
        if data.rows == 0 or len(np.unique(data.y[:, 0])) < classes:
            raise FailedPrecondition(
                f"{where}: the rows at {iso(data.cutoff)} ({data.rows}) do not hold every label value "
                f"({classes}); choose another cut-off or a longer history",
                reason="missing_class",
            )
    y = train.y[:, 0].astype(int)
    y_eval = evaluation.y[:, 0].astype(int)
    fit = _fit_channels if spec_label.kind == CHANNEL_ANSWERED else _fit_binary
    model, estimator, quality, metric = fit(draft, train.X, y, evaluation.X, y_eval, seed)
    names = [f.name for f in draft.features]
    # What drift is measured against (cdp_scoring.drift): the training rows' features and their scores.
    # Taken at the cut-off, with the features that move with the clock named (compared aged later on).
    reference = build_reference(
        names,
        train.X,
        score_columns(draft, run(model, train.X)),
        aged=clock_features(draft),
        taken_at=train.cutoff,
    )
    step("fitting", train.rows)
    live_value = None
    if live is not None:
        live_rows = evaluation.X if live.spec.features == draft.features else _rows_for(live.spec, evaluation)
        live_scores = live.scores(live_rows)
        quality["live_on_holdout"] = {"version": live.version, **_judge(spec_label, live.spec, live_scores, y_eval)}
        live_value = quality["live_on_holdout"][metric]
    decision = decide(metric, quality[metric], live_value, live.version if live else None, margin)
    log(f"candidate {metric} {quality[metric]:.4f}" + (f", live {live_value:.4f}" if live_value is not None else ""))
    fit = hashlib.sha256(f"{train.data_hash} seed={seed}".encode()).hexdigest()
    version = f"t{datetime.fromtimestamp(cutoff, UTC):%Y%m%d}-{fit[:10]}"
    training = {
        "algorithm": f"LightGBM {lightgbm.__version__} gradient-boosted trees",
        "data": "this platform's profile store, point in time (cdp_training.pointintime)",
        "label": spec_label.to_dict(),
        "window": {
            "history_until": iso(cutoff),
            "label_from": iso(cutoff + spec_label.after),
            "label_until": iso(cutoff + spec_label.horizon),
        },
        "evaluation_window": {
            "history_until": iso(evaluate_at),
            "label_until": iso(evaluate_at + spec_label.horizon),
        },
        "rows": train.rows,
        "positives": train.summary().get("label_counts"),
        "skipped": {
            "not_yet_seen": train.skipped_unborn,
            "unlabelled": train.skipped_unlabelled,
            "truncated": train.skipped_truncated,  # retention cut the timeline after T or past its base: undercounted
        },
        "evaluation_rows": evaluation.rows,
        "evaluation_positives": evaluation.summary().get("label_counts"),
        "data_hash": train.data_hash,
        "evaluation_data_hash": evaluation.data_hash,
        "feature_importances": _importances(estimator, names),
        "promotion": decision,
        "seed": seed,
        "reference": reference,
    }
    built = _finish(
        model,
        name=name,
        description=template["description"],
        features=[f.to_dict() for f in draft.features],
        outputs=[o.to_dict() for o in draft.outputs],
        training=training,
        quality=quality,
        test_row=population_row(train.X),  # no customer's own row: it stays with the model for good
        version=version,
        computed_traits=list(draft.computed_traits),
    )
    record = {"model": name, "version": version, "owner": OWNER, "training": training, "quality": quality}
    return RunResult(built, decision, train, evaluation, record)


def _fit_binary(spec: ModelSpec, X: np.ndarray, y: np.ndarray, X_eval: np.ndarray, y_eval: np.ndarray, seed: int):
    estimator = _lightgbm(X, y, seed)
    model = _lightgbm_onnx(estimator, X.shape[1])
    quality: dict[str, Any] = _judge_binary(spec, score_columns(spec, run(model, X_eval)), y_eval)
    quality["holdout_rows"] = len(y_eval)
    return model, estimator, quality, "auc"


def _judge_binary(spec: ModelSpec, scores: Mapping[str, np.ndarray], y: np.ndarray) -> dict[str, Any]:
    p = np.asarray(scores[spec.outputs[0].score], dtype=np.float64)
    report = metrics.binary_report(y, p)
    return {"auc": report["auc"], "holdout": report}


def _fit_channels(spec: ModelSpec, X: np.ndarray, y: np.ndarray, X_eval: np.ndarray, y_eval: np.ndarray, seed: int):
    """Multiclass trees as the shipped model has them; a `send_hour` output, when the spec has one, is the
    row's best_hour or, unknown, the most common best_hour among the training rows."""
    estimator = _lightgbm(X, y, seed, "multiclass", **NBC_TREES)
    model = _lightgbm_onnx(estimator, X.shape[1])
    if any(o.output == "send_hour" for o in spec.outputs):
        names = [f.name for f in spec.features]
        if "best_hour" not in names:
            raise InvalidArgument("features", "a send_hour output reads the feature best_hour, which is missing")
        column = names.index("best_hour")
        known = X[:, column][X[:, column] >= 0].astype(int)
        fallback = int(np.bincount(known, minlength=24).argmax()) if known.size else 12
        model = with_send_hour(model, column, fallback)
    quality = _judge_channels(spec, score_columns(spec, run(model, X_eval)), y_eval)
    quality["holdout_rows"] = len(y_eval)
    return model, estimator, quality, "top1_accuracy"


def _judge_channels(spec: ModelSpec, scores: Mapping[str, np.ndarray], y: np.ndarray) -> dict[str, Any]:
    """Top-1 accuracy: class k is the spec's `probabilities` output with index k."""
    columns = sorted((o for o in spec.outputs if o.output == "probabilities"), key=lambda o: o.index)
    probabilities = np.stack([np.asarray(scores[o.score], dtype=np.float64) for o in columns], axis=1)
    predicted = probabilities.argmax(axis=1)
    return {
        "top1_accuracy": round(float(np.mean(predicted == y)), 4),
        "holdout_class_shares": {o.score: round(float(np.mean(y == o.index)), 4) for o in columns},
    }


def _judge(label: LabelSpec, spec: ModelSpec, scores: Mapping[str, np.ndarray], y: np.ndarray) -> dict[str, Any]:
    return _judge_channels(spec, scores, y) if label.kind == CHANNEL_ANSWERED else _judge_binary(spec, scores, y)


def _rows_for(spec: ModelSpec, data: TrainingSet) -> np.ndarray:
    from cdp_scoring.domain import FeatureAssembler

    missing = [f.path for f in spec.features if f.root == "computed" and f.path.split(".", 1)[1] not in _traits(data)]
    if missing:
        raise FailedPrecondition(
            f"the live version reads computed traits the candidate's set does not compute: {', '.join(missing)}",
            reason="live_features_differ",
        )
    return FeatureAssembler(spec).matrix(data.fields, data.cutoff)


def _traits(data: TrainingSet) -> set[str]:
    return {t["name"] for t in data.spec.computed_traits}


async def register(registry: ModelRegistry, result: RunResult, *, had_live: bool) -> str:
    """Deploy the candidate in shadow beside live and promote it when the decision says so; the role it
    ends in. A model with no live version gets the candidate as its first, live, version."""
    spec = result.built.spec
    if not had_live:
        await registry.deploy(result.built.data, "live")
        return "live"
    await registry.deploy(result.built.data, "shadow")
    if result.decision["promote"]:
        await registry.promote(spec.name, spec.version)
        return "live"
    return "shadow"


def default_cutoff(profiles: Sequence[StoredProfile], label: Mapping[str, Any], until: float | None = None) -> float:
    """The latest cut-off (a UTC midnight) whose label window and evaluation slice (one more horizon: after
    + window) the store has observed: what a run without a cut-off trains on."""
    horizon = LabelSpec.from_dict(label).horizon
    end = observed_until(profiles) if until is None else until
    if not math.isfinite(end):
        raise FailedPrecondition("the profile store holds no events to train on", reason="no_data")
    latest = end - 2 * horizon
    return float(latest - latest % 86_400)


def label_for(name: str, spec: ModelSpec | None = None) -> dict[str, Any]:
    """The label a model is trained and judged with: its version's own (`training.label`), else the
    default of a trainable model."""
    own = spec.training.get("label") if spec is not None else None
    if isinstance(own, Mapping) and "kind" in own:
        return dict(own)
    trainable = TRAINABLE.get(name)
    if trainable is None:
        raise FailedPrecondition(
            f"model {name!r} has no label definition: give one (known defaults: {', '.join(TRAINABLE)})",
            reason="no_label",
        )
    return dict(trainable.label)


async def read_store(store_url: str) -> list[StoredProfile]:
    """Every live profile in the profile service's store at `store_url` (read only)."""
    from cdp_kit.storage import open_store
    from cdp_training.pointintime import read_profiles

    async with open_store(store_url) as store:
        return await read_profiles(store)


def write_run(result: RunResult, out_dir: Path) -> tuple[Path, Path]:
    """`<model>-<version>.onnx` and its record (`.json`: training, quality, the decision) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{result.built.spec.name}-{result.version}"
    onnx_path, record_path = out_dir / f"{stem}.onnx", out_dir / f"{stem}.json"
    onnx_path.write_bytes(result.built.data)
    record_path.write_text(json.dumps(result.record, indent=2) + "\n")
    return onnx_path, record_path
