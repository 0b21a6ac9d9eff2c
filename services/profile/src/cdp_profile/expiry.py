"""Windowed computed traits fall as time passes, without a new event: the expiry schedule.

Each hot profile says when its windowed values next change (`Profile.next_expiry`); the schedule keeps
the earliest such time per person in a heap. Once a second the engine expires every profile whose time
has come and publishes the changes with cause "expiry". Nothing here is durable: the schedule is
rebuilt from the profiles when they are loaded, and values are computed on read too, so a missed round
only delays the published change.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Awaitable, Callable, Mapping

from cdp_profile.domain import ComputedTraits, Profile, ProfileChange

log = logging.getLogger("cdp.profile.expiry")


class ExpirySchedule:
    """When each hot profile's windowed values next change; one heap entry per earlier time."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}

    def schedule(self, profile: Profile) -> None:
        due = profile.next_expiry()
        if due is None:
            return
        scheduled = self._due.get(profile.person_id)
        if scheduled is None or due < scheduled:
            self._due[profile.person_id] = due
            heapq.heappush(self._heap, (due, profile.person_id))

    def schedule_applied(self, profile: Profile) -> None:
        """`schedule` after events were applied to `profile`, without walking its states when it is on the
        schedule already: its time then stays at or before the expiry of every state the events did not
        add to, so only the entries they added can bring it earlier (`Profile.take_added_due`)."""
        added = profile.take_added_due()
        scheduled = self._due.get(profile.person_id)
        if scheduled is None:
            self.schedule(profile)
        elif added is not None and added < scheduled:
            self._due[profile.person_id] = added
            heapq.heappush(self._heap, (added, profile.person_id))

    def pop_due(self, now: float) -> list[str]:
        """The persons whose time has come (each once), taken off the schedule."""
        persons: list[str] = []
        while self._heap and self._heap[0][0] <= now:
            due, person = heapq.heappop(self._heap)
            if self._due.get(person) != due:
                continue  # superseded by an earlier time, already handled
            del self._due[person]
            persons.append(person)
        return persons

    def clear(self) -> None:
        self._heap.clear()
        self._due.clear()


def expire(
    schedule: ExpirySchedule, profiles: Mapping[str, Profile], defs: ComputedTraits, *, now: float
) -> dict[str, ProfileChange]:
    """Expire every profile due by `now` and schedule its next time; the visible changes, by person."""
    changes: dict[str, ProfileChange] = {}
    for person in schedule.pop_due(now):
        profile = profiles.get(person)
        if profile is None:
            continue  # merged away or deleted since it was scheduled
        change = profile.expire(defs, now=now)
        if change:
            changes[person] = change
        schedule.schedule(profile)
    return changes


async def expiry_loop(expire_due: Callable[[], Awaitable[int]], interval: float = 1.0) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await expire_due()
        except Exception as exc:  # the next round tries again; the values are computed on read too
            log.warning("expiry round failed: %r", exc)
