"""A store file restored from before a deletion does not bring the deleted person back.

A day-2 operator trial followed architecture.md's recovery for a damaged store (stop the service, restore
the file with its -wal, start it) with a `profile.db` copied before `cdpctl delete --wait`: the deleted
person came back (profile, export: email, identifiers, timeline). The deletion's notice was still in
PRIVACY, but profile did not read it. Now, at start, profile reads PRIVACY whole and erases every person a
notice names that its store still holds (the person and those merged into it), publishing nothing new."""

from __future__ import annotations

import grpc
import pytest

from cdp.events.v1 import events_pb2
from cdp.identity.v1 import identity_pb2
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_kit.auth import write_tokens_file
from cdp_kit.bus import Bus, OutMessage, events_resolved_stream, identity_stream, partition_for, subjects
from cdp_kit.engine.outbox import put_record
from cdp_kit.service import serving
from cdp_kit.storage import open_store
from cdp_profile.__main__ import setup
from cdp_profile.settings import ProfileSettings
from cdp_testing.store_files import copy_store, store_bytes
from cdp_testing.waiting import until

PARTITIONS = 2
EMAIL = "ada-restored-zq-7731@example.com"  # a value found nowhere else
OLD_EMAIL = "ada-old-restored-zq-7731@example.com"
ADMIN = [("authorization", "Bearer admin-token")]


def identify(person: str, n: int, **traits) -> bytes:
    event = events_pb2.Event(message_id=f"m{n}", source_id="web", type=events_pb2.EVENT_TYPE_IDENTIFY)
    event.traits.update(traits)
    resolved = events_pb2.ResolvedEvent(event=event, person_id=person, identifiers=[f"user_id:{person}"])
    return events_pb2.ResolvedEventBatch(events=[resolved]).SerializeToString()


def leftover_change(person: str, email: str, n: int) -> OutMessage:
    """A change message as an outbox record holds it until it is published."""
    batch = profile_pb2.ProfileChangedBatch()
    batch.changes.add(person_id=person, cause="event").traits["email"].string_value = email
    subject = subjects.profiles_changed(partition_for(person, PARTITIONS))
    return OutMessage(subject, batch.SerializeToString(), f"leftover-{n}")


async def changes_after(bus: Bus, seq: int) -> list[profile_pb2.ProfileChange]:
    last = (await bus.js.stream_info("PROFILES")).state.last_seq
    return [
        change
        for n in range(seq + 1, last + 1)
        for change in profile_pb2.ProfileChangedBatch.FromString((await bus.js.get_msg("PROFILES", n)).data).changes
    ]


async def stream_count(bus: Bus, stream: str) -> int:
    return (await bus.js.stream_info(stream)).state.messages


async def get(stub, person: str) -> profile_pb2.GetProfileResponse | grpc.StatusCode:
    try:
        return await stub.GetProfile(profile_pb2.GetProfileRequest(person_id=person), metadata=ADMIN)
    except grpc.aio.AioRpcError as error:
        return error.code()


@pytest.mark.timeout(180)
async def test_a_store_restored_from_before_a_deletion_does_not_bring_the_person_back(nats_server, tmp_path):
    data, backup = tmp_path / "data", tmp_path / "backup"
    data.mkdir()
    tokens = tmp_path / "tokens.json"
    write_tokens_file(tokens, [("admin", "admin-token", ["*"])])
    settings = ProfileSettings(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=0, partitions=PARTITIONS,
        auth_mode="tokens", auth_tokens_file=tokens,
        store_url=f"sqlite:///{data / 'profile.db'}", shutdown_grace=1.0,
    )  # fmt: skip
    async with Bus.connect(nats_server.url, name="restore-test") as bus:
        await bus.ensure_streams(events_resolved_stream(), identity_stream())
        # 1. Ada, the person merged into her, and Bob; stopped; the store copied.
        async with serving(settings, setup) as runtime:
            engine = runtime.parts["engine"]
            people = (("p_ada", "Ada", EMAIL), ("p_ada_old", "Ada L.", OLD_EMAIL), ("p_bob", "Bob", "bob@example.com"))
            for n, (person, name, email) in enumerate(people):
                subject = subjects.events_resolved(partition_for(person, PARTITIONS))
                await bus.js.publish(subject, identify(person, n, name=name, email=email))
            await until(lambda: all(p in engine.profiles for p in ("p_ada", "p_ada_old", "p_bob")), "profiles")
            merged = identity_pb2.IdentityMerged(merge_id="m1", winner="p_ada", loser="p_ada_old")
            subject = subjects.identity_merged(partition_for("p_ada", PARTITIONS))
            await bus.publisher.publish_batch([OutMessage(subject, merged.SerializeToString(), "merge:m1")])
            await until(lambda: engine.hot.root("p_ada_old") == "p_ada", "the merge applied")
            await engine.flush()
        copy_store(data, backup, "profile.db")

        # 2. Ada deleted; stopped.
        async with serving(settings, setup) as runtime:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
                stub = profile_pb2_grpc.ProfileServiceStub(channel)
                await stub.Delete(
                    profile_pb2.DeleteRequest(
                        person_id="p_ada", request_id="req-ada-1", mode=profile_pb2.DELETE_MODE_DELETE
                    ),
                    metadata=ADMIN,
                )
                assert await get(stub, "p_ada") == grpc.StatusCode.NOT_FOUND
        notices = await stream_count(bus, "PRIVACY")
        assert notices == 1

        # 3. The store from before the deletion restored (copied while the service ran, its outbox still
        # holding change messages not yet published: Ada's and Bob's); started.
        copy_store(backup, data, "profile.db")
        async with open_store(settings.store_url) as store:
            leftovers = [leftover_change("p_ada", EMAIL, 1), leftover_change("p_bob", "bob-new@example.com", 2)]
            record = put_record("profile_engine_outbox", partition_for("p_ada", PARTITIONS), 1, leftovers)
            await store.put(record.collection, record.key, record.doc)
        published = (await bus.js.stream_info("PROFILES")).state.last_seq
        assert EMAIL.encode() in store_bytes(data, "profile.db")
        async with serving(settings, setup) as runtime:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
                stub = profile_pb2_grpc.ProfileServiceStub(channel)
                assert await get(stub, "p_ada") == grpc.StatusCode.NOT_FOUND
                assert await get(stub, "p_ada_old") == grpc.StatusCode.NOT_FOUND
                bob = await get(stub, "p_bob")
                assert not isinstance(bob, grpc.StatusCode) and bob.person_id == "p_bob"
            await runtime.parts["engine"].flush()
        # Nothing published again: no new notice; of the outbox, Bob's change only.
        assert await stream_count(bus, "PRIVACY") == notices
        after = await changes_after(bus, published)
        assert [(c.person_id, c.traits["email"].string_value) for c in after] == [("p_bob", "bob-new@example.com")]
    # Nor left in the files (the store's erase after the deletion's markers).
    held = store_bytes(data, "profile.db")
    assert EMAIL.encode() not in held and OLD_EMAIL.encode() not in held
    assert b"bob@example.com" in held
