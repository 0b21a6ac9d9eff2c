"""What an action mapping reads as `action.<field>`: the action's signals, and the author's own parts intact."""

from __future__ import annotations

from cdp.orchestration.v1 import orchestration_pb2
from cdp_crm.engine import action_source


def _case(**content: str) -> orchestration_pb2.ActionMessage:
    action = orchestration_pb2.ActionMessage(
        action_id="act-1", person_id="grace", channel="crm", crm_kind="case", category="service", content=content
    )
    action.signals.add(name="scores.churn_risk", value="0.00612")
    action.signals.add(name="computed.tickets_30d", value="4")
    return action


def test_the_actions_signals_are_name_value_lines_beside_its_rendered_parts() -> None:
    source = action_source(_case(subject="Churn risk: Grace", body="Please call her"))
    assert source["signals"] == "scores.churn_risk: 0.00612\ncomputed.tickets_30d: 4"
    assert (source["subject"], source["body"], source["id"]) == ("Churn risk: Grace", "Please call her", "act-1")


def test_a_template_part_called_signals_is_the_authors_and_is_kept() -> None:
    source = action_source(_case(subject="Churn risk", signals="risk 0.6%, 4 tickets this month"))
    assert source["signals"] == "risk 0.6%, 4 tickets this month"
