"""A signed HubSpot webhook is taken once across replicas: two connector instances behind one load balancer
share the store, and a replay of a request one of them took (within its five minutes) sent to the other is
answered without waking its poller - the replay memory is the store's (`crm_webhooks`), not a process's."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from contextlib import AsyncExitStack
from types import SimpleNamespace

import aiohttp
from aiohttp import web

from cdp_crm.domain.mapping import parse_connections
from cdp_crm.inbound import HubSpotWebhooks, Poller
from cdp_crm.state import prepare_store
from cdp_kit.storage import open_store
from cdp_testing.crm import hubspot_document

SECRET = "app-secret"
PUBLIC = "https://crm.example.test"


def _signed(body: bytes, timestamp: str) -> dict[str, str]:
    message = b"POST" + f"{PUBLIC}/webhooks/hubspot/hs".encode() + body + timestamp.encode()
    signature = base64.b64encode(hmac.new(SECRET.encode(), message, hashlib.sha256).digest()).decode()
    return {"X-HubSpot-Signature-v3": signature, "X-HubSpot-Request-Timestamp": timestamp}


async def _replica(stack: AsyncExitStack, url: str, connection) -> tuple[Poller, str]:
    """One connector instance: its own store connection (the same sqlite file), poller and webhook app."""
    store = await stack.enter_async_context(open_store(url))
    await prepare_store(store)
    poller = Poller(store, connection, SimpleNamespace(objects=("contacts",)), None, objects=("contacts",))
    hooks = HubSpotWebhooks({"hs": (poller, SECRET)}, public_url=PUBLIC, store=store)
    runner = web.AppRunner(hooks.app)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return poller, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/webhooks/hubspot/hs"


async def test_a_webhook_taken_by_one_replica_is_a_replay_at_the_other(tmp_path):
    (connection,) = parse_connections(hubspot_document("http://127.0.0.1:9"))
    url = f"sqlite:///{tmp_path}/crm.db"
    body = b'[{"subscriptionType": "contact.propertyChange", "objectId": 1}]'
    async with AsyncExitStack() as stack, aiohttp.ClientSession() as session:
        first, first_url = await _replica(stack, url, connection)
        second, second_url = await _replica(stack, url, connection)
        headers = _signed(body, str(int(time.time() * 1000)))
        async with session.post(first_url, data=body, headers=headers) as response:
            assert response.status == 204
        assert first.woken.is_set()  # taken: the first replica reads contacts at once
        async with session.post(second_url, data=body, headers=headers) as response:
            assert response.status == 204  # answered as HubSpot expects, and nothing done
        assert not second.woken.is_set()  # the replay woke nothing on the other replica
        first.woken.clear()
        async with session.post(first_url, data=body, headers=headers) as response:
            assert response.status == 204
        assert not first.woken.is_set()  # nor on the first (its own memory, as before)
        # A new notification (another timestamp, so another signature) is taken by either.
        fresh = _signed(body, str(int(time.time() * 1000) + 1))
        async with session.post(second_url, data=body, headers=fresh) as response:
            assert response.status == 204
        assert second.woken.is_set()


async def test_signatures_taken_are_swept_once_a_replay_would_be_stale_anyway():
    from cdp_crm.inbound import WebhookSweeper
    from cdp_crm.state import WEBHOOKS

    now = 1_800_000_000.0
    async with open_store("memory://") as store:
        await prepare_store(store)
        await store.put(WEBHOOKS, "hs:old", {"at": now - 300 - 61})  # five minutes and a minute's skew past
        await store.put(WEBHOOKS, "hs:recent", {"at": now - 300})  # may still be replayed (a clock ahead)
        await store.put(WEBHOOKS, "hs:ahead", {"at": now + 290})  # stamped ahead: taken for ten minutes
        assert await WebhookSweeper(store, clock=lambda: now).sweep() == 1
        assert set(await store.get_many(WEBHOOKS, ["hs:old", "hs:recent", "hs:ahead"])) == {"hs:recent", "hs:ahead"}
