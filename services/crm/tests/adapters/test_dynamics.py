"""The Dynamics adapter against the local Dataverse: Entra ID tokens, upserts by alternate key in $batch
change sets (one refused record does not roll back the others), update-only, service protection, lost
answers."""

from __future__ import annotations

import time

import aiohttp
import orjson
import pytest

from cdp_crm.__main__ import describe
from cdp_crm.adapters.dynamics import DynamicsAdapter, _object_schema
from cdp_crm.budgets import SharedBudget
from cdp_crm.connectors import open_adapters
from cdp_crm.domain.budget import Budget
from cdp_crm.domain.coalesce import REMOVE, UPSERT, Change
from cdp_crm.domain.isolation import ANSWER_LOST, AUTH, NOT_FOUND, THROTTLED, UNKNOWN_FIELD, Isolation
from cdp_crm.domain.mapping import MappingInvalid, load_connections, parse_connections
from cdp_crm.domain.projection import Source, project
from cdp_crm.state import prepare_store
from cdp_crm_emulators.dynamics import DynamicsEmulator
from cdp_kit.storage import open_store


def _mapping(mode="upsert", fields=None, obj="contacts", match=None):
    document = {
        "connections": [
            {
                "id": "dyn",
                "kind": "dynamics",
                "url": "https://org.crm.dynamics.com",
                "credentials": {"tenant_id": "T", "client_id": "C", "client_secret": "S"},
                "mappings": [
                    {
                        "id": "m",
                        "object": obj,
                        "mode": mode,
                        "match": match or {"cdp_id": "person.id"},
                        "fields": fields
                        or {
                            "lastname": "traits.last_name",
                            "emailaddress1": "traits.email",
                            "cdp_churnrisk": "scores.churn_risk",
                        },
                    }
                ],
            }
        ]
    }
    (connection,) = parse_connections(document)
    return connection.mapping("m")


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


def _adapter(session, emulator, secret=None):
    return DynamicsAdapter(
        session,
        url=emulator.base_url,
        authority=emulator.base_url,
        tenant_id=emulator.tenant,
        client_id=emulator.client_id,
        client_secret=secret or emulator.client_secret,
        timeout=2.0,
    )


@pytest.fixture
async def dynamics():
    async with DynamicsEmulator() as emulator, aiohttp.ClientSession() as session:
        yield emulator, _adapter(session, emulator)


async def test_upsert_by_alternate_key_in_one_batch_creates_then_updates(dynamics):
    emulator, adapter = dynamics
    contacts = _mapping()
    first = await adapter.send(contacts, _people(contacts, 3, **{"scores.churn_risk": 0.2}))
    assert first.error is None and all(r.ok and r.created for r in first.results.values())
    again = await adapter.send(contacts, _people(contacts, 3, **{"scores.churn_risk": 0.7}))
    assert all(r.ok and r.created is False for r in again.results.values())
    assert {r.crm_id for r in again.results.values()} == {r.crm_id for r in first.results.values()}
    records = emulator.records("contacts")
    assert len(records) == 3 and {r["cdp_churnrisk"] for r in records} == {0.7}
    assert emulator.budget()["window_used"] == 2  # one $batch each


async def test_one_refused_record_does_not_roll_back_the_others(dynamics):
    emulator, adapter = dynamics
    contacts = _mapping()
    emulator.faults.reject(lambda entity_set, values: values.get("lastname") == "Person1", message="plug-in says no")
    changes = _people(contacts, 3)
    isolation = Isolation(changes)
    isolation.record(isolation.next_batch(), await adapter.send(contacts, changes), now=0.0)
    assert len(isolation.synced) == 2
    (dead,) = isolation.dead
    assert dead.change.person_id == "person-1" and dead.crm_code == "0x80040265"
    assert sorted(r["cdp_id"] for r in emulator.records("contacts")) == ["person-0", "person-2"]


async def test_an_unknown_attribute_is_named_by_dataverses_error(dynamics):
    _, adapter = dynamics
    mapping = _mapping(fields={"lastname": "traits.last_name", "shoesize": "traits.shoe"})
    outcome = await adapter.send(mapping, [_change(mapping, "p1", **{"traits.last_name": "L", "traits.shoe": 9})])
    (result,) = outcome.results.values()
    assert result.error.reason == UNKNOWN_FIELD and result.error.code == "0x80060888"


async def test_update_only_never_creates(dynamics):
    emulator, adapter = dynamics
    await adapter.send(_mapping(), _people(_mapping(), 1))
    update_only = _mapping(mode="update_only")
    outcome = await adapter.send(update_only, _people(update_only, 2, **{"scores.churn_risk": 0.9}))
    reasons = sorted((r.ok, r.error.reason if r.error else "") for r in outcome.results.values())
    assert reasons == [(False, NOT_FOUND), (True, "")]
    (only,) = emulator.records("contacts")
    assert only["cdp_churnrisk"] == 0.9


async def test_service_protection_429_carries_retry_after_into_the_budget():
    async with DynamicsEmulator(window_limit=1) as emulator, aiohttp.ClientSession() as session:
        adapter = _adapter(session, emulator)
        contacts = _mapping()
        assert (await adapter.send(contacts, _people(contacts, 1))).error is None
        refused = await adapter.send(contacts, _people(contacts, 1, start=1))
        assert refused.error.reason == THROTTLED and refused.error.retry_after is not None
        budget = Budget.for_kind("dynamics", account="org")
        budget.throttled(1000.0, retry_after=refused.error.retry_after)
        assert budget.reserve(1, 1000.0).wait_until >= 1001.0
        assert len(emulator.records("contacts")) == 1


async def test_a_task_keyed_by_its_idempotency_key_survives_a_lost_answer(dynamics):
    emulator, adapter = dynamics
    tasks = _mapping(obj="tasks", match={"cdp_idempotencykey": "traits.key"}, fields={"subject": "traits.subject"})
    change = _change(tasks, "p1", **{"traits.key": "cdp-0123", "traits.subject": "Call"})
    emulator.faults.drop_after_commit_next()
    assert (await adapter.send(tasks, [change])).error.reason == ANSWER_LOST
    outcome = await adapter.send(tasks, [change])
    (result,) = outcome.results.values()
    assert result.ok and result.created is False and len(emulator.records("tasks")) == 1


async def test_a_wrong_secret_is_an_auth_failure_with_the_aadsts_code():
    async with DynamicsEmulator() as emulator, aiohttp.ClientSession() as session:
        adapter = _adapter(session, emulator, secret="wrong")
        outcome = await adapter.send(_mapping(), _people(_mapping(), 1))
        assert outcome.error.reason == AUTH and "AADSTS7000215" in outcome.error.code


async def test_a_task_is_bound_to_the_persons_contact_by_its_alternate_key(dynamics):
    emulator, adapter = dynamics
    contacts = _mapping()
    await adapter.send(contacts, _people(contacts, 1))
    (connection,) = parse_connections(
        {
            "connections": [
                {
                    "id": "dyn",
                    "kind": "dynamics",
                    "url": "https://org.crm.dynamics.com",
                    "credentials": {"tenant_id": "T", "client_id": "C", "client_secret": "S"},
                    "mappings": [
                        {
                            "id": "m",
                            "object": "contacts",
                            "match": {"cdp_id": "person.id"},
                            "fields": {"lastname": "traits.last_name"},
                        },
                        {
                            "id": "task",
                            "object": "tasks",
                            "action": "task",
                            "idempotency_field": "cdp_idempotencykey",
                            "about": {"mapping": "m", "field": "regardingobjectid_contact"},
                            "fields": {"subject": "action.subject"},
                        },
                    ],
                }
            ]
        }
    )
    task = connection.mapping("task")
    projection = project(task, Source("person-0", action={"id": "act-1", "subject": "Call"}), connection.mapping("m"))
    change = Change(task.name, projection.key, dict(projection.fields), link=projection.link)
    outcome = await adapter.send(task, [change])
    assert all(r.ok for r in outcome.results.values())
    (created,) = emulator.records("tasks")
    (contact,) = emulator.records("contacts")
    assert created["_regardingobjectid_contact_value"] == contact["contactid"]


def _marketing_list(list_id: str):
    document = {
        "connections": [
            {
                "id": "dyn",
                "kind": "dynamics",
                "url": "https://org.crm.dynamics.com",
                "credentials": {"tenant_id": "T", "client_id": "C", "client_secret": "S"},
                "mappings": [
                    {"id": "vip", "object": "contacts", "segment": "vip", "list": list_id, "mode": "mirror",
                     "match": {"cdp_id": "person.id"}},
                ],
            }
        ]
    }  # fmt: skip
    (connection,) = parse_connections(document)
    return connection.mapping("vip")


def _member(mapping, person_id: str, op: str = UPSERT) -> Change:
    return Change(mapping.name, (("cdp_id", person_id),), {}, op=op, person_id=person_id)


async def test_a_segment_becomes_marketing_list_membership(dynamics):
    emulator, adapter = dynamics
    contacts = _mapping()
    await adapter.send(contacts, _people(contacts, 3))
    ids = {r["cdp_id"]: r["contactid"] for r in emulator.records("contacts")}
    listed = emulator.user_create("lists", {"listname": "High value", "membertype": 2, "type": False})
    vip = _marketing_list(listed["listid"])

    for _ in range(2):  # AddMemberList twice (a retry after a lost answer): one member each
        entered = await adapter.send(vip, [_member(vip, "person-0"), _member(vip, "person-1")])
        assert entered.error is None and all(r.ok for r in entered.results.values())
    assert sorted(emulator.list_members(listed["listid"])) == sorted([ids["person-0"], ids["person-1"]])
    assert emulator.budget()["window_used"] == 1 + 2 * 2  # the upsert, then a read and one $batch each time

    for _ in range(2):  # disassociated twice: the second finds no member, and that is fine
        left = await adapter.send(vip, [_member(vip, "person-1", REMOVE), _member(vip, "person-9", REMOVE)])
        assert all(r.ok for r in left.results.values())
    assert emulator.list_members(listed["listid"]) == [ids["person-0"]]

    missing = await adapter.send(vip, [_member(vip, "person-9")])
    (result,) = missing.results.values()
    assert not result.ok and result.error.reason == NOT_FOUND  # the engine waits for the record


def _document(contact_fields=None, match=None, about_field="regardingobjectid_contact"):
    return {
        "connections": [
            {
                "id": "dyn", "kind": "dynamics", "url": "https://org.crm.dynamics.com",
                "credentials": {"tenant_id": "T", "client_id": "C", "client_secret": "S"},
                "mappings": [
                    {"id": "contacts", "object": "contacts", "match": match or {"cdp_id": "person.id"},
                     "fields": contact_fields or {"lastname": "traits.last_name", "emailaddress1": "traits.email"}},
                    {"id": "task", "object": "tasks", "action": "task", "idempotency_field": "cdp_idempotencykey",
                     "about": {"mapping": "contacts", "field": about_field},
                     "fields": {"subject": "action.subject", "description": "action.body"}},
                ],
            }
        ]
    }  # fmt: skip


async def test_describe_feeds_mapping_validation_so_a_typo_fails_at_start_naming_the_field(dynamics):
    emulator, adapter = dynamics
    schema = await adapter.describe(["contacts", "tasks", "cdp_nothings"])
    assert set(schema) == {"contacts", "tasks"}  # a set that is no table is left out: the mapping check names it
    assert emulator.budget()["window_used"] == 3  # one request per object, as the budget was charged
    contacts = schema["contacts"].fields
    assert contacts["cdp_id"].key and contacts["emailaddress1"].key and not contacts["lastname"].key
    assert contacts["lastname"].required and not contacts["emailaddress1"].required
    assert not contacts["fullname"].updateable and contacts["cdp_churnrisk"].type == "Decimal"
    # A lookup is bound through its navigation property, which is the field; the column itself is not.
    assert "parentcustomerid_account" in contacts and "parentcustomerid" not in contacts

    (connection,) = parse_connections(_document(), {"dyn": schema})
    assert connection.mapping("contacts").required == {"lastname"}
    assert connection.mapping("task").required == frozenset({"subject"})

    with pytest.raises(MappingInvalid) as caught:
        parse_connections(_document({"lastnme": "traits.last_name"}), {"dyn": schema})
    assert caught.value.field == "dyn/contacts.fields.lastnme" and "did you mean 'lastname'" in caught.value.message
    with pytest.raises(MappingInvalid) as caught:
        parse_connections(_document({"fullname": "traits.name"}), {"dyn": schema})
    assert "read-only" in caught.value.message
    with pytest.raises(MappingInvalid) as caught:
        parse_connections(_document(match={"lastname": "traits.last_name"}), {"dyn": schema})
    assert caught.value.field == "dyn/contacts.match.lastname" and "alternate key" in caught.value.message
    with pytest.raises(MappingInvalid) as caught:
        parse_connections(_document(about_field="regardingobjectid_contct"), {"dyn": schema})
    assert caught.value.field == "dyn/task.about.field"


def test_a_real_task_definition_binds_regarding_through_either_navigation_property_and_skips_pending_keys():
    # Dataverse names a task's relationship to a contact regardingobjectid_contact_task; the task also
    # carries the activity's regardingobjectid_contact. Both bind the same column.
    definition = {
        "LogicalName": "task",
        "Attributes": [
            {"LogicalName": "subject", "AttributeType": "String", "IsValidForUpdate": True,
             "RequiredLevel": {"Value": "ApplicationRequired"}},
            {"LogicalName": "regardingobjectid", "AttributeType": "Lookup", "IsValidForUpdate": True,
             "RequiredLevel": {"Value": "None"}},
        ],
        "Keys": [
            {"LogicalName": "cdp_task_key", "KeyAttributes": ["cdp_idempotencykey"], "EntityKeyIndexStatus": "Active"},
            {"LogicalName": "cdp_task_subject", "KeyAttributes": ["subject"], "EntityKeyIndexStatus": "Pending"},
        ],
        "ManyToOneRelationships": [
            {"ReferencingAttribute": "regardingobjectid", "ReferencedEntity": "contact",
             "ReferencingEntityNavigationPropertyName": "regardingobjectid_contact_task"},
            {"ReferencingAttribute": "ownerid", "ReferencedEntity": "systemuser",
             "ReferencingEntityNavigationPropertyName": "owninguser"},
        ],
    }  # fmt: skip
    fields = _object_schema("tasks", definition).fields
    assert {"regardingobjectid_contact_task", "regardingobjectid_contact", "owninguser"} <= set(fields)
    assert "regardingobjectid" not in fields and "ownerid_systemuser" not in fields
    assert fields["subject"].required and fields["subject"].updateable
    assert not fields["subject"].key  # its key's index is still being built: upserts by it would fail


async def test_at_start_a_mapping_to_a_field_dataverse_lacks_fails_naming_it_and_describing_spends_the_budget(
    tmp_path,
):
    async with DynamicsEmulator() as emulator, aiohttp.ClientSession() as session:
        document = _document({"lastname": "traits.last_name", "emailadress1": "traits.email"})
        connection = document["connections"][0]
        connection.update(url=emulator.base_url, auth_url=emulator.base_url, account="org-dyn")
        connection["credentials"] = {"tenant_id": "DYN_TENANT", "client_id": "DYN_ID", "client_secret": "DYN_SECRET"}
        env = {"DYN_TENANT": emulator.tenant, "DYN_ID": emulator.client_id, "DYN_SECRET": emulator.client_secret}
        text = orjson.dumps(document)
        connections = load_connections(text)  # the document alone is fine: no schema yet
        async with open_store(f"sqlite:///{tmp_path}/crm.db") as store:
            await prepare_store(store)
            budget = SharedBudget(store, connections[0])
            before = (await budget.status(time.time()))["burst_remaining"]
            schemas = await describe(open_adapters(connections, session, env, timeout=5), connections, store)
            assert (await budget.status(time.time()))["burst_remaining"] == before - 2  # contacts and tasks
        with pytest.raises(MappingInvalid) as caught:
            load_connections(text, schemas)
        assert [p.path for p in caught.value.problems] == ["dyn/contacts.fields.emailadress1"]
        assert "did you mean 'emailaddress1'" in str(caught.value.problems[0])
