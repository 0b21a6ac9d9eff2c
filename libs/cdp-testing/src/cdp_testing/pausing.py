"""A process stopped (SIGSTOP) for certain, for tests that expect it not to answer.

os.kill returns once SIGSTOP is queued, and the kernel wakes one of the process's threads to take it; the
others stop only after that one has run, so on a loaded machine another thread (a gRPC server's, a
companion's SMTP thread) may still answer for some milliseconds. `pause` returns once every thread reads
stopped, as `cdp_kit.natsserver.NatsServer.paused` does for nats-server (use that one for a NatsServer).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

from cdp_kit.natsserver import _thread_states


def pause(pid: int) -> None:
    """Stop the process (SIGSTOP) and return once each of its threads is stopped."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10  # a guard against waiting for ever, not a speed figure
    while not all(state.startswith("T") for state in _thread_states(pid)):
        assert time.monotonic() < deadline, f"process {pid} did not stop"
        time.sleep(0.001)


def resume(pid: int) -> None:
    """Let the process run again (SIGCONT); one that ended meanwhile is left alone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """The process stopped for certain for the block (`pause`), then resumed."""
    pause(pid)
    try:
        yield
    finally:
        resume(pid)
