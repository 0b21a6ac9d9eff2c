"""Percentiles of a population: what `percentile(scores.clv_value_365d, 90)` means, in one place.

The percentile of a field is taken over the values of every person of the population that has a number
there (a finite int or float; bools, strings and missing values are left out), by linear interpolation
between the closest ranks (NumPy's default, Excel's PERCENTILE.INC): with n values sorted, p % lies at rank
(n - 1) * p / 100. So `>= percentile(x, 90)` of twenty distinct values holds for the two highest, and
`percentile(x, 0)` and `percentile(x, 100)` are the smallest and the largest value. A population without a
single value has no percentile, and every comparison with it is false.

Who the population is belongs to the evaluator: `Columns` (the vectorised evaluator) takes it as the rows
it holds unless it is told the values (`Columns.percentiles`, given when a population is evaluated a chunk
at a time); the per-profile evaluator reads them from the mapping `compile_segment(..., percentiles=...)`
was given, under `PercentileSpec.key`. The one-person API has no population and refuses them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cdp_lang.nodes import Percentile, path_key, percent_text
from cdp_lang.values import number


@dataclass(frozen=True, slots=True)
class PercentileSpec:
    """One percentile a definition needs: `key` ("scores.clv@90") names it wherever its value is held."""

    key: str
    field: str
    sub: tuple[str, ...]
    percent: float


def spec_of(node: Percentile) -> PercentileSpec:
    key = f"{path_key(node.path)}@{percent_text(node.percent)}"
    return PercentileSpec(key, node.field, node.path[2:], node.percent)


def percentile_of(numbers: np.ndarray, percent: float) -> float | None:
    """The percentile of the finite numbers among `numbers` (NaN is no value); None when there are none."""
    values = numbers[np.isfinite(numbers)]
    if values.size == 0:
        return None
    return float(np.percentile(values, percent))


def value_at(record: Mapping[str, Any], field: str, sub: tuple[str, ...]) -> float | None:
    """A record's number at field (and sub-path), None when there is none."""
    value = record.get(field)
    for key in sub:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return number(value)


def numbers_of(records: Iterable[Mapping[str, Any]], spec: PercentileSpec) -> np.ndarray:
    """The spec's field of every record as float64 (NaN: no number)."""
    return np.fromiter(
        (np.nan if (v := value_at(r, spec.field, spec.sub)) is None else v for r in records), dtype=np.float64
    )


def population_percentiles(
    specs: Iterable[PercentileSpec], records: Iterable[Mapping[str, Any]]
) -> dict[str, float | None]:
    """The exact value of each spec over `records` (key -> value, None: no value in the population)."""
    specs = list(specs)
    rows = records if isinstance(records, list) else list(records)
    return {spec.key: percentile_of(numbers_of(rows, spec), spec.percent) for spec in specs}
