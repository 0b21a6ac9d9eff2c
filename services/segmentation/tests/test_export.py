"""PrivacyService/ExportPerson on segmentation (the process as `__main__` sets it up, tokens on): the
person's memberships with their date and the profile fields held for them, a merged person's too; nobody
else's; an empty document for an unknown person; refused to a token without privacy:export."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.protobuf import json_format

from cdp.privacy.v1 import privacy_pb2, privacy_pb2_grpc
from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_kit.auth import write_tokens_file
from cdp_kit.bus import Bus, profiles_stream, subjects
from cdp_kit.service import serving
from cdp_segmentation.__main__ import setup
from cdp_segmentation.settings import SegmentationSettings
from cdp_testing.person_export import assert_person_required, assert_read_scope_refused, assert_unstorable_ids_named

ADMIN = [("authorization", "Bearer admin-token")]
READER = [("authorization", "Bearer reader-token")]


def change(person: str, **traits: str) -> profile_pb2.ProfileChanged:
    message = profile_pb2.ProfileChanged(person_id=person, cause="event")
    message.at.GetCurrentTime()
    for name, value in traits.items():
        message.traits[name].string_value = value
    return message


@pytest.fixture
async def segmentation(nats_server, tmp_path):
    tokens = tmp_path / "tokens.json"
    write_tokens_file(
        tokens, [("admin", "admin-token", ["*"]), ("reader", "reader-token", ["segmentation:read", "profile:read"])]
    )
    settings = SegmentationSettings(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="tokens", auth_tokens_file=tokens,
        partitions=1, shutdown_grace=1.0, store_url="memory://",
    )  # fmt: skip
    async with Bus.connect(nats_server.url, name="export-test") as bus:
        await bus.ensure_streams(profiles_stream())
        async with serving(settings, setup) as runtime:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
                stub = segmentation_pb2_grpc.SegmentationServiceStub(channel)
                definition = segmentation_pb2.Definition(text='traits.plan = "pro"')
                await stub.CreateSegment(
                    segmentation_pb2.CreateSegmentRequest(id="pro", definition=definition, wait=True), metadata=ADMIN
                )
                batch = profile_pb2.ProfileChangedBatch(
                    changes=[
                        change("p_ada", plan="pro", city="Paris"),
                        change("p_ada_old", plan="free", city="Lyon"),
                        change("p_bob", plan="pro", city="Berlin"),
                    ]
                )
                await bus.js.publish(subjects.profiles_changed(0), batch.SerializeToString())
                engine = runtime.parts["engine"]
                deadline = time.monotonic() + 15
                while not {"p_ada", "p_ada_old", "p_bob"} <= set(engine.persons):
                    assert time.monotonic() < deadline, "the changes were not applied"
                    await asyncio.sleep(0.02)
                yield privacy_pb2_grpc.PrivacyServiceStub(channel)


async def _export(privacy, person: str, merged: list[str] | None = None) -> dict:
    request = privacy_pb2.ExportPersonRequest(person_id=person, merged_person_ids=merged or [])
    response = await privacy.ExportPerson(request, metadata=ADMIN)
    assert response.service == "segmentation"
    return json_format.MessageToDict(response.document)


async def test_the_export_holds_the_persons_memberships_and_held_fields_and_no_one_elses(segmentation):
    document = await _export(segmentation, "p_ada", ["p_ada_old"])

    ada, old = document["persons"]
    assert ada["person_id"] == "p_ada"
    [membership] = ada["memberships"]
    assert membership["segment_id"] == "pro" and membership["since"].endswith("Z")
    assert ada["fields"]["traits.plan"] == "pro" and ada["fields"]["traits.city"] == "Paris"
    assert old == {"person_id": "p_ada_old", "memberships": [], "fields": old["fields"]}
    assert old["fields"]["traits.city"] == "Lyon"
    assert "p_bob" not in str(document) and "Berlin" not in str(document)


async def test_an_unknown_person_gets_an_empty_document(segmentation):
    assert await _export(segmentation, "p_nobody") == {}


async def test_a_read_token_cannot_export(segmentation):
    await assert_read_scope_refused(segmentation, READER)


async def test_a_person_id_is_required(segmentation):
    await assert_person_required(segmentation, ADMIN)


async def test_an_id_no_store_can_hold_is_refused_naming_the_field(segmentation):
    await assert_unstorable_ids_named(segmentation, ADMIN)
