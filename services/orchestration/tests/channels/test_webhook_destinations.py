"""Where a webhook or a Web Push may go, as an attacker who can write a profile trait (a webhook URL, a
push subscription's endpoint) would try it.

Local receivers stand in for the places an attacker aims at: the receiver on 127.0.0.1 is "the node's
own port" or "the metadata service" unless the operator listed it. A URL from a trait may name only a
listed host (test_webhook_trait_urls.py), so the address check is shown on CDP_WEBHOOK_URL (`unlisted`),
the one URL that may name a host no one listed: a mistyped or rebinding name there is refused all the same. A fake resolver stands in for DNS, so
a name can answer with the receiver's loopback address as a rebinding name would. Both channels share
the guard (`destinations`); the Web Push tests at the end show it holds there too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cdp_kit.settings import load_settings
from cdp_orchestration.channels.base import Action, Content
from cdp_orchestration.channels.destinations import refusal
from cdp_orchestration.channels.settings import WebhookSettings, WebPushSettings
from cdp_orchestration.channels.webhook import WebhookChannel
from cdp_orchestration.channels.webpush import WebPushChannel, b64url
from cdp_testing.channels._http import HttpFake
from cdp_testing.channels.webhook import LocalWebhookReceiver

SECRET = "a-webhook-secret-of-some-length"


def channel(allowed: str = "", *, resolver: AbstractResolver | None = None, **more: str) -> WebhookChannel:
    environ = {
        "CDP_WEBHOOK_SECRET": SECRET,
        "CDP_WEBHOOK_ALLOWED_HOSTS": allowed,
        "CDP_WEBHOOK_BACKOFF_BASE": "0.01",
        "CDP_WEBHOOK_TIMEOUT": "2",
        **more,
    }
    return WebhookChannel(load_settings(WebhookSettings, environ), sleep=no_wait, resolver=resolver)


async def no_wait(seconds: float) -> None:
    await asyncio.sleep(0)


def hook(url: str) -> Action:
    return Action("act-1", "person-1", "webhook", Content(subject="VIP", body="Call them."), url)


async def unlisted(url: str, *, resolver: AbstractResolver | None = None) -> tuple[WebhookChannel, Action]:
    """A channel whose CDP_WEBHOOK_URL is `url`, no host listed, and an action naming no URL (so it goes there)."""
    return channel(resolver=resolver, CDP_WEBHOOK_URL=url), hook("")


class Answers(AbstractResolver):
    """DNS as the test says: every name answers with `address`; `asked` counts the look-ups."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.asked = 0

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        self.asked += 1
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        return [{"hostname": host, "host": self.address, "port": port, "family": family, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        return None


class Redirector(HttpFake):
    """Answers every request with `status` and a Location header (a receiver pointing the request on)."""

    def __init__(self, location: str, status: int = 307) -> None:
        super().__init__()
        self.location, self.status = location, status
        self.app.router.add_route("*", "/{path:.*}", self._answer)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=self.status, headers={"Location": self.location})


class Metadata(HttpFake):
    """What the cloud metadata service would be: it only counts who reached it, by any method."""

    def __init__(self) -> None:
        super().__init__()
        self.reached = 0
        self.app.router.add_route("*", "/{path:.*}", self._answer)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.reached += 1
        return web.Response(text="iam/security-credentials/role")


class Endless(HttpFake):
    """Answers 200 and then streams a body that never ends."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0
        self.app.router.add_post("/{path:.*}", self._answer)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        chunk = b"x" * 16384
        try:
            for _ in range(100_000):  # ~1.6 GB: endless as far as the channel is concerned
                await response.write(chunk)
                self.sent += len(chunk)
        except (ConnectionError, asyncio.CancelledError):
            pass
        return response


async def test_a_host_name_that_resolves_to_loopback_is_refused_and_nothing_is_sent():
    async with LocalWebhookReceiver(secret=SECRET) as receiver:
        webhook, action = await unlisted(f"http://localhost:{receiver.port}/hooks/cdp")
        async with webhook:
            outcome = await webhook.send(action)
        assert (outcome.status, outcome.reason, outcome.retryable) == ("rejected", "destination_not_allowed", False)
        assert receiver.attempts == 0


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "[::ffff:127.0.0.1]", "169.254.169.254", "[fe80::a9fe:a9fe]", "10.0.0.7", "0.0.0.0", "[::1]"],
)
async def test_an_ip_literal_that_is_not_public_is_refused_without_connecting(host):
    async with LocalWebhookReceiver(secret=SECRET) as receiver:
        webhook, action = await unlisted(f"http://{host}:{receiver.port}/latest/meta-data")
        async with webhook:
            outcome = await webhook.send(action)
        assert (outcome.status, outcome.reason) == ("rejected", "destination_not_allowed")
        assert receiver.attempts == 0


async def test_a_listed_host_may_be_private_the_operator_means_it():
    async with LocalWebhookReceiver(secret=SECRET) as receiver:
        async with channel("localhost") as webhook:
            by_name = await webhook.send(hook(f"http://localhost:{receiver.port}/hooks/cdp"))
        async with channel("127.0.0.1") as webhook:
            by_address = await webhook.send(hook(receiver.url()))
        assert (by_name.status, by_address.status) == ("accepted", "accepted")
        assert receiver.attempts == 2


async def test_the_address_connected_to_is_the_one_that_was_checked():
    # A rebinding name answers the receiver's loopback address: it is refused at the connection itself,
    # not at an earlier look-up the connection could differ from.
    async with LocalWebhookReceiver(secret=SECRET, hosts=("hooks.shop.example",)) as receiver:
        dns = Answers("127.0.0.1")
        url = f"http://hooks.shop.example:{receiver.port}/hooks/cdp"
        webhook, action = await unlisted(url, resolver=dns)
        async with webhook:
            refused = await webhook.send(action)
        assert (refused.status, refused.reason) == ("rejected", "destination_not_allowed")
        assert (receiver.attempts, dns.asked) == (0, 1)
        # Listed, the same answer is used as it is: the request lands where the checked answer pointed.
        async with channel("hooks.shop.example", resolver=dns) as webhook:
            listed = await webhook.send(hook(url))
        assert listed.status == "accepted" and receiver.attempts == 1


async def test_a_redirect_is_the_receivers_answer_never_followed():
    async with Metadata() as metadata:
        async with Redirector(f"{metadata.base_url}/latest/meta-data/", status=307) as redirector:
            # Even with the receiver listed, as an operator would list a local relay.
            async with channel("127.0.0.1") as webhook:
                outcome = await webhook.send(hook(f"{redirector.base_url}/hooks/cdp"))
        assert (outcome.status, outcome.reason, outcome.retryable) == ("failed", "http_307", False)
        assert metadata.reached == 0


async def test_an_endless_answer_is_read_only_so_far_and_the_status_still_counts():
    async with Endless() as receiver:
        async with channel("127.0.0.1", CDP_WEBHOOK_TIMEOUT="1", CDP_WEBHOOK_MAX_ATTEMPTS="1") as webhook:
            outcome = await webhook.send(hook(f"{receiver.base_url}/hooks/cdp"))
    assert outcome.status == "accepted"


async def test_the_allowed_list_still_limits_public_hosts():
    async with channel("hooks.shop.example") as webhook:
        outcome = await webhook.send(hook("https://attacker.example/steal"))
    assert (outcome.status, outcome.reason) == ("rejected", "host_not_allowed")


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00:ec2::254", "private"),
        ("169.254.169.254", "link_local"),
        ("fe80::1", "link_local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("100.64.0.1", "special_purpose"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:169.254.169.254", "link_local"),
        ("64:ff9b::a9fe:a9fe", "link_local"),  # NAT64 to the metadata service
        ("2002:a9fe:a9fe::", "link_local"),  # 6to4 of it
        ("::127.0.0.1", "reserved"),  # IPv4-compatible, deprecated
    ],
)
def test_which_addresses_are_refused(address: str, kind: str | None):
    assert refusal(ipaddress.ip_address(address)) == kind


# Web Push: the endpoint is whatever the person's browser (or whoever writes their profile) says.


@pytest.fixture
def pusher(tmp_path):
    key = tmp_path / "vapid.pem"
    key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )

    def make(allowed: str = "", *, resolver: AbstractResolver | None = None, **more: str) -> WebPushChannel:
        environ = {
            "CDP_VAPID_PRIVATE_KEY_FILE": str(key),
            "CDP_VAPID_SUBJECT": "mailto:ops@shop.example",
            "CDP_WEBPUSH_ALLOWED_HOSTS": allowed,
            "CDP_WEBPUSH_TIMEOUT": "2",
            **more,
        }
        return WebPushChannel(load_settings(WebPushSettings, environ), resolver=resolver)

    return make


def push_to(endpoint: str) -> Action:
    """A push to a subscription with valid keys whose endpoint is `endpoint`."""
    public = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    subscription = {"endpoint": endpoint, "keys": {"p256dh": b64url(public), "auth": b64url(os.urandom(16))}}
    return Action("act-1", "person-1", "webpush", Content(title="Back in stock", body="Now."), json.dumps(subscription))


async def test_a_push_endpoint_named_localhost_is_refused_and_nothing_is_sent(pusher, caplog):
    caplog.set_level(logging.INFO, logger="cdp.orchestration")
    async with Metadata() as metadata:
        endpoint = f"http://localhost:{metadata.port}/latest/meta-data"
        async with pusher() as webpush:
            outcome = await webpush.send(push_to(endpoint))
        assert (outcome.status, outcome.reason, outcome.retryable) == ("rejected", "destination_not_allowed", False)
        assert metadata.reached == 0
    # The log names the class of address, never the endpoint.
    assert [r.refused for r in caplog.records if hasattr(r, "refused")] == ["loopback"]
    assert all("localhost" not in r.getMessage() and "meta-data" not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("host", ["127.0.0.1", "[::ffff:127.0.0.1]", "169.254.169.254", "10.0.0.7", "[::1]"])
async def test_a_push_endpoint_at_an_address_that_is_not_public_is_refused_without_connecting(pusher, host):
    async with Metadata() as metadata:
        async with pusher() as webpush:
            outcome = await webpush.send(push_to(f"http://{host}:{metadata.port}/latest/meta-data"))
        assert (outcome.status, outcome.reason) == ("rejected", "destination_not_allowed")
        assert metadata.reached == 0


async def test_a_push_endpoint_on_a_listed_host_may_be_private(pusher):
    async with Metadata() as relay:
        async with pusher("localhost") as webpush:
            by_name = await webpush.send(push_to(f"http://localhost:{relay.port}/push/1"))
        async with pusher("127.0.0.1") as webpush:
            by_address = await webpush.send(push_to(f"{relay.base_url}/push/1"))
        assert (by_name.status, by_address.status) == ("accepted", "accepted")
        assert relay.reached == 2


async def test_a_push_endpoint_is_connected_to_at_the_address_that_was_checked(pusher):
    async with Metadata() as metadata:
        dns = Answers("127.0.0.1")
        endpoint = f"http://push.shop.example:{metadata.port}/push/1"
        async with pusher(resolver=dns) as webpush:
            refused = await webpush.send(push_to(endpoint))
        assert (refused.status, refused.reason) == ("rejected", "destination_not_allowed")
        assert (metadata.reached, dns.asked) == (0, 1)
        async with pusher("push.shop.example", resolver=dns) as webpush:
            listed = await webpush.send(push_to(endpoint))
        assert listed.status == "accepted" and metadata.reached == 1


async def test_a_push_services_redirect_is_its_answer_never_followed(pusher):
    async with Metadata() as metadata:
        async with Redirector(f"{metadata.base_url}/latest/meta-data/", status=307) as redirector:
            async with pusher("127.0.0.1") as webpush:
                outcome = await webpush.send(push_to(f"{redirector.base_url}/push/1"))
        assert (outcome.status, outcome.reason, outcome.retryable) == ("failed", "http_307", False)
        assert metadata.reached == 0


async def test_an_endless_push_answer_is_read_only_so_far_and_the_status_still_counts(pusher):
    async with Endless() as push_service:
        async with pusher("127.0.0.1", CDP_WEBPUSH_TIMEOUT="1") as webpush:
            outcome = await webpush.send(push_to(f"{push_service.base_url}/push/1"))
    assert outcome.status == "accepted"
