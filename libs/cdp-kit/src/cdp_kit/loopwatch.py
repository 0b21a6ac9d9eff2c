"""A held event loop, said while it is held: where the loop's thread is, and for how long.

A service's gRPC calls, HTTP requests, bus deliveries and health answers all run on one event loop. Code
that holds it (a long computation, a blocking call, a garbage collection, a lock) stops all of them at
once, and nothing the service logs says so: the next line comes after the loop runs again, if it ever
does. So a thread of its own asks the loop for a beat every `interval` seconds (`call_soon_threadsafe`);
when one has not come for `threshold` seconds (`CDP_LOOP_STALL_SECONDS`, 0: off) it logs at WARNING
"event loop held", with how long so far and the loop thread's stack (files, lines and functions: code,
never a value), once per stall, and when the loop answers again, how long it was held in all. Each stall
counts in `cdp.service.loop.stalls`. The cost while the loop runs: one callback a second.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback

from opentelemetry import metrics

log = logging.getLogger("cdp.service")

STACK_FRAMES = 12  # the innermost frames said: where the loop is held, and what called it


class LoopWatch:
    """Watch `loop`, run by the thread `thread_id`; `start` once it runs, `stop` before it closes."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        thread_id: int,
        threshold: float,
        meter: metrics.Meter,
        *,
        interval: float | None = None,
    ) -> None:
        self.loop = loop
        self.thread_id = thread_id
        self.threshold = threshold
        # A stall is seen within a quarter of the threshold, at most a second late.
        self.interval = interval if interval is not None else min(1.0, threshold / 4)
        self._stalls = meter.create_counter(
            "cdp.service.loop.stalls",
            unit="{stall}",
            description="times the event loop answered no beat for CDP_LOOP_STALL_SECONDS or longer",
        )
        self._asked: float | None = None  # when the beat not answered yet was asked for (monotonic)
        self._said = False  # the stall under way was logged
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="cdp-loop-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stopped.wait(self.interval):
            now = time.monotonic()
            asked = self._asked
            if asked is None:
                self._asked = now
                try:
                    self.loop.call_soon_threadsafe(self._beat, now)
                except RuntimeError:  # the loop is closed: nothing left to watch
                    return
                continue
            held = now - asked
            if held >= self.threshold and not self._said:
                self._said = True
                log.warning(
                    "event loop held: nothing it runs (calls, requests, deliveries, health) is answered meanwhile",
                    extra={"held_seconds": round(held, 1), "stack": self._stack()},
                )

    def _beat(self, asked: float) -> None:
        """On the loop: the beat asked for at `asked` came."""
        held = time.monotonic() - asked
        if held >= self.threshold:
            self._stalls.add(1)
            if self._said:
                log.warning("event loop answered again", extra={"held_seconds": round(held, 2)})
        self._said = False
        self._asked = None

    def _stack(self) -> list[str]:
        frame = sys._current_frames().get(self.thread_id)
        if frame is None:
            return []
        frames = traceback.extract_stack(frame)[-STACK_FRAMES:]
        return [f"{f.filename}:{f.lineno} {f.name}" for f in frames]
