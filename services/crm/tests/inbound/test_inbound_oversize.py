"""A CRM record holding more than an event may carry - a support agent pasting a long email thread into a
ticket's subject, a contact field full of emoji - against a collector enforcing Segment's limits (32 KB an
event, 500 KB a request): its change still becomes an event (long properties cut, marked in
`properties.truncated`; a trait too long to keep is left out of the identify rather than cut), and the
records after it, of the same object and of the others, still come in. Before, one such ticket made
every poll of the connection fail with the collector's 413 for ever: no ticket, task, contact or deal
after it was read again."""

from __future__ import annotations

import orjson
import pytest

from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.mapping import parse_connections
from cdp_crm.inbound import CrmReadFailed, HubSpotPoller
from cdp_crm.inbound.sizes import EVENT_BYTES
from cdp_crm_emulators.hubspot import HubSpotEmulator

TOKEN = "pat-local-hubspot"
HUGE = "\U0001f600" * 60_000  # 240 KB of UTF-8 in one property


def _poller(store, session, emulator, collector) -> HubSpotPoller:
    document = {"connections": [{
        "id": "hs", "kind": "hubspot", "account": "62515", "url": emulator.base_url,
        "credentials": {"token": "HUBSPOT_TOKEN"},
        "mappings": [{"id": "contacts", "object": "contacts", "match": {"cdp_id": "person.id"},
                      "fields": {"email": "traits.email", "firstname": "traits.first_name",
                                 "lastname": "traits.last_name"}}],
    }]}  # fmt: skip
    (connection,) = parse_connections(document)
    return HubSpotPoller(store, connection, session, TOKEN, SharedBudget(store, connection), collector.client(session))


async def test_a_record_too_large_for_an_event_is_cut_to_fit_and_blocks_nothing_after_it(store, session, collector):
    async with HubSpotEmulator() as hubspot:
        poller = _poller(store, session, hubspot, collector)
        await poller.poll()  # the cursors start now
        hubspot.clock.advance(5)
        big = hubspot.user_create(
            "tickets",
            {"subject": HUGE, "hs_ticket_category": HUGE, "hs_ticket_priority": "HIGH", "hs_pipeline_stage": "1"},
        )
        hubspot.clock.advance(1)
        after = hubspot.user_create("tickets", {"subject": "printer on fire", "hs_pipeline_stage": "1"})
        hubspot.clock.advance(1)
        ada = hubspot.user_create("contacts", {"email": "ada@example.com", "firstname": HUGE, "lastname": "Lovelace"})
        hubspot.clock.advance(1)
        await poller.poll()

        opened = {e["properties"]["crm_id"]: e for e in collector.events("CRM Ticket Opened")}
        assert set(opened) == {big["id"], after["id"]}
        cut = opened[big["id"]]["properties"]
        assert sorted(cut["truncated"]) == ["hs_ticket_category", "subject"]
        assert cut["subject"].startswith("\U0001f600") and cut["hs_ticket_priority"] == "HIGH"
        assert opened[after["id"]]["properties"]["subject"] == "printer on fire"
        assert "truncated" not in opened[after["id"]]["properties"]

        (created,) = collector.events("CRM Contact Created")
        assert created["properties"]["crm_id"] == ada["id"] and created["properties"]["truncated"] == ["firstname"]
        (identify,) = collector.events(kind="identify")
        # A trait is the person's value: one cut short would be a wrong value in the profile, so it is left out.
        assert identify["traits"] == {"email": "ada@example.com", "last_name": "Lovelace"}
        for event in collector.stored.values():
            assert len(orjson.dumps(event)) <= EVENT_BYTES


async def test_an_object_the_crm_refuses_to_read_does_not_stop_the_others(store, session, collector):
    # A private app without the tickets scope (HubSpot answers 403 MISSING_SCOPES to every tickets search):
    # before, the poll stopped at tickets, the first object, and no contact, task or deal was read again.
    async with HubSpotEmulator() as hubspot:
        poller = _poller(store, session, hubspot, collector)
        await poller.poll()
        search = poller.reader._search

        async def refused(obj, *rest):
            if obj == "tickets":
                raise CrmReadFailed("hubspot search tickets answered 403")
            return await search(obj, *rest)

        poller.reader._search = refused
        hubspot.clock.advance(5)
        hubspot.user_create("tickets", {"subject": "unreadable", "hs_pipeline_stage": "1"})
        ada = hubspot.user_create("contacts", {"email": "ada@example.com", "lastname": "Lovelace"})
        hubspot.clock.advance(1)
        with pytest.raises(CrmReadFailed):  # still said: the run loop logs it, and reads tickets again next turn
            await poller.poll()
        assert [e["properties"]["crm_id"] for e in collector.events("CRM Contact Created")] == [ada["id"]]
        assert collector.events("CRM Ticket Opened") == []

        poller.reader._search = search  # the scope granted: the ticket comes in from its cursor
        await poller.poll()
        assert [e["properties"]["subject"] for e in collector.events("CRM Ticket Opened")] == ["unreadable"]
