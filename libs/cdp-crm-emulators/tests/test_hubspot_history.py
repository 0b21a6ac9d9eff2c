"""Property history, as HubSpot's batch read gives it with ``propertiesWithHistory``: each value a property
took, newest first, with its time and source (a user's edit in the UI, an integration's write), read with
hubspot-api-client unchanged; at most 50 inputs a request, as HubSpot allows."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
from hubspot import HubSpot
from hubspot.crm.contacts import BatchReadInputSimplePublicObjectId, SimplePublicObjectId

from cdp_crm_emulators.hubspot import HubSpotEmulator

TOKEN = "pat-local-hubspot"


async def test_a_batch_read_gives_each_propertys_values_newest_first_with_time_and_source():
    async with HubSpotEmulator() as hs:
        # The emulator's clock is wall time plus the advances: the wall time that can pass between the two
        # stamps is bounded by what passed from before the first write to after the second (measured from
        # after the first, as it was, a fresh-clone run saw 4 ms more than the 0.07 ms measured).
        began = time.monotonic()
        made = hs.user_create("contacts", {"email": "ada@example.com", "phone": "+44 20 0000"})
        hs.clock.advance(5)
        hs.user_update("contacts", made["id"], {"phone": "+44 20 1111"})
        passed = time.monotonic() - began
        hs.clock.advance(5)
        hs.user_update("contacts", made["id"], {"company": "Analytical Engines"})
        client = HubSpot(access_token=TOKEN, host=hs.base_url)
        asked = BatchReadInputSimplePublicObjectId(
            inputs=[SimplePublicObjectId(id=made["id"])], properties=["phone"], properties_with_history=["phone"]
        )
        answer = await asyncio.to_thread(client.crm.contacts.batch_api.read, asked)
        (record,) = answer.results
        newest, first = record.properties_with_history["phone"]
        assert (newest.value, first.value) == ("+44 20 1111", "+44 20 0000")
        assert newest.source_type == "CRM_UI"
        # Each value at its own write's time: 5 s of advance apart, and the wall time that passed between the
        # two writes (stamps are whole milliseconds, cut: one more can show).
        assert 5 <= (newest.timestamp - first.timestamp).total_seconds() <= 5 + passed + 0.001
        # The record's stamp moved with the later edit of another property; the phone's own time did not.
        modified = hs.find("contacts", "hs_object_id", made["id"])["properties"]["lastmodifieddate"]
        assert newest.timestamp.isoformat().replace("+00:00", "") < modified.rstrip("Z")


async def test_an_integrations_write_is_marked_as_one():
    async with HubSpotEmulator() as hs:
        made = hs.user_create("contacts", {"email": "ada@example.com"})
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession() as session:
            url = f"{hs.base_url}/crm/v3/objects/contacts/{made['id']}"
            async with session.patch(url, json={"properties": {"firstname": "Ada"}}, headers=headers) as r:
                assert r.status == 200
            read = {"inputs": [{"id": made["id"]}], "propertiesWithHistory": ["firstname", "email"]}
            async with session.post(
                f"{hs.base_url}/crm/v3/objects/contacts/batch/read", json=read, headers=headers
            ) as r:
                (record,) = orjson.loads(await r.read())["results"]
        history = record["propertiesWithHistory"]
        assert [e["sourceType"] for e in history["firstname"]] == ["INTEGRATION"]
        assert [e["sourceType"] for e in history["email"]] == ["CRM_UI"]


async def test_more_than_50_inputs_with_history_are_refused_as_hubspot_refuses_them():
    async with HubSpotEmulator() as hs:
        ids = [hs.user_create("contacts", {"email": f"p{i}@example.com"})["id"] for i in range(51)]
        headers = {"Authorization": f"Bearer {TOKEN}"}
        url = f"{hs.base_url}/crm/v3/objects/contacts/batch/read"
        async with aiohttp.ClientSession() as session:
            body = {"inputs": [{"id": i} for i in ids], "propertiesWithHistory": ["email"]}
            async with session.post(url, json=body, headers=headers) as r:
                refused = (r.status, orjson.loads(await r.read()))
            body = {"inputs": [{"id": i} for i in ids[:50]], "propertiesWithHistory": ["email"]}
            async with session.post(url, json=body, headers=headers) as r:
                assert r.status == 200 and len(orjson.loads(await r.read())["results"]) == 50
            body = {"inputs": [{"id": i} for i in ids], "properties": ["email"]}  # no history: 100 allowed
            async with session.post(url, json=body, headers=headers) as r:
                assert r.status == 200
        assert refused[0] == 400 and refused[1]["category"] == "VALIDATION_ERROR"
        assert "property histories is 50" in refused[1]["message"]
