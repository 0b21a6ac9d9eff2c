"""Population percentiles in real time: `scores.clv_value_365d >= percentile(scores.clv_value_365d, 90)`.

The population is every person this replica holds (its partitions; every partition in hot standby), and a
percentile is taken over those with a number in the field (cdp_lang.percentiles says how). Its value lives
in `percentiles` (key -> value), the mapping every compiled definition's per-profile predicate reads.

- Builds and `Estimate` compute it exactly over the population they evaluate (builds.py); a build going
  live sets the values it was built with (`_move_percentiles`), so its members and the value agree.
- In real time the exact value is not recomputed per change (a pass over the population): a change of a
  field some percentile is taken of, a person first seen and a person removed mark the percentiles stale,
  and every `CDP_SEGMENTATION_PERCENTILE_SECONDS` stale ones are recomputed (`recompute_percentiles`), at
  a quiescent point of the stream like the timers of an idle partition. Between two rounds a person
  changed is evaluated against the value of the last round.
- When a value moves from a to b, only the persons whose compared value lies between a and b (inclusive)
  can change their answer: those are evaluated again, with the segments referring to theirs, and every
  flip is a transition with reason `percentile` at the round's time. A round costs one pass over the
  held persons per percentile that changed (reading one field), plus the evaluations of those in range.
- The values are snapshotted with the persons (a "$percentiles" mark), so a restart evaluates the replay
  with the values the snapshotted memberships were evaluated with; the first round after it catches up.
  A round's transitions not yet included in a snapshot when the process dies are found again by the
  first round after the restart, under that round's id (cause "q<ms>"): unlike timer and stream
  transitions they may then be published twice. For the same reason hot standby replicas, whose rounds
  run at their own times over what each has applied, publish their percentile transitions under ids of
  their own: a consumer may see such a transition once from each.

Replicas that split the partitions each take the percentile over their own persons. Persons are spread
over partitions by a hash of their id, so each replica's population is a uniform sample of the whole and
its percentile an estimate of the global one (for a decile of 100,000 persons on 2 replicas, a few tenths
of a percentile point); hot standby (the prod values) holds every partition, so there it is exact.

`Percentiles` is the part of `SegmentationEngine` that does this; its state is set up in the engine's
`__init__`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cdp_lang.percentiles import population_percentiles, value_at
from cdp_segmentation.evaluation import Transition

if TYPE_CHECKING:
    from cdp_segmentation.catalogue import Segment

log = logging.getLogger("cdp.segmentation.engine")

PERCENTILES = "$percentiles"  # snapshot mark: the values the held memberships were evaluated with


class Percentiles:
    """Keeps the population percentiles the live segments compare with current, on a bounded schedule."""

    def percentile_marks(self) -> dict[str, dict[str, Any]]:
        return {PERCENTILES: {"values": dict(self.percentiles)}}

    def load_percentiles(self, mark: Mapping[str, Any] | None) -> None:
        """The values of the last snapshot; stale, so the first round recomputes them."""
        if mark:
            self.percentiles.update(mark.get("values", {}))
        self.percentiles_stale = True

    def exact_percentiles(self, keys: Any = None) -> dict[str, float | None]:
        """The exact value of the live segments' percentiles (or of these specs) over the held persons."""
        specs = list(self.index.percentiles.values()) if keys is None else list(keys)
        if not specs:
            return {}
        return population_percentiles(specs, [person.fields for person in self.persons.values()])

    async def _percentile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.percentile_interval)
            try:
                await self.recompute_percentiles()
            except Exception as exc:  # stale still: the next round tries again
                log.warning("percentile round failed: %r", exc)

    async def recompute_percentiles(self) -> int:
        """If anything moved a percentile since the last round: recompute them all exactly, evaluate again
        the persons a moved value can change, publish what flipped. Returns the persons evaluated."""
        if not self.percentiles_stale or not self.index.percentiles:
            return 0
        async with self._quiet(), self.held.mutating():
            self.percentiles_stale = False
            values = self.exact_percentiles()
            by_partition = self._move_percentiles(values, self.clock())
            await self._publish_durably([m for p, ts in sorted(by_partition.items()) for m in self._messages(p, ts)])
            return self._moved_persons

    def _move_percentiles(self, values: Mapping[str, float | None], now: float) -> dict[int, list[Transition]]:
        """Set the percentiles to `values` and evaluate again, for the live segments comparing with one that
        moved, the persons whose compared value lies between its old and new value (all who have one, when
        either is no value). The transitions, by partition."""
        moved: dict[str, tuple[float | None, float | None]] = {}
        for key, value in values.items():
            old = self.percentiles.get(key)
            if old != value:
                moved[key] = (old, value)
                self.percentiles[key] = value
        self._moved_persons = 0
        if not moved:
            return {}
        self.held.marks_dirty = True
        # (segment, compared field, sub-path, low, high) for each comparison with a moved percentile
        ranges = []
        for key, (old, new) in moved.items():
            if old is None or new is None:
                low, high = -math.inf, math.inf
            else:
                low, high = min(old, new), max(old, new)
            for segment, field, sub in self.index.percentile_readers.get(key, ()):
                ranges.append((segment, field, sub, low, high))
        affected: dict[str, dict[str, Segment]] = {}
        partition_of, active = self._partition, self.active
        for person_id, person in self.persons.items():
            if partition_of(person_id) not in active:
                continue  # a partition still arriving: its replay evaluates with the new values
            for segment, field, sub, low, high in ranges:
                value = value_at(person.fields, field, sub)
                if value is not None and low <= value <= high:
                    affected.setdefault(person_id, {})[segment.id] = segment
        by_partition: dict[int, list[Transition]] = {}
        cause = f"q{round(now * 1000)}"
        for person_id, segments in affected.items():
            self._evaluate(
                person_id,
                self.persons[person_id],
                self.index.readers_of_all(segments.values()),
                now=now,
                at=now,
                reason="percentile",
                cause=cause,
                out=by_partition.setdefault(self._partition(person_id), []),
            )
        self._moved_persons = len(affected)
        if affected:
            log.info(
                "percentiles moved",
                extra={"percentiles": sorted(moved), "persons": len(affected)},
            )
        return by_partition
