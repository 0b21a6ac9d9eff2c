"""Two profile replicas share the partitions (p % 2 == ordinal), each with its own store, as the
StatefulSet runs them with SQLite on a volume per pod: whichever replica a request reaches, it is answered
by the replica owning the person, and writes land there."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import struct_pb2

from cdp.events.v1 import events_pb2
from cdp.identity.v1 import identity_pb2
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_kit.bus import Bus, OutMessage, events_resolved_stream, identity_stream, partition_for, subjects
from cdp_kit.natsserver import free_port
from cdp_kit.service import serving
from cdp_profile.__main__ import setup as profile_setup
from cdp_profile.settings import ProfileSettings

PARTITIONS = 4


def identify(person: str, n: int) -> events_pb2.ResolvedEvent:
    event = events_pb2.Event(message_id=f"m{n}", source_id="web", type=events_pb2.EVENT_TYPE_IDENTIFY)
    event.traits.update({"name": f"Person {n}"})
    return events_pb2.ResolvedEvent(event=event, person_id=person, identifiers=[f"user_id:{person}"])


@pytest.mark.timeout(60)
async def test_any_replica_answers_for_every_person_and_writes_reach_the_owner(nats_server):
    ports = [free_port(), free_port()]
    peers = ",".join(f"127.0.0.1:{port}" for port in ports)
    replicas = [
        ProfileSettings(
            nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=ports[i], auth_mode="none",
            partitions=PARTITIONS, replicas=2, pod_ordinal=i, peers=peers, store_url="memory://",
            shutdown_grace=1.0,
        )
        for i in range(2)
    ]  # fmt: skip
    persons = [f"p_{i}" for i in range(12)]
    assert {partition_for(p, PARTITIONS) % 2 for p in persons} == {0, 1}, "persons on both replicas"
    async with (
        serving(replicas[0], profile_setup) as r0,
        serving(replicas[1], profile_setup) as r1,
        Bus.connect(nats_server.url, name="replicas-test") as bus,
    ):
        await bus.ensure_streams(events_resolved_stream())
        await bus.publisher.publish_batch(
            [
                OutMessage(
                    f"events.resolved.{partition_for(p, PARTITIONS)}",
                    events_pb2.ResolvedEventBatch(events=[identify(p, n)]).SerializeToString(),
                    f"rb-{p}",
                )
                for n, p in enumerate(persons)
            ]
        )
        engines = [r0.parts["engine"], r1.parts["engine"]]
        for _ in range(200):
            if sum(len(e.profiles) for e in engines) == len(persons):
                break
            await asyncio.sleep(0.05)
        for p in persons:
            owner = partition_for(p, PARTITIONS) % 2
            assert p in engines[owner].profiles and p not in engines[1 - owner].profiles

        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as c0,
            grpc.aio.insecure_channel(f"127.0.0.1:{ports[1]}") as c1,
        ):
            stubs = [profile_pb2_grpc.ProfileServiceStub(c) for c in (c0, c1)]
            for n, p in enumerate(persons):
                for stub in stubs:
                    profile = await stub.GetProfile(profile_pb2.GetProfileRequest(person_id=p))
                    assert profile.traits["name"].value.string_value == f"Person {n}"
            batch = await stubs[0].BatchGetProfiles(profile_pb2.BatchGetProfilesRequest(person_ids=[*persons, "p_x"]))
            assert sorted(x.person_id for x in batch.profiles) == sorted(persons) and list(batch.missing) == ["p_x"]

            # A write sent to the other replica lands at the owner.
            remote = next(p for p in persons if partition_for(p, PARTITIONS) % 2 == 1)
            traits = struct_pb2.Struct()
            traits.update({"tier": "gold"})
            await stubs[0].UpdateTraits(profile_pb2.UpdateTraitsRequest(person_id=remote, traits=traits))
            view = engines[1].profiles[remote].view(now=engines[1].clock())
            assert view.traits["tier"].value == "gold"

            # Errors come back from the owner as they are.
            missing = next(f"p_none{i}" for i in range(100) if partition_for(f"p_none{i}", PARTITIONS) % 2 == 1)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stubs[0].GetProfile(profile_pb2.GetProfileRequest(person_id=missing))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stubs[0].UpdateTraits(
                    profile_pb2.UpdateTraitsRequest(person_id=remote, traits=traits, consent={"marketing": True})
                )
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "consent" in bad.value.details()
            details = dict(bad.value.trailing_metadata() or ())
            assert "grpc-status-details-bin" in details, "the owner's field violation travels back"

        # A merge across replicas is not combined (neither can read the other's store), but nothing is
        # dropped: the loser's profile stays whole where it is.
        winner = next(p for p in persons if partition_for(p, PARTITIONS) % 2 == 0)
        merged = identity_pb2.IdentityMerged(merge_id="mx", winner=winner, loser=remote)
        await bus.ensure_streams(identity_stream())
        # Identity publishes a merge on the survivor's partition, which replica 0 owns.
        at = partition_for(winner, PARTITIONS)
        await bus.publisher.publish_batch(
            [OutMessage(subjects.identity_merged(at), merged.SerializeToString(), "merge:mx")]
        )
        for _ in range(100):
            info = await bus.js.consumer_info("IDENTITY", subjects.partition_durable("profile", at, input="merges"))
            if info.num_pending == 0 and info.num_ack_pending == 0:
                break
            await asyncio.sleep(0.05)
        assert remote in engines[1].profiles
        assert engines[1].profiles[remote].view(now=engines[1].clock()).traits["tier"].value == "gold"
