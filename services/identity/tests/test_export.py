"""PrivacyService/ExportPerson on identity, over gRPC with bearer tokens: the person's graph (identifiers
with their values, merges, separations, quarantines), that of a person merged into them; nothing of
anyone else; an empty document for an unknown person; refused to a token without privacy:export."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import json_format

from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp.privacy.v1 import privacy_pb2, privacy_pb2_grpc
from cdp_identity.__main__ import setup
from cdp_identity.settings import IdentitySettings
from cdp_kit.auth import write_tokens_file
from cdp_kit.service import serving
from cdp_testing.person_export import assert_person_required, assert_read_scope_refused, assert_unstorable_ids_named

ADMIN = [("authorization", "Bearer admin-token")]
READER = [("authorization", "Bearer reader-token")]


@pytest.fixture
async def identity(nats_server, tmp_path):
    tokens = tmp_path / "tokens.json"
    write_tokens_file(
        tokens,
        [("admin", "admin-token", ["*"]), ("reader", "reader-token", ["identity:read", "profile:read"])],
    )
    key_file = tmp_path / "privacy-hash.key"
    key_file.write_text("export-test-identifier-hash-key-0123456789\n")
    settings = IdentitySettings(
        nats_url=nats_server.url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        auth_mode="tokens",
        auth_tokens_file=tokens,
        privacy_hash_key_file=key_file,
        store_url="memory://",
        partitions=1,
        batch_size=10,
        shutdown_grace=1.0,
    )
    async with serving(settings, setup) as runtime:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
            yield identity_pb2_grpc.IdentityServiceStub(channel), privacy_pb2_grpc.PrivacyServiceStub(channel)


def _ids(*pairs: tuple[str, str]) -> list[identity_pb2.Identifier]:
    return [identity_pb2.Identifier(type=t, value=v) for t, v in pairs]


async def _resolve(stub, *pairs: tuple[str, str]) -> str:
    reply = await stub.Resolve(identity_pb2.ResolveRequest(identifiers=_ids(*pairs)), metadata=ADMIN)
    return reply.person_id


async def _export(privacy, person: str, merged: list[str] | None = None) -> dict:
    request = privacy_pb2.ExportPersonRequest(person_id=person, merged_person_ids=merged or [])
    response = await privacy.ExportPerson(request, metadata=ADMIN)
    assert response.service == "identity"
    return json_format.MessageToDict(response.document)


async def test_the_export_holds_the_persons_graph_with_its_merges_and_quarantines_and_no_one_elses(identity):
    stub, privacy = identity
    ada = await _resolve(stub, ("user_id", "ada-1"), ("email", "ada@example.com"))
    old = await _resolve(stub, ("anonymous_id", "ada-phone"))
    bob = await _resolve(stub, ("user_id", "bob-1"), ("email", "bob@example.com"))
    merged = await stub.Merge(
        identity_pb2.MergeRequest(person_id=ada, other_person_id=old, reason="same phone"), metadata=ADMIN
    )
    winner = merged.person_id
    await stub.SetQuarantine(
        identity_pb2.SetQuarantineRequest(identifier=_ids(("anonymous_id", "ada-phone"))[0], quarantined=True),
        metadata=ADMIN,
    )
    loser = old if winner == ada else ada

    document = await _export(privacy, winner, [loser])

    [person] = document["persons"]  # the merged person is part of the one graph, given once
    assert person["person_id"] == winner
    identifiers = {(i["type"], i["value"]): i for i in person["identifiers"]}
    assert set(identifiers) == {("user_id", "ada-1"), ("email", "ada@example.com"), ("anonymous_id", "ada-phone")}
    assert identifiers["anonymous_id", "ada-phone"]["quarantined"] is True
    assert identifiers["anonymous_id", "ada-phone"]["quarantined_at"].endswith("Z")
    assert identifiers["anonymous_id", "ada-phone"]["attached_to"] == old
    [merge] = person["merges"]
    assert (merge["winner"], merge["loser"], merge["merge_id"]) == (winner, loser, merged.merge.merge_id)
    text = str(document)
    assert bob not in text and "bob" not in text

    # Asked by the merged person's id, the same person's graph.
    assert (await _export(privacy, loser))["persons"][0]["person_id"] == winner


async def test_a_separation_names_only_the_persons_own_side(identity):
    stub, privacy = identity
    ada = await _resolve(stub, ("user_id", "ada-1"))
    eve = await _resolve(stub, ("user_id", "eve-1"))
    merged = await stub.Merge(identity_pb2.MergeRequest(person_id=ada, other_person_id=eve, force=True), metadata=ADMIN)
    split = await stub.Unmerge(identity_pb2.UnmergeRequest(merge_id=merged.merge.merge_id), metadata=ADMIN)

    document = await _export(privacy, split.winner)

    [person] = document["persons"]
    assert person["separations"] == [{"member": split.winner}]
    assert [i["value"] for i in person["identifiers"]] == ["ada-1" if split.winner == ada else "eve-1"]
    assert split.loser not in str(document)


async def test_an_unknown_person_gets_an_empty_document(identity):
    _stub, privacy = identity
    assert await _export(privacy, "p-nobody", ["p-nobody-either"]) == {}


async def test_a_read_token_cannot_export(identity):
    _stub, privacy = identity
    await assert_read_scope_refused(privacy, READER)


async def test_person_id_is_required(identity):
    _stub, privacy = identity
    await assert_person_required(privacy, ADMIN)


async def test_an_id_no_store_can_hold_is_refused_naming_the_field(identity):
    _stub, privacy = identity
    await assert_unstorable_ids_named(privacy, ADMIN)
