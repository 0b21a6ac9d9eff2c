"""A stop that lands while the connector is still starting ends: its background consumers are still binding
(asking JetStream about their durables) when the service is asked to stop right after it started.

Python 3.11's `asyncio.wait_for`, under every nats-py request, returns the reply instead of raising when the
cancellation lands in the same loop turn as the reply: the cancelled task carries on. A consumer that then
went on to its fetch loops would run for ever, and the stop (SIGTERM during start) with it."""

from __future__ import annotations

import asyncio
import json

import nats.aio.client
import pytest

from cdp_crm.__main__ import setup
from cdp_crm.privacy import consumer_spec
from cdp_crm.settings import CrmSettings
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_kit.service import serving
from cdp_testing.crm import hubspot_document

from .conftest import TOKEN


@pytest.fixture
def privacy_binding_held(monkeypatch):
    """The privacy consumer's first JetStream request, held until the stop; its reply wins over the
    cancellation (what wait_for does when both come in one loop turn). Set once the request is held."""
    held = asyncio.Event()
    durable = consumer_spec().durable
    request = nats.aio.client.Client.request

    async def racing_request(self, subject, *args, **kwargs):
        reply = await request(self, subject, *args, **kwargs)
        if subject.startswith("$JS.API.CONSUMER.") and subject.endswith(f".{durable}") and not held.is_set():
            held.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass  # the reply is in: returned, the cancellation swallowed
        return reply

    monkeypatch.setattr(nats.aio.client.Client, "request", racing_request)
    return held


async def test_a_stop_while_a_consumer_is_still_binding_ends(nats_server, tmp_path, monkeypatch, privacy_binding_held):
    monkeypatch.setenv("HUBSPOT_TOKEN", TOKEN)
    async with HubSpotEmulator() as emulator:
        connections = tmp_path / "connections.json"
        connections.write_text(json.dumps(hubspot_document(emulator.base_url)))
        settings = CrmSettings(
            nats_url=nats_server.url,
            grpc_host="127.0.0.1",
            grpc_port=0,
            auth_mode="none",
            partitions=2,
            shutdown_grace=1.0,
            store_url=f"sqlite:///{tmp_path / 'crm.db'}",
            connections_file=connections,
        )

        async def run() -> None:
            async with serving(settings, setup):
                await privacy_binding_held.wait()  # stopped right there

        life = asyncio.create_task(run())
        done, _ = await asyncio.wait({life}, timeout=15.0)
        if not done:
            life.cancel()
            pytest.fail("the stop did not end: a consumer cancelled while binding ran on")
        life.result()
