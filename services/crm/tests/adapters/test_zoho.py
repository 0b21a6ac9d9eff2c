"""The Zoho adapter against the local Zoho CRM: refresh tokens, upsert with duplicate_check_fields, per-record
answers (also in a 400), credits, describe, lost answers."""

from __future__ import annotations

import aiohttp
import pytest

from cdp_crm.adapters.zoho import ZohoAdapter
from cdp_crm.domain.coalesce import REMOVE, UPSERT, Change
from cdp_crm.domain.isolation import ANSWER_LOST, AUTH, DUPLICATE, INVALID_VALUE, NOT_FOUND, THROTTLED, Isolation
from cdp_crm.domain.mapping import MappingInvalid, parse_connections
from cdp_crm.domain.projection import Source, project
from cdp_crm_emulators.zoho import ZohoEmulator

REFRESH = "1000.local-refresh-token"


def _document(fields=None, match=None):
    return {
        "connections": [
            {
                "id": "zoho",
                "kind": "zoho",
                "credentials": {"client_id": "Z_ID", "client_secret": "Z_SECRET", "refresh_token": "Z_REFRESH"},
                "mappings": [
                    {
                        "id": "contacts",
                        "object": "Contacts",
                        "match": match or {"CDP_Id": "person.id"},
                        "fields": fields
                        or {
                            "Last_Name": "traits.last_name",
                            "Email": "traits.email",
                            "Churn_Risk": "scores.churn_risk",
                        },
                    }
                ],
            }
        ]
    }


def _contacts(**kwargs):
    (connection,) = parse_connections(_document(**kwargs))
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


def _adapter(session, emulator, refresh=REFRESH):
    return ZohoAdapter(
        session,
        client_id=emulator.client_id,
        client_secret=emulator.client_secret,
        refresh_token=refresh,
        accounts_url=emulator.base_url,
        timeout=2.0,
    )


@pytest.fixture
async def zoho():
    async with ZohoEmulator() as emulator, aiohttp.ClientSession() as session:
        yield emulator, _adapter(session, emulator)


async def test_upsert_with_duplicate_check_fields_creates_then_updates(zoho):
    emulator, adapter = zoho
    contacts = _contacts()
    first = await adapter.send(contacts, _people(contacts, 3, **{"scores.churn_risk": 0.1}))
    assert first.error is None and all(r.ok and r.created for r in first.results.values())
    again = await adapter.send(contacts, _people(contacts, 3, **{"scores.churn_risk": 0.6}))
    assert all(r.ok and r.created is False for r in again.results.values())
    records = emulator.records("Contacts")
    assert len(records) == 3 and {r["Churn_Risk"] for r in records} == {0.6}


async def test_per_record_errors_come_back_even_when_none_was_written(zoho):
    _, adapter = zoho
    contacts = _contacts()
    await adapter.send(contacts, _people(contacts, 1))
    # Someone else's contact already holds this email: a unique field clash.
    clash = _change(contacts, "person-new", **{"traits.last_name": "N", "traits.email": "p0@example.com"})
    bad = _change(contacts, "person-bad", **{"traits.last_name": "B", "traits.email": "nope"})
    isolation = Isolation([clash, bad])
    isolation.record(isolation.next_batch(), await adapter.send(contacts, [clash, bad]), now=0.0)
    assert isolation.done and not isolation.retry and not isolation.synced
    reasons = {d.change.person_id: (d.reason, d.crm_code) for d in isolation.dead}
    assert reasons == {"person-new": (DUPLICATE, "DUPLICATE_DATA"), "person-bad": (INVALID_VALUE, "INVALID_DATA")}
    assert isolation.requests == 1  # answered per record: nothing to split


async def test_exhausted_credits_are_throttled_for_the_day():
    async with ZohoEmulator(daily_credits=1) as emulator, aiohttp.ClientSession() as session:
        adapter = _adapter(session, emulator)
        contacts = _contacts()
        assert (await adapter.send(contacts, _people(contacts, 1))).error is None
        refused = await adapter.send(contacts, _people(contacts, 1, start=1))
        assert refused.error.reason == THROTTLED and refused.error.daily and refused.error.code == "LIMIT_REACHED"
        assert len(emulator.records("Contacts")) == 1


async def test_a_dropped_connection_then_a_retry_leaves_one_record(zoho):
    emulator, adapter = zoho
    contacts = _contacts()
    assert (await adapter.send(contacts, _people(contacts, 1, start=9))).error is None
    emulator.faults.drop_after_commit_next()
    assert (await adapter.send(contacts, _people(contacts, 2))).error.reason == ANSWER_LOST
    retried = await adapter.send(contacts, _people(contacts, 2, **{"scores.churn_risk": 0.3}))
    assert all(r.ok and r.created is False for r in retried.results.values())
    assert len(emulator.records("Contacts")) == 3


async def test_an_expired_token_is_refreshed_and_a_bad_refresh_token_is_an_auth_failure(zoho):
    emulator, adapter = zoho
    contacts = _contacts()
    assert (await adapter.send(contacts, _people(contacts, 1))).error is None
    emulator.tokens.clear()
    assert (await adapter.send(contacts, _people(contacts, 1, start=1))).error is None
    async with aiohttp.ClientSession() as session:
        outcome = await _adapter(session, emulator, refresh="1000.revoked").send(contacts, _people(contacts, 1))
        assert outcome.error.reason == AUTH and outcome.error.code == "invalid_code"


async def test_describe_marks_unique_fields_as_match_keys(zoho):
    _, adapter = zoho
    schema = await adapter.describe(["Contacts", "Nope"])
    assert set(schema) == {"Contacts"} and schema["Contacts"].fields["Email"].key
    assert parse_connections(_document(match={"Email": "traits.email"}), {"zoho": schema})
    with pytest.raises(MappingInvalid) as caught:
        parse_connections(_document(match={"Last_Name": "traits.last_name"}), {"zoho": schema})
    assert caught.value.field == "zoho/contacts.match.Last_Name"


async def test_describe_says_which_mapped_fields_zoho_requires(zoho):
    # An anonymised contact keeps a placeholder there (privacy.py): Zoho refuses one without a last name.
    _, adapter = zoho
    schema = await adapter.describe(["Contacts"])
    assert schema["Contacts"].fields["Last_Name"].required and not schema["Contacts"].fields["Email"].required
    (connection,) = parse_connections(_document(), {"zoho": schema})
    assert connection.mapping("contacts").required == {"Last_Name"}


def _campaign(campaign_id: str, mode: str = "mirror"):
    document = _document()
    document["connections"][0]["mappings"].append(
        {"id": "vip", "object": "Contacts", "segment": "vip", "list": campaign_id, "mode": mode,
         "match": {"CDP_Id": "person.id"}}
    )  # fmt: skip
    (connection,) = parse_connections(document)
    return connection.mapping("vip")


def _member(mapping, person_id: str, op: str = UPSERT) -> Change:
    return Change(mapping.name, (("CDP_Id", person_id),), {}, op=op, person_id=person_id)


async def test_a_segment_becomes_campaign_membership_through_the_related_list(zoho):
    emulator, adapter = zoho
    campaign = emulator.user_create("Campaigns", {"Campaign_Name": "High value"})
    contacts, vip = _contacts(), _campaign(campaign["id"])
    await adapter.send(contacts, _people(contacts, 3))
    ids = {r["CDP_Id"]: r["id"] for r in emulator.records("Contacts")}

    for _ in range(2):  # entering twice (a retry after a lost answer) relates each contact once
        entered = await adapter.send(vip, [_member(vip, "person-0"), _member(vip, "person-1")])
        assert entered.error is None and all(r.ok for r in entered.results.values())
    assert sorted(emulator.campaign_members(campaign["id"])) == sorted([ids["person-0"], ids["person-1"]])

    left = await adapter.send(vip, [_member(vip, "person-1", REMOVE), _member(vip, "person-9", REMOVE)])
    assert all(r.ok for r in left.results.values())  # person-9 has no record: not a member either
    assert emulator.campaign_members(campaign["id"]) == [ids["person-0"]]

    missing = await adapter.send(vip, [_member(vip, "person-9")])
    (result,) = missing.results.values()
    assert not result.ok and result.error.reason == NOT_FOUND  # the engine waits for the record
