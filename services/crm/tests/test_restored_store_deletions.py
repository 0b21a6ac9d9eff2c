"""A store file restored from before a deletion does not bring the deleted person back to a CRM.

architecture.md's recovery for a damaged store is "stop, restore the file (with its -wal), start". The
connector's `crm-privacy` consumer is past the deletion by then, so a `crm.db` copied before it kept the
person's view, their links to CRM records (with the values written there), a queued upsert and no
tombstone: the retrier sent the queued write again (the anonymised contact got the person's email back)
and a late change of the person was written. Now, at start, before any input, retry or read runs, the
connector reads PRIVACY whole and erases every person a notice names that its store still holds; what is
in the CRM is read, never written again when it is erased already, and no record is ever created."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import sqlite3
import time
from pathlib import Path

import grpc
import pytest
from nats.js.errors import NotFoundError

from cdp.crm.v1 import crm_pb2, crm_pb2_grpc
from cdp.orchestration.v1 import orchestration_pb2
from cdp.privacy.v1 import privacy_pb2
from cdp.profile.v1 import profile_pb2
from cdp_crm.notices import fence, reapply
from cdp_crm.privacy import Privacy
from cdp_crm.state import ANONYMISED, DELETED, PENDING, PERSONS, PRIVACY, RECORDS, TOMBSTONES
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_kit.bus import Bus, OutMessage, partition_for, privacy_stream, profiles_stream, subjects
from cdp_kit.bus.notices import read_notices
from cdp_kit.storage import open_store
from cdp_kit.timestamps import from_seconds
from cdp_testing.crm import hubspot_document
from cdp_testing.processes import ServiceProcess
from cdp_testing.store_files import copy_store, store_bytes
from cdp_testing.waiting import eventually

PARTITIONS = 2
TOKEN = "pat-local-hubspot"
EMAIL = "ada-crm-restored-qx-5521@example.com"  # values found nowhere else
NEW_EMAIL = "ada-crm-queued-qx-5521@example.com"  # queued for HubSpot when the copy was taken
TASK = "Call Ada qx-5521 about renewal"
LATE_NAME = "Adaqx5521late"
BOB_EMAIL = "bob-crm-restored@example.com"

_eventually = lambda check, what="": eventually(check, timeout=60.0, every=0.1)  # noqa: E731 - a guard, not a figure


def _process(tmp_path: Path, nats_url: str, base_url: str, policy: str) -> ServiceProcess:
    connections = tmp_path / "connections.json"
    connections.write_text(json.dumps(hubspot_document(base_url)))
    return ServiceProcess(
        "crm",
        "cdp_crm",
        tmp_path,
        {
            "CDP_NATS_URL": nats_url,
            "CDP_STORE_URL": f"sqlite:///{tmp_path / 'data' / 'crm.db'}",
            "CDP_PARTITIONS": str(PARTITIONS),
            "CDP_CRM_CONNECTIONS_FILE": str(connections),
            "CDP_CRM_PRIVACY_POLICY": policy,
            "CDP_CRM_RETRY_FOR": "1",  # a HubSpot answering 503s: the change is queued at once
            "CDP_CRM_REQUEST_TIMEOUT": "2",
            "CDP_SHUTDOWN_GRACE": "2",
            "HUBSPOT_TOKEN": "pat-local-hubspot",
        },
    )


async def change(bus: Bus, person: str, n: int, **traits: str) -> None:
    profile = profile_pb2.ProfileChanged(person_id=person, cause="event", at=from_seconds(time.time()))
    for name, value in traits.items():
        profile.traits[name].string_value = value
    batch = profile_pb2.ProfileChangedBatch(changes=[profile])
    subject = subjects.profiles_changed(partition_for(person, PARTITIONS))
    [result] = await bus.publisher.publish_batch([OutMessage(subject, batch.SerializeToString(), f"change-{n}")])
    assert result.ok, result.error


async def task(bus: Bus, person: str, action_id: str, subject: str) -> None:
    action = orchestration_pb2.ActionMessage(
        action_id=action_id, person_id=person, channel="crm", crm_kind="task", category="success"
    )
    action.content["subject"] = subject
    out = subjects.actions(subjects.CRM_CHANNEL, partition_for(person, PARTITIONS))
    [result] = await bus.publisher.publish_batch([OutMessage(out, action.SerializeToString(), action_id)])
    assert result.ok, result.error


async def handled(bus: Bus, *msg_ids: str) -> bool:
    """Whether the connector has handled the messages published under `msg_ids`: its input stream (CRM)
    holds them (sourced by the server; a sourced message keeps its Nats-Msg-Id) and its partitions'
    consumers hold nothing unread or unacknowledged - a batch is acknowledged once its writes are done or
    queued and committed."""
    info = await bus.js.stream_info(subjects.CRM)
    held = set()
    for seq in range(info.state.first_seq, info.state.last_seq + 1) if info.state.messages else ():
        try:
            message = await bus.js.get_msg(subjects.CRM, seq)
        except NotFoundError:  # deleted
            continue
        held.add((message.headers or {}).get("Nats-Msg-Id"))
    if not set(msg_ids) <= held:
        return False
    for partition in range(PARTITIONS):
        consumer = await bus.js.consumer_info(subjects.CRM, subjects.partition_durable("crm", partition))
        if consumer.num_pending or consumer.num_ack_pending:
            return False
    return True


def erasure_done(store_file: Path, request: str) -> bool:
    """Whether the connector has finished the erasure of `request` (`crm_privacy/<request>` written and the
    identifiers it searched by, `<request>:identifiers`, deleted: `Privacy.erase`'s last write), read from
    its store's file while it runs (a read-only connection; SQLite's WAL lets it read beside the writer)."""
    with contextlib.closing(sqlite3.connect(f"file:{store_file}?mode=ro", uri=True)) as db:
        found = db.execute(
            "SELECT key FROM documents WHERE collection = ? AND key IN (?, ?)",
            (PRIVACY, request, f"{request}:identifiers"),
        )
        return {key for (key,) in found} == {request}


def holds_pending(store_file: Path, value: str) -> bool:
    """Whether a write queued for a CRM (`crm_pending`) holds `value`, read from the store's file while the
    connector runs (read-only, beside the writer, as `erasure_done`)."""
    with contextlib.closing(sqlite3.connect(f"file:{store_file}?mode=ro", uri=True)) as db:
        docs = db.execute("SELECT doc FROM documents WHERE collection = ?", (PENDING,))
        return any(value in (doc if isinstance(doc, str) else doc.decode()) for (doc,) in docs)


async def states(address: str, person: str) -> list[int]:
    async with grpc.aio.insecure_channel(address) as channel:
        crm = crm_pb2_grpc.CrmServiceStub(channel)
        answer = await crm.GetRecordStatus(crm_pb2.GetRecordStatusRequest(person_id=person))
        return sorted(r.state for r in answer.records)


async def pending(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        crm = crm_pb2_grpc.CrmServiceStub(channel)
        return (await crm.GetRun(crm_pb2.GetRunRequest(run_id="stream-hs"))).pending_retry


def ada_task(emulator: HubSpotEmulator) -> dict | None:
    return next((t for t in emulator.records("tasks") if t["properties"].get("hs_task_subject") == TASK), None)


def in_hubspot(emulator: HubSpotEmulator) -> dict[tuple[str, str], dict]:
    """Every contact and task of the local HubSpot as it stands: properties and update time."""
    return {
        (obj, record["id"]): copy.deepcopy({"properties": record["properties"], "updatedAt": record["updatedAt"]})
        for obj in ("contacts", "tasks")
        for record in emulator.records(obj)
    }


@pytest.mark.timeout(400)
@pytest.mark.parametrize("policy", ["anonymise", "delete"])
async def test_a_store_restored_from_before_a_deletion_does_not_bring_the_person_back_to_the_crm(
    nats_server, tmp_path, policy
):
    data, backup = tmp_path / "data", tmp_path / "backup"
    data.mkdir()
    state = {"anonymise": crm_pb2.RECORD_STATE_ANONYMISED, "delete": crm_pb2.RECORD_STATE_DELETED}[policy]
    erased = [state] * 2  # Ada's contact and her task
    async with HubSpotEmulator() as emulator, Bus.connect(nats_server.url, name="crm-restore-test") as bus:
        await bus.ensure_streams(profiles_stream(), privacy_stream())
        process = _process(tmp_path, nats_server.url, emulator.base_url, policy)

        # 1. Ada (a contact and a task about her) and Bob synced; then HubSpot fails and Ada's new email is
        # queued (crm_pending); stopped; the store copied.
        await asyncio.to_thread(process.start, 120)
        try:
            await change(bus, "p_ada", 1, email=EMAIL, first_name="Ada")
            await change(bus, "p_bob", 2, email=BOB_EMAIL, first_name="Bob")
            await _eventually(lambda: emulator.find("contacts", "cdp_id", "p_bob"))
            await task(bus, "p_ada", "act-ada-1", TASK)
            await _eventually(lambda: ada_task(emulator))
            await _eventually(lambda: emulator.find("contacts", "cdp_id", "p_ada"))

            # Both of Ada's records synced before HubSpot fails: the task, sent before her contact existed,
            # is written again with its link to the contact; caught by the outage, it was queued too (a
            # fresh-clone run: two pending, never the one the test waits for).
            async def both_synced():
                return await states(process.grpc_address, "p_ada") == [crm_pb2.RECORD_STATE_SYNCED] * 2

            await _eventually(both_synced)
            emulator.faults.fail_next(1_000_000)
            await change(bus, "p_ada", 3, email=NEW_EMAIL)

            async def queued():
                # Ada's new email itself queued: a count of one can be another of her writes held back a
                # moment (a loaded run copied the store before the change was applied).
                return await pending(process.grpc_address) == 1 and holds_pending(data / "crm.db", NEW_EMAIL)

            await _eventually(queued)
        finally:
            process.stop()
        emulator.faults.clear()
        copy_store(data, backup, "crm.db")
        async with open_store(f"sqlite:///{backup / 'crm.db'}") as store:
            assert [r.doc["person_id"] async for r in store.scan_all(PENDING)] == ["p_ada"]

        # 2. The queued write lands, then Ada is deleted (anonymised or deleted, by the policy); stopped.
        await asyncio.to_thread(process.start, 120)
        try:
            await _eventually(lambda: emulator.find("contacts", "email", NEW_EMAIL))
            request = privacy_pb2.PrivacyDeleted(request_id="req-ada-1", person_id="p_ada")
            [result] = await bus.publisher.publish_batch(
                [OutMessage(subjects.PRIVACY_DELETED, request.SerializeToString(), "req-ada-1")]
            )
            assert result.ok, result.error

            async def anonymised():
                return await states(process.grpc_address, "p_ada") == erased

            await _eventually(anonymised)
        finally:
            process.stop()
        contact = emulator.find("contacts", "cdp_id", "p_ada")
        if policy == "delete":
            assert contact is None and emulator.records("tasks") == []
        else:
            assert not contact["properties"].get("email") and not contact["properties"].get("firstname")
            (left,) = emulator.records("tasks")
            assert not left["properties"].get("hs_task_subject")
        before = in_hubspot(emulator)

        # 3. The copy from before the deletion restored (Ada's view, links and queued write in it); started;
        # a late change of Ada arrives, and one of Bob's.
        copy_store(backup, data, "crm.db")
        assert EMAIL.encode() in store_bytes(data, "crm.db") and NEW_EMAIL.encode() in store_bytes(data, "crm.db")
        await asyncio.to_thread(process.start, 120)
        try:
            await change(bus, "p_ada", 4, first_name=LATE_NAME)
            await change(bus, "p_bob", 5, first_name="Bobby")
            await _eventually(
                lambda: emulator.find("contacts", "cdp_id", "p_bob")["properties"]["firstname"] == "Bobby"
            )

            async def erased_again():
                return await states(process.grpc_address, "p_ada") == erased

            await _eventually(erased_again)
            # The late changes' batches are done (written, or queued, then acknowledged), and nothing is queued
            # for the retrier: a queued write it took has been sent by then (it leaves the queue after its answer).
            await _eventually(lambda: handled(bus, "change-4", "change-5"))

            async def none_queued():
                return await pending(process.grpc_address) == 0

            await _eventually(none_queued)
            # The erasure repeated at start is done, not waiting to ask HubSpot its search again (refused once
            # on a quick run, most likely by the emulator's 5 searches a second): until then it keeps the
            # identifiers it searches by (Ada's emails) in the store, as it must. Her records read erased first.
            await _eventually(lambda: asyncio.to_thread(erasure_done, data / "crm.db", "req-ada-1"))
        finally:
            process.stop()
        # Nothing of Ada re-created or written again in HubSpot: her contact and task as the deletion left them.
        after = in_hubspot(emulator)
        bob = emulator.find("contacts", "cdp_id", "p_bob")["id"]
        assert {k: v for k, v in after.items() if k != ("contacts", bob)} == {
            k: v for k, v in before.items() if k != ("contacts", bob)
        }
        log = process.log_path.read_text()
        assert "req-ada-1" in log and EMAIL not in log

    # Nor left in the store's files; Bob kept.
    files = store_bytes(data, "crm.db")
    for value in (EMAIL, NEW_EMAIL, TASK, LATE_NAME):
        assert value.encode() not in files, value
    assert BOB_EMAIL.encode() in files
    async with open_store(f"sqlite:///{data / 'crm.db'}") as store:
        assert await store.get(PERSONS, "p_ada") is None
        assert await store.get(TOMBSTONES, "p_ada") is not None
        assert [r async for r in store.scan_all(PENDING)] == []
        assert {r.doc["state"] for r in await store.find(RECORDS, "person_id", "p_ada")} == {
            ANONYMISED if policy == "anonymise" else DELETED
        }


async def test_the_repeat_erases_what_a_crm_still_holds_and_never_makes_a_record_again(world_factory):
    """Where the erasure before the restore did not reach a CRM (a request dead-lettered after its retries), the
    repeat does it: a contact still holding the person's values is anonymised by its id. A contact a rep
    deleted is not made again. A notice naming merged persons covers each; a person no notice names is left
    alone; a second start finds nothing left to do."""
    async with HubSpotEmulator() as hubspot:
        world = await world_factory(hubspot)
        await world.bus.ensure_streams(privacy_stream())
        await world.start()
        people = {
            "p1": {"traits.email": "p1@example.com", "traits.first_name": "Ada"},
            "p2": {"traits.email": "p2@example.com", "traits.first_name": "Cy"},
            "p2-old": {"traits.email": "p2-old@example.com", "traits.first_name": "Cy L."},
            "p4": {"traits.email": "p4@example.com", "traits.first_name": "Bob"},
        }
        await world.profiles(people)
        await world.eventually(lambda: len(hubspot.records("contacts")) == 4)
        ids = {p: hubspot.find("contacts", "cdp_id", p)["id"] for p in people}
        archive = f"{hubspot.base_url}/crm/v3/objects/contacts/batch/archive"
        body = {"inputs": [{"id": ids["p2"]}]}
        async with world.session.post(archive, json=body, headers={"Authorization": f"Bearer {TOKEN}"}) as answer:
            assert answer.status == 204  # a rep deletes it
        await world.stop()
        for n, notice in enumerate(
            (
                privacy_pb2.PrivacyDeleted(request_id="req-1", person_id="p1"),
                privacy_pb2.PrivacyDeleted(request_id="req-2", person_id="p2", merged_person_ids=["p2-old"]),
            )
        ):
            [result] = await world.bus.publisher.publish_batch(
                [OutMessage(subjects.PRIVACY_DELETED, notice.SerializeToString(), f"notice-{n}")]
            )
            assert result.ok, result.error
        privacy = Privacy(
            world.store, world.logic.mappings, world.logic.deliverer, settled=world.logic.settled,
            partitions=world.partitions, retry_for=5.0,
        )  # fmt: skip

        requests = await fence(world.store, privacy, await read_notices(world.bus.js), time.time())
        assert requests == [("req-1", ["p1"]), ("req-2", ["p2", "p2-old"])]
        for person in ("p1", "p2", "p2-old"):
            assert await world.store.get(PERSONS, person) is None
            assert (await world.store.get(TOMBSTONES, person)).doc["request"] in ("req-1", "req-2")
        await reapply(world.store, privacy, requests)

        assert sorted(c["id"] for c in hubspot.records("contacts")) == sorted([ids["p1"], ids["p2-old"], ids["p4"]])
        for person in ("p1", "p2-old"):
            properties = hubspot.find("contacts", "cdp_id", person)["properties"]
            assert not properties.get("email") and not properties.get("firstname"), person
        assert hubspot.find("contacts", "cdp_id", "p4")["properties"]["email"] == "p4@example.com"
        assert (await world.store.get(PRIVACY, "req-1")).doc["connections"] == {"hs": {"anonymised": 1, "removed": 0}}
        assert (await world.store.get(PRIVACY, "req-2")).doc["connections"] == {"hs": {"anonymised": 2, "removed": 0}}
        for person in ("p1", "p2", "p2-old"):
            assert {r.doc["state"] for r in await world.store.find(RECORDS, "person_id", person)} == {ANONYMISED}
        assert await world.store.get(PERSONS, "p4") is not None

        # Started again: nothing held, nothing called.
        calls = len(hubspot.requests)
        assert await fence(world.store, privacy, await read_notices(world.bus.js), time.time()) == []
        assert len(hubspot.requests) == calls
