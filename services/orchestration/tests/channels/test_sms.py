"""SMS against the local Twilio Messages API, and the official `twilio` client against the same server."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from twilio.base.exceptions import TwilioRestException
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from cdp_kit.settings import SettingsError, load_settings
from cdp_orchestration.channels.base import Action, Content
from cdp_orchestration.channels.outcomes import feedback_from_twilio, track_event
from cdp_orchestration.channels.settings import TwilioSettings
from cdp_orchestration.channels.sms import SmsChannel, verify_twilio_signature
from cdp_testing.channels.twilio import LocalTwilio

SID = "AC" + "0123456789abcdef" * 2
TOKEN = "twilio-auth-token"
FROM = "+14155550100"


def text(to: str = "+14155550199", action_id: str = "act-1") -> Action:
    return Action(action_id=action_id, person_id="person-1", channel="sms", address=to, content=Content(body="Hi!"))


def settings_for(fake: LocalTwilio, **more: str) -> TwilioSettings:
    environ = {
        "CDP_TWILIO_ACCOUNT_SID": SID,
        "CDP_TWILIO_AUTH_TOKEN": TOKEN,
        "CDP_TWILIO_FROM": FROM,
        "CDP_TWILIO_API_URL": fake.base_url,
        **more,
    }
    return load_settings(TwilioSettings, environ)


async def test_a_text_is_accepted_with_twilios_message_sid():
    async with LocalTwilio(SID, TOKEN) as fake:
        async with SmsChannel(settings_for(fake)) as channel:
            outcome = await channel.send(text())
        assert outcome.status == "accepted"
        (message,) = fake.messages
        assert outcome.provider_id == message.sid
        assert (message.to, message.sender, message.body) == ("+14155550199", FROM, "Hi!")


async def test_bad_numbers_are_rejected_and_bad_credentials_fail_for_good():
    async with LocalTwilio(SID, TOKEN) as fake:
        fake.unsubscribed.add("+14155550123")
        async with SmsChannel(settings_for(fake)) as channel:
            local = await channel.send(text(to="0155 555"))
            stopped = await channel.send(text(to="+14155550123"))
        async with SmsChannel(settings_for(fake, CDP_TWILIO_AUTH_TOKEN="wrong")) as channel:
            unauthorised = await channel.send(text())
        assert (local.status, local.reason) == ("rejected", "invalid_address")
        assert (stopped.status, stopped.reason) == ("rejected", "twilio_21610")
        assert (unauthorised.status, unauthorised.reason, unauthorised.retryable) == ("failed", "twilio_20003", False)
        assert fake.messages == []


async def test_too_many_requests_is_retryable():
    async with LocalTwilio(SID, TOKEN) as fake:
        fake.fail_next_429 = 1
        async with SmsChannel(settings_for(fake)) as channel:
            limited = await channel.send(text())
            again = await channel.send(text())
        assert (limited.status, limited.reason, limited.retryable) == ("failed", "twilio_20429", True)
        assert again.status == "accepted"


async def test_the_fake_enforces_twilios_documented_errors_on_the_official_client():
    async with LocalTwilio(SID, TOKEN) as fake:
        client = Client(SID, TOKEN, http_client=fake.http_client())

        def create(**fields):
            return client.messages.create(**fields)

        message = await asyncio.to_thread(create, to="+14155550199", from_=FROM, body="Hello from the real client")
        assert message.sid.startswith("SM") and message.status == "queued"
        assert message.to == "+14155550199" and message.body == "Hello from the real client"
        fetched = await asyncio.to_thread(lambda: client.messages(message.sid).fetch())
        assert fetched.sid == message.sid and fetched.date_created is not None

        for fields, code in (
            ({"to": "12345", "from_": FROM, "body": "x"}, 21211),
            ({"to": "+14155550199", "body": "x"}, 21603),
            ({"to": "+14155550199", "from_": FROM}, 21602),
            ({"to": "+14155550199", "from_": FROM, "body": "x" * 1601}, 21617),
        ):
            with pytest.raises(TwilioRestException) as raised:
                await asyncio.to_thread(create, **fields)
            assert (raised.value.status, raised.value.code) == (400, code)

        fake.fail_next_429 = 1
        with pytest.raises(TwilioRestException) as raised:
            await asyncio.to_thread(create, to="+14155550199", from_=FROM, body="x")
        assert (raised.value.status, raised.value.code) == (429, 20429)

        intruder = Client(SID, "not-the-token", http_client=fake.http_client())
        with pytest.raises(TwilioRestException) as raised:
            await asyncio.to_thread(lambda: intruder.messages.create(to="+14155550199", from_=FROM, body="x"))
        assert (raised.value.status, raised.value.code) == (401, 20003)
        assert len(fake.messages) == 1


async def test_status_callbacks_are_signed_and_become_outcome_events():
    received: list[tuple[str, dict[str, str], bool]] = []

    async def status(request: web.Request) -> web.Response:
        params = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        url = str(request.url)
        ok = verify_twilio_signature(TOKEN, url, params, request.headers["X-Twilio-Signature"])
        # The official library agrees with our check (and so with the fake's signing).
        assert RequestValidator(TOKEN).validate(url, params, request.headers["X-Twilio-Signature"]) == ok
        received.append((request.query["action_id"], params, ok))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/twilio/status", status)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with LocalTwilio(SID, TOKEN) as fake:
            settings = settings_for(
                fake, CDP_TWILIO_STATUS_CALLBACK_URL=f"http://127.0.0.1:{port}/twilio/status?src=cdp"
            )
            async with SmsChannel(settings) as channel:
                outcome = await channel.send(text(action_id="act-7"))
            await fake.advance(outcome.provider_id, "sent", "delivered")
            await fake.advance(outcome.provider_id, "undelivered", error_code="30003")
    finally:
        await runner.cleanup()

    assert [(a, p["MessageStatus"], ok) for a, p, ok in received] == [
        ("act-7", "sent", True),
        ("act-7", "delivered", True),
        ("act-7", "undelivered", True),
    ]
    assert not verify_twilio_signature(TOKEN, "http://elsewhere/", received[0][1], "forged")
    delivered = feedback_from_twilio(received[1][1], "act-7")
    undelivered = feedback_from_twilio(received[2][1], "act-7")
    assert track_event(delivered, person_id="person-1")["event"] == "Message Delivered"
    event = track_event(undelivered, person_id="person-1", anonymous_id="visitor-1")
    assert (event["event"], event["properties"]["reason"], event["anonymousId"]) == (
        "Message Bounced",
        "twilio_30003",
        "visitor-1",
    )
    assert feedback_from_twilio({"MessageStatus": "sending"}, "act-7") is None


def test_settings_name_each_bad_variable():
    with pytest.raises(SettingsError) as raised:
        load_settings(
            TwilioSettings,
            {
                "CDP_TWILIO_ACCOUNT_SID": "AC1",
                "CDP_TWILIO_AUTH_TOKEN": "t",
                "CDP_TWILIO_FROM": "0155",
                "CDP_TWILIO_API_URL": "ftp://x",
            },
        )
    message = str(raised.value)
    for variable in ("CDP_TWILIO_ACCOUNT_SID='AC1'", "CDP_TWILIO_FROM='0155'", "CDP_TWILIO_API_URL='ftp://x'"):
        assert variable in message
    assert "t'" not in message.replace("'AC1'", "")  # the token is never echoed
    with pytest.raises(SettingsError, match="exactly one of CDP_TWILIO_FROM and CDP_TWILIO_MESSAGING_SERVICE_SID"):
        load_settings(TwilioSettings, {"CDP_TWILIO_ACCOUNT_SID": SID, "CDP_TWILIO_AUTH_TOKEN": "t"})


async def test_an_answer_that_is_not_json_is_judged_by_its_status():
    answers = [web.Response(status=502, text="<html>Bad Gateway</html>"), web.Response(status=201, text="created")]

    async def proxy(request: web.Request) -> web.Response:
        return answers.pop(0)

    app = web.Application()
    app.router.add_post("/{tail:.*}", proxy)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    try:
        environ = {"CDP_TWILIO_ACCOUNT_SID": SID, "CDP_TWILIO_AUTH_TOKEN": TOKEN, "CDP_TWILIO_FROM": FROM}
        async with SmsChannel(load_settings(TwilioSettings, {**environ, "CDP_TWILIO_API_URL": url})) as channel:
            bad_gateway = await channel.send(text())
            created = await channel.send(text(action_id="act-2"))
    finally:
        await runner.cleanup()
    assert (bad_gateway.status, bad_gateway.reason, bad_gateway.retryable) == ("failed", "http_502", True)
    assert (created.status, created.provider_id) == ("accepted", None)


async def test_a_session_shared_by_the_service_works_too():
    import aiohttp

    async with LocalTwilio(SID, TOKEN) as fake, aiohttp.ClientSession() as shared:
        channel = SmsChannel(settings_for(fake), session=shared)
        assert (await channel.send(text())).status == "accepted"
        await channel.close()
        assert not shared.closed  # not the channel's to close


async def test_the_fake_limits_messages_per_second_like_an_account_queue():
    now = [100.0]
    async with LocalTwilio(SID, TOKEN, clock=lambda: now[0]) as fake:
        fake.messages_per_second = 2
        async with SmsChannel(settings_for(fake)) as channel:
            first = [await channel.send(text(action_id=f"act-{n}")) for n in range(3)]
            now[0] += 1.0
            later = await channel.send(text(action_id="act-3"))
        assert [o.status for o in first] == ["accepted", "accepted", "failed"]
        assert (first[2].reason, first[2].retryable) == ("twilio_20429", True)
        assert later.status == "accepted"
