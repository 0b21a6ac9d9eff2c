"""Feature vectors from profile fields, by name, as a model's spec says.

The service holds each person's profile fields flat: {"traits.plan": "pro", "computed.orders_90d": 3,
"consent.channel:email": True, "scores.churn_risk": 0.2}. `FeatureAssembler` turns them into the
float32 row the model expects; the training pipeline uses the same assembler, so what a model was
trained on and what it is served are computed by one piece of code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from cdp_kit.errors import InvalidArgument
from cdp_scoring.domain.spec import FeatureSpec, ModelSpec

DAY = 86_400.0
NAN = float("nan")
_FLOAT32_MAX = np.finfo(np.float32).max
_TRUE = frozenset({"true", "yes", "1", "on"})
_FALSE = frozenset({"false", "no", "0", "off", ""})


def _number(value: Any) -> float | None:
    kind = type(value)
    if kind is float or kind is int:
        return float(value) if math.isfinite(value) else None
    if kind is bool:
        return 1.0 if value else 0.0
    if kind is str:
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _bool(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return None if math.isnan(value) else (1.0 if value else 0.0)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return 1.0
        if lowered in _FALSE:
            return 0.0
    return None


def epoch_seconds(value: Any) -> float | None:
    """Epoch seconds (or milliseconds, told apart by size) or an ISO-8601 time; None if neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        if not math.isfinite(value):
            return None
        return value / 1000.0 if abs(value) > 1e11 else float(value)
    if isinstance(value, str) and value:
        text = value.strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)  # a time without a zone is UTC, as Segment sends them
        return parsed.timestamp()
    return None


class FeatureAssembler:
    """Builds a model's input rows from flat profile fields (one per person) or from named values."""

    __slots__ = ("_converters", "_defaults", "_row", "key", "names", "paths", "spec", "width")

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        # The same for every assembler of equal features (churn and propensity read the same ones): rows
        # assembled for one serve the other. A small int, where the features themselves hash field by field.
        self.key = _FEATURE_SETS.setdefault(spec.features, len(_FEATURE_SETS))
        self.names = tuple(f.name for f in spec.features)
        self.paths = tuple(f.path for f in spec.features)
        self.width = len(spec.features)
        self._defaults = tuple(_default(f) for f in spec.features)
        self._converters: tuple[Callable[[Any, float], float | None], ...] = tuple(_converter(f) for f in spec.features)
        self._row = _compile_row(spec.features, self._defaults, self._converters)

    def row(self, fields: Mapping[str, Any], now: float) -> list[float]:
        """The feature vector of one person at time `now` (epoch seconds; days_since counts from it)."""
        return self._row(fields, now)

    def matrix(self, people: Sequence[Mapping[str, Any]], now: float | Sequence[float]) -> np.ndarray:
        """Rows of many persons, at one time or at one time per person."""
        # Every row's values in one list, extended a row at a time: a comprehension taking each value of
        # each row one by one costs twice as much, and this runs for every person of every model scored.
        row, flat = self._row, []
        extend = flat.extend
        if isinstance(now, float | int):
            for fields in people:
                extend(row(fields, now))
        else:
            for fields, at in zip(people, now, strict=True):
                extend(row(fields, at))
        with np.errstate(over="ignore"):
            matrix = np.array(flat, dtype=np.float32).reshape(len(people), self.width)
        if np.isinf(matrix).any():
            # A field past float32's range (an order total of 1e39, a sum saturated at 1.8e308) became an
            # infinity, which models turn into infinite or NaN scores that no profile takes: it is the
            # largest float32 instead (a missing value stays NaN, the models' own "no value").
            np.clip(matrix, -_FLOAT32_MAX, _FLOAT32_MAX, out=matrix)
        return matrix

    def from_values(self, values: Sequence[float]) -> list[float]:
        """A raw vector as given by a caller, checked for length."""
        if len(values) != self.width:
            raise InvalidArgument(
                "features",
                f"{self.spec.key} takes {self.width} features ({', '.join(self.names)}), got {len(values)}",
            )
        return [float(v) for v in values]

    def from_named(self, named: Mapping[str, float]) -> list[float]:
        """A vector from feature name -> value; names not given take their defaults."""
        unknown = sorted(set(named) - set(self.names))
        if unknown:
            raise InvalidArgument(
                f"named_features.{unknown[0]}",
                f"{self.spec.key} has no feature {unknown[0]!r}; its features are {', '.join(self.names)}",
            )
        return [
            float(named[name]) if name in named else default
            for name, default in zip(self.names, self._defaults, strict=True)
        ]

    def defaults(self) -> list[float]:
        return list(self._defaults)

    def missing(self, fields: Mapping[str, Any], now: float) -> list[bool]:
        """Per feature, whether `row(fields, now)` took its default: the field is absent or its value is one
        the transform cannot read (an unseen category is read: it is -1, not the default)."""
        return [
            (value := fields.get(path)) is None or convert(value, now) is None
            for path, convert in zip(self.paths, self._converters, strict=True)
        ]


# Feature lists met so far -> their key (`FeatureAssembler.key`): one entry per distinct list deployed.
_FEATURE_SETS: dict[tuple[FeatureSpec, ...], int] = {}


def _compile_row(
    features: Sequence[FeatureSpec],
    defaults: Sequence[float],
    converters: Sequence[Callable[[Any, float], float | None]],
) -> Callable[[Mapping[str, Any], float], list[float]]:
    """One straight-line function per spec: rows are assembled for every scored person of every model,
    and the unrolled code costs about half of a loop over (path, converter, default) tuples. Only the
    spec's paths reach the source, as string literals (repr); defaults and converters are passed in."""
    lines = ["def row(fields, now):", "    get = fields.get"]
    names: dict[str, Any] = {"_float": float, "_str": str, "_DAY": DAY}
    outs = []
    for i, feature in enumerate(features):
        names[f"_d{i}"], names[f"_c{i}"] = defaults[i], converters[i]
        lines.append(f"    v = get({feature.path!r})")
        if feature.transform == "number":
            # A plain float, the common case, skips the call (inf - inf and nan - nan are nan).
            lines.append(
                f"    r{i} = _d{i} if v is None else (v if type(v) is _float and v - v == 0.0 else "
                f"(_d{i} if (c := _c{i}(v, now)) is None else c))"
            )
        elif feature.transform == "days_since":
            # Epoch seconds as a plain float, the common case, computed here as the converter computes them
            # (nan and inf fail the range test and take the call: the default).
            lines.append(
                f"    r{i} = _d{i} if v is None else ((now - v) / _DAY if type(v) is _float and -1e11 <= v <= 1e11 "
                f"else (_d{i} if (c := _c{i}(v, now)) is None else c))"
            )
        elif feature.transform == "bool":
            lines.append(
                f"    r{i} = _d{i} if v is None else (1.0 if v is True else 0.0 if v is False else "
                f"(_d{i} if (c := _c{i}(v, now)) is None else c))"
            )
        elif feature.transform == "category":
            names[f"_i{i}"] = {name: float(k) for k, name in enumerate(feature.categories)}
            lines.append(
                f"    r{i} = _d{i} if v is None else (_i{i}.get(v, -1.0) if type(v) is _str else "
                f"(_d{i} if (c := _c{i}(v, now)) is None else c))"
            )
        else:
            lines.append(f"    r{i} = _d{i} if v is None or (c := _c{i}(v, now)) is None else c")
        outs.append(f"r{i}")
    lines.append(f"    return [{', '.join(outs)}]")
    exec("\n".join(lines), names)
    return names["row"]


def _default(feature: FeatureSpec) -> float:
    if feature.default is None:
        return NAN
    if isinstance(feature.default, str):
        return float(feature.categories.index(feature.default))
    return float(feature.default)


def _converter(feature: FeatureSpec) -> Callable[[Any, float], float | None]:
    if feature.transform == "number":
        return lambda value, now: _number(value)
    if feature.transform == "bool":
        return lambda value, now: _bool(value)
    if feature.transform == "days_since":

        def days_since(value: Any, now: float) -> float | None:
            seconds = epoch_seconds(value)
            return None if seconds is None else (now - seconds) / DAY

        return days_since
    index = {name: float(i) for i, name in enumerate(feature.categories)}
    return lambda value, now: index.get(value, -1.0) if isinstance(value, str) else None
