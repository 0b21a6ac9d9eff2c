"""A person's top signals as text a person reads at a glance: the context of a CRM task or case.

Shared by orchestration, which decides a task and puts the signals its node names on it
(`cdp_orchestration.domain.signals`), and the CRM connector, which puts the person's top scores on a task
whose node names none (`ActionMessage.signals_from_profile`), read from the profile service when it takes
the action. One ranking and one way of writing values, so a task reads the same whichever service filled it.
Signals are a person's data: log their names at most, never a value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from cdp_kit.profile_fields import SCORES

DEFAULT_COUNT = 5
MAX_TEXT = 200

_SCORE = f"{SCORES}."


def top_scores(fields: Mapping[str, Any], count: int = DEFAULT_COUNT) -> tuple[tuple[str, str], ...]:
    """(field, readable value) of a person's scores (every numeric `scores.*` of `fields`, flat profile
    fields), highest first (ties by name), at most `count`."""
    scores = [
        (name, value)
        for name, value in fields.items()
        if name.startswith(_SCORE) and _number(value) and not math.isnan(value)
    ]
    scores.sort(key=lambda pair: (-pair[1], pair[0]))
    return tuple((name, readable(value)) for name, value in scores[:count])


def readable(value: Any) -> str:
    """A value as a person would write it: 399.0 -> "399", 0.006123 -> "0.00612", 12.3456 -> "12.35"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _number_text(value)
    if isinstance(value, Mapping):
        return ", ".join(f"{key}: {readable(inner)}" for key, inner in value.items() if inner is not None)
    if isinstance(value, list | tuple):
        return ", ".join(readable(inner) for inner in value if inner is not None)
    text = " ".join(str(value).split())  # one line: a signal is one "name: value" line in the CRM
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number_text(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    size = abs(value)
    if size >= 1:
        decimals = 2  # amounts, counts per day: cents are as fine as a reader goes
    elif size >= 1e-6:
        decimals = 2 - math.floor(math.log10(size))  # probabilities: three significant digits
    else:
        return f"{value:.2e}".replace(".00e", "e")
    text = f"{value:.{decimals}f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"
