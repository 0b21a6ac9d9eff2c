"""The context a CRM task or case carries: the fields its action lists, or the person's top scores."""

from __future__ import annotations

import pytest

from cdp_orchestration.domain.document import parse_journey
from cdp_orchestration.domain.signals import readable, top_signals
from cdp_orchestration.domain.view import PersonView

GRACE = PersonView(
    "grace",
    {
        "traits.plan": "pro",
        "traits.first_name": "Grace",
        "computed.tickets_30d": 4.0,
        "computed.sessions_7d": 21.0,
        "scores.churn_risk": 0.006123456,
        "scores.fraud_risk": 0.0004,
        "scores.conversion": 0.41,
        "scores.clv_value_365d": 1234.5678,
        "scores.upsell": 0.2,
        "scores.nps": 7.0,
        "scores.label": "high",  # not a number: not ranked
        "consent.purpose:Service": True,
    },
)


def _action(**node: object):
    node = {"id": "a", "type": "action", "channel": "crm", "purpose": "Service", **node}
    node.setdefault("template", {"kind": "task", "subject": "Call {{ traits.first_name }}"})
    return parse_journey({"id": "j", "entry": {"api": True}, "nodes": [node]}).nodes["a"]


def test_a_crm_action_listing_none_carries_the_persons_five_highest_scores() -> None:
    assert top_signals(_action(), GRACE) == (
        ("scores.clv_value_365d", "1234.57"),
        ("scores.nps", "7"),
        ("scores.conversion", "0.41"),
        ("scores.upsell", "0.2"),
        ("scores.churn_risk", "0.00612"),
    )
    assert top_signals(_action(), PersonView("nobody", {"traits.plan": "pro"})) == ()


def test_a_crm_action_carries_the_fields_it_lists_in_order_and_leaves_out_what_the_person_lacks() -> None:
    action = _action(signals=["scores.churn_risk", "computed.tickets_30d", "traits.plan", "computed.refunds_30d"])
    assert action.signals == ("scores.churn_risk", "computed.tickets_30d", "traits.plan", "computed.refunds_30d")
    assert top_signals(action, GRACE) == (
        ("scores.churn_risk", "0.00612"),
        ("computed.tickets_30d", "4"),
        ("traits.plan", "pro"),
    )


def test_other_channels_carry_no_signals() -> None:
    email = _action(channel="email", template={"subject": "Hi"})
    assert top_signals(email, GRACE) == ()


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (399.0, "399"),
        (3, "3"),
        (-2.0, "-2"),
        (0.1 + 0.2, "0.3"),
        (0.5, "0.5"),
        (0.006123456, "0.00612"),
        (12.3456, "12.35"),
        (-0.04567, "-0.0457"),
        (1e-9, "1e-09"),
        (True, "true"),
        (False, "false"),
        ("pro", "pro"),
        ("two\nlines", "two lines"),
        ("x" * 300, "x" * 199 + "…"),
        (["a", 2.0], "a, 2"),
        ({"city": "Berlin", "zip": 10115.0}, "city: Berlin, zip: 10115"),
        (float("inf"), "inf"),
    ],
)
def test_values_read_as_a_person_would_write_them(value: object, text: str) -> None:
    assert readable(value) == text
