"""A store file restored from before a deletion does not bring the deleted person back.

architecture.md's recovery for a damaged store is "stop, restore the file (with its -wal), start". The
orchestration-privacy consumer is past the deletion, so a file copied before it kept the person's
instances, inbox, held actions, decisions and send records, and an action of theirs its outbox had not
published yet went out at start. Now, at start, before the engine, the dispatchers or the API run,
orchestration reads PRIVACY whole and erases every person a notice names that its store still holds,
publishing nothing again; what its outbox holds for them is dropped, the rest published."""

from __future__ import annotations

import time

import grpc
import pytest
from nats.js.errors import NotFoundError

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp.orchestration.v1 import orchestration_pb2_grpc
from cdp.privacy.v1 import privacy_pb2
from cdp_kit.bus import (
    Bus,
    OutMessage,
    events_resolved_stream,
    partition_for,
    privacy_stream,
    profiles_stream,
    segments_stream,
    subjects,
)
from cdp_kit.engine.outbox import outbox_collection, put_record
from cdp_kit.service import serving
from cdp_kit.storage import open_store
from cdp_orchestration import streams
from cdp_orchestration.__main__ import setup
from cdp_orchestration.channels.inapp import COLLECTION as INBOX
from cdp_orchestration.privacy import DELETED, consumer_spec
from cdp_orchestration.state import (
    APPROVALS,
    DECISIONS,
    ENROLLMENTS,
    FORGOTTEN,
    INSTANCES,
    PERSONS,
    SENDS,
    STATS,
    TOMBSTONES,
)
from cdp_testing.store_files import copy_store, store_bytes
from cdp_testing.waiting import until

from .test_api import PARTITIONS, SLOW, definition, profile, settings

NAME = "AdaRestoredZq7731"  # a value found nowhere else: in Ada's record and her inbox's rendered message
NOTE = {
    "id": "note",
    "version": 1,
    "name": "Note",
    "priority": 10,
    "category": "offer",
    "timezone": "UTC",
    "entry": {"api": True},
    "reentry": "always",
    "max_concurrent": 5,
    "nodes": [
        {
            "id": "hello",
            "type": "action",
            "channel": "inapp",
            "purpose": "Marketing",
            "template": {"title": "Hello", "body": "Hi {{ traits.first_name }}"},
        }
    ],
}


def leftover_action(person: str, action_id: str, body: str) -> OutMessage:
    """An in-app action of the note journey as an outbox record holds it until it is published."""
    action = pb.ActionMessage(
        action_id=action_id,
        person_id=person,
        journey_id="note",
        journey_version=1,
        instance_id=f"i-{action_id}",
        node_id="hello",
        channel="inapp",
        category="offer",
    )
    action.content["title"] = "Hello again"
    action.content["body"] = body
    subject = subjects.actions("inapp", partition_for(person, PARTITIONS))
    return OutMessage(subject, action.SerializeToString(), action_id)


async def held(store, person: str) -> dict[str, list]:
    return {
        "person": [r.doc for r in [await store.get(PERSONS, person)] if r is not None],
        "instances": [r.doc for r in await store.find(INSTANCES, "person_id", person)],
        "decisions": [r.key async for r in store.scan_all(DECISIONS, prefix=f"{person}:")],
        "approvals": [r.doc for r in await store.find(APPROVALS, "person_id", person)],
        "sends": [r.doc for r in await store.find(SENDS, "person_id", person)],
        "inbox": [r.doc async for r in store.scan_all(INBOX, prefix=f"{person}/")],
        # Enroll answers, under the caller's idempotency keys (here `<journey>-<person>`)
        "enrollments": [r.key async for r in store.scan_all(ENROLLMENTS) if r.key.endswith(f"-{person}")],
    }


@pytest.mark.timeout(180)
async def test_a_store_restored_from_before_a_deletion_does_not_bring_the_person_back(nats_server, tmp_path):
    data, backup = tmp_path / "data", tmp_path / "backup"
    data.mkdir()
    config = settings(nats_server, data)
    async with Bus.connect(nats_server.url, name="upstream") as bus:
        await bus.ensure_streams(events_resolved_stream(), segments_stream(), profiles_stream(), privacy_stream())

        # 1. Ada (an in-app message sent, an instance waiting) and Bob; stopped; the store copied.
        async with serving(config, setup) as runtime:
            store = runtime.parts["store"]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
                stub = orchestration_pb2_grpc.OrchestrationServiceStub(channel)
                for journey in (NOTE, SLOW):
                    await stub.CreateJourney(pb.CreateJourneyRequest(definition=definition(journey)))
                    await stub.PublishJourney(pb.PublishJourneyRequest(journey_id=journey["id"]))
                await profile(runtime, "p_ada", first_name=NAME)
                await profile(runtime, "p_bob", first_name="Bob")
                await profile(runtime, "p_cy", first_name="Cy")  # on Ada's partition
                for person, journeys in (("p_ada", ("note", "slow")), ("p_bob", ("note",))):
                    for journey in journeys:
                        request = pb.EnrollRequest(
                            journey_id=journey, person_id=person, idempotency_key=f"{journey}-{person}"
                        )
                        assert (await stub.Enroll(request)).entered

            async def sent() -> bool:
                for person in ("p_ada", "p_bob"):
                    now = await held(store, person)
                    if not now["inbox"] or not now["sends"] or now["sends"][0]["status"] == "pending":
                        return False
                return True

            await until(sent, "both in-app messages delivered")
        copy_store(data, backup, "orchestration.db")

        # 2. Ada deleted (the notice handled and acknowledged); stopped.
        async with serving(config, setup) as runtime:
            store = runtime.parts["store"]
            notice = privacy_pb2.PrivacyDeleted(request_id="req-ada-1", person_id="p_ada")
            [result] = await bus.publisher.publish_batch(
                [OutMessage(subjects.PRIVACY_DELETED, notice.SerializeToString(), "privacy:req-ada-1")]
            )
            assert result.ok

            async def acknowledged() -> bool:
                info = await bus.js.consumer_info(subjects.PRIVACY, consumer_spec().durable)
                return info.ack_floor.stream_seq == result.seq and not info.num_ack_pending

            await until(acknowledged, "the deletion handled")
            assert await store.get(FORGOTTEN, "req-ada-1:p_ada") is not None
            assert await store.get(PERSONS, "p_ada") is None
            assert (await held(store, "p_ada"))["enrollments"] == []  # the deletion's too
            assert len((await held(store, "p_bob"))["enrollments"]) == 1
        notices = (await bus.js.stream_info(subjects.PRIVACY)).state.messages

        # 3. The store from before the deletion restored (copied while the service ran: its outbox still held
        # what the engine had not published yet - an in-app action for each of them, a timer of Ada's - and Ada
        # had an action held for approval); started.
        copy_store(backup, data, "orchestration.db")
        ada_partition = partition_for("p_ada", PARTITIONS)
        assert partition_for("p_cy", PARTITIONS) == ada_partition != partition_for("p_bob", PARTITIONS)
        ada_timer = streams.schedule(ada_partition, "w-ada", time.time() + 3600, {"w": "w-ada", "p": "p_ada"})
        leftovers = {
            ada_partition: [
                leftover_action("p_ada", "a-1", f"Bye {NAME}"),
                ada_timer,
                leftover_action("p_cy", "a-3", "Bye Cy"),
            ],
            partition_for("p_bob", PARTITIONS): [leftover_action("p_bob", "a-2", "Bye Bob")],
        }
        async with open_store(config.store_url) as store:
            outbox = outbox_collection("orchestration")
            for partition, messages in leftovers.items():
                record = put_record(outbox, partition, 1, messages)
                await store.put(record.collection, record.key, record.doc)
            held_action = {"action_id": "held-1", "person_id": "p_ada", "journey_id": "note", "state": "pending"}
            await store.put(APPROVALS, "held-1", held_action)
            restored = await held(store, "p_ada")
            parts = ("person", "instances", "decisions", "approvals", "sends", "inbox", "enrollments")
            assert all(restored[part] for part in parts)
        assert NAME.encode() in store_bytes(data, "orchestration.db")

        async with serving(config, setup) as runtime:
            store = runtime.parts["store"]
            # Bob's and Cy's leftovers go out: the outbox was published and the in-app dispatcher ran; Cy's
            # was in the record that held Ada's action and timer.
            await until(lambda: _has_message(store, "p_bob", "a-2"), "Bob's leftover action delivered")
            await until(lambda: _has_message(store, "p_cy", "a-3"), "Cy's leftover action delivered")
            with pytest.raises(NotFoundError):
                await bus.js.get_last_msg(subjects.ORCHESTRATION_TIMERS, ada_timer.subject)
            assert {part: value for part, value in (await held(store, "p_ada")).items() if value} == {}
            # What the handler writes: the engine drops what still reaches her, no dispatcher sends to her.
            assert (await store.get(TOMBSTONES, "p_ada")).doc["request_id"] == "req-ada-1"
            assert (await store.get(DELETED, "p_ada")).doc["request_id"] == "req-ada-1"
            # Her running instance is counted as ended ("deleted"), as the deletion counted it.
            stats = [r.doc async for r in store.scan_all(STATS)]
            assert sum(s["ended"].get("deleted", 0) for s in stats) == 1
            bob = await held(store, "p_bob")
            assert bob["person"] and len(bob["instances"]) == 1 and len(bob["inbox"]) == 2 and bob["sends"]
            assert len(bob["enrollments"]) == 1
            async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
                stub = orchestration_pb2_grpc.OrchestrationServiceStub(channel)
                inbox = await stub.ListInbox(pb.ListInboxRequest(person_id="p_ada"))
                assert list(inbox.messages) == []
        # Nothing published again: no new notice.
        assert (await bus.js.stream_info(subjects.PRIVACY)).state.messages == notices
    # Nor left in the files (the store erased after the deletions).
    files = store_bytes(data, "orchestration.db")
    assert NAME.encode() not in files
    assert b"Bye Bob" in files


async def _has_message(store, person: str, action_id: str) -> bool:
    return action_id in [r.doc["action_id"] async for r in store.scan_all(INBOX, prefix=f"{person}/")]


@pytest.mark.timeout(120)
async def test_a_deletion_not_handled_yet_at_start_is_left_to_the_privacy_consumer(nats_server, tmp_path, caplog):
    """A notice stored while orchestration was down is the privacy consumer's to handle, as it always was:
    a store the deletion never reached is no restored store (no WARNING saying so), and her running instance
    is counted ended once."""
    config = settings(nats_server, tmp_path)
    async with Bus.connect(nats_server.url, name="upstream") as bus:
        await bus.ensure_streams(events_resolved_stream(), segments_stream(), profiles_stream(), privacy_stream())
        async with serving(config, setup) as runtime:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
                stub = orchestration_pb2_grpc.OrchestrationServiceStub(channel)
                await stub.CreateJourney(pb.CreateJourneyRequest(definition=definition(SLOW)))
                await stub.PublishJourney(pb.PublishJourneyRequest(journey_id="slow"))
                await profile(runtime, "p_ada", first_name=NAME)
                request = pb.EnrollRequest(journey_id="slow", person_id="p_ada", idempotency_key="slow-ada")
                assert (await stub.Enroll(request)).entered
        notice = privacy_pb2.PrivacyDeleted(request_id="req-ada-2", person_id="p_ada")
        [result] = await bus.publisher.publish_batch(
            [OutMessage(subjects.PRIVACY_DELETED, notice.SerializeToString(), "privacy:req-ada-2")]
        )
        assert result.ok
        caplog.set_level("INFO", logger="cdp.orchestration.privacy")
        async with serving(config, setup) as runtime:
            store = runtime.parts["store"]

            async def acknowledged() -> bool:
                info = await bus.js.consumer_info(subjects.PRIVACY, consumer_spec().durable)
                return info.ack_floor.stream_seq == result.seq and not info.num_ack_pending

            await until(acknowledged, "the deletion handled")
            assert {part: value for part, value in (await held(store, "p_ada")).items() if value} == {}
            stats = [r.doc async for r in store.scan_all(STATS)]
            assert sum(s["ended"].get("deleted", 0) for s in stats) == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "cdp.orchestration.privacy"]
    assert "privacy deletion applied" in messages
    assert not [m for m in messages if "restored store" in m]
