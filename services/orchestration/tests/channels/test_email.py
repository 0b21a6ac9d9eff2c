"""Email against a real local SMTP server: what a recipient's mail system sees, and every way it says no."""

from __future__ import annotations

import datetime
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cdp_kit.settings import SettingsError, load_settings
from cdp_orchestration.channels.base import Action, Content
from cdp_orchestration.channels.email import EmailChannel
from cdp_orchestration.channels.outcomes import feedback_from_bounce, track_event
from cdp_orchestration.channels.settings import SmtpSettings
from cdp_testing.channels.smtp import LocalSmtpServer


def settings_for(server: LocalSmtpServer, **more: str) -> SmtpSettings:
    environ = {
        "CDP_SMTP_HOST": server.host,
        "CDP_SMTP_PORT": str(server.port),
        "CDP_SMTP_SECURITY": "none",
        "CDP_SMTP_FROM": "Shop <hello@shop.example>",
        "CDP_SMTP_TIMEOUT": "5",
        **more,
    }
    return load_settings(SmtpSettings, environ)


def reminder(action_id: str = "act-1", to: str = "ada@example.com") -> Action:
    return Action(
        action_id=action_id,
        person_id="person-1",
        channel="email",
        address=to,
        content=Content(subject="You left something behind", body="Your cart misses you.", html="<p>Your cart</p>"),
    )


async def test_the_mail_arrives_with_the_action_id_as_message_id():
    async with LocalSmtpServer() as server:
        outcome = await EmailChannel(settings_for(server)).send(reminder())
        assert outcome.status == "accepted"
        (mail,) = server.mailbox
        assert mail.rcpt_tos == ["ada@example.com"]
        assert mail.message["Message-ID"] == "<act-1@cdp.local>"
        assert mail.message["X-CDP-Action-Id"] == "act-1"
        assert mail.message["Subject"] == "You left something behind"
        assert mail.message.get_body(("plain",)).get_content().strip() == "Your cart misses you."
        assert mail.message.get_body(("html",)).get_content().strip() == "<p>Your cart</p>"


async def test_a_redelivered_action_carries_the_same_message_id():
    async with LocalSmtpServer() as server:
        channel = EmailChannel(settings_for(server))
        await channel.send(reminder())
        await channel.send(reminder())
        assert {m.message["Message-ID"] for m in server.mailbox} == {"<act-1@cdp.local>"}


async def test_an_unknown_mailbox_is_rejected_and_a_full_one_is_retryable():
    async with LocalSmtpServer() as server:
        server.unknown.add("gone@example.com")
        server.full.add("full@example.com")
        channel = EmailChannel(settings_for(server))
        gone = await channel.send(reminder(to="gone@example.com"))
        full = await channel.send(reminder(to="full@example.com"))
        assert (gone.status, gone.reason) == ("rejected", "smtp_550")
        assert (full.status, full.reason, full.retryable) == ("failed", "smtp_452", True)
        assert server.mailbox == []


async def test_a_temporary_failure_then_success_on_retry():
    async with LocalSmtpServer() as server:
        server.fail_next_data = 1
        channel = EmailChannel(settings_for(server))
        first = await channel.send(reminder())
        assert (first.status, first.reason, first.retryable) == ("failed", "smtp_451", True)
        assert (await channel.send(reminder())).status == "accepted"
        assert len(server.mailbox) == 1


async def test_no_server_is_a_retryable_failure():
    server = LocalSmtpServer()
    await server.start()
    await server.close()  # the port is free again: nothing listens
    outcome = await EmailChannel(settings_for(server)).send(reminder())
    assert (outcome.status, outcome.retryable) == ("failed", True)


async def test_a_malformed_address_is_rejected_without_a_connection():
    async with LocalSmtpServer() as server:
        outcome = await EmailChannel(settings_for(server)).send(reminder(to="ada@example.com>\r\nBcc: x@y"))
        assert (outcome.status, outcome.reason) == ("rejected", "invalid_address")
        assert server.mailbox == []


def _self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context, cert_file


async def test_starttls_and_auth_as_configured(tmp_path):
    context, ca_file = _self_signed(tmp_path)
    async with LocalSmtpServer(host="localhost", credentials=("shop", "s3cret"), tls_context=context) as server:
        settings = settings_for(
            server,
            CDP_SMTP_SECURITY="starttls",
            CDP_SMTP_CA_FILE=str(ca_file),
            CDP_SMTP_USERNAME="shop",
            CDP_SMTP_PASSWORD="s3cret",
        )
        assert (await EmailChannel(settings).send(reminder())).status == "accepted"
        (mail,) = server.mailbox
        assert (mail.tls, mail.authenticated_as) == (True, "shop")

        wrong = settings_for(
            server,
            CDP_SMTP_SECURITY="starttls",
            CDP_SMTP_CA_FILE=str(ca_file),
            CDP_SMTP_USERNAME="shop",
            CDP_SMTP_PASSWORD="guess",
        )
        outcome = await EmailChannel(wrong).send(reminder("act-2"))
        assert (outcome.status, outcome.reason, outcome.retryable) == ("failed", "smtp_auth_535", False)

        untrusted = settings_for(
            server, CDP_SMTP_SECURITY="starttls", CDP_SMTP_USERNAME="shop", CDP_SMTP_PASSWORD="s3cret"
        )
        outcome = await EmailChannel(untrusted).send(reminder("act-3"))
        assert outcome.status == "failed"  # an unverifiable certificate is never trusted
        assert len(server.mailbox) == 1


async def test_a_bounce_leads_back_to_the_action():
    async with LocalSmtpServer() as server:
        await EmailChannel(settings_for(server)).send(reminder("act-9"))
        (mail,) = server.mailbox
        (feedback,) = feedback_from_bounce(server.bounce(mail))
        event = track_event(feedback, person_id="person-1", user_id="u-1")
        assert event["event"] == "Message Bounced"
        assert event["userId"] == "u-1"
        assert event["messageId"] == "outcome:act-9:bounced"
        assert event["properties"] == {
            "action_id": "act-9",
            "channel": "email",
            "person_id": "person-1",
            "reason": "5.1.1",
        }
        # A delayed report is not a bounce: the relay is still trying.
        assert feedback_from_bounce(server.bounce(mail, status="4.4.1")) == []


async def test_the_mailbox_can_be_written_as_maildir_for_make_up(tmp_path):
    async with LocalSmtpServer(maildir=tmp_path / "Maildir") as server:
        await EmailChannel(settings_for(server)).send(reminder())
    (stored,) = list((tmp_path / "Maildir" / "new").iterdir())
    assert b"Message-ID: <act-1@cdp.local>" in stored.read_bytes()


def test_settings_name_each_bad_variable():
    with pytest.raises(SettingsError) as raised:
        load_settings(
            SmtpSettings,
            {"CDP_SMTP_HOST": "smtp", "CDP_SMTP_PORT": "x", "CDP_SMTP_USERNAME": "shop", "CDP_SMTP_FROM": "nobody"},
        )
    message = str(raised.value)
    assert "CDP_SMTP_PORT='x' is invalid" in message
    with pytest.raises(SettingsError) as raised:
        load_settings(SmtpSettings, {"CDP_SMTP_HOST": "smtp", "CDP_SMTP_USERNAME": "shop", "CDP_SMTP_FROM": "nobody"})
    message = str(raised.value)
    assert "CDP_SMTP_USERNAME and CDP_SMTP_PASSWORD must be set together" in message
    assert "CDP_SMTP_FROM='nobody' is invalid" in message
    with pytest.raises(SettingsError, match="would send the password in clear text"):
        load_settings(
            SmtpSettings,
            {
                "CDP_SMTP_HOST": "smtp",
                "CDP_SMTP_SECURITY": "none",
                "CDP_SMTP_USERNAME": "shop",
                "CDP_SMTP_PASSWORD": "pw",
                "CDP_SMTP_FROM": "a@b.c",
            },
        )


async def test_implicit_tls_as_on_port_465(tmp_path):
    context, ca_file = _self_signed(tmp_path)
    async with LocalSmtpServer(
        host="localhost", credentials=("shop", "s3cret"), tls_context=context, implicit_tls=True
    ) as server:
        settings = settings_for(
            server,
            CDP_SMTP_SECURITY="tls",
            CDP_SMTP_CA_FILE=str(ca_file),
            CDP_SMTP_USERNAME="shop",
            CDP_SMTP_PASSWORD="s3cret",
        )
        assert (await EmailChannel(settings).send(reminder())).status == "accepted"
        (mail,) = server.mailbox
        assert (mail.tls, mail.authenticated_as) == (True, "shop")


async def test_one_click_unsubscribe_headers_when_the_content_has_a_link():
    async with LocalSmtpServer() as server:
        action = reminder()
        content = Content(subject="Deals", body="This week", data={"unsubscribe_url": "https://shop.example/u/abc"})
        await EmailChannel(settings_for(server)).send(Action("act-1", "person-1", "email", content, action.address))
        (mail,) = server.mailbox
        assert mail.message["List-Unsubscribe"] == "<https://shop.example/u/abc>"
        assert mail.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


async def test_a_subject_that_would_inject_headers_never_sends():
    async with LocalSmtpServer() as server:
        content = Content(subject="Hi\r\nBcc: everyone@example.com", body="x")
        outcome = await EmailChannel(settings_for(server)).send(
            Action("act-1", "person-1", "email", content, "ada@example.com")
        )
        assert (outcome.status, outcome.reason, outcome.retryable) == ("failed", "invalid_message", False)
        assert server.mailbox == []
