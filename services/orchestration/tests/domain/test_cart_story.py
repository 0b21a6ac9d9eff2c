"""The 2 a.m. story, told through the domain alone: journeys, instances and one arbiter for one person.

A small `World` plays the service layer's part exactly as domain/__init__.py describes it: it routes each
event to the instances and entries, carries out the commands in order, feeds every arbiter decision back to
its instance, fires timers (and the arbiter's wake-up) in time order, and renders what is sent.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from cdp_orchestration.domain.arbiter import Decision, Kind, PersonState, decide, next_wake, observe, release, withdraw
from cdp_orchestration.domain.document import parse_journey
from cdp_orchestration.domain.entry import EntryHistory, admit, enters_on_api, enters_on_event
from cdp_orchestration.domain.instance import (
    ActionOutcome,
    CancelTimer,
    End,
    Enter,
    EventArrived,
    Instance,
    ProposeAction,
    ScheduleTimer,
    TimerFired,
    WithdrawAction,
    new_instance,
    step,
)
from cdp_orchestration.domain.journey import Journey
from cdp_orchestration.domain.rules import Rules, parse_rules
from cdp_orchestration.domain.view import Event, PersonView

BERLIN = ZoneInfo("Europe/Berlin")
PERSON = "person-1"


def at(day: int, hour: int, minute: int = 0) -> float:
    """An instant in the person's zone, in December 2026."""
    return datetime(2026, 12, day, hour, minute, tzinfo=BERLIN).timestamp()


CART = {
    "id": "abandoned-cart",
    "name": "Abandoned cart",
    "priority": 50,
    "entry": {"event": "Cart Abandoned", "where": "properties.total > 0"},
    "reentry": {"cooldown": "1d"},
    "exit": [{"id": "purchased", "event": "Order Completed"}],
    "goal": {"event": "Order Completed", "within": "3d"},
    "nodes": [
        {
            "id": "remind",
            "type": "action",
            "channel": "email",
            "purpose": "Marketing",
            "category": "reminder",
            "template": {"subject": "{{ traits.first_name }}, your cart is waiting", "body": "Come back"},
            "next": "done",
        },
        {"id": "done", "type": "exit"},
    ],
}

RENEWAL = {
    "id": "renewal",
    "priority": 30,
    "entry": {"api": True},
    "reentry": "always",
    "nodes": [
        {
            "id": "offer",
            "type": "action",
            "channel": "email",
            "purpose": "Marketing",
            "category": "offer",
            "template": {"subject": "Renew now, {{ traits.first_name }}"},
        }
    ],
}

RULES = {
    "timezone": "UTC",
    "quiet_hours": {"from": "21:00", "to": "08:00"},
    "caps": [{"id": "email-daily", "channel": "email", "per": "day", "limit": 3}],
    "suppressions": [
        {"id": "no-offer-after-ticket", "categories": ["offer"], "after_event": "Support Ticket Opened", "within": "1d"}
    ],
}

PROFILE = {"traits.first_name": "Ada", "traits.timezone": "Europe/Berlin", "consent.purpose:Marketing": True}


class World:
    def __init__(self, journeys: list[Journey], rules: Rules, fields: dict) -> None:
        self.journeys = {journey.id: journey for journey in journeys}
        self.rules = rules
        self.view = PersonView(PERSON, fields)
        self.instances: dict[str, Instance] = {}
        self.timers: dict[str, tuple[float, str]] = {}  # timer id -> (at, instance id)
        self.owner: dict[str, str] = {}  # action id -> instance id
        self.arbiter = PersonState(PERSON)
        self.decisions: list[Decision] = []
        self.sent: list[tuple[float, dict[str, str]]] = []
        self.ended: dict[str, str] = {}
        self.now = 0.0

    # the service's parts
    def apply(self, instance_id: str, stimulus: object, now: float) -> None:
        instance = self.instances[instance_id]
        instance, commands = step(instance, self.journeys[instance.journey_id], stimulus, self.view, now)
        self.instances[instance_id] = instance
        for command in commands:
            if isinstance(command, ScheduleTimer):
                self.timers[command.timer_id] = (command.at, command.instance_id)
            elif isinstance(command, CancelTimer):
                self.timers.pop(command.timer_id, None)
            elif isinstance(command, ProposeAction):
                self.owner[command.action.action_id] = instance_id
                self.rule(decide(self.arbiter, command.action, self.view, self.rules, now), now)
            elif isinstance(command, WithdrawAction):
                self.rule(withdraw(self.arbiter, command.action_id, now), now)
            elif isinstance(command, End):
                self.ended[command.instance_id] = command.reason

    def rule(self, ruling, now: float) -> None:
        self.arbiter = ruling.state
        for decision in ruling.decisions:
            self.decisions.append(decision)
            if decision.kind is Kind.SENT:
                journey = next(j for j in self.journeys.values() if j.id == decision.journey_id)
                self.sent.append((now, journey.nodes[decision.node_id].template.render(self.view)))
            self.apply(self.owner[decision.action_id], ActionOutcome(decision.action_id, decision.kind), now)

    def enter(self, journey: Journey, trigger_id: str, now: float, event: Event | None = None) -> str | None:
        mine = [i for i in self.instances.values() if i.journey_id == journey.id]
        if not admit(journey, EntryHistory.of(mine), now).admitted:
            return None
        instance = new_instance(journey, PERSON, trigger_id)
        self.instances[instance.id] = instance
        self.apply(instance.id, Enter(event), now)
        return instance.id

    # what happens in the world
    def event(self, name: str, now: float, **properties: object) -> None:
        self.run_until(now)
        event = Event(f"e{len(self.decisions)}-{now}", name, now, properties=properties)
        self.arbiter = observe(self.arbiter, event, self.rules)
        for instance_id in list(self.instances):
            self.apply(instance_id, EventArrived(event), now)
        for journey in self.journeys.values():
            if enters_on_event(journey, event, self.view, now):
                self.enter(journey, event.event_id, now, event)

    def enroll(self, journey_id: str, now: float) -> str | None:
        self.run_until(now)
        journey = self.journeys[journey_id]
        assert enters_on_api(journey)
        return self.enter(journey, f"enroll-{now}", now)

    def run_until(self, until: float) -> None:
        while True:
            due = [(t, "timer", tid) for tid, (t, _) in self.timers.items() if t <= until]
            wake = next_wake(self.arbiter)
            if wake is not None and wake <= until:
                due.append((wake, "arbiter", ""))
            if not due:
                break
            when, kind, timer = min(due)
            if kind == "arbiter":
                self.rule(release(self.arbiter, self.view, self.rules, when), when)
            else:
                _, instance_id = self.timers.pop(timer)
                self.apply(instance_id, TimerFired(timer), when)
        self.now = until

    def kinds(self, journey_id: str) -> list[str]:
        return [d.kind.value for d in self.decisions if d.journey_id == journey_id]


def world(fields: dict = PROFILE) -> World:
    return World([parse_journey(CART), parse_journey(RENEWAL)], parse_rules(RULES), dict(fields))


def test_cart_abandoned_at_2am_is_deferred_to_8am_not_dropped() -> None:
    w = world()
    w.event("Cart Abandoned", at(4, 2), total=80)
    assert w.kinds("abandoned-cart") == ["deferred"]
    deferral = w.decisions[0]
    assert deferral.until == at(4, 8)  # 08:00 in Berlin, not in UTC
    assert "quiet hours" in deferral.reason
    w.run_until(at(4, 7, 59))
    assert w.sent == []
    w.run_until(at(4, 9))
    assert w.kinds("abandoned-cart") == ["deferred", "sent"]
    assert w.sent == [(at(4, 8), {"subject": "Ada, your cart is waiting", "body": "Come back"})]
    (instance,) = w.instances.values()
    assert instance.end_reason == "completed"
    # Its trail: the reminder proposed at 02:00, sent at 08:00 (a deferral is not an outcome), then the exit.
    assert [(step.node_id, step.at, step.outcome) for step in instance.steps] == [
        ("remind", at(4, 2), f"action:{deferral.action_id}"),
        ("remind", at(4, 8), "sent"),
        ("done", at(4, 8), "exit"),
    ]


def test_purchase_three_hours_later_exits_at_once_and_withdraws_the_pending_reminder() -> None:
    w = world()
    w.event("Cart Abandoned", at(4, 2), total=80)
    w.event("Order Completed", at(4, 5), total=80)
    (instance,) = w.instances.values()
    # The instance ended on the purchase itself, not at the end of a step.
    assert instance.ended_at == at(4, 5)
    assert instance.end_reason == "exit_rule:purchased"
    assert instance.converted_at == at(4, 5)
    assert w.kinds("abandoned-cart") == ["deferred", "withdrawn"]
    assert w.arbiter.deferred == ()
    w.run_until(at(4, 12))
    assert w.sent == []  # 08:00 came and nothing went out


def test_renewal_offer_is_suppressed_the_day_a_support_ticket_was_opened() -> None:
    w = world()
    w.event("Support Ticket Opened", at(4, 10))
    w.enroll("renewal", at(4, 14))
    assert w.kinds("renewal") == ["suppressed"]
    assert w.decisions[-1].by == "no-offer-after-ticket"
    assert w.sent == []
    # A day after the ticket the same offer goes.
    w.enroll("renewal", at(5, 10, 1))
    assert w.kinds("renewal") == ["suppressed", "sent"]


def test_a_reminder_and_an_offer_both_held_overnight_go_by_priority_when_the_cap_has_one_place() -> None:
    rules = parse_rules({**RULES, "caps": [{"id": "email-daily", "channel": "email", "per": "day", "limit": 1}]})
    w = World([parse_journey(CART), parse_journey(RENEWAL)], rules, dict(PROFILE))
    w.enroll("renewal", at(4, 1))  # lower priority, proposed first
    w.event("Cart Abandoned", at(4, 2), total=80)
    w.run_until(at(4, 9))
    assert w.kinds("abandoned-cart") == ["deferred", "sent"]
    assert w.kinds("renewal") == ["deferred", "superseded"]
    superseded = w.decisions[-1] if w.decisions[-1].journey_id == "renewal" else w.decisions[-2]
    assert superseded.by == "abandoned-cart" and superseded.until == at(5, 0)
    assert len(w.sent) == 1
    # The offer lost the slot, not its life: it waits for tomorrow's place (and the end of quiet hours).
    w.run_until(at(5, 9))
    assert w.kinds("renewal") == ["deferred", "superseded", "deferred", "sent"]
    assert [when for when, _ in w.sent] == [at(4, 8), at(5, 8)]
    renewal = next(i for i in w.instances.values() if i.journey_id == "renewal")
    assert renewal.end_reason == "completed" and renewal.steps[-1].outcome == "sent"


def test_consent_withdrawn_while_deferred_cancels_the_send() -> None:
    w = world()
    w.event("Cart Abandoned", at(4, 2), total=80)
    w.view = PersonView(PERSON, {**PROFILE, "consent.purpose:Marketing": False})
    w.run_until(at(4, 9))
    assert w.kinds("abandoned-cart") == ["deferred", "no_consent"]
    assert w.sent == []
