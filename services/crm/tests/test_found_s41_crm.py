"""Defects found by trying the CRM connector as a customer, an operator and an attacker would (session 41).

A mapping's `integer` transform turned a profile value such as "100000000000000000000" (a trait the
collector and profile took as text, or a number of 1e20) into a Python int of 21 digits. The CRM took the
write (HubSpot holds properties as text), then the connector's store refused the record document (an
integer outside the signed 64-bit range): the batch failed, the partition recovered and ran it again -
writing the CRM again each time - until the kit dead-lettered the input message, with every other
person's change in it, and none of the batch's records was ever recorded as synced. Now a value the
transform cannot make a 64-bit integer counts as missing, as a value it cannot handle always did. The
same commit failed for whatever a connections document put there itself: a constant (`value`, `default`,
a `map` value) of more than 64 bits, NaN, an object with a `$` key, or a CRM field named `$...`; the
document is now refused at start naming each one.

A match key's field mapped again from another source (`match: {cdp_id: person.id}`, `fields: {cdp_id:
traits.legacy_id}`) was accepted: the first upsert wrote the legacy id over the key it matched by, and the
person's next change, upserted by `cdp_id`, found no contact and was refused by HubSpot as a duplicate of
the first's email (409): every later change of the person dead-lettered. Such a document is now refused;
a field mapped exactly as its key (`email: traits.email` beside a match on email) is still taken.

A connection's `limits` were only checked to be positive numbers: `burst: 100000000000000000000` or
`window_seconds: .inf` went into the account's budget document, which the store refused at every batch's
commit, and `burst: 0.5` became a burst of 0 requests (a ValueError at every batch): no write ever reached
the CRM and each input message was dead-lettered once its redeliveries ran out. They are now refused at
start: whole numbers of requests from 1 to 2**53, a window above 0 of at most a day.

A profile value the store cannot keep - a score of NaN (a double on the bus), a trait holding an object
with a `$` or NUL key (`{"$oid": ...}`) - went into the person's view (and, mapped, the record) and failed
the batch at its commit the same way; it now reads as gone, as a value a transform cannot handle does.

A profile change or segment event naming a person id the store cannot key (empty, over 1,024 characters,
a NUL: no service sends one, any NATS publisher can) failed every batch holding it, and the partition
retried it - every other person's changes held behind it - for minutes, until the kit dead-lettered the
message with the others' changes in it. Such a change or event is now left out and dead-lettered alone
(`reject_part`, reason `invalid_person_id`); an action naming one is rejected whole.

GetRun with a run id the store cannot hold (over 1,024 characters, a NUL) was refused naming the store's
`key`, not the request's `run_id`.

In-process on a real nats-server, the local HubSpot and a SQLite store (conftest.py's world)."""

from __future__ import annotations

import time

import pytest

from cdp.crm.v1 import crm_pb2
from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2
from cdp_crm.api import CrmApi
from cdp_crm.domain.coalesce import record_key
from cdp_crm.domain.mapping import MappingInvalid, parse_connections
from cdp_crm.state import RECORDS
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_kit.bus import subjects
from cdp_kit.errors import InvalidArgument
from cdp_kit.timestamps import from_seconds
from cdp_testing.crm import hubspot_document


def _key(person: str) -> str:
    return record_key("hs/contacts", (("cdp_id", person),))


async def _synced(world, person: str):
    record = await world.store.get(RECORDS, _key(person))
    return record.doc if record is not None and record.doc.get("state") == "synced" else None


async def test_an_integer_transform_of_a_number_past_64_bits_is_missing_and_the_batch_goes_through(world_factory):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        document = world.document()
        fields = document["connections"][0]["mappings"][0]["fields"]
        fields["cdp_lifetime_value"] = {"source": "traits.ltv", "transform": "integer"}
        await world.start(document)
        # Two persons of one partition: one ProfileChangedBatch, one input message.
        big = "big-0"
        fine = next(f"fine-{i}" for i in range(100) if world.partition(f"fine-{i}") == world.partition(big))
        await world.profiles(
            {
                big: {"traits.email": "big@example.com", "traits.ltv": "100000000000000000000"},
                fine: {"traits.email": "fine@example.com", "traits.ltv": "1234.7"},
            }
        )
        fine_record = await world.eventually(lambda: _synced(world, fine))
        big_record = await world.eventually(lambda: _synced(world, big))
        assert fine_record["fields"] == {"email": "fine@example.com", "cdp_lifetime_value": 1234}
        assert big_record["fields"] == {"email": "big@example.com"}  # the value it cannot hold: left out
        contact = emulator.find("contacts", "cdp_id", big)
        assert contact["properties"]["email"] == "big@example.com"
        assert "cdp_lifetime_value" not in contact["properties"]

        # The partition goes on: a later change of the same person is written.
        await world.profiles({big: {"traits.ltv": "-9223372036854775808"}})  # the lowest a store holds

        async def written():
            record = await _synced(world, big)
            return record if record and "cdp_lifetime_value" in record["fields"] else None

        record = await world.eventually(written)
        assert record["fields"]["cdp_lifetime_value"] == -(2**63)


def test_a_document_naming_what_the_store_cannot_keep_is_refused_naming_each_field():
    document = hubspot_document("http://127.0.0.1:1")
    fields = document["connections"][0]["mappings"][0]["fields"]
    fields.update(
        {
            "company": {"value": 10**20},
            "city": {"source": "traits.city", "default": float("nan")},
            "country": {"source": "traits.country", "map": {"uk": {"$set": "GB"}}},
            "$where": "traits.x",
            "lifecyclestage": {"source": "traits.stage", "map": {"a": "lead"}, "default": 2**63 - 1},  # storable
        }
    )
    with pytest.raises(MappingInvalid) as refused:
        parse_connections(document)
    assert [p.path for p in refused.value.problems] == [
        "hs/contacts.fields.company.value",
        "hs/contacts.fields.city.default",
        "hs/contacts.fields.country.map.uk",
        "hs/contacts.fields.$where",
    ]


def test_a_match_key_field_mapped_from_something_else_is_refused():
    document = hubspot_document("http://127.0.0.1:1")
    contacts, task = document["connections"][0]["mappings"]
    contacts["fields"]["cdp_id"] = "traits.legacy_id"
    task["fields"]["cdp_idempotency_key"] = "action.id"
    with pytest.raises(MappingInvalid) as refused:
        parse_connections(document)
    assert [p.path for p in refused.value.problems] == [
        "hs/contacts.fields.cdp_id",
        "hs/success-task.fields.cdp_idempotency_key",
    ]

    same = hubspot_document("http://127.0.0.1:1")
    contacts = same["connections"][0]["mappings"][0]
    contacts["match"] = {"email": "traits.email"}  # its key, written as it is matched: one value
    assert contacts["fields"]["email"] == "traits.email"
    parse_connections(same)


async def test_a_run_id_the_store_cannot_hold_is_refused_naming_run_id(world_factory):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start()
        api = CrmApi(store=world.store, connections=world.connections, deliverer=world.logic.deliverer, budgets={},
                     runs=None)  # fmt: skip
        for run_id in ("r" * 1025, "run\x00"):
            with pytest.raises(InvalidArgument) as refused:
                await api.GetRun(crm_pb2.GetRunRequest(run_id=run_id), None)
            assert refused.value.field == "run_id"


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        ({"burst": 10**20, "window_seconds": 10}, "burst"),
        ({"burst": 0.5, "window_seconds": 10}, "burst"),
        ({"daily": 1e300}, "daily"),
        ({"burst": 100, "window_seconds": float("inf")}, "window_seconds"),
        ({"burst": 100, "window_seconds": float("nan")}, "window_seconds"),
    ],
)
def test_limits_a_budget_cannot_keep_or_use_are_refused_naming_the_limit(limits, field):
    with pytest.raises(MappingInvalid) as refused:
        parse_connections(hubspot_document("http://127.0.0.1:1", **limits))
    assert [p.path for p in refused.value.problems] == [f"hs.limits.{field}"]


def test_the_documented_limits_are_taken():
    (connection,) = parse_connections(
        hubspot_document("http://127.0.0.1:1", burst=190.0, window_seconds=0.5, daily=250_000)
    )
    assert (connection.limits.burst, connection.limits.window_seconds, connection.limits.daily) == (190, 0.5, 250_000)


async def test_profile_values_the_store_cannot_keep_read_as_gone_and_the_batch_goes_through(world_factory):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start()  # no profile service: the views keep every field, mapped or not
        odd = "odd-0"
        fine = next(f"fine-{i}" for i in range(100) if world.partition(f"fine-{i}") == world.partition(odd))
        batch = profile_pb2.ProfileChangedBatch()
        for person in (odd, fine):
            change = batch.changes.add(person_id=person, cause="event", at=from_seconds(time.time()))
            change.traits["email"].string_value = f"{person}@example.com"
            if person == odd:
                change.traits["first_name"].struct_value.update({"$oid": "5f1d"})  # mapped
                change.traits["nickname"].struct_value.update({"a\x00b": 1})  # not mapped
                change.scores["churn_risk"] = float("nan")  # mapped, round:2
            else:
                change.traits["first_name"].string_value = "Fay"
                change.scores["churn_risk"] = 0.123
        await world._publish(subjects.profiles_changed(world.partition(odd)), batch.SerializeToString())

        fine_record = await world.eventually(lambda: _synced(world, fine))
        odd_record = await world.eventually(lambda: _synced(world, odd))
        assert fine_record["fields"] == {"email": f"{fine}@example.com", "firstname": "Fay", "cdp_churn_risk": 0.12}
        assert odd_record["fields"] == {"email": "odd-0@example.com"}
        contact = emulator.find("contacts", "cdp_id", odd)
        assert contact["properties"]["email"] == "odd-0@example.com"
        assert not contact["properties"].get("firstname")


async def test_a_change_or_event_naming_a_person_id_the_store_cannot_key_is_left_out_alone(world_factory):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        list_id = await world.start_with_list()
        fine = "fine-0"
        p = world.partition(fine)
        changes = profile_pb2.ProfileChangedBatch()
        for person in ("x" * 1025, fine, "a\x00b", ""):
            change = changes.changes.add(person_id=person, cause="event", at=from_seconds(time.time()))
            change.traits["email"].string_value = "fine@example.com" if person == fine else "odd@example.com"
        await world._publish(subjects.profiles_changed(p), changes.SerializeToString())
        events = segmentation_pb2.SegmentEventBatch()
        for i, person in enumerate(("", fine, "y" * 2000)):
            events.events.add(id=f"e{i}", person_id=person, segment_id="high_value", entered=True, reason="event")
        await world._publish(subjects.segments_entered(p), events.SerializeToString())

        record = await world.eventually(lambda: _synced(world, fine))
        assert record["fields"] == {"email": "fine@example.com"}
        contact = emulator.find("contacts", "cdp_id", fine)
        await world.eventually(lambda: contact["id"] in emulator.members(list_id) or None)
        assert [c["properties"]["cdp_id"] for c in emulator.records("contacts")] == [fine]
