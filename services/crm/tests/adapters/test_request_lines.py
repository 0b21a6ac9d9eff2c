"""A mapping matched on the person's email: the email is in no request line the CRM sees (its access logs and
any proxy keep those), for writes, list or campaign membership and privacy deletes - Dynamics 365 reads the
rows by a GET inside a ``$batch`` body, Zoho by a COQL query in a POST body. Real HTTP against the local
Dataverse and Zoho."""

from __future__ import annotations

import urllib.parse

import aiohttp
import pytest

from cdp_crm.adapters.dynamics import DynamicsAdapter
from cdp_crm.adapters.salesforce import SalesforceAdapter
from cdp_crm.adapters.zoho import ZohoAdapter
from cdp_crm.domain.coalesce import DELETE, REMOVE, UPSERT, Change
from cdp_crm.domain.mapping import parse_connections
from cdp_crm_emulators.dynamics import DynamicsEmulator
from cdp_crm_emulators.salesforce import SalesforceEmulator
from cdp_crm_emulators.zoho import ZohoEmulator


def _dynamics(emulator, session):
    adapter = DynamicsAdapter(
        session,
        url=emulator.base_url,
        authority=emulator.base_url,
        tenant_id=emulator.tenant,
        client_id=emulator.client_id,
        client_secret=emulator.client_secret,
        timeout=5.0,
    )
    listed = emulator.user_create("lists", {"listname": "High value", "membertype": 2, "type": False})
    return adapter, listed["listid"], ("contacts", "emailaddress1", "lastname", "contactid")


def _zoho(emulator, session):
    adapter = ZohoAdapter(
        session,
        client_id=emulator.client_id,
        client_secret=emulator.client_secret,
        refresh_token="1000.local-refresh-token",
        accounts_url=emulator.base_url,
        timeout=5.0,
    )
    campaign = emulator.user_create("Campaigns", {"Campaign_Name": "High value"})
    return adapter, campaign["id"], ("Contacts", "Email", "Last_Name", "id")


CREDENTIALS = {
    "dynamics": {"tenant_id": "T", "client_id": "C", "client_secret": "S"},
    "zoho": {"client_id": "C", "client_secret": "S", "refresh_token": "R"},
}
CRMS = {"dynamics": (DynamicsEmulator, _dynamics), "zoho": (ZohoEmulator, _zoho)}


def _mappings(kind: str, obj: str, email: str, last_name: str, list_id: str):
    document = {
        "connections": [
            {
                "id": "crm", "kind": kind, "url": "https://crm.example.com",
                "credentials": CREDENTIALS[kind],
                "mappings": [
                    {"id": "contacts", "object": obj, "match": {email: "traits.email"},
                     "fields": {last_name: "traits.last_name"}},
                    {"id": "vip", "object": obj, "segment": "vip", "list": list_id, "mode": "mirror",
                     "match": {email: "traits.email"}},
                ],
            }
        ]
    }  # fmt: skip
    (connection,) = parse_connections(document)
    return connection.mapping("contacts"), connection.mapping("vip")


@pytest.mark.parametrize("crm", sorted(CRMS))
async def test_an_email_match_key_travels_in_no_request_line(crm):
    emulator_class, setup = CRMS[crm]
    async with emulator_class() as emulator, aiohttp.ClientSession() as session:
        adapter, list_id, (obj, email, last_name, id_field) = setup(emulator, session)
        contacts, vip = _mappings(crm, obj, email, last_name, list_id)
        emails = [f"ada{i}@example.com" for i in range(3)]

        def change(mapping, address, op=UPSERT, fields=None):
            return Change(mapping.name, ((email, address),), fields or {}, op=op, person_id=address)

        written = await adapter.send(contacts, [change(contacts, a, fields={last_name: "L"}) for a in emails])
        assert written.error is None and all(r.ok for r in written.results.values())
        ids = {r[email]: r[id_field] for r in emulator.records(obj)}

        entered = await adapter.send(vip, [change(vip, emails[0]), change(vip, emails[1])])
        assert entered.error is None and all(r.ok for r in entered.results.values())
        left = await adapter.send(vip, [change(vip, emails[1], REMOVE), change(vip, "nobody@example.com", REMOVE)])
        assert left.error is None and all(r.ok for r in left.results.values())
        members = emulator.list_members(list_id) if crm == "dynamics" else emulator.campaign_members(list_id)
        assert members == [ids[emails[0]]]  # found by the email, as before

        deleted = await adapter.send(contacts, [change(contacts, emails[2], DELETE), change(contacts, "x@y.z", DELETE)])
        assert deleted.error is None and all(r.ok for r in deleted.results.values())
        assert sorted(r[email] for r in emulator.records(obj)) == emails[:2]

        lines = " ".join(urllib.parse.unquote_plus(r.path) for r in emulator.requests).lower()
        assert not [a for a in [*emails, "nobody@example.com", "x@y.z"] if a in lines]


async def test_a_salesforce_match_key_holding_an_email_travels_in_no_request_line():
    """The same for Salesforce, whose match key is an external id: one filled from the person's email (here
    CDP_Id__c) was named in a SOQL query string by the delete, campaign-membership and presence lookups; they
    now go in a Composite request's body as the erasure's search does (bec4325), one API call each as before."""
    async with SalesforceEmulator() as emulator, aiohttp.ClientSession() as session:
        adapter = SalesforceAdapter(
            session,
            client_id=emulator.client_id,
            client_secret=emulator.client_secret,
            login_url=emulator.base_url,
            timeout=5.0,
        )
        campaign = emulator.user_create("Campaign", {"Name": "High value", "CDP_Segment_Id__c": "high_value"})["Id"]
        document = {
            "connections": [
                {
                    "id": "sf", "kind": "salesforce",
                    "credentials": {"client_id": "SF_CLIENT_ID", "client_secret": "SF_CLIENT_SECRET"},
                    "mappings": [
                        {"id": "contacts", "object": "Contact", "match": {"CDP_Id__c": "traits.email"},
                         "fields": {"LastName": "traits.last_name"}},
                        {"id": "vip", "object": "Contact", "segment": "high_value", "list": campaign,
                         "mode": "mirror", "match": {"CDP_Id__c": "traits.email"}},
                    ],
                }
            ]
        }  # fmt: skip
        (connection,) = parse_connections(document)
        contacts, vip = connection.mapping("contacts"), connection.mapping("vip")
        emails = [f"ada{i}@example.com" for i in range(3)]

        def change(mapping, address, op=UPSERT, fields=None):
            return Change(mapping.name, (("CDP_Id__c", address),), fields or {}, op=op, person_id=address)

        written = await adapter.send(contacts, [change(contacts, a, fields={"LastName": "L"}) for a in emails])
        assert written.error is None and all(r.ok for r in written.results.values())
        present, _ = await adapter.present(contacts, "CDP_Id__c", [emails[0], "nobody@example.com"])
        assert present == {emails[0]}
        entered = await adapter.send(vip, [change(vip, emails[0]), change(vip, emails[1])])
        assert entered.error is None and all(r.ok for r in entered.results.values())
        left = await adapter.send(vip, [change(vip, emails[1], REMOVE)])
        assert left.error is None and all(r.ok for r in left.results.values())
        assert len(emulator.records("CampaignMember")) == 1
        deleted = await adapter.send(contacts, [change(contacts, emails[2], DELETE), change(contacts, "x@y.z", DELETE)])
        assert deleted.error is None and all(r.ok for r in deleted.results.values())
        assert sorted(r["CDP_Id__c"] for r in emulator.records("Contact")) == emails[:2]

        lines = " ".join(urllib.parse.unquote_plus(r.path) for r in emulator.requests).lower()
        assert not [a for a in [*emails, "nobody@example.com", "x@y.z"] if a in lines]
