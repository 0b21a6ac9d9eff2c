"""`cdpctl status` asks nats-server itself, as it asks the companions: a wedged server (stopped with
SIGSTOP) still has its port accepting connections (the kernel does it) and was shown UP while every
service's bus calls hung. It is NOT ANSWERING now, and the platform is not healthy."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from click.testing import CliRunner

from cdp_kit.natsserver import NatsServer, free_port
from cdpctl.cli import main
from cdpctl.platform import Workspace


@pytest.fixture
def nats_with_monitor(tmp_path):
    server = NatsServer(store_dir=tmp_path / "nats", monitor_port=free_port()).start()
    pid = server._proc.pid
    try:
        yield server
    finally:
        if server.running:
            os.kill(pid, signal.SIGCONT)
        server.stop()


@pytest.mark.parametrize("with_monitor", [True, False], ids=["monitor healthz", "client port (no monitor listed)"])
def test_a_stopped_nats_server_is_not_answering_and_the_platform_not_healthy(tmp_path, nats_with_monitor, with_monitor):
    ws = Workspace(tmp_path / "home")
    ws.prepare(())
    state = {"pid": os.getpid(), "nats": nats_with_monitor.url, "services": {}}
    if with_monitor:
        state["nats_monitor"] = f"http://127.0.0.1:{nats_with_monitor.monitor_port}"
    ws.write_run(state)
    runner = CliRunner()

    def shown() -> tuple[int, dict]:
        result = runner.invoke(main, ["--home", str(ws.root), "status", "--json"])
        return result.exit_code, json.loads(result.output)

    def answering() -> None:
        deadline = time.monotonic() + 30
        while shown()[0] != 0:
            assert time.monotonic() < deadline, shown()
            time.sleep(0.2)

    answering()
    code, document = shown()
    assert document["healthy"] is True and document["nats"]["up"] is True and document["nats"]["health"] == "UP"

    # Stopped for certain before asking: os.kill returns before every thread of the server has stopped,
    # and one still running answered the check (NatsServer.paused waits until they all read stopped).
    with nats_with_monitor.paused():
        code, document = shown()
        assert code == 1 and document["healthy"] is False, document
        assert document["nats"]["up"] is False and document["nats"]["health"] == "NOT ANSWERING", document
        result = runner.invoke(main, ["--home", str(ws.root), "status"])
        assert result.exit_code == 1 and "NOT ANSWERING" in result.output, result.output
    answering()


def test_a_nats_server_that_is_gone_is_down(tmp_path, nats_with_monitor):
    ws = Workspace(tmp_path / "home")
    ws.prepare(())
    monitor = f"http://127.0.0.1:{nats_with_monitor.monitor_port}"
    ws.write_run({"pid": os.getpid(), "nats": nats_with_monitor.url, "nats_monitor": monitor, "services": {}})
    nats_with_monitor.stop()
    result = CliRunner().invoke(main, ["--home", str(ws.root), "status", "--json"])
    document = json.loads(result.output)
    assert result.exit_code == 1 and document["nats"] == {"url": nats_with_monitor.url, "up": False, "health": "DOWN"}
