"""How many bytes of request bodies the HTTP API receives at once: a bound, so that many large bodies
arriving together, or trickled on purpose, cost the collector a bounded amount of memory.

A body is held in memory whole (up to the read ceiling, http.read_ceiling) while it arrives, for up to
the body timeout. Without a bound, clients trickling near-limit bodies held half a megabyte each for that
long, and a thousand of them were more than the collector's memory. Each body takes its announced length
(one of unannounced length, chunked, the most a body may be) before it is read and gives it back once it
is read: decoding, validating and handing the events to the bus's in-flight budget (429 past it) follow
without waiting on the network, so only the reading holds bytes here. A request that does not fit is
answered 503 `busy` with Retry-After before its body is read (http.py), counted in
`cdp.collector.http.busy` and said at WARNING at most once a minute; `cdp.collector.http.body_reserved` is
what is taken.
"""

from __future__ import annotations

import logging

from cdp_collector.abandoned import EveryMinute
from cdp_kit.telemetry import Telemetry, observe_on

DEFAULT_BODY_BUDGET = 128 * 1024 * 1024


class BodyBudget:
    """The bytes of request bodies being received at once, at most `limit`."""

    def __init__(self, limit: int, telemetry: Telemetry, log: logging.Logger) -> None:
        self.limit = limit
        self.taken = 0
        self.busy = telemetry.meter.create_counter(
            "cdp.collector.http.busy",
            unit="{request}",
            description="HTTP requests answered 503 busy before their body was read: the bodies being received "
            "at once were at CDP_COLLECTOR_HTTP_BODY_BUDGET_BYTES",
        )
        meter = telemetry.meter
        observe_on(
            meter,
            "cdp.collector.http.body_reserved",
            self,
            BodyBudget._observe,
            lambda callback: meter.create_observable_gauge(
                "cdp.collector.http.body_reserved",
                callbacks=[callback],
                unit="By",
                description="bytes of HTTP request bodies being received (their announced lengths)",
            ),
        )
        self.report = EveryMinute(
            log,
            first="answered an HTTP request busy before reading its body: the bodies being received at once are "
            "at CDP_COLLECTOR_HTTP_BODY_BUDGET_BYTES; callers are told to retry",
            summary="answered %d HTTP requests busy in the last minute: too many body bytes being received",
            unit="requests",
            level=logging.WARNING,
        )

    def _observe(self):
        from opentelemetry.metrics import Observation

        return [Observation(self.taken)]

    def take(self, size: int) -> bool:
        if self.taken + size > self.limit:
            self.busy.add(1)
            self.report("body_budget", limit=self.limit)
            return False
        self.taken += size
        return True

    def give_back(self, size: int) -> None:
        self.taken -= size
