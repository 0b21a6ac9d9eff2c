"""`python -m cdp_crm` reads every connection's changes, not HubSpot's alone: with a Salesforce, a Dynamics and a
Zoho connection and a collector URL, a case opened in each local CRM reaches the collector as an event on
the contact."""

from __future__ import annotations

import asyncio
import json
import time

from cdp_crm_emulators.dynamics import DynamicsEmulator
from cdp_crm_emulators.salesforce import SalesforceEmulator
from cdp_crm_emulators.zoho import ZohoEmulator
from cdp_testing.processes import ServiceProcess


def _document(sf: str, dv: str, zoho: str) -> dict:
    def contacts(obj: str, match: dict, email: str) -> list[dict]:
        return [{"id": "contacts", "object": obj, "match": match, "fields": {email: "traits.email"}}]

    return {"connections": [
        {"id": "sf", "kind": "salesforce", "account": "org-sf", "url": sf,
         "credentials": {"client_id": "SF_ID", "client_secret": "SF_SECRET"},
         "mappings": contacts("Contact", {"CDP_Id__c": "person.id"}, "Email")},
        {"id": "dyn", "kind": "dynamics", "account": "org-dyn", "url": dv, "auth_url": dv,
         "credentials": {"tenant_id": "DV_TENANT", "client_id": "DV_ID", "client_secret": "DV_SECRET"},
         "mappings": contacts("contacts", {"cdp_id": "person.id"}, "emailaddress1")},
        {"id": "zoho", "kind": "zoho", "account": "org-z", "url": zoho,
         "credentials": {"client_id": "Z_ID", "client_secret": "Z_SECRET", "refresh_token": "Z_REFRESH"},
         "mappings": contacts("Contacts", {"CDP_Id": "person.id"}, "Email")},
    ]}  # fmt: skip


async def test_the_process_posts_each_crms_cases_to_the_collector(nats_server, tmp_path, collector):
    async with SalesforceEmulator() as sf, DynamicsEmulator() as dv, ZohoEmulator() as zoho:
        connections = tmp_path / "connections.json"
        connections.write_text(json.dumps(_document(sf.base_url, dv.base_url, zoho.base_url)))
        process = ServiceProcess(
            "crm",
            "cdp_crm",
            tmp_path,
            {
                "CDP_NATS_URL": nats_server.url,
                "CDP_STORE_URL": f"sqlite:///{tmp_path}/crm.db",
                "CDP_PARTITIONS": "2",
                "CDP_CRM_CONNECTIONS_FILE": str(connections),
                "CDP_CRM_COLLECTOR_URL": collector.url,
                "CDP_CRM_COLLECTOR_WRITE_KEY": "crm-key",
                "CDP_CRM_POLL_SECONDS": "0.5",
                "SF_ID": "local-consumer-key",
                "SF_SECRET": "local-consumer-secret",
                "DV_TENANT": dv.tenant,
                "DV_ID": dv.client_id,
                "DV_SECRET": dv.client_secret,
                "Z_ID": zoho.client_id,
                "Z_SECRET": zoho.client_secret,
                "Z_REFRESH": "1000.local-refresh-token",
            },
        )
        ada_sf = sf.user_create("Contact", {"LastName": "Lovelace", "Email": "ada@example.com"})
        sf.user_create("Case", {"Subject": "Refund", "ContactId": ada_sf["Id"]})
        ada_dv = dv.user_create("contacts", {"lastname": "Lovelace", "emailaddress1": "ada@example.com"})
        dv.user_create(
            "incidents", {"title": "Refund", "customerid_contact@odata.bind": f"/contacts({ada_dv['contactid']})"}
        )
        ada_z = zoho.user_create("Contacts", {"Last_Name": "Lovelace", "Email": "ada@example.com"})
        zoho.user_create("Cases", {"Subject": "Refund", "Status": "New", "Case_Origin": "Web",
                                   "Related_To": {"id": ada_z["id"]}})  # fmt: skip
        await asyncio.to_thread(process.start)  # the loop keeps serving the local CRMs meanwhile
        try:
            deadline = time.monotonic() + 30
            while len(collector.events("CRM Case Opened")) < 3:
                read = sorted({e["properties"]["crm"] for e in collector.events()})
                assert time.monotonic() < deadline, f"read from {read}; {process.log_path.read_text()[-3000:]}"
                await asyncio.sleep(0.1)
        finally:
            await asyncio.to_thread(process.stop)
        opened = {e["properties"]["crm"]: e for e in collector.events("CRM Case Opened")}
        assert sorted(opened) == ["dynamics", "salesforce", "zoho"]
        assert all(e["context"]["traits"] == {"email": "ada@example.com"} for e in opened.values())
