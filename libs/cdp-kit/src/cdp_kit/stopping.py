"""How a task is stopped, and how it lets itself be stopped.

Python 3.11's `asyncio.wait_for` loses a cancellation that lands in the loop turn its awaitable finishes:
it returns the result and the cancelled task carries on as if never asked to stop (fixed in 3.12, where
wait_for is `asyncio.timeout`). A loop that goes on after that runs for ever and a stop waiting for it
hangs. So:

- `wait_for(awaitable, timeout)` is the wait with a limit to use: `asyncio.timeout` underneath, so a
  cancellation always reaches the task (it is raised at the task's next await if the result won).
- `raise_if_cancelling(task)` honours a stop something else swallowed (nats-py's flush path, every nats-py
  request, which waits with 3.11's wait_for): the task still remembers it was asked to stop.
- `cancel_and_wait(tasks, grace)` is a stop with a limit: a task that does not end within `grace` seconds
  is named in the log and left, rather than holding the whole stop hostage.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger("cdp.kit.stopping")


async def wait_for(awaitable: Awaitable[T], timeout: float | None) -> T:
    """`awaitable`'s result, or TimeoutError after `timeout` seconds (None: no limit); a cancellation of
    the calling task is never lost, whenever it lands. A future passed in is cancelled on timeout, as
    `asyncio.wait_for` does; shield it to keep it."""
    async with asyncio.timeout(timeout):
        return await awaitable


def raise_if_cancelling(task: asyncio.Task | None) -> None:
    """Raise CancelledError if `task` was asked to stop and something swallowed it on the way."""
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task], grace: float, logger: logging.Logger = log
) -> set[asyncio.Task]:
    """Cancel `tasks` and wait up to `grace` seconds for them to end; those still running are logged by
    task name (never by what they hold) and returned. Their exceptions are theirs: not raised here."""
    tasks = set(tasks)
    for task in tasks:
        task.cancel()
    if not tasks:
        return set()
    _done, stuck = await asyncio.wait(tasks, timeout=max(0.0, grace))
    for task in sorted(stuck, key=asyncio.Task.get_name):
        logger.error("task %s did not stop within %.1fs; left running", task.get_name(), grace)
    return stuck
