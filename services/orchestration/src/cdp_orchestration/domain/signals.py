"""The context a CRM task or case carries: the person's top signals, as (field, readable value) pairs.

Whoever picks up a task ("call Grace, she may leave") needs to see why without opening the CDP, so a `crm`
action's message carries signals (`ActionMessage.signals`, which the CRM connector maps as `action.signals`):

- the profile fields its node lists (`signals: ["scores.churn_risk", "computed.tickets_30d", "traits.plan"]`),
  in that order; a listed field the person does not have (absent or null) is left out: context helps the
  task, it never holds it back (a template's fields are the ones a message cannot go without);
- a node listing none: the person's scores (every numeric `scores.*` they have), highest first (ties by
  name), at most `DEFAULT_COUNT` (`cdp_kit.signals.top_scores`, the CRM connector's ranking too: where
  orchestration does not keep every score, the message says so, `signals_from_profile`, and the connector
  puts the scores the profile service holds in place of these when it takes the task).

Other channels carry none (the document refuses `signals` on them). Values are text a person reads at a
glance (`readable`, `cdp_kit.signals`): whole numbers without ".0", other numbers rounded to a few significant digits, text on
one line and cut at `MAX_TEXT` characters. Signals are a person's data: the service logs their names at
most, never a value, and decisions do not record them.
"""

from __future__ import annotations

from cdp_kit.signals import DEFAULT_COUNT, MAX_TEXT, readable, top_scores
from cdp_orchestration.domain.journey import CRM, Action
from cdp_orchestration.domain.view import PersonView

__all__ = ["DEFAULT_COUNT", "MAX_TEXT", "readable", "top_signals"]


def top_signals(action: Action, view: PersonView) -> tuple[tuple[str, str], ...]:
    """(field, readable value) pairs the action's task or case carries for this person (see the module)."""
    if action.channel != CRM:
        return ()
    fields = view.fields
    if action.signals:
        return tuple((name, readable(fields[name])) for name in action.signals if fields.get(name) is not None)
    return top_scores(fields)
