"""privacy.deleted: the person's HubSpot contact keeps no personal data the CDP put there, the connector
forgets the person, and the erasure is recorded - once, even when the message comes again."""

from __future__ import annotations

import asyncio

from cdp.privacy.v1 import privacy_pb2
from cdp_crm.privacy import Privacy, consumer_spec
from cdp_crm.state import PERSONS, PRIVACY, RECORDS
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_kit.bus import OutMessage, privacy_stream, subjects


async def test_a_deleted_person_is_anonymised_in_hubspot_and_the_erasure_recorded(world_factory):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.bus.ensure_streams(privacy_stream())
        await world.start()
        await world.profiles({"person-1": {"traits.email": "ada@example.com", "traits.first_name": "Ada"}})
        await world.profiles({"person-2": {"traits.email": "bo@example.com", "traits.first_name": "Bo"}})
        await world.eventually(lambda: len(emulator.records("contacts")) == 2)

        privacy = Privacy(
            world.store,
            world.logic.mappings,
            world.logic.deliverer,
            settled=world.logic.settled,
            partitions=world.partitions,
        )
        runner = world.bus.consumer(consumer_spec(), privacy.handle)
        task = asyncio.create_task(runner.run())
        try:
            request = privacy_pb2.PrivacyDeleted(request_id="req-1", person_id="person-1")
            for _ in range(2):  # delivered twice (a republished request): done once
                await world.bus.publisher.publish_batch(
                    [OutMessage(subjects.PRIVACY_DELETED, request.SerializeToString(), "req-1-again-" + str(_))]
                )
            await world.eventually(lambda: world.store.get(PRIVACY, "req-1"))
        finally:
            task.cancel()
        erased = emulator.find("contacts", "cdp_id", "person-1")["properties"]
        assert not erased.get("email") and not erased.get("firstname")
        kept = emulator.find("contacts", "cdp_id", "person-2")["properties"]
        assert kept["email"] == "bo@example.com"  # nobody else touched
        done = (await world.store.get(PRIVACY, "req-1")).doc
        assert done["connections"] == {"hs": {"anonymised": 1, "removed": 0}}
        assert await world.store.find(RECORDS, "person_id", "person-1") == []
        assert await world.store.get(PERSONS, "person-1") is None
        assert len(emulator.records("contacts")) == 2  # anonymised, not duplicated
