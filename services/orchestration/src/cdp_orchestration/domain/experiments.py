"""Experiment read-out for a journey's split: entries and goal conversions per variant, uplift against the
control group and a significance figure, from counts alone.

Counts come from the instances' commands (`tally`): `Assigned` adds an entry to its variant, `RecordGoal` a
conversion to each variant the instance was assigned (an instance converts at most once). `split_stats`
reads them per split of a journey, with the split's own control variant.

Significance is a two-sided two-proportion z-test with the pooled rate (the textbook test for "is this
conversion rate different from control's"):

    p = (x_v + x_c) / (n_v + n_c)      se = sqrt(p (1 - p) (1/n_v + 1/n_c))
    z = (rate_v - rate_c) / se          p_value = erfc(|z| / sqrt(2))

It is a normal approximation: `reliable` is False until each group has at least 5 conversions and 5
non-conversions (below that the p-value is still shown but should not be trusted). With no control group,
or a group without entries, uplift and p-value are None rather than a made-up number. A p-value is not a
stopping rule: looking every day and stopping at the first p < 0.05 overstates significance.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from cdp_orchestration.domain.instance import Assigned, RecordGoal
from cdp_orchestration.domain.journey import Journey, Split

MIN_CELL = 5


@dataclass(frozen=True, slots=True)
class Counts:
    entries: int = 0
    conversions: int = 0

    def __post_init__(self) -> None:
        if self.entries < 0 or not 0 <= self.conversions <= self.entries:
            raise ValueError(f"conversions ({self.conversions}) must be between 0 and entries ({self.entries})")

    @property
    def rate(self) -> float | None:
        return self.conversions / self.entries if self.entries else None


@dataclass(frozen=True, slots=True)
class VariantStats:
    variant: str
    control: bool
    entries: int
    conversions: int
    rate: float | None
    uplift: float | None  # rate - control's rate (absolute, in conversion-rate points)
    relative_uplift: float | None  # uplift / control's rate
    z: float | None
    p_value: float | None
    reliable: bool


def z_test(treated: Counts, control: Counts) -> tuple[float, float] | None:
    """(z, two-sided p-value) of the pooled two-proportion z-test, None when it is undefined."""
    if not treated.entries or not control.entries:
        return None
    pooled = (treated.conversions + control.conversions) / (treated.entries + control.entries)
    variance = pooled * (1.0 - pooled) * (1.0 / treated.entries + 1.0 / control.entries)
    if variance == 0.0:
        return None  # every entrant converted, or none did: no difference can be measured
    z = (treated.conversions / treated.entries - control.conversions / control.entries) / math.sqrt(variance)
    return z, math.erfc(abs(z) / math.sqrt(2.0))


def _reliable(counts: Counts) -> bool:
    return counts.conversions >= MIN_CELL and counts.entries - counts.conversions >= MIN_CELL


def experiment(counts: Mapping[str, Counts], control: str | None) -> list[VariantStats]:
    """Per-variant figures, in the order given; `control` names the control variant (None: no control)."""
    base = counts.get(control) if control is not None else None
    out: list[VariantStats] = []
    for name, mine in counts.items():
        uplift = relative = z = p_value = None
        reliable = False
        if base is not None and name != control and mine.rate is not None and base.rate is not None:
            uplift = mine.rate - base.rate
            relative = uplift / base.rate if base.rate else None
            tested = z_test(mine, base)
            if tested is not None:
                z, p_value = tested
            reliable = _reliable(mine) and _reliable(base)
        out.append(
            VariantStats(
                name, name == control, mine.entries, mine.conversions, mine.rate, uplift, relative, z, p_value, reliable
            )
        )
    return out


Tally = dict[str, dict[str, Counts]]  # split node id -> variant -> counts


def tally(commands: Iterable[object], into: Tally | None = None) -> Tally:
    """Entries and conversions per split and variant, from instances' `Assigned` and `RecordGoal` commands."""
    counts: Tally = into if into is not None else {}
    for command in commands:
        if isinstance(command, Assigned):
            variants = counts.setdefault(command.node_id, {})
            mine = variants.get(command.variant, Counts())
            variants[command.variant] = replace(mine, entries=mine.entries + 1)
        elif isinstance(command, RecordGoal):
            for node_id, variant in command.variants.items():
                variants = counts.setdefault(node_id, {})
                mine = variants.get(variant, Counts())
                variants[variant] = replace(mine, conversions=mine.conversions + 1)
    return counts


def split_stats(journey: Journey, counts: Tally) -> dict[str, list[VariantStats]]:
    """Per split step of the journey, every variant (none entered yet: zeros) against the split's control."""
    out: dict[str, list[VariantStats]] = {}
    for node_id, node in journey.nodes.items():
        if not isinstance(node, Split):
            continue
        seen = counts.get(node_id, {})
        control = next((v.name for v in node.variants if v.control), None)
        out[node_id] = experiment({v.name: seen.get(v.name, Counts()) for v in node.variants}, control)
    return out
