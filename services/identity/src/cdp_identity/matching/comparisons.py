"""Field comparisons: for each candidate pair, the agreement level of one field as a small integer.

Levels run from strongest to weakest agreement. Level 0 is always "null" (either side missing: no
evidence either way, weight 0 under Fellegi-Sunter), level 1 "exact" (equal normalised values) and the
last one "else". The levels between depend on the kind. Work is done once per distinct pair of values,
not once per record pair, and string similarity is computed by rapidfuzz in bulk.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from datetime import date

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import DamerauLevenshtein, JaroWinkler, Levenshtein

from .config import ComparisonSpec
from .nicknames import are_name_variants
from .records import Column, RecordTable

NULL_LEVEL = 0
EXACT_LEVEL = 1


def _format_threshold(value: float) -> str:
    return f"{value:g}"


class Comparison(ABC):
    """Assigns one level per record pair for one field."""

    def __init__(self, spec: ComparisonSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.field = spec.field
        before = (["nickname"] if spec.nicknames else []) + (["swapped"] if spec.swap_field else [])
        self._first_graded_level = EXACT_LEVEL + 1 + len(before)
        self.labels: tuple[str, ...] = ("null", "exact", *before, *self._graded_labels(), "else")
        self.else_level = len(self.labels) - 1

    @abstractmethod
    def _graded_labels(self) -> list[str]:
        """Labels of the kind's own levels between "exact" and "else", strongest first."""

    @abstractmethod
    def _graded_levels(self, column: Column, left_codes: np.ndarray, right_codes: np.ndarray) -> np.ndarray:
        """Offsets into the graded levels (0 = first) for distinct, unequal value pairs; -1 means "else"."""

    def compare(self, table: RecordTable, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """Levels (int8) for the record pairs (left[i], right[i]) given as row positions in `table`."""
        column = table.columns[self.field]
        left_codes, right_codes = column.codes[left], column.codes[right]
        levels = np.full(len(left), self.else_level, dtype=np.int8)
        missing = (left_codes < 0) | (right_codes < 0)
        levels[missing] = NULL_LEVEL
        levels[(left_codes == right_codes) & ~missing] = EXACT_LEVEL
        unequal = np.flatnonzero(~missing & (left_codes != right_codes))
        if unequal.size == 0:
            return levels
        # Order each pair's codes so (a, b) and (b, a) are one distinct pair: symmetric by construction.
        low = np.minimum(left_codes[unequal], right_codes[unequal]).astype(np.int64)
        high = np.maximum(left_codes[unequal], right_codes[unequal]).astype(np.int64)
        distinct, inverse = np.unique(low * len(column.values) + high, return_inverse=True)
        low_distinct, high_distinct = distinct // len(column.values), distinct % len(column.values)

        distinct_levels = np.full(len(distinct), self.else_level, dtype=np.int8)
        pending = np.ones(len(distinct), dtype=bool)
        if self.spec.nicknames:
            variants = np.fromiter(
                (
                    are_name_variants(column.values[a], column.values[b])
                    for a, b in zip(low_distinct.tolist(), high_distinct.tolist(), strict=True)
                ),
                dtype=bool,
                count=len(distinct),
            )
            distinct_levels[variants] = self.labels.index("nickname")
            pending &= ~variants
        if pending.any() and self._first_graded_level < self.else_level:
            graded = self._graded_levels(column, low_distinct[pending], high_distinct[pending])
            distinct_levels[pending] = np.where(graded >= 0, self._first_graded_level + graded, self.else_level)
        levels[unequal] = distinct_levels[inverse]
        if self.spec.swap_field:
            self._apply_swapped_level(table, column, left[unequal], right[unequal], unequal, levels)
        return levels

    def _apply_swapped_level(
        self,
        table: RecordTable,
        column: Column,
        left: np.ndarray,
        right: np.ndarray,
        positions: np.ndarray,
        levels: np.ndarray,
    ) -> None:
        """First and last name entered the other way round: each side's value of this field equals the
        other side's value of the swap field. Both crossings must hold (one alone is a housemate sharing a
        surname), which also makes the level symmetric."""
        other = table.columns[self.spec.swap_field]
        # The other field's values in this column's numbering; the appended -3 serves missing values
        # (code -1), and neither it nor -2 (a value this column lacks) equals a real code.
        translated = np.append(column.codes_of(other.values), -3)[other.codes]
        swapped = (column.codes[left] == translated[right]) & (column.codes[right] == translated[left])
        swapped_level = self.labels.index("swapped")
        weaker = swapped & (levels[positions] > swapped_level)
        levels[positions[weaker]] = swapped_level


class ExactComparison(Comparison):
    def _graded_labels(self) -> list[str]:
        return []

    def _graded_levels(self, column: Column, left_codes: np.ndarray, right_codes: np.ndarray) -> np.ndarray:
        return np.full(len(left_codes), -1, dtype=np.int8)


# rapidfuzz starts its threads on every call that asks for them: ~2 ms, against microseconds for the
# few pairs a one-record MatchRecords call compares. Threads pay off only on a batch this big.
_PARALLEL_PAIRS = 20_000


def _workers(pairs: int) -> int:
    return -1 if pairs >= _PARALLEL_PAIRS else 1


def _values(column: Column, codes: np.ndarray) -> list[str]:
    values = column.values
    return [values[code] for code in codes.tolist()]


def _first_threshold_met(passes: list[np.ndarray], size: int) -> np.ndarray:
    """Index of the first True among per-threshold masks (strongest first), -1 when none holds."""
    result = np.full(size, -1, dtype=np.int8)
    for offset in range(len(passes) - 1, -1, -1):
        result[passes[offset]] = offset
    return result


class JaroWinklerComparison(Comparison):
    def _graded_labels(self) -> list[str]:
        return [f"jaro_winkler>={_format_threshold(t)}" for t in self.spec.thresholds]

    def _graded_levels(self, column: Column, left_codes: np.ndarray, right_codes: np.ndarray) -> np.ndarray:
        similarity = process.cpdist(
            _values(column, left_codes),
            _values(column, right_codes),
            scorer=JaroWinkler.similarity,
            dtype=np.float64,
            workers=_workers(len(left_codes)),
        )
        return _first_threshold_met([similarity >= t for t in self.spec.thresholds], len(left_codes))


class LevenshteinComparison(Comparison):
    label = "levenshtein"
    scorer = staticmethod(Levenshtein.distance)

    def _graded_labels(self) -> list[str]:
        return [f"{self.label}<={int(t)}" for t in self.spec.thresholds]

    def _graded_levels(self, column: Column, left_codes: np.ndarray, right_codes: np.ndarray) -> np.ndarray:
        distance = process.cpdist(
            _values(column, left_codes),
            _values(column, right_codes),
            scorer=self.scorer,
            score_cutoff=int(max(self.spec.thresholds)),
            dtype=np.int32,
            workers=_workers(len(left_codes)),
        )
        return _first_threshold_met([distance <= t for t in self.spec.thresholds], len(left_codes))


class DamerauLevenshteinComparison(LevenshteinComparison):
    """Edit distance where swapping two neighbouring characters ("02147" / "02174") is one edit."""

    label = "damerau_levenshtein"
    scorer = staticmethod(DamerauLevenshtein.distance)


class EmailComparison(Comparison):
    """Same mailbox name at another provider ranks above a merely similar address."""

    def _graded_labels(self) -> list[str]:
        return ["same_local_part", *(f"jaro_winkler>={_format_threshold(t)}" for t in self.spec.thresholds)]

    def _graded_levels(self, column: Column, left_codes: np.ndarray, right_codes: np.ndarray) -> np.ndarray:
        left_values, right_values = _values(column, left_codes), _values(column, right_codes)
        same_local = np.fromiter(
            (a.partition("@")[0] == b.partition("@")[0] for a, b in zip(left_values, right_values, strict=True)),
            dtype=bool,
            count=len(left_values),
        )
        similarity = process.cpdist(
            left_values,
            right_values,
            scorer=JaroWinkler.similarity,
            dtype=np.float64,
            workers=_workers(len(left_values)),
        )
        return _first_threshold_met([same_local, *(similarity >= t for t in self.spec.thresholds)], len(left_values))


class DateComparison(Comparison):
    """Dates: a day/month swap or a single wrong component (a typo in the year) is a near miss; then
    closeness in days."""

    def _graded_labels(self) -> list[str]:
        return ["day_month_swap_or_one_component", *(f"within_{int(t)}_days" for t in self.spec.thresholds)]

    @staticmethod
    def _parsed(column: Column) -> np.ndarray:
        """(year, month, day, ordinal day) per distinct value; values are ISO dates after normalisation."""
        parsed = column.derived.get("date")
        if parsed is None:
            rows = []
            for value in column.values:
                day = date.fromisoformat(value)
                rows.append((day.year, day.month, day.day, day.toordinal()))
            parsed = np.array(rows, dtype=np.int64).reshape(-1, 4)
            column.derived["date"] = parsed
        return parsed

    def _graded_levels(self, column: Column, left_codes: np.ndarray, right_codes: np.ndarray) -> np.ndarray:
        parsed = self._parsed(column)
        a, b = parsed[left_codes], parsed[right_codes]
        same_year = a[:, 0] == b[:, 0]
        day_month_swapped = same_year & (a[:, 1] == b[:, 2]) & (a[:, 2] == b[:, 1])
        one_component_off = (a[:, :3] == b[:, :3]).sum(axis=1) == 2
        days_apart = np.abs(a[:, 3] - b[:, 3])
        passes = [day_month_swapped | one_component_off, *(days_apart <= t for t in self.spec.thresholds)]
        return _first_threshold_met(passes, len(left_codes))


class NumericComparison(Comparison):
    def _graded_labels(self) -> list[str]:
        return [f"abs_diff<={_format_threshold(t)}" for t in self.spec.thresholds]

    def _graded_levels(self, column: Column, left_codes: np.ndarray, right_codes: np.ndarray) -> np.ndarray:
        numbers = column.derived.get("number")
        if numbers is None:
            numbers = np.array([float(value) for value in column.values], dtype=np.float64)
            column.derived["number"] = numbers
        difference = np.abs(numbers[left_codes] - numbers[right_codes])
        return _first_threshold_met([difference <= t for t in self.spec.thresholds], len(left_codes))


_KINDS: dict[str, type[Comparison]] = {
    "exact": ExactComparison,
    "jaro_winkler": JaroWinklerComparison,
    "levenshtein": LevenshteinComparison,
    "damerau_levenshtein": DamerauLevenshteinComparison,
    "email": EmailComparison,
    "date": DateComparison,
    "numeric": NumericComparison,
}


def build_comparison(spec: ComparisonSpec) -> Comparison:
    return _KINDS[spec.kind](spec)


def compare_pairs(comparisons: list[Comparison], table: RecordTable, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The comparison matrix: one row per pair, one int8 level per comparison."""
    matrix = np.empty((len(left), len(comparisons)), dtype=np.int8)
    for column_index, comparison in enumerate(comparisons):
        matrix[:, column_index] = comparison.compare(table, left, right)
    return matrix
