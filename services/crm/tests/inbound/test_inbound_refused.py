"""An event the collector refuses as invalid is not lost silently: it is kept in the connection's dead
letters (reason `collector_refused`, the collector's code and the field it names), listed by
`ListDeadLetters` / `cdpctl crm dead-letters`; the valid events of the same post are stored and the
poller goes on past the page."""

from __future__ import annotations

from cdp_crm.api import dead_letter_message
from cdp_crm.inbound.refused import keep_refused
from cdp_crm.runs import Runs
from cdp_crm.state import DEAD_LETTERS
from cdp_crm_emulators.hubspot import HubSpotEmulator

from .test_inbound_hubspot import _poller


async def test_an_event_the_collector_refuses_is_kept_in_the_connections_dead_letters(store, session, collector):
    async with HubSpotEmulator() as hubspot:
        poller = _poller(store, session, hubspot, collector, ("contacts",))
        await poller.poll()
        hubspot.clock.advance(5)
        good = hubspot.user_create("contacts", {"email": "ada@example.com"})
        bad = hubspot.user_create("contacts", {"email": "grace@example.com", "firstname": "Grace"})

        def invalid(event: dict) -> tuple[str, str] | None:
            traits = event.get("traits") or (event.get("properties") or {})
            if "Grace" in str(traits):
                return "invalid_trait", "traits.first_name"
            return None

        collector.invalid = invalid
        await poller.poll()
        letters = [r.doc async for r in store.scan_all(DEAD_LETTERS)]
        assert len(letters) == 1
        (letter,) = letters
        assert (letter["connection"], letter["reason"], letter["crm_code"]) == (
            "hs",
            "collector_refused",
            "invalid_trait",
        )
        assert "traits.first_name" in letter["crm_message"] and bad["id"] in letter["crm_message"]
        assert "Grace" not in str(letter)  # ids and codes, never the record's values
        listed = dead_letter_message(letter)  # what ListDeadLetters answers
        assert (listed.connection_id, listed.mapping_id, listed.reason) == (
            "hs",
            "inbound:contacts",
            "collector_refused",
        )
        stored = [e for e in collector.stored.values() if good["id"] in str(e)]
        assert stored, "the valid event of the same post was stored"
        assert await poller.poll() == 0  # the poller went on past the page: nothing read again


async def test_a_replay_passes_over_an_event_the_collector_refused(world_factory):
    async with HubSpotEmulator() as hubspot:
        world = await world_factory(hubspot)
        await world.start()
        sent = {"msg-1": "1001"}
        refused = [{"messageId": "msg-1", "code": "invalid_trait", "field": "traits.first_name"}]
        assert await keep_refused(world.store, "hs", "contacts", refused, sent, 1.0) == 1
        runs = Runs(world.logic, partitions=world.partitions)
        _, _, replayed = await runs.replay([], "hs")
        assert replayed == 0  # nothing to send to HubSpot: the fix is in the record or the mapping
        assert [r.key async for r in world.store.scan_all(DEAD_LETTERS)] == ["inbound:hs:contacts:1001"]
        assert hubspot.records("contacts") == []
        await world.stop()
