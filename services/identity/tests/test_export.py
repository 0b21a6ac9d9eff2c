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


async def test_an_undone_merge_is_on_both_sides_export_with_nothing_of_the_other_side(identity):
    """A support trial: the undone merges GetGraph shows (`unmerged`) were not in the export. Each side sees
    the merge, its cause, when it was made and undone, by which token and why; of the other side, neither
    its person id nor an identifier's value (its identifiers that caused the merge by their type only)."""
    stub, privacy = identity
    ada = await _resolve(stub, ("user_id", "ada-1"), ("email", "ada@example.com"))
    eve = await _resolve(stub, ("anonymous_id", "eve-tablet"))
    # Ada signs in on Eve's tablet: the event's identifiers merge the two persons.
    resolved = await stub.Resolve(
        identity_pb2.ResolveRequest(
            identifiers=_ids(("user_id", "ada-1"), ("anonymous_id", "eve-tablet")), request_id="evt-signin-1"
        ),
        metadata=ADMIN,
    )
    [merge] = resolved.merges
    split = await stub.Unmerge(
        identity_pb2.UnmergeRequest(merge_id=merge.merge_id, reason="shared tablet"), metadata=ADMIN
    )
    assert {split.winner, split.loser} == {ada, eve}

    for person, own, other in ((ada, "ada-1", "eve-tablet"), (eve, "eve-tablet", "ada-1")):
        document = await _export(privacy, person)
        [part] = document["persons"]
        [undone] = part["unmerged"]
        assert undone["merge_id"] == merge.merge_id
        assert undone["undone_by"] == "admin" and undone["reason"] == "shared tablet"
        assert undone["merged_at"].endswith("Z") and undone["undone_at"].endswith("Z")
        assert undone["merged_at"] <= undone["undone_at"]
        sides = {"winner": undone["winner"], "loser": undone["loser"]}
        assert sides == {
            "winner": person if split.winner == person else None,
            "loser": person if split.loser == person else None,
        }
        cause = undone["cause"]
        assert cause["rule"] == merge.cause.rule and cause["event_id"] == "evt-signin-1"
        own_type = "user_id" if person == ada else "anonymous_id"
        other_type = "anonymous_id" if person == ada else "user_id"
        assert sorted(cause["identifiers"], key=lambda i: i["type"]) == sorted(
            [{"type": own_type, "value": own}, {"type": other_type}], key=lambda i: i["type"]
        )
        text = str(document)
        assert other not in text and (eve if person == ada else ada) not in text


async def test_a_merge_kept_after_an_undo_gives_the_split_persons_identifier_by_type_only(identity):
    """One event with the identifiers of three persons merges two of them into the first, each merge caused by
    all three identifiers; once one merge is undone, the other one's cause still named the split person's
    identifier value in the first person's export."""
    stub, privacy = identity
    ada = await _resolve(stub, ("user_id", "ada-3"))
    bea = await _resolve(stub, ("anonymous_id", "bea-device"))
    cy = await _resolve(stub, ("anonymous_id", "cy-device"))
    request = identity_pb2.ResolveRequest(
        identifiers=_ids(("user_id", "ada-3"), ("anonymous_id", "bea-device"), ("anonymous_id", "cy-device")),
        request_id="evt-three",
    )
    merges = {m.loser: m for m in (await stub.Resolve(request, metadata=ADMIN)).merges}
    assert set(merges) == {bea, cy} and {m.winner for m in merges.values()} == {ada}
    await stub.Unmerge(identity_pb2.UnmergeRequest(merge_id=merges[bea].merge_id, reason="not her"), metadata=ADMIN)

    document = await _export(privacy, ada)

    [part] = document["persons"]
    [kept] = part["merges"]
    assert (kept["winner"], kept["loser"]) == (ada, cy)
    given = sorted((i["type"], i.get("value", "")) for i in kept["cause"]["identifiers"])
    assert given == [("anonymous_id", ""), ("anonymous_id", "cy-device"), ("user_id", "ada-3")]
    assert kept["cause"]["event_id"] == "evt-three" and kept["cause"]["rule"] == merges[cy].cause.rule
    assert "bea-device" not in str(document) and bea not in str(document)


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


def test_an_undone_matching_merge_names_no_matched_record():
    """Matching's merges are caused by two records (ids in their systems, which may be another's user id);
    whose each is, the graph does not say: they are counted, and the event id naming them is left out."""
    from types import SimpleNamespace

    from cdp_identity.domain.rules import MergeRules
    from cdp_identity.export import _undone

    engine = SimpleNamespace(normalizer=SimpleNamespace(rules=MergeRules.default()))
    undone = {
        "id": "m_1", "winner": "p_ada", "loser": "p_eve", "at": 1_000, "undone_at": 2_000, "undone_by": "admin",
        "reason": "not the same", "cause": {
            "event_id": "match:crm-eve-7:u-ada", "identifiers": ["crm-eve-7", "u-ada"], "rule": "match",
            "detail": "p=0.9700",
        },
    }  # fmt: skip
    shown = _undone(engine, undone, own={"user_id:u-ada"}, members={"p_ada"})
    assert (shown["winner"], shown["loser"]) == ("p_ada", None)
    assert shown["cause"] == {"rule": "match", "detail": "p=0.9700", "event_id": None, "identifiers": [], "records": 2}
    assert "p_eve" not in str(shown) and "crm-eve-7" not in str(shown)
