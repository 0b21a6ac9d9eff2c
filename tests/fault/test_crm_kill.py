"""SIGKILL the CRM connector process mid-sync, three times, against the local HubSpot, and count in the CRM.

Profile changes for a few hundred people arrive in rounds, each round newer than the last, with tasks
orchestration asks for between them; the connector writes contacts in batches under a tight rate limit,
so every kill lands with a sync half done. The connector is a real process (`python -m cdp_crm`) started
again on the same store after each kill. At the end the emulator holds every contact exactly once with
the latest round's values, every task exactly once (by its idempotency key and in total), and its own
counter of requests over the account's limit is zero: the shared budget survives the crashes.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time

import pytest

from cdp.orchestration.v1 import orchestration_pb2
from cdp.profile.v1 import profile_pb2
from cdp_crm.state import PENDING
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_kit.bus import Bus, OutMessage, partition_for, profiles_stream, segments_stream, subjects
from cdp_kit.storage import open_store
from cdp_kit.timestamps import from_seconds
from cdp_testing.crm import hubspot_document
from cdp_testing.processes import ServiceProcess
from cdp_testing.waiting import eventually

PARTITIONS = 2
PEOPLE = 400
ROUNDS = 4
BURST, WINDOW = 4, 0.5


class Upstream:
    """What profile and orchestration publish: profile changes per partition, and CRM task actions."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.sequence = 0

    async def _publish(self, subject: str, payload: bytes, msg_id: str) -> None:
        [result] = await self.bus.publisher.publish_batch([OutMessage(subject, payload, msg_id)])
        assert result.ok, result.error

    async def round_of_changes(self, people: list[str], round_: int) -> None:
        batches: dict[int, profile_pb2.ProfileChangedBatch] = collections.defaultdict(profile_pb2.ProfileChangedBatch)
        for person in people:
            change = profile_pb2.ProfileChanged(person_id=person, cause="event", at=from_seconds(time.time()))
            change.traits["email"].string_value = f"{person}@example.com"
            change.traits["first_name"].string_value = f"N{round_}"
            change.scores["churn_risk"] = round_ + 0.5
            batches[partition_for(person, PARTITIONS)].changes.append(change)
        for partition, batch in batches.items():
            self.sequence += 1
            subject = subjects.profiles_changed(partition)
            await self._publish(subject, batch.SerializeToString(), f"changes-{round_}-{partition}")

    async def task(self, person: str, action_id: str) -> None:
        action = orchestration_pb2.ActionMessage(
            action_id=action_id, person_id=person, channel="crm", crm_kind="task", category="success"
        )
        action.content["subject"] = f"Call {person}"
        subject = subjects.actions(subjects.CRM_CHANNEL, partition_for(person, PARTITIONS))
        await self._publish(subject, action.SerializeToString(), action_id)


@pytest.mark.timeout(240)
async def test_killed_three_times_mid_sync_every_contact_and_task_lands_once_with_latest_values(nats_server, tmp_path):
    people = [f"person-{i:03d}" for i in range(PEOPLE)]
    async with (
        HubSpotEmulator(burst_limit=BURST, burst_window=WINDOW) as hubspot,
        Bus.connect(nats_server.url, name="crm-kill-test") as bus,
    ):
        await bus.ensure_streams(profiles_stream(), segments_stream())
        document = tmp_path / "connections.json"
        document.write_text(json.dumps(hubspot_document(hubspot.base_url, burst=BURST, window_seconds=WINDOW)))
        process = ServiceProcess(
            "crm",
            "cdp_crm",
            tmp_path,
            {
                "CDP_NATS_URL": nats_server.url,
                "CDP_STORE_URL": f"sqlite:///{tmp_path}/crm.db",
                "CDP_PARTITIONS": str(PARTITIONS),
                "CDP_CRM_CONNECTIONS_FILE": str(document),
                "HUBSPOT_TOKEN": "pat-local-hubspot",
                # A killed process's open grants are held this (+5 s) in the shared budget, the longest its
                # requests may have been on their way; the budget here is 4 a window, and the default 30 s
                # would hold all of it that long after each kill.
                "CDP_CRM_REQUEST_TIMEOUT": "5",
            },
        )
        await asyncio.to_thread(process.start)  # the loop keeps serving the local HubSpot meanwhile
        upstream = Upstream(bus)
        tasks: list[str] = []
        kills_mid_sync = 0
        try:
            for round_ in range(ROUNDS):
                seen = len(hubspot.requests)
                if round_ < ROUNDS - 1:
                    # Two requests go through, the ones after wait (the connector still waits on them when
                    # it is killed): the kill lands with the round half written however fast the machine
                    # is. Polling for the round to be halfway could look too late: a burst takes it whole.
                    hubspot.faults.hold_after(2, seconds=60)
                await upstream.round_of_changes(people, round_)
                for person in people[round_ * 5 : round_ * 5 + 5]:
                    tasks.append(f"task-{round_}-{person}")
                    await upstream.task(person, tasks[-1])
                if round_ == ROUNDS - 1:
                    break
                # A round is several batch writes at BURST per WINDOW: two in (the rest held), the sync is midway.
                await eventually(lambda seen=seen: len(hubspot.requests) >= seen + 2, timeout=60, every=0.1)
                latest = [r["properties"].get("firstname") for r in hubspot.records("contacts")]
                kills_mid_sync += latest.count(f"N{round_}") < PEOPLE
                process.kill()  # SIGKILL: nothing more written, committed or acknowledged
                hubspot.faults.clear()  # the next process finds a HubSpot that answers
                await asyncio.to_thread(process.start)

            def all_latest() -> bool:
                records = hubspot.records("contacts")
                return (
                    len(records) >= PEOPLE
                    and all(r["properties"].get("cdp_churn_risk") == f"{ROUNDS - 0.5}" for r in records)
                    and len(hubspot.records("tasks")) >= len(tasks)
                )

            await eventually(all_latest, timeout=120, every=0.1)

            async def settled() -> bool:
                # Nothing unread or unacknowledged on the connector's input and nothing queued for a retry:
                # whatever a crash left to write again has been written.
                found = [c for c in await bus.js.consumers_info(subjects.CRM) if c.name.startswith("crm-p")]
                if not found or any(c.num_pending or c.num_ack_pending for c in found):
                    return False
                async with open_store(f"sqlite:///{tmp_path}/crm.db") as store:
                    return not [r async for r in store.scan_all(PENDING)]

            await eventually(settled, timeout=60, every=0.2)
        finally:
            process.stop()

        assert kills_mid_sync == ROUNDS - 1, "each kill landed with a round half written"
        contacts = hubspot.records("contacts")
        assert sorted(r["properties"]["cdp_id"] for r in contacts) == people  # once each
        assert {r["properties"]["firstname"] for r in contacts} == {f"N{ROUNDS - 1}"}
        task_keys = collections.Counter(t["properties"].get("cdp_idempotency_key") for t in hubspot.records("tasks"))
        assert len(task_keys) == len(tasks) and set(task_keys.values()) == {1}, "every task exactly once"
        assert hubspot.budget()["over_budget"] == 0, "the account's limit was never exceeded"
