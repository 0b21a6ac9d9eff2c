"""Waiting in a test for something another process or task does: the first truthy answer of a check.

    await eventually(lambda: len(smtp.mailbox) >= 3, timeout=30)
    record = await eventually(lambda: store.get(RUNS, "run-1"))      # an async check is awaited

The check is asked again every `every` seconds until it answers something truthy (returned) or `timeout`
seconds have passed (AssertionError saying how long it waited). Only the deadline is timed: how quickly
the answer came is never asserted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


async def eventually(check: Callable[[], Any], timeout: float = 10.0, every: float = 0.05) -> Any:
    """The first truthy answer of `check` (sync or async) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if asyncio.iscoroutine(answer):
            answer = await answer
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(every)


async def until(done: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """`eventually`, asked every 20 ms for at most `timeout` seconds (a guard against waiting for ever, not a
    speed figure), whose AssertionError says what was waited for."""
    try:
        return await eventually(done, timeout=timeout, every=0.02)
    except AssertionError:
        raise AssertionError(f"timed out waiting for: {what}") from None
