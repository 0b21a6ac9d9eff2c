"""Each source's limits, enforced at both front doors: one bucket per source (domain/rate.py), refusals
counted and said in the log by source, never by key.

The limits come from the sources file as it is now (`SourceRegistry` re-reads it when it changes): every
request brings its source, and the bucket of that source follows the limits the source has then. A limit
set is a full bucket; a limit changed keeps what the bucket holds (no more than the new burst); a limit
removed drops the bucket, and the source is unlimited again at once. Buckets live in memory, one per
source id, per process: with several collector replicas behind a load balancer a source may send up to
the rate times the replicas.

A refused request stored nothing (the refusal comes before any event is converted, let alone published),
so retrying it is safe: HTTP 429 with Retry-After, gRPC RESOURCE_EXHAUSTED with RetryInfo, both naming
the limit. Over `max_batch` the answer is 400 / INVALID_ARGUMENT `too_many_events`, as over the
collector's own count limit: no retry helps it, the batch has to be split.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from cdp_collector.abandoned import EveryMinute
from cdp_collector.domain.errors import FieldError
from cdp_collector.domain.rate import TokenBucket, check_source_batch
from cdp_collector.sources import Source
from cdp_kit.errors import ResourceExhausted
from cdp_kit.telemetry import Telemetry

log = logging.getLogger("cdp.collector.limits")

EVENTS_PER_SECOND = "events_per_second"
MAX_BATCH = "max_batch"


class SourceLimited(ResourceExhausted):
    """A source's requests are coming faster than its `events_per_second`: nothing of this one was stored."""

    reason = "source_rate_limited"

    def __init__(self, source: Source, retry_after: float) -> None:
        limits = source.limits
        assert limits is not None and limits.events_per_second is not None
        # Whole seconds, at least one: what Retry-After carries, and what the SDKs wait.
        seconds = max(1, math.ceil(retry_after))
        super().__init__(
            f"source {source.id!r} is over its limit of {limits.describe_rate()}: nothing of this request was "
            f"stored; send it again after {seconds} s (Retry-After)",
            retry_after=seconds,
        )
        self.limit = {EVENTS_PER_SECOND: limits.events_per_second, "burst": limits.bucket_size}


def _first_line(source: Source, limit: str) -> str:
    limits = source.limits
    if limit == MAX_BATCH:
        most = limits.max_batch if limits is not None else None
        return (
            f"source {source.id!r} sent a request of more than its max_batch of {most} events: refused whole "
            "(HTTP 400, gRPC INVALID_ARGUMENT too_many_events) and refused again if sent again as it is; its "
            f"client must split its batches into requests of at most {most} events (or the source's max_batch "
            "be raised in the sources file)"
        )
    rate = limits.describe_rate() if limits is not None and limits.events_per_second is not None else "its rate"
    return (
        f"source {source.id!r} is over its limit of {rate}: its requests are refused (HTTP 429, gRPC "
        "RESOURCE_EXHAUSTED, with the seconds to wait) until it slows down; the SDKs retry them"
    )


class SourceLimiter:
    def __init__(self, telemetry: Telemetry, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock  # seconds that never go back; a test drives the buckets with its own
        self._buckets: dict[str, TokenBucket] = {}
        self._reports: dict[tuple[str, str], EveryMinute] = {}  # (source id, limit) -> its log lines
        self._limited = telemetry.meter.create_counter(
            "cdp.collector.source.limited",
            unit="{request}",
            description="requests refused for their source's own limits, by source (its id), limit and transport",
        )

    def _bucket(self, source: Source, now: float) -> TokenBucket | None:
        limits = source.limits
        if limits is None or limits.events_per_second is None:
            self._buckets.pop(source.id, None)
            return None
        rate, size = limits.events_per_second, limits.bucket_size
        assert size is not None
        bucket = self._buckets.get(source.id)
        if bucket is None:
            bucket = self._buckets[source.id] = TokenBucket(rate, size, now)
        elif bucket.rate != rate or bucket.size != size:
            bucket.configure(rate, size, now)
        return bucket

    def check_open(self, source: Source, *, transport: str) -> None:
        """Before a request's body is read: raises SourceLimited while the source's bucket is empty, which
        would refuse the request whatever it carries, so a flood from a leaked key is not even read."""
        now = self.clock()
        bucket = self._bucket(source, now)
        if bucket is not None and (wait := bucket.empty_for(now)) > 0:
            self._refused(source, EVENTS_PER_SECOND, transport)
            raise SourceLimited(source, wait)

    def check_batch(self, source: Source, count: int, *, field: str, transport: str) -> FieldError | None:
        """A request of `count` events against the source's `max_batch`: the problem to refuse it with. A
        refused request still costs its events' tokens (it was read and decoded), so a flood of oversized
        requests empties the bucket and is then refused before its bodies are read."""
        problem = check_source_batch(count, source.limits, source.id, field=field)
        if problem is not None:
            self._refused(source, MAX_BATCH, transport)
            now = self.clock()
            bucket = self._bucket(source, now)
            if bucket is not None:
                bucket.charge(count, now)
        return problem

    def take(self, source: Source, count: int, *, transport: str) -> None:
        """Admit a request of `count` events (taking their tokens) or raise SourceLimited."""
        now = self.clock()
        bucket = self._bucket(source, now)
        if bucket is not None and (wait := bucket.take(count, now)) > 0:
            self._refused(source, EVENTS_PER_SECOND, transport)
            raise SourceLimited(source, wait)

    def give_back(self, source: Source, count: int) -> None:
        """The admitted request of `count` events was not stored (the bus could not take it): its retry is
        not to be refused for the tokens it spent."""
        bucket = self._buckets.get(source.id)
        if bucket is not None:
            bucket.give_back(count)

    def _refused(self, source: Source, limit: str, transport: str) -> None:
        self._limited.add(1, {"source": source.id, "limit": limit, "transport": transport})
        report = self._reports.get((source.id, limit))
        if report is None:
            # One report a source and limit, so each one's first refusal is said at once, in words that say
            # what the client must do: over its rate, wait (the SDKs do); over max_batch, split its batches.
            # `%` in an id is not a format directive of the summary.
            quoted = repr(source.id).replace("%", "%%")
            summary = (
                f"source {quoted}: %d requests over its max_batch refused in the last minute: its client must "
                "split its batches"
                if limit == MAX_BATCH
                else f"source {quoted}: %d requests refused for its rate in the last minute"
            )
            report = self._reports[(source.id, limit)] = EveryMinute(
                log,
                first="",
                summary=summary,
                unit="requests",
                level=logging.WARNING,
                context={"source": source.id},
            )
        # Said with the limits the source has now: the file may have changed them since the last line.
        report.first = _first_line(source, limit)
        report(f"{transport} {limit}", limit=limit, transport=transport)

    def close(self) -> None:
        for report in self._reports.values():
            report.close()
