"""A checkout's own platform is never taken over by another checkout's.

Two checkouts on one account: the other one's `cdpctl up` recorded itself in `~/.cdp/current.json`. In
this checkout, with its platform stopped, `cdpctl status` reported the other one's workspace, `make up`
answered "cdp is already running here" and started nothing, and every command (delete included) would
have acted on the other platform. A checkout with a `.cdp` of its own stays on it; `up` always starts
this folder's; a command names the home it acts on."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from cdpctl.cli import main
from cdpctl.platform import Workspace

CDPCTL = os.path.join(os.path.dirname(sys.executable), "cdpctl")


def other_checkout_running(tmp_path: Path) -> tuple[Workspace, dict[str, str]]:
    """Another checkout whose platform runs (its `cdpctl up` is this test's process), recorded as the last
    `cdpctl up` of an account whose home is under tmp_path; the environment of a user without CDP_HOME."""
    other = Workspace(tmp_path / "other" / ".cdp")
    other.prepare(())
    other.write_run({"pid": os.getpid(), "nats": "nats://127.0.0.1:1", "services": {}, "write_key": "wk_other"})
    home = tmp_path / "user"
    (home / ".cdp").mkdir(parents=True)
    (home / ".cdp" / "current.json").write_text(json.dumps({"home": str(other.root), "pid": os.getpid()}))
    env = {k: v for k, v in os.environ.items() if k != "CDP_HOME"} | {"HOME": str(home)}
    return other, env


def this_checkout(tmp_path: Path) -> Path:
    """A checkout whose platform ran once here and is stopped now (its .cdp stays, no run.json)."""
    checkout = tmp_path / "mine"
    (checkout / ".git").mkdir(parents=True)
    (checkout / "services" / "profile").mkdir(parents=True)
    Workspace(checkout / ".cdp").prepare(())
    return checkout


def test_a_stopped_checkout_is_not_taken_over_by_the_other_checkouts_platform(tmp_path, monkeypatch):
    other, env = other_checkout_running(tmp_path)
    monkeypatch.setenv("HOME", env["HOME"])
    monkeypatch.delenv("CDP_HOME", raising=False)
    checkout = this_checkout(tmp_path)
    for folder in (checkout, checkout / "services" / "profile"):  # the checkout, or a folder of its repository
        monkeypatch.chdir(folder)
        assert Workspace.discover().root == (checkout / ".cdp").resolve(), folder

    # Outside any checkout with a .cdp of its own, the running platform is still found from anywhere.
    monkeypatch.chdir(tmp_path)
    assert Workspace.discover().root == other.root


def test_status_in_a_stopped_checkout_says_this_checkouts_platform_is_not_running(tmp_path):
    _other, env = other_checkout_running(tmp_path)
    checkout = this_checkout(tmp_path)
    result = subprocess.run([CDPCTL, "status", "--json"], cwd=checkout, env=env, capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert json.loads(result.stdout) == {"running": False, "home": str((checkout / ".cdp").resolve())}
    result = subprocess.run([CDPCTL, "status"], cwd=checkout, env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "not running" in result.stderr, result.stderr
    assert str((checkout / ".cdp").resolve()) in result.stderr.replace("\n", ""), result.stderr


def test_up_starts_this_folders_platform_while_another_checkouts_runs(tmp_path):
    """`make up` answered 'cdp is already running here' (the other checkout's) and started nothing."""
    _other, env = other_checkout_running(tmp_path)
    checkout = tmp_path / "fresh"  # a fresh clone: no .cdp yet
    (checkout / ".git").mkdir(parents=True)
    env |= {"CDP_UP_PORTS": "any"}
    proc = subprocess.Popen(
        [CDPCTL, "up", "--no-companions"], cwd=checkout, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE
    )
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while b"starting nats-server" not in seen and proc.poll() is None and time.monotonic() < deadline:
            seen += proc.stderr.readline()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            seen += proc.communicate(timeout=60)[1]
        except subprocess.TimeoutExpired:
            proc.kill()  # its services end with it (die-with-parent): none is left running after the test
            proc.communicate()
            raise
    shown = seen.decode(errors="replace")
    assert "already running" not in shown, shown
    assert "starting nats-server" in shown, shown
    assert (checkout / ".cdp" / "nats").is_dir()  # this folder's platform started


def test_status_names_the_home_it_reports(tmp_path):
    ws = Workspace(tmp_path / "home")
    ws.prepare(())
    ws.write_run({"pid": os.getpid(), "nats": "nats://127.0.0.1:1", "services": {}})
    result = CliRunner().invoke(main, ["--home", str(ws.root), "status"])
    assert str(ws.root) in result.output.replace("\n", ""), result.output


def test_a_command_on_a_platform_found_elsewhere_names_its_home(tmp_path):
    """Run from a folder without a .cdp of its own, a command acts on the platform the last `cdpctl up`
    recorded: it says which, before acting."""
    other, env = other_checkout_running(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [CDPCTL, "send", "identify", "--user-id", "u1", "--url", "http://127.0.0.1:1"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert f"cdp home: {other.root}" in result.stderr.replace("\n", ""), result.stderr


async def test_delete_names_the_platform_it_deletes_on(people_cli):
    """The confirmation asks about this platform by its home, and the answer names it."""
    await people_cli.send({"type": "identify", "userId": "ada", "messageId": "m-ada", "traits": {"plan": "pro"}})
    for _ in range(100):
        if (await people_cli.run("profile", "user_id", "ada")).exit_code == 0:
            break
        await asyncio.sleep(0.2)
    asked = await people_cli.run("delete", "user_id", "ada", stdin="n\n")
    assert str(people_cli.home) in asked.output.replace("\n", ""), asked.output
    done = await people_cli.run("delete", "user_id", "ada", "--yes")
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["home"] == str(people_cli.home)


def test_a_copied_home_does_not_act_on_the_platform_it_was_copied_from(tmp_path):
    """A day-2 trial copied a running home (a backup, a move): in the copy, `cdpctl profile` answered from
    the original platform (run.json came along with its ports and tokens), so a `delete` there would have
    deleted on the original; `make up` in the copy refused as "already running". run.json names the home
    it serves; a copy's is not this home's."""
    original = Workspace(tmp_path / "original")
    original.prepare(())
    original.write_run(
        {"pid": os.getpid(), "home": str(original.root.resolve()), "nats": "nats://127.0.0.1:1", "services": {}}
    )
    assert original.running() is not None and original.read_run() is not None

    copy_root = tmp_path / "copy"
    copy_root.mkdir()
    (copy_root / "run.json").write_text(original.run_file.read_text())
    copy = Workspace(copy_root)
    assert copy.read_run() is None and copy.running() is None
    result = subprocess.run(
        [CDPCTL, "status", "--json"], env=os.environ | {"CDP_HOME": str(copy_root)}, capture_output=True, text=True
    )
    assert result.returncode == 1 and json.loads(result.stdout)["running"] is False, result.stdout + result.stderr

    # A run.json written before homes were named in it is read as before.
    (copy_root / "run.json").write_text(json.dumps({"pid": os.getpid(), "services": {}}))
    assert copy.read_run() == {"pid": os.getpid(), "services": {}}
