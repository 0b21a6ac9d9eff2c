"""`cdpctl restart`: the request files `cdpctl up` takes, what the command refuses, and its wait."""

from __future__ import annotations

import os
import threading
import time

from click.testing import CliRunner

from cdpctl.cli import main
from cdpctl.platform import Workspace
from cdpctl.restart import ask, take
from cdpctl.supervise import restart_asked, restart_finished


def _platform(tmp_path) -> Workspace:
    ws = Workspace(tmp_path / "home")
    ws.prepare(())
    ws.write_run(
        {
            "pid": os.getpid(),
            "nats": "nats://127.0.0.1:1",
            "services": {
                "profile": {"grpc": "127.0.0.1:1", "pid": 100},
                "scoring": {"grpc": "127.0.0.1:2", "pid": 200},
            },
            "companions": {"channels": {"pid": 300}},
        }
    )
    return ws


def test_requests_are_taken_once_each_owner_only_and_half_written_ones_are_left(tmp_path):
    ws = _platform(tmp_path)
    asked = ask(ws, ["profile", "channels"])
    folder = ws.root / "restarts"
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert all(oct((folder / name).stat().st_mode & 0o777) == "0o600" for name in asked)
    (folder / "scoring.new").write_text("half")  # being written: not a request yet
    assert take(ws) == sorted(asked.items())
    assert take(ws) == []
    assert (folder / "scoring.new").exists()


def test_refuses_without_a_running_platform_and_names_an_unknown_service(tmp_path):
    runner = CliRunner()
    ws = Workspace(tmp_path / "empty")
    ws.prepare(())
    result = runner.invoke(main, ["--home", str(ws.root), "restart", "profile"])
    assert result.exit_code == 1 and "no platform is running" in result.output, result.output

    ws = _platform(tmp_path)
    result = runner.invoke(main, ["--home", str(ws.root), "restart", "profile", "profil"])
    assert result.exit_code == 2, result.output
    assert "profil: not a service or companion of this platform" in result.output
    assert take(ws) == []  # nothing asked when one name is wrong


def test_waits_until_each_service_runs_on_a_new_process_and_serves(tmp_path):
    ws = _platform(tmp_path)
    seen: list[str] = []

    def supervisor() -> None:
        """What `cdpctl up` does with the request: recorded, a new pid, then the record cleared once serving."""
        while not (requests := take(ws)):
            time.sleep(0.05)
        state = ws.read_run()
        [(name, request)] = requests
        restart_asked(state["services"][name], request)
        ws.write_run(state)
        seen.append("asked")
        time.sleep(0.5)
        state["services"][name]["pid"] = 101  # started again; not serving yet
        ws.write_run(state)
        time.sleep(0.5)
        seen.append("serving")
        restart_finished(state["services"][name])
        ws.write_run(state)

    thread = threading.Thread(target=supervisor)
    thread.start()
    result = CliRunner().invoke(main, ["--home", str(ws.root), "restart", "profile", "--timeout", "60"])
    seen_at_return = list(seen)  # the command returned after the service served, not at its new pid
    thread.join()
    assert result.exit_code == 0, result.output
    assert seen_at_return == ["asked", "serving"]
    assert "profile restarted: pid 101, serving" in result.output


def test_says_which_services_did_not_come_back_in_time(tmp_path):
    ws = _platform(tmp_path)
    result = CliRunner().invoke(main, ["--home", str(ws.root), "restart", "scoring", "--timeout", "1"])
    assert result.exit_code == 1
    assert "not serving again within 1 s: scoring" in result.output, result.output
