"""The fuzz tests' platform: every service as `make up` runs it (`cdpctl up`, real processes, a real
nats-server), started once per test process and shared by the modules here, since starting it is the slow
part. Its HTTP timeouts are short (SLOW seconds) so the resource-abuse tests see a slow client cut off
quickly, and profile timelines keep events of any age (the HTTP fuzz looks for every accepted event
there, timestamps in year 1 included).

A budget: `make test` runs a bounded number of inputs (`cdp_testing.fuzz.budget`, derandomized); `make
fuzz` runs the same tests with CDP_FUZZ_SCALE inputs as many, fresh ones each run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from cdp_testing.platform_run import RunningPlatform

SLOW = 2.0  # seconds a client has for its request head, and then for its body


@pytest.fixture(scope="session")
def platform(tmp_path_factory) -> Iterator[RunningPlatform]:
    running = RunningPlatform(
        tmp_path_factory.mktemp("fuzz-platform"),
        env={
            "CDP_COLLECTOR_HTTP_HEADER_TIMEOUT": str(SLOW),
            "CDP_COLLECTOR_HTTP_BODY_TIMEOUT": str(SLOW),
            # Timelines keep events of any age, so every accepted event (year 1 included) can be found there.
            "CDP_PROFILE_TIMELINE_MAX_AGE_DAYS": "0",
        },
    ).start()
    try:
        deadline = time.monotonic() + 120
        while not all(running.health(name) == "SERVING" for name in running.run["services"]):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the platform did not become SERVING:\n{running.log_tail()}")
            time.sleep(0.5)
        yield running
    finally:
        running.stop()
