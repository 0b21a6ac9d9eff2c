"""The HubSpot adapter against the local HubSpot: upserts by key, per-record errors, 429s, lost answers,
tasks by idempotency key, update-only, list membership, and the budget kept in step with the CRM."""

from __future__ import annotations

import aiohttp
import pytest

from cdp_crm.adapters.hubspot import HubSpotAdapter
from cdp_crm.domain.budget import Budget
from cdp_crm.domain.coalesce import REMOVE, Change
from cdp_crm.domain.isolation import ANSWER_LOST, AUTH, INVALID_VALUE, NOT_FOUND, THROTTLED, UNKNOWN_FIELD, Isolation
from cdp_crm.domain.mapping import parse_connections
from cdp_crm.domain.projection import Source, project
from cdp_crm_emulators.hubspot import HubSpotEmulator

TOKEN = "pat-local-hubspot"


def _connection(mode="upsert", list_id="1"):
    document = {
        "connections": [
            {
                "id": "hs",
                "kind": "hubspot",
                "credentials": {"token": "HUBSPOT_TOKEN"},
                "mappings": [
                    {
                        "id": "contacts",
                        "object": "contacts",
                        "mode": mode,
                        "match": {"cdp_id": "person.id"},
                        "fields": {
                            "email": "traits.email",
                            "firstname": "traits.first_name",
                            "cdp_churn_risk": "scores.churn_risk",
                        },
                    },
                    {
                        "id": "churn-task",
                        "object": "tasks",
                        "action": "task",
                        "idempotency_field": "cdp_idempotency_key",
                        "about": {"mapping": "contacts"},
                        "fields": {"hs_task_subject": "action.subject", "hs_task_body": "action.body"},
                    },
                    {
                        "id": "vip",
                        "object": "contacts",
                        "segment": "vip",
                        "list": list_id,
                        "match": {"cdp_id": "person.id"},
                        "mode": "mirror",
                    },
                ],
            }
        ]
    }
    (connection,) = parse_connections(document)
    return connection


def _change(mapping, person_id, stamp=1, **profile):
    projection = project(mapping, Source(person_id, profile))
    return Change(mapping.name, projection.key, dict(projection.fields), stamp=stamp, person_id=person_id)


def _people(mapping, n, start=0, **extra):
    return [
        _change(mapping, f"person-{i}", **{"traits.email": f"p{i}@example.com", "traits.first_name": f"P{i}", **extra})
        for i in range(start, start + n)
    ]


@pytest.fixture
async def hubspot():
    async with HubSpotEmulator() as emulator, aiohttp.ClientSession() as session:
        yield emulator, HubSpotAdapter(session, token=TOKEN, base_url=emulator.base_url, timeout=2.0)


async def test_upserts_by_the_external_id_and_again_updates_the_same_records(hubspot):
    emulator, adapter = hubspot
    contacts = _connection().mapping("contacts")
    first = await adapter.send(contacts, _people(contacts, 3, **{"scores.churn_risk": 0.2}))
    assert first.error is None and all(r.ok and r.created for r in first.results.values())
    again = await adapter.send(contacts, _people(contacts, 3, **{"scores.churn_risk": 0.9}))
    assert all(r.ok and r.created is False for r in again.results.values())
    assert {r.crm_id for r in again.results.values()} == {r.crm_id for r in first.results.values()}
    records = emulator.records("contacts")
    assert len(records) == 3 and {r["properties"]["cdp_churn_risk"] for r in records} == {"0.9"}
    assert again.headers["X-HubSpot-RateLimit-Remaining"] == "188"


async def test_records_the_crm_rejects_are_dead_lettered_with_its_error_and_the_rest_written(hubspot):
    emulator, adapter = hubspot
    contacts = _connection().mapping("contacts")
    emulator.faults.reject(lambda obj, record: record.get("firstname") == "P1", message="blocked by a workflow")
    changes = [*_people(contacts, 3), _change(contacts, "person-x", **{"traits.email": "not-an-email"})]
    isolation = Isolation(changes)
    isolation.record(isolation.next_batch(), await adapter.send(contacts, changes), now=0.0)
    assert isolation.done and len(isolation.synced) == 2
    dead = {d.change.person_id: d for d in isolation.dead}
    assert set(dead) == {"person-1", "person-x"}
    assert dead["person-x"].reason == INVALID_VALUE and dead["person-x"].crm_code == "VALIDATION_ERROR"
    assert "not-an-email" in dead["person-x"].crm_message  # kept for the administrator, never logged
    assert "not-an-email" not in repr(dead["person-x"])
    assert sorted(r["properties"]["cdp_id"] for r in emulator.records("contacts")) == ["person-0", "person-2"]


async def test_an_unknown_property_fails_every_record_with_the_crms_code(hubspot):
    emulator, adapter = hubspot
    (connection,) = parse_connections(
        {
            "connections": [
                {
                    "id": "hs",
                    "kind": "hubspot",
                    "credentials": {"token": "T"},
                    "mappings": [
                        {
                            "id": "c",
                            "object": "contacts",
                            "match": {"cdp_id": "person.id"},
                            "fields": {"favourite_colour": "traits.colour"},
                        }
                    ],
                }
            ]
        }
    )
    mapping = connection.mapping("c")
    outcome = await adapter.send(mapping, [_change(mapping, "p1", **{"traits.colour": "blue"})])
    assert outcome.error.reason == UNKNOWN_FIELD and outcome.error.every_record
    assert emulator.records("contacts") == []


async def test_a_429_is_throttled_with_its_policy_changes_nothing_and_the_budget_waits(hubspot):
    emulator, adapter = hubspot
    contacts = _connection().mapping("contacts")
    emulator.faults.throttle_next()
    outcome = await adapter.send(contacts, _people(contacts, 2))
    assert outcome.error.reason == THROTTLED and outcome.error.code == "TEN_SECONDLY_ROLLING"
    assert emulator.records("contacts") == []
    budget = Budget.for_kind("hubspot", account="62515")
    budget.throttled(100.0, retry_after=outcome.error.retry_after, daily=outcome.error.daily)
    assert not budget.reserve(1, 100.0).granted


async def test_the_budget_observing_the_crm_never_goes_over_its_burst_limit():
    async with HubSpotEmulator(burst_limit=5) as emulator, aiohttp.ClientSession() as session:
        adapter = HubSpotAdapter(session, token=TOKEN, base_url=emulator.base_url)
        contacts = _connection().mapping("contacts")
        budget = Budget("62515", "hubspot", burst=190, window=10.0, daily=None)  # configured too high
        sent = 0
        for i in range(8):
            if not budget.reserve(1, emulator.clock()).granted:
                break
            outcome = await adapter.send(contacts, _people(contacts, 1, start=i))
            budget.observe(outcome.headers, emulator.clock())
            assert outcome.error is None
            sent += 1
        assert sent == 5 and emulator.budget()["over_budget"] == 0


async def test_a_dropped_connection_after_commit_is_answer_lost_and_the_retry_duplicates_nothing(hubspot):
    emulator, adapter = hubspot
    contacts = _connection().mapping("contacts")
    emulator.faults.drop_after_commit_next()
    lost = await adapter.send(contacts, _people(contacts, 3, **{"scores.churn_risk": 0.5}))
    assert lost.error.reason == ANSWER_LOST and lost.error.transient
    assert len(emulator.records("contacts")) == 3  # committed, the answer never came
    retried = await adapter.send(contacts, _people(contacts, 3, **{"scores.churn_risk": 0.6}))
    assert all(r.ok and r.created is False for r in retried.results.values())
    records = emulator.records("contacts")
    assert len(records) == 3 and {r["properties"]["cdp_churn_risk"] for r in records} == {"0.6"}


async def test_a_timeout_is_answer_lost(hubspot):
    emulator, adapter = hubspot
    contacts = _connection().mapping("contacts")
    emulator.faults.timeout_next(seconds=5)
    outcome = await adapter.send(contacts, _people(contacts, 1))
    assert outcome.error.reason == ANSWER_LOST


async def test_a_task_retried_after_a_lost_answer_is_still_one_task(hubspot):
    emulator, adapter = hubspot
    task = _connection().mapping("churn-task")
    action = {"id": "act-7", "subject": "Call P1", "body": "churn risk high: scores.churn_risk=0.91"}
    projection = project(task, Source("person-1", action=action))
    change = Change(task.name, projection.key, dict(projection.fields), person_id="person-1")
    emulator.faults.drop_after_commit_next()
    assert (await adapter.send(task, [change])).error.reason == ANSWER_LOST
    outcome = await adapter.send(task, [change])
    (result,) = outcome.results.values()
    assert result.ok and result.created is False
    (created,) = emulator.records("tasks")
    assert created["properties"]["hs_task_subject"] == "Call P1"


async def test_update_only_updates_what_exists_and_reports_the_rest_not_found(hubspot):
    emulator, adapter = hubspot
    contacts = _connection().mapping("contacts")
    await adapter.send(contacts, _people(contacts, 1))
    update_only = _connection(mode="update_only").mapping("contacts")
    outcome = await adapter.send(update_only, _people(update_only, 2, **{"scores.churn_risk": 0.4}))
    by_person = {c.person_id: outcome.results[c.record] for c in _people(update_only, 2)}
    assert by_person["person-0"].ok and by_person["person-1"].error.reason == NOT_FOUND
    (only,) = emulator.records("contacts")
    assert only["properties"]["cdp_churn_risk"] == "0.4"


async def test_list_membership_follows_the_segment(hubspot):
    emulator, adapter = hubspot
    connection = _connection()
    contacts = connection.mapping("contacts")
    await adapter.send(contacts, _people(contacts, 2))
    async with aiohttp.ClientSession() as session:
        async with session.post(
            emulator.base_url + "/crm/v3/lists",
            json={"name": "VIP", "objectTypeId": "0-1", "processingType": "MANUAL"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as response:
            list_id = (await response.json())["list"]["listId"]
    vip = _connection(list_id=list_id).mapping("vip")
    entered = [Change(vip.name, (("cdp_id", f"person-{i}"),), person_id=f"person-{i}") for i in range(2)]
    outcome = await adapter.send(vip, [*entered, Change(vip.name, (("cdp_id", "nobody"),))])
    assert sum(r.ok for r in outcome.results.values()) == 2
    assert [r.error.reason for r in outcome.results.values() if not r.ok] == [NOT_FOUND]
    assert len(emulator.members(list_id)) == 2
    exited = Change(vip.name, (("cdp_id", "person-0"),), op=REMOVE)
    assert (await adapter.send(vip, [exited])).error is None
    (left,) = emulator.members(list_id)
    assert emulator.objects["contacts"][left]["properties"]["cdp_id"] == "person-1"


async def test_a_bad_token_is_an_auth_failure_not_a_dead_letter():
    async with HubSpotEmulator() as emulator, aiohttp.ClientSession() as session:
        adapter = HubSpotAdapter(session, token="pat-wrong", base_url=emulator.base_url)
        contacts = _connection().mapping("contacts")
        outcome = await adapter.send(contacts, _people(contacts, 1))
        assert outcome.error.reason == AUTH and outcome.error.transient


async def test_a_task_is_associated_with_the_persons_contact_and_a_missing_contact_is_reported(hubspot):
    emulator, adapter = hubspot
    connection = _connection()
    contacts, task = connection.mapping("contacts"), connection.mapping("churn-task")
    written = await adapter.send(contacts, _people(contacts, 1))
    (contact_id,) = [r.crm_id for r in written.results.values()]
    changes = []
    for person, action_id in (("person-0", "a1"), ("person-nobody", "a2")):
        projection = project(task, Source(person, action={"id": action_id, "subject": "Call"}), contacts)
        changes.append(
            Change(task.name, projection.key, dict(projection.fields), person_id=person, link=projection.link)
        )
    outcome = await adapter.send(task, changes)
    linked, missing = (outcome.results[c.record] for c in changes)
    assert linked.ok and emulator.associations("tasks", linked.crm_id) == [("contacts", contact_id)]
    assert not missing.ok and missing.error.reason == NOT_FOUND and missing.crm_id is not None  # task written
    assert len(emulator.records("tasks")) == 2
    again = await adapter.send(task, changes[:1])  # a retry: same task, association unchanged
    assert all(r.ok for r in again.results.values()) and len(emulator.records("tasks")) == 2


@pytest.mark.parametrize("transform", [None, "trim", "upper", "truncate:10", "string"])
async def test_a_whole_number_written_to_a_text_property_reads_without_a_decimal_point(hubspot, transform):
    # The profile holds numbers as doubles: a first name of 12345 (mapped with `trim`) read "12345.0".
    emulator, adapter = hubspot
    source = "traits.first_name" if transform is None else {"source": "traits.first_name", "transform": transform}
    document = {
        "connections": [
            {
                "id": "hs",
                "kind": "hubspot",
                "credentials": {"token": "HUBSPOT_TOKEN"},
                "mappings": [
                    {
                        "id": "contacts",
                        "object": "contacts",
                        "match": {"cdp_id": "person.id"},
                        "fields": {"email": "traits.email", "firstname": source},
                    }
                ],
            }
        ]
    }
    (connection,) = parse_connections(document)
    contacts = connection.mapping("contacts")
    change = _change(contacts, "person-1", **{"traits.email": "a@example.com", "traits.first_name": 12345.0})
    assert (await adapter.send(contacts, [change])).error is None
    (record,) = emulator.records("contacts")
    assert record["properties"]["firstname"] == "12345"
