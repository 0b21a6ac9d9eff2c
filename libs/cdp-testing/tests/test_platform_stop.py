"""`RunningPlatform.stop` makes sure no service outlives a stop, and kills nothing that is not the platform's:
a pid run.json names may belong to another process by the time the stop comes (pids wrap)."""

from __future__ import annotations

import os
import subprocess
import sys

from cdp_testing.platform_run import RunningPlatform

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_stop_kills_the_platforms_leftover_processes_and_no_other_process_that_took_a_listed_pid(tmp_path):
    platform = RunningPlatform(tmp_path)
    # `cdpctl up` stands in: it leaves at the SIGINT the stop sends, its services still running.
    platform.proc = subprocess.Popen(SLEEP, start_new_session=True)
    ours = subprocess.Popen(SLEEP, env=platform.env, start_new_session=True)
    stranger = subprocess.Popen(SLEEP, env={**os.environ, "CDP_HOME": str(tmp_path / "another")})
    platform.run = {
        "services": {"profile": {"pid": ours.pid}, "scoring": {"pid": stranger.pid}},
        "companions": {"smtp": {"pid": 2**22 + 1}},  # no such process
    }
    try:
        platform.stop(timeout=10)
        assert ours.wait(10) == -9  # SIGKILL
        assert stranger.poll() is None, "a process that is not the platform's was killed"
    finally:
        for p in (platform.proc, ours, stranger):
            p.kill()
            p.wait()
