"""The record matcher: fit m/u by EM, score candidate pairs, decide, cluster, persist.

matcher = Matcher(DEFAULT_PERSON_CONFIG)
report = matcher.fit(records)            # records: dicts with "id" and the configured fields
pairs = matcher.score(records)           # blocked pairs with weight, probability, decision
people = matcher.clusters(pairs)         # connected components of confident matches
saved = matcher.to_dict()                # JSON-safe; Matcher.from_dict(saved) scores identically
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from cdp_kit.errors import FailedPrecondition, InvalidArgument

from .blocking import CandidatePairs, candidate_pairs, unordered_piece
from .comparisons import Comparison, build_comparison, compare_pairs
from .config import MatchConfig
from .fellegi_sunter import (
    EXACT_LEVEL,
    NonMatchMixture,
    estimate_u,
    exact_agreement_rate,
    expectation_maximisation,
    level_weights,
    match_probability,
    pair_log2_bayes_factors,
)
from .normalise import UnparseableValue
from .records import RecordTable

Decision = Literal["match", "review", "non_match"]
FORMAT = "cdp.identity.matching/v2"
# v1 scored with λ among candidate pairs and per-field u pinned to random pairs, which let a blocking
# rule on a common field manufacture matches; its parameters cannot be converted, only refitted.
OLD_FORMATS = ("cdp.identity.matching/v1",)


@dataclass(frozen=True, slots=True)
class ScoredPair:
    left_id: Any
    right_id: Any
    match_weight: float
    probability: float
    decision: Decision
    levels: dict[str, str]  # comparison name -> level label


@dataclass(frozen=True)
class LevelEstimate:
    label: str
    m: float
    u: float
    weight: float


@dataclass(frozen=True)
class ComparisonEstimate:
    name: str
    field: str
    levels: tuple[LevelEstimate, ...]  # without the null level, whose weight is always 0

    def level(self, label: str) -> LevelEstimate:
        return next(level for level in self.levels if level.label == label)


@dataclass(frozen=True)
class FitReport:
    records: int
    candidate_pairs: int
    oversized_blocks: int
    iterations: int
    converged: bool
    match_probability: float  # share of matches among the candidate pairs, as EM estimated it
    expected_matches: float  # that share x candidate pairs: how many matches EM believes the candidates hold
    random_match_probability: float  # λ: the prior that two records drawn at random match (used to score)
    comparisons: tuple[ComparisonEstimate, ...]

    def comparison(self, name: str) -> ComparisonEstimate:
        return next(comparison for comparison in self.comparisons if comparison.name == name)

    def format_table(self) -> str:
        lines = [f"{'comparison':<14} {'level':<34} {'m':>9} {'u':>11} {'weight':>8}"]
        for comparison in self.comparisons:
            for level in comparison.levels:
                lines.append(
                    f"{comparison.name:<14} {level.label:<34} {level.m:>9.5f} {level.u:>11.3e} {level.weight:>8.2f}"
                )
        return "\n".join(lines)


@dataclass
class _Parameters:
    match_probability: float  # λ for two random records
    m: list[np.ndarray]  # per comparison, per level; index 0 (null) is unused
    u: list[np.ndarray]  # the non-match classes merged: each level's own evidence, for explanations
    u_strangers: list[np.ndarray]
    u_look_alikes: list[np.ndarray]
    mixture: NonMatchMixture

    def weights(self) -> list[np.ndarray]:
        return [level_weights(m_k, u_k) for m_k, u_k in zip(self.m, self.u, strict=True)]


class Matcher:
    """Probabilistic (Fellegi-Sunter) record matcher; see the module docstring for the workflow."""

    def __init__(self, config: MatchConfig | Mapping[str, Any]) -> None:
        self.config = config if isinstance(config, MatchConfig) else MatchConfig.from_dict(config)
        self._comparisons: list[Comparison] = [build_comparison(spec) for spec in self.config.comparisons]
        self._normalisers = self.config.normalisers()
        self._parameters: _Parameters | None = None
        self._weights: list[np.ndarray] = []
        # comparison position -> (normalised value -> records holding it, records with a value)
        self._term_counts: dict[int, tuple[dict[str, int], int]] = {}

    @property
    def fitted(self) -> bool:
        return self._parameters is not None

    def level_labels(self) -> dict[str, tuple[str, ...]]:
        """Each comparison's level labels, strongest first ("null" first, "else" last)."""
        return {comparison.name: comparison.labels for comparison in self._comparisons}

    @property
    def comparison_names(self) -> tuple[str, ...]:
        return tuple(comparison.name for comparison in self._comparisons)

    # --- training -----------------------------------------------------------------------------------------

    def fit(self, records: Sequence[Mapping]) -> FitReport:
        """Estimate m, λ and the u of shareable fields by EM over the candidate pairs of `records`; the u of
        the other fields comes from random pairs of the same records."""
        table = self._table(records)
        n = len(table)
        if n < 2:
            raise FailedPrecondition(f"fit needs at least 2 records, got {n}")
        self._count_terms(table)
        candidates = self._candidates(table)
        if len(candidates) == 0:
            raise FailedPrecondition(
                "the blocking rules produced no candidate pairs, so there is nothing to learn from; "
                "add records or broaden blocking_rules"
            )
        level_counts = [len(comparison.labels) for comparison in self._comparisons]
        prior = self.config.prior_match_probability
        outcome = expectation_maximisation(
            compare_pairs(self._comparisons, table, candidates.left, candidates.right),
            level_counts,
            self._random_pair_u(table, level_counts),
            shareable=[comparison.spec.shareable for comparison in self._comparisons],
            all_pairs=self._all_pairs(table),
            max_iterations=self.config.em.max_iterations,
            tolerance=self.config.em.tolerance,
            match_share=0.5 if prior is None else prior,
            learn_match_share=prior is None,
        )
        self._set_parameters(
            _Parameters(
                match_probability=outcome.random_match_probability,
                m=outcome.m,
                u=outcome.u,
                u_strangers=outcome.u_strangers,
                u_look_alikes=outcome.u_look_alikes,
                mixture=outcome.mixture,
            )
        )
        return FitReport(
            records=n,
            candidate_pairs=len(candidates),
            oversized_blocks=candidates.oversized_blocks,
            iterations=outcome.iterations,
            converged=outcome.converged,
            match_probability=outcome.match_share,
            expected_matches=outcome.match_share * len(candidates),
            random_match_probability=outcome.random_match_probability,
            comparisons=self._estimates(),
        )

    def count_terms(self, records: Sequence[Mapping]) -> None:
        """Take the term frequencies of the comparisons that use them from `records` (fit does this with
        its own records; a matcher loaded with from_dict needs it before scoring with them)."""
        self._count_terms(self._table(records))

    def update_terms(self, added: Iterable[Mapping] = (), removed: Iterable[Mapping] = ()) -> None:
        """Keep the term frequencies in step with a changing set of records without recounting it: count
        the `added` records' values and uncount the `removed` ones' (records counted before)."""
        for k, comparison in enumerate(self._comparisons):
            if not comparison.spec.term_frequencies:
                continue
            counts, total = self._term_counts.get(k, ({}, 0))
            normalise = self._normalisers[comparison.field]
            for sign, records in ((1, added), (-1, removed)):
                for record in records:
                    value = normalise(record.get(comparison.field))
                    if value is None:
                        continue
                    held = counts.get(value, 0) + sign
                    if held > 0:
                        counts[value] = held
                    else:
                        counts.pop(value, None)
                    total += sign
            self._term_counts[k] = (counts, total)

    def term_frequency_summary(self) -> list[dict[str, Any]]:
        """Per term-frequency comparison: records with a value, distinct values, the share of the most
        common value and the median share, and what exact agreement weighs on the most common value and on
        a value one record holds. Counts only: the values themselves (names) are personal data."""
        parameters = self._parameters
        summary = []
        for k, comparison in enumerate(self._comparisons):
            if not comparison.spec.term_frequencies:
                continue
            counts, total = self._term_counts.get(k, ({}, 0))
            held = np.array(sorted(counts.values()), dtype=np.float64)
            entry: dict[str, Any] = {
                "comparison": comparison.name,
                "records": int(total),
                "distinct_values": len(counts),
                "most_common_share": float(held[-1] / total) if total else 0.0,
                "median_share": float(np.median(held) / total) if total else 0.0,
                "weight_most_common": 0.0,
                "weight_rarest": 0.0,
            }
            if parameters is not None and total:
                m_exact = parameters.m[k][EXACT_LEVEL]
                entry["weight_most_common"] = float(np.log2(m_exact / entry["most_common_share"]))
                entry["weight_rarest"] = float(np.log2(m_exact * total))
            summary.append(entry)
        return summary

    @property
    def random_match_probability(self) -> float:
        """λ: the prior that two records drawn at random are one person."""
        return self._require_fitted().match_probability

    def estimates(self) -> tuple[ComparisonEstimate, ...]:
        """Each comparison's levels with m, u and weight (log2 m/u), strongest first, null left out."""
        return self._estimates()

    def _count_terms(self, table: RecordTable) -> None:
        self._term_counts = {}
        for k, comparison in enumerate(self._comparisons):
            if comparison.spec.term_frequencies:
                column = table.columns[comparison.field]
                counts = np.bincount(column.codes[column.codes >= 0], minlength=len(column.values))
                self._term_counts[k] = (dict(zip(column.values, counts.tolist(), strict=True)), int(counts.sum()))

    def _term_adjustment(self, table: RecordTable, left: np.ndarray, matrix: np.ndarray) -> np.ndarray | None:
        """Per pair, log2 of (share of records with the agreed value / strangers' exact u), summed over the
        term-frequency comparisons on which the pair agrees exactly; a value never counted counts once."""
        if not self._term_counts:
            return None
        parameters = self._require_fitted()
        adjustment = np.zeros(len(left))
        for k, (counts, total) in self._term_counts.items():
            rows = np.flatnonzero(matrix[:, k] == EXACT_LEVEL)
            if rows.size == 0 or total == 0:
                continue
            column = table.columns[self._comparisons[k].field]
            values = column.values
            shares = np.array(
                [max(counts.get(values[code], 0), 1) / total for code in column.codes[left[rows]].tolist()]
            )
            adjustment[rows] += np.log2(shares) - np.log2(parameters.u_strangers[k][EXACT_LEVEL])
        return adjustment

    def _random_pair_u(self, table: RecordTable, level_counts: list[int]) -> list[np.ndarray]:
        rng = np.random.default_rng(self.config.em.seed)
        n = len(table)
        sample = self.config.em.u_sample_pairs
        left = rng.integers(0, n, size=sample)
        right = rng.integers(0, n - 1, size=sample)
        right += right >= left  # a uniform partner other than the record itself
        if table.sources is not None:
            across = table.sources[left] != table.sources[right]
            left, right = left[across], right[across]
            if left.size == 0:
                raise FailedPrecondition("link_only needs records from at least two sources")
        random_matrix = compare_pairs(self._comparisons, table, left, right)
        exact_rates: list[float | None] = [
            exact_agreement_rate(table.columns[comparison.field]) for comparison in self._comparisons
        ]
        return estimate_u(random_matrix, level_counts, exact_rates)

    def _set_parameters(self, parameters: _Parameters) -> None:
        self._parameters = parameters
        self._weights = parameters.weights()

    def _estimates(self) -> tuple[ComparisonEstimate, ...]:
        parameters = self._require_fitted()
        return tuple(
            ComparisonEstimate(
                name=comparison.name,
                field=comparison.field,
                levels=tuple(
                    LevelEstimate(label=label, m=float(m_k[i]), u=float(u_k[i]), weight=float(w_k[i]))
                    for i, label in enumerate(comparison.labels)
                    if i >= EXACT_LEVEL
                ),
            )
            for comparison, m_k, u_k, w_k in zip(
                self._comparisons, parameters.m, parameters.u, self._weights, strict=True
            )
        )

    # --- scoring ------------------------------------------------------------------------------------------

    def normalise(self, records: Sequence[Mapping]) -> list[dict[str, Any]]:
        """Records as the matcher sees them: id plus every compared or blocked field, normalised (None =
        missing). Useful to show why a pair matched, or to feed another tool the same cleaned data."""
        return [
            {
                "id": record.get("id"),
                **{name: normalise(record.get(name)) for name, normalise in self._normalisers.items()},
            }
            for record in records
        ]

    def check_fields(self, fields: Mapping[str, Any], path: str) -> None:
        """Refuse a record whose compared fields do not parse (an unreadable date), naming `path`.field;
        use it before storing a record, so a bad value never reaches a later scoring call."""
        for name, value in fields.items():
            normalise = self._normalisers.get(name)
            if normalise is None:
                continue
            try:
                normalise(value)
            except UnparseableValue as error:
                raise InvalidArgument(f"{path}.{name}", str(error)) from None

    def blocking_keys(self, record: Mapping) -> list[str]:
        """The record's key under each blocking rule it can be keyed by (records sharing a key are
        candidates): what an index keeps to find a new record's candidates without scanning the pool.
        The same keys `score` blocks on; a block over max_block_size is skipped there, and should be here."""
        keys = []
        for position, rule in enumerate(self.config.blocking_rules):
            pieces = []
            for part in rule.parts:
                value = self._normalisers[part.field](record.get(part.field))
                if part.other:
                    other = self._normalisers[part.other](record.get(part.other))
                    piece = unordered_piece(value, other) if value is not None and other is not None else None
                else:
                    piece = value[part.start : part.stop] if value is not None else None
                if not piece:
                    break
                pieces.append(piece)
            else:
                keys.append("\x1f".join((str(position), *pieces)))
        return keys

    def score_pairs(
        self, records: Sequence[Mapping], pairs: Sequence[tuple[int, int]], *, min_probability: float = 0.0
    ) -> list[ScoredPair]:
        """Score the given pairs of `records` (positions in it) and no others: with an index of blocking
        keys, the pairs a few new records form cost what those pairs cost, whatever the pool's size."""
        table = self._table(records)
        if table.sources is not None:
            pairs = [(a, b) for a, b in pairs if table.sources[a] != table.sources[b]]
        if not pairs:
            return []
        left, right = (np.array(side, dtype=np.int64) for side in zip(*pairs, strict=True))
        return self._score_rows(table, left, right, min_probability)

    def candidate_pairs(self, records: Sequence[Mapping]) -> list[tuple[Any, Any]]:
        """The blocked candidate pairs as (left id, right id), each once, left earlier in `records`."""
        table = self._table(records)
        candidates = self._candidates(table)
        ids = table.ids
        return [(ids[a], ids[b]) for a, b in zip(candidates.left.tolist(), candidates.right.tolist(), strict=True)]

    def score(self, records: Sequence[Mapping], *, min_probability: float = 0.0) -> list[ScoredPair]:
        """Block, compare and weigh; returns the candidate pairs with probability >= min_probability."""
        table = self._table(records)
        candidates = self._candidates(table)
        return self._score_rows(table, candidates.left, candidates.right, min_probability)

    def score_pair(self, left: Mapping, right: Mapping) -> ScoredPair:
        """Score one pair, whether or not a blocking rule would pair them: λ is the prior for any two
        records, so the probability is the same as `score` gives a candidate pair."""
        table = self._table([left, right], unique_ids=False)
        return self._score_rows(table, np.array([0]), np.array([1]), 0.0)[0]

    def _score_rows(
        self, table: RecordTable, left: np.ndarray, right: np.ndarray, min_probability: float
    ) -> list[ScoredPair]:
        parameters = self._require_fitted()
        matrix = compare_pairs(self._comparisons, table, left, right)
        weights = pair_log2_bayes_factors(
            matrix,
            parameters.m,
            parameters.u_strangers,
            parameters.u_look_alikes,
            parameters.mixture,
            self._term_adjustment(table, left, matrix),
        )
        probabilities = match_probability(weights, parameters.match_probability)
        keep = np.flatnonzero(probabilities >= min_probability)
        upper, lower = self.config.upper_threshold, self.config.lower_threshold
        names = self.comparison_names
        labels = [comparison.labels for comparison in self._comparisons]
        ids = table.ids
        pairs = []
        for a, b, weight, probability, levels in zip(
            left[keep].tolist(),
            right[keep].tolist(),
            weights[keep].tolist(),
            probabilities[keep].tolist(),
            matrix[keep].tolist(),
            strict=True,
        ):
            decision: Decision = "match" if probability >= upper else "review" if probability >= lower else "non_match"
            pairs.append(
                ScoredPair(
                    left_id=ids[a],
                    right_id=ids[b],
                    match_weight=weight,
                    probability=probability,
                    decision=decision,
                    levels={name: labels[k][level] for k, (name, level) in enumerate(zip(names, levels, strict=True))},
                )
            )
        return pairs

    def clusters(self, scored_pairs: Iterable[ScoredPair], threshold: float | None = None) -> list[set[Any]]:
        """Connected components of the pairs with probability >= threshold (default: upper_threshold).

        Only ids in at least one such pair appear. Largest cluster first, ties by smallest id.
        """
        threshold = self.config.upper_threshold if threshold is None else threshold
        parent: dict[Any, Any] = {}

        def root(node: Any) -> Any:
            parent.setdefault(node, node)
            while parent[node] != node:
                parent[node] = parent[parent[node]]  # path halving keeps the trees flat
                node = parent[node]
            return node

        for pair in scored_pairs:
            if pair.probability >= threshold:
                a, b = root(pair.left_id), root(pair.right_id)
                if a != b:
                    parent[b] = a
        components: dict[Any, set[Any]] = {}
        for node in list(parent):
            components.setdefault(root(node), set()).add(node)
        return sorted(components.values(), key=lambda ids: (-len(ids), min(map(str, ids))))

    # --- persistence --------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The config and the fitted parameters as JSON-safe data."""
        data: dict[str, Any] = {"format": FORMAT, "config": self.config.to_dict(), "parameters": None}
        if self._parameters is not None:
            parameters = self._parameters
            data["parameters"] = {
                "match_probability": parameters.match_probability,
                "non_match_mixture": {
                    "strangers": parameters.mixture.strangers,
                    "look_alikes": parameters.mixture.look_alikes,
                },
                "comparisons": [
                    {
                        "name": comparison.name,
                        "levels": [
                            {
                                "label": label,
                                "m": float(parameters.m[k][i]),
                                "u": float(parameters.u[k][i]),
                                "u_strangers": float(parameters.u_strangers[k][i]),
                                "u_look_alikes": float(parameters.u_look_alikes[k][i]),
                            }
                            for i, label in enumerate(comparison.labels)
                            if i >= EXACT_LEVEL
                        ],
                    }
                    for k, comparison in enumerate(self._comparisons)
                ],
            }
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Matcher:
        if isinstance(data, Mapping) and data.get("format") in OLD_FORMATS:
            raise InvalidArgument(
                "format", f"{data['format']!r} parameters cannot be converted to {FORMAT!r}; fit the matcher again"
            )
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise InvalidArgument("format", f"expected a saved matcher with format {FORMAT!r}")
        matcher = cls(MatchConfig.from_dict(data.get("config")))
        parameters = data.get("parameters")
        if parameters is not None:
            matcher._set_parameters(matcher._parse_parameters(parameters))
        return matcher

    def _parse_parameters(self, data: Any) -> _Parameters:
        if not isinstance(data, Mapping):
            raise InvalidArgument("parameters", "must be an object with match_probability and comparisons")
        prior = data.get("match_probability")
        if not isinstance(prior, int | float) or not 0 < prior < 1:
            raise InvalidArgument("parameters.match_probability", f"must be in (0, 1), got {prior!r}")
        raw_mixture = data.get("non_match_mixture")
        shares = []
        for key in ("strangers", "look_alikes"):
            value = raw_mixture.get(key) if isinstance(raw_mixture, Mapping) else None
            if not isinstance(value, int | float) or not 0 <= value <= 1:
                raise InvalidArgument(f"parameters.non_match_mixture.{key}", f"must be in [0, 1], got {value!r}")
            shares.append(float(value))
        if shares[0] <= 0:
            raise InvalidArgument("parameters.non_match_mixture.strangers", "must be above 0")
        saved = data.get("comparisons")
        if not isinstance(saved, list) or len(saved) != len(self._comparisons):
            raise InvalidArgument(
                "parameters.comparisons", f"must list the {len(self._comparisons)} configured comparisons in order"
            )
        m, u, u_strangers, u_look_alikes = [], [], [], []
        for position, (comparison, entry) in enumerate(zip(self._comparisons, saved, strict=True)):
            path = f"parameters.comparisons[{position}]"
            levels = entry.get("levels") if isinstance(entry, Mapping) else None
            expected = list(comparison.labels[EXACT_LEVEL:])
            if entry.get("name") != comparison.name or not isinstance(levels, list):
                raise InvalidArgument(path, f"expected comparison {comparison.name!r} with levels {expected}")
            if [level.get("label") for level in levels] != expected:
                raise InvalidArgument(f"{path}.levels", f"labels must be {expected} (the config changed?)")
            m_k, u_k, strangers_k, look_alikes_k = (np.ones(len(comparison.labels)) for _ in range(4))
            for i, level in enumerate(levels, start=EXACT_LEVEL):
                for key, target in (
                    ("m", m_k),
                    ("u", u_k),
                    ("u_strangers", strangers_k),
                    ("u_look_alikes", look_alikes_k),
                ):
                    value = level.get(key)
                    if not isinstance(value, int | float) or not 0 < value <= 1:
                        raise InvalidArgument(
                            f"{path}.levels[{i - EXACT_LEVEL}].{key}", f"must be in (0, 1], got {value!r}"
                        )
                    target[i] = float(value)
            m.append(m_k)
            u.append(u_k)
            u_strangers.append(strangers_k)
            u_look_alikes.append(look_alikes_k)
        return _Parameters(
            match_probability=float(prior),
            m=m,
            u=u,
            u_strangers=u_strangers,
            u_look_alikes=u_look_alikes,
            mixture=NonMatchMixture(strangers=shares[0], look_alikes=shares[1]),
        )

    # --- helpers ------------------------------------------------------------------------------------------

    def _table(self, records: Sequence[Mapping], *, unique_ids: bool = True) -> RecordTable:
        table = RecordTable.from_records(records, self._normalisers, unique_ids=unique_ids)
        if self.config.link_type == "link_only":
            codes: dict[str, int] = {}
            sources = np.empty(len(records), dtype=np.int64)
            for position, record in enumerate(records):
                source = record.get("source")
                if not isinstance(source, str) or not source:
                    raise InvalidArgument(
                        f"records[{position}].source", "link_only: every record names its source (e.g. 'crm', 'app')"
                    )
                sources[position] = codes.setdefault(source, len(codes))
            table.sources = sources
        return table

    def _candidates(self, table: RecordTable) -> CandidatePairs:
        candidates = candidate_pairs(table, self.config.blocking_rules, self.config.max_block_size)
        if table.sources is None:
            return candidates
        across = table.sources[candidates.left] != table.sources[candidates.right]
        return CandidatePairs(candidates.left[across], candidates.right[across], candidates.oversized_blocks)

    @staticmethod
    def _all_pairs(table: RecordTable) -> float:
        """The pairs blocking chooses candidates from: every pair, or (link_only) every pair across sources."""
        n = len(table)
        if table.sources is None:
            return n * (n - 1) / 2
        per_source = np.bincount(table.sources).astype(np.float64)
        return float((n * n - (per_source**2).sum()) / 2)

    def _require_fitted(self) -> _Parameters:
        if self._parameters is None:
            raise FailedPrecondition("the matcher has no parameters; call fit(records) or load one with from_dict()")
        return self._parameters
