"""HubSpot's generic webhook subscriptions (``object.creation``, ``object.propertyChange``, ...; the object
named by the payload's ``objectTypeId``) announce tasks, which its legacy subscriptions (``contact.*``,
``deal.*``, ``ticket.*``, ...) have no type for. A connection reading tasks whose app subscribes to them
there has every object it reads announced (`Poller.notified`): its quiet polling turns may stretch.

The local HubSpot sends legacy notifications only: the generic one is signed and posted here, as HubSpot
would (signature v3, the app's secret)."""

from __future__ import annotations

import asyncio
import time

import orjson
from aiohttp import web

from cdp_crm.adapters.hubspot import SearchPace
from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.mapping import parse_connections
from cdp_crm.inbound import HubSpotPoller, HubSpotWebhooks
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_crm_emulators.hubspot.webhooks import webhook_signature_v3
from cdp_testing.waiting import until

TOKEN = "pat-local-hubspot"
SECRET = "app-secret"


async def test_a_generic_task_notification_announces_tasks_and_reads_them_at_once(store, session, collector):
    """Before: ``object.propertyChange`` named no object read here (only ``task.*`` would have, a type
    HubSpot does not send), so it woke a read of everything and announced nothing - a connection reading
    tasks never had its quiet turns stretch, whatever its app subscribed to."""
    async with HubSpotEmulator(client_secret=SECRET, search_per_second=1000) as hubspot:
        ada = hubspot.user_create("contacts", {"email": "ada@example.com", "cdp_id": "person-1"})
        task = hubspot.user_create(
            "tasks",
            {"hs_task_subject": "Call Ada", "hs_task_status": "NOT_STARTED"},
            links=[("contacts", ada["id"], [])],
        )
        document = {"connections": [{"id": "hs", "kind": "hubspot", "url": hubspot.base_url,
                                     "credentials": {"token": "HUBSPOT_TOKEN"},
                                     "mappings": [{"id": "contacts", "object": "contacts",
                                                   "match": {"cdp_id": "person.id"},
                                                   "fields": {"email": "traits.email"}}]}]}  # fmt: skip
        (connection,) = parse_connections(document)
        poller = HubSpotPoller(
            store, connection, session, TOKEN, SharedBudget(store, connection), collector.client(session),
            objects=("contacts", "tasks"), searches=SearchPace(per_second=100.0),
        )  # fmt: skip
        await poller.poll()
        runner = web.AppRunner(HubSpotWebhooks({"hs": (poller, SECRET)}).app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/webhooks/hubspot/hs"
        reading = asyncio.create_task(poller.run(3600.0))  # no polling turn within the test
        try:
            hubspot.webhook_url = url  # a rep's contact edit: its legacy notification names contacts
            hubspot.user_update("contacts", ada["id"], {"firstname": "Ada"})
            await until(lambda: collector.events("CRM Contact Updated"), "the contact webhook's read")
            assert poller.announced == {"contacts"} and not poller.notified
            hubspot.webhook_url = None  # the task's edit: HubSpot sends the generic notification (below)
            hubspot.user_update("tasks", task["id"], {"hs_task_status": "COMPLETED"})
            body = orjson.dumps(
                [
                    {
                        "eventId": 7, "subscriptionId": 2, "portalId": hubspot.portal_id, "appId": 1,
                        "occurredAt": int(time.time() * 1000), "subscriptionType": "object.propertyChange",
                        "attemptNumber": 0, "objectId": int(task["id"]), "objectTypeId": "0-27",
                        "changeSource": "CRM_UI", "propertyName": "hs_task_status", "propertyValue": "COMPLETED",
                    }
                ]
            )  # fmt: skip
            searched = _searches(hubspot)
            timestamp = str(int(time.time() * 1000))
            headers = {
                "Content-Type": "application/json",
                "X-HubSpot-Request-Timestamp": timestamp,
                "X-HubSpot-Signature-v3": webhook_signature_v3(SECRET, "POST", url, body, timestamp),
            }
            async with session.post(url, data=body, headers=headers) as answer:
                assert answer.status == 204
            await until(lambda: collector.events("CRM Task Completed"), "the task webhook's read")
            assert poller.announced == {"contacts", "tasks"} and poller.notified
            # It woke a read of tasks alone, not of every object.
            await until(lambda: not poller._reading.locked(), "its read")
            assert _searches(hubspot)["contacts"] == searched["contacts"]
            assert _searches(hubspot)["tasks"] > searched["tasks"]
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            await runner.cleanup()


def _searches(hubspot: HubSpotEmulator) -> dict[str, int]:
    """How many searches of contacts and of tasks HubSpot received."""
    return {
        obj: sum(1 for r in hubspot.requests if r.path == f"/crm/v3/objects/{obj}/search")
        for obj in ("contacts", "tasks")
    }
