"""Children started with `die_with_parent` end when their parent is SIGKILLed: no orphan keeps a port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

PARENT = textwrap.dedent(
    """
    import subprocess, sys, tempfile, time
    from pathlib import Path
    from cdp_kit.children import die_with_parent
    from cdp_kit.natsserver import NatsServer

    armed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             start_new_session=True, preexec_fn=die_with_parent())
    plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    nats = NatsServer(store_dir=Path(tempfile.mkdtemp()), die_with_parent=True).start()
    print(armed.pid, plain.pid, nats._proc.pid, flush=True)
    time.sleep(600)
    """
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for every purpose but its entry: it holds no port or file.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_children_end_when_the_parent_is_sigkilled_and_unarmed_ones_do_not():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    armed = plain = nats = 0
    try:
        armed, plain, nats = (int(pid) for pid in parent.stdout.readline().split())
        assert alive(armed) and alive(plain) and alive(nats)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 15
        while (alive(armed) or alive(nats)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(armed), "the armed child outlived its SIGKILLed parent"
        assert not alive(nats), "nats-server outlived the process that started it"
        assert alive(plain), "without die_with_parent a child runs on (the test would prove nothing otherwise)"
    finally:
        for pid in (armed, plain, nats):
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if parent.poll() is None:
            parent.kill()
