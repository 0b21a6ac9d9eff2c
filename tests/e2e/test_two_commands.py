"""The README's promise, run for real: `make up` brings the platform up on a fresh workspace, the
README's examples work against it, and Ctrl-C stops everything cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CDPCTL = str(Path(sys.executable).parent / "cdpctl")


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def wait_healthy(env: dict, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = subprocess.run([CDPCTL, "status", "--json"], env=env, capture_output=True, text=True)
        if result.returncode == 0:
            return json.loads(result.stdout)
        time.sleep(0.5)
    raise AssertionError(f"platform not healthy after {timeout}s: {result.stdout} {result.stderr}")


@pytest.fixture
def platform(tmp_path):
    env = {**os.environ, "CDP_HOME": str(tmp_path / "cdp-home")}
    log = open(tmp_path / "make-up.log", "w+")
    proc = subprocess.Popen(
        ["make", "-s", "up"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        status = wait_healthy(env)
        yield env, status, proc, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.timeout(240)
def test_make_up_runs_the_platform_and_ctrl_c_stops_it(platform, tmp_path):
    env, status, proc, log = platform
    assert status["healthy"] and status["services"]["collector"]["health"] == "SERVING"
    home = Path(env["CDP_HOME"])
    assert (home / "nats" / "jetstream").is_dir(), "JetStream data lives in the project-local folder"

    # The README's cdpctl examples, verbatim (paths as written: .venv/bin/cdpctl).
    commands = [
        line for block in readme_blocks("bash") for line in block.splitlines() if line.startswith(".venv/bin/cdpctl ")
    ]
    assert any(" send " in c for c in commands) and any(" status" in c for c in commands)
    for command in commands:
        for _attempt in range(40):
            result = subprocess.run(
                command.split("#")[0], shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
            )
            # The shipped models go live in the background once profile can take their computed traits.
            if " models" not in command or "churn_risk" in result.stdout:
                break
            time.sleep(0.5)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        if " models" in command:
            for model in (
                "churn_risk",
                "purchase_propensity",
                "clv",
                "fraud_risk",
                "fraud_anomaly",
                "next_best_channel",
            ):
                assert model in result.stdout, result.stdout
        if " send " in command and "--count" not in command:
            assert "accepted 1," in result.stdout
        if " segment create " in command:
            # u1's order of 42 (sent above) is retained on the timeline: the new condition is backfilled.
            assert "segment big_spenders live: 1 member" in result.stdout, result.stdout
        if " segments" in command:
            assert "big_spenders" in result.stdout and "live" in result.stdout, result.stdout
        if " profile " in command:
            document = json.loads(result.stdout)
            assert document["eventCount"] == "1" and "user_id:u1" in document["identifiers"]

    # The README's SDK example, with the write key and host `make up` printed.
    run = json.loads((home / "run.json").read_text())
    (snippet,) = readme_blocks("python")
    snippet = (
        snippet.replace("<the write key make up printed>", run["write_key"])
        .replace("http://127.0.0.1:8080", run["services"]["collector"]["http"])
        .replace("127.0.0.1:50053", run["services"]["profile"]["grpc"])
        .replace(".cdp/secrets/admin.token", str(home / "secrets" / "admin.token"))
    )
    result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # The output the README shows: the profile built from the SDK's events.
    expected = re.search(r"^# (pro .*)$", snippet, flags=re.M).group(1)
    assert result.stdout.strip() == expected

    # Everything sent is durably in JetStream: 1 + 10,000 from cdpctl, 3 from the SDK.
    import asyncio

    import nats

    async def stored() -> int:
        nc = await nats.connect(run["nats"])
        info = await nc.jetstream().stream_info("EVENTS_RAW")
        await nc.close()
        return info.state.messages

    assert asyncio.run(stored()) == 10_004

    with urllib.request.urlopen(run["services"]["collector"]["metrics"], timeout=5) as response:
        metrics = response.read().decode()
    assert "cdp_collector_events" in metrics and 'transport="http"' in metrics

    # Ctrl-C: everything stops, nothing is left running.
    pids = [svc["pid"] for svc in run["services"].values()]
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: the whole foreground group
    proc.wait(60)  # make itself dies of the SIGINT, as it does in a terminal; cdpctl cleans up
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(run["pid"], 0)  # cdpctl itself
        except ProcessLookupError:
            break
        time.sleep(0.2)
    assert not (home / "run.json").exists()
    log.seek(0)
    output = log.read()
    assert "cdp is up" in output and "stopped." in output
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    result = subprocess.run([CDPCTL, "status"], env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "not running" in result.stderr
