"""Merges as each CRM makes them, read through the vendor's client where the environment has one
(simple-salesforce; msal for Dataverse's token, then its Web API over plain HTTP).

- Salesforce (a user's merge: the UI or the SOAP API's merge()): the master keeps its Id; each loser is
  deleted with MasterRecordId set - found by queryAll only, its Id answering 404 ENTITY_IS_DELETED, and an
  upsert by its external id value making a new record.
- Dataverse (the Merge action): the subordinate is deactivated, `merged` set and `_masterid_value` naming the
  target; both are in the next delta.
- Zoho (Merge Records): the children are deleted for good (not to the recycle bin); the deleted records
  listing names no master."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
import requests
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceResourceNotFound

from cdp_crm_emulators.dynamics import API, DynamicsEmulator
from cdp_crm_emulators.salesforce import SalesforceEmulator
from cdp_crm_emulators.zoho import ZohoEmulator

from .test_dynamics import _call

SESSION = "00DDp0000000001!local-session"


def _client(sf: SalesforceEmulator) -> Salesforce:
    session = requests.Session()
    session.verify = sf.ca_file
    session.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would override `verify`
    return Salesforce(instance_url=sf.base_url, session_id=SESSION, session=session, version="62.0")


async def test_a_salesforce_merge_deletes_the_loser_with_its_master_named_for_query_all():
    async with SalesforceEmulator(tls=True) as sf:  # simple-salesforce speaks https only
        client = _client(sf)
        master = sf.user_create("Contact", {"LastName": "Lovelace", "CDP_Id__c": "p1", "Email": "ada@example.com"})
        loser = sf.user_create("Contact", {"LastName": "Lovelace", "CDP_Id__c": "p2", "Phone": "+44 20 7946 0000"})
        case = sf.user_create("Case", {"Subject": "Refund", "ContactId": loser["Id"]})
        sf.clock.advance(2)
        merged = sf.user_merge("Contact", master["Id"], loser["Id"], take={"Phone": "+44 20 7946 0000"})
        assert (merged["CDP_Id__c"], merged["Phone"]) == ("p1", "+44 20 7946 0000")
        assert merged["SystemModstamp"] > master["SystemModstamp"]

        live = await asyncio.to_thread(client.query, "SELECT Id FROM Contact")
        assert [r["Id"] for r in live["records"]] == [master["Id"]]
        soql = "SELECT Id, MasterRecordId, IsDeleted FROM Contact WHERE IsDeleted = true AND MasterRecordId != null"
        gone = await asyncio.to_thread(client.query, soql, include_deleted=True)
        assert [(r["Id"], r["MasterRecordId"], r["IsDeleted"]) for r in gone["records"]] == [
            (loser["Id"], master["Id"], True)
        ]
        with pytest.raises(SalesforceResourceNotFound) as refused:
            await asyncio.to_thread(client.Contact.get, loser["Id"])
        assert refused.value.content[0]["errorCode"] == "ENTITY_IS_DELETED"
        assert sf.find("Case", "Id", case["Id"])["ContactId"] == master["Id"]  # reparented
        # Upserted by the loser's external id value: a new contact (the loser is in the recycle bin).
        await asyncio.to_thread(client.Contact.upsert, "CDP_Id__c/p2", {"LastName": "Again"})
        assert sf.find("Contact", "CDP_Id__c", "p2")["Id"] not in (master["Id"], loser["Id"])


async def test_a_salesforce_merge_is_refused_for_objects_it_does_not_take():
    async with SalesforceEmulator() as sf:
        a = sf.user_create("Case", {"Subject": "A"})
        b = sf.user_create("Case", {"Subject": "B"})
        with pytest.raises(ValueError):
            sf.user_merge("Case", a["Id"], b["Id"])


async def test_the_dataverse_merge_action_deactivates_the_subordinate_and_names_its_master():
    async with DynamicsEmulator() as dv:
        await _call(dv, "PATCH", "contacts(cdp_id='p1')", {"lastname": "One", "emailaddress1": "one@example.com"})
        await _call(dv, "PATCH", "contacts(cdp_id='p2')", {"lastname": "Two", "jobtitle": "Analyst"})
        target, subordinate = (dv.find("contacts", "cdp_id", p)["contactid"] for p in ("p1", "p2"))
        case = dv.user_create(
            "incidents", {"title": "Refund", "customerid_contact@odata.bind": f"/contacts({subordinate})"}
        )
        _, _, first = await _call(dv, "GET", "contacts", headers={"Prefer": "odata.track-changes"})
        delta = first["@odata.deltaLink"].split(API + "/", 1)[1]
        body = {
            "Target": {"contactid": target, "@odata.type": "Microsoft.Dynamics.CRM.contact"},
            "Subordinate": {"contactid": subordinate, "@odata.type": "Microsoft.Dynamics.CRM.contact"},
            "UpdateContent": {"jobtitle": "Analyst", "@odata.type": "Microsoft.Dynamics.CRM.contact"},
            "PerformParentingChecks": False,
        }
        status, _, _ = await _call(dv, "POST", "Merge", body)
        assert status == 204
        status, _, sub = await _call(dv, "GET", f"contacts({subordinate})")
        assert status == 200
        assert (sub["statecode"], sub["statuscode"], sub["merged"], sub["_masterid_value"]) == (1, 2, True, target)
        _, _, kept = await _call(dv, "GET", "contacts(cdp_id='p1')")
        assert (kept["jobtitle"], kept["merged"], kept["statecode"]) == ("Analyst", False, 0)
        assert dv.find("incidents", "incidentid", case["incidentid"])["_customerid_value"] == target
        _, _, changes = await _call(dv, "GET", delta)
        assert sorted(c["contactid"] for c in changes["value"]) == sorted([target, subordinate])
        status, _, refused = await _call(dv, "POST", "Merge", body)  # merged already
        assert status == 400 and refused["error"]["code"]
        status, _, _ = await _call(dv, "PATCH", f"contacts({subordinate})", {"merged": False})
        assert status == 400  # `merged` is the platform's


async def test_a_zoho_merge_deletes_the_children_and_lists_them_deleted_without_their_master():
    async with ZohoEmulator() as zoho:
        master = zoho.user_create("Contacts", {"Last_Name": "Lovelace", "CDP_Id": "p1", "Email": "ada@example.com"})
        child = zoho.user_create("Contacts", {"Last_Name": "Lovelace", "CDP_Id": "p2", "Phone": "+44 20 7946 0000"})
        case = zoho.user_create("Cases", {"Subject": "Refund", "Related_To": {"id": child["id"]}})
        zoho.clock.advance(2)
        body = {"merge": [{"data": [{"id": child["id"], "_fields": [{"api_name": "Phone"}]}]}]}
        status, merged = await _zoho(zoho, "POST", f"/crm/v8/Contacts/{master['id']}/actions/merge", body)
        assert status == 200 and merged["merge"][0]["code"] == "SUCCESS"
        kept = zoho.find("Contacts", "id", master["id"])
        assert (kept["CDP_Id"], kept["Phone"]) == ("p1", "+44 20 7946 0000")
        assert kept["Modified_Time"] > master["Modified_Time"]
        assert zoho.find("Cases", "id", case["id"])["Related_To"]["id"] == master["id"]
        status, _ = await _zoho(zoho, "GET", f"/crm/v8/Contacts/{child['id']}")
        assert status == 204
        status, deleted = await _zoho(zoho, "GET", "/crm/v8/Contacts/deleted?type=permanent")
        (gone,) = deleted["data"]
        assert (gone["id"], gone["type"]) == (child["id"], "permanent")  # a merge's child is not recoverable
        status, _ = await _zoho(zoho, "GET", "/crm/v8/Contacts/deleted?type=recycle")
        assert status == 204
        assert master["id"] not in orjson.dumps(gone).decode()  # nothing names the master
        status, refused = await _zoho(zoho, "POST", f"/crm/v8/Contacts/{master['id']}/actions/merge", body)
        assert status == 400 and refused["code"] == "INVALID_DATA"  # the child is gone


async def _zoho(zoho, method, path, body=None):
    async with aiohttp.ClientSession() as session:
        form = {"grant_type": "refresh_token", "client_id": zoho.client_id, "client_secret": zoho.client_secret,
                "refresh_token": "1000.local-refresh-token"}  # fmt: skip
        async with session.post(f"{zoho.base_url}/oauth/v2/token", params=form) as r:
            token = (await r.json())["access_token"]
        headers = {"Authorization": f"Zoho-oauthtoken {token}"}
        async with session.request(method, zoho.base_url + path, json=body, headers=headers) as r:
            raw = await r.read()
            return r.status, (orjson.loads(raw) if raw else None)
