"""Who enters a journey, and when: the entry triggers and the entry decision.

- `enters_on_event`, `enters_on_segment`, `enters_on_api`: whether a trigger matches a journey's entry (an
  event's name and filter and the entry's condition, which reads the event's properties as `entry.<name>`,
  as the instance it starts will; a segment entered or exited; an Enroll call).
  `entered_by_event` answers `enters_on_event` for several journeys at once, converting the event once and
  building the person's view only if an entry condition is reached, once.
- `next_scheduled_entry`: a scheduled journey's next slot for one person, its cron read in their zone;
  `schedule_trigger(at)` is the slot's trigger id, so the same slot never enters a person twice.
- `admit(journey, history, now)`: the re-entry rule (never / cooldown / always) and the cap on concurrent
  instances, from the person's `EntryHistory` for that journey (every version). Whether the journey takes
  entries at all (active, not paused) is its record's `accepts_entries`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from croniter import croniter

from cdp_orchestration.domain import clock
from cdp_orchestration.domain.conditions import converted
from cdp_orchestration.domain.instance import Instance, Status
from cdp_orchestration.domain.journey import ApiEntry, EventEntry, Journey, ScheduleEntry, SegmentEntry
from cdp_orchestration.domain.view import Event, PersonView


@dataclass(frozen=True, slots=True)
class EntryHistory:
    """What the service knows about a person's instances of one journey (every version)."""

    running: int = 0
    last_entered_at: float | None = None

    @classmethod
    def of(cls, instances: Iterable[Instance]) -> EntryHistory:
        listed = [i for i in instances if i.entered_at is not None]
        return cls(
            running=sum(1 for i in listed if i.status is Status.RUNNING),
            last_entered_at=max((i.entered_at for i in listed), default=None),  # type: ignore[type-var]
        )


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: bool
    reason: str  # "admitted", "reentry_never", "cooldown" or "concurrency_cap" (EnrollResponse.reason)


def admit(journey: Journey, history: EntryHistory, now: float) -> Admission:
    """Whether a person may enter now: the re-entry rule, the cooldown and the concurrency cap.
    (Whether the journey takes entries at all is its record's `accepts_entries`.)"""
    if history.last_entered_at is not None:
        if journey.reentry == "never":
            return Admission(False, "reentry_never")
        if journey.reentry == "cooldown":
            assert journey.cooldown is not None
            if now < history.last_entered_at + journey.cooldown:
                return Admission(False, "cooldown")
    if history.running >= journey.max_concurrent:
        return Admission(False, "concurrency_cap")
    return Admission(True, "admitted")


def enters_on_event(journey: Journey, event: Event, view: PersonView, now: float) -> bool:
    entry = journey.entry
    if not isinstance(entry, EventEntry) or not entry.event.matches(event):
        return False
    return entry.condition is None or entry.condition.holds(view, now, event.properties)


def entered_by_event(
    journeys: Iterable[Journey],
    event: Event,
    view: Callable[[], PersonView],
    now: float,
    refused: list[Journey] | None = None,
) -> list[Journey]:
    """Those of `journeys` (in order) the event enters, as `enters_on_event` decides for each; those whose
    event it matches but whose condition is false are added to `refused`, when given."""
    entered: list[Journey] = []
    as_read = None
    person: PersonView | None = None
    for journey in journeys:
        entry = journey.entry
        if not isinstance(entry, EventEntry):
            continue
        if as_read is None:
            as_read = converted(event)
        if not entry.event.matches_converted(as_read):
            continue
        if entry.condition is not None:
            if person is None:
                person = view()
            if not entry.condition.holds(person, now, event.properties):
                if refused is not None:
                    refused.append(journey)
                continue
        entered.append(journey)
    return entered


def condition_text(journey: Journey) -> str:
    """The entry condition as its author wrote it (text), for a refused entry's reason."""
    entry = journey.entry
    condition = entry.condition if isinstance(entry, EventEntry) else None
    if condition is None:
        return ""
    return condition.source if isinstance(condition.source, str) else "(the entry's condition)"


def enters_on_segment(journey: Journey, segment: str, entered: bool) -> bool:
    entry = journey.entry
    return (
        isinstance(entry, SegmentEntry)
        and entry.segment == segment
        and entry.on == ("entered" if entered else "exited")
    )


def enters_on_api(journey: Journey) -> bool:
    return isinstance(journey.entry, ApiEntry)


def next_scheduled_entry(journey: Journey, view: PersonView, after: float) -> float | None:
    """The next instant after `after` the journey's cron fires in this person's zone (None: not scheduled).

    The trigger id for that slot is `schedule_trigger(at)`, so the same slot never enters a person twice.
    A cron at fixed hours fires once at a wall time the night clocks go back repeats it, as cron does: the
    second pass of 02:30 (croniter gives both) is passed over - it entered every member a second time. One
    running every hour still fires in both passes (an hour went by)."""
    entry = journey.entry
    if not isinstance(entry, ScheduleEntry):
        return None
    zone = clock.zone(view.timezone, journey.timezone)
    slots = croniter(entry.cron, datetime.fromtimestamp(after, zone))
    every_hour = len(slots.expanded[1]) == 24 or slots.expanded[1] == ["*"]
    for _ in range(62):  # the repeated hour holds at most 60 slots (a cron every minute of it)
        at = float(slots.get_next(float))
        moment = datetime.fromtimestamp(at, zone)
        if every_hour or moment.fold == 0 or moment.replace(fold=0).timestamp() == at:
            return at
    return at


def schedule_trigger(at: float) -> str:
    return f"schedule:{at:.0f}"
