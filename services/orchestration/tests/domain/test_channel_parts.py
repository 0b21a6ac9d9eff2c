"""An action's template has the parts its channel sends: a missing one is refused when the journey is
validated, naming the node and field, not found when the first message fails (`empty_body` for an SMS, a CRM
task with no subject)."""

from __future__ import annotations

import pytest

from cdp_orchestration.domain.document import JourneyInvalid, parse_journey


def _journey(channel: str, template: dict) -> dict:
    action = {"id": "a", "type": "action", "channel": channel, "purpose": "Marketing", "template": template}
    return {"id": "j", "entry": {"api": True}, "nodes": [action]}


def _problems(document: dict) -> list[tuple[str, str, str]]:
    with pytest.raises(JourneyInvalid) as caught:
        parse_journey(document)
    return [(p.node, p.path, p.message) for p in caught.value.problems]


@pytest.mark.parametrize(
    ("channel", "template", "path"),
    [
        ("sms", {"subject": "Hi"}, "nodes.a.template.body"),
        ("sms", {"body": "  "}, "nodes.a.template.body"),
        ("crm", {"kind": "task", "body": "call them"}, "nodes.a.template.subject"),
        ("crm", {"kind": "meeting", "subject": "s"}, "nodes.a.template.kind"),
    ],
)
def test_a_part_the_channel_needs_is_named_when_missing(channel: str, template: dict, path: str) -> None:
    ((node, at, message),) = _problems(_journey(channel, template))
    assert (node, at) == ("a", path)
    assert channel in message


@pytest.mark.parametrize(
    ("channel", "template"),
    [
        ("sms", {"body": "Hi {{ traits.first_name }}"}),
        ("crm", {"kind": "case", "title": "Churn risk"}),
        ("crm", {"subject": "Churn risk"}),  # kind defaults to task
        ("email", {"subject": "Hi"}),
        ("webhook", {"data": "x"}),
    ],
)
def test_a_template_with_its_channels_parts_is_valid(channel: str, template: dict) -> None:
    assert parse_journey(_journey(channel, template)).nodes["a"].channel == channel
