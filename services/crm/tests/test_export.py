"""PrivacyService/ExportPerson on the CRM connector, in-process over gRPC with bearer tokens, syncing to the
local HubSpot: per connection, the person's records (provider, object, the CRM's id, the values last
synced), what is queued or dead-lettered for them and what the inbound side saw of them; their view; those
of the persons merged into them; nobody else's; empty for an unknown person; refused without
privacy:export."""

from __future__ import annotations

import json
import re
import time

import grpc
import pytest
from google.protobuf import json_format

from cdp.privacy.v1 import privacy_pb2, privacy_pb2_grpc
from cdp.profile.v1 import profile_pb2
from cdp_crm.__main__ import setup
from cdp_crm.settings import CrmSettings
from cdp_crm.state import CURSORS, DEAD_LETTERS, RECORDS
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_kit.auth import write_tokens_file
from cdp_kit.bus import OutMessage, partition_for, subjects
from cdp_kit.service import serving
from cdp_kit.storage import Put
from cdp_kit.timestamps import from_seconds
from cdp_testing.crm import hubspot_document
from cdp_testing.person_export import assert_person_required, assert_read_scope_refused, assert_unstorable_ids_named
from cdp_testing.waiting import eventually

from .conftest import TOKEN

PARTITIONS = 2
ADMIN = [("authorization", "Bearer admin-token")]
READER = [("authorization", "Bearer reader-token")]
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@pytest.fixture
async def service(nats_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HUBSPOT_TOKEN", TOKEN)
    tokens = tmp_path / "tokens.json"
    write_tokens_file(tokens, [("admin", "admin-token", ["*"]), ("reader", "reader-token", ["crm:read"])])
    async with HubSpotEmulator() as emulator:
        connections = tmp_path / "connections.json"
        connections.write_text(json.dumps(hubspot_document(emulator.base_url)))
        settings = CrmSettings(
            nats_url=nats_server.url,
            grpc_host="127.0.0.1",
            grpc_port=0,
            auth_mode="tokens",
            auth_tokens_file=tokens,
            partitions=PARTITIONS,
            shutdown_grace=1.0,
            store_url=f"sqlite:///{tmp_path / 'crm.db'}",
            connections_file=connections,
        )
        async with serving(settings, setup) as runtime:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
                yield privacy_pb2_grpc.PrivacyServiceStub(channel), runtime, emulator


async def _profile(runtime, person: str, **traits: str) -> None:
    change = profile_pb2.ProfileChanged(person_id=person, cause="event", at=from_seconds(time.time()))
    for name, value in traits.items():
        change.traits[name].string_value = value
    batch = profile_pb2.ProfileChangedBatch(changes=[change]).SerializeToString()
    subject = subjects.profiles_changed(partition_for(person, PARTITIONS))
    [result] = await runtime.parts["bus"].publisher.publish_batch([OutMessage(subject, batch, f"pc-{person}")])
    assert result.ok


async def _export(privacy, person: str, merged: list[str] | None = None) -> dict:
    request = privacy_pb2.ExportPersonRequest(person_id=person, merged_person_ids=merged or [])
    response = await privacy.ExportPerson(request, metadata=ADMIN)
    assert response.service == "crm"
    return json_format.MessageToDict(response.document)


async def test_a_person_gets_what_every_connection_keeps_about_them_and_nothing_of_anyone_else(service):
    privacy, runtime, emulator = service
    store = runtime.parts["store"]
    await _profile(runtime, "ada", email="ada@example.com", first_name="Ada")
    await _profile(runtime, "ada-old", email="ada.old@example.com", first_name="Ada")  # merged into ada
    await _profile(runtime, "bob", email="bob@example.com", first_name="Bob")
    for person in ("ada", "ada-old", "bob"):
        await eventually(lambda p=person: emulator.find("contacts", "cdp_id", p), timeout=15.0)

    async def synced(person):
        found = await store.find(RECORDS, "person_id", person)
        return found[0] if found and found[0].doc.get("crm_id") else None

    ada_record = await eventually(lambda: synced("ada"), timeout=15.0)
    # A refusal kept for ada's record, and what the inbound side read of her contact.
    await store.bulk_write(
        [
            Put(
                DEAD_LETTERS,
                ada_record.key,
                {
                    "connection": "hs",
                    "mapping": "hs/contacts",
                    "record": ada_record.key,
                    "person_id": "ada",
                    "reason": "invalid_field",
                    "crm_code": "INVALID_EMAIL",
                    "crm_message": "ada@example.com is bad",
                    "http_status": 400,
                    "failed_at": time.time(),
                    "attempts": 3,
                    "change": {"fields": {"x": "y"}},
                },
            ),
            Put(CURSORS, f"hs:contacts:{ada_record.doc['crm_id']}", {"watched": None, "digest": "d", "stamp": 1.7e9}),
        ]
    )

    document = await _export(privacy, "ada", ["ada-old"])
    assert [v["person_id"] for v in document["views"]] == ["ada", "ada-old"]
    assert document["views"][0]["fields"]["traits.email"] == "ada@example.com"
    [connection] = document["connections"]
    assert connection["connection"] == "hs" and connection["provider"] == "hubspot"
    records = {r["person_id"]: r for r in connection["records"]}
    assert set(records) == {"ada", "ada-old"}
    ada = records["ada"]
    assert ada["object"] == "contacts" and ada["state"] == "synced"
    assert ada["remote_id"] == emulator.find("contacts", "cdp_id", "ada")["id"]
    assert ada["fields"]["email"] == "ada@example.com" and ada["fields"]["firstname"] == "Ada"
    assert RFC3339.match(ada["synced_at"]) and RFC3339.match(ada["updated_at"])
    letter = ada["dead_letter"]
    assert letter["crm_code"] == "INVALID_EMAIL" and RFC3339.match(letter["failed_at"])
    assert "crm_message" not in letter and "change" not in letter  # ids and the verdict only
    assert ada["inbound"]["read_at"] == "2023-11-14T22:13:20Z"
    assert records["ada-old"]["fields"]["email"] == "ada.old@example.com"
    assert "bob" not in json.dumps(document).lower()

    bob = await _export(privacy, "bob")
    assert "ada" not in json.dumps(bob).lower()
    assert [r["person_id"] for r in bob["connections"][0]["records"]] == ["bob"]
    # Without the merged id, ada-old's record is not in ada's answer.
    assert {r["person_id"] for r in (await _export(privacy, "ada"))["connections"][0]["records"]} == {"ada"}


async def test_an_unknown_person_gets_an_empty_document(service):
    privacy, _, _ = service
    assert await _export(privacy, "nobody-known", ["nobody-either"]) == {}


async def test_a_read_scope_cannot_export_a_person(service):
    privacy, _, _ = service
    await assert_read_scope_refused(privacy, READER)


async def test_a_person_id_is_required(service):
    privacy, _, _ = service
    await assert_person_required(privacy, ADMIN)


async def test_an_id_the_store_cannot_hold_is_refused_naming_the_field(service):
    privacy, _, _ = service
    await assert_unstorable_ids_named(privacy, ADMIN)
