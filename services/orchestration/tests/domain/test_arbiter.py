"""The per-person arbiter: consent, suppression, approval, quiet hours, caps and priority, each decision
with its kind and reason; nothing dropped without one."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_kit.errors import InvalidArgument
from cdp_orchestration.domain import clock
from cdp_orchestration.domain.arbiter import (
    FINAL,
    Kind,
    PersonState,
    ProposedAction,
    approve,
    decide,
    merge_states,
    next_wake,
    observe,
    reject,
    release,
    withdraw,
)
from cdp_orchestration.domain.rules import parse_rules
from cdp_orchestration.domain.view import Event, PersonView

BERLIN = ZoneInfo("Europe/Berlin")
FIELDS = {
    "traits.timezone": "Europe/Berlin",
    "traits.email": "ada@example.com",
    "consent.purpose:Marketing": True,
    "scores.churn_risk": 0.3,
}
VIEW = PersonView("p1", FIELDS)
STATE = PersonState("p1")


def local(day: int, hour: int, minute: int = 0, month: int = 12, year: int = 2026) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=BERLIN).timestamp()


NOON = local(4, 12)


def action(n: int = 1, *, at: float = NOON, journey: str = "j", priority: int = 10, **extra: object) -> ProposedAction:
    fields = {"channel": "email", "category": "reminder", "purpose": "Marketing", **extra}
    return ProposedAction(f"a{n}", "p1", journey, 1, f"i{n}", "n", priority=priority, proposed_at=at, **fields)


def rules(**document: object):
    return parse_rules(document)


def only(ruling):
    (decision,) = ruling.decisions
    return decision


def test_sends_when_nothing_stands_in_the_way() -> None:
    ruling = decide(STATE, action(), VIEW, rules(), NOON)
    assert only(ruling).kind is Kind.SENT and only(ruling).reason == "sent"


def test_consent_per_purpose_and_channel_is_checked_at_decision_time() -> None:
    no_purpose = PersonView("p1", {**FIELDS, "consent.purpose:Marketing": False})
    decision = only(decide(STATE, action(), no_purpose, rules(), NOON))
    assert (decision.kind, decision.by, decision.reason) == (
        Kind.NO_CONSENT,
        "Marketing",
        "no consent for purpose Marketing",
    )
    never_asked = PersonView("p1", {"traits.timezone": "Europe/Berlin"})
    assert only(decide(STATE, action(), never_asked, rules(), NOON)).kind is Kind.NO_CONSENT
    refused_channel = PersonView("p1", {**FIELDS, "consent.channel:email": False})
    assert only(decide(STATE, action(), refused_channel, rules(), NOON)).reason == "no consent for channel email"
    # A transactional message needs no marketing consent, but a refused channel still stops it.
    receipt = action(category="transactional", purpose="Service")
    assert only(decide(STATE, receipt, never_asked, rules(), NOON)).kind is Kind.SENT
    assert only(decide(STATE, receipt, refused_channel, rules(), NOON)).kind is Kind.NO_CONSENT


def test_suppression_after_an_event_within_a_window_applies_to_its_categories_only() -> None:
    r = rules(
        suppressions=[{"id": "ticket", "categories": ["offer"], "after_event": "Support Ticket Opened", "within": "1d"}]
    )
    state = observe(STATE, Event("e1", "Support Ticket Opened", local(4, 9)), r)
    state = observe(state, Event("e0", "Support Ticket Opened", local(3, 9)), r)  # older: the latest is kept
    offer = action(category="offer")
    decision = only(decide(state, offer, VIEW, r, NOON))
    assert (decision.kind, decision.by, decision.reason) == (Kind.SUPPRESSED, "ticket", "suppressed by rule ticket")
    assert only(decide(state, action(), VIEW, r, NOON)).kind is Kind.SENT  # a reminder is not an offer
    assert only(decide(state, offer, VIEW, r, local(5, 9))).kind is Kind.SENT  # a day later
    assert observe(STATE, Event("e2", "Page Viewed", NOON), r) is STATE  # unwatched events are not kept


def test_suppression_by_a_condition_in_the_language() -> None:
    r = rules(
        suppressions=[
            {
                "id": "at-risk",
                "categories": ["promotion"],
                "condition": "scores.churn_risk > 0.8 and traits.open_tickets > 0",
            }
        ]
    )
    promo = action(category="promotion")
    at_risk = PersonView("p1", {**FIELDS, "scores.churn_risk": 0.9, "traits.open_tickets": 1})
    assert only(decide(STATE, promo, at_risk, r, NOON)).kind is Kind.SUPPRESSED
    no_ticket = PersonView("p1", {**FIELDS, "scores.churn_risk": 0.9, "traits.open_tickets": 0})
    assert only(decide(STATE, promo, no_ticket, r, NOON)).kind is Kind.SENT


def test_approval_gate_waits_then_approve_reject_or_expire() -> None:
    r = rules(approval={"above": 100, "expires_after": "1d"})
    big = action(1, value=150.0)
    ruling = decide(STATE, big, VIEW, r, NOON)
    decision = only(ruling)
    assert decision.kind is Kind.AWAITING_APPROVAL and decision.until == NOON + 86400
    assert next_wake(ruling.state) == NOON + 86400
    # A redelivered proposal of a held action changes nothing.
    assert decide(ruling.state, big, VIEW, r, NOON + 1).decisions == ()
    approved = approve(ruling.state, "a1", VIEW, r, NOON + 60)
    assert only(approved).kind is Kind.SENT and approved.state.awaiting == ()
    rejected = reject(ruling.state, "a1", NOON + 60)
    assert only(rejected).kind is Kind.REJECTED
    expired = release(ruling.state, VIEW, r, NOON + 86400)
    assert only(expired).kind is Kind.EXPIRED and expired.state.awaiting == ()
    assert only(approve(ruling.state, "a1", VIEW, r, NOON + 86400)).kind is Kind.EXPIRED
    # Small values pass; approval: true always waits.
    assert only(decide(STATE, action(2, value=50.0), VIEW, r, NOON)).kind is Kind.SENT
    assert only(decide(STATE, action(3, approval=True), VIEW, r, NOON)).kind is Kind.AWAITING_APPROVAL


def test_approved_during_quiet_hours_is_deferred_not_sent() -> None:
    r = rules(approval={"above": 100}, quiet_hours={"from": "21:00", "to": "08:00"})
    held = decide(STATE, action(value=500.0), VIEW, r, local(4, 20)).state
    decision = only(approve(held, "a1", VIEW, r, local(4, 23)))
    assert decision.kind is Kind.DEFERRED and decision.until == local(5, 8)


def test_quiet_hours_defer_to_the_next_allowed_instant_in_the_persons_zone() -> None:
    r = rules(quiet_hours={"from": "21:00", "to": "08:00", "channels": ["email", "sms"]})
    for now, until in ((local(4, 2), local(4, 8)), (local(4, 22), local(5, 8)), (local(4, 21), local(5, 8))):
        decision = only(decide(STATE, action(at=now), VIEW, r, now))
        assert (decision.kind, decision.until) == (Kind.DEFERRED, until)
    assert decision.reason == "deferred until 2026-12-05 08:00 Europe/Berlin (quiet hours)"
    assert (decision.instance_id, decision.person_id, decision.category) == ("i1", "p1", "reminder")
    assert only(decide(STATE, action(at=local(4, 8)), VIEW, r, local(4, 8))).kind is Kind.SENT
    assert only(decide(STATE, action(channel="push"), VIEW, r, local(4, 2))).kind is Kind.SENT  # not a quiet channel
    assert only(decide(STATE, action(category="transactional"), VIEW, r, local(4, 2))).kind is Kind.SENT
    # Without traits.timezone the rules' zone applies: 02:00 Berlin is 01:00 UTC, quiet until 08:00 UTC.
    decision = only(decide(STATE, action(), PersonView("p1", {"consent.purpose:Marketing": True}), r, local(4, 2)))
    assert decision.until == datetime(2026, 12, 4, 8, tzinfo=UTC).timestamp()


def test_quiet_hours_end_on_a_daylight_saving_day_at_the_local_time() -> None:
    r = rules(quiet_hours={"from": "22:00", "to": "07:00"})
    # 29 March 2026: Berlin's clocks jump from 02:00 to 03:00.
    decision = only(decide(STATE, action(), VIEW, r, local(29, 1, month=3)))
    assert decision.until == local(29, 7, month=3) == datetime(2026, 3, 29, 5, tzinfo=UTC).timestamp()


def test_a_deferral_longer_than_the_hold_limit_expires_with_its_reason() -> None:
    r = rules(quiet_hours={"from": "21:00", "to": "08:00"}, max_hold="1h")
    decision = only(decide(STATE, action(at=local(4, 2)), VIEW, r, local(4, 2)))
    assert decision.kind is Kind.EXPIRED and "quiet hours" in decision.reason


def test_a_merged_persons_sends_count_toward_the_survivors_caps_and_their_held_actions_follow() -> None:
    r = rules(
        caps=[{"id": "email-daily", "channel": "email", "per": "day", "limit": 1}],
        quiet_hours={"from": "21:00", "to": "08:00"},
    )
    absorbed = decide(PersonState("p2"), action(1), VIEW, r, NOON).state  # the other device got today's email
    absorbed = decide(absorbed, action(2, at=local(4, 22)), VIEW, r, local(4, 22)).state  # deferred to 08:00
    survivor = merge_states(PersonState("p1"), absorbed)
    assert survivor.person_id == "p1" and [h.action.person_id for h in survivor.deferred] == ["p1"]
    decision = only(decide(survivor, action(3, at=local(4, 13)), VIEW, r, local(4, 13)))
    assert (decision.kind, decision.by, decision.until) == (Kind.DEFERRED, "email-daily", local(5, 0))
    assert next_wake(survivor) == local(5, 8)
    # Merging again (a redelivered hand-over) counts nothing twice.
    assert merge_states(survivor, absorbed) == survivor


def test_caps_count_calendar_days_and_weeks_in_the_persons_zone() -> None:
    r = rules(caps=[{"id": "email-daily", "channel": "email", "per": "day", "limit": 1}])
    state = decide(STATE, action(1, at=local(4, 23, 30)), VIEW, r, local(4, 23, 30)).state
    # A full cap defers the action to the start of the cap's next period (the person's next day), never drops it.
    decision = only(decide(state, action(2), VIEW, r, local(4, 23, 45)))
    assert (decision.kind, decision.by, decision.until, decision.reason) == (
        Kind.DEFERRED,
        "email-daily",
        local(5, 0),
        "deferred until 2026-12-05 00:00 Europe/Berlin (cap email-daily full)",
    )
    assert not decision.final
    # 00:15 in Berlin is a new day (though still the same UTC day).
    assert only(decide(state, action(3), VIEW, r, local(5, 0, 15))).kind is Kind.SENT
    assert only(decide(state, action(4, channel="sms"), VIEW, r, local(4, 23, 45))).kind is Kind.SENT
    weekly = rules(caps=[{"id": "all-weekly", "per": "week", "limit": 2}])
    state = STATE
    for n, day in enumerate((7, 8)):  # Monday, Tuesday
        state = decide(state, action(n, channel="push" if n else "email"), VIEW, weekly, local(day, 12)).state
    sunday = only(decide(state, action(5, channel="sms", at=local(13, 23)), VIEW, weekly, local(13, 23)))
    assert (sunday.kind, sunday.until) == (Kind.DEFERRED, local(14, 0))  # to Monday 00:00, the next week
    assert only(decide(state, action(6, channel="sms"), VIEW, weekly, local(14, 0, 1))).kind is Kind.SENT  # Monday


def test_a_capped_action_goes_at_the_start_of_the_next_period() -> None:
    r = rules(caps=[{"id": "email-daily", "channel": "email", "per": "day", "limit": 1}])
    state = decide(STATE, action(1), VIEW, r, NOON).state
    ruling = decide(state, action(2, journey="cart"), VIEW, r, NOON + 60)
    assert only(ruling).kind is Kind.DEFERRED and next_wake(ruling.state) == local(5, 0)
    assert release(ruling.state, VIEW, r, local(4, 23, 59)).decisions == ()
    released = release(ruling.state, VIEW, r, local(5, 0))
    assert [(d.action_id, d.kind) for d in released.decisions] == [("a2", Kind.SENT)]
    assert released.state.deferred == () and next_wake(released.state) is None


def test_when_several_caps_are_full_the_action_waits_for_the_one_that_frees_up_last() -> None:
    r = rules(
        caps=[
            {"id": "email-daily", "channel": "email", "per": "day", "limit": 1},
            {"id": "all-weekly", "per": "week", "limit": 1},
        ]
    )
    state = decide(STATE, action(1), VIEW, r, NOON).state  # Friday 4 December
    decision = only(decide(state, action(2), VIEW, r, NOON + 60))
    assert (decision.kind, decision.by, decision.until) == (Kind.DEFERRED, "all-weekly", local(7, 0))


def test_a_capped_action_whose_validity_ends_first_expires_with_the_reason() -> None:
    r = rules(caps=[{"id": "email-daily", "channel": "email", "per": "day", "limit": 1}])
    state = decide(STATE, action(1), VIEW, r, NOON).state
    short = action(2, expires_at=local(4, 18))  # the action's own validity ends before Berlin's midnight
    decision = only(decide(state, short, VIEW, r, NOON + 60))
    assert (decision.kind, decision.by) == (Kind.EXPIRED, "email-daily")
    assert decision.reason == (
        "expired: cap email-daily stays full past the action's validity (2026-12-04 18:00 Europe/Berlin)"
    )
    # The rules' longest hold is a validity window too.
    held_briefly = rules(caps=[{"id": "email-daily", "channel": "email", "per": "day", "limit": 1}], max_hold="6h")
    decision = only(decide(state, action(3), VIEW, held_briefly, NOON + 60))
    assert decision.kind is Kind.EXPIRED and "the longest hold" in decision.reason
    # An action held past its validity for any other reason (an approval that came late) expires when decided.
    gated = rules(approval={"above": 10})
    waiting = decide(STATE, action(4, value=50.0, expires_at=NOON + 3600), VIEW, gated, NOON).state
    decision = only(approve(waiting, "a4", VIEW, gated, NOON + 7200))
    assert decision.kind is Kind.EXPIRED and "validity" in decision.reason


def test_an_action_that_opts_out_is_capped_for_good_as_before() -> None:
    r = rules(caps=[{"id": "email-daily", "channel": "email", "per": "day", "limit": 1}])
    state = decide(STATE, action(1), VIEW, r, NOON).state
    ruling = decide(state, action(2, on_cap="drop"), VIEW, r, NOON + 60)
    decision = only(ruling)
    assert (decision.kind, decision.by, decision.reason) == (
        Kind.CAPPED,
        "email-daily",
        "capped by email-daily (1 per day)",
    )
    assert decision.final and ruling.state.deferred == ()


def test_priority_decides_who_gets_the_last_place_when_held_actions_come_due_together() -> None:
    r = rules(
        quiet_hours={"from": "21:00", "to": "08:00"},
        caps=[{"id": "email-daily", "channel": "email", "per": "day", "limit": 1}],
    )
    state = STATE
    low = action(1, journey="newsletter", priority=5, at=local(4, 1))
    high = action(2, journey="cart", priority=50, at=local(4, 3))
    state = decide(state, low, VIEW, r, local(4, 1)).state
    state = decide(state, high, VIEW, r, local(4, 3)).state
    assert next_wake(state) == local(4, 8)
    ruling = release(state, VIEW, r, local(4, 8))
    kinds = {d.action_id: (d.kind, d.by) for d in ruling.decisions}
    assert kinds == {"a2": (Kind.SENT, None), "a1": (Kind.SUPERSEDED, "cart")}
    # The loser is not dropped: it waits for the cap's next period (and then for the end of quiet hours).
    superseded = ruling.about("a1")
    assert not superseded.final and superseded.until == local(5, 0)
    assert (
        superseded.reason
        == "superseded by journey cart, deferred until 2026-12-05 00:00 Europe/Berlin (cap email-daily)"
    )
    assert next_wake(ruling.state) == local(5, 0)
    at_midnight = release(ruling.state, VIEW, r, local(5, 0))
    assert [(d.kind, d.until) for d in at_midnight.decisions] == [(Kind.DEFERRED, local(5, 8))]
    assert [d.kind for d in release(at_midnight.state, VIEW, r, local(5, 8)).decisions] == [Kind.SENT]


def test_a_higher_priority_action_takes_the_place_a_lower_held_one_was_waiting_for() -> None:
    # One message a day in all; email waits out quiet hours, push does not.
    r = rules(
        quiet_hours={"from": "21:00", "to": "08:00", "channels": ["email"]},
        caps=[{"id": "one-a-day", "per": "day", "limit": 1}],
    )
    newsletter = action(1, journey="newsletter", priority=5, at=local(4, 2))
    state = decide(STATE, newsletter, VIEW, r, local(4, 2)).state  # held until 08:00, today's place is its
    ruling = decide(state, action(2, journey="cart", priority=50, channel="push"), VIEW, r, local(4, 3))
    assert [(d.action_id, d.kind, d.by, d.until) for d in ruling.decisions] == [
        ("a2", Kind.SENT, None, None),
        ("a1", Kind.SUPERSEDED, "cart", local(5, 0)),
    ]
    assert ruling.about("a1").reason.startswith("superseded by journey cart, deferred until 2026-12-05 00:00")
    # 08:00 today passes with nothing more sent; the newsletter goes tomorrow when quiet hours end.
    assert next_wake(ruling.state) == local(5, 0)
    state = release(ruling.state, VIEW, r, local(5, 0)).state
    assert [d.kind for d in release(state, VIEW, r, local(5, 8)).decisions] == [Kind.SENT]


def test_a_lower_priority_action_does_not_take_the_place_a_higher_held_one_waits_for() -> None:
    r = rules(
        quiet_hours={"from": "21:00", "to": "08:00", "channels": ["email"]},
        caps=[{"id": "one-a-day", "per": "day", "limit": 1}],
    )
    cart = action(1, journey="cart", priority=50, at=local(4, 2))
    state = decide(STATE, cart, VIEW, r, local(4, 2)).state
    ruling = decide(state, action(2, journey="newsletter", priority=5, channel="push"), VIEW, r, local(4, 3))
    decision = only(ruling)
    assert (decision.kind, decision.by, decision.until) == (Kind.DEFERRED, "one-a-day", local(5, 0))
    assert [d.kind for d in release(ruling.state, VIEW, r, local(4, 8)).decisions] == [Kind.SENT]


def test_an_equal_priority_arrival_does_not_take_a_place_already_held() -> None:
    r = rules(
        quiet_hours={"from": "21:00", "to": "08:00", "channels": ["email"]},
        caps=[{"id": "one-a-day", "per": "day", "limit": 1}],
    )
    state = decide(STATE, action(1, at=local(4, 2)), VIEW, r, local(4, 2)).state
    decision = only(decide(state, action(2, channel="push", at=local(4, 3)), VIEW, r, local(4, 3)))
    assert (decision.kind, decision.until) == (Kind.DEFERRED, local(5, 0))


def test_a_sent_action_is_never_taken_back_by_a_higher_one() -> None:
    r = rules(caps=[{"id": "one-a-day", "per": "day", "limit": 1}])
    state = decide(STATE, action(1, journey="newsletter", priority=5), VIEW, r, NOON).state
    ruling = decide(state, action(2, journey="cart", priority=50), VIEW, r, NOON + 60)
    decision = only(ruling)
    assert (decision.kind, decision.until) == (Kind.DEFERRED, local(5, 0))
    assert [s.action_id for s in ruling.state.sent] == ["a1"]


def test_an_action_that_opts_out_is_dropped_when_a_higher_one_takes_its_place() -> None:
    r = rules(
        quiet_hours={"from": "21:00", "to": "08:00", "channels": ["email"]},
        caps=[{"id": "one-a-day", "per": "day", "limit": 1}],
    )
    state = decide(STATE, action(1, priority=5, on_cap="drop", at=local(4, 2)), VIEW, r, local(4, 2)).state
    ruling = decide(state, action(2, journey="cart", priority=50, channel="push"), VIEW, r, local(4, 3))
    assert [(d.action_id, d.kind) for d in ruling.decisions] == [("a2", Kind.SENT), ("a1", Kind.CAPPED)]
    assert ruling.state.deferred == ()


def test_equal_priority_is_ranked_by_the_actions_score_then_by_proposal() -> None:
    r = rules(caps=[{"id": "one", "per": "day", "limit": 1}], quiet_hours={"from": "21:00", "to": "08:00"})
    view = PersonView("p1", {**FIELDS, "scores.a": 0.2, "scores.b": 0.9})
    state = decide(STATE, action(1, rank_by="scores.a", at=local(4, 1)), view, r, local(4, 1)).state
    state = decide(state, action(2, rank_by="scores.b", at=local(4, 2)), view, r, local(4, 2)).state
    sent = [d.action_id for d in release(state, view, r, local(4, 8)).decisions if d.kind is Kind.SENT]
    assert sent == ["a2"]


def test_a_new_proposal_competes_with_held_actions_due_at_the_same_instant() -> None:
    r = rules(quiet_hours={"from": "21:00", "to": "08:00"}, caps=[{"id": "one", "per": "day", "limit": 1}])
    state = decide(STATE, action(1, priority=5, at=local(4, 1)), VIEW, r, local(4, 1)).state
    ruling = decide(state, action(2, journey="urgent", priority=90, at=local(4, 8)), VIEW, r, local(4, 8))
    assert [(d.action_id, d.kind) for d in ruling.decisions] == [("a2", Kind.SENT), ("a1", Kind.SUPERSEDED)]
    assert ruling.about("a1").by == "urgent"


def test_withdraw_drops_a_held_action_with_a_reason_and_ignores_decided_ones() -> None:
    r = rules(quiet_hours={"from": "21:00", "to": "08:00"})
    state = decide(STATE, action(1, at=local(4, 2)), VIEW, r, local(4, 2)).state
    ruling = withdraw(state, "a1", local(4, 3))
    assert only(ruling).kind is Kind.WITHDRAWN and ruling.state.deferred == ()
    assert withdraw(ruling.state, "a1", local(4, 3)).decisions == ()
    assert release(ruling.state, VIEW, r, local(4, 9)).decisions == ()


def test_reasons_name_rules_and_purposes_never_profile_values() -> None:
    r = rules(
        quiet_hours={"from": "21:00", "to": "08:00"},
        caps=[{"id": "c", "per": "day", "limit": 0}],
        suppressions=[{"id": "s", "categories": ["offer"], "condition": "traits.email exists"}],
        approval={"above": 1},
    )
    reasons = [
        d.reason
        for proposal, now in (
            (action(1), local(4, 2)),
            (action(2), NOON),
            (action(3, category="offer"), NOON),
            (action(4, value=5.0), NOON),
            (action(5, purpose="Sales"), NOON),
        )
        for d in decide(STATE, proposal, VIEW, r, now).decisions
    ]
    assert len(reasons) == 5
    for reason in reasons:
        assert "ada@example.com" not in reason and "0.3" not in reason and "p1" not in reason


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"caps": [{"id": "c", "per": "month", "limit": 1}]}, "rules.caps[0].per"),
        ({"caps": [{"id": "c", "per": "day", "limit": -1}]}, "rules.caps[0].limit"),
        ({"caps": [{"id": "c", "per": "day", "limit": 1, "channel": "fax"}]}, "rules.caps[0].channel"),
        ({"quiet_hours": {"from": "25:00", "to": "08:00"}}, "rules.quiet_hours.from"),
        ({"suppressions": [{"id": "s", "after_event": "X"}]}, "rules.suppressions[0].within"),
        ({"suppressions": [{"id": "s", "condition": "traits.x >"}]}, "rules.suppressions[0].condition"),
        ({"suppressions": [{"id": "s"}]}, "rules.suppressions[0]"),
        ({"timezone": "Mars/Olympus"}, "rules.timezone"),
        ({"approval": {"above": "lots"}}, "rules.approval.above"),
        ({"quiet": {}}, "rules.quiet"),
    ],
)
def test_bad_rules_are_rejected_naming_the_field(document: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_rules(document)
    assert caught.value.field == field


# --- properties: caps are never exceeded, and every action gets a final decision ---------------------------------

CHANNELS = ("email", "sms", "push")


def simulate(proposals, r, view, start):
    """Proposals in time order, with every wake-up the arbiter asks for in between and after: the decisions."""
    state = PersonState("p1")
    decisions = []

    def take(ruling) -> None:
        nonlocal state
        state = ruling.state
        decisions.extend(ruling.decisions)

    for n, (quarter, channel, priority, big, drop, valid_hours) in enumerate(sorted(proposals)):
        now = start + quarter * 900
        while (wake := next_wake(state)) is not None and wake <= now:
            take(release(state, view, r, wake))
        expires_at = now + valid_hours * 3600 if valid_hours else None
        proposal = action(
            n,
            at=now,
            journey=f"j{priority}",
            channel=channel,
            priority=priority,
            value=500.0 if big else None,
            on_cap="drop" if drop else "defer",
            expires_at=expires_at,
        )
        take(decide(state, proposal, view, r, now))
    while (wake := next_wake(state)) is not None:
        take(release(state, view, r, wake))
    return decisions


@settings(max_examples=60, deadline=None)
@given(
    proposals=st.lists(
        st.tuples(
            st.integers(0, 14 * 24 * 4),
            st.sampled_from(CHANNELS),
            st.integers(0, 3),
            st.booleans(),
            st.booleans(),
            st.sampled_from([0, 0, 6, 30]),
        ),
        min_size=1,
        max_size=40,
    ),
    daily=st.integers(0, 3),
    weekly=st.integers(0, 8),
    zone=st.sampled_from(["Europe/Berlin", "America/New_York", "Asia/Kolkata", "UTC"]),
)
def test_caps_are_never_exceeded_and_nothing_is_dropped_silently(proposals, daily, weekly, zone) -> None:
    r = rules(
        quiet_hours={"from": "22:00", "to": "07:30", "channels": ["email", "sms"]},
        caps=[
            {"id": "email-day", "channel": "email", "per": "day", "limit": daily},
            {"id": "all-day", "per": "day", "limit": max(daily, 1)},
            {"id": "week", "per": "week", "limit": weekly},
        ],
        approval={"above": 100, "expires_after": "12h"},
    )
    view = PersonView("p1", {"traits.timezone": zone, "consent.purpose:Marketing": True})
    start = datetime(2026, 3, 23, tzinfo=UTC).timestamp()  # a Monday, with a DST change in the window
    decisions = simulate(proposals, r, view, start)
    # The same inputs give the same decisions.
    assert simulate(proposals, r, view, start) == decisions
    # Every proposal ends with exactly one final decision, and nothing is decided after it.
    finals = Counter(d.action_id for d in decisions if d.kind in FINAL)
    assert finals == Counter(f"a{n}" for n in range(len(proposals)))
    ended: set[str] = set()
    for d in decisions:
        assert d.action_id not in ended and d.reason
        if d.final:
            ended.add(d.action_id)
        else:  # held: it says until when, and that is later
            assert d.until is not None and d.until > d.at
    # Only an action that opted out is capped for good; the others wait for room or expire with the reason.
    dropping = {f"a{n}" for n, p in enumerate(sorted(proposals)) if p[4]}
    assert {d.action_id for d in decisions if d.kind is Kind.CAPPED} <= dropping
    # A supersession names a journey that sent at that very instant.
    sent = [d for d in decisions if d.kind is Kind.SENT]
    for d in decisions:
        if d.kind is Kind.SUPERSEDED:
            assert any(s.journey_id == d.by and s.at == d.at for s in sent)
    # No cap is exceeded in any of its periods.
    tz = clock.zone(zone)
    per_day_email = Counter(clock.day_start(d.at, tz) for d in sent if d.channel == "email")
    per_day = Counter(clock.day_start(d.at, tz) for d in sent)
    per_week = Counter(clock.week_start(d.at, tz) for d in sent)
    assert all(count <= daily for count in per_day_email.values())
    assert all(count <= max(daily, 1) for count in per_day.values())
    assert all(count <= weekly for count in per_week.values())
    for d in sent:  # and nothing went out on a quiet channel in quiet hours
        if d.channel in ("email", "sms"):
            minute = clock.minute_of_day(d.at, tz)
            assert 7 * 60 + 30 <= minute < 22 * 60


def test_a_redelivered_proposal_of_a_sent_action_is_not_sent_again() -> None:
    r = rules(caps=[{"id": "c", "per": "day", "limit": 5}])
    state = decide(STATE, action(1), VIEW, r, NOON).state
    again = decide(state, action(1), VIEW, r, NOON + 5)
    assert again.decisions == () and again.state == state
    receipt = action(2, category="transactional")
    state = decide(state, receipt, VIEW, r, NOON).state
    assert decide(state, receipt, VIEW, r, NOON + 5).decisions == ()


RULES_DOCUMENT = {
    "caps": [{"id": "c", "channel": "email", "per": "day", "limit": 1}],
    "quiet_hours": {"from": "21:00", "to": "08:00", "channels": ["email"]},
    "suppressions": [
        {"id": "s", "categories": ["offer"], "after_event": "X", "within": "1d", "condition": "scores.x > 1"}
    ],
    "approval": {"above": 10, "expires_after": "1d"},
}
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None)
@given(
    section=st.sampled_from(sorted(RULES_DOCUMENT)),
    key=st.sampled_from(
        [
            "id",
            "per",
            "limit",
            "channel",
            "from",
            "to",
            "channels",
            "categories",
            "after_event",
            "within",
            "condition",
            "above",
            "expires_after",
        ]
    ),
    value=JSON,
)
def test_any_broken_rules_are_rejected_naming_a_field_never_a_crash(section: str, key: str, value: object) -> None:
    part = RULES_DOCUMENT[section]
    broken = [{**part[0], key: value}] if isinstance(part, list) else {**part, key: value}
    try:
        parse_rules({**RULES_DOCUMENT, section: broken})
    except InvalidArgument as error:
        assert error.field.startswith(f"rules.{section}")
