"""A store file restored from before a deletion does not bring the deleted person back.

architecture.md's recovery for a damaged store is "stop the service, restore the file (with its -wal),
start it". Segmentation learns of a deletion from profile's `removed` change on profiles.changed (the
person exits every segment, reason `removed`); a `segmentation.db` copied before it brings back the
person's fields and memberships, and that change may have aged out of PROFILES (a partition's start
replays the stream after its snapshot, but cannot replay what is gone). The deletion's `privacy.deleted`
notice is still in PRIVACY (kept without an age limit): each partition taken erases every person the
notices name, and publishes nothing about them - no exit again (orchestration and CRM had it when the
person was deleted), not the transitions its outbox held for them."""

from __future__ import annotations

import logging

import grpc
import pytest

from cdp.privacy.v1 import privacy_pb2
from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_kit.bus import Bus, OutMessage, partition_for, privacy_stream, profiles_stream, segments_stream, subjects
from cdp_kit.engine.outbox import put_record
from cdp_kit.service import serving
from cdp_kit.storage import open_store
from cdp_segmentation.__main__ import setup
from cdp_segmentation.settings import SegmentationSettings
from cdp_testing.profile_changes import change
from cdp_testing.profile_changes import publish_change as publish
from cdp_testing.store_files import copy_store, store_bytes
from cdp_testing.waiting import until

PARTITIONS = 2
EMAIL = "ada-segmentation-restored-kx-8812@example.com"  # values found nowhere else
OLD_EMAIL = "ada-old-segmentation-restored-kx-8812@example.com"
BOB_EMAIL = "bob-segmentation-restored-kx-8812@example.com"
CITY = "ada-city-segmentation-restored-kx-8812"
PERSONS = {"p_ada": EMAIL, "p_ada_old": OLD_EMAIL, "p_bob": BOB_EMAIL}


async def publish_change(bus: Bus, message: profile_pb2.ProfileChanged) -> int:
    return await publish(bus, message, partitions=PARTITIONS)


def leftover_entries(persons: list[str], n: int) -> OutMessage:
    """An entry of each person into `pro` as an outbox record holds it until it is published."""
    batch = segmentation_pb2.SegmentEventBatch()
    for person in persons:
        batch.events.add(id=f"pro:{person}:left{n}:e", person_id=person, segment_id="pro", entered=True, reason="event")
    subject = subjects.segments_entered(partition_for(persons[0], PARTITIONS))
    return OutMessage(subject, batch.SerializeToString(), f"leftover-entries-{n}")


async def events_after(bus: Bus, seq: int) -> list[segmentation_pb2.SegmentEvent]:
    last = (await bus.js.stream_info(subjects.SEGMENTS)).state.last_seq
    return [
        event
        for n in range(seq + 1, last + 1)
        for event in segmentation_pb2.SegmentEventBatch.FromString(
            (await bus.js.get_msg(subjects.SEGMENTS, n)).data
        ).events
    ]


async def create(port: int, segment_id: str, text: str) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = segmentation_pb2_grpc.SegmentationServiceStub(channel)
        definition = segmentation_pb2.Definition(text=text)
        await stub.CreateSegment(segmentation_pb2.CreateSegmentRequest(id=segment_id, definition=definition, wait=True))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("ownership", ["static", "nats"])
@pytest.mark.parametrize("aged_out", [True, False], ids=["removal-aged-out", "removal-in-stream"])
async def test_a_store_restored_from_before_a_deletion_does_not_bring_the_person_back(
    nats_server, tmp_path, caplog, ownership, aged_out
):
    caplog.set_level(logging.WARNING, logger="cdp.segmentation.privacy")
    data, backup = tmp_path / "data", tmp_path / "backup"
    data.mkdir()
    settings = SegmentationSettings(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="none", partitions=PARTITIONS,
        shutdown_grace=1.0, store_url=f"sqlite:///{data / 'segmentation.db'}", ownership=ownership,
        ownership_ttl=3.0,
    )  # fmt: skip
    async with Bus.connect(nats_server.url, name="restore-test") as bus:
        await bus.ensure_streams(profiles_stream(), privacy_stream(), segments_stream())
        # 1. Ada, the person later merged into her (held apart here) and Bob, each in `pro`; snapshotted;
        # the store copied.
        async with serving(settings, setup) as runtime:
            engine = runtime.parts["engine"]
            await create(runtime.grpc.port, "pro", 'traits.plan = "pro"')
            for person, email in PERSONS.items():
                message = change(person, cause="event", created=True)
                message.traits["plan"].string_value = "pro"
                message.traits["email"].string_value = email
                await publish_change(bus, message)
            await until(lambda: engine.members.get("pro", set()) == set(PERSONS), "the memberships")
            await runtime.parts["stream"].snapshot()
        copy_store(data, backup, "segmentation.db")
        assert EMAIL.encode() in store_bytes(backup, "segmentation.db") and OLD_EMAIL.encode() in store_bytes(
            backup, "segmentation.db"
        )

        # 2. Ada moves (a change the restored snapshot does not include: its partition's replay reads it
        # from PROFILES). Ada-old merged into Ada, then Ada deleted, as profile publishes them: the merge's
        # and the deletion's `removed` changes on profiles.changed, the notice (naming the merged person) on
        # PRIVACY.
        async with serving(settings, setup) as runtime:
            engine = runtime.parts["engine"]
            await until(lambda: engine.active == {0, 1}, "the partitions served")
            moved = change("p_ada", cause="event")
            moved.traits["city"].string_value = CITY
            await publish_change(bus, moved)
            await until(lambda: engine.persons["p_ada"].fields.get("traits.city") == CITY, "Ada moved")
            await publish_change(bus, change("p_ada_old", cause="merge", removed=True))
            notice = privacy_pb2.PrivacyDeleted(
                request_id="req-ada-1", person_id="p_ada", merged_person_ids=["p_ada_old"]
            )
            notice.at.GetCurrentTime()
            await bus.publisher.publish_batch(
                [OutMessage(subjects.PRIVACY_DELETED, notice.SerializeToString(), "privacy:req-ada-1")]
            )
            removed_at = await publish_change(bus, change("p_ada", cause="delete", removed=True))
            await until(lambda: engine.members.get("pro") == {"p_bob"} and "p_ada" not in engine.persons, "removals")
            await runtime.parts["stream"].snapshot()
        assert EMAIL.encode() not in store_bytes(data, "segmentation.db")  # the deletion as it happens: erased
        if aged_out:  # the removed change ages out of PROFILES (its retention is days; the notice's is for ever)
            await bus.js.delete_msg(subjects.PROFILES, removed_at)

        # 3. The store from before the deletion restored (copied while the service ran, its outbox still
        # holding transitions not yet published: Ada's and Bob's entries, in one message); started.
        copy_store(backup, data, "segmentation.db")
        async with open_store(settings.store_url) as store:
            leftover = leftover_entries(["p_ada", "p_bob"], 1)
            record = put_record("segmentation_engine_outbox", partition_for("p_ada", PARTITIONS), 1, [leftover])
            await store.put(record.collection, record.key, record.doc)
        published = (await bus.js.stream_info(subjects.SEGMENTS)).state.last_seq
        notices = (await bus.js.stream_info(subjects.PRIVACY)).state.messages
        async with serving(settings, setup) as runtime:
            engine = runtime.parts["engine"]
            await until(lambda: engine.active == {0, 1}, "every partition served")
            assert "p_ada" not in engine.persons and "p_ada_old" not in engine.persons
            assert engine.members.get("pro") == {"p_bob"}
            assert engine.persons["p_bob"].fields["traits.email"] == BOB_EMAIL
            await runtime.parts["stream"].wait_ready()
            await runtime.parts["stream"].snapshot()
        # Nothing published again: no notice, no transition of Ada's; of the outbox, Bob's entry only.
        assert (await bus.js.stream_info(subjects.PRIVACY)).state.messages == notices
        after = await events_after(bus, published)
        assert [(e.person_id, e.segment_id, e.entered) for e in after] == [("p_bob", "pro", True)]
        # Said at WARNING with the request ids, never the persons or their values.
        said = [r.getMessage() for r in caplog.records if r.name == "cdp.segmentation.privacy"]
        assert said and all("req-ada-1" in line for line in said)
        assert not any("p_ada" in line or "@" in line for line in said)
        # Idempotent: started again, nothing left to erase, nothing said.
        caplog.clear()
        async with serving(settings, setup) as runtime:
            await until(lambda: runtime.parts["engine"].active == {0, 1}, "every partition taken")
            assert "p_bob" in runtime.parts["engine"].persons and "p_ada" not in runtime.parts["engine"].persons
        assert [r for r in caplog.records if r.name == "cdp.segmentation.privacy"] == []
    # Nor left in the files.
    held = store_bytes(data, "segmentation.db")
    assert EMAIL.encode() not in held and OLD_EMAIL.encode() not in held and CITY.encode() not in held
    assert BOB_EMAIL.encode() in held
