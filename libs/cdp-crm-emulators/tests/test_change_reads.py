"""The read side each CRM's inbound sync relies on: Salesforce opportunities and campaign engagement through
simple-salesforce's query_all, Dataverse change tracking paged with a deltaLink only on the last page, Zoho
listings sorted by Modified_Time and continued with page tokens, HubSpot deals with derived close flags."""

from __future__ import annotations

import asyncio

import aiohttp
import requests
from simple_salesforce import Salesforce

from cdp_crm_emulators.dynamics import API, DynamicsEmulator
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_crm_emulators.salesforce import SalesforceEmulator
from cdp_crm_emulators.zoho import ZohoEmulator


def _client(sf: SalesforceEmulator) -> Salesforce:
    session = requests.Session()
    session.verify = sf.ca_file
    session.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would override `verify`
    return Salesforce(instance_url=sf.base_url, session_id="00DDp0000000001!local-session", session=session)


async def dv_call(dv: DynamicsEmulator, method: str, path: str, headers: dict | None = None):
    async with aiohttp.ClientSession() as session:
        form = {
            "grant_type": "client_credentials",
            "client_id": "local-dynamics-client",
            "client_secret": "local-dynamics-secret",
            "scope": f"{dv.base_url}/.default",
        }
        async with session.post(f"{dv.base_url}/{dv.tenant}/oauth2/v2.0/token", data=form) as r:
            token = (await r.json())["access_token"]
        h = {"Authorization": f"Bearer {token}", **(headers or {})}
        async with session.request(method, f"{dv.base_url}{API}/{path}", headers=h) as r:
            return r.status, r.headers.copy(), await r.json()


async def zoho_call(zoho: ZohoEmulator, method: str, path: str, params: dict, headers: dict | None = None):
    refresh = {
        "grant_type": "refresh_token",
        "client_id": "1000.LOCALZOHOCLIENT",
        "client_secret": "local-zoho-secret",
        "refresh_token": "1000.local-refresh-token",
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{zoho.base_url}/oauth/v2/token", params=refresh) as r:
            token = (await r.json())["access_token"]
        h = {"Authorization": f"Zoho-oauthtoken {token}", **(headers or {})}
        async with session.request(method, zoho.base_url + path, headers=h, params=params) as r:
            return r.status, (await r.json() if r.status == 200 else None)


async def test_salesforce_opportunity_stages_and_campaign_responses_are_queryable_since_a_modstamp():
    async with SalesforceEmulator(tls=True) as sf:
        contact = sf.user_create("Contact", {"LastName": "Lovelace", "Email": "ada@example.com"})
        deal = sf.user_create(
            "Opportunity",
            {"Name": "Renewal", "StageName": "Prospecting", "CloseDate": "2027-01-31", "ContactId": contact["Id"]},
        )
        campaign = sf.user_create("Campaign", {"Name": "Spring"})
        member = sf.user_create("CampaignMember", {"CampaignId": campaign["Id"], "ContactId": contact["Id"]})
        cursor = max(r["SystemModstamp"] for r in [*sf.records("Opportunity"), *sf.records("CampaignMember")])
        sf.clock.advance(2)
        sf.user_update("Opportunity", deal["Id"], {"StageName": "Closed Won"})
        sf.user_update("CampaignMember", member["Id"], {"Status": "Responded"})
        since = cursor.replace("+0000", "Z")
        won = await asyncio.to_thread(
            _client(sf).query_all,
            f"SELECT Id, StageName, IsClosed, IsWon, ContactId, SystemModstamp FROM Opportunity "
            f"WHERE SystemModstamp > {since} ORDER BY SystemModstamp, Id",
        )
        (row,) = won["records"]
        assert (row["StageName"], row["IsClosed"], row["IsWon"], row["ContactId"]) == (
            "Closed Won",
            True,
            True,
            contact["Id"],
        )
        responded = await asyncio.to_thread(
            _client(sf).query_all,
            f"SELECT Id, Status, HasResponded FROM CampaignMember WHERE SystemModstamp > {since}",
        )
        assert [(r["Status"], r["HasResponded"]) for r in responded["records"]] == [("Responded", True)]


async def test_dataverse_change_tracking_pages_and_puts_the_delta_link_on_the_last_page_only():
    async with DynamicsEmulator() as dv:
        for i in range(5):
            dv.user_create("opportunities", {"name": f"Deal {i}", "stepname": "1-Qualify"})
        prefer = {"Prefer": "odata.track-changes,odata.maxpagesize=2"}
        _, _, first = await dv_call(dv, "GET", "opportunities?$select=name,stepname,statecode", headers=prefer)
        assert len(first["value"]) == 2 and "@odata.deltaLink" not in first
        dv.user_create("opportunities", {"name": "Made while paging", "stepname": "1-Qualify"})
        pages, page = [first], first
        while "@odata.nextLink" in page:
            _, _, page = await dv_call(dv, "GET", page["@odata.nextLink"].split(API + "/", 1)[1], headers=prefer)
            pages.append(page)
        assert [len(p["value"]) for p in pages] == [2, 2, 1]  # the snapshot taken at the first page
        delta = pages[-1]["@odata.deltaLink"].split(API + "/", 1)[1]
        won = dv.find("opportunities", "name", "Deal 0")["opportunityid"]
        dv.user_update("opportunities", won, {"statecode": 1, "stepname": "3-Close"})
        _, _, changes = await dv_call(dv, "GET", delta, headers=prefer)
        names = [(c["name"], c["statecode"]) for c in changes["value"]]
        # The record created while paging is in the next delta: nothing made during a read is lost.
        assert names == [("Made while paging", 0), ("Deal 0", 1)] and "@odata.deltaLink" in changes


async def test_zoho_listing_sorted_by_modified_time_continues_with_a_page_token():
    async with ZohoEmulator() as zoho:
        for i in range(5):
            zoho.user_create("Deals", {"Deal_Name": f"Deal {i}", "Stage": "Qualification"})
            zoho.clock.advance(1)
        first_id = zoho.records("Deals")[0]["id"]
        zoho.user_update("Deals", first_id, {"Stage": "Closed Won"})  # now the latest
        params = {"fields": "Deal_Name,Stage,Modified_Time", "sort_by": "Modified_Time", "sort_order": "asc"}
        status, page = await zoho_call(zoho, "GET", "/crm/v8/Deals", params={**params, "per_page": "3"})
        assert status == 200 and page["info"]["more_records"] is True
        names = [r["Deal_Name"] for r in page["data"]]
        status, rest = await zoho_call(
            zoho, "GET", "/crm/v8/Deals", params={**params, "page_token": page["info"]["next_page_token"]}
        )
        names += [r["Deal_Name"] for r in rest["data"]]
        assert names == ["Deal 1", "Deal 2", "Deal 3", "Deal 4", "Deal 0"] and rest["info"]["more_records"] is False
        since = {"If-Modified-Since": page["data"][-1]["Modified_Time"]}
        _, changed = await zoho_call(zoho, "GET", "/crm/v8/Deals", params=params, headers=since)
        assert [r["Deal_Name"] for r in changed["data"]] == ["Deal 4", "Deal 0"]
        _, picked = await zoho_call(zoho, "GET", "/crm/v8/Deals", params={"fields": "Stage", "ids": first_id})
        assert picked["data"] == [{"id": first_id, "Stage": "Closed Won"}]


async def test_hubspot_deals_carry_their_stage_and_close_flags():
    async with HubSpotEmulator() as hubspot:
        deal = hubspot.user_create("deals", {"dealname": "Renewal", "dealstage": "appointmentscheduled"})
        assert deal["properties"]["hs_is_closed"] == "false"
        won = hubspot.user_update("deals", deal["id"], {"dealstage": "closedwon"})
        assert (won["properties"]["hs_is_closed"], won["properties"]["hs_is_closed_won"]) == ("true", "true")


async def test_a_write_committed_late_is_found_late_behind_later_ones_in_salesforce_and_zoho():
    async with SalesforceEmulator(tls=True) as sf, ZohoEmulator() as zoho:
        ada = sf.user_create("Contact", {"LastName": "Lovelace"})
        start = ada["SystemModstamp"].replace("+0000", "Z")
        sf.clock.advance(1)
        late = sf.user_create("Case", {"Subject": "Refund", "ContactId": ada["Id"]}, commit_after=30)
        sf.clock.advance(1)
        soon = sf.user_create("Case", {"Subject": "Cannot log in", "ContactId": ada["Id"]})
        soql = f"SELECT Id, SystemModstamp FROM Case WHERE SystemModstamp >= {start} ORDER BY SystemModstamp, Id"
        found = await asyncio.to_thread(_client(sf).query_all, soql)
        assert [r["Id"] for r in found["records"]] == [soon["Id"]]
        sf.clock.advance(30)  # committed: found before the later one, by its stamp
        found = await asyncio.to_thread(_client(sf).query_all, soql)
        assert [r["Id"] for r in found["records"]] == [late["Id"], soon["Id"]]

        deal = zoho.user_create("Deals", {"Deal_Name": "Renewal", "Stage": "Qualification"})
        zoho.clock.advance(1)
        zoho.user_update("Deals", deal["id"], {"Stage": "Closed Won"}, commit_after=30)
        params = {"fields": "Stage,Modified_Time", "sort_by": "Modified_Time", "sort_order": "asc"}
        _, listed = await zoho_call(zoho, "GET", "/crm/v8/Deals", params=params)
        assert [r["Stage"] for r in listed["data"]] == ["Qualification"]  # as it was before the write
        zoho.clock.advance(30)
        _, listed = await zoho_call(zoho, "GET", "/crm/v8/Deals", params=params)
        assert [r["Stage"] for r in listed["data"]] == ["Closed Won"]
