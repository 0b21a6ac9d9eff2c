"""The context a CRM task or case carries: the person's top signals, as (field, readable value) pairs.

Whoever picks up a task ("call Grace, she may leave") needs to see why without opening the CDP, so a `crm`
action's message carries signals (`ActionMessage.signals`, which the CRM connector maps as `action.signals`):

- the profile fields its node lists (`signals: ["scores.churn_risk", "computed.tickets_30d", "traits.plan"]`),
  in that order; a listed field the person does not have (absent or null) is left out: context helps the
  task, it never holds it back (a template's fields are the ones a message cannot go without);
- a node listing none: the person's scores (every numeric `scores.*` they have), highest first (ties by
  name), at most `DEFAULT_COUNT`.

Other channels carry none (the document refuses `signals` on them). Values are text a person reads at a
glance (`readable`): whole numbers without ".0", other numbers rounded to a few significant digits, text on
one line and cut at `MAX_TEXT` characters. Signals are a person's data: the service logs their names at
most, never a value, and decisions do not record them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from cdp_kit.profile_fields import SCORES
from cdp_orchestration.domain.journey import CRM, Action
from cdp_orchestration.domain.view import PersonView

DEFAULT_COUNT = 5
MAX_TEXT = 200

_SCORE = f"{SCORES}."


def top_signals(action: Action, view: PersonView) -> tuple[tuple[str, str], ...]:
    """(field, readable value) pairs the action's task or case carries for this person (see the module)."""
    if action.channel != CRM:
        return ()
    fields = view.fields
    if action.signals:
        return tuple((name, readable(fields[name])) for name in action.signals if fields.get(name) is not None)
    scores = [
        (name, value)
        for name, value in fields.items()
        if name.startswith(_SCORE) and _number(value) and not math.isnan(value)
    ]
    scores.sort(key=lambda pair: (-pair[1], pair[0]))
    return tuple((name, readable(value)) for name, value in scores[:DEFAULT_COUNT])


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
