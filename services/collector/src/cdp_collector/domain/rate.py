"""Per-source limits: how fast one source may send (a token bucket) and how many events one request of it
may carry. Plain Python with the time handed in, so the rules are tested without waiting.

A write key admits any volume, and browser and mobile keys are public: without these one leaked key can
send as much as the collector and the bus take, and every other source waits behind it. A source's limits
are written with it in the sources file (`sources.py`), next to its key:

    {"id": "web", "write_key": "wk_…", "limits": {"events_per_second": 50, "burst": 500, "max_batch": 100}}

- **events_per_second, burst.** A bucket holds at most `burst` tokens (default: one second's worth) and
  refills at `events_per_second`. A request costs one token per event it carries (valid or not: each is
  read and checked) and is taken whole or not at all: admitted when the bucket holds as many tokens as the
  request has events, else refused before any event is stored, with the seconds until it would be
  admitted. Nothing of a refused request is stored, so the client's retry (Segment's SDKs retry 429) loses
  nothing and stores nothing twice. A request larger than the burst could never be admitted that way; it
  is admitted when the bucket is full and leaves it in debt (negative), which the refill pays back before
  anything else of the source is admitted: the rate still holds over time, and no request is refused for
  ever by a rate.
- **max_batch.** At most so many events per request for this source (under the collector's own
  `CDP_COLLECTOR_MAX_BATCH_EVENTS`): over it the whole request is refused (`too_many_events`, naming
  the source's limit), as over Segment's own count limit.

A source without `limits` (or with an empty object) is limited only by what limits every source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cdp_collector.domain.errors import Code, FieldError

#: The keys a source's `limits` object may have. Anything else is refused, so a misspelt limit
#: (`event_per_second`) stops a start or a reload instead of silently limiting nothing.
LIMIT_KEYS = ("events_per_second", "burst", "max_batch")


@dataclass(frozen=True, slots=True)
class SourceLimits:
    """One source's limits; None for a limit not set."""

    events_per_second: float | None = None
    burst: int | None = None
    max_batch: int | None = None

    @property
    def bucket_size(self) -> int | None:
        """The burst in force: as written, else one second's worth of events (at least one)."""
        if self.events_per_second is None:
            return None
        return self.burst if self.burst is not None else max(1, math.ceil(self.events_per_second))

    def describe_rate(self) -> str:
        return f"{self.events_per_second:g} events per second (burst {self.bucket_size})"


def parse_source_limits(value: Any, where: str) -> SourceLimits | None:
    """The `limits` of one sources-file entry (`where` names it: `sources[2].limits`), None when there are
    none. Raises ValueError naming the field and what it must be."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object with any of {', '.join(LIMIT_KEYS)}")
    unknown = sorted(set(value) - set(LIMIT_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}: the limits are {', '.join(LIMIT_KEYS)}")
    rate = value.get("events_per_second")
    if rate is not None and not (
        isinstance(rate, (int, float)) and not isinstance(rate, bool) and math.isfinite(rate) and rate > 0
    ):
        raise ValueError(f"{where}.events_per_second must be a positive number")
    for name in ("burst", "max_batch"):
        count = value.get(name)
        if count is not None and not (isinstance(count, int) and not isinstance(count, bool) and count >= 1):
            raise ValueError(f"{where}.{name} must be a whole number of at least 1")
    if value.get("burst") is not None and rate is None:
        raise ValueError(f"{where}.burst is set without events_per_second: a burst is of a rate")
    limits = SourceLimits(float(rate) if rate is not None else None, value.get("burst"), value.get("max_batch"))
    return None if limits == SourceLimits() else limits


def check_source_batch(count: int, limits: SourceLimits | None, source_id: str, *, field: str) -> FieldError | None:
    """A request of `count` events against the source's `max_batch`; gRPC passes field="events"."""
    if limits is None or limits.max_batch is None or count <= limits.max_batch:
        return None
    return FieldError(
        Code.TOO_MANY_EVENTS,
        field,
        f"request has {count} events; source {source_id!r} may send at most {limits.max_batch} events per request "
        "(its max_batch in the collector's sources file): nothing of it was stored, and sent again as it is it "
        f"is refused again; split it into requests of at most {limits.max_batch} events and send those",
    )


class TokenBucket:
    """`events_per_second` refills, up to `size` tokens; a request takes its events' worth whole or not at
    all. Times are seconds on any clock that does not go back (the caller's `time.monotonic`)."""

    __slots__ = ("rate", "size", "tokens", "updated")

    def __init__(self, rate: float, size: int, now: float) -> None:
        self.rate = rate
        self.size = size
        self.tokens = float(size)  # a new bucket (a new source, a limit just set) starts full
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(float(self.size), self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def configure(self, rate: float, size: int, now: float) -> None:
        """New limits (the sources file changed): what was refilled so far at the old rate stays, no more
        than the new size."""
        self._refill(now)
        self.rate, self.size = rate, size
        self.tokens = min(self.tokens, float(size))

    def take(self, count: int, now: float) -> float:
        """Take `count` tokens and return 0, or take none and return the seconds until `count` would be
        taken. A count over the size is taken from a full bucket, leaving it in debt."""
        self._refill(now)
        needed = min(count, self.size)
        if self.tokens >= needed:
            self.tokens -= count
            return 0.0
        return (needed - self.tokens) / self.rate

    def charge(self, count: int, now: float) -> None:
        """Take `count` tokens whatever the bucket holds: the cost of a request that was read and refused
        (over `max_batch`). The debt stops at one bucket's size, so a refusal never locks the source out
        for longer than two bursts take to refill."""
        self._refill(now)
        self.tokens = max(-float(self.size), self.tokens - count)

    def empty_for(self, now: float) -> float:
        """Seconds until the bucket holds one token again (0 when it holds one now): while above 0, a
        request is refused before it is read, whatever it carries."""
        self._refill(now)
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def give_back(self, count: int) -> None:
        """Return the tokens of an admitted request that was not stored (the bus could not take it), so
        the client's retry is not refused for it."""
        self.tokens = min(float(self.size), self.tokens + count)
