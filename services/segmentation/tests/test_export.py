"""PrivacyService/ExportPerson on segmentation (the process as `__main__` sets it up, tokens on): the
person's memberships with their date and the profile fields held for them, a merged person's too; nobody
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
from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_kit.auth import write_tokens_file
from cdp_kit.bus import Bus, partition_for, profiles_stream, subjects
from cdp_kit.natsserver import free_port
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


# --- two replicas splitting the partitions (static: p % 2 == ordinal, a store each) -----------------------

PARTITIONS = 2
# A person and the person merged into them, in different partitions: each held by one replica only.
ADA = next(f"p_ada_{n}" for n in range(100) if partition_for(f"p_ada_{n}", PARTITIONS) == 0)
ADA_OLD = next(f"p_old_{n}" for n in range(100) if partition_for(f"p_old_{n}", PARTITIONS) == 1)
NOBODY = next(f"p_nobody_{n}" for n in range(100) if partition_for(f"p_nobody_{n}", PARTITIONS) == 1)


def replica_settings(nats_server, tokens, ports: list[int], ordinal: int, *, peers: str) -> SegmentationSettings:
    return SegmentationSettings(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=ports[ordinal], auth_mode="tokens",
        auth_tokens_file=tokens, partitions=PARTITIONS, replicas=2, pod_ordinal=ordinal, peers=peers,
        shutdown_grace=1.0, store_url="memory://",
    )  # fmt: skip


@pytest.fixture
def tokens(tmp_path):
    path = tmp_path / "tokens.json"
    write_tokens_file(path, [("admin", "admin-token", ["*"]), ("reader", "reader-token", ["segmentation:read"])])
    return path


async def _hold(bus, runtimes, persons: dict[str, str]) -> None:
    """Publish a change per person (its city) and wait until the replica owning it holds it."""
    for person, city in persons.items():
        batch = profile_pb2.ProfileChangedBatch(changes=[change(person, city=city)])
        await bus.js.publish(subjects.profiles_changed(partition_for(person, PARTITIONS)), batch.SerializeToString())
    engines = [runtime.parts["engine"] for runtime in runtimes]
    deadline = time.monotonic() + 15
    while not all(
        p in engine.persons for p in persons for engine in engines if partition_for(p, PARTITIONS) in engine.active
    ):
        assert time.monotonic() < deadline, "the changes were not applied"
        await asyncio.sleep(0.02)


async def test_either_replica_exports_a_person_whichever_replica_holds_them(nats_server, tokens):
    ports = [free_port(), free_port()]
    peers = ",".join(f"127.0.0.1:{port}" for port in ports)
    async with Bus.connect(nats_server.url, name="export-test") as bus:
        await bus.ensure_streams(profiles_stream())
        async with (
            serving(replica_settings(nats_server, tokens, ports, 0, peers=peers), setup) as r0,
            serving(replica_settings(nats_server, tokens, ports, 1, peers=peers), setup) as r1,
        ):
            await _hold(bus, [r0, r1], {ADA: "Paris", ADA_OLD: "Lyon"})
            assert ADA in r0.parts["engine"].persons and ADA_OLD not in r0.parts["engine"].persons
            assert ADA_OLD in r1.parts["engine"].persons and ADA not in r1.parts["engine"].persons
            for port in ports:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    privacy = privacy_pb2_grpc.PrivacyServiceStub(channel)
                    document = await _export(privacy, ADA, [ADA_OLD])
                    assert [p["person_id"] for p in document["persons"]] == [ADA, ADA_OLD]
                    assert [p["fields"]["traits.city"] for p in document["persons"]] == ["Paris", "Lyon"]
                    # Held by neither: "nothing held" is still the answer, from the replica owning the partition.
                    assert await _export(privacy, NOBODY) == {}
                    # The owner checks the caller's token too; a reader is refused whichever replica it reaches.
                    await assert_read_scope_refused(privacy, READER)


async def test_a_replica_that_cannot_reach_the_owner_names_the_partition_instead_of_answering_nothing(
    nats_server, tokens
):
    ports = [free_port(), free_port()]  # nobody listens on the second: replica 1 is down
    peers = ",".join(f"127.0.0.1:{port}" for port in ports)
    async with Bus.connect(nats_server.url, name="export-test") as bus:
        await bus.ensure_streams(profiles_stream())
        async with serving(replica_settings(nats_server, tokens, ports, 0, peers=peers), setup) as r0:
            await _hold(bus, [r0], {ADA: "Paris"})
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as channel:
                privacy = privacy_pb2_grpc.PrivacyServiceStub(channel)
                for person, merged in ((ADA_OLD, []), (ADA, [ADA_OLD])):
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await _export(privacy, person, merged)
                    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert "partition 1" in caught.value.details() and ADA_OLD not in caught.value.details()
                # Its own partition's persons it answers for.
                assert [p["person_id"] for p in (await _export(privacy, ADA))["persons"]] == [ADA]
