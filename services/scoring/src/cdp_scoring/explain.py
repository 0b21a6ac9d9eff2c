"""Why a person has the score they have (`ExplainScore`): occlusion, with the session the service scores with.

For a person and a model version, every output score is explained by its features' contributions:

    contribution(feature) = score(person) - score(person with that one feature set to its baseline)

All of it is one onnxruntime call on the version's own loaded session (`LoadedModel.run`, what the stream
path and `Score` use): row 0 is the person's feature vector as `Score` assembles it, row i + 1 the same
vector with feature i at its baseline, and the last row every feature at its baseline (the baseline
score). No second model, no approximation: a contribution is a difference of two scores the model gives.

**Baselines.** A typical training row, from the version's training reference: the one the drift check
keeps (`DriftMonitor.reference`: the spec's `training.reference`, or the shipped models' reference.json for
their version). The reference holds decile bins per feature, not the values, so a feature's median is
read from them: the point where the cumulative share of the finite training values reaches one half,
linear within the bin it falls in (the usual median of grouped data; at a decile cut, the cut itself);
for a feature of whole numbers (its cuts are whole or half-way between two: counts, flags) the whole
number in that bin nearest to it.
When more than half of the training rows had no value (NaN, a `null` default), the median row has none
either: the baseline is NaN. A category's baseline is the most frequent category, read from the bin with
the largest share (`most_frequent_category`; the feature's default when the bins cannot tell it). A version with
no reference takes every feature's default. Each feature says which (`baseline`: "training_median" or
"default").

**Never the person's values.** The answer carries names, paths, whether the person's field was missing
(absent or unreadable, so the default stood in), contributions and scores: the caller holds a read scope,
not `privacy:export`. (Baselines are not the person's, but they are not given either.)

A person of a partition another replica holds is asked of that replica, found as `ExportPerson` finds it
(`cdp_kit.person_export.Owners`); the forwarded call carries the same mark, so it is never sent on again.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp_kit.errors import NotFound
from cdp_kit.person_export import REQUEST_ERRORS, Owners
from cdp_kit.timestamps import set_seconds
from cdp_scoring.domain.registry import Version
from cdp_scoring.domain.spec import ModelSpec
from cdp_scoring.drift import DEFAULT_BINS, FEATURE, Reference
from cdp_scoring.runtime import THREAD_ROWS, LoadedModel

TRAINING_MEDIAN, DEFAULT = "training_median", "default"
NAN = float("nan")


@dataclass(frozen=True, slots=True)
class Baseline:
    """A version's baseline vector and, per feature, where its value comes from."""

    values: np.ndarray  # float32 [features]
    sources: tuple[str, ...]


def _median_bin(shares: np.ndarray) -> tuple[int, float, float] | None:
    """The bin where half the finite rows of a reference column are reached, the share of the rows before
    it and its own share; None when more than half of the rows had no value (the last share)."""
    finite = shares[:-1]
    total = float(finite.sum())
    if total <= 0 or shares[-1] > total:
        return None
    cumulative = np.cumsum(finite) / total
    i = min(int(np.searchsorted(cumulative, 0.5)), finite.size - 1)
    return i, float(cumulative[i - 1]) if i >= 1 else 0.0, float(finite[i] / total)


def _grouped_median(edges: np.ndarray, found: tuple[int, float, float]) -> float:
    """The median as grouped data: linear within its bin (an open end bin: its one edge)."""
    i, before, share = found
    low = edges[i - 1] if i >= 1 else None  # bin i is [edges[i-1], edges[i]); the first and last are open
    high = edges[i] if i < edges.size else None
    if low is None or high is None:
        return float(high if low is None else low) if edges.size else NAN
    return float(low + (0.5 - before) / share * (high - low)) if share > 0 else float(low)


def _whole(edges: np.ndarray) -> bool:
    """Whether the cuts are those of whole numbers: each one a whole number or half-way between two
    (counts, flags); continuous values almost never give such cuts."""
    return bool(edges.size) and bool(np.all(np.abs(edges * 2 - np.round(edges * 2)) < 1e-9))


def median_of(edges: Sequence[float], shares: Sequence[float]) -> float:
    """The median of a reference column from its bins (see the module docstring); NaN when more than half
    of the rows had no value. For whole numbers, the whole number in the median's bin nearest the estimate:
    a count's median is a count, and a cut is never a value (a tree's split sits on it)."""
    edges = np.asarray(edges, dtype=np.float64)
    found = _median_bin(np.asarray(shares, dtype=np.float64))
    if found is None:
        return NAN
    estimate = _grouped_median(edges, found)
    if math.isnan(estimate) or not _whole(edges):
        return estimate
    i = found[0]
    lowest = math.ceil(edges[i - 1]) if i >= 1 else -math.inf  # the whole numbers in [edges[i-1], edges[i])
    highest = math.ceil(edges[i]) - 1 if i < edges.size else math.inf
    if lowest > highest:
        return estimate
    return float(min(max(round(estimate), lowest), highest))


def most_frequent_category(edges: Sequence[float], shares: Sequence[float], categories: Sequence[str]) -> float | None:
    """The index of the most frequent category of a reference column (-1: values outside the list), or
    None when the bins cannot tell it.

    It is in the bin with the largest share. A bin holding one index names it. A bin holding several is
    one whose lowest index had decile cuts repeated on it (merged), while the indices above it in the bin
    had none of their own, so together they hold less than a decile of the rows: when the bin holds more
    than two deciles, its lowest index holds most of it."""
    shares = np.asarray(shares, dtype=np.float64)[:-1]
    if not shares.size or shares.max() <= 0:
        return None
    i = int(np.argmax(shares))
    low = edges[i - 1] if i >= 1 else -math.inf
    high = edges[i] if i < len(edges) else math.inf
    inside = [index for index in range(-1, len(categories)) if low <= index < high]
    if len(inside) == 1 or (inside and shares[i] / shares.sum() > 2 / DEFAULT_BINS):
        return float(inside[0])
    return None


def baseline(spec: ModelSpec, defaults: Sequence[float], reference: Reference | None) -> Baseline:
    """The baseline vector of a version: its reference's medians (most frequent categories), else defaults."""
    values = np.asarray(defaults, dtype=np.float32).copy()
    sources = [DEFAULT] * len(values)
    if reference is not None:
        columns = {c.index: c for c in reference.columns if c.kind == FEATURE}
        for i, feature in enumerate(spec.features):
            column = columns.get(i)
            if column is None:
                continue
            if feature.transform == "category":
                value = most_frequent_category(column.edges, column.shares, feature.categories)
            else:
                value = median_of(column.edges, column.shares)
            if value is not None:
                values[i] = value
                sources[i] = TRAINING_MEDIAN
    return Baseline(values, tuple(sources))


def occlusion_rows(row: Sequence[float], base: np.ndarray) -> np.ndarray:
    """[the person, the person with feature i at its baseline for each i, the baseline] as float32 rows."""
    width = len(base)
    rows = np.empty((width + 2, width), dtype=np.float32)
    rows[:] = np.asarray(row, dtype=np.float32)
    index = np.arange(width)
    rows[index + 1, index] = base
    rows[-1] = base
    return rows


class Baselines:
    """Baselines per version, computed once per spec and reference (drift's reference, else the spec's own)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._known: dict[tuple[str, str], tuple[ModelSpec, Reference | None, Baseline]] = {}

    def reference(self, version: Version) -> Reference | None:
        drift = getattr(self.engine, "drift", None)
        if drift is not None:
            return drift.reference(version)
        spec = version.spec
        doc = spec.training.get("reference") if isinstance(spec.training, Mapping) else None
        if doc is None:
            return None
        return Reference.from_doc(doc, [f.name for f in spec.features], spec.score_names, spec=spec)

    def of(self, version: Version, session: LoadedModel) -> Baseline:
        key = (version.spec.name, version.version)
        reference = self.reference(version)
        known = self._known.get(key)
        if known is None or known[0] is not version.spec or known[1] is not reference:
            found = baseline(version.spec, session.assembler.defaults(), reference)
            known = self._known[key] = (version.spec, reference, found)
        return known[2]


def answer(
    version: Version, person_id: str, now: float, missing: Sequence[bool], base: Baseline, scores: np.ndarray
) -> scoring_pb2.ExplainScoreResponse:
    """The response from the occlusion run's scores ([features + 2, outputs])."""
    spec = version.spec
    response = scoring_pb2.ExplainScoreResponse(
        model=spec.name,
        version=version.version,
        role=scoring_pb2.Role.Value(f"ROLE_{version.role.upper()}"),
        person_id=person_id,
    )
    set_seconds(response.evaluated_at, now)
    width = len(spec.features)
    for j, name in enumerate(spec.score_names):
        person = float(scores[0, j])
        contributions = [(person - float(scores[i + 1, j]), i) for i in range(width)]
        contributions.sort(key=lambda item: -abs(item[0]) if not math.isnan(item[0]) else 0.0)
        explained = response.scores.add(score=name, value=person, baseline_value=float(scores[width + 1, j]))
        for contribution, i in contributions:
            feature = spec.features[i]
            explained.features.add(
                name=feature.name,
                path=feature.path,
                missing=missing[i],
                contribution=contribution,
                baseline=base.sources[i],
            )
    return response


class Explainer:
    """`ExplainScore` for any person: answered here for the partitions this replica holds, asked of the
    replica holding the partition otherwise (`owners`; None: this engine answers for everyone it holds)."""

    def __init__(self, engine: Any, owners: Owners | None = None) -> None:
        self.engine = engine
        self.owners = owners
        self.baselines = Baselines(engine)

    async def explain(self, request: scoring_pb2.ExplainScoreRequest, context: Any) -> scoring_pb2.ExplainScoreResponse:
        engine = self.engine
        registry = engine.registry
        if request.model not in registry.models:
            known = ", ".join(sorted(registry.models)) or "none deployed"
            raise NotFound(f"model: no model named {request.model!r} (models: {known})", reason="unknown_model")
        if request.version and request.version not in registry.models[request.model].versions:
            versions = ", ".join(sorted(registry.models[request.model].versions))
            raise NotFound(
                f"version: model {request.model!r} has no version {request.version!r} (versions: {versions})",
                reason="unknown_version",
            )
        if self.owners is not None and not self.owners.holds(request.person_id):
            return await self.owners.forward(
                self.engine._partition(request.person_id),
                context,
                scoring_pb2_grpc.ScoringServiceStub,
                "ExplainScore",
                request,
                passed_on=REQUEST_ERRORS,
            )
        return await self.here(request.model, request.version, request.person_id)

    async def here(self, model: str, version: str, person_id: str) -> scoring_pb2.ExplainScoreResponse:
        """The answer for a person of this replica's partitions: from the fields it holds, or, for a person
        whose profile has not changed since scoring started holding them, from the profile service (as
        `Score` reads them)."""
        engine = self.engine
        target = engine.resolve_version(model, version, person_id)
        session = await engine.ensure_session(target)
        # Read with no await between: the person's fields as they are at this instant.
        fields = engine.fields.get(person_id)
        if fields is None:
            fields = await engine.held.fetch(person_id)  # a copy of their own: nothing changes it meanwhile
            if fields is None:
                raise self._unknown(person_id)
        now = engine.clock()
        assembler = session.assembler
        row = assembler.row(fields, now)
        missing = assembler.missing(fields, now)
        base = self.baselines.of(target, session)
        rows = occlusion_rows(row, base.values)
        scores = await asyncio.to_thread(session.run, rows) if len(rows) >= THREAD_ROWS else session.run(rows)
        return answer(target, person_id, now, missing, base, scores)

    @staticmethod
    def _unknown(person_id: str) -> NotFound:
        return NotFound(
            f"person_id: no person {person_id!r} (neither scoring nor the profile service knows them)",
            reason="unknown_person",
        )


__all__ = [
    "DEFAULT",
    "TRAINING_MEDIAN",
    "Baseline",
    "Explainer",
    "baseline",
    "median_of",
    "most_frequent_category",
    "occlusion_rows",
]
