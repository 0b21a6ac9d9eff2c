"""PrivacyService/ExportPerson on scoring (the process as `__main__` sets it up, tokens on): the profile
fields held for the person and what its scores were when last published, a merged person's too; nobody
else's; an empty document for an unknown person; refused to a token without privacy:export."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.protobuf import json_format

from cdp.privacy.v1 import privacy_pb2, privacy_pb2_grpc
from cdp.profile.v1 import profile_pb2
from cdp_kit.auth import write_tokens_file
from cdp_kit.bus import Bus, partition_for, profiles_stream, subjects
from cdp_kit.service import serving
from cdp_scoring.__main__ import setup
from cdp_testing.person_export import assert_person_required, assert_read_scope_refused, assert_unstorable_ids_named

from .conftest import settings

ADMIN = [("authorization", "Bearer admin-token")]
READER = [("authorization", "Bearer reader-token")]
PERSONS = {"p_ada": "Paris", "p_ada_old": "Lyon", "p_bob": "Berlin"}


def change(person: str, city: str) -> profile_pb2.ProfileChanged:
    message = profile_pb2.ProfileChanged(person_id=person, cause="event")
    message.at.GetCurrentTime()
    message.traits["city"].string_value = city
    return message


@pytest.fixture
async def scoring(nats_server, tmp_path):
    tokens = tmp_path / "tokens.json"
    write_tokens_file(
        tokens, [("admin", "admin-token", ["*"]), ("reader", "reader-token", ["scoring:read", "profile:read"])]
    )
    config = settings(nats_server, tmp_path, auth_mode="tokens", auth_tokens_file=tokens)
    async with Bus.connect(nats_server.url, name="export-test") as bus:
        await bus.ensure_streams(profiles_stream())
        async with serving(config, setup) as runtime:
            engine = runtime.parts["engine"]
            for person, city in PERSONS.items():
                batch = profile_pb2.ProfileChangedBatch(changes=[change(person, city)])
                await bus.js.publish(
                    subjects.profiles_changed(partition_for(person, config.partitions)), batch.SerializeToString()
                )
            deadline = time.monotonic() + 15
            while not set(PERSONS) <= set(engine.fields):
                assert time.monotonic() < deadline, "the changes were not applied"
                await asyncio.sleep(0.02)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
                yield privacy_pb2_grpc.PrivacyServiceStub(channel), engine


async def _export(privacy, person: str, merged: list[str] | None = None) -> dict:
    request = privacy_pb2.ExportPersonRequest(person_id=person, merged_person_ids=merged or [])
    response = await privacy.ExportPerson(request, metadata=ADMIN)
    assert response.service == "scoring"
    return json_format.MessageToDict(response.document)


async def test_the_export_holds_the_persons_fields_and_last_published_scores_and_no_one_elses(scoring):
    privacy, engine = scoring
    # What the stream path records once a churn score of model version v3 is durable on scores.updated.
    engine.published.record("p_ada", "churn_risk", ["v3", 0.25])
    engine.published.record("p_bob", "churn_risk", ["v3", 0.75])

    document = await _export(privacy, "p_ada", ["p_ada_old"])

    ada, old = document["persons"]
    assert ada["person_id"] == "p_ada" and ada["fields"] == {"traits.city": "Paris"}
    assert ada["last_change_at"].endswith("Z")
    # The model is not deployed here: the values come in the version's order, without names.
    assert ada["published"] == {"churn_risk": {"version": "v3", "scores": [0.25]}}
    assert old["person_id"] == "p_ada_old" and old["fields"] == {"traits.city": "Lyon"} and old["published"] == {}
    assert "p_bob" not in str(document) and "Berlin" not in str(document) and "0.75" not in str(document)


async def test_an_unknown_person_gets_an_empty_document(scoring):
    privacy, _engine = scoring
    assert await _export(privacy, "p_nobody") == {}


async def test_a_read_token_cannot_export(scoring):
    privacy, _engine = scoring
    await assert_read_scope_refused(privacy, READER)


async def test_a_person_id_is_required(scoring):
    privacy, _engine = scoring
    await assert_person_required(privacy, ADMIN)


async def test_an_id_no_store_can_hold_is_refused_naming_the_field(scoring):
    privacy, _engine = scoring
    await assert_unstorable_ids_named(privacy, ADMIN)
