"""Ctrl-C while `cdpctl up` starts stops it at once, whatever step it is in.

A fresh-clone CI run on a loaded machine sent SIGINT to `cdpctl up` right after it started nats-server and
waited 60 s for it to end, in vain: the handler only set a flag that nothing read until provisioning was
done, and provisioning waits up to 30 s to connect to a nats-server that does not answer, then reports a
failure. Here nats-server is paused (SIGSTOP) so provisioning cannot finish: the interrupt must end the
start with 130, not wait for provisioning to fail."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cdp_testing.pausing import pause

CDPCTL = os.path.join(os.path.dirname(sys.executable), "cdpctl")


def nats_server_of(parent: int) -> int | None:
    for task in Path(f"/proc/{parent}/task").iterdir():
        for child in (task / "children").read_text().split():
            if Path(f"/proc/{child}/comm").read_text().strip().startswith("nats-server"):
                return int(child)
    return None


def listening_port(pid: int) -> int:
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return int(args[args.index(b"-p") + 1])


def accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_ctrl_c_while_the_streams_are_provisioned_stops_at_once(tmp_path):
    checkout = tmp_path / "fresh"
    (checkout / ".git").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "CDP_HOME"} | {"HOME": str(tmp_path), "CDP_UP_PORTS": "any"}
    proc = subprocess.Popen(
        [CDPCTL, "up", "--no-companions"], cwd=checkout, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE
    )
    seen, nats = b"", None
    try:
        deadline = time.monotonic() + 120  # a guard against a hang, not a speed figure
        while b"starting nats-server" not in seen and proc.poll() is None and time.monotonic() < deadline:
            seen += proc.stderr.readline()
        while nats is None and proc.poll() is None and time.monotonic() < deadline:
            nats = nats_server_of(proc.pid)
            time.sleep(0.01)
        assert nats is not None, seen.decode(errors="replace")
        port = listening_port(nats)
        while not accepts(port) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        pause(nats)  # it listens, and answers nothing (every thread stopped, not only signalled)
        time.sleep(0.5)  # into provisioning (an interrupt before it ends the start as well)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        if nats is not None:
            try:
                os.kill(nats, signal.SIGCONT)
                os.kill(nats, signal.SIGKILL)
            except ProcessLookupError:
                pass
    shown = (seen + err + out).decode(errors="replace")
    assert proc.returncode == 130, shown
    assert "provisioning the streams failed" not in shown, shown
    assert "stopped." in shown, shown
