"""The channel set as the service opens it, and what its logs may say."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from cdp_kit.settings import SettingsError
from cdp_kit.storage import MemoryStore
from cdp_orchestration.channels import Action, Content, configured, open_channels
from cdp_testing.channels.__main__ import parse_args, serve
from cdp_testing.channels.smtp import LocalSmtpServer
from cdp_testing.channels.twilio import LocalTwilio
from cdp_testing.channels.webhook import LocalWebhookReceiver

SID = "AC" + "0123456789abcdef" * 2


def test_only_configured_providers_are_enabled_and_every_bad_variable_is_named_at_once():
    assert configured({}) == {}
    with pytest.raises(SettingsError) as raised:
        configured({"CDP_SMTP_HOST": "smtp", "CDP_TWILIO_ACCOUNT_SID": "nope", "CDP_WEBHOOK_SECRET": "x"})
    problems = raised.value.problems
    assert "CDP_SMTP_FROM is required but not set" in problems[0]
    assert any(p.startswith("CDP_TWILIO_AUTH_TOKEN is required") for p in problems)
    assert any(p.startswith("CDP_WEBHOOK_SECRET is too short") for p in problems)


async def test_open_channels_builds_each_enabled_adapter_by_channel_name():
    environ = {
        "CDP_SMTP_HOST": "127.0.0.1",
        "CDP_SMTP_FROM": "hello@shop.example",
        "CDP_WEBHOOK_SECRET": "s" * 32,
    }

    async def publish(message) -> None:
        return None

    channels = open_channels(environ, store=MemoryStore(), publish_crm=publish)
    assert sorted(channels) == ["crm", "email", "inapp", "webhook"]
    for channel in channels.values():
        await channel.close()


async def test_logs_name_ids_and_reasons_never_addresses_or_content(caplog):
    secret_bits = ["ada@example.com", "+14155550199", "Your cart misses you", "VIP Ada"]
    async with (
        LocalSmtpServer() as smtp,
        LocalTwilio(SID, "token") as twilio,
        LocalWebhookReceiver(secret="w" * 32) as receiver,
    ):
        smtp.unknown.add("ada@example.com")
        receiver.fail_next(1, status=503)
        environ = {
            "CDP_SMTP_HOST": smtp.host,
            "CDP_SMTP_PORT": str(smtp.port),
            "CDP_SMTP_SECURITY": "none",
            "CDP_SMTP_FROM": "hello@shop.example",
            "CDP_TWILIO_ACCOUNT_SID": SID,
            "CDP_TWILIO_AUTH_TOKEN": "token",
            "CDP_TWILIO_FROM": "+14155550100",
            "CDP_TWILIO_API_URL": twilio.base_url,
            "CDP_WEBHOOK_SECRET": "w" * 32,
            "CDP_WEBHOOK_BACKOFF_BASE": "0.01",
            "CDP_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        }
        channels = open_channels(environ)
        content = Content(subject="VIP Ada", body="Your cart misses you")
        with caplog.at_level(logging.DEBUG, logger="cdp.orchestration"):
            for name, address in (
                ("email", "ada@example.com"),
                ("sms", "+14155550199"),
                ("webhook", receiver.url()),
            ):
                await channels[name].send(Action(f"act-{name}", "person-1", name, content, address))
        for channel in channels.values():
            await channel.close()
    records = [r for r in caplog.records if r.name.startswith("cdp.orchestration.channels")]
    assert {r.action_id for r in records} == {"act-email", "act-sms", "act-webhook"}
    assert {getattr(r, "reason", None) for r in records} >= {"smtp_550", "http_503"}
    for record in records:
        text = record.getMessage() + json.dumps({k: str(v) for k, v in record.__dict__.items()})
        for bit in secret_bits:
            assert bit not in text


async def test_the_local_servers_of_make_up_take_mail_into_a_maildir(tmp_path):
    ports = ["--smtp-port=0", "--twilio-port=0", "--fcm-port=0", "--webpush-port=0", "--webhook-port=0"]
    args = parse_args([*ports, f"--maildir={tmp_path / 'mail'}", f"--fcm-key-file={tmp_path / 'fcm.json'}"])
    stop, ready = asyncio.Event(), asyncio.get_running_loop().create_future()
    running = asyncio.create_task(serve(args, stop, ready))
    try:
        endpoints = await asyncio.wait_for(ready, 10)
        host, _, port = str(endpoints["smtp"]).partition(":")
        environ = {"CDP_SMTP_HOST": host, "CDP_SMTP_PORT": port, "CDP_SMTP_SECURITY": "none", "CDP_SMTP_FROM": "a@b.c"}
        (email,) = open_channels(environ).values()
        action = Action("act-1", "person-1", "email", Content(subject="Hi", body="Welcome"), "ada@example.com")
        assert (await email.send(action)).status == "accepted"
    finally:
        stop.set()
        await running
    assert len(list((tmp_path / "mail" / "new").iterdir())) == 1
    assert json.loads((tmp_path / "fcm.json").read_text())["token_uri"] == f"{endpoints['fcm']}/token"
