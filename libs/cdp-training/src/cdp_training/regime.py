"""A regime change and what retraining on the platform's own data does about it (the figure in bench-models).

One simulated population lives through a change of behaviour half-way through its span
(`simulator.RegimeShift`: app users start to leave, web shoppers stay). Its events go into a profile store
as the profile service writes them, and churn models are trained from that store by the training run
itself (`learn.train_run`, point in time):

- **frozen**: trained before the change (cut-off two label windows before it), then kept. Its AUC on the
  slice after the change, and on the same slice of the twin population in which nothing changed (the same
  seed without the shift: the same people, the same events up to the change; the shift draws from a
  generator of its own): same model, same persons, same cut-off, only the behaviour differs, so the
  difference is what the change cost it;
- **retrained**: the platform's own run at a cut-off after the change, with the frozen model as live: its
  AUC on the slice after the change (the same rows the frozen model is judged on);
- **drift**: one check of scoring's drift monitor on the frozen version (its training reference, the rows
  scored at the judging cut-off), after the change and where nothing changed;
- **new regime directly**: the same run on a second population that always lived in the new regime
  (another seed), scored on the first population's slice after the change: the best a model of these
  features could do there.

The change is at the middle of the simulated span [start, end]; with the default 540-day history and the
90-day churn window the frozen model is trained at change - 180 d, the retrained one at cutoff - 90 d
(135 days after the change) and every model is judged at the simulation's cutoff, whose labels are the
last 90 days.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np

from cdp_kit.storage import MemoryStore
from cdp_scoring.domain.registry import LIVE, Version
from cdp_scoring.drift import DRIFTED, DriftMonitor
from cdp_training import learn, metrics
from cdp_training.labels import LabelSpec
from cdp_training.platformdata import write_population
from cdp_training.pointintime import StoredProfile, read_profiles, training_set
from cdp_training.simulator import CHURN_DAYS, DAY, Population, RegimeShift, simulate
from cdp_training.traits import COMPUTED_TRAITS

MODEL = "churn_risk"
WINDOW = CHURN_DAYS * DAY


@dataclass(slots=True)
class RegimeFigures:
    frozen_before: float  # the frozen model on the twin population where nothing changed, at the same cut-off
    frozen_after: float  # ... on the population that changed
    retrained: float  # the run on the platform's data after the change, on that slice
    new_regime: float  # a model trained on a population always in the new regime, on that slice
    params: dict[str, Any]

    @property
    def recovered(self) -> bool:
        """Retraining comes within 0.02 AUC of the model trained on the new regime directly."""
        return self.retrained >= self.new_regime - 0.02


def _profiles(population: Population) -> list[StoredProfile]:
    async def build() -> list[StoredProfile]:
        store = MemoryStore()
        await write_population(store, population, list(COMPUTED_TRAITS.values()))
        return await read_profiles(store)

    return asyncio.run(build())


def _drift(live: learn.LiveModel, X: np.ndarray, at: float) -> dict[str, Any]:
    """One scheduled drift check of the frozen version (scoring's DriftMonitor, its training reference)
    over the rows scored at `at`: drifted or not, the score's PSI and the three most moved features."""
    version = Version(live.spec, LIVE, "", 0, at)

    def score(rows: np.ndarray) -> np.ndarray:
        scores = live.scores(rows)
        return np.stack([np.asarray(scores[s]) for s in live.spec.score_names], axis=1)

    # as the service does: the version's own scoring for the comparison against its aged reference
    monitor = DriftMonitor(min_rows=min(500, len(X)), clock=lambda: at, rescorer=lambda _version: score)
    monitor.observe(version, X, score(X))
    [report] = monitor.check([version])
    features = sorted((v for v in report.values if v[1] == "feature"), key=lambda v: -v[2])[:3]
    return {
        "drifted": report.status == DRIFTED,
        "threshold": report.threshold,
        "score_psi": round(next(v[2] for v in report.values if v[1] == "score"), 4),
        "most_moved_features": {name: round(value, 4) for name, _kind, value in features},
        "compared_aged": report.aged,
    }


def experiment(
    persons: int, *, seed: int = 31, app_factor: float = 4.0, web_factor: float = 0.4, log=print
) -> RegimeFigures:
    quiet = lambda _message: None  # noqa: E731
    probe = simulate(1, seed)
    change = (probe.start + probe.end) / 2
    shift = RegimeShift(change, app_factor=app_factor, web_factor=web_factor)
    shifted = simulate(persons, seed, regime=shift)
    always = simulate(persons, seed + 1000, regime=RegimeShift(-np.inf, app_factor, web_factor))
    profiles = _profiles(shifted)
    log(f"simulated {persons:,} persons with a regime change at day {(change - shifted.start) / DAY:.0f}")
    end = shifted.end
    frozen_at = change - 2 * WINDOW
    retrain_at = shifted.cutoff - WINDOW

    frozen = learn.train_run(MODEL, profiles, cutoff=frozen_at, evaluate_at=frozen_at + WINDOW, until=end, log=quiet)
    live = learn.live_from_onnx(frozen.built.data)
    retrained = learn.train_run(
        MODEL, profiles, cutoff=retrain_at, evaluate_at=shifted.cutoff, live=live, until=end, log=quiet
    )
    log("trained the frozen and the retrained model")
    direct = learn.train_run(
        MODEL, _profiles(always), cutoff=retrain_at, evaluate_at=shifted.cutoff, until=always.end, log=quiet
    )
    # the model trained on the new regime directly, on the retrained run's evaluation rows
    rows = retrained.evaluation
    oracle = learn.live_from_onnx(direct.built.data).scores(rows.X)[MODEL]
    new_regime = metrics.auc(rows.y[:, 0].astype(int), np.asarray(oracle, dtype=np.float64))
    # the frozen model where nothing changed: the same persons without the shift, the same cut-off
    twin = simulate(persons, seed)
    unchanged = training_set(
        _profiles(twin),
        spec=live.spec,
        label=LabelSpec.from_dict(rows.label.to_dict()),
        cutoff=twin.cutoff,
        until=twin.end,
    )
    frozen_unchanged = metrics.auc(
        unchanged.y[:, 0].astype(int), np.asarray(live.scores(unchanged.X)[MODEL], dtype=np.float64)
    )
    drift = {
        "after_the_change": _drift(live, rows.X, shifted.cutoff),
        "where_nothing_changed": _drift(live, unchanged.X, twin.cutoff),
    }
    figures = RegimeFigures(
        frozen_before=round(float(frozen_unchanged), 4),
        frozen_after=float(retrained.record["quality"]["live_on_holdout"]["auc"]),
        retrained=float(retrained.record["quality"]["auc"]),
        new_regime=round(float(new_regime), 4),
        params={
            "persons": persons,
            "seed": seed,
            "change_day": round((change - shifted.start) / DAY, 1),
            "shift": {"app_user_dropout_hazard_x": app_factor, "others_x": web_factor},
            "frozen_trained_at_day": round((frozen_at - shifted.start) / DAY, 1),
            "retrained_at_day": round((retrain_at - shifted.start) / DAY, 1),
            "judged_at_day": round((shifted.cutoff - shifted.start) / DAY, 1),
            "evaluation_rows": rows.rows,
            "evaluation_churn_rate": round(float(rows.y[:, 0].mean()), 4),
            "retrained_decision": retrained.decision["reason"],
            "frozen_auc_on_its_own_slice_before_the_change": float(frozen.record["quality"]["auc"]),
            "frozen_training_rows": frozen.train.rows,
            "retrained_training_rows": retrained.train.rows,
            "churn_rate_without_the_change": round(float(unchanged.y[:, 0].mean()), 4),
            "frozen_drift_check": drift,
        },
    )
    return figures
