"""A CRM task or case reaches the connector with its context: the person's top signals, readable, and never
in a log line or a decision."""

from __future__ import annotations

import logging

from google.protobuf import struct_pb2

from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import subjects
from cdp_kit.timestamps import from_seconds
from cdp_orchestration.state import PERSONS

CASE = {
    "id": "save-at-risk",
    "category": "service",
    "entry": {"segment": "at_risk", "on": "entered"},
    "nodes": [
        {
            "id": "open-case",
            "type": "action",
            "channel": "crm",
            "purpose": "Service",
            "category": "transactional",
            "template": {"kind": "case", "subject": "Churn risk: {{ traits.first_name }}"},
        }
    ],
}
LISTED = {
    **CASE,
    "id": "call-at-risk",
    "nodes": [
        {
            **CASE["nodes"][0],
            "id": "call",
            "template": {"kind": "task", "subject": "Call {{ traits.first_name }}"},
            "signals": ["scores.churn_risk", "computed.tickets_30d", "traits.plan", "computed.refunds_30d"],
        }
    ],
}


async def _grace(world) -> None:
    change = profile_pb2.ProfileChanged(person_id="grace", cause="api", at=from_seconds(world.now()))
    change.traits["first_name"].CopyFrom(struct_pb2.Value(string_value="Grace"))
    change.traits["plan"].CopyFrom(struct_pb2.Value(string_value="pro"))
    change.computed["tickets_30d"].CopyFrom(struct_pb2.Value(number_value=4))
    change.consent["purpose:Service"] = True
    change.scores.update(
        {"churn_risk": 0.0061234, "clv_value_365d": 1234.5678, "conversion": 0.41, "upsell": 0.2, "nps": 7, "x": 0.01}
    )
    batch = profile_pb2.ProfileChangedBatch(changes=[change])
    await world._publish(subjects.profiles_changed(world.partition("grace")), batch.SerializeToString())

    async def applied() -> bool:  # sources interleave: let the change land before the segment entry
        stored = await world.store.get(PERSONS, "grace")
        return stored is not None and "scores.churn_risk" in stored.doc["fields"]

    await world.eventually(applied)


async def test_a_crm_case_carries_the_persons_top_scores_and_a_task_the_fields_its_node_lists(world_factory, caplog):
    caplog.set_level(logging.DEBUG)
    world = await world_factory()
    await world.publish_journey(CASE)
    await world.publish_journey(LISTED)
    await world.start()
    await _grace(world)
    await world.segment("grace", "at_risk")

    async def two():
        actions = await world.actions()
        return actions if len(actions) == 2 else None

    actions = {a.journey_id: a for a in await world.eventually(two)}
    case, task = actions["save-at-risk"], actions["call-at-risk"]
    assert (case.crm_kind, case.content["subject"]) == ("case", "Churn risk: Grace")
    assert [(s.name, s.value) for s in case.signals] == [
        ("scores.clv_value_365d", "1234.57"),
        ("scores.nps", "7"),
        ("scores.conversion", "0.41"),
        ("scores.upsell", "0.2"),
        ("scores.x", "0.01"),
    ]
    # The fields the node lists, in its order; one Grace does not have is left out, not a failed task.
    assert [(s.name, s.value) for s in task.signals] == [
        ("scores.churn_risk", "0.00612"),
        ("computed.tickets_30d", "4"),
        ("traits.plan", "pro"),
    ]
    decisions = await world.decisions("grace")
    assert sorted(d["kind"] for d in decisions) == ["sent", "sent"]
    # Signals are Grace's data: for the CRM only, never in a decision or a log line.
    for value in ("1234.57", "0.00612", "pro"):
        assert all(value not in str(d) for d in decisions)
        assert value not in caplog.text
