"""Realised quality: how well a deployed version does on the latest customers whose outcome is known.

Labels arrive late: a churn label is known only once its window has closed (the shipped churn_risk's 90
days after the cut-off: a month of grace, then 60 days without activity), a fraud label once the
chargeback or the case closed as fraud is on the timeline. So the figures are taken at the latest
cut-off T whose window the store has fully observed, T = last event - horizon (the label's after +
window; to the second, not a midnight: a label that arrived just now, the last event there is, is inside
the window): the rows are the point-in-time set at T (`pointintime.training_set`, the features as they
were known at T, assembled by the version's own spec), scored by the version's own ONNX file, and
labelled by what happened in (T + after, T + after + window] with the label definition of the version's
spec (`training.label`; the shipped models, whose `training.label` is prose, use their trainable default,
`learn.TRAINABLE`, the label they were trained on).

Binary labels give AUC, Brier score, expected calibration error and the reliability bins (ten equal
widths of the predicted probability: rows, mean predicted, observed rate); channel labels give top-1
accuracy. Each figure sits beside the version's training figures where the API shows them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cdp_kit.errors import FailedPrecondition
from cdp_training import metrics
from cdp_training.labels import CHANNEL_ANSWERED, LabelSpec
from cdp_training.learn import iso, label_for
from cdp_training.pointintime import StoredProfile, observed_until, training_set

BINS = 10


def reliability(y: np.ndarray, p: np.ndarray, bins: int = BINS) -> list[dict[str, Any]]:
    """Equal-width bins of the predicted probability: rows, mean predicted and observed rate in each."""
    index = np.minimum((np.clip(p, 0, 1) * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        row: dict[str, Any] = {"from": b / bins, "to": (b + 1) / bins, "rows": count}
        if count:
            row["mean_predicted"] = round(float(p[members].mean()), 4)
            row["observed_rate"] = round(float(y[members].mean()), 4)
        out.append(row)
    return out


def realised_quality(
    profiles: Sequence[StoredProfile],
    onnx: bytes,
    *,
    label: Mapping[str, Any] | None = None,
    cutoff: float | None = None,
    until: float | None = None,
) -> dict[str, Any]:
    """The version in `onnx` judged on the latest closed label window (see the module docstring)."""
    from cdp_scoring.runtime import load_model

    loaded = load_model(onnx)
    spec = loaded.spec
    label_spec = LabelSpec.from_dict(label if label is not None else label_for(spec.name, spec))
    end = observed_until(profiles) if until is None else until
    if cutoff is None:
        if not np.isfinite(end):
            raise FailedPrecondition("the profile store holds no events to judge on", reason="no_data")
        cutoff = float(end - label_spec.horizon)
    rows = training_set(profiles, spec=spec, label=label_spec, cutoff=cutoff, until=end)
    out: dict[str, Any] = {
        "version": spec.version,
        "label": label_spec.to_dict(),
        "cutoff": iso(cutoff),
        "label_from": iso(cutoff + label_spec.after),
        "label_until": iso(cutoff + label_spec.horizon),
        "rows": rows.rows,
    }
    if rows.rows == 0:
        out["status"] = "no rows: nobody was seen by the cut-off"
        return out
    scores = loaded.run(rows.X)
    y = rows.y[:, 0].astype(int)
    if label_spec.kind == CHANNEL_ANSWERED:
        columns = sorted(
            ((j, o) for j, o in enumerate(spec.outputs) if o.output == "probabilities"), key=lambda item: item[1].index
        )
        predicted = np.stack([scores[:, j] for j, _ in columns], axis=1).argmax(axis=1)
        out["top1_accuracy"] = round(float(np.mean(predicted == y)), 4)
        out["class_shares"] = {o.score: round(float(np.mean(y == o.index)), 4) for _, o in columns}
        out["status"] = "ok"
        return out
    p = np.asarray(scores[:, 0], dtype=np.float64)
    out["positives"] = int(y.sum())
    out["base_rate"] = round(float(y.mean()), 4)
    out["mean_prediction"] = round(float(p.mean()), 4)
    out["brier"] = round(metrics.brier(y, p), 4)
    out["ece_10_bins"] = round(metrics.expected_calibration_error(y, p), 4)
    out["reliability"] = reliability(y, p)
    if 0 < y.sum() < len(y):
        out["auc"] = round(metrics.auc(y, p), 4)
        out["status"] = "ok"
    else:
        out["status"] = "one label value only: no AUC"
    return out
