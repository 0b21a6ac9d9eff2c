"""Quality figures reported for the shipped models."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import brier_score_loss, precision_recall_curve, roc_auc_score


def auc(y: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(y, score))


def brier(y: np.ndarray, p: np.ndarray) -> float:
    return float(brier_score_loss(y, p))


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Σ over equal-width probability bins of (share of rows) x |mean predicted - observed rate|."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    index = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = index == b
        if in_bin.any():
            total += in_bin.mean() * abs(p[in_bin].mean() - y[in_bin].mean())
    return float(total)


def precision_at_recall(y: np.ndarray, score: np.ndarray, recall: float) -> tuple[float, float]:
    """The best precision among thresholds that reach `recall`, and that threshold."""
    precision, achieved, thresholds = precision_recall_curve(y, score)
    # the last point (recall 0, precision 1) has no threshold
    ok = achieved[:-1] >= recall
    best = int(np.argmax(np.where(ok, precision[:-1], -1.0)))
    return float(precision[best]), float(thresholds[best])


def binary_report(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return {
        "auc": round(auc(y, p), 4),
        "brier": round(brier(y, p), 4),
        "ece_10_bins": round(expected_calibration_error(y, p), 4),
        "base_rate": round(float(np.mean(y)), 4),
        "mean_prediction": round(float(np.mean(p)), 4),
    }


def hour_accuracy(predicted: np.ndarray, actual: np.ndarray, within: int = 1) -> float:
    """Share of predictions within `within` hours of the actual hour, on the 24-hour circle."""
    gap = np.abs(np.asarray(predicted, dtype=np.int64) - np.asarray(actual, dtype=np.int64)) % 24
    return float(np.mean(np.minimum(gap, 24 - gap) <= within))
