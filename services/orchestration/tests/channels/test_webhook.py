"""Webhooks against a local receiver that checks signatures: retries, backoff, Retry-After, Slack payloads."""

from __future__ import annotations

import asyncio
import time

import pytest

from cdp_kit.settings import SettingsError, load_settings
from cdp_orchestration.channels.base import Action, Content
from cdp_orchestration.channels.settings import WebhookSettings
from cdp_orchestration.channels.webhook import WebhookChannel, sign, verify
from cdp_testing.channels.webhook import LocalWebhookReceiver

SECRET = "a-webhook-secret-of-some-length"


def settings(**more: str) -> WebhookSettings:
    # The local receivers listen on 127.0.0.1, which an operator has to list to be called at all.
    environ = {
        "CDP_WEBHOOK_SECRET": SECRET,
        "CDP_WEBHOOK_BACKOFF_BASE": "0.2",
        "CDP_WEBHOOK_TIMEOUT": "2",
        "CDP_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        **more,
    }
    return load_settings(WebhookSettings, environ)


def hook(url: str, action_id: str = "act-1") -> Action:
    return Action(
        action_id=action_id,
        person_id="person-1",
        channel="webhook",
        address=url,
        content=Content(subject="VIP at risk", body="Call them today.", data={"tier": "gold"}),
        attributes={"journey_id": "j-1"},
    )


class Waits:
    """Records the channel's backoff waits instead of sleeping them, so the tests stay fast."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)
        await asyncio.sleep(0)


async def test_a_signed_json_webhook_is_delivered_once():
    async with LocalWebhookReceiver(secret=SECRET) as receiver:
        async with WebhookChannel(settings()) as channel:
            outcome = await channel.send(hook(receiver.url()))
        assert outcome.status == "accepted"
        (delivery,) = receiver.deliveries
        assert delivery.headers["Idempotency-Key"] == "act-1"
        assert delivery.json == {
            "action_id": "act-1",
            "person_id": "person-1",
            "subject": "VIP at risk",
            "title": None,
            "body": "Call them today.",
            "url": None,
            "data": {"tier": "gold"},
            "attributes": {"journey_id": "j-1"},
        }
        stamp, signature = delivery.headers["X-CDP-Timestamp"], delivery.headers["X-CDP-Signature"]
        assert signature.startswith("v2=")
        assert verify(SECRET, stamp, signature, delivery.body, url=receiver.url())


async def test_a_receiver_with_another_secret_refuses_it_and_the_action_fails_for_good():
    async with LocalWebhookReceiver(secret="the-receivers-own-secret") as receiver:
        async with WebhookChannel(settings()) as channel:
            outcome = await channel.send(hook(receiver.url()))
        assert (outcome.status, outcome.reason, outcome.retryable) == ("failed", "http_401", False)
        assert (receiver.refused_signatures, receiver.deliveries) == (1, [])


async def test_5xx_and_429_are_retried_with_growing_backoff_and_the_same_idempotency_key():
    waits = Waits()
    async with LocalWebhookReceiver(secret=SECRET) as receiver:
        receiver.fail_next(2, status=503)
        receiver.fail_next(1, status=429)
        async with WebhookChannel(settings(), sleep=waits) as channel:
            outcome = await channel.send(hook(receiver.url()))
        assert outcome.status == "accepted"
        assert receiver.attempts == 4 and len(receiver.deliveries) == 1
        # Full jitter: each wait is within base * 2**(n-1).
        assert len(waits.seconds) == 3
        for n, wait in enumerate(waits.seconds, start=1):
            assert 0 <= wait <= 0.2 * 2 ** (n - 1)


async def test_retry_after_is_honoured_and_a_long_one_is_handed_back_to_the_caller():
    waits = Waits()
    async with LocalWebhookReceiver(secret=SECRET) as receiver:
        receiver.fail_next(1, status=429, retry_after="3")
        async with WebhookChannel(settings(), sleep=waits) as channel:
            assert (await channel.send(hook(receiver.url()))).status == "accepted"
            assert waits.seconds == [3.0]

            receiver.fail_next(1, status=503, retry_after="120")
            outcome = await channel.send(hook(receiver.url(), "act-2"))
        assert (outcome.status, outcome.retryable, outcome.retry_after) == ("failed", True, 120.0)
        assert waits.seconds == [3.0]  # nothing slept: the service re-schedules the action


async def test_a_long_429_comes_back_as_the_receiver_asking_for_time_not_as_a_failed_send():
    waits = Waits()
    async with LocalWebhookReceiver(secret=SECRET) as receiver:
        receiver.fail_next(1, status=429, retry_after="120")
        async with WebhookChannel(settings(), sleep=waits) as channel:
            later = await channel.send(hook(receiver.url()))
            receiver.fail_next(1, status=503, retry_after="120")
            failed = await channel.send(hook(receiver.url(), "act-2"))
        # The dispatcher hands a deferred action back without using one of its attempts; a 5xx uses one.
        assert (later.status, later.retryable, later.retry_after, later.deferred) == ("failed", True, 120.0, True)
        assert (failed.retryable, failed.deferred) == (True, False)
        assert waits.seconds == []


async def test_a_receiver_that_never_recovers_fails_the_action_retryably_after_max_attempts():
    waits = Waits()
    async with LocalWebhookReceiver(secret=SECRET) as receiver:
        receiver.fail_next(10, status=500)
        environ = {"CDP_WEBHOOK_MAX_ATTEMPTS": "6", "CDP_WEBHOOK_BACKOFF_MAX": "1"}
        async with WebhookChannel(settings(**environ), sleep=waits) as channel:
            outcome = await channel.send(hook(receiver.url()))
        assert (outcome.status, outcome.reason, outcome.retryable) == ("failed", "http_500", True)
        assert receiver.attempts == 6
        # The backoff grows past CDP_WEBHOOK_BACKOFF_MAX: it is capped there, the retries go on.
        assert len(waits.seconds) == 5 and max(waits.seconds) <= 1


async def test_a_timeout_is_retried():
    waits = Waits()
    async with LocalWebhookReceiver(secret=SECRET) as receiver:
        receiver.stall_next(1, seconds=1)
        async with WebhookChannel(settings(CDP_WEBHOOK_TIMEOUT="0.3"), sleep=waits) as channel:
            outcome = await channel.send(hook(receiver.url()))
        assert outcome.status == "accepted"
        assert len(receiver.deliveries) == 1 and len(waits.seconds) == 1


async def test_a_redelivered_action_is_processed_once_by_a_receiver_that_keeps_keys():
    async with LocalWebhookReceiver(secret=SECRET) as receiver:
        async with WebhookChannel(settings()) as channel:
            await channel.send(hook(receiver.url()))
            assert (await channel.send(hook(receiver.url()))).status == "accepted"
        assert (len(receiver.deliveries), receiver.replays) == (1, 1)


async def test_gone_endpoints_are_rejected_and_other_4xx_fail_for_good():
    async with LocalWebhookReceiver(secret=SECRET) as receiver:
        receiver.fail_next(1, status=410)
        receiver.fail_next(1, status=400)
        async with WebhookChannel(settings()) as channel:
            gone = await channel.send(hook(receiver.url()))
            bad = await channel.send(hook(receiver.url(), "act-2"))
            nowhere = await channel.send(hook("not a url", "act-3"))
        assert (gone.status, gone.reason) == ("rejected", "http_410")
        assert (bad.status, bad.reason, bad.retryable) == ("failed", "http_400", False)
        assert (nowhere.status, nowhere.reason) == ("rejected", "invalid_address")
        assert receiver.attempts == 2


async def test_slack_compatible_payload_on_the_default_url():
    async with LocalWebhookReceiver(slack=True) as receiver:
        channel_settings = settings(CDP_WEBHOOK_PAYLOAD="slack", CDP_WEBHOOK_URL=receiver.url("services/T0/B0/x"))
        async with WebhookChannel(channel_settings) as channel:
            outcome = await channel.send(hook(""))
        assert outcome.status == "accepted"
        (delivery,) = receiver.deliveries
        assert delivery.path == "/services/T0/B0/x"
        assert delivery.json == {"text": "*VIP at risk*\nCall them today."}


async def test_slack_text_from_traits_cannot_mention_everyone_or_disguise_a_link():
    # What a person could put in their own name and a journey then renders into the alert.
    name = "<!channel> Ada & <https://evil.example|https://shop.example>"
    content = Content(
        subject=f"VIP {name}",
        body=f"{name} <@U024BE7LH> wrote: 1 < 2 > 0 &amp;",
        url="https://evil.example/x|https://shop.example/cart?a=1&b=<2>",
    )
    async with LocalWebhookReceiver(slack=True) as receiver:
        async with WebhookChannel(settings(CDP_WEBHOOK_PAYLOAD="slack", CDP_WEBHOOK_URL=receiver.url())) as channel:
            outcome = await channel.send(
                Action(action_id="act-1", person_id="person-1", channel="webhook", content=content)
            )
        assert outcome.status == "accepted"
        (delivery,) = receiver.deliveries
    shown = "&lt;!channel&gt; Ada &amp; &lt;https://evil.example|https://shop.example&gt;"
    assert delivery.json["text"] == (
        f"*VIP {shown}*\n"
        f"{shown} &lt;@U024BE7LH&gt; wrote: 1 &lt; 2 &gt; 0 &amp;amp;\n"
        # The channel's own link: one target, no "|" that would give it a text of the trait's choosing.
        "<https://evil.example/x%7Chttps://shop.example/cart?a=1&amp;b=&lt;2&gt;>"
    )


def test_signatures_expire_and_bind_the_body_and_the_destination():
    now = int(time.time())
    url = "https://hooks.shop.example/in?x=1"
    signature = sign(SECRET, now, b"{}", url=url)
    assert verify(SECRET, str(now), signature, b"{}", url=url)
    assert not verify(SECRET, str(now), signature, b'{"a":1}', url=url)
    assert not verify(SECRET, str(now - 3600), sign(SECRET, now - 3600, b"{}", url=url), b"{}", url=url)
    for elsewhere in ("https://attacker.example/in?x=1", "https://hooks.shop.example/other?x=1",
                      "https://hooks.shop.example/in?x=2", "http://hooks.shop.example/in?x=1"):  # fmt: skip
        assert not verify(SECRET, str(now), signature, b"{}", url=elsewhere)


def test_settings_name_each_bad_variable():
    with pytest.raises(SettingsError) as raised:
        load_settings(
            WebhookSettings,
            {"CDP_WEBHOOK_SECRET": "short", "CDP_WEBHOOK_URL": "slack.com", "CDP_WEBHOOK_MAX_ATTEMPTS": "0"},
        )
    message = str(raised.value)
    for text in ("CDP_WEBHOOK_SECRET is too short", "CDP_WEBHOOK_URL='slack.com'", "CDP_WEBHOOK_MAX_ATTEMPTS=0"):
        assert text in message
    assert "'short'" not in message


async def test_only_allowed_hosts_are_called_when_a_list_is_set():
    async with LocalWebhookReceiver(secret=SECRET) as receiver:
        async with WebhookChannel(settings(CDP_WEBHOOK_ALLOWED_HOSTS="hooks.shop.example, 127.0.0.1")) as channel:
            allowed = await channel.send(hook(receiver.url()))
            elsewhere = await channel.send(hook("http://169.254.169.254/latest/meta-data", "act-2"))
        assert allowed.status == "accepted"
        assert (elsewhere.status, elsewhere.reason) == ("rejected", "host_not_allowed")
        assert receiver.attempts == 1
