"""`make up` with one NATS user per service: every service does its job under its own permissions, none
can publish what it does not own, and a service's credentials rotate while everything runs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import nats
import nats.errors
import pytest

from cdp_kit.bus import Bus, subjects
from cdp_kit.natsauth import NatsClientSettings
from cdp_kit.urls import without_credentials
from cdp_testing.platform_run import RunningPlatform

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("collector", "identity", "profile", "scoring", "segmentation", "orchestration", "crm")


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    with RunningPlatform(tmp_path_factory.mktemp("nats-users")) as running:
        # Shown with a failure's captured output: cdpctl-up.log, cdp-home/logs/ and cdp-home/nats/nats-server.log.
        print(f"platform workspace (its logs): {running.workdir}")
        yield running


def cdpctl(platform: RunningPlatform, *args: str) -> str:
    result = platform.cdpctl(*args)
    assert result.returncode == 0, f"cdpctl {' '.join(args)}: {result.stdout}\n{result.stderr}"
    return result.stdout


def connections(platform: RunningPlatform) -> dict[str, str]:
    """Connection name -> the NATS user it authenticated as."""
    with urllib.request.urlopen(f"{platform.run['nats_monitor']}/connz?auth=true&limit=1024", timeout=5) as reply:
        found = json.loads(reply.read())["connections"]
    return {c.get("name", ""): c.get("authorized_user", "") for c in found}


def connection_details(platform: RunningPlatform) -> list[tuple]:
    """Every client connection as (cid, name, user, start, last activity): names and users, no secrets."""
    with urllib.request.urlopen(f"{platform.run['nats_monitor']}/connz?auth=true&limit=1024", timeout=5) as reply:
        found = json.loads(reply.read())["connections"]
    return [
        (c.get("cid"), c.get("name"), c.get("authorized_user"), c.get("start"), c.get("last_activity")) for c in found
    ]


def _stamp(path: Path) -> tuple[int, int] | str:
    try:
        stat = path.stat()
    except OSError as exc:
        return type(exc).__name__
    return stat.st_mtime_ns, stat.st_ino


def _log_tail(platform: RunningPlatform, service: str, lines: int = 15) -> str:
    log = platform.home / "logs" / f"{service}.log"
    return "\n".join(log.read_text().splitlines()[-lines:]) if log.exists() else "(no log)"


def violations(platform: RunningPlatform) -> list[str]:
    log = platform.home / "nats" / "nats-server.log"
    return [line for line in log.read_text().splitlines() if " Violation - Subject " in line]


def credentials(platform: RunningPlatform, service: str) -> NatsClientSettings:
    return NatsClientSettings(credentials_file=platform.home / "secrets" / "nats" / f"{service}.json")


def nats_address(platform: RunningPlatform) -> str:
    from urllib.parse import urlsplit

    where = urlsplit(platform.nats_url)
    return f"nats://{where.hostname}:{where.port}"


@pytest.mark.timeout(180)
def test_every_service_works_as_its_own_nats_user(platform):
    users = connections(platform)
    assert {service: users.get(service) for service in SERVICES} == {service: service for service in SERVICES}

    # Events through the whole chain, a segment, a journey that schedules a timer: every service
    # creates its streams and consumers, reads, publishes and announces under its permissions.
    cdpctl(platform, "journey", "create", str(ROOT / "docs/journeys/abandoned-cart.yaml"), "--publish")
    consent = '{"consent": {"categoryPreferences": {"Marketing": true}}}'
    cdpctl(
        platform,
        "send",
        "identify",
        "--user-id",
        "ada",
        "--traits",
        '{"email": "ada@example.com"}',
        "--context",
        consent,
    )
    cdpctl(platform, "send", "track", "--user-id", "ada", "--event", "Cart Abandoned", "--properties", "{}")
    cdpctl(platform, "send", "track", "--user-id", "ada", "--event", "Order Completed", "--properties", '{"total": 42}')
    cdpctl(
        platform,
        "segment",
        "create",
        "big_spenders",
        'sum(properties.total, event = "Order Completed", within 90d) > 40',
    )
    person = json.loads(cdpctl(platform, "profile", "user_id", "ada", "--wait", "20"))["personId"]
    deadline = time.monotonic() + 30
    while person not in cdpctl(platform, "segment", "members", "big_spenders"):
        assert time.monotonic() < deadline, "ada never entered the segment"
        time.sleep(0.5)
    # Orchestration enters her from the event stream, beside segmentation's reading of her profile: her
    # segment entry says nothing of whether orchestration has read her cart yet.
    deadline = time.monotonic() + 30
    while not json.loads(cdpctl(platform, "journey", "instances", "--journey", "abandoned-cart", "--json")):
        assert time.monotonic() < deadline, "the journey took no one in"
        time.sleep(0.5)
    # A privacy deletion: profile publishes privacy.deleted, identity, collector, orchestration and the
    # CRM connector consume it.
    cdpctl(platform, "delete", "user_id", "ada", "--yes")
    deadline = time.monotonic() + 30
    while _pending_privacy(json.loads(cdpctl(platform, "lag", "--json"))):
        assert time.monotonic() < deadline, "privacy.deleted was not consumed everywhere"
        time.sleep(0.5)
    assert violations(platform) == []


def _pending_privacy(rows: list[dict]) -> bool:
    """True while a consumer of privacy.deleted has not acknowledged everything (or none exists yet)."""
    privacy = [r for r in rows if r["stream"] == subjects.PRIVACY]
    return not privacy or any(r["pending"] or r["ack_pending"] for r in privacy)


async def test_a_service_cannot_publish_what_another_owns(platform):
    async with Bus.connect(nats_address(platform), name="profile", security=credentials(platform, "profile")) as bus:
        with pytest.raises(nats.errors.TimeoutError):
            await bus.js.publish(subjects.events_resolved(0), b"forged", timeout=1)
    refused = violations(platform)
    assert len(refused) == 1 and subjects.events_resolved(0) in refused[0] and "user:profile" in refused[0]


@pytest.mark.timeout(120)
def test_rotated_nats_credentials_take_effect_without_a_restart(platform):
    pid = platform.service("profile")["pid"]
    rotated = platform.cdpctl("nats-rotate", "profile")
    # Should it fail, this says which connections still used the old user, where the credentials file stood
    # and what the service logged. (It failed, the service logging nothing in the 30 s, when the consumers'
    # lag poll asked the connection for its user between the rewrite and the bus's next look at the file:
    # cdp_kit.natsauth.CredentialsFile took that lookup for a CONNECT, so the bus never reconnected.)
    assert rotated.returncode == 0, (
        f"cdpctl nats-rotate profile: {rotated.stdout}\n{rotated.stderr}\n"
        f"connections (cid, name, user, start, last activity): {connection_details(platform)}\n"
        f"profile's credentials file: {_stamp(platform.home / 'secrets' / 'nats' / 'profile.json')}\n"
        f"profile's log, last lines:\n{_log_tail(platform, 'profile')}"
    )
    assert connections(platform)["profile"] == "profile.2"
    # The profile service still consumes and publishes: a new person's profile is built.
    cdpctl(platform, "send", "identify", "--user-id", "eve", "--traits", '{"first_name": "Eve"}')
    assert json.loads(cdpctl(platform, "profile", "user_id", "eve", "--wait", "20"))["personId"]
    platform.refresh()
    assert platform.service("profile")["pid"] == pid
    assert [line for line in violations(platform) if "user:profile.2" in line] == []


@pytest.mark.timeout(120)
def test_a_restarted_nats_server_keeps_every_user_and_permission(platform):
    platform.wait_nats_restarted(platform.kill_nats())
    deadline = time.monotonic() + 30
    # Until all four are connected again (a proper-subset test stopped waiting once any other user was).
    while not {"collector", "identity", "profile.2", "scoring"} <= set(connections(platform).values()):
        assert time.monotonic() < deadline, f"services did not reconnect: {connections(platform)}"
        time.sleep(0.5)
    # The server lists a service's connection a moment before the client's own reconnect completes: until
    # then the collector answers 503 (retry), as documented, and an SDK sends again - so does this.
    deadline = time.monotonic() + 30
    send = ("send", "identify", "--user-id", "zoe", "--traits", '{"first_name": "Zoe"}')
    while (result := platform.cdpctl(*send)).returncode:
        assert '"status": 503' in result.stdout, result.stdout + result.stderr
        assert time.monotonic() < deadline, f"the collector still answers 503: {result.stdout}"
        time.sleep(0.5)
    assert json.loads(cdpctl(platform, "profile", "user_id", "zoe", "--wait", "30"))["personId"]
    assert [line for line in violations(platform) if "user:profile.2" in line] == []


@pytest.mark.timeout(120)
def test_the_operators_own_password_rotates_and_the_old_one_is_refused(platform):
    """cdpctl's own NATS user (run.json's URL, every permission) could not be rotated: a leaked run.json
    stayed a key to the whole bus until the platform was set up again."""
    old = platform.refresh()["nats"]
    cdpctl(platform, "nats-rotate", "cdpctl")
    new = platform.refresh()["nats"]
    assert new != old and without_credentials(new) == without_credentials(old)

    async def connect(url: str) -> None:
        nc = await nats.connect(url, tls=platform.nats_tls, allow_reconnect=False, connect_timeout=5)
        await nc.close()

    with pytest.raises(nats.errors.Error):
        asyncio.run(connect(old))
    asyncio.run(connect(new))
    # cdpctl itself goes on working with the new password: status lists the consumers' backlogs as the
    # operator. A refused password fails that listing at once (and for good); a listing or a health probe
    # that missed status's 1.5 s deadline on a loaded machine proves nothing either way: asked again.
    deadline = time.monotonic() + 30
    while True:
        result = platform.cdpctl("status", "--json")
        shown = json.loads(result.stdout)
        assert "listing the consumers failed" not in shown["backlogs"], shown["backlogs"]
        if result.returncode == 0 and shown["nats"]["up"] and shown["backlogs"] == "checked":
            break
        assert time.monotonic() < deadline, f"cdpctl status --json: {result.stdout}"
        time.sleep(0.5)
    # `cdpctl up` rewrites run.json when it restarts a process: the new password stays.
    pid = platform.service("scoring")["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while platform.refresh()["services"]["scoring"]["pid"] == pid:
        assert time.monotonic() < deadline, "scoring was not restarted"
        time.sleep(0.2)
    assert platform.refresh()["nats"] == new


def pid_running(pid: int) -> bool:
    """True while `pid` runs (a zombie holds no port or file and counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(120)
def test_killing_cdpctl_itself_stops_nats_server_every_service_and_companion(platform):
    # Last in this module: it ends the platform. cdpctl SIGKILLed cannot stop anything itself; the kernel
    # sends each child SIGTERM (cdp_kit.children), so nothing is left holding a port.
    run = platform.refresh()
    children = {name: entry["pid"] for name, entry in [*run["services"].items(), *run["companions"].items()]}
    children["nats-server"] = run["nats_pid"]
    assert all(pid_running(pid) for pid in children.values())
    platform.proc.kill()
    platform.proc.wait(10)
    deadline = time.monotonic() + 60
    while (left := sorted(name for name, pid in children.items() if pid_running(pid))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], f"still running after cdpctl was SIGKILLed: {left}"
