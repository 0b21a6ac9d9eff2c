"""Drift: how far the population a model scores now has moved from the one it was trained on.

**Reference.** Each version carries the distribution of its training rows in its spec, under
`training.reference` (written by the training run, `cdp_training.learn`; the shipped models' references
are computed from their training population and kept beside them in `models/reference.json`):

    {"rows": 16000, "features": {"orders_90d": {"edges": [0, 1, 3], "shares": [0, .41, .22, .37, 0]}, ...},
     "scores": {"churn_risk": {"edges": [...], "shares": [...]}}}

`edges` are k increasing cut points (the training values' deciles, repeated ones merged, each moved
half-way down to the next lower training value so that no value sits on a cut), making k + 1
bins [-inf, e0), [e0, e1), ..., [e(k-1), inf), and one more bin for a missing value (NaN); `shares` are
the training rows' shares of those k + 2 bins.

**Live.** The rows the stream path scores (every profile change a model reads, `rounds.py`) are counted
into the same bins, per version: a fixed array of counts per feature and score, to which the rounds'
rows are added a few thousand at a time. Nothing is written per event, and the memory is bounded by the
active versions' bins and the rows waiting to be counted.

**Check.** On a schedule (`CDP_SCORING_DRIFT_CHECK_SECONDS`), each version with at least
`CDP_SCORING_DRIFT_MIN_ROWS` rows counted since its last check gets the population stability index of
each feature and score,

    PSI = sum over bins of (live share - reference share) * ln(live share / reference share),

with shares floored at 1e-4 so an empty bin counts as rare, not impossible. Its counts then start again:
each check describes the rows since the previous one. A version with fewer rows keeps counting until
the next check. Any value above `CDP_SCORING_DRIFT_THRESHOLD` (0.2: the usual "significant shift")
marks the version drifted: an alert goes out on `models.drift` at every check that finds it so, and,
with `CDP_SCORING_DRIFT_RETRAIN`, a training run of the model starts when a live version becomes
drifted (not again at each check it stays so: a run that kept live would run again on the same data).

**Features that move with the clock.** Days since a first time (sign-up, first order: a `days_since`
feature of a computed trait that is the `min` of `$at`) grow a day each day whatever a person does, so
a population that behaves exactly as the training one shows another tenure a year later, and the
version's score, which reads tenure, moves with it. Such a column is also compared against the
reference *aged* by the time since it was taken: the rows' clock features are moved back by the elapsed
days (a value at the feature's default, "unknown", stays), the rows are scored again by the version
itself, and those features and scores are binned as well. A clock feature's or score's value is the
smaller of the two PSIs: the population is either a steady state whose tenure does not move (as taken)
or the training cohort grown older (aged), and both are no drift. A change in behaviour moves the
behavioural features and the score under both comparisons, and a population that is neither (a wave of
new customers, a platform grown far past its training population's age) moves tenure under both.

The reference says which features are aged and when it was taken (`"aged": [...]`, `"taken_at"`:
epoch seconds, written by training runs). A reference without them (the shipped `models/reference.json`,
versions trained before) gets them from its spec: the features found as above, and the training cut-off
(`training.cutoff`, or `training.window.history_until`). Without a time, or without the version's own
session to score with, the comparison is as taken only.

Each replica counts the rows of its own partitions: its figures describe a sample of the population,
and each replica checks (and alerts) on its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from opentelemetry.metrics import Observation

from cdp_scoring.domain.registry import Version

log = logging.getLogger("cdp.scoring.drift")

DEFAULT_BINS = 10
FOLD_ROWS = 4096  # rows kept unbinned per version, at most (about 0.5 MB for 30 features)
AGED_RESCORE_ROWS = 512  # aged rows scored again per fold, about (the rest are binned as features only)
FLOOR = 1e-4
FEATURE, SCORE = "feature", "score"
# Statuses of a version's last check.
OK, DRIFTED, TOO_FEW_ROWS, NO_REFERENCE = "ok", "drifted", "too_few_rows", "no_reference"
SHIPPED_REFERENCES = Path(__file__).resolve().parent / "models" / "reference.json"
DAY = 86_400.0

Rescore = Callable[[np.ndarray], np.ndarray]  # a version's scores of feature rows (LoadedModel.run)


def bins_of(values: np.ndarray, bins: int = DEFAULT_BINS) -> dict[str, list[float]]:
    """The reference bins of one column: quantile cut points of its finite values and the shares."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    edges = np.empty(0)
    if finite.size:
        quantiles = np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1])
        # A cut goes half-way to the next lower value seen, not on a value: a live value computed with
        # another rounding (float32 against float64) must fall in the same bin as in training.
        seen = np.unique(finite)
        below = seen[np.maximum(np.searchsorted(seen, quantiles, side="left") - 1, 0)]
        edges = np.unique(np.where(below < quantiles, (below + quantiles) / 2, quantiles))
    counts = _counts(values, edges)
    total = counts.sum()
    shares = counts / total if total else counts.astype(np.float64)
    return {"edges": [float(e) for e in edges], "shares": [round(float(s), 6) for s in shares]}


def build_reference(
    feature_names: Sequence[str],
    X: np.ndarray,
    scores: Mapping[str, np.ndarray],
    bins: int = DEFAULT_BINS,
    *,
    aged: Sequence[str] = (),
    taken_at: float | None = None,
) -> dict[str, Any]:
    """`training.reference` for a version trained on rows `X` (columns named `feature_names`) whose
    scores on those rows are `scores`, taken at `taken_at` (the rows' cut-off); `aged` names the features
    that move with the clock (`clock_features`)."""
    X = np.asarray(X, dtype=np.float64)
    out: dict[str, Any] = {
        "rows": int(X.shape[0]),
        "bins": bins,
        "features": {name: bins_of(X[:, j], bins) for j, name in enumerate(feature_names)},
        "scores": {name: bins_of(np.asarray(values), bins) for name, values in scores.items()},
    }
    if taken_at is not None:
        out["taken_at"] = float(taken_at)
        out["aged"] = [name for name in feature_names if name in set(aged)]
    return out


def clock_features(spec) -> list[str]:
    """The features of `spec` that move with the clock by construction: days since a first time (a
    computed trait that is the earliest `$at` of its events: sign-up, first order)."""
    firsts = {
        trait["name"]
        for trait in spec.computed_traits
        if trait.get("op") == "min" and trait.get("property", "$at") == "$at"
    }
    return [
        f.name
        for f in spec.features
        if f.transform == "days_since" and f.path.startswith("computed.") and f.path.split(".", 1)[1] in firsts
    ]


def _reference_time(doc: Mapping[str, Any], training: Mapping[str, Any]) -> float | None:
    """When the reference's rows were taken: its own `taken_at`, else the version's training cut-off."""
    if isinstance(doc.get("taken_at"), int | float):
        return float(doc["taken_at"])
    window = training.get("window") if isinstance(training.get("window"), Mapping) else {}
    for text in (training.get("cutoff"), window.get("history_until")):
        if isinstance(text, str):
            try:
                return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def _counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    index = np.searchsorted(edges, values, side="right")
    index[np.isnan(values)] = edges.size + 1
    return np.bincount(index, minlength=edges.size + 2)


def psi(live: np.ndarray, reference: np.ndarray) -> float:
    """Population stability index of live counts (or shares) against reference shares."""
    live = np.asarray(live, dtype=np.float64)
    total = live.sum()
    if total <= 0:
        return 0.0
    actual = np.maximum(live / total, FLOOR)
    expected = np.maximum(np.asarray(reference, dtype=np.float64), FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


@dataclass(slots=True)
class Column:
    name: str
    kind: str  # FEATURE or SCORE
    index: int  # column of the feature matrix, or of the scores
    edges: np.ndarray
    shares: np.ndarray


@dataclass(slots=True)
class Reference:
    rows: int
    columns: list[Column]
    # Column index of each feature that moves with the clock -> its default (a value left as it is).
    aged: dict[int, float | None] = field(default_factory=dict)
    taken_at: float | None = None

    @classmethod
    def from_doc(
        cls,
        doc: Mapping[str, Any],
        features: Sequence[str],
        scores: Sequence[str],
        *,
        spec=None,
    ) -> Reference | None:
        """The reference of a version whose features and scores are named so; None when the document
        does not describe them all (an old or a foreign reference is not compared with). With the
        version's `spec`, a reference that does not say which features are aged and when it was taken
        gets them from the spec (see the module docstring)."""
        try:
            columns = []
            for kind, names, bins in ((FEATURE, features, doc["features"]), (SCORE, scores, doc["scores"])):
                for index, name in enumerate(names):
                    edges = np.asarray(bins[name]["edges"], dtype=np.float64)
                    shares = np.asarray(bins[name]["shares"], dtype=np.float64)
                    if shares.size != edges.size + 2:
                        return None
                    columns.append(Column(name, kind, index, edges, shares))
            reference = cls(int(doc.get("rows", 0)), columns)
        except (KeyError, TypeError, ValueError):
            return None
        training = spec.training if spec is not None and isinstance(spec.training, Mapping) else {}
        reference.taken_at = _reference_time(doc, training)
        names = doc.get("aged")
        if not isinstance(names, list):
            names = clock_features(spec) if spec is not None else []
        defaults = {f.name: f.default for f in spec.features} if spec is not None else {}
        for index, name in enumerate(features):
            if name in names:
                default = defaults.get(name)
                reference.aged[index] = float(default) if isinstance(default, int | float) else None
        return reference

    def age(self, matrix: np.ndarray, now: float) -> np.ndarray | None:
        """`matrix` with its clock features moved back by the days since the reference was taken (None:
        nothing to age)."""
        if not self.aged or self.taken_at is None or now <= self.taken_at:
            return None
        elapsed = (now - self.taken_at) / DAY
        aged = np.array(matrix, dtype=np.float32, copy=True)
        for index, default in self.aged.items():
            column = aged[:, index]
            moved = np.isfinite(column) if default is None else np.isfinite(column) & (column != np.float32(default))
            column[moved] -= elapsed
        return aged


@dataclass(slots=True)
class Window:
    """The live counts of one version since its last check. A round's rows are kept as they are until
    `FOLD_ROWS` of them wait, then counted together: binning costs per call far more than per row, and
    most rounds are a few rows."""

    reference: Reference
    counts: list[np.ndarray]
    rows: int = 0
    since: float = 0.0
    waiting: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    waiting_rows: int = 0
    # The same columns binned against the aged reference (clock features and scores; None elsewhere).
    aged_counts: list[np.ndarray | None] = field(default_factory=list)
    rescore: Rescore | None = None
    clock: Callable[[], float] = time.time

    @classmethod
    def empty(
        cls, reference: Reference, now: float, rescore: Rescore | None = None, clock: Callable[[], float] = time.time
    ) -> Window:
        zeros = [np.zeros(c.edges.size + 2, dtype=np.int64) for c in reference.columns]
        aged: list[np.ndarray | None] = [
            np.zeros(c.edges.size + 2, dtype=np.int64)
            if (c.kind == FEATURE and c.index in reference.aged) or (c.kind == SCORE and rescore is not None)
            else None
            for c in reference.columns
        ]
        if not reference.aged or reference.taken_at is None:
            aged = [None] * len(zeros)
        return cls(reference, zeros, 0, now, aged_counts=aged, rescore=rescore, clock=clock)

    def add(self, matrix: np.ndarray, scores: np.ndarray) -> None:
        self.waiting.append((matrix, np.asarray(scores).reshape(len(matrix), -1)))
        self.waiting_rows += len(matrix)
        self.rows += len(matrix)
        if self.waiting_rows >= FOLD_ROWS:
            self.fold()

    def fold(self) -> None:
        """Count the waiting rows into the bins."""
        if not self.waiting:
            return
        matrix = np.concatenate([m for m, _ in self.waiting]) if len(self.waiting) > 1 else self.waiting[0][0]
        scores = np.concatenate([s for _, s in self.waiting]) if len(self.waiting) > 1 else self.waiting[0][1]
        self.waiting, self.waiting_rows = [], 0
        for column, counts in zip(self.reference.columns, self.counts, strict=True):
            source = matrix if column.kind == FEATURE else scores
            counts += _counts(np.asarray(source[:, column.index], dtype=np.float64), column.edges)
        if not any(c is not None for c in self.aged_counts):
            return
        aged = self.reference.age(matrix, self.clock())
        if aged is None:  # not older than the reference: aged is as taken
            aged, rescored = matrix, scores
        else:
            # Scoring the aged rows again is a second inference on the serving path: a fixed-stride
            # sample of them is enough for shares (PSI reads proportions, not counts).
            step = max(1, len(aged) // AGED_RESCORE_ROWS)
            rescored = self.rescore(aged[::step]) if self.rescore is not None else None
        for column, counts in zip(self.reference.columns, self.aged_counts, strict=True):
            if counts is None:
                continue
            source = aged if column.kind == FEATURE else rescored
            if source is not None:
                counts += _counts(np.asarray(source[:, column.index], dtype=np.float64), column.edges)

    def values(self) -> list[tuple[str, str, float, bool]]:
        """(name, kind, psi, aged) per column: the smaller of the PSIs as taken and aged (see the module
        docstring), and whether the aged one was it."""
        out = []
        for column, counts, aged in zip(self.reference.columns, self.counts, self.aged_counts, strict=True):
            value = psi(counts, column.shares)
            if aged is not None and aged.sum() > 0:
                against_aged = psi(aged, column.shares)
                if against_aged < value:
                    out.append((column.name, column.kind, against_aged, True))
                    continue
            out.append((column.name, column.kind, value, False))
        return out


@dataclass(slots=True)
class DriftReport:
    model: str
    version: str
    role: str
    status: str
    threshold: float
    rows: int = 0  # rows the figures describe
    pending: int = 0  # rows counted since, for the next check
    reference_rows: int = 0
    checked_at: float = 0.0
    since: float = 0.0
    values: list[tuple[str, str, float]] = field(default_factory=list)  # (name, kind, psi)
    newly_drifted: bool = False  # drifted now, not at the version's previous check
    aged: list[str] = field(default_factory=list)  # "kind:name" of values taken against the aged reference

    @property
    def over(self) -> list[tuple[str, str, float]]:
        return [v for v in self.values if v[2] > self.threshold]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "role": self.role,
            "status": self.status,
            "threshold": self.threshold,
            "rows": self.rows,
            "pending": self.pending,
            "reference_rows": self.reference_rows,
            "checked_at": self.checked_at,
            "since": self.since,
            "psi": {f"{kind}:{name}": round(value, 6) for name, kind, value in self.values},
            "aged": list(self.aged),
        }


def load_shipped_references(path: Path = SHIPPED_REFERENCES) -> dict[str, Mapping[str, Any]]:
    """{model: {"version": ..., "reference": ...}} for the shipped models (empty without the file)."""
    try:
        return json.loads(path.read_text())["models"]
    except FileNotFoundError:
        return {}


class DriftMonitor:
    """The live counts per version, the checks and their last results (see the module docstring)."""

    def __init__(
        self,
        *,
        threshold: float = 0.2,
        min_rows: int = 500,
        shipped: Mapping[str, Mapping[str, Any]] | None = None,
        clock: Callable[[], float] = time.time,
        rescorer: Callable[[Version], Rescore | None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.min_rows = min_rows
        self.shipped = dict(shipped or {})
        self.clock = clock
        # A version's own scoring of rows (its loaded session's run), for the aged comparison.
        self.rescorer = rescorer
        self.windows: dict[tuple[str, str], Window] = {}
        self.last: dict[tuple[str, str], DriftReport] = {}
        # (model, version) -> its reference (None: it has none), read once per version
        self._references: dict[tuple[str, str], Reference | None] = {}

    def reference(self, version: Version) -> Reference | None:
        key = (version.spec.name, version.version)
        if key not in self._references:
            spec = version.spec
            doc = spec.training.get("reference") if isinstance(spec.training, Mapping) else None
            if doc is None:
                shipped = self.shipped.get(spec.name)
                if shipped is not None and shipped.get("version") == version.version:
                    doc = shipped.get("reference")
            features = [f.name for f in spec.features]
            self._references[key] = (
                None if doc is None else Reference.from_doc(doc, features, spec.score_names, spec=spec)
            )
        return self._references[key]

    def _window(self, version: Version, reference: Reference, now: float) -> Window:
        rescore = self.rescorer(version) if self.rescorer is not None and reference.aged else None
        return Window.empty(reference, now, rescore, self.clock)

    def observe(self, version: Version, matrix: np.ndarray, scores: np.ndarray) -> None:
        """Count a round's rows of `version` (its feature matrix and its scores) into the live bins."""
        key = (version.spec.name, version.version)
        window = self.windows.get(key)
        if window is None:
            reference = self.reference(version)
            if reference is None:
                return
            window = self.windows[key] = self._window(version, reference, self.clock())
        window.add(matrix, scores)

    def check(self, versions: Sequence[Version]) -> list[DriftReport]:
        """Check every given (active) version; the reports of those checked now with enough rows.
        Versions no longer given are forgotten."""
        now = self.clock()
        keys = {(v.spec.name, v.version) for v in versions}
        for stale in [k for k in self.windows if k not in keys]:
            del self.windows[stale]
        for stale in [k for k in self.last if k not in keys]:
            del self.last[stale]
        for stale in [k for k in self._references if k not in keys]:
            del self._references[stale]
        fresh = []
        for version in versions:
            key = (version.spec.name, version.version)
            reference = self.reference(version)
            if reference is None:
                continue
            report = DriftReport(version.spec.name, version.version, version.role, OK, self.threshold)
            window = self.windows.get(key)
            if window is None or window.rows < self.min_rows:
                continue  # keeps counting; the last figures (if any) stand until enough rows came
            report.reference_rows = reference.rows
            window.fold()
            values = window.values()
            report.values = [(name, kind, value) for name, kind, value, _aged in values]
            report.aged = [f"{kind}:{name}" for name, kind, _value, aged in values if aged]
            report.rows, report.since, report.checked_at = window.rows, window.since, now
            report.status = DRIFTED if report.over else OK
            previous = self.last.get(key)
            report.newly_drifted = report.status == DRIFTED and (previous is None or previous.status != DRIFTED)
            self.last[key] = report
            self.windows[key] = self._window(version, reference, now)
            fresh.append(report)
        return fresh

    def status(self, version: Version) -> DriftReport:
        """What GetDrift shows of a version: its last figures and the rows counted since, or why it has
        none."""
        key = (version.spec.name, version.version)
        window = self.windows.get(key)
        pending = window.rows if window is not None else 0
        last = self.last.get(key)
        if last is not None:
            return replace(last, role=version.role, pending=pending)
        reference = self.reference(version)
        return DriftReport(
            version.spec.name,
            version.version,
            version.role,
            NO_REFERENCE if reference is None else TOO_FEW_ROWS,
            self.threshold,
            pending=pending,
            reference_rows=reference.rows if reference is not None else 0,
            since=window.since if window is not None else 0.0,
        )

    def export(self, meter) -> None:
        """`cdp.scoring.drift.psi`: the last check's figures, one point per model, version and feature or
        score."""
        meter.create_observable_gauge(
            "cdp.scoring.drift.psi",
            callbacks=[lambda _options: [Observation(value, attrs) for value, attrs in self.observations()]],
            unit="1",
            description="population stability index of a feature or score at the last drift check (rows "
            "scored since the check before, against the version's training reference)",
        )

    def observations(self) -> list[tuple[float, dict[str, str]]]:
        """The last figures as metric points: (psi, {model, version, feature | score})."""
        out = []
        for report in self.last.values():
            for name, kind, value in report.values:
                out.append((value, {"model": report.model, "version": report.version, kind: name}))
        return out


async def watch(
    monitor: DriftMonitor,
    versions: Callable[[], Sequence[Version]],
    alert: Callable[[DriftReport], Awaitable[None]],
    *,
    interval: float,
) -> None:
    """Check every `interval` seconds, for the life of the service; alert on each drifted version. A
    check that fails is logged: watching drift must never stop the scoring."""
    while True:
        await asyncio.sleep(interval)
        try:
            await check_and_alert(monitor, versions(), alert)
        except Exception:
            log.exception("drift check failed")


async def check_and_alert(
    monitor: DriftMonitor, versions: Sequence[Version], alert: Callable[[DriftReport], Awaitable[None]]
) -> list[DriftReport]:
    reports = monitor.check(versions)
    for report in reports:
        if report.status != DRIFTED:
            continue
        worst = max(report.over, key=lambda v: v[2])
        log.warning(
            "model drifted",
            extra={
                "model": report.model,
                "version": report.version,
                "over_threshold": len(report.over),
                "worst": f"{worst[1]}:{worst[0]}",
                "psi": round(worst[2], 4),
            },
        )
        try:
            await alert(report)
        except Exception as exc:  # the figures stand (GetDrift, metrics); the next check alerts again
            log.error("could not publish the drift alert of model %s: %r", report.model, exc)
    return reports
