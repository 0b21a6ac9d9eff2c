"""HubSpot holds one contact per email and refuses a write that would make a second (409 ``CONFLICT``, the
whole batch): the person whose email a sales rep's contact already holds is dead-lettered `duplicate` with
HubSpot's code - replayable once the two are sorted out - and the other persons of the batch are written.
The local HubSpot refuses it as HubSpot does (libs/cdp-crm-emulators)."""

from __future__ import annotations

from cdp_crm.domain.coalesce import record_key
from cdp_crm.state import DEAD_LETTERS
from cdp_crm_emulators.hubspot import HubSpotEmulator


async def test_a_person_whose_email_another_contact_holds_is_a_duplicate_dead_letter(world_factory):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start()
        rep_made = emulator.user_create("contacts", {"email": "ada@example.com", "firstname": "Ada"})
        await world.profiles(
            {
                "person-1": {"traits.email": "grace@example.com"},
                "person-2": {"traits.email": "ada@example.com"},
                "person-3": {"traits.email": "eve@example.com"},
            }
        )

        async def letter():
            found = await world.store.get(DEAD_LETTERS, record_key("hs/contacts", (("cdp_id", "person-2"),)))
            return None if found is None else found.doc

        dead = await world.eventually(letter)
        assert (dead["reason"], dead["crm_code"], dead["http_status"]) == ("duplicate", "CONFLICT", 409)
        await world.eventually(
            lambda: emulator.find("contacts", "cdp_id", "person-1") and emulator.find("contacts", "cdp_id", "person-3")
        )
        emails = sorted(c["properties"]["email"] for c in emulator.records("contacts"))
        assert emails == ["ada@example.com", "eve@example.com", "grace@example.com"]
        assert emulator.find("contacts", "email", "ada@example.com")["id"] == rep_made["id"]
