"""An event the collector refused is kept as a dead letter naming the CRM record it was read from
(`inbound:<connection>:<object>:<crm id>`, reason `collector_refused`). Those of a person's records are
listed in their export and erased with their privacy deletion; another person's stay."""

from __future__ import annotations

import asyncio

from cdp.privacy.v1 import privacy_pb2
from cdp_crm.export import export_person
from cdp_crm.inbound.refused import keep_refused
from cdp_crm.privacy import Privacy, consumer_spec
from cdp_crm.state import DEAD_LETTERS, PRIVACY, RECORDS
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_kit.bus import OutMessage, privacy_stream, subjects


async def test_refused_event_letters_of_a_persons_records_are_exported_and_erased_with_them(world_factory):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.bus.ensure_streams(privacy_stream())
        await world.start()
        await world.profiles({"person-1": {"traits.email": "ada@example.com"}, "person-2": {"traits.email": "b@x.io"}})

        async def synced(person: str):
            found = await world.store.find(RECORDS, "person_id", person)
            return found[0].doc["crm_id"] if found and found[0].doc.get("crm_id") else None

        ada = await world.eventually(lambda: synced("person-1"))
        bo = await world.eventually(lambda: synced("person-2"))
        # The collector refused an event read from each contact.
        refused = [
            {"messageId": "m-ada", "code": "invalid_trait", "field": "traits.first_name"},
            {"messageId": "m-bo", "code": "invalid_trait", "field": "traits.first_name"},
        ]
        assert await keep_refused(world.store, "hs", "contacts", refused, {"m-ada": ada, "m-bo": bo}, 1.0) == 2

        (connection,) = parse_export(await export_person(world.store, [], "person-1"))
        (row,) = connection["records"]
        letter = row["inbound_dead_letter"]
        assert (letter["reason"], letter["crm_code"]) == ("collector_refused", "invalid_trait")
        assert letter["record"] == f"inbound:hs:contacts:{ada}"

        privacy = Privacy(
            world.store, world.logic.mappings, world.logic.deliverer, settled=world.logic.settled,
            partitions=world.partitions,
        )  # fmt: skip
        runner = world.bus.consumer(consumer_spec(), privacy.handle)
        task = asyncio.create_task(runner.run())
        try:
            request = privacy_pb2.PrivacyDeleted(request_id="req-refused", person_id="person-1")
            await world.bus.publisher.publish_batch(
                [OutMessage(subjects.PRIVACY_DELETED, request.SerializeToString(), "req-refused")]
            )
            await world.eventually(lambda: world.store.get(PRIVACY, "req-refused"))
        finally:
            task.cancel()
        letters = sorted([r.key async for r in world.store.scan_all(DEAD_LETTERS)])
        assert letters == [f"inbound:hs:contacts:{bo}"]  # the other person's letter stays
        (connection,) = parse_export(await export_person(world.store, [], "person-1"))
        assert "inbound_dead_letter" not in connection["records"][0]


def parse_export(document: dict) -> list[dict]:
    return document["connections"]
