"""A webhook's read goes ahead of a long polling turn: while the poller pages through thousands of contacts
(after `make up`'s generated users), a ticket a HubSpot user opens is read at the next page boundary, not
once the whole page-through is done (it took 28 s in one run)."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from cdp_crm.inbound import HubSpotWebhooks
from cdp_crm_emulators.hubspot import HubSpotEmulator

from .test_inbound_hubspot import _poller

CONTACTS = 800  # eight search pages


async def test_a_webhooks_ticket_is_read_between_two_pages_of_a_long_contact_read(store, session, collector):
    hubspot = HubSpotEmulator(client_secret="app-secret")
    await hubspot.start()
    runner = None
    reader = None
    try:
        poller = _poller(store, session, hubspot, collector, ("contacts", "tickets"))
        await poller.poll()  # the cursors: from now on
        hubspot.clock.advance(5)
        for n in range(CONTACTS):
            hubspot.user_create("contacts", {"email": f"user{n}@example.com"})  # no webhooks yet
        person = hubspot.records("contacts")[0]
        hooks = HubSpotWebhooks({"hs": (poller, "app-secret")})
        runner = web.AppRunner(hooks.app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        hubspot.webhook_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/webhooks/hubspot/hs"
        collector.delay = 0.1  # each page's post takes a while: the page-through takes about a second

        def contacts_read() -> int:
            return len(collector.events("CRM Contact Created"))

        reader = asyncio.create_task(poller.run(0.01))  # its first polling turn reads every contact
        deadline = time.monotonic() + 20
        while contacts_read() == 0:
            assert time.monotonic() < deadline, "the polling turn did not start"
            await asyncio.sleep(0.01)
        hubspot.clock.advance(1)
        ticket = hubspot.user_create("tickets", {"subject": "Refund please", "hs_pipeline_stage": "1"})  # signed
        hubspot._link("tickets", ticket["id"], "contacts", person["id"], [])
        while "CRM Ticket Opened" not in collector.names():
            assert time.monotonic() < deadline, "the webhook's ticket was not read"
            await asyncio.sleep(0.01)
        assert contacts_read() < CONTACTS  # read while the contacts were still being paged through
        while contacts_read() < CONTACTS:
            assert time.monotonic() < deadline, "the page-through did not go on after the ticket"
            await asyncio.sleep(0.05)
        assert len(collector.events("CRM Ticket Opened")) == 1  # once, though the turn's own read comes after
        assert collector.duplicates == 0
    finally:
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if runner is not None:
            await runner.cleanup()
        await hubspot.close()
