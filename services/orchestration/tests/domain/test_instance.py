"""The instance state machine: steps, exits that act at once, goals, splits, stable ids, entry rules."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_orchestration.domain.arbiter import Kind
from cdp_orchestration.domain.document import parse_journey
from cdp_orchestration.domain.entry import (
    EntryHistory,
    admit,
    entered_by_event,
    enters_on_event,
    enters_on_segment,
    next_scheduled_entry,
)
from cdp_orchestration.domain.instance import (
    ActionOutcome,
    Assigned,
    CancelTimer,
    End,
    Enter,
    EventArrived,
    ExitRequest,
    ProfileChanged,
    ProposeAction,
    RecordGoal,
    ScheduleTimer,
    Status,
    Step,
    TimerFired,
    WithdrawAction,
    assign_variant,
    migrate,
    new_instance,
    step,
)
from cdp_orchestration.domain.journey import Variant
from cdp_orchestration.domain.lifecycle import migration_plan
from cdp_orchestration.domain.view import Event, PersonView

T0 = 1_800_000_000.0
VIEW = PersonView("p1", {"traits.timezone": "Europe/Berlin", "scores.churn_risk": 0.2})

EMAIL = {"channel": "email", "purpose": "Marketing", "template": {"body": "hi"}}


def journey(nodes: list[dict], **extra: object):
    return parse_journey({"id": "j", "priority": 10, "entry": {"event": "Signed Up"}, "nodes": nodes, **extra})


def event(name: str, at: float, **properties: object) -> Event:
    return Event(f"{name}-{at}", name, at, properties=properties)


def start(j, view: PersonView = VIEW, now: float = T0, person: str = "p1", trigger: str = "e1"):
    return step(new_instance(j, person, trigger), j, Enter(), view, now)


def exit_step(instance) -> str | None:
    """The exit step an instance ended at (from its trail), None when it ended otherwise."""
    assert instance.status is Status.ENDED
    last = instance.steps[-1] if instance.steps else None
    return last.node_id if last is not None and last.outcome == "exit" and instance.end_reason == "completed" else None


def of(commands, kind):
    return [c for c in commands if isinstance(c, kind)]


def test_delay_then_action_waits_for_the_final_decision_before_moving_on() -> None:
    j = journey(
        [
            {"id": "d", "type": "delay", "duration": "1h", "next": "a"},
            {"id": "a", "type": "action", **EMAIL, "next": "b"},
            {"id": "b", "type": "action", **EMAIL},
        ]
    )
    instance, commands = start(j)
    (timer,) = of(commands, ScheduleTimer)
    assert timer.at == T0 + 3600 and instance.node == "d"
    instance, commands = step(instance, j, TimerFired(timer.timer_id), VIEW, T0 + 3600)
    (proposal,) = of(commands, ProposeAction)
    assert proposal.action.node_id == "a" and proposal.action.priority == 10
    # Deferred is not final: the instance stays at "a".
    instance, commands = step(instance, j, ActionOutcome(proposal.action.action_id, Kind.DEFERRED), VIEW, T0 + 3601)
    assert commands == [] and instance.node == "a"
    instance, commands = step(instance, j, ActionOutcome(proposal.action.action_id, Kind.SENT), VIEW, T0 + 3602)
    assert [c.action.node_id for c in of(commands, ProposeAction)] == ["b"]
    last = of(commands, ProposeAction)[0].action.action_id
    instance, commands = step(instance, j, ActionOutcome(last, Kind.CAPPED), VIEW, T0 + 3603)
    assert of(commands, End)[0].reason == "completed" and instance.status is Status.ENDED


def test_an_action_carries_its_cap_choice_and_validity_to_the_arbiter() -> None:
    j = journey([{"id": "a", "type": "action", **EMAIL, "on_cap": "drop", "expires_after": "2h"}])
    _, commands = start(j)
    (proposal,) = of(commands, ProposeAction)
    assert (proposal.action.on_cap, proposal.action.expires_at) == ("drop", T0 + 7200)
    _, commands = start(journey([{"id": "a", "type": "action", **EMAIL}]))
    (proposal,) = of(commands, ProposeAction)
    assert (proposal.action.on_cap, proposal.action.expires_at) == ("defer", None)


def test_a_superseded_action_is_still_pending() -> None:
    j = journey([{"id": "a", "type": "action", **EMAIL, "next": "b"}, {"id": "b", "type": "exit"}])
    instance, commands = start(j)
    (proposal,) = of(commands, ProposeAction)
    instance, commands = step(instance, j, ActionOutcome(proposal.action.action_id, Kind.SUPERSEDED), VIEW, T0 + 1)
    assert commands == [] and instance.node == "a" and instance.pending == (proposal.action.action_id,)


def test_branch_wait_and_exit_conditions_read_the_entry_fields() -> None:
    j = journey(
        [
            {"id": "b", "type": "branch", "branches": [{"if": "entry.total > 100", "next": "w"}], "else": "small"},
            {"id": "w", "type": "wait", "condition": 'entry.tier = "gold" and traits.verified = true', "timeout": "1d"},
            {"id": "small", "type": "exit"},
        ],
        exit=[{"id": "fraud", "condition": "entry.total > 10000"}],
    )
    cart = event("Signed Up", T0, total=120, tier="gold")
    instance, _ = step(new_instance(j, "p1", "e1"), j, Enter(cart), VIEW, T0)
    assert [s.outcome for s in instance.steps[:1]] == ["branch:0"] and instance.node == "w"
    verified = PersonView("p1", {**VIEW.fields, "traits.verified": True})
    waited, _ = step(instance, j, ProfileChanged(), verified, T0 + 60)
    assert waited.status is Status.ENDED and waited.steps[-1].outcome == "met"
    small, _ = step(new_instance(j, "p1", "e2"), j, Enter(event("Signed Up", T0, total=80)), VIEW, T0)
    assert exit_step(small) == "small"
    _, commands = step(new_instance(j, "p1", "e3"), j, Enter(event("Signed Up", T0, total=20000)), VIEW, T0)
    assert of(commands, End)[0].reason == "exit_rule:fraud"
    # An Enroll call's properties are the entry fields of an API entry.
    api = journey(j.document["nodes"], entry={"api": True})
    enrolled, _ = step(new_instance(api, "p1", "k1"), api, Enter(properties={"total": 500}), VIEW, T0)
    assert enrolled.steps[0].outcome == "branch:0"


def test_delay_until_a_time_of_day_uses_the_persons_zone() -> None:
    j = journey([{"id": "d", "type": "delay", "until": "09:00"}], timezone="America/New_York")
    now = datetime(2028, 1, 14, 6, 0, tzinfo=UTC).timestamp()  # 07:00 in Berlin: their 09:00 is 2 h later
    _, commands = start(j, now=now)
    assert of(commands, ScheduleTimer)[0].at == now + 2 * 3600
    # Without a zone on the profile the journey's zone applies (01:00 in New York -> 09:00 is 8 h later).
    _, commands = start(j, view=PersonView("p1", {}), now=now)
    assert of(commands, ScheduleTimer)[0].at == now + 8 * 3600


def test_wait_for_an_event_moves_on_when_it_comes_and_cancels_its_timeout() -> None:
    j = journey(
        [
            {
                "id": "w",
                "type": "wait",
                "event": "Viewed",
                "where": "properties.sku exists",
                "timeout": "2d",
                "next": "yes",
                "timeout_next": "no",
            },
            {"id": "yes", "type": "exit"},
            {"id": "no", "type": "exit"},
        ]
    )
    instance, commands = start(j)
    (timeout,) = of(commands, ScheduleTimer)
    instance, commands = step(instance, j, EventArrived(event("Viewed", T0 + 5)), VIEW, T0 + 5)
    assert commands == [] and instance.node == "w"  # the filter needs properties.sku
    instance, commands = step(instance, j, EventArrived(event("Viewed", T0 + 6, sku="x")), VIEW, T0 + 6)
    assert commands[0] == CancelTimer(timeout.timer_id)
    assert exit_step(instance) == "yes"
    # The cancelled timeout firing anyway (already in flight) changes nothing.
    again, commands = step(instance, j, TimerFired(timeout.timer_id), VIEW, T0 + 2 * 86400)
    assert again == instance and commands == []


def test_wait_times_out_to_its_timeout_branch() -> None:
    j = journey(
        [
            {
                "id": "w",
                "type": "wait",
                "condition": 'traits.plan = "pro"',
                "timeout": "1d",
                "next": "yes",
                "timeout_next": "no",
            },
            {"id": "yes", "type": "exit"},
            {"id": "no", "type": "exit"},
        ]
    )
    instance, commands = start(j)
    instance, _ = step(instance, j, TimerFired(of(commands, ScheduleTimer)[0].timer_id), VIEW, T0 + 86400)
    assert exit_step(instance) == "no"


def test_wait_for_a_condition_moves_on_when_the_profile_changes_or_at_once_if_it_holds() -> None:
    j = journey(
        [
            {"id": "w", "type": "wait", "condition": 'traits.plan = "pro"', "timeout": "1d", "next": "yes"},
            {"id": "yes", "type": "exit"},
        ]
    )
    instance, _ = start(j)
    pro = PersonView("p1", {"traits.plan": "pro"})
    instance, commands = step(instance, j, ProfileChanged(), pro, T0 + 10)
    assert isinstance(commands[0], CancelTimer) and exit_step(instance) == "yes"
    instance, commands = start(j, view=pro)
    assert of(commands, ScheduleTimer) == [] and instance.status is Status.ENDED


def test_branch_takes_the_first_condition_that_holds_else_the_else() -> None:
    j = journey(
        [
            {
                "id": "b",
                "type": "branch",
                "else": "c",
                "branches": [
                    {"if": "scores.churn_risk > 0.8", "next": "a"},
                    {"if": "scores.churn_risk > 0.5", "next": "b2"},
                ],
            },
            {"id": "a", "type": "exit"},
            {"id": "b2", "type": "exit"},
            {"id": "c", "type": "exit"},
        ]
    )
    ends = {}
    for risk in (0.9, 0.6, 0.1):
        instance, _ = start(j, view=PersonView("p1", {"scores.churn_risk": risk}))
        ends[risk] = (instance.steps[0].outcome, exit_step(instance))
    assert ends == {0.9: ("branch:0", "a"), 0.6: ("branch:1", "b2"), 0.1: ("branch:else", "c")}


def test_an_exit_event_ends_the_instance_at_once_cancelling_timers_and_withdrawing_actions() -> None:
    j = journey(
        [
            {"id": "a", "type": "action", **EMAIL, "next": "d"},
            {"id": "d", "type": "delay", "duration": "1d"},
        ],
        exit=[{"event": "Unsubscribed"}, {"event": "Order Completed", "where": "properties.total > 10"}],
    )
    instance, commands = start(j)
    action = of(commands, ProposeAction)[0].action.action_id
    # An order below the filter is not an exit.
    instance, commands = step(instance, j, EventArrived(event("Order Completed", T0 + 1, total=5)), VIEW, T0 + 1)
    assert commands == []
    instance, commands = step(instance, j, EventArrived(event("Order Completed", T0 + 2, total=50)), VIEW, T0 + 2)
    assert commands == [WithdrawAction(action, "p1"), End(instance.id, "exit_rule:1", T0 + 2)]
    assert instance.status is Status.ENDED and instance.pending == ()
    # An instance at a delay: the timer is cancelled.
    instance, commands = start(j)
    instance, _ = step(instance, j, ActionOutcome(action, Kind.SENT), VIEW, T0 + 1)
    (timer,) = instance.timers
    instance, commands = step(instance, j, EventArrived(event("Unsubscribed", T0 + 3)), VIEW, T0 + 3)
    assert commands[0] == CancelTimer(timer.id) and isinstance(commands[1], End)
    # Ended means ended: nothing it receives schedules, proposes or ends again.
    for stimulus in (TimerFired(timer.id), ActionOutcome(action, Kind.SENT), ExitRequest(), ProfileChanged()):
        assert step(instance, j, stimulus, VIEW, T0 + 4) == (instance, [])


def test_a_profile_condition_exit_acts_on_any_stimulus_including_entry() -> None:
    j = journey(
        [{"id": "d", "type": "delay", "duration": "1d"}],
        exit=[{"condition": "consent.purpose:Marketing = false"}],
    )
    refused = PersonView("p1", {"consent.purpose:Marketing": False})
    instance, commands = start(j, view=refused)
    assert commands == [End(instance.id, "exit_rule:0", T0)]
    instance, commands = start(j)
    instance, commands = step(instance, j, ProfileChanged(), refused, T0 + 5)
    assert isinstance(commands[0], CancelTimer) and instance.end_reason == "exit_rule:0"


def test_goal_is_recorded_once_with_the_variants_and_watched_after_the_instance_ends() -> None:
    j = journey(
        [
            {
                "id": "s",
                "type": "split",
                "variants": [{"name": "a", "weight": 1, "next": "x"}, {"name": "c", "weight": 1, "control": True}],
            },
            {"id": "x", "type": "exit"},
        ],
        goal={"event": "Order Completed", "within": "3d"},
    )
    instance, commands = start(j)
    (assigned,) = of(commands, Assigned)
    assert instance.status is Status.ENDED and instance.watching_goal(T0 + 86400)
    instance, commands = step(instance, j, EventArrived(event("Order Completed", T0 + 86400)), VIEW, T0 + 86400)
    assert commands == [RecordGoal(instance.id, "j", 1, {"s": assigned.variant}, T0 + 86400)]
    _, commands = step(instance, j, EventArrived(event("Order Completed", T0 + 86401)), VIEW, T0 + 86401)
    assert commands == []  # converts once
    late, _ = start(j)
    _, commands = step(late, j, EventArrived(event("Order Completed", T0 + 4 * 86400)), VIEW, T0 + 4 * 86400)
    assert commands == []  # outside the window


def test_goal_with_exit_ends_the_instance_after_recording_the_conversion() -> None:
    j = journey([{"id": "d", "type": "delay", "duration": "1d"}], goal={"event": "Paid", "within": "1d", "exit": True})
    instance, _ = start(j)
    instance, commands = step(instance, j, EventArrived(event("Paid", T0 + 5)), VIEW, T0 + 5)
    assert [type(c) for c in commands] == [RecordGoal, CancelTimer, End]
    assert instance.end_reason == "goal"


def test_a_purchase_applied_with_the_cart_event_converts_as_the_exit_rule_ends_the_instance() -> None:
    j = journey(
        [{"id": "d", "type": "delay", "duration": "1h"}],
        entry={"event": "Cart Abandoned"},
        exit=[{"id": "purchased", "event": "Order Completed"}],
        goal={"event": "Order Completed", "within": "3d"},
    )
    # Both events were sent a moment before the stream stored them, and are applied in the same batch:
    # the entry is applied at the stream's time, later than the purchase's own time.
    cart, applied = event("Cart Abandoned", T0), T0 + 0.4
    instance, _ = step(new_instance(j, "p1", cart.event_id), j, Enter(cart), VIEW, applied)
    instance, commands = step(instance, j, EventArrived(event("Order Completed", T0 + 0.1)), VIEW, applied)
    assert instance.end_reason == "exit_rule:purchased" and instance.converted_at == T0 + 0.1
    assert [type(c) for c in commands] == [RecordGoal, CancelTimer, End]
    # A purchase from before the cart event is no conversion of it.
    earlier, _ = step(new_instance(j, "p1", "again"), j, Enter(cart), VIEW, applied)
    earlier, commands = step(earlier, j, EventArrived(event("Order Completed", T0 - 5)), VIEW, applied)
    assert earlier.converted_at is None and not of(commands, RecordGoal)


@settings(max_examples=200, deadline=None)
@given(person=st.text(min_size=1, max_size=20), weights=st.lists(st.integers(1, 100), min_size=2, max_size=5))
def test_split_assignment_is_a_pure_function_of_person_journey_and_node(person: str, weights: list[int]) -> None:
    variants = [Variant(f"v{i}", float(w), None) for i, w in enumerate(weights)]
    first = assign_variant(person, "j", "split", variants)
    assert assign_variant(person, "j", "split", variants) == first
    assert first in variants


def test_split_follows_the_weights() -> None:
    variants = [Variant("a", 70.0, None), Variant("control", 30.0, None, control=True)]
    chosen = [assign_variant(f"person-{i}", "j", "s", variants).name for i in range(4000)]
    assert 0.66 < chosen.count("a") / len(chosen) < 0.74


@settings(max_examples=50, deadline=None)
@given(trigger=st.text(min_size=1, max_size=10), person=st.text(min_size=1, max_size=10))
def test_a_replay_of_the_same_stimuli_yields_the_same_ids_and_commands(trigger: str, person: str) -> None:
    j = journey(
        [
            {
                "id": "s",
                "type": "split",
                "variants": [{"name": "a", "weight": 1, "next": "a1"}, {"name": "b", "weight": 1, "next": "d"}],
            },
            {"id": "a1", "type": "action", **EMAIL, "next": "d"},
            {"id": "d", "type": "delay", "duration": "1h", "next": "a1"},
        ]
    )

    def run():
        instance, first = start(j, view=PersonView(person), person=person, trigger=trigger)
        return instance, first

    assert run() == run()
    instance, commands = run()
    assert instance.id == new_instance(j, person, trigger).id
    # A loop visits a1 again: a new visit, a new action id (the old one is never reused).
    ids = [c.action.action_id for c in of(commands, ProposeAction)]
    for _ in range(2):
        if instance.pending:
            instance, commands = step(instance, j, ActionOutcome(instance.pending[0], Kind.SENT), VIEW, T0)
        (timer,) = instance.timers
        instance, commands = step(instance, j, TimerFired(timer.id), VIEW, T0 + 3600)
        ids += [c.action.action_id for c in of(commands, ProposeAction)]
    assert len(ids) == len(set(ids)) >= 2


def test_admit_applies_reentry_cooldown_and_the_concurrency_cap() -> None:
    nodes = [{"id": "d", "type": "delay", "duration": "1d"}]
    never = journey(nodes)
    assert admit(never, EntryHistory(), T0).admitted
    assert not admit(never, EntryHistory(0, T0 - 10 * 86400), T0).admitted
    cooldown = journey(nodes, reentry={"cooldown": "7d"}, max_concurrent=2)
    assert not admit(cooldown, EntryHistory(0, T0 - 6 * 86400), T0).admitted
    assert admit(cooldown, EntryHistory(1, T0 - 7 * 86400), T0).admitted
    assert not admit(cooldown, EntryHistory(2, T0 - 8 * 86400), T0).admitted
    always = journey(nodes, reentry="always")
    assert admit(always, EntryHistory(0, T0), T0).admitted
    assert not admit(always, EntryHistory(1, T0), T0).admitted  # cap 1 still holds
    running, _ = start(always)
    assert EntryHistory.of([running, new_instance(always, "p1", "other")]) == EntryHistory(1, T0)


def test_entry_matching_event_filter_condition_and_segment() -> None:
    j = parse_journey(
        {
            "id": "j",
            "entry": {"event": "Cart Abandoned", "where": "properties.total >= 20", "if": 'traits.country = "DE"'},
            "nodes": [{"id": "x", "type": "exit"}],
        }
    )
    de = PersonView("p", {"traits.country": "DE"})
    assert enters_on_event(j, event("Cart Abandoned", T0, total=20), de, T0)
    assert not enters_on_event(j, event("Cart Abandoned", T0, total=19), de, T0)
    assert not enters_on_event(j, event("Cart Abandoned", T0, total=20), PersonView("p", {"traits.country": "FR"}), T0)
    assert not enters_on_event(j, event("Cart Viewed", T0, total=20), de, T0)
    seg = parse_journey(
        {"id": "s", "entry": {"segment": "vip", "on": "exited"}, "nodes": [{"id": "x", "type": "exit"}]}
    )
    assert enters_on_segment(seg, "vip", entered=False) and not enters_on_segment(seg, "vip", entered=True)


def test_the_entry_condition_compares_the_entry_event_with_the_person() -> None:
    # A price drop enters only those who viewed THAT product: the event's sku against the person's list.
    j = parse_journey(
        {
            "id": "j",
            "entry": {"event": "Price Dropped", "if": "entry.product_id in computed.viewed_skus_30d"},
            "nodes": [{"id": "x", "type": "exit"}],
        }
    )
    viewed = PersonView("p", {"computed.viewed_skus_30d": ["sku-41", "sku-42"]})
    drop = event("Price Dropped", T0, product_id="sku-42")
    assert enters_on_event(j, drop, viewed, T0)
    assert not enters_on_event(j, event("Price Dropped", T0, product_id="sku-7"), viewed, T0)
    assert not enters_on_event(j, drop, PersonView("p", {"computed.viewed_skus_30d": ["sku-7"]}), T0)
    assert not enters_on_event(j, drop, PersonView("p"), T0)  # nothing viewed: no list, no entry
    assert not enters_on_event(j, event("Price Dropped", T0), viewed, T0)  # no sku on the event
    assert entered_by_event([j], drop, lambda: viewed, T0) == [j]
    assert entered_by_event([j], event("Price Dropped", T0, product_id="sku-7"), lambda: viewed, T0) == []


def test_scheduled_entry_fires_at_the_crons_time_in_each_persons_zone() -> None:
    j = parse_journey(
        {
            "id": "weekly",
            "entry": {"schedule": {"cron": "0 9 * * 1", "segment": "vip"}},
            "nodes": [{"id": "x", "type": "exit"}],
        }
    )
    after = datetime(2028, 1, 14, 6, 0, tzinfo=UTC).timestamp()  # a Friday
    berlin = next_scheduled_entry(j, PersonView("a", {"traits.timezone": "Europe/Berlin"}), after)
    tokyo = next_scheduled_entry(j, PersonView("b", {"traits.timezone": "Asia/Tokyo"}), after)
    assert berlin == datetime(2028, 1, 17, 8, 0, tzinfo=UTC).timestamp()  # Monday 09:00 +01:00
    assert tokyo == berlin - 8 * 3600  # Tokyo's Monday 09:00 comes 8 hours earlier


def test_migration_moves_instances_by_node_id_and_leaves_the_rest_on_their_version() -> None:
    v1 = journey(
        [
            {"id": "d", "type": "delay", "duration": "1d", "next": "old"},
            {"id": "old", "type": "delay", "duration": "1h"},
        ]
    )
    v2 = parse_journey(
        {
            **v1.document,
            "version": 2,
            "nodes": [{"id": "d", "type": "delay", "duration": "2d", "next": "new"}, {"id": "new", "type": "exit"}],
        }
    )
    plan = migration_plan(v1, v2)
    assert plan.moves == {"d"} and plan.stays == {"old"}
    at_d, _ = start(v1)
    moved = migrate(at_d, v2, plan)
    assert moved is not None and moved.version == 2 and moved.timers == at_d.timers
    # The timer set under v1 fires into v2's graph.
    moved, _ = step(moved, v2, TimerFired(at_d.timers[0].id), VIEW, T0 + 86400)
    assert exit_step(moved) == "new"
    at_old, _ = step(at_d, v1, TimerFired(at_d.timers[0].id), VIEW, T0 + 86400)
    assert migrate(at_old, v2, plan) is None
    with pytest.raises(ValueError):
        step(at_old, v2, ProfileChanged(), VIEW, T0)


def test_a_wait_on_a_condition_that_time_makes_true_moves_on_at_that_time() -> None:
    j = journey(
        [
            {"id": "w", "type": "wait", "condition": "traits.trial_ends_at < now", "timeout": "30d", "next": "yes"},
            {"id": "yes", "type": "exit"},
        ]
    )
    trial = PersonView("p1", {"traits.trial_ends_at": T0 + 100})
    instance, commands = start(j, view=trial)
    timeout, recheck = of(commands, ScheduleTimer)
    assert timeout.at == T0 + 30 * 86400 and T0 + 100 <= recheck.at <= T0 + 101
    instance, commands = step(instance, j, TimerFired(recheck.timer_id), trial, recheck.at)
    assert commands[0] == CancelTimer(timeout.timer_id) and exit_step(instance) == "yes"


def test_an_exit_condition_that_time_makes_true_ends_the_instance_then() -> None:
    j = journey([{"id": "d", "type": "delay", "duration": "7d"}], exit=[{"condition": "traits.contract_ends < now"}])
    person = PersonView("p1", {"traits.contract_ends": T0 + 3600})
    instance, commands = start(j, view=person)
    delay, recheck = of(commands, ScheduleTimer)
    # An unrelated change before then re-arms nothing (the instant is the same).
    instance, commands = step(instance, j, ProfileChanged(), person, T0 + 60)
    assert commands == []
    instance, commands = step(instance, j, TimerFired(recheck.timer_id), person, recheck.at)
    assert commands == [CancelTimer(delay.timer_id), End(instance.id, "exit_rule:0", recheck.at)]
    # When the contract is extended, the recheck moves with it.
    instance, _ = start(j, view=person)
    later = PersonView("p1", {"traits.contract_ends": T0 + 7200})
    instance, commands = step(instance, j, ProfileChanged(), later, T0 + 60)
    assert commands[0] == CancelTimer(recheck.timer_id)
    assert T0 + 7200 <= of(commands, ScheduleTimer)[0].at <= T0 + 7201


def test_an_event_condition_answered_from_the_views_recent_events() -> None:
    j = journey(
        [
            {
                "id": "b",
                "type": "branch",
                "branches": [{"if": 'performed("Support Ticket Opened", within 1d)', "next": "x"}],
                "else": "y",
            },
            {"id": "x", "type": "exit"},
            {"id": "y", "type": "exit"},
        ]
    )
    recent = PersonView("p1", {}, events=(event("Support Ticket Opened", T0 - 3600),))
    old = PersonView("p1", {}, events=(event("Support Ticket Opened", T0 - 2 * 86400),))
    assert exit_step(start(j, view=recent)[0]) == "x"
    assert exit_step(start(j, view=old)[0]) == "y"


def test_entry_properties_come_from_the_entry_event_or_the_enroll_call() -> None:
    j = journey([{"id": "d", "type": "delay", "duration": "1h"}])
    by_event, _ = step(new_instance(j, "p1", "e1"), j, Enter(event("Signed Up", T0, plan="pro")), VIEW, T0)
    assert by_event.entry == {"plan": "pro"}
    by_api, _ = step(new_instance(j, "p1", "r1"), j, Enter(properties={"coupon": "X1"}), VIEW, T0)
    assert by_api.entry == {"coupon": "X1"}
    assert by_api.steps == (Step("d", T0, "entered"),)
