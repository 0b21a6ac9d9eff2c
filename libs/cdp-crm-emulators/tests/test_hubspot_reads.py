"""The reads customers' own scripts make with hubspot-api-client (unchanged, host pointed at the emulator)
and the connector does not: the object list page (``get_page`` / ``get_all``) and the properties read."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
from hubspot import HubSpot
from hubspot.crm.contacts.exceptions import ApiException
from hubspot.crm.properties.exceptions import ApiException as PropertiesApiException

from cdp_crm_emulators.hubspot import PAGE_LIMIT, HubSpotEmulator

TOKEN = "pat-local-hubspot"


def _client(emulator: HubSpotEmulator) -> HubSpot:
    return HubSpot(access_token=TOKEN, host=emulator.base_url)


def _contacts(hs: HubSpotEmulator, n: int) -> list[str]:
    """n contacts as a user makes them, their ids in creation order."""
    return [
        hs.user_create("contacts", {"email": f"p{i}@example.com", "firstname": f"P{i}", "city": "Lyon"})["id"]
        for i in range(n)
    ]


async def _get(emulator: HubSpotEmulator, path: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.get(emulator.base_url + path, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            return r.status, orjson.loads(await r.read())


async def test_get_all_pages_through_250_contacts_each_once():
    async with HubSpotEmulator() as hs:
        ids = _contacts(hs, 250)
        before = hs.budget()["daily_used"]
        everyone = await asyncio.to_thread(_client(hs).crm.contacts.get_all, properties=["email", "firstname"])
        assert [c.id for c in everyone] == ids
        assert everyone[7].properties["email"] == "p7@example.com"
        assert everyone[7].properties["firstname"] == "P7"
        # get_all asks for 100 a page: three pages, each counted against the limits like any request
        assert hs.budget()["daily_used"] - before == 3
        assert [
            (r.method, r.path.startswith("/crm/v3/objects/contacts?"), r.status) for r in list(hs.requests)[-3:]
        ] == [("GET", True, 200)] * 3


async def test_get_page_keeps_to_its_limit_and_goes_on_from_after():
    async with HubSpotEmulator() as hs:
        ids = _contacts(hs, 25)
        basic = _client(hs).crm.contacts.basic_api
        first = await asyncio.to_thread(basic.get_page)
        assert [c.id for c in first.results] == ids[:10]  # 10 when no limit is asked
        # without properties asked, the object's defaults: email yes, city no
        assert first.results[0].properties["email"] == "p0@example.com"
        assert "city" not in first.results[0].properties
        assert first.paging.next.link.startswith(hs.base_url + "/crm/v3/objects/contacts?")
        second = await asyncio.to_thread(basic.get_page, limit=10, after=first.paging.next.after)
        assert [c.id for c in second.results] == ids[10:20]
        # a record archived between pages neither repeats nor skips another: the cursor is not a position
        hs.objects["contacts"].pop(ids[0])
        third = await asyncio.to_thread(basic.get_page, limit=10, after=second.paging.next.after, properties=["city"])
        assert [c.id for c in third.results] == ids[20:]
        assert third.paging is None
        assert third.results[0].properties["city"] == "Lyon"
        with pytest.raises(ApiException) as refused:
            await asyncio.to_thread(basic.get_page, limit=PAGE_LIMIT + 1)
        assert refused.value.status == 400
        assert orjson.loads(refused.value.body)["category"] == "VALIDATION_ERROR"
        assert (await asyncio.to_thread(basic.get_page, archived=True)).results == []


async def test_a_list_page_counts_against_the_burst_limit():
    async with HubSpotEmulator(burst_limit=2, burst_window=60) as hs:
        basic = _client(hs).crm.contacts.basic_api
        await asyncio.to_thread(basic.get_page)
        await asyncio.to_thread(_client(hs).crm.properties.core_api.get_all, "contacts")
        status, body = await _get(hs, "/crm/v3/objects/contacts")
        assert (status, body["policyName"]) == (429, "TEN_SECONDLY_ROLLING")


async def test_properties_get_all_lists_the_properties_the_portal_knows():
    async with HubSpotEmulator() as hs:
        core = _client(hs).crm.properties.core_api
        listed = {p.name: p for p in (await asyncio.to_thread(core.get_all, "contacts")).results}
        assert {"email", "firstname", "cdp_id", "cdp_segments", "hs_object_id"} <= set(listed)
        assert listed["email"].has_unique_value is True
        assert (listed["cdp_segments"].type, listed["cdp_segments"].field_type) == ("enumeration", "checkbox")
        assert (listed["createdate"].type, listed["hs_object_id"].type) == ("datetime", "number")
        # by type id too, and every property it lists is one a write may set
        by_type = await asyncio.to_thread(core.get_all, "0-2")
        assert {p.name for p in by_type.results} >= {"domain", "name"}
        assert all(p.group_name for p in by_type.results)


async def test_an_unknown_object_type_answers_hubspots_error_body():
    async with HubSpotEmulator() as hs:
        client = _client(hs)
        with pytest.raises(PropertiesApiException) as unknown:
            await asyncio.to_thread(client.crm.properties.core_api.get_all, "widgets")
        assert unknown.value.status == 404
        body = orjson.loads(unknown.value.body)
        assert (body["status"], body["category"]) == ("error", "OBJECT_NOT_FOUND")
        assert body["message"] == "Unable to infer object type from: widgets" and body["correlationId"]
        status, body = await _get(hs, "/crm/v3/objects/widgets?limit=5")
        assert (status, body["category"]) == (404, "OBJECT_NOT_FOUND")


async def test_get_by_id_returns_every_property_the_client_asks_for():
    # the client repeats the parameter (properties=email&properties=city): each one counts, not only the first
    async with HubSpotEmulator() as hs:
        (record_id,) = _contacts(hs, 1)
        basic = _client(hs).crm.contacts.basic_api
        one = await asyncio.to_thread(basic.get_by_id, record_id, properties=["email", "city"])
        assert (one.properties["email"], one.properties["city"]) == ("p0@example.com", "Lyon")
        status, body = await _get(hs, f"/crm/v3/objects/contacts/{record_id}?properties=email,city")
        assert (status, body["properties"]["city"]) == (200, "Lyon")


async def test_lists_search_finds_lists_by_name_page_by_page_with_their_sizes():
    from hubspot.crm.lists import ListCreateRequest, ListSearchRequest

    async with HubSpotEmulator(search_per_second=1) as hs:
        lists = _client(hs).crm.lists
        made = []
        for name in ("High value", "high churn", "Newsletter"):
            request = ListCreateRequest(name=name, object_type_id="0-1", processing_type="MANUAL")
            made.append((await asyncio.to_thread(lists.lists_api.create, request)).list.list_id)
        (member,) = _contacts(hs, 1)
        await asyncio.to_thread(lists.memberships_api.add, made[0], [member])
        first = await asyncio.to_thread(lists.lists_api.do_search, ListSearchRequest(query="HIGH", count=1))
        assert (first.total, first.has_more, first.offset) == (2, True, 1)
        assert [(found.list_id, found.name) for found in first.lists] == [(made[0], "High value")]
        assert first.lists[0].additional_properties["hs_list_size"] == "1"
        # a lists search is not a CRM objects search: the per-second search limit does not hold it back
        second = await asyncio.to_thread(lists.lists_api.do_search, ListSearchRequest(query="high", offset=1))
        assert ([found.list_id for found in second.lists], second.has_more) == ([made[1]], False)
        status, _ = await _get(hs, "/crm/v3/lists/" + made[2])
        assert status == 200
