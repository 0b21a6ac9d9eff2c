"""The per-partition percentile summaries replicas share (summaries.py): exact while every partition is
small, within the stated bound otherwise, whatever the distribution."""

from __future__ import annotations

import numpy as np
import pytest

from cdp_segmentation.summaries import SUMMARY_POINTS, merged_percentile, summarise

PERCENTS = (0, 1, 10, 25, 50, 75, 90, 99, 99.9, 100)


def split(values: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(values, np.cumsum(sizes)[:-1])


def test_partitions_of_at_most_a_summary_each_give_the_exact_percentile():
    rng = np.random.default_rng(3)
    values = rng.lognormal(3.0, 1.0, 3000)
    parts = split(values, [1001, 999, 700, 300])
    summaries = [summarise(part) for part in parts]
    for percent in PERCENTS:
        assert merged_percentile(summaries, percent) == np.percentile(values, percent)


@pytest.mark.parametrize(
    "values",
    [
        np.random.default_rng(1).lognormal(3.0, 1.5, 40_000),
        np.random.default_rng(2).integers(0, 7, 40_000).astype(float),  # many ties
        np.concatenate([np.zeros(30_000), np.random.default_rng(4).normal(100, 5, 10_000)]),
    ],
    ids=["lognormal", "ties", "mostly-zero"],
)
def test_larger_partitions_stay_within_the_stated_bound(values):
    rng = np.random.default_rng(5)
    values = rng.permutation(values)
    parts = split(values, [20_000, 12_000, 5_000, 3_000])
    summaries = [summarise(part) for part in parts]
    assert all(len(s["points"]) == SUMMARY_POINTS for s in summaries)
    n = values.size
    slack = 0.1 + 100 * len(parts) / (n - 1)  # percentile points, at most, above the exact value
    for percent in PERCENTS:
        estimate = merged_percentile(summaries, percent)
        assert np.percentile(values, percent) <= estimate <= np.percentile(values, min(100, percent + slack))


def test_numbers_only():
    assert merged_percentile([summarise(np.array([np.nan])), summarise(np.array([]))], 50) is None
    assert merged_percentile([summarise(np.array([np.nan, 4.0])), summarise(np.array([2.0]))], 50) == 3.0
