"""One percentile over the whole population when replicas split the partitions: a mergeable summary of each
percentile field per partition, shared through NATS KV, and one value per round that every replica uses.

**The summary** of a partition's numbers (n of them, sorted x_0 <= ... <= x_{n-1}) is the numbers
themselves when n <= SUMMARY_POINTS (1001), and otherwise the 1001 order statistics at ranks
round(j * (n - 1) / 1000), j = 0..1000, each standing for the ranks since the previous one. Merged, the
summaries give an approximate sorted population in which every value sits at its own rank or at most
(n_p - 1) / 1000 + 1 ranks early (it stands for ranks up to it, in its partition p). Hence:

- when every partition holds at most 1001 numbers the merged percentile is exact (the same value
  `cdp_lang.percentiles` computes over the union: NumPy's linear interpolation);
- otherwise it lies between the exact p-th percentile and the exact (p + d)-th, d = 0.1 + 100 * P / (N - 1)
  percentile points (P partitions, N numbers): never below the exact value, at most a tenth of a point
  and a rank per partition above it. For the top decile of 100,000 persons over 16 partitions, between
  the exact 90th and 90.12th percentile.

A summary is at most 1001 numbers per field per partition (about 20 kB of JSON), whatever the population.

**Sharing** (`SharedPercentiles`): keys of the partition ownership bucket (`CDP_OWNERSHIP`, see
`cdp_kit.ownership.nats_kv`), in segmentation's own group, which its NATS user may already read and write:

- `segmentation.percentiles.p<p>`: partition p's summaries (field key -> summary), written by the replica
  serving it at each round boundary after its persons changed;
- `segmentation.percentiles.values`: the values of the last decided round, {"round", "values"}. The first
  replica at a boundary with summaries not yet in a decided round merges every partition's latest
  summary (its own partitions fresh, the others' as last written: at most one round old) and writes the
  values with the KV's compare-and-set; a replica that loses the race, or had nothing new, takes the
  values written. Every replica therefore evaluates its persons against the same value in the same
  round, and their members together are those one process holding everyone would have with that value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from cdp_kit.ownership.nats_kv import NatsKvLeaseStore
from cdp_lang.percentiles import percentile_of

SUMMARY_POINTS = 1001
Summary = dict[str, Any]  # {"n": how many numbers, "points": the numbers kept, ascending}


def summarise(numbers: np.ndarray) -> Summary:
    """The summary of a partition's numbers (NaN: no number, left out)."""
    values = np.sort(numbers[np.isfinite(numbers)])
    n = int(values.size)
    if n > SUMMARY_POINTS:
        values = values[_ranks(n)]
    return {"n": n, "points": values.tolist()}


def merged_percentile(summaries: Iterable[Summary], percent: float) -> float | None:
    """The percentile over every summarised partition (None: no number anywhere), within the bound above."""
    parts = [s for s in summaries if s["n"]]
    if not parts:
        return None
    if all(len(s["points"]) == s["n"] for s in parts):  # every number is there: exact
        return percentile_of(np.concatenate([np.asarray(s["points"], dtype=np.float64) for s in parts]), percent)
    values = np.concatenate([np.asarray(s["points"], dtype=np.float64) for s in parts])
    weights = np.concatenate([_weights(s) for s in parts])
    order = np.argsort(values, kind="stable")
    values, cumulative = values[order], np.cumsum(weights[order])
    total = int(cumulative[-1])
    rank = (total - 1) * percent / 100
    low, high = int(np.floor(rank)), int(np.ceil(rank))
    # The value at 0-based rank k: the first point whose cumulative weight passes k.
    at_low = values[int(np.searchsorted(cumulative, low + 1))]
    at_high = values[int(np.searchsorted(cumulative, high + 1))]
    return float(at_low + (at_high - at_low) * (rank - low))


def _ranks(n: int) -> np.ndarray:
    return np.rint(np.arange(SUMMARY_POINTS) * ((n - 1) / (SUMMARY_POINTS - 1))).astype(np.int64)


def _weights(summary: Summary) -> np.ndarray:
    """How many ranks each kept number stands for (its own and those since the previous one kept)."""
    n, kept = summary["n"], len(summary["points"])
    if kept == n:
        return np.ones(n, dtype=np.int64)
    return np.diff(_ranks(n), prepend=-1)


@dataclass(frozen=True, slots=True)
class Decided:
    """The values of a round, as written to the bucket (`revision`: for the compare-and-set)."""

    round: int
    values: dict[str, float | None]
    revision: int = 0


class SharedPercentiles:
    """Segmentation's percentile keys in the ownership bucket."""

    def __init__(self, kv, group: str) -> None:
        self.kv = kv
        self.prefix = f"{group}.percentiles"

    @classmethod
    async def open(cls, js, group: str) -> SharedPercentiles:
        # The lease store creates the bucket when it is missing, with the configuration its users expect.
        return cls((await NatsKvLeaseStore.open(js, group)).kv, group)

    async def put_summaries(self, by_partition: Mapping[int, Mapping[str, Summary]]) -> None:
        for partition, summaries in sorted(by_partition.items()):
            await self.kv.put(f"{self.prefix}.p{partition}", orjson.dumps(summaries))

    async def summaries(self, partitions: Iterable[int]) -> dict[int, dict[str, Summary]]:
        """The latest summaries written for `partitions` (a partition none was written for is left out)."""
        out = {}
        for partition in partitions:
            try:
                entry = await self.kv.get(f"{self.prefix}.p{partition}")
            except KeyNotFoundError:
                continue
            if entry.value:
                out[partition] = orjson.loads(entry.value)
        return out

    async def decided(self) -> Decided | None:
        try:
            entry = await self.kv.get(f"{self.prefix}.values")
        except KeyNotFoundError:
            return None
        doc = orjson.loads(entry.value or b"{}")
        return Decided(int(doc.get("round", 0)), dict(doc.get("values", {})), int(entry.revision or 0))

    async def decide(self, round_id: int, values: Mapping[str, float | None], last: Decided | None) -> bool:
        """Write round `round_id`'s values unless another replica wrote since `last` (False then)."""
        data = orjson.dumps({"round": round_id, "values": dict(values)})
        try:
            if last is None:
                await self.kv.create(f"{self.prefix}.values", data)
            else:
                await self.kv.update(f"{self.prefix}.values", data, last=last.revision)
        except KeyWrongLastSequenceError:
            return False
        return True
