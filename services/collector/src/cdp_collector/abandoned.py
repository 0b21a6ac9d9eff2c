"""Requests whose client went away before sending its whole body: counted, and logged without flooding.

A client that resets its connection, or closes it, in the middle of its body is not an error of the
collector: nobody is left to answer, and nothing of the request was stored. A crashed app, a phone losing
its network and a flood of resets all look the same here, so none is an ERROR with a traceback. The first
one is an INFO line at once (the reason and the path); those that follow within the minute are only
counted, and one INFO line a minute then says how many there were, by reason, for as long as they go on.
Every one is counted in the metric `cdp.collector.http.abandoned` (attribute `reason`: `reset` for a TCP
reset, `closed` for a connection closed before the body's announced end) as it happens.

`EveryMinute` is that way of saying things, for every flood the HTTP edge meets (connections.py too).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from aiohttp.http_exceptions import ContentLengthError, TransferEncodingError

from cdp_kit.telemetry import Telemetry

EVERY = 60.0  # seconds between two lines about the same kind of thing

#: What reading a body raises when its client has gone: a reset (ConnectionResetError with the OS's errno),
#: a close before the Content-Length or the last chunk arrived (aiohttp's parser errors, or its own
#: ConnectionResetError "Connection lost" without an errno).
GONE = (ConnectionError, ContentLengthError, TransferEncodingError)


def reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionResetError) and exc.errno is not None:
        return "reset"
    return "closed"


class EveryMinute:
    """One kind of thing that may happen thousands of times a second, said at most once a minute: the
    first at once (`first`, with the reason and `extra`), those that follow within the minute counted by
    reason, then one line (`summary`, formatted with their number, and their numbers by reason) at the end of that minute, and of each
    minute after while they go on. A quiet minute starts over: the next one is said at once."""

    def __init__(
        self,
        log: logging.Logger,
        *,
        first: str,
        summary: str,
        unit: str,
        level: int = logging.INFO,
        every: float = EVERY,
        context: dict | None = None,
    ) -> None:
        self.log = log
        # Fields on every line (the first's and the summaries'): by default the HTTP edge's.
        self.context = {"transport": "http"} if context is None else context
        self.first = first
        self.summary = summary
        self.unit = unit  # what the summary's counts by reason are of ("requests")
        self.level = level
        self.every = every
        self.counts: Counter[str] = Counter()  # reason -> occurrences since the last line
        self.window: asyncio.TimerHandle | None = None  # the end of the minute after a line

    def __call__(self, why: str, **extra) -> None:
        if self.window is None:
            self.log.log(self.level, self.first, extra={**self.context, "reason": why, **extra})
            self.window = asyncio.get_running_loop().call_later(self.every, self._flush)
        else:
            self.counts[why] += 1

    def _flush(self) -> None:
        if not self.counts:
            self.window = None  # a quiet minute: the next one is said at once
            return
        by = [{"reason": why, self.unit: n} for why, n in sorted(self.counts.items())]
        self.log.log(
            self.level,
            self.summary,
            sum(self.counts.values()),
            extra={**self.context, "by": by, "seconds": self.every},
        )
        self.counts.clear()
        self.window = asyncio.get_running_loop().call_later(self.every, self._flush)

    def close(self) -> None:
        if self.window is not None:
            self.window.cancel()
            self.window = None


class AbandonedRequests:
    def __init__(self, log: logging.Logger, telemetry: Telemetry, *, every: float = EVERY) -> None:
        self.report = EveryMinute(
            log,
            first="a client went away before sending its whole request; nothing of it was stored",
            summary="%d clients went away before sending their whole request in the last minute; nothing of them "
            "was stored",
            unit="requests",
            every=every,
        )
        self.metric = telemetry.meter.create_counter(
            "cdp.collector.http.abandoned",
            unit="{request}",
            description="HTTP requests whose client went away before sending its whole body, by reason",
        )

    def __call__(self, exc: BaseException, path: str) -> None:
        why = reason(exc)
        self.metric.add(1, {"reason": why})
        self.report(why, path=path)

    def close(self) -> None:
        self.report.close()
