"""The outbound sync as a user relies on it: profile changes, segments and orchestration's actions reach
the local HubSpot through the connector's engine on a real nats-server - once each, latest values,
never over the CRM's limit, and surviving a crash mid-sync."""

from __future__ import annotations

from cdp_crm.state import DEAD_LETTERS, RECORDS
from cdp_crm_emulators.hubspot import HubSpotEmulator


async def test_a_churn_signal_upserts_the_persons_hubspot_contact_once(world_factory):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start()
        await world.profiles({"person-1": {"traits.email": "ada@example.com", "traits.first_name": "Ada"}})
        await world.eventually(lambda: emulator.find("contacts", "cdp_id", "person-1"))
        requests_before = len(emulator.requests)
        await world.profiles({"person-1": {"scores.churn_risk": 0.8712}})

        def churn_written():
            record = emulator.find("contacts", "cdp_id", "person-1")
            return record is not None and record["properties"].get("cdp_churn_risk") == "0.87"

        await world.eventually(churn_written)
        # A change to nothing mapped, and the same score again: no call at all.
        await world.profiles({"person-1": {"traits.plan": "pro", "scores.churn_risk": 0.8712}})
        await world.profiles({"person-2": {"traits.first_name": "Bo"}})
        await world.eventually(lambda: emulator.find("contacts", "cdp_id", "person-2"))
        contacts = [r for r in emulator.records("contacts") if r["properties"]["cdp_id"] == "person-1"]
        assert len(contacts) == 1
        assert contacts[0]["properties"]["email"] == "ada@example.com"
        upserts = [r for r in list(emulator.requests)[requests_before:] if r.path.endswith("/batch/upsert")]
        assert len(upserts) == 2  # the score, then person-2: the unchanged change made no call
        statuses = [r.doc async for r in world.store.scan_all(RECORDS)]
        assert {s["state"] for s in statuses} == {"synced"}
        assert await world.store.count(DEAD_LETTERS) == 0
