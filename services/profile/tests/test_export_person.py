"""PrivacyService/ExportPerson on profile, over gRPC with bearer tokens: what `Export` returns (traits with
history, timeline, scores, the timeline base), with the person merged into them; nobody else's; an empty
document for an unknown person; it and the old `Export` refused to a token with profile:read only."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.protobuf import json_format

from cdp.events.v1 import events_pb2
from cdp.identity.v1 import identity_pb2
from cdp.privacy.v1 import privacy_pb2, privacy_pb2_grpc
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_kit.auth import write_tokens_file
from cdp_kit.bus import Bus, OutMessage, events_resolved_stream, identity_stream, partition_for, subjects
from cdp_kit.service import serving
from cdp_profile.__main__ import setup
from cdp_profile.settings import ProfileSettings
from cdp_testing.person_export import assert_person_required, assert_read_scope_refused, assert_unstorable_ids_named

PARTITIONS = 2
ADMIN = [("authorization", "Bearer admin-token")]
READER = [("authorization", "Bearer reader-token")]


def identify(person: str, n: int, **traits) -> bytes:
    event = events_pb2.Event(message_id=f"m{n}", source_id="web", type=events_pb2.EVENT_TYPE_IDENTIFY)
    event.traits.update(traits)
    resolved = events_pb2.ResolvedEvent(event=event, person_id=person, identifiers=[f"user_id:{person}"])
    return events_pb2.ResolvedEventBatch(events=[resolved]).SerializeToString()


async def until(done, what: str) -> None:
    deadline = time.monotonic() + 15
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def profile(nats_server, tmp_path):
    tokens = tmp_path / "tokens.json"
    write_tokens_file(tokens, [("admin", "admin-token", ["*"]), ("reader", "reader-token", ["profile:read"])])
    settings = ProfileSettings(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="tokens",
        auth_tokens_file=tokens, partitions=PARTITIONS, store_url="memory://", shutdown_grace=1.0,
    )  # fmt: skip
    async with Bus.connect(nats_server.url, name="export-test") as bus:
        await bus.ensure_streams(events_resolved_stream(), identity_stream())
        async with serving(settings, setup) as runtime:
            engine = runtime.parts["engine"]
            for n, (person, name) in enumerate((("p_ada", "Ada"), ("p_ada_old", "Ada L."), ("p_bob", "Bob"))):
                subject = subjects.events_resolved(partition_for(person, PARTITIONS))
                await bus.js.publish(subject, identify(person, n, name=name, email=f"{person}@example.com"))
            await until(lambda: all(p in engine.profiles for p in ("p_ada", "p_ada_old", "p_bob")), "profiles")
            merged = identity_pb2.IdentityMerged(merge_id="m1", winner="p_ada", loser="p_ada_old")
            subject = subjects.identity_merged(partition_for("p_ada", PARTITIONS))
            await bus.publisher.publish_batch([OutMessage(subject, merged.SerializeToString(), "merge:m1")])
            await until(lambda: engine.hot.root("p_ada_old") == "p_ada", "the merge applied")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
                yield profile_pb2_grpc.ProfileServiceStub(channel), privacy_pb2_grpc.PrivacyServiceStub(channel)


async def _export(privacy, person: str, merged: list[str] | None = None) -> dict:
    request = privacy_pb2.ExportPersonRequest(person_id=person, merged_person_ids=merged or [])
    response = await privacy.ExportPerson(request, metadata=ADMIN)
    assert response.service == "profile"
    return json_format.MessageToDict(response.document)


async def test_the_export_is_the_profile_record_with_the_merged_persons_and_no_one_elses(profile):
    stub, privacy = profile
    document = await _export(privacy, "p_ada", ["p_ada_old"])

    assert document["person_id"] == "p_ada"
    assert document["merged_from"] == ["p_ada_old"]
    names = [v["value"] for v in document["traits"]["name"]["history"]]
    assert sorted(names) == ["Ada", "Ada L."]
    assert {"timeline", "timeline_base", "scores", "consent", "identifiers"} <= set(document)
    assert "held_apart" not in document  # the merged person is in the profile, not given twice
    assert "p_bob" not in str(document) and "Bob" not in str(document)
    # The same record `Export` gives.
    old = await stub.Export(profile_pb2.ExportRequest(person_id="p_ada"), metadata=ADMIN)
    assert json_format.MessageToDict(old.document)["traits"] == document["traits"]


async def test_an_unknown_person_gets_an_empty_document(profile):
    _stub, privacy = profile
    assert await _export(privacy, "p_nobody") == {}


async def test_a_read_token_can_neither_export_nor_use_the_old_export(profile):
    stub, privacy = profile
    await assert_read_scope_refused(privacy, READER)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Export(profile_pb2.ExportRequest(person_id="p_ada"), metadata=READER)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "privacy:export" in caught.value.details()
    # Reading the profile is still a reader's.
    assert (await stub.GetProfile(profile_pb2.GetProfileRequest(person_id="p_ada"), metadata=READER)).person_id


async def test_a_person_id_is_required(profile):
    _stub, privacy = profile
    await assert_person_required(privacy, ADMIN)


async def test_an_id_no_store_can_hold_is_refused_naming_the_field(profile):
    _stub, privacy = profile
    await assert_unstorable_ids_named(privacy, ADMIN)
