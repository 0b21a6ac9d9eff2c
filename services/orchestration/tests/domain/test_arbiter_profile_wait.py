"""The arbiter decides on profile fields at least as new as the person's events: while they lag
(`PersonView.behind`), an action waits for the profile, at most `profile_wait`, then is decided on what is
known with `profile_unavailable` in its reason."""

from __future__ import annotations

import pytest

from cdp_kit.errors import InvalidArgument
from cdp_orchestration.domain.arbiter import (
    PROFILE_UNAVAILABLE,
    Kind,
    PersonState,
    ProposedAction,
    decide,
    next_wake,
    release,
    withdraw,
)
from cdp_orchestration.domain.records import person_from_record, person_record
from cdp_orchestration.domain.rules import Rules, parse_rules
from cdp_orchestration.domain.view import PersonView

T0 = 1_796_385_600.0  # 2026-12-04 12:00 UTC
CONSENTING = {"consent.purpose:Marketing": True, "traits.email": "ada@example.com"}
RULES = Rules(profile_wait=600.0)


def action(n: int = 1, **extra: object) -> ProposedAction:
    fields = {"channel": "email", "category": "reminder", "purpose": "Marketing", **extra}
    return ProposedAction(f"a{n}", "p1", "j", 1, f"i{n}", "n", priority=10, proposed_at=T0, **fields)


def test_an_action_proposed_while_the_fields_lag_waits_without_a_decision():
    behind = PersonView("p1", {}, behind=T0)
    ruling = decide(PersonState("p1"), action(), behind, RULES, T0 + 0.01)
    assert ruling.decisions == ()  # no "no_consent" for consent that is on its way
    [held] = ruling.state.deferred
    assert held.profile and held.until == T0 + 600.0
    assert next_wake(ruling.state) == T0 + 600.0  # the longest it waits


def test_the_profile_catching_up_decides_the_waiting_action_at_once_on_the_new_fields():
    waiting = decide(PersonState("p1"), action(), PersonView("p1", {}, behind=T0), RULES, T0).state
    ruling = release(waiting, PersonView("p1", CONSENTING), RULES, T0 + 0.05)
    [decision] = ruling.decisions
    assert decision.kind is Kind.SENT and decision.reason == "sent"
    assert ruling.state.deferred == ()


def test_a_redelivered_proposal_of_a_waiting_action_is_not_decided_twice():
    view = PersonView("p1", {}, behind=T0)
    waiting = decide(PersonState("p1"), action(), view, RULES, T0).state
    assert decide(waiting, action(), view, RULES, T0 + 1).decisions == ()


def test_past_the_wait_the_action_is_decided_on_what_is_known_and_says_so():
    waiting = decide(PersonState("p1"), action(), PersonView("p1", {}, behind=T0), RULES, T0).state
    ruling = release(waiting, PersonView("p1", {}, behind=T0), RULES, T0 + 600.0)
    [decision] = ruling.decisions
    assert decision.kind is Kind.NO_CONSENT
    assert decision.by == PROFILE_UNAVAILABLE
    assert PROFILE_UNAVAILABLE in decision.reason and "600 s" in decision.reason


def test_a_consenting_person_past_the_wait_is_sent_to_with_the_reason_saying_the_fields_lagged():
    view = PersonView("p1", CONSENTING, behind=T0)
    waiting = decide(PersonState("p1"), action(), view, RULES, T0).state
    [decision] = release(waiting, view, RULES, T0 + 600.0).decisions
    assert decision.kind is Kind.SENT and PROFILE_UNAVAILABLE in decision.reason


def test_a_held_action_coming_due_while_the_fields_lag_waits_for_them_too():
    rules = parse_rules({"quiet_hours": {"from": "11:00", "to": "12:00"}, "profile_wait": "1m"})
    # Proposed in quiet hours (11:30 UTC): deferred to 12:00.
    early = ProposedAction(
        "a1", "p1", "j", 1, "i1", "n", channel="email", category="r", purpose="M", priority=10, proposed_at=T0 - 1800
    )
    ruling = decide(PersonState("p1"), early, PersonView("p1", {"consent.purpose:M": True}), rules, T0 - 1800)
    assert [d.kind for d in ruling.decisions] == [Kind.DEFERRED]
    # At 12:00 the person's latest event is not on the profile yet: it waits for it, not for more quiet hours.
    lagging = PersonView("p1", {"consent.purpose:M": True}, behind=T0 - 1)
    again = release(ruling.state, lagging, rules, T0)
    assert again.decisions == () and again.state.deferred[0].profile
    [decision] = release(again.state, PersonView("p1", {"consent.purpose:M": True}), rules, T0 + 2).decisions
    assert decision.kind is Kind.SENT


def test_the_wait_ends_with_the_action_s_own_validity():
    view = PersonView("p1", {}, behind=T0)
    waiting = decide(PersonState("p1"), action(expires_at=T0 + 30), view, RULES, T0).state
    assert waiting.deferred[0].until == T0 + 30
    [decision] = release(waiting, view, RULES, T0 + 30).decisions
    assert decision.kind is Kind.NO_CONSENT and decision.by == PROFILE_UNAVAILABLE


def test_a_waiting_action_withdrawn_by_its_instance_gets_its_final_decision():
    waiting = decide(PersonState("p1"), action(), PersonView("p1", {}, behind=T0), RULES, T0).state
    [decision] = withdraw(waiting, "a1", T0 + 1).decisions
    assert decision.kind is Kind.WITHDRAWN


def test_a_waiting_action_survives_the_record_round_trip():
    waiting = decide(PersonState("p1"), action(), PersonView("p1", {}, behind=T0), RULES, T0).state
    assert person_from_record(person_record(waiting)) == waiting


def test_profile_wait_is_a_rule_with_a_ten_minute_default():
    assert parse_rules({}).profile_wait == 600.0
    assert parse_rules({"profile_wait": "90s"}).profile_wait == 90.0
    with pytest.raises(InvalidArgument) as raised:
        parse_rules({"profile_wait": "soon"})
    assert raised.value.field == "rules.profile_wait"
