"""Steps that read the person's fields while they lag behind the person's events (`PersonView.behind`).

An SDK sends identify (traits) and track (an event) in one batch; the track's resolved event reaches
orchestration before the identify's profile change, so at that moment the fields show the person as they
were before the batch. A `wait` condition, a `delay` until a time of day in the person's zone and the exit
conditions of an instance that entered then wait for the change (at most FIELDS_WAIT after the earliest
lagging event, then they are decided on the fields held), with ids derived as every other timer's.
"""

from __future__ import annotations

from datetime import UTC, datetime

from cdp_orchestration.domain.document import parse_journey
from cdp_orchestration.domain.instance import (
    FIELDS,
    FIELDS_WAIT,
    RECHECK,
    CancelTimer,
    End,
    Enter,
    EventArrived,
    ProfileChanged,
    ScheduleTimer,
    Status,
    TimerFired,
    new_instance,
    step,
    timer_id,
)
from cdp_orchestration.domain.view import Event, PersonView

T0 = 1_800_000_000.0


def journey(nodes: list[dict], **extra: object):
    return parse_journey({"id": "j", "priority": 10, "entry": {"event": "Trial Started"}, "nodes": nodes, **extra})


def of(commands, kind):
    return [c for c in commands if isinstance(c, kind)]


def timer(instance, kind: str):
    return next(t for t in instance.timers if t.kind == kind)


# --- a wait condition reached while the fields lag ---------------------------------------------------------------

WAIT = journey(
    [
        {"id": "w", "type": "wait", "condition": 'traits.plan = "pro"', "timeout": "3d", "next": "upgraded"},
        {"id": "upgraded", "type": "exit"},
    ]
)
# Before the batch they were "pro" (an old subscription); the identify sent with "Trial Started" sets "trial".
BEFORE = PersonView("p1", {"traits.plan": "pro"}, behind=T0)
TRIAL = PersonView("p1", {"traits.plan": "trial"})
PRO = PersonView("p1", {"traits.plan": "pro"})


def test_a_wait_reached_on_lagging_fields_is_not_met_by_what_the_batch_changes() -> None:
    instance, commands = step(new_instance(WAIT, "p1", "e1"), WAIT, Enter(), BEFORE, T0)
    assert instance.status is Status.RUNNING and instance.node == "w"  # not "met" on the fields before the batch
    held = timer(instance, FIELDS)
    assert held.id == timer_id(instance.id, "w", 1, FIELDS) and held.at == T0 + FIELDS_WAIT
    assert {c.timer_id for c in of(commands, ScheduleTimer)} >= {held.id, timer(instance, "timeout").id}
    # Another change while the fields still lag behind an event decides nothing yet.
    still, commands = step(
        instance, WAIT, ProfileChanged(), PersonView("p1", {"traits.plan": "pro"}, behind=T0), T0 + 1
    )
    assert still.node == "w" and commands == []
    # The change the wait was held for: the person is on the trial, so they wait for an upgrade.
    waiting, commands = step(still, WAIT, ProfileChanged(), TRIAL, T0 + 2)
    assert waiting.status is Status.RUNNING and waiting.node == "w"
    assert of(commands, CancelTimer) == [CancelTimer(held.id)] and [t.kind for t in waiting.timers] == ["timeout"]
    upgraded, _ = step(waiting, WAIT, ProfileChanged(), PRO, T0 + 3600)
    assert upgraded.status is Status.ENDED and [s.outcome for s in upgraded.steps] == ["entered", "met", "exit"]


def test_a_wait_held_for_lagging_fields_is_met_when_the_change_brings_the_condition() -> None:
    instance, _ = step(new_instance(WAIT, "p1", "e1"), WAIT, Enter(), PersonView("p1", {}, behind=T0), T0)
    assert instance.node == "w"
    met, commands = step(instance, WAIT, ProfileChanged(), PRO, T0 + 1)
    assert met.status is Status.ENDED and met.steps[-2].outcome == "met"
    assert {c.timer_id for c in of(commands, CancelTimer)} == {t.id for t in instance.timers}


def test_a_wait_held_for_a_profile_that_stays_away_is_decided_on_the_fields_held() -> None:
    instance, _ = step(new_instance(WAIT, "p1", "e1"), WAIT, Enter(), BEFORE, T0)
    held = timer(instance, FIELDS)
    met, _ = step(instance, WAIT, TimerFired(held.id), BEFORE, held.at)
    assert met.status is Status.ENDED and met.steps[-2].outcome == "met"
    # Not met on the fields held: it keeps waiting, for its timeout or a change.
    other = PersonView("p1", {"traits.plan": "trial"}, behind=T0)
    instance, _ = step(new_instance(WAIT, "p1", "e2"), WAIT, Enter(), other, T0)
    waiting, commands = step(instance, WAIT, TimerFired(timer(instance, FIELDS).id), other, held.at)
    assert waiting.node == "w" and [t.kind for t in waiting.timers] == ["timeout"] and commands == []
    upgraded, _ = step(waiting, WAIT, ProfileChanged(), PRO, held.at + 60)
    assert upgraded.status is Status.ENDED


def test_a_wait_reached_on_fields_that_do_not_lag_decides_at_once_as_before() -> None:
    instance, commands = step(new_instance(WAIT, "p1", "e1"), WAIT, Enter(), PRO, T0)
    assert instance.status is Status.ENDED and of(commands, ScheduleTimer) == []


# --- a delay until a time of day in the person's zone ------------------------------------------------------------

DELAY = journey([{"id": "d", "type": "delay", "until": "09:00"}], timezone="UTC")
SIX = datetime(2028, 1, 14, 6, 0, tzinfo=UTC).timestamp()  # 01:00 in New York: their 09:00 is 8 h later


def test_a_delay_until_a_time_of_day_waits_for_the_zone_the_batch_sets() -> None:
    lagging = PersonView("p1", {}, behind=SIX)  # the identify setting traits.timezone is on its way
    instance, commands = step(new_instance(DELAY, "p1", "e1"), DELAY, Enter(), lagging, SIX)
    assert [t.kind for t in instance.timers] == [FIELDS]  # not 09:00 UTC, 3 h later
    assert of(commands, ScheduleTimer)[0].at == SIX + FIELDS_WAIT
    new_york = PersonView("p1", {"traits.timezone": "America/New_York"})
    instance, commands = step(instance, DELAY, ProfileChanged(), new_york, SIX + 2)
    delay = timer(instance, "delay")
    assert delay.at == SIX + 8 * 3600 and delay.id == timer_id(instance.id, "d", 1, "delay")
    assert commands == [
        CancelTimer(timer_id(instance.id, "d", 1, FIELDS)),
        ScheduleTimer(delay.id, instance.id, delay.at),
    ]
    done, _ = step(instance, DELAY, TimerFired(delay.id), new_york, delay.at)
    assert done.status is Status.ENDED and done.end_reason == "completed"


def test_a_delay_held_for_the_fields_counts_the_time_of_day_from_when_it_was_reached() -> None:
    # Reached at 08:59:50 in New York; the change comes 20 s later, past 09:00: due at once, not tomorrow.
    reached = datetime(2028, 1, 14, 13, 59, 50, tzinfo=UTC).timestamp()
    lagging = PersonView("p1", {"traits.timezone": "America/New_York"}, behind=reached)
    instance, _ = step(new_instance(DELAY, "p1", "e1"), DELAY, Enter(), lagging, reached)
    caught_up = PersonView("p1", {"traits.timezone": "America/New_York"})
    instance, _ = step(instance, DELAY, ProfileChanged(), caught_up, reached + 20)
    assert timer(instance, "delay").at == reached + 20


def test_a_delay_held_for_a_profile_that_stays_away_is_computed_on_the_fields_held() -> None:
    lagging = PersonView("p1", {}, behind=SIX)
    instance, _ = step(new_instance(DELAY, "p1", "e1"), DELAY, Enter(), lagging, SIX)
    instance, _ = step(instance, DELAY, TimerFired(timer(instance, FIELDS).id), lagging, SIX + FIELDS_WAIT)
    assert [(t.kind, t.at) for t in instance.timers] == [("delay", SIX + 3 * 3600)]  # 09:00 in the journey's zone


# --- exit conditions of an instance that entered while the fields lag --------------------------------------------

EXITS = journey(
    [{"id": "d", "type": "delay", "duration": "1d"}],
    exit=[{"id": "no_email", "condition": "not traits.email exists"}],
)
NO_EMAIL_YET = PersonView("p1", {}, behind=T0)  # the identify giving the email is on its way


def test_the_entering_batchs_next_event_does_not_decide_exit_conditions_on_the_fields_before_it() -> None:
    instance, _ = step(new_instance(EXITS, "p1", "e1"), EXITS, Enter(), NO_EMAIL_YET, T0)
    assert instance.status is Status.RUNNING
    # The batch's next track reaches the instance before the identify's change does.
    viewed = Event("s:m2", "Viewed Page", T0)
    instance, commands = step(instance, EXITS, EventArrived(viewed), NO_EMAIL_YET, T0)
    assert instance.status is Status.RUNNING and of(commands, End) == []
    # The change brings the email: they stay. A person who gave none leaves by the rule then.
    kept, _ = step(instance, EXITS, ProfileChanged(), PersonView("p1", {"traits.email": "x"}), T0 + 1)
    assert kept.status is Status.RUNNING
    left, _ = step(instance, EXITS, ProfileChanged(), PersonView("p1", {}), T0 + 1)
    assert left.end_reason == "exit_rule:no_email"


def test_exit_conditions_held_for_a_profile_that_stays_away_are_decided_on_the_fields_held() -> None:
    instance, _ = step(new_instance(EXITS, "p1", "e1"), EXITS, Enter(), NO_EMAIL_YET, T0)
    recheck = timer(instance, RECHECK)
    assert recheck.at == T0 + FIELDS_WAIT
    left, _ = step(instance, EXITS, TimerFired(recheck.id), NO_EMAIL_YET, recheck.at)
    assert left.end_reason == "exit_rule:no_email"


def test_exit_conditions_read_fields_as_new_as_the_entry_though_a_later_event_lags() -> None:
    instance, _ = step(new_instance(EXITS, "p1", "e1"), EXITS, Enter(), PersonView("p1", {"traits.email": "x"}), T0)
    # Later the email is removed (its change arrived) and another event's change is still on its way.
    later = PersonView("p1", {}, behind=T0 + 50)
    left, _ = step(instance, EXITS, EventArrived(Event("s:m3", "Viewed Page", T0 + 50)), later, T0 + 50)
    assert left.end_reason == "exit_rule:no_email"


# --- conditions on the entry properties alone do not wait ---------------------------------------------------------


def test_conditions_on_the_entry_properties_alone_are_decided_at_once_while_the_fields_lag() -> None:
    j = journey(
        [
            {"id": "b", "type": "branch", "branches": [{"if": "entry.total > 100", "next": "w"}], "else": "small"},
            {"id": "w", "type": "wait", "condition": 'entry.tier = "gold"', "timeout": "1d", "next": "d"},
            {"id": "d", "type": "delay", "duration": "1d"},
            {"id": "small", "type": "exit"},
        ],
        exit=[
            {"id": "fraud", "condition": "entry.total > 10000"},
            {"id": "no_email", "condition": "not traits.email exists"},
        ],
    )
    lagging = PersonView("p1", {}, behind=T0)
    gold = Event("s:m1", "Trial Started", T0, properties={"total": 120, "tier": "gold"})
    instance, _ = step(new_instance(j, "p1", "e1"), j, Enter(gold), lagging, T0)
    assert [s.outcome for s in instance.steps] == ["branch:0", "entered", "met", "entered"] and instance.node == "d"
    assert instance.status is Status.RUNNING  # no_email waits for the change; a recheck bounds it
    assert sorted(t.kind for t in instance.timers) == ["delay", RECHECK]
    fraud = Event("s:m2", "Trial Started", T0, properties={"total": 20000})
    _, commands = step(new_instance(j, "p1", "e2"), j, Enter(fraud), lagging, T0)
    assert of(commands, End)[0].reason == "exit_rule:fraud"
