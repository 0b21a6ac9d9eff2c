"""Web Push against a local push service that checks VAPID and decrypts with the subscription's keys."""

from __future__ import annotations

import json

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cdp_kit.settings import SettingsError, load_settings
from cdp_orchestration.channels.base import Action, Content
from cdp_orchestration.channels.settings import WebPushSettings
from cdp_orchestration.channels.webpush import WebPushChannel
from cdp_testing.channels.webpush import LocalPushService


@pytest.fixture
def vapid(tmp_path):
    def make(name: str = "vapid.pem", curve: ec.EllipticCurve | None = None):
        key = ec.generate_private_key(curve or ec.SECP256R1())
        path = tmp_path / name
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return load_settings(
            WebPushSettings,
            {
                "CDP_VAPID_PRIVATE_KEY_FILE": str(path),
                "CDP_VAPID_SUBJECT": "mailto:ops@shop.example",
                "CDP_WEBPUSH_TTL": "600",
                # The local push service listens on 127.0.0.1, which an operator has to list to be called.
                "CDP_WEBPUSH_ALLOWED_HOSTS": "127.0.0.1",
            },
        )

    return make


def notification(subscription: dict, action_id: str = "act-1") -> Action:
    return Action(
        action_id=action_id,
        person_id="person-1",
        channel="webpush",
        address=json.dumps(subscription),
        content=Content(title="Back in stock", body="Your size is back", url="https://shop/p/1", data={"sku": "1"}),
    )


async def test_the_browser_decrypts_what_was_sent(vapid):
    async with LocalPushService() as push, WebPushChannel(vapid()) as channel:
        subscription = push.subscribe(application_server_key=channel.application_server_key)
        outcome = await channel.send(notification(subscription))
        assert outcome.status == "accepted" and outcome.provider_id.startswith(push.base_url)
        (message,) = push.pending(subscription)
        assert message.json() == {
            "action_id": "act-1",
            "title": "Back in stock",
            "body": "Your size is back",
            "url": "https://shop/p/1",
            "data": {"sku": "1"},
        }
        assert (message.ttl, message.urgency, message.vapid_subject) == (600, "normal", "mailto:ops@shop.example")


async def test_a_redelivered_action_replaces_its_undelivered_copy(vapid):
    async with LocalPushService() as push, WebPushChannel(vapid()) as channel:
        subscription = push.subscribe()
        await channel.send(notification(subscription))
        await channel.send(notification(subscription))
        await channel.send(notification(subscription, "act-2"))
        assert [m.json()["action_id"] for m in push.pending(subscription)] == ["act-1", "act-2"]


async def test_a_key_other_than_the_subscriptions_is_refused(vapid):
    async with LocalPushService() as push, WebPushChannel(vapid()) as ours, WebPushChannel(vapid("other.pem")) as other:
        subscription = push.subscribe(application_server_key=ours.application_server_key)
        outcome = await other.send(notification(subscription))
        assert (outcome.status, outcome.reason, outcome.retryable) == ("failed", "http_403", False)
        assert push.refusals == [(403, "the subscription is restricted to another application server key")]
        assert push.pending(subscription) == []


async def test_gone_subscriptions_are_rejected_and_outages_retryable(vapid):
    async with LocalPushService() as push, WebPushChannel(vapid()) as channel:
        subscription = push.subscribe()
        push.fail_next(1, status=429, retry_after="30")
        limited = await channel.send(notification(subscription))
        push.unsubscribe(subscription)
        gone = await channel.send(notification(subscription, "act-2"))
        garbage = await channel.send(notification({"endpoint": "https://x", "keys": {"p256dh": "AA", "auth": "AA"}}))
        assert (limited.status, limited.retryable, limited.retry_after) == ("failed", True, 30.0)
        assert (gone.status, gone.reason) == ("rejected", "http_410")
        assert (garbage.status, garbage.reason) == ("rejected", "invalid_address")


async def test_an_oversized_payload_fails_before_it_is_sent(vapid):
    async with LocalPushService() as push, WebPushChannel(vapid()) as channel:
        subscription = push.subscribe()
        action = notification(subscription)
        big = Action(action.action_id, action.person_id, action.channel, Content(body="x" * 5000), action.address)
        outcome = await channel.send(big)
        assert (outcome.status, outcome.reason, outcome.retryable) == ("failed", "payload_too_large", False)
        assert push.refusals == []


def test_the_vapid_key_must_be_p256(vapid):
    with pytest.raises(SettingsError, match="CDP_VAPID_PRIVATE_KEY_FILE must hold a P-256"):
        WebPushChannel(vapid(curve=ec.SECP384R1()))
    with pytest.raises(SettingsError, match=r"CDP_VAPID_SUBJECT='ops@shop\.example' is invalid"):
        load_settings(
            WebPushSettings, {"CDP_VAPID_PRIVATE_KEY_FILE": __file__, "CDP_VAPID_SUBJECT": "ops@shop.example"}
        )


async def test_the_push_service_enforces_ttl_vapid_audience_and_expiry(vapid):
    async with LocalPushService() as push, WebPushChannel(vapid()) as channel, aiohttp.ClientSession() as http:
        endpoint = push.subscribe()["endpoint"]
        good = {"TTL": "60", "Content-Encoding": "aes128gcm", "Authorization": channel.vapid_header(endpoint)}
        cases = [
            ({k: v for k, v in good.items() if k != "Authorization"}, 401),
            ({k: v for k, v in good.items() if k != "TTL"}, 400),
            ({**good, "Authorization": channel.vapid_header("https://push.elsewhere.example/x")}, 403),
            ({**good, "Authorization": channel.vapid_header(endpoint, now=0)}, 403),
            ({**good, "Content-Encoding": "aesgcm"}, 415),
            (good, 400),  # the body does not decrypt
        ]
        for headers, status in cases:
            async with http.post(endpoint, data=b"\x00" * 100, headers=headers) as response:
                assert response.status == status, (headers, push.refusals[-1:])
