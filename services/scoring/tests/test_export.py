"""PrivacyService/ExportPerson on scoring (the process as `__main__` sets it up, tokens on): the profile
fields held for the person and what its scores were when last published, a merged person's too; nobody
else's; an empty document for an unknown person; refused to a token without privacy:export. With two
replicas splitting the partitions, either answers for everyone (a person held by the other is asked of
it), and one that cannot reach the other says so naming the partition instead of answering "nothing"."""

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
from cdp_kit.natsserver import free_port
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


# --- two replicas splitting the partitions (static: p % 2 == ordinal, a store each) -----------------------

PARTITIONS = 2
# A person and the person merged into them, in different partitions: each held by one replica only.
ADA = next(f"p_ada_{n}" for n in range(100) if partition_for(f"p_ada_{n}", PARTITIONS) == 0)
ADA_OLD = next(f"p_old_{n}" for n in range(100) if partition_for(f"p_old_{n}", PARTITIONS) == 1)
NOBODY = next(f"p_nobody_{n}" for n in range(100) if partition_for(f"p_nobody_{n}", PARTITIONS) == 1)


@pytest.fixture
def replicas(nats_server, tmp_path):
    """The settings of replica `ordinal` of two, whose peers are `ports`, each with its own store."""
    tokens = tmp_path / "tokens.json"
    write_tokens_file(tokens, [("admin", "admin-token", ["*"]), ("reader", "reader-token", ["scoring:read"])])

    def replica(ports: list[int], ordinal: int):
        return settings(
            nats_server, tmp_path, auth_mode="tokens", auth_tokens_file=tokens, grpc_port=ports[ordinal],
            partitions=PARTITIONS, replicas=2, pod_ordinal=ordinal,
            peers=",".join(f"127.0.0.1:{port}" for port in ports),
            store_url=f"sqlite:///{tmp_path / f'scoring-{ordinal}.db'}",
        )  # fmt: skip

    return replica


async def _hold(bus, engines, persons: dict[str, str]) -> None:
    """Publish a change per person (its city) and wait until the replica owning it holds it."""
    for person, city in persons.items():
        batch = profile_pb2.ProfileChangedBatch(changes=[change(person, city)])
        await bus.js.publish(subjects.profiles_changed(partition_for(person, PARTITIONS)), batch.SerializeToString())
    deadline = time.monotonic() + 15
    while not all(
        p in engine.fields for p in persons for engine in engines if partition_for(p, PARTITIONS) in engine.ready
    ):
        assert time.monotonic() < deadline, "the changes were not applied"
        await asyncio.sleep(0.02)


async def test_either_replica_exports_a_person_whichever_replica_holds_them(nats_server, replicas):
    ports = [free_port(), free_port()]
    async with Bus.connect(nats_server.url, name="export-test") as bus:
        await bus.ensure_streams(profiles_stream())
        async with serving(replicas(ports, 0), setup) as r0, serving(replicas(ports, 1), setup) as r1:
            engines = [r0.parts["engine"], r1.parts["engine"]]
            await _hold(bus, engines, {ADA: "Paris", ADA_OLD: "Lyon"})
            assert ADA in engines[0].fields and ADA_OLD not in engines[0].fields
            assert ADA_OLD in engines[1].fields and ADA not in engines[1].fields
            for port in ports:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    privacy = privacy_pb2_grpc.PrivacyServiceStub(channel)
                    document = await _export(privacy, ADA, [ADA_OLD])
                    assert [p["person_id"] for p in document["persons"]] == [ADA, ADA_OLD]
                    assert [p["fields"] for p in document["persons"]] == [
                        {"traits.city": "Paris"},
                        {"traits.city": "Lyon"},
                    ]
                    # Held by neither: "nothing held" is still the answer, from the replica owning the partition.
                    assert await _export(privacy, NOBODY) == {}
                    # The owner checks the caller's token too; a reader is refused whichever replica it reaches.
                    await assert_read_scope_refused(privacy, READER)


async def test_a_replica_that_cannot_reach_the_owner_names_the_partition_instead_of_answering_nothing(
    nats_server, replicas
):
    ports = [free_port(), free_port()]  # nobody listens on the second: replica 1 is down
    async with Bus.connect(nats_server.url, name="export-test") as bus:
        await bus.ensure_streams(profiles_stream())
        async with serving(replicas(ports, 0), setup) as r0:
            await _hold(bus, [r0.parts["engine"]], {ADA: "Paris"})
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as channel:
                privacy = privacy_pb2_grpc.PrivacyServiceStub(channel)
                for person, merged in ((ADA_OLD, []), (ADA, [ADA_OLD])):
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await _export(privacy, person, merged)
                    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert "partition 1" in caught.value.details() and ADA_OLD not in caught.value.details()
                # Its own partition's persons it answers for.
                assert [p["person_id"] for p in (await _export(privacy, ADA))["persons"]] == [ADA]
