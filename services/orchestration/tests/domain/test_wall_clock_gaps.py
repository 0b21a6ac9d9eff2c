"""One rule for a wall-clock time in a person's zone, on both daylight-saving nights (`domain/clock.py`).

A time the clocks skip in spring (02:30 on the night Berlin jumps from 02:00 to 03:00) is reached when the
gap ends (03:00), the moment the clock has passed it: a `delay until`, a quiet-hours end and a scheduled
entry's cron slot (croniter's own answer) all land there. A time the clocks repeat in autumn is reached at
its first pass (a delay from inside the repeated hour, at its next pass: test_found_s42_orchestration).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from types import SimpleNamespace
from zoneinfo import ZoneInfo

from hypothesis import example, given, settings
from hypothesis import strategies as st

from cdp_orchestration.domain import clock
from cdp_orchestration.domain.arbiter import Kind, PersonState, ProposedAction, decide
from cdp_orchestration.domain.document import parse_journey
from cdp_orchestration.domain.entry import next_scheduled_entry
from cdp_orchestration.domain.instance import Enter, ScheduleTimer, new_instance, step
from cdp_orchestration.domain.journey import ScheduleEntry
from cdp_orchestration.domain.rules import parse_rules
from cdp_orchestration.domain.view import PersonView

BERLIN = ZoneInfo("Europe/Berlin")


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


# 29 March 2026: Berlin's clocks jump from 02:00 CET to 03:00 CEST (01:00 UTC); 02:00-02:59 never happens.
GAP_END = utc(2026, 3, 29, 1, 0)  # 03:00 CEST
BEFORE_GAP = utc(2026, 3, 29, 0, 10)  # 01:10 CET
# Zones with a skipped and a repeated hour a year, both signs of offset, a change at midnight (Santiago) and a half-hour one (Lord Howe).
ZONES = ("Europe/Berlin", "America/New_York", "America/Santiago", "Australia/Sydney", "Australia/Lord_Howe")


def _reads(at: float, zone: ZoneInfo = BERLIN) -> str:
    return clock.local(at, zone).strftime("%d %H:%M %Z")


def _cron_slot(cron: str, zone: str, after: float) -> float:
    journey = SimpleNamespace(entry=ScheduleEntry(cron, "members"), timezone="UTC")
    at = next_scheduled_entry(journey, PersonView("p1", {"traits.timezone": zone}), after)
    assert at is not None
    return at


def test_a_delay_until_a_time_the_clocks_skip_is_due_when_the_gap_ends_as_the_cron_slot_is():
    """`delay until 02:30` resolved to 03:30 CEST (02:30 read at the offset before the change) while a
    journey's `30 2 * * *` schedule fired at 03:00 CEST: one platform, two answers an hour apart, and a
    delay until 02:30 came after one until 03:15. Both are 03:00 now: the first instant the clock reads
    past 02:30."""
    assert _reads(clock.next_time_of_day(BEFORE_GAP, 2, 30, BERLIN)) == "29 03:00 CEST"
    assert (
        clock.next_time_of_day(BEFORE_GAP, 2, 30, BERLIN)
        == GAP_END
        == _cron_slot("30 2 * * *", "Europe/Berlin", BEFORE_GAP)
    )
    # The gap's times keep their order with the times after it: none is due after 03:15's.
    in_gap = [clock.next_time_of_day(BEFORE_GAP, 2, m, BERLIN) for m in (0, 15, 59)]
    assert in_gap == [GAP_END] * 3 < [clock.next_time_of_day(BEFORE_GAP, 3, 15, BERLIN)]
    # Once the gap is behind, the next 02:30 is the next night's; `inclusive` at the gap's end is the gap's end.
    assert _reads(clock.next_time_of_day(GAP_END, 2, 30, BERLIN)) == "30 02:30 CEST"
    assert clock.next_time_of_day(GAP_END, 2, 30, BERLIN, inclusive=True) == GAP_END
    # New York (behind UTC) skips 02:00-02:59 on 8 March 2026.
    new_york = ZoneInfo("America/New_York")
    before = utc(2026, 3, 8, 6, 30)  # 01:30 EST
    assert _reads(clock.next_time_of_day(before, 2, 30, new_york), new_york) == "08 03:00 EDT"


def test_a_journeys_delay_until_a_skipped_time_schedules_its_timer_at_the_gaps_end():
    j = parse_journey({"id": "j", "priority": 10, "entry": {"event": "Signed Up"}, "timezone": "Europe/Berlin",
                       "nodes": [{"id": "d", "type": "delay", "until": "02:30"}]})  # fmt: skip
    _, commands = step(new_instance(j, "p1", "e1"), j, Enter(), PersonView("p1", {}), BEFORE_GAP)
    [timer] = [c for c in commands if isinstance(c, ScheduleTimer)]
    assert _reads(timer.at) == "29 03:00 CEST"


def test_quiet_hours_ending_at_a_skipped_time_end_when_the_gap_does_and_the_action_goes_then():
    """Quiet hours 22:00-02:30 are over at 03:00 CEST by the quiet-hours check (the clock reads 03:00), but
    the deferral ran to 03:30: held half an hour past the rule's own end."""
    rules = parse_rules({"quiet_hours": {"from": "22:00", "to": "02:30"}})
    view = PersonView("p1", {"traits.timezone": "Europe/Berlin", "traits.email": "ada@example.com",
                             "consent.purpose:Marketing": True})  # fmt: skip

    def proposed(at: float) -> ProposedAction:
        return ProposedAction(
            "a1", "p1", "j", 1, "i1", "n", priority=10, proposed_at=at,
            channel="email", category="reminder", purpose="Marketing",
        )  # fmt: skip

    (decision,) = decide(PersonState("p1"), proposed(BEFORE_GAP), view, rules, BEFORE_GAP).decisions
    assert (decision.kind, decision.until) == (Kind.DEFERRED, GAP_END)
    assert decision.reason == "deferred until 2026-03-29 03:00 Europe/Berlin (quiet hours)"
    (decision,) = decide(PersonState("p1"), proposed(GAP_END), view, rules, GAP_END).decisions
    assert decision.kind is Kind.SENT
    # Quiet hours starting in the gap have begun once it ends.
    rules = parse_rules({"quiet_hours": {"from": "02:30", "to": "07:00"}})
    (decision,) = decide(PersonState("p1"), proposed(GAP_END), view, rules, GAP_END).decisions
    assert decision.kind is Kind.DEFERRED and _reads(decision.until) == "29 07:00 CEST"


def test_the_repeated_hour_still_resolves_to_its_first_pass_from_before_it():
    """Autumn: 02:30 on 25 October 2026 comes twice in Berlin; from before the repeated hour a delay, a
    quiet-hours end and a cron slot all take the first pass (02:30 CEST)."""
    before = utc(2026, 10, 24, 23, 10)  # 01:10 CEST
    first = utc(2026, 10, 25, 0, 30)  # 02:30 CEST
    assert clock.next_time_of_day(before, 2, 30, BERLIN) == first == _cron_slot("30 2 * * *", "Europe/Berlin", before)
    assert _reads(first) == "25 02:30 CEST"


def test_day_and_week_starts_are_real_instants_on_a_night_with_a_skipped_midnight():
    """A zone whose clocks jump at midnight (Santiago: 00:00 -> 01:00 on 6 September 2026) starts that day at
    01:00, the gap's end (a cap's period), and is 23 hours long."""
    santiago = ZoneInfo("America/Santiago")
    noon = utc(2026, 9, 6, 16, 0)  # 12:00 -03
    start = clock.day_start(noon, santiago)
    assert clock.local(start, santiago).strftime("%d %H:%M") == "06 01:00"
    assert clock.next_day_start(start - 1, santiago) == start
    assert clock.next_day_start(start, santiago) - start == 23 * 3600


@settings(max_examples=300, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    day=st.dates(min_value=date(2026, 1, 1), max_value=date(2027, 12, 31)),
    hour=st.integers(0, 23),
    minute=st.sampled_from((0, 15, 30, 45, 59)),
)
@example(zone="Europe/Berlin", day=date(2026, 3, 29), hour=2, minute=30)  # the spring gap
@example(zone="Europe/Berlin", day=date(2026, 10, 25), hour=2, minute=30)  # the autumn repeat
@example(zone="America/New_York", day=date(2026, 3, 8), hour=2, minute=0)
@example(zone="Australia/Lord_Howe", day=date(2026, 10, 4), hour=2, minute=15)  # a half-hour gap
def test_from_a_days_start_a_delay_until_hh_mm_and_a_daily_cron_at_hh_mm_are_due_at_the_same_instant(
    zone, day, hour, minute
):
    """The one rule, every day of two years: from the start of a day, `delay until HH:MM` and the schedule
    `MM HH * * *` are due at the same instant, the first at which the clock has reached HH:MM (the gap's end
    when it skips it, the first pass when it repeats it), and it reads HH:MM whenever that time exists."""
    tz = ZoneInfo(zone)
    start = clock.day_start(datetime.combine(day, datetime.min.time(), tzinfo=UTC).timestamp() + 43_200, tz)
    delay = clock.next_time_of_day(start, hour, minute, tz, inclusive=True)
    assert delay == _cron_slot(f"{minute} {hour} * * *", zone, start - 1)
    assert delay >= start
    reads = clock.local(delay, tz)
    if (reads.hour, reads.minute) != (hour, minute):  # skipped: the instant before reads earlier than HH:MM
        before = clock.local(delay - 1, tz)
        assert (before.hour, before.minute) < (hour, minute) < (reads.hour, reads.minute) or before.date() < day
    assert delay - start < timedelta(days=1, hours=1).total_seconds()
