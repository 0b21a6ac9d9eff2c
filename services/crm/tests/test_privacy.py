"""privacy.deleted: the person's HubSpot contact keeps no personal data the CDP put there, the connector
forgets the person, and the erasure is recorded - once, even when the message comes again."""

from __future__ import annotations

import asyncio

import pytest

from cdp.crm.v1 import crm_pb2
from cdp.privacy.v1 import privacy_pb2
from cdp_crm.api import CrmApi
from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.mapping import MappingInvalid, parse_connections
from cdp_crm.inbound import HubSpotPoller
from cdp_crm.privacy import Privacy, consumer_spec
from cdp_crm.state import ANONYMISED, CURSORS, DELETED, PERSONS, PRIVACY, RECORDS
from cdp_crm_emulators.dynamics import DynamicsEmulator
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_crm_emulators.salesforce import SalesforceEmulator
from cdp_crm_emulators.zoho import ZohoEmulator
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
        # The record's document is now the record of its erasure: no match key, no value.
        (erased,) = await world.store.find(RECORDS, "person_id", "person-1")
        assert erased.doc["state"] == ANONYMISED and erased.doc["key"] == [] and erased.doc["fields"] == {}
        assert await world.store.get(PERSONS, "person-1") is None
        assert len(emulator.records("contacts")) == 2  # anonymised, not duplicated


def _four_crms(hubspot, salesforce, dynamics, zoho) -> dict:
    """One connection per CRM, each with the `delete` policy."""
    person = {"cdp_id": "person.id"}
    return {
        "connections": [
            {
                "id": "hs", "kind": "hubspot", "url": hubspot.base_url, "on_delete": "delete",
                "credentials": {"token": "HUBSPOT_TOKEN"},
                "mappings": [
                    {"id": "contacts", "object": "contacts", "match": person,
                     "fields": {"email": "traits.email", "firstname": "traits.first_name"}},
                    {"id": "success-task", "object": "tasks", "action": "task",
                     "idempotency_field": "cdp_idempotency_key", "about": {"mapping": "contacts"},
                     "fields": {"hs_task_subject": "action.subject"}},
                ],
            },
            {
                "id": "sf", "kind": "salesforce", "url": salesforce.base_url, "on_delete": "delete",
                "credentials": {"client_id": "SF_ID", "client_secret": "SF_SECRET"},
                "mappings": [
                    {"id": "contacts", "object": "Contact", "match": {"CDP_Id__c": "person.id"},
                     "fields": {"Email": "traits.email", "LastName": "traits.last_name"}},
                ],
            },
            {
                "id": "dyn", "kind": "dynamics", "url": dynamics.base_url, "auth_url": dynamics.base_url,
                "on_delete": "delete",
                "credentials": {"tenant_id": "DYN_TENANT", "client_id": "DYN_ID", "client_secret": "DYN_SECRET"},
                "mappings": [
                    {"id": "contacts", "object": "contacts", "match": person,
                     "fields": {"emailaddress1": "traits.email", "lastname": "traits.last_name"}},
                ],
            },
            {
                "id": "zoho", "kind": "zoho", "url": zoho.base_url, "on_delete": "delete",
                "credentials": {"client_id": "ZOHO_ID", "client_secret": "ZOHO_SECRET", "refresh_token": "ZOHO_REFRESH"},
                "mappings": [
                    {"id": "contacts", "object": "Contacts", "match": {"CDP_Id": "person.id"},
                     "fields": {"Email": "traits.email", "Last_Name": "traits.last_name"}},
                ],
            },
        ]
    }  # fmt: skip


def _env(salesforce, dynamics, zoho) -> dict[str, str]:
    return {
        "SF_ID": salesforce.client_id, "SF_SECRET": salesforce.client_secret,
        "DYN_TENANT": dynamics.tenant, "DYN_ID": dynamics.client_id, "DYN_SECRET": dynamics.client_secret,
        "ZOHO_ID": zoho.client_id, "ZOHO_SECRET": zoho.client_secret, "ZOHO_REFRESH": "1000.local-refresh-token",
    }  # fmt: skip


async def test_the_delete_policy_deletes_the_persons_records_in_every_crm_once(world_factory):
    async with (
        HubSpotEmulator() as hubspot,
        SalesforceEmulator() as salesforce,
        DynamicsEmulator() as dynamics,
        ZohoEmulator() as zoho,
    ):
        world = await world_factory(hubspot)
        await world.start(_four_crms(hubspot, salesforce, dynamics, zoho), env=_env(salesforce, dynamics, zoho))
        ada = {"traits.email": "ada@example.com", "traits.first_name": "Ada", "traits.last_name": "Lovelace"}
        bo = {"traits.email": "bo@example.com", "traits.first_name": "Bo", "traits.last_name": "Diddley"}
        await world.profiles({"person-1": ada, "person-2": bo})
        await world.action("person-1", "act-1", "Call Ada")
        crms = {
            "hs": lambda: hubspot.records("contacts"),
            "sf": lambda: salesforce.records("Contact"),
            "dyn": lambda: dynamics.records("contacts"),
            "zoho": lambda: zoho.records("Contacts"),
        }
        await world.eventually(
            lambda: all(len(records()) == 2 for records in crms.values()) and hubspot.records("tasks")
        )

        privacy = Privacy(
            world.store, world.logic.mappings, world.logic.deliverer, retry_for=0.5, settled=world.logic.settled,
            partitions=world.partitions, policies={c.id: c.on_delete for c in world.connections},
        )  # fmt: skip
        zoho.faults.fail_next(100, status=503)  # Zoho is down: the others are done, the request comes again
        request = privacy_pb2.PrivacyDeleted(request_id="req-1", person_id="person-1")
        assert await privacy.erase(request) is False
        assert hubspot.find("contacts", "cdp_id", "person-1") is None
        assert await world.store.get(PRIVACY, "req-1") is None
        zoho.faults.clear()
        hubspot_calls = len(hubspot.requests)
        assert await privacy.erase(request) is True
        assert len(hubspot.requests) == hubspot_calls  # the retry called only the CRM that was left

        assert [r["properties"]["cdp_id"] for r in hubspot.records("contacts")] == ["person-2"]
        assert hubspot.records("tasks") == []  # the person's task went too
        assert [r["CDP_Id__c"] for r in salesforce.records("Contact")] == ["person-2"]
        assert [r["cdp_id"] for r in dynamics.records("contacts")] == ["person-2"]
        assert [r["CDP_Id"] for r in zoho.records("Contacts")] == ["person-2"]
        done = (await world.store.get(PRIVACY, "req-1")).doc
        assert done["policies"] == {"hs": "delete", "sf": "delete", "dyn": "delete", "zoho": "delete"}
        assert done["connections"] == {
            "hs": {"deleted": 2, "removed": 0},
            "sf": {"deleted": 1, "removed": 0},
            "dyn": {"deleted": 1, "removed": 0},
            "zoho": {"deleted": 1, "removed": 0},
        }
        # What was done stays visible per record (GetRecordStatus, `cdpctl crm record`), without the match key.
        erased = await world.store.find(RECORDS, "person_id", "person-1")
        assert len(erased) == 5 and all(r.doc["state"] == DELETED and r.doc["key"] == [] for r in erased)
        api = CrmApi(
            store=world.store, connections=world.connections, deliverer=world.logic.deliverer, budgets={}, runs=None
        )
        status = await api.GetRecordStatus(crm_pb2.GetRecordStatusRequest(person_id="person-1"), None)
        assert {r.state for r in status.records} == {crm_pb2.RECORD_STATE_DELETED}
        assert await world.store.get(PERSONS, "person-1") is None

        calls = sum(len(e.requests) for e in (hubspot, salesforce, dynamics, zoho))
        again = privacy_pb2.PrivacyDeleted(request_id="req-2", person_id="person-1")
        assert await privacy.erase(again) is True  # a second request for the same person: nothing left to call
        assert sum(len(e.requests) for e in (hubspot, salesforce, dynamics, zoho)) == calls
        await world.profiles({"person-2": {"traits.first_name": "Bob"}})  # the others still sync
        await world.eventually(
            lambda: hubspot.find("contacts", "cdp_id", "person-2")["properties"]["firstname"] == "Bob"
        )


def test_an_unknown_on_delete_policy_fails_start_up_naming_the_field():
    hubspot = HubSpotEmulator()  # not started: only its document is read
    document = _four_crms(hubspot, SalesforceEmulator(), DynamicsEmulator(), ZohoEmulator())
    document["connections"] = document["connections"][:1]
    document["connections"][0]["on_delete"] = "shred"
    with pytest.raises(MappingInvalid) as raised:
        parse_connections(document)
    assert [p.path for p in raised.value.problems] == ["hs.on_delete"]
    assert "anonymise, delete" in str(raised.value.problems[0])


async def test_nothing_of_the_erased_person_stays_readable_in_the_stores_files(world_factory, tmp_path):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start()
        ada = {"traits.email": "ada-7f3@example.com", "traits.first_name": "Adalind", "traits.phone": "+15550104477"}
        await world.profiles({"person-1": ada, "person-2": {"traits.email": "bo-91c@example.com"}})
        await world.eventually(lambda: len(emulator.records("contacts")) == 2)

        privacy = Privacy(
            world.store, world.logic.mappings, world.logic.deliverer, settled=world.logic.settled,
            partitions=world.partitions,
        )  # fmt: skip
        request = privacy_pb2.PrivacyDeleted(request_id="req-1", person_id="person-1")
        assert await privacy.erase(request) is True

        # The view (every field, the phone too) and the record's values: no byte left in crm.db or its WAL.
        files = b"".join(path.read_bytes() for path in tmp_path.glob("crm-0.db*"))
        assert b"bo-91c@example.com" in files  # the scan sees what is there
        assert not {v for v in ada.values() if v.encode() in files}


def _salesforce(salesforce, **connection) -> dict:
    return {
        "connections": [
            {
                "id": "sf", "kind": "salesforce", "url": salesforce.base_url,
                "credentials": {"client_id": "SF_ID", "client_secret": "SF_SECRET"},
                "mappings": [
                    {"id": "contacts", "object": "Contact", "match": {"CDP_Id__c": "person.id"},
                     "fields": {"Email": "traits.email", "FirstName": "traits.first_name",
                                "LastName": "traits.last_name"}},
                ],
                **connection,
            }
        ]
    }  # fmt: skip


async def test_anonymising_writes_a_placeholder_in_the_fields_the_crm_requires(world_factory):
    async with SalesforceEmulator() as salesforce:
        world = await world_factory(salesforce)
        env = {"SF_ID": salesforce.client_id, "SF_SECRET": salesforce.client_secret}
        await world.start(_salesforce(salesforce), env=env, describe=True)
        ada = {"traits.email": "ada@example.com", "traits.first_name": "Ada", "traits.last_name": "Lovelace"}
        await world.profiles({"person-1": ada})
        await world.eventually(lambda: salesforce.find("Contact", "CDP_Id__c", "person-1"))

        privacy = Privacy(
            world.store, world.logic.mappings, world.logic.deliverer, retry_for=0.5, settled=world.logic.settled,
            partitions=world.partitions,
        )  # fmt: skip
        request = privacy_pb2.PrivacyDeleted(request_id="req-1", person_id="person-1")
        assert await privacy.erase(request) is True
        contact = salesforce.find("Contact", "CDP_Id__c", "person-1")
        # Salesforce requires LastName (its describe says so): a placeholder, never the person's name.
        assert contact["LastName"] == "(deleted)"
        assert not contact.get("Email") and not contact.get("FirstName")
        (record,) = await world.store.find(RECORDS, "person_id", "person-1")
        assert record.doc["state"] == ANONYMISED
        assert (await world.store.get(PRIVACY, "req-1")).doc["connections"] == {"sf": {"anonymised": 1, "removed": 0}}


async def test_an_erasure_the_crm_refuses_is_not_done_it_comes_again_and_its_status_says_why(world_factory):
    async with SalesforceEmulator() as salesforce:
        world = await world_factory(salesforce)
        env = {"SF_ID": salesforce.client_id, "SF_SECRET": salesforce.client_secret}
        # Started without the CRM's schema (its describe failed at start): the connector cannot know that
        # LastName is required, so Salesforce refuses the anonymised contact.
        await world.start(_salesforce(salesforce), env=env)
        ada = {"traits.email": "ada@example.com", "traits.first_name": "Ada", "traits.last_name": "Lovelace"}
        await world.profiles({"person-1": ada})
        await world.eventually(lambda: salesforce.find("Contact", "CDP_Id__c", "person-1"))

        privacy = Privacy(
            world.store, world.logic.mappings, world.logic.deliverer, retry_for=0.5, settled=world.logic.settled,
            partitions=world.partitions,
        )  # fmt: skip
        handled: list[str] = []

        async def handle(batch) -> None:
            await privacy.handle(batch)
            handled.extend(d.outcome or "ack" for d in batch)

        await world.bus.ensure_streams(privacy_stream())
        request = privacy_pb2.PrivacyDeleted(request_id="req-1", person_id="person-1")
        [published] = await world.bus.publisher.publish_batch(
            [OutMessage(subjects.PRIVACY_DELETED, request.SerializeToString(), "privacy:req-1")]
        )
        assert published.ok
        task = asyncio.create_task(world.bus.consumer(consumer_spec(), handle).run())
        try:
            await world.eventually(lambda: handled)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert handled == ["retry"]  # not acknowledged: the request comes again
        assert await world.store.get(PRIVACY, "req-1") is None  # not recorded as done
        api = CrmApi(
            store=world.store, connections=world.connections, deliverer=world.logic.deliverer, budgets={}, runs=None
        )
        [status] = (await api.GetRecordStatus(crm_pb2.GetRecordStatusRequest(person_id="person-1"), None)).records
        assert status.state == crm_pb2.RECORD_STATE_DEAD_LETTERED and status.crm_code == "REQUIRED_FIELD_MISSING"

        # Once the connector knows the schema (restarted after the CRM answered its describe), the request
        # that comes again is done.
        await world.stop()
        await world.start(_salesforce(salesforce), env=env, describe=True)
        privacy.mappings = world.logic.mappings
        assert await privacy.erase(request) is True
        contact = salesforce.find("Contact", "CDP_Id__c", "person-1")
        assert contact["LastName"] == "(deleted)" and not contact.get("Email")
        [status] = (await api.GetRecordStatus(crm_pb2.GetRecordStatusRequest(person_id="person-1"), None)).records
        assert status.state == crm_pb2.RECORD_STATE_ANONYMISED


async def test_anonymising_a_dynamics_contact_writes_a_placeholder_in_its_required_lastname(world_factory):
    async with DynamicsEmulator() as dynamics:
        world = await world_factory(dynamics)
        env = {"DYN_TENANT": dynamics.tenant, "DYN_ID": dynamics.client_id, "DYN_SECRET": dynamics.client_secret}
        document = _four_crms(HubSpotEmulator(), SalesforceEmulator(), dynamics, ZohoEmulator())
        document["connections"] = [{**document["connections"][2], "on_delete": "anonymise"}]
        await world.start(document, env=env, describe=True)
        ada = {"traits.email": "ada@example.com", "traits.last_name": "Lovelace"}
        await world.profiles({"person-1": ada})
        await world.eventually(lambda: dynamics.find("contacts", "cdp_id", "person-1"))

        privacy = Privacy(
            world.store, world.logic.mappings, world.logic.deliverer, retry_for=0.5, settled=world.logic.settled,
            partitions=world.partitions, policies={"dyn": "anonymise"},
        )  # fmt: skip
        request = privacy_pb2.PrivacyDeleted(request_id="req-1", person_id="person-1")
        assert await privacy.erase(request) is True
        contact = dynamics.find("contacts", "cdp_id", "person-1")
        # Dataverse describes lastname as ApplicationRequired: a placeholder, so the contact stays one a
        # user can save in the app, and never the person's name.
        assert contact["lastname"] == "(deleted)" and not contact.get("emailaddress1")
        assert "Lovelace" not in str(contact) and len(dynamics.records("contacts")) == 1
        (record,) = await world.store.find(RECORDS, "person_id", "person-1")
        assert record.doc["state"] == ANONYMISED
        done = (await world.store.get(PRIVACY, "req-1")).doc
        assert done["connections"] == {"dyn": {"anonymised": 1, "removed": 0}}


def _with_segments(document: dict) -> dict:
    """HubSpot's contacts mapping also writes the person's segments (as make up's does)."""
    [contacts, _task] = document["connections"][0]["mappings"]
    contacts["fields"]["cdp_segments"] = {"source": "segments", "transform": "join:;"}
    contacts["triggers"] = ["profiles.changed", "segments.entered", "segments.exited"]
    return document


@pytest.mark.parametrize("policy", ["anonymise", "delete"])
async def test_what_reaches_the_connector_after_an_erasure_never_writes_the_person_again(world_factory, policy):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        document = _with_segments(world.document())
        document["connections"][0]["on_delete"] = policy
        await world.start(document)
        # A witness on the person's partition: once its later changes are written, so are the person's.
        witness = next(
            p for p in (f"person-{n}" for n in range(2, 100)) if world.partition(p) == world.partition("person-1")
        )
        await world.profiles({"person-1": {"traits.email": "ada@example.com"}, witness: {"traits.email": "w@x.org"}})
        await world.segment("person-1", "vip")
        await world.eventually(
            lambda: (
                (emulator.find("contacts", "cdp_id", "person-1") or {}).get("properties", {}).get("cdp_segments")
                == "vip"
            )
        )

        privacy = Privacy(
            world.store, world.logic.mappings, world.logic.deliverer, settled=world.logic.settled,
            partitions=world.partitions, policies={c.id: c.on_delete for c in world.connections},
        )  # fmt: skip
        request = privacy_pb2.PrivacyDeleted(request_id="req-1", person_id="person-1")
        assert await privacy.erase(request) is True

        # Published before the deletion, sourced after the erasure: segmentation's exit (reason removed)
        # and a late profile change.
        await world.segment("person-1", "vip", entered=False)
        await world.profiles({"person-1": {"traits.email": "ada@example.com", "traits.first_name": "Ada"}})
        await world.segment(witness, "vip")
        await world.profiles({witness: {"traits.first_name": "Wit"}})
        await world.eventually(
            lambda: (
                (emulator.find("contacts", "cdp_id", witness) or {}).get("properties", {}).get("firstname") == "Wit"
                and emulator.find("contacts", "cdp_id", witness)["properties"].get("cdp_segments") == "vip"
            )
        )

        contact = emulator.find("contacts", "cdp_id", "person-1")
        if policy == "delete":
            assert contact is None  # not created again
        else:
            assert not contact["properties"].get("email") and not contact["properties"].get("firstname")
        assert await world.store.get(PERSONS, "person-1") is None
        records = await world.store.find(RECORDS, "person_id", "person-1")
        expected = DELETED if policy == "delete" else ANONYMISED
        assert [r.doc["state"] for r in records] == [expected]


async def test_what_the_inbound_side_kept_of_the_persons_records_goes_with_the_erasure(world_factory, collector):
    """The inbound side keeps, per CRM record it read, what it saw last (`crm_cursors/<connection>:<object>:
    <crm id>`: a status and a digest of the fields it reports - email, names, phone) and what it saw the
    time before. Those of the erased person's records went on holding digests of their values after the
    erasure; they go with it, and the anonymised record read afterwards is no news."""
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.bus.ensure_streams(privacy_stream())
        await world.start()
        await world.profiles({"person-1": {"traits.email": "ada@example.com", "traits.first_name": "Ada"}})
        await world.eventually(lambda: len(emulator.records("contacts")) == 1)
        (contact,) = emulator.records("contacts")
        (connection,) = parse_connections(world.document())
        poller = HubSpotPoller(
            world.store, connection, world.session, "pat-local-hubspot", SharedBudget(world.store, connection),
            collector.client(world.session), objects=("contacts",),
        )  # fmt: skip
        await poller.poll()
        emulator.clock.advance(5)
        emulator.user_update("contacts", contact["id"], {"phone": "+44 7700 900123"})  # a CRM user's edit
        await poller.poll()
        memo = f"{connection.id}:contacts:{contact['id']}"
        assert (await world.store.get(CURSORS, memo)).doc["before"] is not None

        privacy = Privacy(
            world.store, world.logic.mappings, world.logic.deliverer, settled=world.logic.settled,
            partitions=world.partitions,
        )  # fmt: skip
        runner = world.bus.consumer(consumer_spec(), privacy.handle)
        task = asyncio.create_task(runner.run())
        try:
            request = privacy_pb2.PrivacyDeleted(request_id="req-memo", person_id="person-1")
            await world.bus.publisher.publish_batch(
                [OutMessage(subjects.PRIVACY_DELETED, request.SerializeToString(), "req-memo")]
            )
            await world.eventually(lambda: world.store.get(PRIVACY, "req-memo"))
        finally:
            task.cancel()
        assert await world.store.get(CURSORS, memo) is None
        posted = len(collector.stored)
        emulator.clock.advance(5)
        await poller.poll()  # the anonymisation, read back: not news, and nothing of before it
        assert len(collector.stored) == posted
        assert (await world.store.get(CURSORS, memo)).doc["before"] is None


async def test_an_erasure_waits_for_a_connection_not_started_rather_than_being_recorded_done(world_factory):
    # A connection whose credential variable is unset is not started (the others run): an erasure must not
    # pass over its records and record the request done, leaving the person in that CRM for good.
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start()
        await world.profiles({"person-1": {"traits.email": "ada@example.com"}})
        await world.eventually(lambda: emulator.find("contacts", "cdp_id", "person-1"))
        await world.eventually(lambda: world.store.count(RECORDS))
        request = privacy_pb2.PrivacyDeleted(request_id="req-1", person_id="person-1")
        waiting = Privacy(
            world.store, {}, world.logic.deliverer, settled=world.logic.settled, partitions=world.partitions,
            unstarted={"hs"},
        )  # fmt: skip
        assert await waiting.erase(request) is False
        assert await world.store.get(PRIVACY, "req-1") is None

        # The connection started (its variable set): the request, coming again, erases the record.
        started = Privacy(
            world.store, world.logic.mappings, world.logic.deliverer, settled=world.logic.settled,
            partitions=world.partitions,
        )  # fmt: skip
        assert await started.erase(request) is True
        assert emulator.find("contacts", "email", "ada@example.com") is None
