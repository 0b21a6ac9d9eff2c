"""The feedback loop: a ticket opened in the local HubSpot becomes one event at the collector, carrying the
CRM ids and the contact's email and CDP id - once, across a restart and a crash before the cursor moved."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web

from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.mapping import parse_connections
from cdp_crm.inbound import Collector, CollectorRefused, HubSpotPoller, HubSpotWebhooks
from cdp_crm.inbound.core import Poller
from cdp_crm.state import CURSORS, prepare_store
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_crm_emulators.hubspot.webhooks import webhook_signature_v3
from cdp_kit.storage import open_store
from cdp_testing.crm import hubspot_document
from cdp_testing.waiting import eventually

TOKEN = "pat-local-hubspot"


async def test_a_ticket_opened_in_hubspot_reaches_the_collector_once_across_restarts(tmp_path, collector):
    document = {
        "connections": [
            {
                "id": "hs",
                "kind": "hubspot",
                "credentials": {"token": "HUBSPOT_TOKEN"},
                "mappings": [{"id": "contacts", "object": "contacts", "match": {"cdp_id": "person.id"},
                              "fields": {"email": "traits.email"}}],
            }
        ]
    }  # fmt: skip
    async with (
        HubSpotEmulator() as emulator,
        aiohttp.ClientSession() as session,
        open_store(f"sqlite:///{tmp_path}/crm.db") as store,
    ):
        document["connections"][0]["url"] = emulator.base_url
        (connection,) = parse_connections(document)
        await prepare_store(store)

        def poller() -> HubSpotPoller:  # a fresh process: nothing in memory, the store as it was left
            budget = SharedBudget(store, connection)
            return HubSpotPoller(
                store, connection, session, TOKEN, budget, Collector(session, collector.url, "crm-key"),
                objects=("tickets",),  # the contact's own creation is another test's story
            )  # fmt: skip

        contact = emulator.user_create("contacts", {"email": "ada@example.com", "cdp_id": "person-1"})
        headers = {"Authorization": f"Bearer {TOKEN}"}
        body = {
            "properties": {"subject": "Cannot log in", "hs_pipeline_stage": "1", "hs_ticket_priority": "HIGH"},
            "associations": [{"to": {"id": contact["id"]}, "types": [{"associationCategory": "HUBSPOT_DEFINED",
                                                                      "associationTypeId": 16}]}],
        }  # fmt: skip
        async with session.post(f"{emulator.base_url}/crm/v3/objects/tickets", json=body, headers=headers) as r:
            ticket = await r.json()

        collector.refuse_next = 1  # the collector is briefly down: nothing is lost, the cursor stays
        with pytest.raises(CollectorRefused):
            await poller().poll()
        assert collector.stored == {}
        assert await poller().poll() == 1
        (event,) = collector.stored.values()
        assert event["event"] == "CRM Ticket Opened"
        # Linked through the email identity resolves; the person id rides along, never as a userId
        # (identity would take it for a second user and make a profile of its own).
        assert "userId" not in event
        assert event["anonymousId"].startswith("hubspot:")
        assert event["properties"]["cdp_person_id"] == "person-1"
        assert event["context"]["traits"] == {"email": "ada@example.com"}
        assert event["properties"]["crm_id"] == ticket["id"]
        assert event["properties"]["crm_contact_id"] == contact["id"]
        assert event["properties"]["subject"] == "Cannot log in"

        # A restart reads from the stored cursor: nothing again.
        assert await poller().poll() == 0
        # A crash after posting and before the cursor was stored: the page is read again, posted with the
        # same message id, and the collector keeps it once.
        await store.delete(CURSORS, "hs:tickets")
        await poller().poll()
        assert len(collector.stored) == 1 and collector.duplicates == 1

        emulator.clock.advance(5)
        emulator.user_update("tickets", ticket["id"], {"hs_pipeline_stage": "4"})
        assert await poller().poll() == 1
        assert [e["event"] for e in collector.stored.values()] == ["CRM Ticket Opened", "CRM Ticket Closed"]


async def test_a_task_the_connector_created_comes_back_only_with_its_outcome(tmp_path, collector):
    async with (
        HubSpotEmulator() as emulator,
        aiohttp.ClientSession() as session,
        open_store(f"sqlite:///{tmp_path}/crm.db") as store,
    ):
        document = {"connections": [{"id": "hs", "kind": "hubspot", "url": emulator.base_url,
                                     "credentials": {"token": "HUBSPOT_TOKEN"},
                                     "mappings": [{"id": "contacts", "object": "contacts",
                                                   "match": {"cdp_id": "person.id"}, "fields": {"email": "traits.email"}}]}]}  # fmt: skip
        (connection,) = parse_connections(document)
        await prepare_store(store)
        poller = HubSpotPoller(
            store, connection, session, TOKEN, SharedBudget(store, connection), Collector(session, collector.url, "crm-key"),
            objects=("tasks",),
        )  # fmt: skip
        # As the connector writes a task for orchestration's action: upserted by its idempotency key.
        task = emulator.user_create(
            "tasks", {"hs_task_subject": "Call Ada", "hs_task_status": "NOT_STARTED", "cdp_idempotency_key": "cdp-1"}
        )
        assert await poller.poll() == 0  # the CDP's own action is not news
        emulator.clock.advance(5)
        emulator.user_update("tasks", task["id"], {"hs_task_status": "COMPLETED"})
        assert await poller.poll() == 1
        (event,) = collector.stored.values()
        assert event["event"] == "CRM Task Completed"
        assert event["properties"]["cdp_idempotency_key"] == "cdp-1"  # which action it was


async def test_a_signed_webhook_reads_the_change_at_once_and_a_forged_one_is_refused(tmp_path, collector):
    async with (
        aiohttp.ClientSession() as session,
        open_store(f"sqlite:///{tmp_path}/crm.db") as store,
    ):
        await prepare_store(store)
        emulator = HubSpotEmulator(client_secret="app-secret")
        await emulator.start()
        runner = None
        try:
            document = {"connections": [{"id": "hs", "kind": "hubspot", "url": emulator.base_url,
                                         "credentials": {"token": "HUBSPOT_TOKEN", "client_secret": "HUBSPOT_SECRET"},
                                         "mappings": [{"id": "contacts", "object": "contacts",
                                                       "match": {"cdp_id": "person.id"},
                                                       "fields": {"email": "traits.email"}}]}]}  # fmt: skip
            (connection,) = parse_connections(document)
            poller = HubSpotPoller(
                store, connection, session, TOKEN, SharedBudget(store, connection),
                Collector(session, collector.url, "crm-key"), objects=("tickets",),
            )  # fmt: skip
            hooks = HubSpotWebhooks({"hs": (poller, "app-secret")})
            runner = web.AppRunner(hooks.app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/webhooks/hubspot/hs"
            emulator.webhook_url = url
            # Polled only once an hour: only the webhook can make this quick.
            reader = asyncio.create_task(poller.run(3600.0, owned=lambda: False))
            try:
                emulator.user_create("tickets", {"subject": "Refund please"})
                await emulator.drain_webhooks()
                await eventually(lambda: len(collector.stored) == 1)
                assert [e["event"] for e in collector.stored.values()] == ["CRM Ticket Opened"]

                forged = b'[{"objectId": 1}]'
                headers = {
                    "X-HubSpot-Signature-v3": "AAAA",
                    "X-HubSpot-Request-Timestamp": str(int(time.time() * 1000)),
                }
                async with session.post(url, data=forged, headers=headers) as response:
                    assert response.status == 401
                assert not poller.woken.is_set()
            finally:
                reader.cancel()
        finally:
            if runner is not None:
                await runner.cleanup()
            await emulator.close()


async def test_a_stop_that_comes_with_a_webhooks_wake_up_stops_the_reader():
    """A webhook waking the reader in the loop turn the connector stops in: the stop is not lost (Python
    3.11's wait_for would return the wake-up and swallow it: the reader read on, the stop waited for ever)."""
    (connection,) = parse_connections(hubspot_document("http://127.0.0.1:9"))
    async with open_store("memory://") as store:
        await prepare_store(store)
        poller = Poller(store, connection, SimpleNamespace(objects=("contacts",)), None, objects=("contacts",))
        reads = []

        async def poll(objects=None):
            reads.append(objects)
            return 0

        poller.poll = poll
        reader = asyncio.create_task(poller.run(3600.0, owned=lambda: False))
        await eventually(lambda: bool(poller.woken._waiters), timeout=5)  # waiting for a webhook
        poller.wake()
        await asyncio.sleep(0)  # the wake-up is in
        reader.cancel()
        done, _ = await asyncio.wait({reader}, timeout=5)
        assert done, "the reader ran on after its cancellation"
        assert reader.cancelled()


@pytest.mark.parametrize("timestamp", ["9" * 5000, "١٢٣٤٥", "-1", "1e12", ""])
async def test_a_webhook_with_a_timestamp_that_is_no_time_is_refused_as_stale_not_an_error(timestamp):
    """A 5,000-digit timestamp passed isdigit() and made int() raise (Python's digit limit): the handler
    answered 500 with a traceback in the log, for anyone who can reach the port."""
    (connection,) = parse_connections(hubspot_document("http://127.0.0.1:9"))
    async with open_store("memory://") as store:
        await prepare_store(store)
        poller = Poller(store, connection, SimpleNamespace(objects=("contacts",)), None, objects=("contacts",))
        hooks = HubSpotWebhooks({"hubspot": (poller, "app-secret")})
        runner = web.AppRunner(hooks.app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/webhooks/hubspot/hubspot"
        try:
            async with aiohttp.ClientSession() as session:
                headers = {"X-HubSpot-Signature-v3": "AAAA", "X-HubSpot-Request-Timestamp": timestamp}
                async with session.post(url, data=b"[]", headers=headers) as response:
                    assert response.status == 401
                    assert "X-HubSpot-Request-Timestamp" in (await response.json())["message"]
            assert not poller.woken.is_set()
        finally:
            await runner.cleanup()


async def test_a_signed_webhook_taken_once_is_not_taken_again_when_replayed_within_its_five_minutes():
    """A captured signed request, replayed while its timestamp is still fresh, woke the poller every time:
    a reader of the CRM on the account's budget per replay. It is taken once; its replays wake nothing,
    and a new notification (its own timestamp and signature) is taken as before."""
    (connection,) = parse_connections(hubspot_document("http://127.0.0.1:9"))
    async with open_store("memory://") as store:
        await prepare_store(store)
        poller = Poller(store, connection, SimpleNamespace(objects=("contacts",)), None, objects=("contacts",))
        hooks = HubSpotWebhooks({"hubspot": (poller, "app-secret")})
        runner = web.AppRunner(hooks.app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/webhooks/hubspot/hubspot"
        body = b'[{"subscriptionType": "contact.propertyChange", "objectId": 1}]'

        def signed(timestamp: str) -> dict[str, str]:
            signature = webhook_signature_v3("app-secret", "POST", url, body, timestamp)
            return {"X-HubSpot-Signature-v3": signature, "X-HubSpot-Request-Timestamp": timestamp}

        try:
            async with aiohttp.ClientSession() as session:
                captured = signed(str(int(time.time() * 1000)))
                async with session.post(url, data=body, headers=captured) as response:
                    assert response.status == 204
                assert poller.woken.is_set()
                poller.woken.clear()
                for _ in range(3):
                    async with session.post(url, data=body, headers=captured) as response:
                        assert response.status == 204
                assert not poller.woken.is_set()
                async with session.post(url, data=body, headers=signed(str(int(time.time() * 1000) + 1))) as response:
                    assert response.status == 204
                assert poller.woken.is_set()
        finally:
            await runner.cleanup()
