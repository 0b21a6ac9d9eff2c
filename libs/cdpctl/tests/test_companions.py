"""The development companions `cdpctl up` runs beside the services: the local channel servers start where
orchestration's environment points, that environment is one orchestration accepts, mail lands in the
workspace, and `cdpctl status` shows a companion without letting it decide the platform's health."""

from __future__ import annotations

import asyncio
import json
import os
import smtplib
import subprocess
import time
from email.message import EmailMessage

import pytest
from click.testing import CliRunner

from cdp_kit.natsserver import wait_for_port
from cdpctl.cli import main
from cdpctl.platform import (
    CHANNELS,
    COMPANIONS,
    ORCHESTRATION,
    SERVICES,
    Workspace,
    companion_command,
    companion_environment,
    pick_port,
    service_environment,
)


@pytest.fixture
def channels(tmp_path):
    """The channels companion as `cdpctl up` starts it, on free ports, in a fresh workspace."""
    ws = Workspace(tmp_path / "home")
    ws.prepare((ORCHESTRATION,))  # its own token: it calls profile
    ports = {listener: pick_port(0) for listener in CHANNELS.ports}
    log = open(tmp_path / "channels.log", "wb")
    proc = subprocess.Popen(
        companion_command(ws, CHANNELS, ports),
        env=companion_environment(ws, CHANNELS, ports),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        for port in ports.values():
            assert wait_for_port("127.0.0.1", port, 30), (tmp_path / "channels.log").read_text()
        yield ws, ports
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def orchestration_environment(ws: Workspace, ports: dict[str, int]) -> dict[str, str]:
    return service_environment(
        ws,
        ORCHESTRATION,
        nats_url="nats://127.0.0.1:4222",
        grpc_port=50056,
        metrics_port=9469,
        http_port=None,
        peers={"profile": "127.0.0.1:50053", "segmentation": "127.0.0.1:50055"},
        named_ports={"collector.http": 8080} | {f"channels.{listener}": port for listener, port in ports.items()},
    )


def test_make_up_runs_orchestration_and_every_crm_emulator():
    assert ORCHESTRATION in SERVICES
    crms = {c.args[0] for c in COMPANIONS if c.module == "cdp_crm_emulators"}
    assert crms == {"salesforce", "hubspot", "dynamics", "zoho"}
    # One port per listener, none shared (a clash would leave one of them unstarted).
    wanted = [p for c in COMPANIONS for p in c.ports.values()] + [
        p for s in SERVICES for p in (s.grpc_port, s.metrics_port)
    ]
    assert len(wanted) == len(set(wanted))


def test_orchestration_accepts_the_environment_that_points_it_at_the_local_servers(channels):
    from cdp_kit.settings import load_settings
    from cdp_orchestration.channels import configured
    from cdp_orchestration.settings import OrchestrationSettings

    ws, ports = channels
    env = orchestration_environment(ws, ports)
    settings = load_settings(OrchestrationSettings, env)  # raises naming every variable it cannot use
    assert settings.grpc_port == 50056
    providers = configured(env)  # raises with every variable it cannot use
    assert set(providers) == {"email", "sms", "fcm", "webhook"}
    assert providers["email"].port == ports["smtp"] and providers["email"].security == "none"
    assert providers["sms"].api_url == f"http://127.0.0.1:{ports['twilio']}"
    assert providers["fcm"].api_url == f"http://127.0.0.1:{ports['fcm']}"
    assert providers["webhook"].default_url == f"http://127.0.0.1:{ports['webhook']}/hooks/cdp"
    # The feedback loop: outcomes go in through the collector with the dev source's write key.
    assert (env["CDP_OUTCOMES_URL"], env["CDP_OUTCOMES_WRITE_KEY"]) == ("http://127.0.0.1:8080", ws.write_key())
    # Both sides of a signature share one secret, made once per workspace and readable by its owner only.
    assert env["CDP_WEBHOOK_SECRET"] == ws.dev_secret("webhook")
    assert companion_environment(ws, CHANNELS, ports)["CDP_WEBHOOK_SECRET"] == env["CDP_WEBHOOK_SECRET"]
    assert (ws.secrets_dir / "dev-webhook.secret").stat().st_mode & 0o077 == 0


def test_mail_sent_to_the_local_smtp_server_lands_in_the_workspace_maildir(channels):
    ws, ports = channels
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "journeys@cdp.local", "ada@example.com", "your cart"
    message.set_content("https://shop.example/cart/1")
    with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=10) as smtp:
        smtp.send_message(message)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        delivered = list((ws.root / "mail" / "new").glob("*")) if (ws.root / "mail" / "new").is_dir() else []
        if delivered:
            break
        time.sleep(0.05)
    assert len(delivered) == 1
    assert "Subject: your cart" in delivered[0].read_text()


async def test_status_shows_companions_but_only_services_decide_health(nats_server, tmp_path):
    ws = Workspace(tmp_path / "home")
    ws.prepare(())
    down = pick_port(0)  # nothing listens there
    ws.write_run(
        {
            "pid": os.getpid(),
            "nats": nats_server.url,
            "services": {},
            "companions": {
                "crm-hubspot": {"ports": {"api": down}, "urls": {"api": f"http://127.0.0.1:{down}"}, "role": "HubSpot"}
            },
        }
    )
    runner = CliRunner()
    result = await asyncio.to_thread(runner.invoke, main, ["--home", str(ws.root), "status", "--json"])
    document = json.loads(result.output)
    assert result.exit_code == 0 and document["healthy"] is True
    assert document["companions"]["crm-hubspot"]["up"] is False
    result = await asyncio.to_thread(runner.invoke, main, ["--home", str(ws.root), "status"])
    assert "crm-hubspot" in result.output and "DOWN" in result.output


def test_without_companions_orchestration_gets_no_provider_half_configured(tmp_path):
    """`cdpctl up --no-companions`: the providers that pointed at the local servers are off, not broken."""
    from cdp_kit.settings import load_settings
    from cdp_orchestration.channels import configured
    from cdp_orchestration.settings import OrchestrationSettings

    ws = Workspace(tmp_path / "home")
    ws.prepare((ORCHESTRATION,))  # its own token: it calls profile
    env = service_environment(
        ws,
        ORCHESTRATION,
        nats_url="nats://127.0.0.1:4222",
        grpc_port=50056,
        metrics_port=9469,
        http_port=None,
        peers={"profile": "127.0.0.1:50053", "segmentation": "127.0.0.1:50055"},
        named_ports={"collector.http": 8080},
    )
    assert not [name for name in env if name.startswith(("CDP_SMTP_", "CDP_TWILIO_", "CDP_FCM_", "CDP_WEBHOOK_"))]
    load_settings(OrchestrationSettings, env)
    assert configured(env) == {}


def test_no_companion_has_a_secret_on_its_command_line(tmp_path):
    """A command line is readable by every local user (`ps`): the dev secrets go through the environment."""
    ws = Workspace(tmp_path / "home")
    ws.prepare(())
    secrets = {ws.dev_secret("twilio"), ws.dev_secret("webhook")}
    for companion in COMPANIONS:
        ports = {listener: 20_000 + i for i, listener in enumerate(companion.ports)}
        command = companion_command(ws, companion, ports)
        assert not [s for s in secrets if s in " ".join(command)], companion.name
        options = [arg.partition("=")[0] for arg in command if arg.startswith("--")]
        assert not [o for o in options if "secret" in o or "token" in o], options
    env = companion_environment(ws, CHANNELS, {listener: 0 for listener in CHANNELS.ports})
    assert env["CDP_TWILIO_AUTH_TOKEN"] == ws.dev_secret("twilio")
    assert env["CDP_WEBHOOK_SECRET"] == ws.dev_secret("webhook")


def test_the_local_twilio_started_as_up_starts_it_accepts_orchestrations_auth_token(channels):
    """Both sides still share the workspace's Twilio token: orchestration's (environment) is the one the
    local Twilio checks (its environment too)."""
    import base64
    import urllib.error
    import urllib.parse
    import urllib.request

    ws, ports = channels
    env = orchestration_environment(ws, ports)
    sid, token = env["CDP_TWILIO_ACCOUNT_SID"], env["CDP_TWILIO_AUTH_TOKEN"]

    def post(password: str) -> int:
        request = urllib.request.Request(
            f"{env['CDP_TWILIO_API_URL']}/2010-04-01/Accounts/{sid}/Messages.json",
            data=urllib.parse.urlencode({"To": "+15005550006", "From": env["CDP_TWILIO_FROM"], "Body": "hi"}).encode(),
            headers={"Authorization": "Basic " + base64.b64encode(f"{sid}:{password}".encode()).decode()},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return reply.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert post("not-the-token") == 401
    assert post(token) == 201
