"""`python -m cdp_crm` as a process: it starts from a connections file and the credential variables,
syncs what reaches the bus to the local HubSpot, and answers CrmService - connections, record status,
budgets, backfills, validation naming the field. A missing credential keeps its connection from starting,
named by the variable (the process stops when no connection is left)."""

from __future__ import annotations

import asyncio
import functools
import json
import subprocess
import sys
import time

import grpc
import pytest

from cdp.crm.v1 import crm_pb2, crm_pb2_grpc
from cdp.profile.v1 import profile_pb2
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_kit.bus import Bus, OutMessage, partition_for, profiles_stream, subjects
from cdp_kit.timestamps import from_seconds
from cdp_testing.errors import bad_request_fields
from cdp_testing.processes import ServiceProcess
from cdp_testing.waiting import eventually

PARTITIONS = 2
START_BOUND = 120.0  # seconds a process may take to start (or to stop, refusing its settings) under load


def _document(base_url: str) -> dict:
    return {
        "connections": [
            {
                "id": "hs",
                "kind": "hubspot",
                "account": "62515",
                "url": base_url,
                "credentials": {"token": "HUBSPOT_TOKEN"},
                "mappings": [
                    {"id": "contacts", "object": "contacts", "match": {"cdp_id": "person.id"},
                     "fields": {"email": "traits.email", "cdp_churn_risk": "scores.churn_risk"}}
                ],
            }
        ]
    }  # fmt: skip


def _process(tmp_path, nats_url: str, base_url: str, **env: str) -> ServiceProcess:
    connections = tmp_path / "connections.json"
    connections.write_text(json.dumps(_document(base_url)))
    return ServiceProcess(
        "crm",
        "cdp_crm",
        tmp_path,
        {
            "CDP_NATS_URL": nats_url,
            "CDP_STORE_URL": f"sqlite:///{tmp_path}/crm.db",
            "CDP_PARTITIONS": str(PARTITIONS),
            "CDP_CRM_CONNECTIONS_FILE": str(connections),
            "HUBSPOT_TOKEN": "pat-local-hubspot",
            **env,
        },
    )


def _exit_code(process: ServiceProcess, bound: float) -> int:
    """Run the process to its end (killed past `bound` seconds) and return its exit status."""
    with open(process.log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", process.module], env=process.env, stdout=log, stderr=log)
    try:
        return proc.wait(bound)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


_eventually = functools.partial(eventually, timeout=20.0, every=0.1)


async def test_the_process_syncs_and_answers_its_api(nats_server, tmp_path):
    async with HubSpotEmulator() as emulator, Bus.connect(nats_server.url, name="crm-process-test") as bus:
        await bus.ensure_streams(profiles_stream())
        process = _process(tmp_path, nats_server.url, emulator.base_url)
        await asyncio.to_thread(process.start)  # the loop keeps serving the local HubSpot meanwhile
        try:
            change = profile_pb2.ProfileChanged(person_id="person-1", cause="event", at=from_seconds(time.time()))
            change.traits["email"].string_value = "ada@example.com"
            change.scores["churn_risk"] = 0.9
            batch = profile_pb2.ProfileChangedBatch(changes=[change])
            subject = subjects.profiles_changed(partition_for("person-1", PARTITIONS))
            await bus.publisher.publish_batch([OutMessage(subject, batch.SerializeToString(), "change-1")])
            await _eventually(lambda: emulator.find("contacts", "cdp_id", "person-1"))

            async with grpc.aio.insecure_channel(process.grpc_address) as channel:
                crm = crm_pb2_grpc.CrmServiceStub(channel)
                (connection,) = (await crm.ListConnections(crm_pb2.ListConnectionsRequest())).connections
                assert connection.kind == crm_pb2.CRM_KIND_HUBSPOT
                assert connection.credentials == {"token": "HUBSPOT_TOKEN"}

                async def synced():
                    answer = await crm.GetRecordStatus(crm_pb2.GetRecordStatusRequest(person_id="person-1"))
                    return answer.records and answer.records[0].state == crm_pb2.RECORD_STATE_SYNCED and answer

                (status,) = (await _eventually(synced)).records
                assert status.crm_id == emulator.find("contacts", "cdp_id", "person-1")["id"]

                (budget,) = (await crm.GetBudget(crm_pb2.GetBudgetRequest())).budgets
                assert budget.account == "62515" and budget.burst_limit == 190 and budget.daily_used >= 1

                run = await crm.StartBackfill(crm_pb2.StartBackfillRequest(connection_id="hs"))

                async def finished():
                    answer = await crm.GetRun(crm_pb2.GetRunRequest(run_id=run.run_id))
                    return answer.state == crm_pb2.RUN_STATE_SUCCEEDED and answer

                done = await _eventually(finished)
                assert (done.total, done.processed, done.unchanged, done.created) == (1, 1, 1, 0)  # no call

                bad = _document(emulator.base_url)
                bad["connections"][0]["mappings"][0]["fields"]["cdp_churn_risk"] = "score.churn_risk"
                answer = await crm.ValidateConnections(
                    crm_pb2.ValidateConnectionsRequest(document=crm_pb2.ConnectionsDocument(json=json.dumps(bad)))
                )
                assert [(p.mapping, p.field) for p in answer.problems] == [
                    ("hs/contacts", "fields.cdp_churn_risk.source")
                ]
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await crm.GetConnection(crm_pb2.GetConnectionRequest(connection_id="nope"))
                assert refused.value.code() == grpc.StatusCode.NOT_FOUND
                for call, request, field in (
                    (
                        crm.StartBackfill,
                        crm_pb2.StartBackfillRequest(connection_id="hs", mapping_id="nope"),
                        "mapping_id",
                    ),
                    (crm.ListDeadLetters, crm_pb2.ListDeadLettersRequest(page_token="x"), "page_token"),
                    (crm.GetRecordStatus, crm_pb2.GetRecordStatusRequest(), "subject"),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await call(request)
                    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert bad_request_fields(refused.value) == [field]
        finally:
            process.stop()
        assert len(emulator.records("contacts")) == 1


async def test_a_missing_credential_stops_start_up_naming_the_variable(nats_server, tmp_path):
    async with HubSpotEmulator() as emulator:
        process = _process(tmp_path, nats_server.url, emulator.base_url, HUBSPOT_TOKEN="")
        # The process's own signal is its exit: wait for it (a loaded machine may take a while to import),
        # rather than for a port within a short time - a port not listening yet says nothing.
        code = await asyncio.to_thread(_exit_code, process, START_BOUND)
        assert code != 0
        assert "HUBSPOT_TOKEN" in process.log_path.read_text()
        assert "pat-local-hubspot" not in process.log_path.read_text()


async def test_a_connection_missing_a_credential_is_not_started_and_the_others_run(nats_server, tmp_path):
    # One connection's token naming an unset variable crash-looped the whole connector, so every other CRM
    # stopped too, and `cdpctl crm validate` said "no problems" for that document (CRM-admin trial, D6).
    async with HubSpotEmulator() as emulator, Bus.connect(nats_server.url, name="crm-process-test") as bus:
        await bus.ensure_streams(profiles_stream())
        document = _document(emulator.base_url)
        other = {**document["connections"][0], "id": "hs-eu", "account": "99", "credentials": {"token": "EU_TOKEN"}}
        document["connections"].append(other)
        process = _process(tmp_path, nats_server.url, emulator.base_url, EU_TOKEN="")
        (tmp_path / "connections.json").write_text(json.dumps(document))
        await asyncio.to_thread(process.start)
        try:
            change = profile_pb2.ProfileChanged(person_id="person-1", cause="event", at=from_seconds(time.time()))
            change.traits["email"].string_value = "ada@example.com"
            batch = profile_pb2.ProfileChangedBatch(changes=[change])
            subject = subjects.profiles_changed(partition_for("person-1", PARTITIONS))
            await bus.publisher.publish_batch([OutMessage(subject, batch.SerializeToString(), "change-1")])
            await _eventually(lambda: emulator.find("contacts", "cdp_id", "person-1"))

            async with grpc.aio.insecure_channel(process.grpc_address) as channel:
                crm = crm_pb2_grpc.CrmServiceStub(channel)
                listed = (await crm.ListConnections(crm_pb2.ListConnectionsRequest())).connections
                states = {c.id: (c.state, c.last_error_code) for c in listed}
                assert states["hs-eu"] == (crm_pb2.CONNECTION_STATE_AUTH_FAILED, "EU_TOKEN")
                assert states["hs"][0] == crm_pb2.CONNECTION_STATE_ACTIVE
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await crm.StartBackfill(crm_pb2.StartBackfillRequest(connection_id="hs-eu"))
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "EU_TOKEN" in refused.value.details()

                answer = await crm.ValidateConnections(
                    crm_pb2.ValidateConnectionsRequest(document=crm_pb2.ConnectionsDocument(json=json.dumps(document)))
                )
                assert [(p.mapping, p.field) for p in answer.problems] == [("hs-eu", "credentials.token")]
                assert "EU_TOKEN" in answer.problems[0].message
        finally:
            process.stop()
        assert "pat-local-hubspot" not in process.log_path.read_text()
