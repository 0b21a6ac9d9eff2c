"""cdpctl finds the running platform from any folder, not only from the checkout it was started in."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cdpctl.platform import Workspace, current_file


def running_workspace(root, pid=None) -> Workspace:
    ws = Workspace(root)
    root.mkdir(parents=True)
    ws.write_run({"pid": pid or os.getpid(), "nats": "nats://127.0.0.1:1", "services": {}})
    return ws


def test_the_platform_the_last_up_recorded_is_found_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    ws = running_workspace(tmp_path / "checkout" / ".cdp")
    ws.record_current()
    monkeypatch.chdir(tmp_path)
    assert Workspace.discover().root == ws.root

    ws.forget_current()
    assert not current_file().exists()
    assert Workspace.discover().root == (tmp_path / ".cdp").resolve()


def test_a_platform_that_is_gone_is_not_found(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    running_workspace(tmp_path / "old" / ".cdp", pid=dead.pid).record_current()
    monkeypatch.chdir(tmp_path)
    assert Workspace.discover().root == (tmp_path / ".cdp").resolve()


def test_status_outside_the_checkout_reports_the_running_platform(tmp_path):
    """`cdpctl status` run from elsewhere, without CDP_HOME: it used to say cdp was not running."""
    home = tmp_path / "user"
    ws = running_workspace(tmp_path / "checkout" / ".cdp")
    env = {**os.environ, "HOME": str(home)}
    env.pop("CDP_HOME", None)
    (home / ".cdp").mkdir(parents=True)
    current_file_in_home = home / ".cdp" / "current.json"
    current_file_in_home.write_text(json.dumps({"home": str(ws.root), "pid": os.getpid()}))
    cdpctl = os.path.join(os.path.dirname(sys.executable), "cdpctl")
    result = subprocess.run([cdpctl, "status", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True)
    document = json.loads(result.stdout)
    assert document["running"] is True and document["home"] == str(ws.root), result.stdout + result.stderr
