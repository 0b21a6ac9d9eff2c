"""What the real APIs refuse, the local ones refuse too, as the vendors' own clients see it: HubSpot will not
hold two contacts with one email (409 ``CONFLICT``, "Contact already exists. Existing ID: <id>") and archives
one contact by ``DELETE /crm/v3/objects/contacts/<id>`` (204); Salesforce refuses a value a restricted picklist
does not list (``INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST``) and its describe lists the values. A sync tested
against a lenient emulator would meet these first in production."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from hubspot.crm.contacts import (
    BatchInputSimplePublicObjectBatchInputUpsert,
    SimplePublicObjectInput,
    SimplePublicObjectInputForCreate,
)
from hubspot.crm.contacts.exceptions import ApiException
from simple_salesforce.exceptions import SalesforceMalformedRequest

from cdp_crm_emulators.hubspot import Conflict, HubSpotEmulator
from cdp_crm_emulators.salesforce import SalesforceEmulator

from .test_hubspot import _client as _hubspot
from .test_hubspot import _post
from .test_salesforce import _client as _salesforce


async def test_hubspot_refuses_a_second_contact_with_one_email_as_hubspot_does():
    async with HubSpotEmulator() as hs:
        client = _hubspot(hs)
        ada = await asyncio.to_thread(
            client.crm.contacts.basic_api.create,
            SimplePublicObjectInputForCreate(properties={"email": "ada@example.com", "cdp_id": "p1"}),
        )

        # A create naming her email.
        with pytest.raises(ApiException) as created:
            await asyncio.to_thread(
                client.crm.contacts.basic_api.create,
                SimplePublicObjectInputForCreate(properties={"email": "ADA@example.com", "firstname": "Eve"}),
            )
        assert created.value.status == 409
        body = orjson.loads(created.value.body)
        assert body["status"] == "error" and body["category"] == "CONFLICT" and body["correlationId"]
        assert body["message"] == f"Contact already exists. Existing ID: {ada.id}"

        # An upsert by another key (the CDP id) giving a second contact her email: the batch is refused whole.
        batch = BatchInputSimplePublicObjectBatchInputUpsert(
            inputs=[
                {"idProperty": "cdp_id", "id": "p2", "properties": {"firstname": "Grace"}},
                {"idProperty": "cdp_id", "id": "p3", "properties": {"email": "ada@example.com"}},
            ]
        )
        with pytest.raises(ApiException) as upserted:
            await asyncio.to_thread(client.crm.contacts.batch_api.upsert, batch)
        assert upserted.value.status == 409
        assert orjson.loads(upserted.value.body)["message"] == f"Contact already exists. Existing ID: {ada.id}"

        # Two inputs of one batch with one email, neither held yet.
        twins = BatchInputSimplePublicObjectBatchInputUpsert(
            inputs=[
                {"idProperty": "cdp_id", "id": "p4", "properties": {"email": "twin@example.com"}},
                {"idProperty": "cdp_id", "id": "p5", "properties": {"email": "twin@example.com"}},
            ]
        )
        with pytest.raises(ApiException) as doubled:
            await asyncio.to_thread(client.crm.contacts.batch_api.upsert, twins)
        assert doubled.value.status == 409

        # An update moving another contact onto her email.
        grace = await asyncio.to_thread(
            client.crm.contacts.basic_api.create,
            SimplePublicObjectInputForCreate(properties={"email": "grace@example.com"}),
        )
        with pytest.raises(ApiException) as updated:
            await asyncio.to_thread(
                client.crm.contacts.basic_api.update,
                grace.id,
                SimplePublicObjectInput(properties={"email": "ada@example.com"}),
            )
        assert updated.value.status == 409
        assert sorted(c["properties"]["email"] for c in hs.records("contacts")) == [
            "ada@example.com",
            "grace@example.com",
        ]

        # Her own upsert by her email, and one carrying her own email again, go through.
        mine = BatchInputSimplePublicObjectBatchInputUpsert(
            inputs=[
                {"idProperty": "cdp_id", "id": "p1", "properties": {"email": "ada@example.com", "firstname": "Ada"}}
            ]
        )
        answer = await asyncio.to_thread(client.crm.contacts.batch_api.upsert, mine)
        assert [r.id for r in answer.results] == [ada.id]


async def test_hubspot_refuses_a_user_making_or_editing_a_contact_onto_an_email_another_holds():
    """A sales rep's contact made or edited in HubSpot's UI (`user_create`, `user_update`, and
    ``POST /_emulator/user/contacts`` from another process) meets the rule the API does: no second contact
    with one email - the API's 409 body, and nothing made or changed."""
    async with HubSpotEmulator() as hs:
        ada = hs.user_create("contacts", {"email": "ada@example.com", "firstname": "Ada"})
        with pytest.raises(Conflict) as made:
            hs.user_create("contacts", {"email": "ADA@example.com", "firstname": "Eve"})
        assert made.value.status == 409 and made.value.existing == ada["id"]
        body = made.value.body
        assert body["status"] == "error" and body["category"] == "CONFLICT" and body["correlationId"]
        assert body["message"] == f"Contact already exists. Existing ID: {ada['id']}"
        assert [c["properties"]["email"] for c in hs.records("contacts")] == ["ada@example.com"]

        grace = hs.user_create("contacts", {"email": "grace@example.com"})
        with pytest.raises(Conflict) as edited:
            hs.user_update("contacts", grace["id"], {"email": "ada@example.com", "firstname": "Grace"})
        assert edited.value.body["message"] == f"Contact already exists. Existing ID: {ada['id']}"
        assert hs.find("contacts", "email", "grace@example.com")["properties"].get("firstname") is None
        # Her own email again, or another field of hers, is no conflict.
        assert hs.user_update("contacts", ada["id"], {"email": "ada@example.com", "lastname": "L"})["id"] == ada["id"]

        status, _, answer = await _post(hs, "/_emulator/user/contacts", {"properties": {"email": "ada@example.com"}})
        assert status == 409 and answer["category"] == "CONFLICT"
        assert answer["message"] == f"Contact already exists. Existing ID: {ada['id']}"
        assert len(hs.records("contacts")) == 2


async def test_hubspot_archives_one_contact_by_delete():
    async with HubSpotEmulator() as hs:
        client = _hubspot(hs)
        ada = await asyncio.to_thread(
            client.crm.contacts.basic_api.create,
            SimplePublicObjectInputForCreate(properties={"email": "ada@example.com"}),
        )
        await asyncio.to_thread(client.crm.contacts.basic_api.archive, ada.id)  # raises unless 2xx
        assert hs.records("contacts") == []
        assert hs.requests[-1].status == 204
        await asyncio.to_thread(client.crm.contacts.basic_api.archive, ada.id)  # gone already: 204 again
        assert hs.requests[-1].status == 204
        # Her email is free again.
        await asyncio.to_thread(
            client.crm.contacts.basic_api.create,
            SimplePublicObjectInputForCreate(properties={"email": "ada@example.com"}),
        )


async def test_salesforce_refuses_a_value_a_restricted_picklist_does_not_list():
    async with SalesforceEmulator(tls=True) as sf:
        client = _salesforce(sf)
        contact = await asyncio.to_thread(client.Contact.create, {"LastName": "Lovelace", "LeadSource": "Web"})
        with pytest.raises(SalesforceMalformedRequest) as refused:
            await asyncio.to_thread(client.Contact.update, contact["id"], {"LeadSource": "Carrier pigeon"})
        (error,) = refused.value.content
        assert error["errorCode"] == "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"
        assert error["fields"] == ["LeadSource"]
        assert error["message"] == "LeadSource: bad value for restricted picklist field: Carrier pigeon"
        case = await asyncio.to_thread(client.Case.create, {"Subject": "Cannot log in", "Status": "Escalated"})
        with pytest.raises(SalesforceMalformedRequest):
            await asyncio.to_thread(client.Case.update, case["id"], {"Status": "Resolved"})
        with pytest.raises(SalesforceMalformedRequest):
            await asyncio.to_thread(
                client.Opportunity.create, {"Name": "Deal", "StageName": "Won", "CloseDate": "2026-12-31"}
            )

        described = await asyncio.to_thread(client.Case.describe)
        status = next(f for f in described["fields"] if f["name"] == "Status")
        assert status["restrictedPicklist"] is True
        assert [v["value"] for v in status["picklistValues"]] == ["New", "Working", "Escalated", "Closed"]
        assert [v["value"] for v in status["picklistValues"] if v["defaultValue"]] == ["New"]
        subject = next(f for f in described["fields"] if f["name"] == "Subject")
        assert subject["restrictedPicklist"] is False and subject["picklistValues"] == []
