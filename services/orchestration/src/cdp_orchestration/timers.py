"""A person's durable timers as the engine keeps them: instance timers, the arbiter's wake, scheduled-entry slots.

Each is one JetStream message schedule (`streams.schedule` / `streams.cancel`) published from the engine's
outbox once the change that asked for it is durable. What the person expects is in their record: the
instance's own timers (`Instance.timers`), `Person.wake` (timer id, due) and `Person.slots` (journey ->
(timer id, slot time)); a fire that no longer matches what they expect changes nothing.

`due` is the time a timer is scheduled at: the domain's time less the engine's `clock_offset` (a test
knob that moves the domain's clock; the server's clock does not move).

Public interface (used by `apply`, `merges` and `privacy`):
- `schedule_instance_timer`: one instance timer, on the person's partition;
- `cancel_all`: every timer the person holds (their instances', the wake, the slots);
- `keep_wake`: one wake timer per person at `arbiter.next_wake`;
- `arm` / `slot`: a scheduled journey's next slot for a person, and what happens when it comes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cdp_orchestration import streams
from cdp_orchestration.domain import arbiter, entry
from cdp_orchestration.domain.instance import Enter
from cdp_orchestration.domain.journey import Journey, ScheduleEntry
from cdp_orchestration.domain.lifecycle import State
from cdp_orchestration.state import Batch, Partition, Person, slot_id, wake_id

if TYPE_CHECKING:
    from cdp_orchestration.apply import Applier


def schedule_instance_timer(
    batch: Batch,
    person_id: str,
    instance_id: str,
    timer_id: str,
    at: float,
    *,
    clock_offset: float,
    msg_id: str | None = None,
) -> None:
    """An instance's timer `timer_id`, due at domain time `at`, firing into the batch's partition."""
    due = at - clock_offset
    payload = {"t": timer_id, "i": instance_id, "p": person_id, "d": due}
    batch.messages.append(streams.schedule(batch.partition, timer_id, due, payload, msg_id=msg_id))


def cancel_all(batch: Batch, person: Person) -> None:
    """Cancel every timer the person holds on this partition (a hand-over, a deletion)."""
    p = batch.partition
    for instance in person.live.values():
        for timer in instance.timers:
            batch.messages.append(streams.cancel(p, timer.id))
    if person.wake is not None:
        batch.messages.append(streams.cancel(p, person.wake[0]))
    for timer, _at in person.slots.values():
        batch.messages.append(streams.cancel(p, timer))


def keep_wake(batch: Batch, person: Person, *, clock_offset: float) -> None:
    """One durable timer per person at the arbiter's next wake."""
    state = person.state
    # Most persons hold nothing (no deferred action, no approval awaited): no wake, without building the min.
    at = arbiter.next_wake(state) if state is not None and (state.deferred or state.awaiting) else None
    current = person.wake
    if (current[1] if current else None) == at:
        return
    if current is not None:
        batch.messages.append(streams.cancel(batch.partition, current[0]))
    person.wake = None
    if at is not None:
        timer = wake_id(person.person_id, at)
        due = at - clock_offset
        payload = {"w": timer, "p": person.person_id, "d": due}
        batch.messages.append(streams.schedule(batch.partition, timer, due, payload))
        person.wake = (timer, at)
    person.dirty = True


def arm(applier: Applier, batch: Batch, person: Person, journey: Journey, now: float) -> None:
    """Keep one timer at the person's next slot of a scheduled journey while they are in its segment (the
    slot is read in their zone); none once they left it or the journey no longer runs on a schedule."""
    schedule = journey.entry if isinstance(journey.entry, ScheduleEntry) else None
    current = person.slots.get(journey.id)
    record = applier.journeys.records.get(journey.id)
    wanted = (
        schedule is not None
        and schedule.segment in person.segments
        and record is not None
        and record.state is not State.ARCHIVED
    )
    if wanted and current is not None and current[1] > now:
        return  # armed already
    if current is not None:
        batch.messages.append(streams.cancel(batch.partition, current[0]))
        del person.slots[journey.id]
        person.dirty = True
    if not wanted:
        return
    at = entry.next_scheduled_entry(journey, person.view(), now)
    if at is None:
        return
    timer = slot_id(journey.id, person.person_id, at)
    due = at - applier.clock_offset
    payload = {"s": journey.id, "p": person.person_id, "at": at, "d": due}
    batch.messages.append(streams.schedule(batch.partition, timer, due, payload))
    person.slots[journey.id] = (timer, at)
    person.dirty = True


async def slot(applier: Applier, hot: Partition, batch: Batch, person: Person, body: dict, now: float) -> None:
    """A scheduled journey's slot came: the person enters (if it takes entries and they are still in the
    segment), and the next slot is armed."""
    journey_id = body["s"]
    current = person.slots.get(journey_id)
    if current is None or current[0] != slot_id(journey_id, person.person_id, body["at"]):
        return  # cancelled, or re-armed since
    del person.slots[journey_id]
    person.dirty = True
    record = await applier.journeys.reload(journey_id)
    journey = record.live if record is not None else None
    if journey is None:
        return
    schedule = journey.entry if isinstance(journey.entry, ScheduleEntry) else None
    if record.accepts_entries and schedule is not None and schedule.segment in person.segments:  # type: ignore[union-attr]
        trigger = entry.schedule_trigger(body["at"])
        await applier.enter(hot, batch, person, journey, trigger, Enter(), now)
    elif record.state is State.PAUSED and schedule is not None and schedule.segment in person.segments:  # type: ignore[union-attr]
        applier.paused(batch, person, journey_id, now)
    # The next slot is after this one (a slot that fired early by a rounding never repeats itself).
    arm(applier, batch, person, journey, max(now, body["at"]))
