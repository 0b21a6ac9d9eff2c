"""The Salesforce adapter against the local Salesforce: OAuth (client credentials, JWT bearer), sObject
Collections upsert by external id with per-record errors, the daily limit, lost answers, expired sessions,
describe for mapping validation, and Bulk API 2.0 backfills."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cdp_crm.adapters.salesforce import SalesforceAdapter
from cdp_crm.domain.budget import Budget
from cdp_crm.domain.coalesce import REMOVE, Change
from cdp_crm.domain.isolation import ANSWER_LOST, AUTH, INVALID_VALUE, THROTTLED, UNKNOWN_FIELD, Isolation
from cdp_crm.domain.mapping import MappingInvalid, parse_connections
from cdp_crm.domain.projection import Source, project
from cdp_crm_emulators.salesforce import SalesforceEmulator

CLIENT_ID, CLIENT_SECRET = "local-consumer-key", "local-consumer-secret"


def _document(fields=None):
    return {
        "connections": [
            {
                "id": "sf",
                "kind": "salesforce",
                "credentials": {"client_id": "SF_CLIENT_ID", "client_secret": "SF_CLIENT_SECRET"},
                "mappings": [
                    {
                        "id": "contacts",
                        "object": "Contact",
                        "match": {"CDP_Id__c": "person.id"},
                        "fields": fields
                        or {
                            "LastName": "traits.last_name",
                            "Email": "traits.email",
                            "Churn_Risk__c": "scores.churn_risk",
                        },
                    }
                ],
            }
        ]
    }


def _contacts(schemas=None):
    (connection,) = parse_connections(_document(), schemas)
    return connection.mapping("contacts")


def _change(mapping, person_id, **profile):
    projection = project(mapping, Source(person_id, profile))
    return Change(mapping.name, projection.key, dict(projection.fields), person_id=person_id)


def _people(mapping, n, start=0, **extra):
    return [
        _change(
            mapping, f"person-{i}", **{"traits.last_name": f"Person{i}", "traits.email": f"p{i}@example.com", **extra}
        )
        for i in range(start, start + n)
    ]


@pytest.fixture
async def salesforce():
    async with SalesforceEmulator() as emulator, aiohttp.ClientSession() as session:
        adapter = SalesforceAdapter(
            session, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, login_url=emulator.base_url, timeout=2.0
        )
        yield emulator, adapter


async def test_collections_upsert_by_external_id_creates_then_updates_the_same_records(salesforce):
    emulator, adapter = salesforce
    contacts = _contacts()
    first = await adapter.send(contacts, _people(contacts, 3, **{"scores.churn_risk": 0.2}))
    assert first.error is None and all(r.ok and r.created for r in first.results.values())
    again = await adapter.send(contacts, _people(contacts, 3, **{"scores.churn_risk": 0.8}))
    assert all(r.ok and r.created is False for r in again.results.values())
    records = emulator.records("Contact")
    assert len(records) == 3 and {r["Churn_Risk__c"] for r in records} == {0.8}
    budget = Budget.for_kind("salesforce", account="00D")
    budget.observe(again.headers, emulator.clock())
    assert budget.status(emulator.clock())["daily_used"] >= 2


async def test_per_record_errors_carry_salesforces_code_and_the_rest_is_written(salesforce):
    emulator, adapter = salesforce
    contacts = _contacts()
    changes = [
        *_people(contacts, 2),
        _change(contacts, "person-bad-email", **{"traits.last_name": "X", "traits.email": "nope"}),
        _change(contacts, "person-no-name", **{"traits.email": "x@example.com"}),
    ]
    isolation = Isolation(changes)
    isolation.record(isolation.next_batch(), await adapter.send(contacts, changes), now=0.0)
    assert len(isolation.synced) == 2
    dead = {d.change.person_id: d for d in isolation.dead}
    assert (dead["person-bad-email"].reason, dead["person-bad-email"].crm_code) == (
        INVALID_VALUE,
        "INVALID_EMAIL_ADDRESS",
    )
    assert dead["person-no-name"].crm_code == "REQUIRED_FIELD_MISSING"
    assert len(emulator.records("Contact")) == 2


async def test_describe_feeds_mapping_validation_so_a_typo_fails_at_start(salesforce):
    _, adapter = salesforce
    schema = await adapter.describe(["Contact"])
    assert schema["Contact"].fields["CDP_Id__c"].key and not schema["Contact"].fields["Email"].key
    assert _contacts({"sf": schema}).object == "Contact"
    with pytest.raises(MappingInvalid) as caught:
        parse_connections(_document({"Emial": "traits.email"}), {"sf": schema})
    assert caught.value.field == "sf/contacts.fields.Emial" and "did you mean 'Email'" in caught.value.message
    with pytest.raises(MappingInvalid) as caught:
        parse_connections(_document({"SystemModstamp": "traits.x"}), {"sf": schema})
    assert "read-only" in caught.value.message


async def test_past_the_daily_allocation_it_is_throttled_for_the_day_and_nothing_changes():
    async with SalesforceEmulator(daily_limit=1) as emulator, aiohttp.ClientSession() as session:
        adapter = SalesforceAdapter(
            session, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, login_url=emulator.base_url
        )
        contacts = _contacts()
        assert (await adapter.send(contacts, _people(contacts, 1))).error is None
        refused = await adapter.send(contacts, _people(contacts, 1, start=1))
        assert (
            refused.error.reason == THROTTLED and refused.error.code == "REQUEST_LIMIT_EXCEEDED" and refused.error.daily
        )
        assert len(emulator.records("Contact")) == 1


async def test_a_dropped_connection_after_commit_then_a_retry_leaves_one_record_with_the_latest_values(salesforce):
    emulator, adapter = salesforce
    contacts = _contacts()
    assert (await adapter.send(contacts, _people(contacts, 1))).error is None  # token fetched
    emulator.faults.drop_after_commit_next()
    lost = await adapter.send(contacts, _people(contacts, 2, **{"scores.churn_risk": 0.3}))
    assert lost.error.reason == ANSWER_LOST
    retried = await adapter.send(contacts, _people(contacts, 2, **{"scores.churn_risk": 0.4}))
    assert all(r.ok for r in retried.results.values())
    records = emulator.records("Contact")
    assert len(records) == 2 and {r["Churn_Risk__c"] for r in records} == {0.4}


async def test_an_expired_session_gets_a_new_token_and_one_retry(salesforce):
    emulator, adapter = salesforce
    contacts = _contacts()
    assert (await adapter.send(contacts, _people(contacts, 1))).error is None
    emulator.sessions.clear()  # every token issued so far expires
    outcome = await adapter.send(contacts, _people(contacts, 1, start=1))
    assert outcome.error is None and len(emulator.records("Contact")) == 2


async def test_bad_client_credentials_are_an_auth_failure():
    async with SalesforceEmulator() as emulator, aiohttp.ClientSession() as session:
        adapter = SalesforceAdapter(session, client_id=CLIENT_ID, client_secret="wrong", login_url=emulator.base_url)
        outcome = await adapter.send(_contacts(), _people(_contacts(), 1))
        assert outcome.error.reason == AUTH and outcome.error.code == "invalid_client"
        assert "wrong" not in repr(outcome.error)


async def test_the_jwt_bearer_flow_signs_an_assertion_the_org_accepts():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    async with SalesforceEmulator(jwt_public_key=public_pem, usernames={"sync@cdp.example"}) as emulator:
        async with aiohttp.ClientSession() as session:
            adapter = SalesforceAdapter(
                session,
                client_id=CLIENT_ID,
                username="sync@cdp.example",
                private_key=private_pem,
                login_url=emulator.base_url,
                clock=emulator.clock,
            )
            outcome = await adapter.send(_contacts(), _people(_contacts(), 1))
            assert outcome.error is None and len(emulator.records("Contact")) == 1


async def test_a_bulk_backfill_upserts_every_row_and_reports_each_failure(salesforce):
    emulator, adapter = salesforce
    contacts = _contacts()
    await adapter.send(contacts, _people(contacts, 1, **{"scores.churn_risk": 0.1}))
    changes = [
        *_people(contacts, 500, **{"scores.churn_risk": 0.5}),
        _change(contacts, "bad", **{"traits.last_name": "B", "traits.email": "nope"}),
    ]
    outcome = await adapter.bulk_upsert(contacts, changes, poll=asyncio.sleep, poll_seconds=0.02)
    assert outcome.error is None and len(outcome.results) == 501
    assert sum(r.ok for r in outcome.results.values()) == 500
    assert sum(bool(r.created) for r in outcome.results.values() if r.ok) == 499  # person-0 existed
    (failed,) = [r for r in outcome.results.values() if not r.ok]
    assert failed.error.code == "INVALID_EMAIL_ADDRESS" and failed.error.reason == INVALID_VALUE
    assert len(emulator.records("Contact")) == 500


async def test_a_bulk_row_carries_any_text_a_cleared_field_and_a_flag_as_salesforce_reads_them(salesforce):
    emulator, adapter = salesforce
    (connection,) = parse_connections(
        _document({"LastName": "traits.last_name", "Email": "traits.email", "HasOptedOutOfEmail": "consent.opt_out"})
    )
    contacts = connection.mapping("contacts")
    await adapter.send(contacts, _people(contacts, 1))  # person-0 holds an email
    quoted = 'O\'Brien, "Jr"\nII'  # a comma, quotes and a line break: one CSV cell
    cleared = Change(
        contacts.name, (("CDP_Id__c", "person-0"),), {"LastName": quoted, "Email": None}, person_id="person-0"
    )
    flagged = _change(contacts, "person-1", **{"traits.last_name": "Plain", "consent.opt_out": True})
    outcome = await adapter.bulk_upsert(contacts, [cleared, flagged], poll=asyncio.sleep, poll_seconds=0.02)
    assert outcome.error is None and all(r.ok for r in outcome.results.values())
    assert set(outcome.results) == {cleared.record, flagged.record}
    assert outcome.results[cleared.record].created is False and outcome.results[flagged.record].created is True
    first = emulator.find("Contact", "CDP_Id__c", "person-0")
    assert first["LastName"] == quoted and first.get("Email") is None  # None clears (#N/A)
    second = emulator.find("Contact", "CDP_Id__c", "person-1")
    assert second["LastName"] == "Plain" and second["HasOptedOutOfEmail"] in (True, "true")
    assert outcome.results[flagged.record].crm_id == second["Id"]


async def test_an_unknown_field_is_rejected_for_every_record():
    async with SalesforceEmulator() as emulator, aiohttp.ClientSession() as session:
        adapter = SalesforceAdapter(
            session, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, login_url=emulator.base_url
        )
        (connection,) = parse_connections(_document({"LastName": "traits.last_name", "Shoe_Size__c": "traits.shoe"}))
        mapping = connection.mapping("contacts")
        outcome = await adapter.send(mapping, [_change(mapping, "p1", **{"traits.last_name": "L", "traits.shoe": 9})])
        (result,) = outcome.results.values()
        assert result.error.reason == UNKNOWN_FIELD and result.error.code == "INVALID_FIELD"


async def test_a_task_is_linked_to_the_persons_contact_by_its_external_id(salesforce):
    emulator, adapter = salesforce
    document = _document()
    document["connections"][0]["mappings"].append(
        {
            "id": "task",
            "object": "Task",
            "action": "task",
            "idempotency_field": "CDP_Idempotency_Key__c",
            "about": {"mapping": "contacts", "field": "WhoId"},
            "fields": {"Subject": "action.subject"},
        }
    )
    (connection,) = parse_connections(document)
    contacts, task = connection.mapping("contacts"), connection.mapping("task")
    await adapter.send(contacts, _people(contacts, 1))
    projection = project(task, Source("person-0", action={"id": "act-1", "subject": "Call"}), contacts)
    change = Change(task.name, projection.key, dict(projection.fields), link=projection.link)
    outcome = await adapter.send(task, [change])
    assert all(r.ok for r in outcome.results.values())
    (created,) = emulator.records("Task")
    (contact,) = emulator.records("Contact")
    assert created["WhoId"] == contact["Id"] and created["Subject"] == "Call"


async def test_a_bulk_job_that_does_not_finish_in_time_is_answer_lost(salesforce):
    _, adapter = salesforce
    contacts = _contacts()

    async def no_time_passes(seconds):
        pass

    outcome = await adapter.bulk_upsert(contacts, _people(contacts, 10), poll=no_time_passes, max_polls=0)
    assert outcome.error.reason == ANSWER_LOST and outcome.error.transient


async def test_campaign_membership_follows_the_segment_and_a_resend_changes_nothing(salesforce):
    emulator, adapter = salesforce
    contacts = _contacts()
    await adapter.send(contacts, _people(contacts, 2))
    campaign = emulator.user_create("Campaign", {"Name": "High value", "CDP_Segment_Id__c": "high_value"})["Id"]
    document = _document()
    document["connections"][0]["mappings"].append(
        {
            "id": "vip",
            "object": "Contact",
            "segment": "high_value",
            "list": campaign,
            "match": {"CDP_Id__c": "person.id"},
            "mode": "mirror",
        }
    )
    (connection,) = parse_connections(document)
    vip = connection.mapping("vip")
    entered = [Change(vip.name, (("CDP_Id__c", p),), person_id=p) for p in ("person-0", "person-1", "nobody")]
    first = await adapter.send(vip, entered)
    by_person = {c.person_id: first.results[c.record] for c in entered}
    assert by_person["person-0"].ok and by_person["person-0"].created and by_person["person-1"].ok
    assert by_person["nobody"].error.reason == "not_found"
    again = await adapter.send(vip, entered[:2])  # as after a lost answer: nothing new
    assert all(r.ok and r.created is False for r in again.results.values())
    assert len(emulator.records("CampaignMember")) == 2
    left = Change(vip.name, (("CDP_Id__c", "person-0"),), op=REMOVE)
    assert all(r.ok for r in (await adapter.send(vip, [left])).results.values())
    assert all(r.ok for r in (await adapter.send(vip, [left])).results.values())  # already gone: fine
    (member,) = emulator.records("CampaignMember")
    assert member["CampaignId"] == campaign


async def test_a_whole_number_reads_without_a_decimal_point_in_a_text_field_and_stays_a_number(salesforce):
    # The profile holds numbers as doubles: a first name of 12345 reached Salesforce as "12345.0".
    emulator, adapter = salesforce
    (connection,) = parse_connections(
        _document({"LastName": "traits.last_name", "FirstName": "traits.first_name", "Churn_Risk__c": "scores.churn"})
    )
    contacts = connection.mapping("contacts")
    change = _change(
        contacts, "person-1", **{"traits.last_name": "Doe", "traits.first_name": 12345.0, "scores.churn": 3.0}
    )
    assert (await adapter.send(contacts, [change])).error is None
    (record,) = emulator.records("Contact")
    assert str(record["FirstName"]) == "12345"
    assert record["Churn_Risk__c"] == 3 and not isinstance(record["Churn_Risk__c"], str)
