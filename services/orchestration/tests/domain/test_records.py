"""Stored forms of instances and arbiter state: what is stored is what comes back."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_orchestration.domain.arbiter import Kind, PersonState, ProposedAction, decide, observe
from cdp_orchestration.domain.document import parse_journey
from cdp_orchestration.domain.instance import ActionOutcome, Enter, EventArrived, TimerFired, new_instance, step
from cdp_orchestration.domain.records import instance_from_record, instance_record, person_from_record, person_record
from cdp_orchestration.domain.rules import parse_rules
from cdp_orchestration.domain.view import Event, PersonView

JOURNEY = parse_journey(
    {
        "id": "j",
        "entry": {"api": True},
        "goal": {"event": "Paid", "within": "3d"},
        "nodes": [
            {
                "id": "s",
                "type": "split",
                "variants": [{"name": "a", "weight": 1, "next": "d"}, {"name": "b", "weight": 1, "next": "d"}],
            },
            {"id": "d", "type": "delay", "duration": "1h", "next": "a1"},
            {
                "id": "a1",
                "type": "action",
                "channel": "email",
                "purpose": "Marketing",
                "template": {"b": "x"},
                "next": "w",
            },
            {"id": "w", "type": "wait", "condition": "traits.x < now", "timeout": "1d"},
        ],
    }
)
RULES = parse_rules(
    {
        "quiet_hours": {"from": "21:00", "to": "08:00"},
        "approval": {"above": 10},
        "suppressions": [{"id": "s", "after_event": "Ticket", "within": "1d"}],
    }
)


def roundtrip_instance(instance):
    return instance_from_record(orjson.loads(orjson.dumps(instance_record(instance))))


def roundtrip_person(state):
    return person_from_record(orjson.loads(orjson.dumps(person_record(state))))


@settings(max_examples=40, deadline=None)
@given(
    person=st.text(min_size=1, max_size=8),
    stage=st.integers(0, 4),
    entry=st.dictionaries(st.text(max_size=5), st.integers(-(2**53), 2**53) | st.text(max_size=5)),
)
def test_an_instance_at_any_stage_comes_back_as_it_was_stored(person: str, stage: int, entry: dict) -> None:
    view = PersonView(person, {"traits.x": 5_000.0})
    instance, _ = step(new_instance(JOURNEY, person, "t"), JOURNEY, Enter(properties=entry), view, 0.0)
    stages = [
        lambda i: step(i, JOURNEY, TimerFired(i.timers[0].id), view, 3600.0)[0],
        lambda i: step(i, JOURNEY, ActionOutcome(i.pending[0], Kind.SENT), view, 3601.0)[0],
        lambda i: step(i, JOURNEY, EventArrived(Event("e", "Paid", 3602.0)), view, 3602.0)[0],
        lambda i: step(i, JOURNEY, TimerFired(i.timers[-1].id), view, 5_000.0)[0],
    ]
    for advance in stages[:stage]:
        instance = advance(instance)
    assert roundtrip_instance(instance) == instance


def test_person_state_with_sends_holds_approvals_and_seen_events_comes_back() -> None:
    view = PersonView("p1", {"consent.purpose:Marketing": True})
    state = PersonState("p1")
    for n, (now, value) in enumerate(((12 * 3600.0, None), (23 * 3600.0, None), (12 * 3600.0, 50.0))):
        proposal = ProposedAction(f"a{n}", "p1", "j", 1, "i", "n", "email", "offer", "Marketing", 5, now, value)
        state = decide(state, proposal, view, RULES, now).state
    state = observe(state, Event("e", "Ticket", 100.0), RULES)
    assert state.sent and state.deferred and state.awaiting and state.last_seen
    assert roundtrip_person(state) == state


def test_a_record_of_another_format_is_refused_not_misread() -> None:
    record = instance_record(new_instance(JOURNEY, "p", "t"))
    with pytest.raises(ValueError, match="format"):
        instance_from_record({**record, "v": 99})
