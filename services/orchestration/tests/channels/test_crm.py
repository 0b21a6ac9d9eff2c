"""CRM tasks and cases leave as ActionMessages on JetStream, once per action id."""

from __future__ import annotations

import pytest

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.errors import InvalidArgument
from cdp_orchestration.channels.base import Action, Content
from cdp_orchestration.channels.crm import CrmChannel, CrmMessage, crm_message
from cdp_orchestration.channels.wire import action_from_message, message_from_action


def task(action_id: str = "act-1", kind: str | None = "task") -> Action:
    return Action(
        action_id=action_id,
        person_id="person-1",
        channel="crm",
        content=Content(subject="Call: churn risk", body="Renewal due in 14 days."),
        attributes={
            "journey_id": "j-renewal",
            "journey_version": 3,
            "crm_kind": kind,
            "signals": {"scores.churn_risk": "0.91", "computed.tickets_30d": "2"},
            "decided_at": "2026-12-04T10:00:00+00:00",
        },
    )


async def test_a_republished_task_is_stored_once_by_jetstream(nats_client):
    js = nats_client.jetstream()
    await js.add_stream(name="ACTIONS_TEST", subjects=["actions.crm.>"], duplicate_window=60)

    async def publish(message: CrmMessage) -> None:
        await js.publish("actions.crm.0", message.body, headers=message.headers)

    channel = CrmChannel(publish)
    assert (await channel.send(task())).status == "accepted"
    assert (await channel.send(task())).status == "accepted"
    assert (await js.stream_info("ACTIONS_TEST")).state.messages == 1

    stored = await js.get_msg("ACTIONS_TEST", seq=1)
    assert stored.headers["Nats-Msg-Id"] == "act-1"
    message = pb.ActionMessage.FromString(stored.data)
    assert (message.channel, message.crm_kind, message.journey_id, message.journey_version) == (
        "crm",
        "task",
        "j-renewal",
        3,
    )
    assert dict(message.content) == {"subject": "Call: churn risk", "body": "Renewal due in 14 days."}
    assert [(s.name, s.value) for s in message.signals] == [
        ("scores.churn_risk", "0.91"),
        ("computed.tickets_30d", "2"),
    ]


async def test_a_bus_that_refuses_makes_a_retryable_failure():
    async def publish(message: CrmMessage) -> None:
        raise TimeoutError

    outcome = await CrmChannel(publish).send(task())
    assert (outcome.status, outcome.retryable) == ("failed", True)


async def test_a_task_without_a_kind_or_subject_is_refused_naming_the_field():
    published = []

    async def publish(message: CrmMessage) -> None:
        published.append(message)

    outcome = await CrmChannel(publish).send(task(kind=None))
    assert (outcome.status, outcome.reason, outcome.retryable) == ("failed", "invalid_crm_kind", False)
    with pytest.raises(InvalidArgument, match=r"content\.subject"):
        crm_message(
            Action(action_id="a", person_id="p", channel="crm", content=Content(), attributes={"crm_kind": "case"})
        )
    assert published == []


def test_actions_round_trip_through_the_wire_message():
    for action in (
        task(),
        Action(
            action_id="act-2",
            person_id="person-1",
            channel="push",
            address="fcm-token",
            content=Content(title="Back in stock", body="Your size is back", url="https://shop/p/1", data={"sku": "1"}),
            attributes={"journey_id": "j-1", "node_id": "n-3", "category": "offer"},
        ),
    ):
        assert (
            action_from_message(pb.ActionMessage.FromString(message_from_action(action).SerializeToString())) == action
        )
    with pytest.raises(InvalidArgument, match="channel"):
        action_from_message(pb.ActionMessage(action_id="a", person_id="p", channel="fax"))
