"""Two of HubSpot's behaviours a change reader must live with, driven through hubspot-api-client (unchanged,
host pointed at the emulator): a write the search index takes late (`index_late`), found by a search only
once it is indexed while a read by id sees it at once; and a contact merged away in the UI (`user_merge`),
whose retired id answers the survivor - a GET or a batch read by it returns the surviving contact under its
own id - while a search no longer finds it, and whose ``contact.merge`` webhook names both ids."""

from __future__ import annotations

import asyncio

from aiohttp import web
from hubspot import HubSpot
from hubspot.crm.contacts import BatchReadInputSimplePublicObjectId, PublicObjectSearchRequest

from cdp_crm_emulators.hubspot import HubSpotEmulator

TOKEN = "pat-local-hubspot"


def _client(emulator: HubSpotEmulator) -> HubSpot:
    return HubSpot(access_token=TOKEN, host=emulator.base_url)


def _modified_since(stamp: str) -> PublicObjectSearchRequest:
    return PublicObjectSearchRequest(
        filter_groups=[{"filters": [{"propertyName": "lastmodifieddate", "operator": "GTE", "value": stamp}]}],
        sorts=[{"propertyName": "lastmodifieddate", "direction": "ASCENDING"}],
        properties=["email", "firstname", "lastmodifieddate"],
        limit=100,
    )


async def test_a_write_indexed_late_is_searched_out_only_once_indexed_while_a_read_by_id_sees_it():
    async with HubSpotEmulator() as hs:
        client = _client(hs)
        ada = hs.user_create("contacts", {"email": "ada@example.com", "firstname": "Ada"})
        since = ada["properties"]["lastmodifieddate"]
        hs.clock.advance(1)
        hs.index_late(8)
        hs.user_update("contacts", ada["id"], {"firstname": "Augusta"})  # stamped now, indexed in 8 s
        late_stamp = hs.find("contacts", "email", "ada@example.com")["properties"]["lastmodifieddate"]
        hs.clock.advance(1)
        bob = hs.user_create("contacts", {"email": "bob@example.com"})  # later, indexed at once
        hs.index_late(8)
        cy = hs.user_create("contacts", {"email": "cy@example.com"})  # new and late: not found at all yet

        found = await asyncio.to_thread(client.crm.contacts.search_api.do_search, _modified_since(since))
        # The index still holds Ada as she was before the edit; Bob, written after her, is there already.
        assert [(r.id, r.properties["firstname"]) for r in found.results] == [(ada["id"], "Ada"), (bob["id"], None)]
        read = await asyncio.to_thread(client.crm.contacts.basic_api.get_by_id, ada["id"], properties=["firstname"])
        assert read.properties["firstname"] == "Augusta"

        hs.clock.advance(8)
        found = await asyncio.to_thread(client.crm.contacts.search_api.do_search, _modified_since(since))
        # Indexed now: Ada's edit sorts before Bob by its stamp, which a reader's cursor had passed.
        assert [r.id for r in found.results] == [ada["id"], bob["id"], cy["id"]]
        assert (
            found.results[0].properties["lastmodifieddate"]
            == late_stamp
            < found.results[1].properties["lastmodifieddate"]
        )
        assert found.results[0].properties["firstname"] == "Augusta"


async def test_a_contact_merged_away_answers_the_survivor_by_its_old_id_and_its_webhook_names_both():
    received: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        received.extend(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hubspot", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hubspot"
    try:
        # merge_new_ids=False: the primary keeps its id (HubSpot's merge before its changelog "Updated merge
        # functionality for contacts and companies", and still its merge of deals and tickets).
        async with HubSpotEmulator(webhook_url=url, merge_new_ids=False) as hs:
            client = _client(hs)
            ada = hs.user_create("contacts", {"email": "ada@example.com", "firstname": "Ada", "cdp_id": "p-1"})
            other = hs.user_create("contacts", {"email": "ada@work.example", "phone": "+4412", "cdp_id": "p-2"})
            survivor = hs.user_merge("contacts", ada["id"], other["id"])
            await hs.drain_webhooks()

            assert survivor["id"] == ada["id"]
            assert survivor["properties"]["hs_merged_object_ids"] == other["id"]
            # The primary keeps its own unique values: the other's cdp_id and email are gone.
            assert survivor["properties"]["cdp_id"] == "p-1" and survivor["properties"]["phone"] == "+4412"
            by_old = await asyncio.to_thread(
                client.crm.contacts.basic_api.get_by_id, other["id"], properties=["email", "hs_merged_object_ids"]
            )
            assert (by_old.id, by_old.properties["email"]) == (ada["id"], "ada@example.com")
            assert by_old.properties["hs_merged_object_ids"] == other["id"]
            batch = BatchReadInputSimplePublicObjectId(properties=["email"], inputs=[{"id": other["id"]}])
            read = await asyncio.to_thread(client.crm.contacts.batch_api.read, batch)
            assert [r.id for r in read.results] == [ada["id"]]
            found = await asyncio.to_thread(
                client.crm.contacts.search_api.do_search, _modified_since("1970-01-01T00:00:00.000Z")
            )
            assert [r.id for r in found.results] == [ada["id"]]
            # Merged once more, into a third contact: the first retired id follows to the last survivor.
            third = hs.user_create("contacts", {"email": "augusta@example.com"})
            hs.user_merge("contacts", third["id"], ada["id"])
            by_first = await asyncio.to_thread(client.crm.contacts.basic_api.get_by_id, other["id"])
            assert by_first.id == third["id"]
            assert hs.find("contacts", "email", "augusta@example.com")["properties"]["hs_merged_object_ids"] == (
                f"{ada['id']};{other['id']}"
            )
            await hs.drain_webhooks()
    finally:
        await runner.cleanup()
    merges = [e for e in received if e["subscriptionType"] == "contact.merge"]
    assert [(e["objectId"], e["primaryObjectId"], e["mergedObjectIds"], e["newObjectId"]) for e in merges] == [
        (int(ada["id"]), int(ada["id"]), [int(other["id"])], int(ada["id"])),
        (int(third["id"]), int(third["id"]), [int(ada["id"])], int(third["id"])),
    ]


async def test_a_merge_makes_a_new_contact_and_retires_both_ids_by_default():
    async with HubSpotEmulator() as hs:  # HubSpot's merge of contacts today
        client = _client(hs)
        ada = hs.user_create("contacts", {"email": "ada@example.com", "firstname": "Ada", "cdp_id": "p-1"})
        other = hs.user_create("contacts", {"email": "ada@work.example", "phone": "+4412", "cdp_id": "p-2"})
        survivor = hs.user_merge("contacts", ada["id"], other["id"])
        assert survivor["id"] not in (ada["id"], other["id"])
        assert survivor["properties"]["hs_merged_object_ids"] == f"{ada['id']};{other['id']}"
        props = survivor["properties"]
        assert (props["email"], props["cdp_id"], props["phone"]) == ("ada@example.com", "p-1", "+4412")
        for old in (ada["id"], other["id"]):
            read = await asyncio.to_thread(client.crm.contacts.basic_api.get_by_id, old)
            assert read.id == survivor["id"]
        assert [c["id"] for c in hs.records("contacts")] == [survivor["id"]]
        assert hs.find("contacts", "email", "ada@example.com")["id"] == survivor["id"]
        assert hs.find("contacts", "cdp_id", "p-2") is None
