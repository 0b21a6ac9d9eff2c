"""When scheduled jobs run: cron expressions (five fields, UTC) and the loop that waits for them; and
the times a run is given (`parse_time`: an ISO date or time, or epoch seconds).

    minute hour day-of-month month day-of-week        "0 3 * * 1"  (Mondays at 03:00 UTC)
    @hourly = "0 * * * *", @daily = "0 0 * * *", @weekly = "0 0 * * 0"

A field is `*`, a number, a range `a-b`, a list `a,b`, and any of them with a step `/n`. As in cron, when
both day fields are restricted a day matching either runs. Days of the week are 0-6 from Sunday (7 is
Sunday too).

`CDP_SCORING_TRAIN_SCHEDULE` names one expression per model: `churn_risk=0 3 * * 1;fraud_risk=@daily`.
A job that is still running when its next time comes is not started twice: that time is skipped. Times
are not caught up after a restart: a schedule says when to run from now on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cdp_kit.bus.consumer import describe_error
from cdp_kit.errors import InvalidArgument

log = logging.getLogger("cdp.scoring.schedule")

ALIASES = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@weekly": "0 0 * * 0"}
FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))
MAX_SEARCH = timedelta(days=366 * 5)


def _field(text: str, name: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if base == "*":
                start, end = low, high
            elif "-" in base:
                start, end = (int(v) for v in base.split("-", 1))
            else:
                start = end = int(base)
                if step_text:
                    end = high
        except ValueError:
            raise InvalidArgument("schedule", f"{name} {part!r} is not a number, range, list or '*'") from None
        if step < 1 or not low <= start <= end <= high:
            raise InvalidArgument("schedule", f"{name} {part!r} is out of range {low}-{high}")
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True, slots=True)
class Cron:
    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool
    any_weekday: bool

    @classmethod
    def parse(cls, text: str) -> Cron:
        expression = ALIASES.get(text.strip(), text.strip())
        parts = expression.split()
        if len(parts) != 5:
            raise InvalidArgument(
                "schedule", f"{text!r} needs five fields (minute hour day month weekday) or @hourly/@daily/@weekly"
            )
        minutes, hours, days, months, weekdays = (
            _field(part, name, low, high) for part, (name, low, high) in zip(parts, FIELDS, strict=True)
        )
        weekdays = frozenset(d % 7 for d in weekdays)
        return cls(text, minutes, hours, days, months, weekdays, parts[2] == "*", parts[4] == "*")

    def _day_matches(self, at: datetime) -> bool:
        in_month = at.day in self.days
        in_week = (at.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return in_month and in_week
        return in_month or in_week

    def next_after(self, now: float) -> float:
        """The first time strictly after `now` (epoch seconds) that the expression names."""
        at = datetime.fromtimestamp(now, UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
        limit = at + MAX_SEARCH
        while at < limit:
            if at.month not in self.months:
                at = (at.replace(day=1, hour=0, minute=0) + timedelta(days=32)).replace(day=1)
                continue
            if not self._day_matches(at):
                at = at.replace(hour=0, minute=0) + timedelta(days=1)
                continue
            if at.hour not in self.hours:
                at = at.replace(minute=0) + timedelta(hours=1)
                continue
            if at.minute not in self.minutes:
                at += timedelta(minutes=1)
                continue
            return at.timestamp()
        raise InvalidArgument("schedule", f"{self.text!r} names no time in the next five years")


def parse_time(value: str, field_name: str) -> float:
    """Epoch seconds from an ISO date or time ("2025-06-01", "2025-06-01T12:00:00Z") or a number."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgument(
            field_name, f"{value!r} is not a time: write 2025-06-01 or 2025-06-01T12:00:00Z"
        ) from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def parse_schedule(text: str) -> dict[str, Cron]:
    """`model=cron;model=cron` -> {model: Cron}."""
    out: dict[str, Cron] = {}
    for item in (part.strip() for part in text.split(";")):
        if not item:
            continue
        model, sep, expression = item.partition("=")
        model = model.strip()
        if not sep or not model:
            raise InvalidArgument("schedule", f"{item!r} must be model=cron, e.g. churn_risk=@daily")
        if model in out:
            raise InvalidArgument("schedule", f"model {model!r} is scheduled twice")
        out[model] = Cron.parse(expression)
    return out


async def every(
    cron: Cron,
    job: Callable[[], Awaitable[object]],
    name: str,
    *,
    clock: Callable[[], float] = time.time,
) -> None:
    """Run `job` at each time `cron` names, for the life of the service. A failed run is logged; the
    schedule goes on."""
    while True:
        due = cron.next_after(clock())
        await asyncio.sleep(max(0.0, due - clock()))
        try:
            await job()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The type and the traceback, whose messages the log's formatter withholds: never the text,
            # which quotes what the job had in hand (a trait's value in a conversion error, a store key).
            log.error("scheduled %s failed: %s", name, describe_error(exc), exc_info=exc)
