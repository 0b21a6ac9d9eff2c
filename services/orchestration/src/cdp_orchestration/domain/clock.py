"""Wall-clock arithmetic in a person's time zone: time of day, calendar days and weeks, next occurrences.

Every function takes epoch seconds and an IANA zone name and returns epoch seconds, so callers never hold a
datetime. Days and weeks are calendar ones in the zone (a week starts on Monday, ISO 8601), so a day with a
daylight-saving change is 23 or 25 hours long.

The platform's one rule for a wall time on a daylight-saving night (`wall_time`), for everything here that
resolves one - a `delay until`, a quiet-hours end, a day's or a week's start - and what croniter gives a
scheduled entry's slot:

- a time the clocks skip (02:30 on the night Berlin jumps from 02:00 to 03:00) is reached when the gap ends,
  at 03:00: the first instant the clock has passed it. Reading it at the offset before the change (Python's
  `fold=0`, what this did before) gave 03:30, half an hour after the journey's `30 2 * * *` fired, after a
  delay until 03:15, and after the quiet-hours check itself said the quiet hours were over;
- a time the clocks repeat (02:30 on the night they go back) is reached at its first pass; from inside the
  repeated hour, the next time it reads 02:30 is its second pass (`next_time_of_day`).
"""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_TIME_OF_DAY = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)\Z")

#: What ZoneInfo raises for a name that is no zone. A name is looked up as a file of the zone database, so
#: besides an unknown name (ZoneInfoNotFoundError) and a malformed one (ValueError) a folder of it ("Europe",
#: IsADirectoryError) or a name too long for a file name (OSError) fails there too: a person's
#: `traits.timezone`, which any client may send, then failed orchestration's batch for them (the partition
#: held through redeliveries, the event dead-lettered), and a journey's `timezone` failed validation INTERNAL.
_NOT_A_ZONE = (ZoneInfoNotFoundError, ValueError, OSError)


def zone_problem(name: object) -> str | None:
    """Why `name` is not an IANA time zone, or None when it is one."""
    if not isinstance(name, str) or not name:
        return f"{name!r} is not a time zone: use an IANA name like 'Europe/Berlin'"
    try:
        _zone(name)
    except _NOT_A_ZONE:
        return f"{name!r} is not a known IANA time zone: use a name like 'Europe/Berlin' or 'UTC'"
    return None


@lru_cache(maxsize=1024)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def zone(name: str | None, fallback: str = "UTC") -> ZoneInfo:
    """The zone called `name`, or `fallback` when the name is missing or unknown (a profile can hold anything)."""
    if name:
        try:
            return _zone(name)
        except _NOT_A_ZONE:
            pass
    return _zone(fallback)


def time_of_day(text: object) -> tuple[int, int]:
    """(hour, minute) from "HH:MM" (24-hour); ValueError with the fix otherwise."""
    match = _TIME_OF_DAY.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a time of day: write it as HH:MM on a 24-hour clock, like '08:00'")
    return int(match.group(1)), int(match.group(2))


def local(now: float, tz: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(now, tz)


def minute_of_day(now: float, tz: ZoneInfo) -> int:
    moment = local(now, tz)
    return moment.hour * 60 + moment.minute


def wall_time(day: date, hour: int, minute: int, tz: ZoneInfo) -> float:
    """The instant `day` reaches hour:minute in `tz`: the first instant reading it (the first pass of a
    repeated hour), or, when the clocks skip it, the end of the gap (the module's rule)."""
    wall = datetime.combine(day, time(hour, minute), tzinfo=tz)
    instant = wall.timestamp()  # fold=0: the first pass; in a gap, read at the offset before the change
    if local(instant, tz).replace(tzinfo=None) == wall.replace(tzinfo=None):
        return instant
    # In a gap: fold=0 and fold=1 read the wall time at the offsets on either side of the change, so the
    # change - the gap's end - lies between the two instants. Found to the second (zones change on whole
    # minutes; a search of at most a few hours' seconds, on the two nights a year it is needed).
    other = wall.replace(fold=1).timestamp()
    before, after = int(min(instant, other)), int(max(instant, other))
    offset_after = local(after, tz).utcoffset()
    while after - before > 1:
        middle = (before + after) // 2
        if local(middle, tz).utcoffset() == offset_after:
            after = middle
        else:
            before = middle
    return float(after)


def _all_at(day: date, hour: int, minute: int, tz: ZoneInfo) -> tuple[float, ...]:
    """Every instant of `day` whose local time is hour:minute, earliest first: two in the hour an autumn
    change repeats (fold 0, then fold 1), else one (`wall_time`; in a spring gap, the gap's end)."""
    first = wall_time(day, hour, minute, tz)
    second = datetime.combine(day, time(hour, minute, fold=1), tzinfo=tz).timestamp()
    if second > first and (local(second, tz).hour, local(second, tz).minute) == (hour, minute):
        return first, second
    return (first,)


def next_time_of_day(now: float, hour: int, minute: int, tz: ZoneInfo, *, inclusive: bool = False) -> float:
    """The first instant after `now` (or at it, when `inclusive`) whose local time is hour:minute. On the
    night an autumn change repeats an hour, a time in it comes twice: at 02:10 of the second pass the next
    02:30 is twenty minutes away (taking only the first pass waited for the next night's)."""
    day = local(now, tz).date()
    for offset in range(3):
        for instant in _all_at(day + timedelta(days=offset), hour, minute, tz):
            if instant > now or (inclusive and instant == now):
                return instant
    raise AssertionError("a time of day recurs within three days")


def day_start(now: float, tz: ZoneInfo) -> float:
    """The start of the person's calendar day holding `now`."""
    return wall_time(local(now, tz).date(), 0, 0, tz)


def week_start(now: float, tz: ZoneInfo) -> float:
    """The start of the person's calendar week (Monday 00:00) holding `now`."""
    today = local(now, tz).date()
    return wall_time(today - timedelta(days=today.weekday()), 0, 0, tz)


def next_day_start(now: float, tz: ZoneInfo) -> float:
    tomorrow = local(now, tz).date() + timedelta(days=1)
    return wall_time(tomorrow, 0, 0, tz)


def next_week_start(now: float, tz: ZoneInfo) -> float:
    today = local(now, tz).date()
    monday = today + timedelta(days=7 - today.weekday())
    return wall_time(monday, 0, 0, tz)
