"""A write the CRM applied but whose answer was lost (the connection dropped after the CRM committed it) is
queued, and the connector's record keeps the CRM's old values until a retry is confirmed. The inbound
poller reading the contact meanwhile sees the CDP's new values there: they are the CDP's own write, not a
CRM user's edit - no "CRM Contact Updated", no identify sending the CDP's values back to the profile. A
CRM user's edit made while the write is queued is news all the same.

Real HTTP throughout: the local CRM behind a small proxy that forwards every request and, while told to,
drops the connection after the CRM answered a record write (the answer never reaches the connector)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from cdp_crm.adapters.salesforce import SalesforceAdapter
from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.coalesce import record_key
from cdp_crm.export import export_person
from cdp_crm.inbound import Poller
from cdp_crm.inbound.salesforce import SalesforceReader
from cdp_crm.state import PENDING, PENDING_STATE, RECORDS, SYNCED
from cdp_crm.writes import SENT_KEPT, unconfirmed
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_crm_emulators.salesforce import SalesforceEmulator

from .conftest import eventually, salesforce_contacts

HOP_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "content-encoding"})


class LosingProxy:
    """Forwards every request to `target`. While `losing`, a record write (HubSpot's batch upsert,
    Salesforce's sObject Collections upsert) is forwarded - the CRM commits it - and then the connection is
    dropped before its answer goes out (with `late` seconds set: the answer is held that long instead, past
    the connector's request timeout); while `refusing`, a record write is answered 503 without reaching
    the CRM (the queued write's retries then change nothing there). Answers naming the CRM's own address
    (Salesforce's token answer gives its `instance_url`) are pointed at the proxy, so every later call
    comes through it."""

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.url = ""
        self.losing = False
        self.late = 0.0
        self.refusing = False
        self.writing = 0  # record writes forwarded whose answer did not come back from the CRM yet
        self.lost = 0  # writes the CRM applied whose answer the proxy dropped
        self.session: aiohttp.ClientSession | None = None
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        self.runner = web.AppRunner(app)

    async def __aenter__(self) -> LosingProxy:
        self.session = aiohttp.ClientSession(auto_decompress=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def refuse_writes(self) -> None:
        """From now on no record write reaches the CRM: those on their way have landed when this returns."""
        self.losing, self.refusing = False, True
        await eventually(lambda: self.writing == 0)

    async def __aexit__(self, *exc: Any) -> None:
        await self.runner.cleanup()
        assert self.session is not None
        await self.session.close()

    @staticmethod
    def is_write(request: web.Request) -> bool:
        path = request.path
        return (request.method == "POST" and path.endswith("/batch/upsert")) or (
            request.method == "PATCH" and "/composite/sobjects/" in path
        )

    async def forward(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        body = await request.read()
        write = self.is_write(request)
        if write and self.refusing:
            return web.json_response({"status": "error", "message": "unavailable"}, status=503)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        self.writing += write
        try:
            async with self.session.request(
                request.method, self.target + request.path_qs, data=body, headers=headers, allow_redirects=False
            ) as answer:
                payload = await answer.read()
                status = answer.status
                answer_headers = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS}
        finally:
            self.writing -= write
        if self.losing and write and self.late:
            self.lost += 1
            await asyncio.sleep(self.late)  # the connector gave up waiting: the answer comes too late
        elif self.losing and write and request.transport is not None:
            self.lost += 1
            request.transport.abort()  # the CRM committed the write; its answer is lost
            raise asyncio.CancelledError
        payload = payload.replace(self.target.encode(), self.url.encode())
        return web.Response(status=status, body=payload, headers=answer_headers)


async def _record(world, key: str) -> dict[str, Any]:
    return (await world.store.get(RECORDS, key)).doc


async def _queued(world, key: str, proxy: LosingProxy):
    """The record's write is queued (the answer lost at least once, so the CRM holds it)."""
    queued = await world.store.get(PENDING, key)
    record = await world.store.get(RECORDS, key)
    ok = queued is not None and proxy.lost > 0 and record.doc["state"] == PENDING_STATE
    return ok and record.doc


async def _synced(world, key: str, field: str, value: Any):
    record = await world.store.get(RECORDS, key)
    doc = record.doc if record is not None else {}
    ok = doc.get("state") == SYNCED and doc["fields"].get(field) == value
    return ok and await world.store.get(PENDING, key) is None


# --- HubSpot ------------------------------------------------------------------------------------------


async def _hubspot_world(world_factory, hubspot, proxy):
    world = await world_factory(hubspot)
    document = world.document()
    document["connections"][0]["url"] = proxy.url
    await world.start(document, retry_for=1.0)
    return world


@pytest.mark.parametrize("lost_by", ["dropped connection", "timeout"])
async def test_hubspot_a_write_whose_answer_was_lost_is_not_read_back_as_a_users_edit(
    world_factory, collector, lost_by
):
    async with HubSpotEmulator() as hubspot, LosingProxy(hubspot.base_url) as proxy:
        proxy.late = 2.5 if lost_by == "timeout" else 0.0  # the world's request timeout is 2 s
        world = await _hubspot_world(world_factory, hubspot, proxy)
        poller = world.hubspot_poller(collector)
        key = record_key("hs/contacts", (("cdp_id", "person-1"),))
        await world.profiles({"person-1": {"traits.email": "ada@example.com", "traits.first_name": "Ada"}})
        await world.eventually(lambda: _synced(world, key, "firstname", "Ada"))
        contact = hubspot.find("contacts", "cdp_id", "person-1")
        assert await poller.poll() == 0  # the connector created it

        # The CDP changes her first name; HubSpot applies it, the answer is lost: queued.
        proxy.losing = True
        hubspot.clock.advance(5)
        await world.profiles({"person-1": {"traits.first_name": "Augusta"}})
        record = await world.eventually(lambda: _queued(world, key, proxy))
        assert record["fields"]["firstname"] == "Ada"  # what the connector knows HubSpot took
        assert hubspot.find("contacts", "cdp_id", "person-1")["properties"]["firstname"] == "Augusta"

        # The poller reads the contact while the write is queued: it holds the CDP's own value.
        assert await poller.poll() == 0
        assert collector.names() == [] and collector.events(kind="identify") == []
        # What the connector keeps meanwhile is in the person's export: the value sent, unconfirmed.
        (exported,) = (await export_person(world.store, world.connections, "person-1"))["connections"][0]["records"]
        assert exported["fields"]["firstname"] == "Ada" and exported["sent"] == {"firstname": ["Augusta"]}

        # The CRM answers again: the retry (an upsert by the CDP id) is confirmed, nothing is echoed.
        proxy.losing = False
        await world.eventually(lambda: _synced(world, key, "firstname", "Augusta"))
        hubspot.clock.advance(5)
        assert await poller.poll() == 0
        assert collector.names() == []
        (only,) = hubspot.records("contacts")
        assert only["id"] == contact["id"] and only["properties"]["firstname"] == "Augusta"
        assert "sent" not in await _record(world, key)  # confirmed: nothing left unconfirmed
        await world.stop()


async def test_hubspot_a_users_edit_while_a_write_is_queued_is_still_news(world_factory, collector):
    async with HubSpotEmulator() as hubspot, LosingProxy(hubspot.base_url) as proxy:
        world = await _hubspot_world(world_factory, hubspot, proxy)
        poller = world.hubspot_poller(collector)
        key = record_key("hs/contacts", (("cdp_id", "person-1"),))
        await world.profiles({"person-1": {"traits.email": "ada@example.com", "traits.first_name": "Ada"}})
        await world.eventually(lambda: _synced(world, key, "firstname", "Ada"))
        contact = hubspot.find("contacts", "cdp_id", "person-1")
        assert await poller.poll() == 0

        proxy.losing = True
        hubspot.clock.advance(5)
        await world.profiles({"person-1": {"traits.first_name": "Augusta"}})
        await world.eventually(lambda: _queued(world, key, proxy))
        await proxy.refuse_writes()  # the CRM down for writes: the retries do not overwrite the rep's edits

        # A sales rep edits a field the CDP did not write: news; the CDP's queued first name is not a trait.
        hubspot.clock.advance(5)
        hubspot.user_update("contacts", contact["id"], {"lastname": "King"})
        assert await poller.poll() == 1
        assert collector.names() == ["CRM Contact Updated"] and collector.events(kind="identify") == []

        # ... then writes a first name of their own (neither the old one nor the one the CDP sent): news.
        hubspot.clock.advance(5)
        hubspot.user_update("contacts", contact["id"], {"firstname": "Grace"})
        assert await poller.poll() == 2
        (identify,) = collector.events(kind="identify")
        assert identify["traits"] == {"first_name": "Grace"}
        assert identify["context"]["traits"] == {"email": "ada@example.com"}  # the link, not a trait
        await world.stop()


async def test_hubspot_a_contact_whose_creation_was_never_answered_does_not_echo_the_cdps_values(
    world_factory, collector
):
    async with HubSpotEmulator() as hubspot, LosingProxy(hubspot.base_url) as proxy:
        world = await _hubspot_world(world_factory, hubspot, proxy)
        poller = world.hubspot_poller(collector)
        key = record_key("hs/contacts", (("cdp_id", "person-1"),))
        proxy.losing = True  # HubSpot creates the contact; the connector never learns its id
        await world.profiles({"person-1": {"traits.email": "ada@example.com", "traits.first_name": "Ada"}})
        record = await world.eventually(lambda: _queued(world, key, proxy))
        assert record["crm_id"] is None
        await proxy.refuse_writes()
        contact = hubspot.find("contacts", "cdp_id", "person-1")
        assert await poller.poll() == 0  # created holding the CDP id: the connector's own

        # A sales rep's edit is news; the email and first name the CDP sent are not the CRM's traits.
        hubspot.clock.advance(5)
        hubspot.user_update("contacts", contact["id"], {"lastname": "King"})
        assert await poller.poll() == 1
        assert collector.names() == ["CRM Contact Updated"] and collector.events(kind="identify") == []

        proxy.refusing = False
        await world.eventually(lambda: _synced(world, key, "firstname", "Ada"))
        assert (await _record(world, key))["crm_id"] == contact["id"]
        hubspot.clock.advance(5)
        assert await poller.poll() == 0
        assert len(hubspot.records("contacts")) == 1
        await world.stop()


# --- Salesforce ---------------------------------------------------------------------------------------


def _salesforce_poller(world, emulator, collector) -> Poller:
    (connection,) = world.connections
    adapter = SalesforceAdapter(
        world.session, client_id=emulator.client_id, client_secret=emulator.client_secret, login_url=emulator.base_url
    )
    reader = SalesforceReader(connection, adapter, SharedBudget(world.store, connection))
    return Poller(world.store, connection, reader, collector.client(world.session), objects=("Contact",))


async def _salesforce_world(world_factory, emulator, proxy):
    world = await world_factory(emulator)
    fields = {
        "Email": "traits.email",
        "FirstName": "traits.first_name",
        "LastName": {"source": "traits.last_name", "default": "(unknown)"},
    }
    document = salesforce_contacts(emulator, fields)
    document["connections"][0]["url"] = proxy.url
    env = {"SF_ID": emulator.client_id, "SF_SECRET": emulator.client_secret}
    await world.start(document, env=env, retry_for=1.0)
    return world


async def test_salesforce_a_write_whose_answer_was_lost_is_not_read_back_as_a_users_edit(world_factory, collector):
    async with SalesforceEmulator() as sf, LosingProxy(sf.base_url) as proxy:
        world = await _salesforce_world(world_factory, sf, proxy)
        poller = _salesforce_poller(world, sf, collector)
        key = record_key("sf/contacts", (("CDP_Id__c", "person-1"),))
        await world.profiles({"person-1": {"traits.email": "ada@example.com", "traits.last_name": "Lovelace"}})
        await world.eventually(lambda: _synced(world, key, "LastName", "Lovelace"))
        contact = sf.find("Contact", "CDP_Id__c", "person-1")
        assert await poller.poll() == 0

        proxy.losing = True
        sf.clock.advance(1)
        await world.profiles({"person-1": {"traits.first_name": "Ada", "traits.last_name": "King"}})
        record = await world.eventually(lambda: _queued(world, key, proxy))
        assert record["fields"]["LastName"] == "Lovelace" and "FirstName" not in record["fields"]
        landed = sf.find("Contact", "CDP_Id__c", "person-1")
        assert (landed["FirstName"], landed["LastName"]) == ("Ada", "King")

        assert await poller.poll() == 0
        assert collector.names() == [] and collector.events(kind="identify") == []

        proxy.losing = False
        await world.eventually(lambda: _synced(world, key, "LastName", "King"))
        sf.clock.advance(1)
        assert await poller.poll() == 0
        assert collector.names() == []
        (only,) = sf.records("Contact")
        assert only["Id"] == contact["Id"] and (only["FirstName"], only["LastName"]) == ("Ada", "King")
        await world.stop()


async def test_salesforce_a_users_edit_while_a_write_is_queued_is_still_news(world_factory, collector):
    async with SalesforceEmulator() as sf, LosingProxy(sf.base_url) as proxy:
        world = await _salesforce_world(world_factory, sf, proxy)
        poller = _salesforce_poller(world, sf, collector)
        key = record_key("sf/contacts", (("CDP_Id__c", "person-1"),))
        await world.profiles({"person-1": {"traits.email": "ada@example.com", "traits.last_name": "Lovelace"}})
        await world.eventually(lambda: _synced(world, key, "LastName", "Lovelace"))
        contact = sf.find("Contact", "CDP_Id__c", "person-1")
        assert await poller.poll() == 0

        proxy.losing = True
        sf.clock.advance(1)
        await world.profiles({"person-1": {"traits.last_name": "King"}})
        await world.eventually(lambda: _queued(world, key, proxy))
        await proxy.refuse_writes()  # the CRM down for writes: the retries do not overwrite the user's edit

        # A user writes a last name other than the one the CDP sent, and a first name the CDP never wrote.
        sf.clock.advance(1)
        sf.user_update("Contact", contact["Id"], {"LastName": "Byron", "FirstName": "Ada"})
        assert await poller.poll() == 2
        assert collector.names() == ["CRM Contact Updated"]
        (identify,) = collector.events(kind="identify")
        assert identify["traits"] == {"first_name": "Ada", "last_name": "Byron"}
        await world.stop()


def test_the_values_sent_without_an_answer_stay_few_per_field_and_a_repeat_is_kept_once():
    # A CRM that keeps losing answers while the profile changes: the record document does not grow
    # without end (the latest values sent are the ones the CRM may hold).
    doc: dict[str, Any] = {}
    for name in ("Ada", "Augusta", "Ada", "Grace", "Eve", "Zoe"):
        doc = {**doc, **unconfirmed(doc, {"firstname": name, "email": "ada@example.com"})}
    assert SENT_KEPT == 4 and doc["sent"] == {"firstname": ["Ada", "Grace", "Eve", "Zoe"], "email": ["ada@example.com"]}
    assert unconfirmed({}) == {}  # nothing sent: nothing kept
