"""HubSpot contacts and deals in the feedback loop, against the local HubSpot over HTTP: a contact's edited
properties and email consent reach the profile as traits and consent with HubSpot as the source, a deal's
stage changes and its win become events on the person, and a signed contact.propertyChange webhook
makes the poller read at once."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.mapping import parse_connections
from cdp_crm.inbound import HubSpotPoller, HubSpotWebhooks
from cdp_crm.inbound.hubspot import PAGE
from cdp_crm.state import RECORDS
from cdp_crm_emulators.hubspot import HubSpotEmulator

TOKEN = "pat-local-hubspot"


def _poller(store, session, emulator, collector, objects) -> HubSpotPoller:
    document = {"connections": [{
        "id": "hs", "kind": "hubspot", "account": "62515", "url": emulator.base_url,
        "credentials": {"token": "HUBSPOT_TOKEN"},
        "mappings": [{"id": "contacts", "object": "contacts", "match": {"cdp_id": "person.id"},
                      "fields": {"email": "traits.email", "firstname": {"source": "traits.first_name",
                                                                         "transform": "trim"},
                                 "cdp_consent_email": "consent.purpose:email",
                                 "cdp_churn_risk": {"source": "scores.churn_risk", "transform": "round:2"}}}],
    }]}  # fmt: skip
    (connection,) = parse_connections(document)
    return HubSpotPoller(
        store, connection, session, TOKEN, SharedBudget(store, connection), collector.client(session), objects=objects
    )


async def test_a_contact_edit_and_consent_in_hubspot_reach_the_profile_with_hubspot_as_source(
    store, session, collector
):
    async with HubSpotEmulator() as hubspot:
        ada = hubspot.user_create("contacts", {"email": "ada@example.com", "cdp_id": "person-1"})
        poller = _poller(store, session, hubspot, collector, ("contacts",))
        await poller.poll()
        hubspot.clock.advance(5)
        hubspot.user_update("contacts", ada["id"], {"firstname": "Ada"})
        await poller.poll()
        hubspot.clock.advance(5)
        hubspot.user_update("contacts", ada["id"], {"cdp_consent_email": "false"})  # consent alone
        await poller.poll()
        hubspot.clock.advance(5)
        hubspot.user_update("contacts", ada["id"], {"cdp_churn_risk": "0.42"})  # what the connector wrote
        assert await poller.poll() == 0

        # The contact the connector created (it holds the CDP id) is not news; the user's two edits are.
        assert collector.names() == ["CRM Contact Updated", "CRM Contact Updated"]
        named, latest = sorted(collector.events(kind="identify"), key=lambda e: e["timestamp"])
        assert named["traits"] == {"first_name": "Ada"}
        # The consent edit carries the consent alone: the first name is as read at the edit before.
        assert latest["traits"] == {} and latest["context"]["traits"] == {"email": "ada@example.com"}
        assert latest["context"]["consent"] == {"categoryPreferences": {"email": False}}
        assert latest["context"]["source"] == {"crm": "hubspot", "connection": "hs"}
        assert latest["anonymousId"] == f"hubspot:62515:{ada['id']}" and "userId" not in latest
        updated = collector.events("CRM Contact Updated")[0]
        assert updated["properties"]["cdp_person_id"] == "person-1"
        assert updated["properties"]["firstname"] == "Ada"


async def test_a_deal_moved_and_won_in_hubspot_becomes_events_on_the_person(store, session, collector):
    async with HubSpotEmulator() as hubspot:
        ada = hubspot.user_create("contacts", {"email": "ada@example.com", "cdp_id": "person-1"})
        body = {
            "properties": {"dealname": "Renewal", "dealstage": "appointmentscheduled"},
            "associations": [{"to": {"id": ada["id"]}, "types": [{"associationCategory": "HUBSPOT_DEFINED",
                                                                  "associationTypeId": 3}]}],
        }  # fmt: skip
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with session.post(f"{hubspot.base_url}/crm/v3/objects/deals", json=body, headers=headers) as r:
            deal = await r.json()
        poller = _poller(store, session, hubspot, collector, ("deals",))
        await poller.poll()
        hubspot.clock.advance(5)
        hubspot.user_update("deals", deal["id"], {"dealstage": "contractsent"})
        await poller.poll()
        hubspot.clock.advance(5)
        hubspot.user_update("deals", deal["id"], {"amount": "1200"})
        await poller.poll()
        hubspot.clock.advance(5)
        hubspot.user_update("deals", deal["id"], {"dealstage": "closedwon"})
        await poller.poll()

        assert collector.names() == ["CRM Deal Created", "CRM Deal Stage Changed", "CRM Deal Updated", "CRM Deal Won"]
        for event in collector.events():
            assert event["anonymousId"] == f"hubspot:62515:{ada['id']}"
            assert event["context"]["traits"] == {"email": "ada@example.com"}
            assert event["properties"]["crm_id"] == deal["id"] and event["properties"]["cdp_person_id"] == "person-1"
        (won,) = collector.events("CRM Deal Won")
        assert won["properties"]["previous_stage"] == "contractsent" and won["properties"]["amount"] == "1200"


async def test_a_signed_contact_property_change_webhook_reads_the_contact_at_once(store, session, collector):
    hubspot = HubSpotEmulator(client_secret="app-secret")
    await hubspot.start()
    runner = None
    try:
        ada = hubspot.user_create("contacts", {"email": "ada@example.com"})
        poller = _poller(store, session, hubspot, collector, ("deals", "contacts"))  # a full read: deals first
        await poller.poll()
        hooks = HubSpotWebhooks({"hs": (poller, "app-secret")})
        runner = web.AppRunner(hooks.app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        hubspot.webhook_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/webhooks/hubspot/hs"

        def deal_searches() -> int:
            return sum(1 for r in hubspot.requests if r.path == "/crm/v3/objects/deals/search")

        before = deal_searches()
        reader = asyncio.create_task(poller.run(3600.0, owned=lambda: False))  # only the webhook can wake it
        try:
            hubspot.clock.advance(5)
            hubspot.user_update("contacts", ada["id"], {"firstname": "Ada"})  # contact.propertyChange, signed
            await hubspot.drain_webhooks()
            deadline = time.monotonic() + 10
            while "CRM Contact Updated" not in collector.names():
                assert time.monotonic() < deadline, "the webhook did not make the poller read"
                await asyncio.sleep(0.05)
            # Only what the notification named was read: no deal search spent on a contact's change.
            assert deal_searches() == before

        finally:
            reader.cancel()
    finally:
        if runner is not None:
            await runner.cleanup()
        await hubspot.close()


def _contacts_poller(world, collector) -> HubSpotPoller:
    """A poller of the world's HubSpot connection's contacts, beside the outbound engine writing them."""
    (connection,) = world.connections
    return HubSpotPoller(
        world.store, connection, world.session, TOKEN, SharedBudget(world.store, connection),
        collector.client(world.session), objects=("contacts",),
    )  # fmt: skip


async def test_the_connectors_own_writes_to_a_contact_do_not_come_back_as_news(world_factory, collector):
    async with HubSpotEmulator() as hubspot:
        world = await world_factory(hubspot)
        await world.start()
        poller = _contacts_poller(world, collector)
        # The CDP creates Ada's contact, then changes her first name there: both are the CDP's own writes.
        await world.profiles({"person-1": {"traits.email": "ada@example.com", "traits.first_name": "Ada"}})
        contact = await world.eventually(lambda: hubspot.find("contacts", "cdp_id", "person-1"))
        assert await poller.poll() == 0
        hubspot.clock.advance(5)
        await world.profiles({"person-1": {"traits.first_name": "Augusta", "scores.churn_risk": 0.9}})
        await world.eventually(
            lambda: hubspot.find("contacts", "cdp_id", "person-1")["properties"]["firstname"] == "Augusta"
        )
        assert await poller.poll() == 0
        # A sales rep's edit is news; the traits the CDP wrote are not sent back to it as the CRM's.
        hubspot.clock.advance(5)
        hubspot.user_update("contacts", contact["id"], {"lastname": "King"})  # reported, not a mapped trait
        assert await poller.poll() == 1
        assert collector.names() == ["CRM Contact Updated"] and collector.events(kind="identify") == []
        hubspot.clock.advance(5)
        hubspot.user_update("contacts", contact["id"], {"firstname": "Ada"})  # a mapped trait
        assert await poller.poll() == 2
        (identify,) = collector.events(kind="identify")
        assert identify["traits"] == {"first_name": "Ada"}
        await world.stop()


async def test_a_poller_killed_between_search_pages_neither_loses_nor_repeats_a_change(store, session, collector):
    async with HubSpotEmulator() as hubspot:
        for i in range(2 * PAGE + 50):  # three search pages
            hubspot.user_create("contacts", {"email": f"p{i}@example.com", "firstname": f"P{i}"})
            if i % 40 == 39:
                hubspot.clock.advance(1)
        await collector.kill_mid_page(_poller(store, session, hubspot, collector, ("contacts",)).poll, 1)
        assert len(collector.events()) == PAGE
        await _poller(store, session, hubspot, collector, ("contacts",)).poll()
        created = collector.events("CRM Contact Created")
        assert len(created) == 2 * PAGE + 50 and len({e["properties"]["crm_id"] for e in created}) == 2 * PAGE + 50
        assert collector.duplicates == 0
        assert await _poller(store, session, hubspot, collector, ("contacts",)).poll() == 0


async def test_a_contact_the_connector_erased_for_a_deleted_person_never_comes_back_as_news(world_factory, collector):
    from cdp.privacy.v1 import privacy_pb2
    from cdp_crm.privacy import Privacy, consumer_spec
    from cdp_crm.state import PRIVACY
    from cdp_kit.bus import OutMessage, privacy_stream, subjects

    async with HubSpotEmulator() as hubspot:
        world = await world_factory(hubspot)
        await world.bus.ensure_streams(privacy_stream())
        await world.start()
        poller = _contacts_poller(world, collector)
        await world.profiles({"person-1": {"traits.email": "ada@example.com", "traits.first_name": "Ada"}})
        contact = await world.eventually(lambda: hubspot.find("contacts", "cdp_id", "person-1"))
        assert await poller.poll() == 0
        privacy = Privacy(
            world.store, world.logic.mappings, world.logic.deliverer, settled=world.logic.settled,
            partitions=world.partitions,
        )  # fmt: skip
        task = asyncio.create_task(world.bus.consumer(consumer_spec(), privacy.handle).run())
        try:
            request = privacy_pb2.PrivacyDeleted(request_id="req-1", person_id="person-1")
            await world.bus.publisher.publish_batch(
                [OutMessage(subjects.PRIVACY_DELETED, request.SerializeToString(), "req-1")]
            )
            await world.eventually(lambda: world.store.get(PRIVACY, "req-1"))
        finally:
            task.cancel()
        # The anonymisation is the connector's own write: no event (an identify would bring the deleted
        # person back as a profile keyed by the contact), nor for a later edit of the erased record.
        hubspot.clock.advance(5)
        assert await poller.poll() == 0
        hubspot.clock.advance(5)
        hubspot.user_update("contacts", contact["id"], {"lastname": "King"})
        assert await poller.poll() == 0
        assert collector.names() == []
        await world.stop()


async def test_a_contact_the_connector_created_and_wrote_again_before_the_first_read_is_not_news(
    world_factory, collector
):
    async with HubSpotEmulator() as hubspot:
        world = await world_factory(hubspot)
        await world.start()
        poller = _contacts_poller(world, collector)
        await world.profiles({"person-1": {"traits.email": "ada@example.com", "traits.first_name": "Ada"}})
        contact = await world.eventually(lambda: hubspot.find("contacts", "cdp_id", "person-1"))
        hubspot.clock.advance(5)
        await world.profiles({"person-1": {"traits.first_name": "Augusta"}})
        await world.eventually(
            lambda: hubspot.find("contacts", "cdp_id", "person-1")["properties"]["firstname"] == "Augusta"
        )
        # First read: created, then written again, by the connector alone.
        assert await poller.poll() == 0
        hubspot.clock.advance(5)
        hubspot.user_update("contacts", contact["id"], {"lastname": "King"})
        assert await poller.poll() >= 1  # a sales rep's edit still is news
        assert "CRM Contact Updated" in collector.names()
        await world.stop()


async def test_a_ticket_about_an_erased_contact_never_brings_the_deleted_person_back(world_factory, collector):
    """A record linked to a contact the connector erased - a support ticket an agent keeps working on, the
    task a journey opened (anonymised by the erasure: that is a change too) - was posted as news with the
    contact's anonymous id and the deleted person's CDP id (the anonymised contact keeps it): identity made
    a new person of it, holding the deleted person's id (seen under make up: 'CRM Task Updated' right
    after `cdpctl delete --wait`). Such a change is no news once the contact is erased."""
    from cdp.privacy.v1 import privacy_pb2
    from cdp_crm.privacy import Privacy, consumer_spec
    from cdp_crm.state import PRIVACY
    from cdp_kit.bus import OutMessage, privacy_stream, subjects

    async with HubSpotEmulator() as hubspot:
        world = await world_factory(hubspot)
        await world.bus.ensure_streams(privacy_stream())
        await world.start()
        (connection,) = world.connections
        poller = HubSpotPoller(
            world.store, connection, world.session, TOKEN, SharedBudget(world.store, connection),
            collector.client(world.session), objects=("contacts", "tickets"),
        )  # fmt: skip
        await world.profiles({"person-1": {"traits.email": "ada@example.com", "traits.first_name": "Ada"}})
        contact = await world.eventually(lambda: hubspot.find("contacts", "cdp_id", "person-1"))
        await poller.poll()
        hubspot.clock.advance(5)
        ticket = hubspot.user_create("tickets", {"subject": "Refund please", "hs_pipeline_stage": "1"})
        hubspot._link("tickets", ticket["id"], "contacts", contact["id"], [])
        await poller.poll()
        assert collector.names() == ["CRM Ticket Opened"]  # before the erasure: news about Ada

        privacy = Privacy(
            world.store, world.logic.mappings, world.logic.deliverer, settled=world.logic.settled,
            partitions=world.partitions,
        )  # fmt: skip
        task = asyncio.create_task(world.bus.consumer(consumer_spec(), privacy.handle).run())
        try:
            request = privacy_pb2.PrivacyDeleted(request_id="req-t", person_id="person-1")
            await world.bus.publisher.publish_batch(
                [OutMessage(subjects.PRIVACY_DELETED, request.SerializeToString(), "req-t")]
            )
            await world.eventually(lambda: world.store.get(PRIVACY, "req-t"))
        finally:
            task.cancel()
        hubspot.clock.advance(5)
        hubspot.user_update("tickets", ticket["id"], {"hs_pipeline_stage": "4"})  # the agent closes it
        await poller.poll()
        assert collector.names() == ["CRM Ticket Opened"]
        await world.stop()


async def test_a_contact_read_before_the_connectors_record_of_it_is_not_reported_edited_later(
    store, session, collector
):
    # Found by the soak: the poller read a contact the connector had just created (197 ms after) before the
    # connector's record of that write was committed, so its memo held the raw values; the next read
    # counted those fields as the connector's, the memos differed, and the connector's own later score
    # write came in as a "CRM Contact Updated" from a CRM user.
    async with HubSpotEmulator() as hubspot:
        ada = hubspot.user_create("contacts", {"email": "ada@example.com", "firstname": "Ada", "cdp_id": "person-1"})
        poller = _poller(store, session, hubspot, collector, ("contacts",))
        assert await poller.poll() == 0
        await store.put(RECORDS, "record-1", {
            "connection": "hs", "mapping": "contacts", "object": "contacts", "person_id": "person-1",
            "fields": {"email": "ada@example.com", "firstname": "Ada"}, "state": "synced", "crm_id": ada["id"],
        })  # fmt: skip
        hubspot.clock.advance(5)
        hubspot.user_update("contacts", ada["id"], {"cdp_churn_risk": "0.42"})  # the connector's score write
        assert await poller.poll() == 0, collector.names()
        hubspot.clock.advance(5)
        hubspot.user_update("contacts", ada["id"], {"firstname": "Adele"})  # a CRM user's edit is still news
        await poller.poll()
        assert collector.names() == ["CRM Contact Updated"]
        assert collector.events("CRM Contact Updated")[0]["properties"]["firstname"] == "Adele"
