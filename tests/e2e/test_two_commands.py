"""The README's promise, run for real: `make up` brings the platform up on a fresh workspace (even when
the usual ports are taken), the README's examples work against it as written, a service that dies is
restarted while the others stay up, and Ctrl-C stops everything cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
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


def wait_healthy(env: dict, timeout: float = 240.0, log=None) -> dict:
    deadline = time.monotonic() + timeout
    # `cdpctl up` writes run.json once every service is SERVING: until then a cheap look at the file, not
    # a `cdpctl status` process every half second taking the CPU the starting services need.
    run_file = Path(env["CDP_HOME"]) / "run.json"
    while not run_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    while True:
        result = subprocess.run([CDPCTL, "status", "--json"], env=env, capture_output=True, text=True)
        if result.returncode == 0:
            return json.loads(result.stdout)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    console = ""
    if log is not None:  # what `cdpctl up` said (a service not ready in its --startup-timeout, one that crashed)
        log.seek(0)
        console = log.read()[-4000:]
    raise AssertionError(f"platform not healthy after {timeout}s: {result.stdout} {result.stderr}\n{console}")


def occupy(port: int) -> socket.socket | None:
    """Hold a port as another program would (None when something already holds it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    sock.listen()
    return sock


@pytest.fixture
def platform(tmp_path):
    # A user's home of its own: `cdpctl up` records the running platform there for cdpctl in other folders.
    user_home = tmp_path / "user"
    user_home.mkdir()
    env = {
        **os.environ,
        "CDP_HOME": str(tmp_path / "cdp-home"),
        "HOME": str(user_home),
        "UV_CACHE_DIR": os.environ.get("UV_CACHE_DIR", os.path.expanduser("~/.cache/uv")),
        # `make up`'s services get 60 s to become healthy, and on CI's loaded workers (other platforms starting
        # meanwhile) they can take longer: a start under load took over 90 s here. RunningPlatform gives 120 s.
        "CDP_UP_STARTUP_TIMEOUT": "180",
    }
    # The collector's HTTP port and profile's gRPC port are taken: the README must still work as written.
    held = {port: sock for port in (8080, 50053) if (sock := occupy(port)) is not None}
    log = open(tmp_path / "make-up.log", "w+")
    proc = subprocess.Popen(
        ["make", "-s", "up"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        status = wait_healthy(env, log=log)
        yield env, status, proc, log, set(held)
    finally:
        if proc.poll() is None:
            # A failed test: stop as Ctrl-C does. The services and nats-server run in sessions of their own,
            # so killing make's group alone would leave them running.
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        for sock in held.values():
            sock.close()


def merge_two_people(run: dict) -> tuple[str, str]:
    """A merge for the README's `cdpctl unmerge MERGE_ID`: two generated users merged through the API."""
    import grpc

    from cdp.identity.v1 import identity_pb2, identity_pb2_grpc

    token = Path(run["admin_token_file"]).read_text().strip()
    metadata = [("authorization", f"Bearer {token}")]
    with grpc.insecure_channel(run["services"]["identity"]["grpc"]) as channel:
        identity = identity_pb2_grpc.IdentityServiceStub(channel)
        persons = []
        for user in ("user-1", "user-2"):
            key = identity_pb2.LookupRequest(identifier=identity_pb2.Identifier(type="user_id", value=user))
            persons.append(identity.Lookup(key, metadata=metadata, timeout=10).person_id)
        merged = identity.Merge(
            identity_pb2.MergeRequest(person_id=persons[0], other_person_id=persons[1], reason="e2e", force=True),
            metadata=metadata,
            timeout=10,
        )
    return merged.merge.merge_id, merged.merge.loser


@pytest.mark.timeout(480)  # the platform's start (up to 240 s) included
def test_make_up_runs_the_platform_and_ctrl_c_stops_it(platform, tmp_path):
    env, status, proc, log, held_ports = platform
    assert status["healthy"] and status["services"]["collector"]["health"] == "SERVING"
    home = Path(env["CDP_HOME"])
    assert (home / "nats" / "jetstream").is_dir(), "JetStream data lives in the project-local folder"

    # The README's cdpctl examples, verbatim (paths as written: .venv/bin/cdpctl).
    commands = [
        line for block in readme_blocks("bash") for line in block.splitlines() if line.startswith(".venv/bin/cdpctl ")
    ]
    assert any(" send " in c for c in commands) and any(" status" in c for c in commands)
    run = json.loads((home / "run.json").read_text())
    for command in commands:
        command = command.split("#")[0]  # the checks below read what runs, not the comment
        if "MERGE_ID" in command:
            merge_id, loser = merge_two_people(run)
            command = command.replace("MERGE_ID", merge_id)
        ledger = tmp_path / "deletions.json"
        if " privacy ledger export " in command:
            command = command.replace("--out deletions.json", f"--out {ledger}")  # not into the checkout
        for _attempt in range(40):
            result = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
            # The shipped models go live in the background once profile can take their computed traits.
            if " models" not in command or "churn_risk" in result.stdout:
                break
            time.sleep(0.5)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        if " models promote " in command:
            assert "churn_risk: 1.1.0 was already live; nothing changed" in result.stdout, result.stdout
        elif " models explain " in command:
            assert "baseline" in result.stdout and "pushing it" in result.stdout, result.stdout
        elif " models" in command:
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
        if " segment explain " in command:
            # u1's order of 42 is under the updated definition's 60: not a member, and the condition says why.
            assert "is not a member of big_spenders" in result.stdout, result.stdout
            assert "✗ sum(properties.total" in result.stdout, result.stdout
        if " privacy ledger export " in command:
            assert ledger.stat().st_mode & 0o777 == 0o600
        if " restart " in command:
            # A new process, serving, and not counted as a crash.
            pid = json.loads((home / "run.json").read_text())["services"]["collector"]["pid"]
            assert (
                pid != run["services"]["collector"]["pid"]
                and f"collector restarted: pid {pid}, serving" in result.stdout
            )
            run = json.loads((home / "run.json").read_text())
            assert "restarting" not in run["services"]["collector"]
        if " segment estimate " in command:
            assert "1 of " in result.stdout, result.stdout  # u1's order of 42
        if " traits" in command:
            assert "sum" in result.stdout, result.stdout  # the computed trait big_spenders compiles to
        if " segments" in command:
            assert "big_spenders" in result.stdout and "live" in result.stdout, result.stdout
        if " profile " in command:
            document = json.loads(result.stdout)
            assert document["eventCount"] == "1" and "user_id:u1" in document["identifiers"]
        if " lag" in command:
            assert "EVENTS_RAW" in result.stdout and "identity" in result.stdout, result.stdout
        if " dlq" in command:
            assert "dead letters" in result.stdout, result.stdout
        if " graph " in command:
            assert any(i["identifier"]["value"] == "u1" for i in json.loads(result.stdout)["identifiers"])
        if " unmerge " in command:
            assert json.loads(result.stdout)["loser"] == loser
        if " quarantine " in command:
            assert "user_id quarantined" in result.stdout, result.stdout
        if " export " in command and " definitions " not in command and " ledger " not in command:
            assert json.loads(result.stdout)["person_id"], result.stdout
        if " definitions export" in command:
            document = json.loads(result.stdout)
            assert document["format"] == "cdp-definitions", result.stdout
            assert "big_spenders" in {segment["id"] for segment in document["segments"]}, result.stdout
        if " delete " in command:
            assert json.loads(result.stdout)["requestId"], result.stdout
            gone = subprocess.run([CDPCTL, "profile", "user_id", "u1"], env=env, capture_output=True, text=True)
            assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr, gone.stderr
    commands_run = " ".join(commands)
    for name in ("lag", "dlq", "graph", "unmerge", "quarantine", "export", "delete"):
        assert f" {name}" in commands_run, f"the README shows cdpctl {name}"

    # cdpctl finds the running platform from any folder, without CDP_HOME.
    elsewhere = {k: v for k, v in env.items() if k != "CDP_HOME"}
    result = subprocess.run([CDPCTL, "status", "--json"], cwd=tmp_path, env=elsewhere, capture_output=True, text=True)
    assert result.returncode == 0 and json.loads(result.stdout)["home"] == str(home), result.stdout + result.stderr

    # The README's SDK example as written, run as the README says: `.venv/bin/python` from the repository root.
    if 8080 in held_ports:
        assert not run["services"]["collector"]["http"].endswith(":8080")
    if 50053 in held_ports:
        assert not run["services"]["profile"]["grpc"].endswith(":50053")
    (snippet,) = readme_blocks("python")
    result = subprocess.run(
        [".venv/bin/python", "-c", snippet], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    # The output the README shows: the profile built from the SDK's events.
    expected = re.search(r"^# (pro .*)$", snippet, flags=re.M).group(1)
    assert result.stdout.strip() == expected

    # Everything sent is durably in JetStream: 1 + 10,000 from cdpctl, 3 from the SDK.
    import asyncio

    import nats

    from cdp_testing.streams import raw_events

    async def stored() -> int:
        nc = await nats.connect(run["nats"])
        try:
            # Events, not messages: one message may carry several of a request's (cdp_kit.bus.rawevents).
            return len(await raw_events(nc.jetstream()))
        finally:
            await nc.close()

    assert asyncio.run(stored()) == 10_004

    with urllib.request.urlopen(run["services"]["collector"]["metrics"], timeout=5) as response:
        metrics = response.read().decode()
    assert "cdp_collector_events" in metrics and 'transport="http"' in metrics

    # The README's curl lines, as written: each answer as the README shows it, then the one person they made.
    readme = (ROOT / "README.md").read_text()
    (block,) = re.findall(r"## Sending events with curl\n.*?```sh\n(.*?)```", readme, flags=re.S)
    result = subprocess.run(["bash", "-e", "-c", block], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    answers = result.stdout.splitlines()
    assert len(answers) == 6, result.stdout
    shown = [line[2:] for line in block.splitlines() if line.startswith("# {")]
    for line in shown:
        if "..." in line:  # abbreviated: every part it shows is in the answer it stands for
            assert all(part.strip(",") in result.stdout for part in line.split("...") if part.strip(",")), line
        else:
            assert line in answers, f"{line}\n{result.stdout}"
    replies = [json.loads(answer) for answer in answers]
    assert [reply["accepted"] for reply in replies] == [1, 1, 1, 1, 0, 1]
    assert replies[4]["duplicates"] == 1
    assert [(r["index"], r["field"]) for r in replies[5]["rejected"]] == [(1, "batch[1].userId")]
    for _attempt in range(50):
        found = subprocess.run(
            [CDPCTL, "profile", "email", "lin@example.com", "--wait", "5"], env=env, capture_output=True, text=True
        )
        assert found.returncode == 0, found.stderr
        lin = json.loads(found.stdout)
        if lin["eventCount"] == "5":
            break
        time.sleep(0.2)
    assert lin["eventCount"] == "5", lin
    assert lin["identifiers"] == [
        "anonymous_id:crm-4711",
        "anonymous_id:visitor-9",
        "email:lin@example.com",
        "user_id:lin",
    ], lin
    assert lin["traits"]["plan"]["value"] == "team", lin

    # A service that dies is restarted, the others stay up.
    victim = run["services"]["collector"]["pid"]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = json.loads((home / "run.json").read_text())
        if now["services"]["collector"]["pid"] != victim:
            break
        time.sleep(0.2)
    assert now["services"]["collector"]["pid"] != victim, "collector was not restarted"
    status = wait_healthy(env, timeout=120)
    assert all(svc["health"] == "SERVING" for svc in status["services"].values()), status
    for name, svc in run["services"].items():
        if name != "collector":
            assert now["services"][name]["pid"] == svc["pid"], f"{name} was restarted too"
    # The console says what happened, as a supervisor does (the recovery line follows its next health check).
    deadline = time.monotonic() + 60  # a guard: a loaded machine's health checks come late
    while time.monotonic() < deadline:
        log.seek(0)
        console = log.read()
        if "collector is SERVING again" in console:
            break
        time.sleep(0.1)
    assert "collector exited (killed by SIGKILL); restarting it in 1 s" in console
    assert "collector is SERVING again" in console
    run = now

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
