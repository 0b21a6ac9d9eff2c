"""Webhook requests refused (stale, forged signature, replayed): counted, and logged without flooding.

A flood of forged requests must not flood the log: the first refusal is logged at once (a WARNING naming
the connection and the reason), those that follow within the minute are only counted, and one line a
minute then says how many were refused, by connection and reason, for as long as they go on. Every
refusal is counted in the metric `cdp.crm.webhooks.refused` (by connection and reason) as it happens.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

EVERY = 60.0  # seconds between two lines about refused webhook requests


class RefusalLog:
    def __init__(self, log: logging.Logger, *, meter: Any = None, every: float = EVERY) -> None:
        self.log = log
        self.every = every
        self.counts: Counter[tuple[str, str]] = Counter()  # (connection, reason) -> refused since the last line
        self.window: asyncio.TimerHandle | None = None  # the end of the minute after a line
        self.refused = 0  # every refusal, since the start
        self.metric = None
        if meter is not None:
            self.metric = meter.create_counter(
                "cdp.crm.webhooks.refused", unit="{request}",
                description="webhook requests refused (stale, bad signature, replayed), by connection and reason",
            )  # fmt: skip

    def __call__(self, connection: str, reason: str) -> None:
        self.refused += 1
        if self.metric is not None:
            self.metric.add(1, {"connection": connection, "reason": reason})
        if self.window is None:
            self.log.warning("crm webhook refused", extra={"connection": connection, "reason": reason})
            self._open()
        else:
            self.counts[connection, reason] += 1

    def _open(self) -> None:
        self.window = asyncio.get_running_loop().call_later(self.every, self._flush)

    def _flush(self) -> None:
        if not self.counts:
            self.window = None  # quiet for a minute: the next refusal is logged at once
            return
        by = [{"connection": c, "reason": r, "refused": n} for (c, r), n in sorted(self.counts.items())]
        self.log.warning(
            "crm webhooks refused in the last minute",
            extra={"refused": sum(self.counts.values()), "by": by, "seconds": self.every},
        )
        self.counts.clear()
        self._open()

    def close(self) -> None:
        if self.window is not None:
            self.window.cancel()
            self.window = None
