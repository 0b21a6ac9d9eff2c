"""The CRM connector as `cdpctl up` runs it and `cdpctl crm …` operates it: the dev connections file filled
with the local HubSpot's and Salesforce's ports, the environment `make up` gives the connector (its dev
credentials, the workspace's tokens), and the connector itself in-process on a real nats-server. A profile
change reaches both local CRMs; the operator sees connections, budgets, runs, a person's records and a
refused record, replays it, and a refused call names its field."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import replace

import pytest

from cdp.profile.v1 import profile_pb2
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_crm_emulators.salesforce import SalesforceEmulator
from cdp_kit.bus import Bus, OutMessage, partition_for, subjects
from cdp_kit.timestamps import from_seconds
from cdpctl.platform import CRM, SERVICES, Workspace, service_environment, write_service_files

from .conftest import Cli


async def eventually(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if asyncio.iscoroutine(answer):
            answer = await answer
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(0.1)


def crm_environment(ws: Workspace, named_ports: dict[str, int]) -> dict[str, str]:
    write_service_files(ws, CRM, {**named_ports, "crm.http": 8035})
    env = service_environment(
        ws, CRM, nats_url="nats://127.0.0.1:4222", grpc_port=50057, metrics_port=9470, http_port=8035,
        named_ports=named_ports, peers={"profile": "127.0.0.1:50053"},
    )  # fmt: skip
    # No profile service runs here: a backfill reaches the persons the connector has seen change.
    assert env.pop("CDP_CRM_PROFILE_STORE_URL") == f"sqlite:///{ws.data_dir / 'profile.db'}"
    return env


def test_make_up_runs_the_connector_and_without_companions_gives_it_no_connections(tmp_path):
    from cdp_crm.domain.mapping import load_connections

    assert CRM in SERVICES
    ws = Workspace(tmp_path / "home")
    ws.prepare(())
    env = crm_environment(ws, {"collector.http": 8080})  # `cdpctl up --no-companions`
    assert load_connections(open(env["CDP_CRM_CONNECTIONS_FILE"]).read(), form="yaml") == ()
    assert "CDP_DEV_HUBSPOT_TOKEN" not in env or env["CDP_DEV_HUBSPOT_TOKEN"] == os.environ.get("CDP_DEV_HUBSPOT_TOKEN")

    env = crm_environment(ws, {"collector.http": 8080, "crm-hubspot.api": 8032, "crm-salesforce.api": 8031})
    connections = load_connections(open(env["CDP_CRM_CONNECTIONS_FILE"]).read(), form="yaml")
    assert {(c.id, c.url) for c in connections} == {
        ("hubspot", "http://127.0.0.1:8032"),
        ("salesforce", "http://127.0.0.1:8031"),
    }
    assert env["CDP_CRM_COLLECTOR_URL"] == "http://127.0.0.1:8080"
    # The connector posts CRM users' changes as a collector source of its own (provenance names it).
    assert env["CDP_CRM_COLLECTOR_WRITE_KEY"] == ws.write_key("crm") != ws.write_key()
    # Every credential variable the file names is set, to what the local CRMs accept.
    for connection in connections:
        for variable in connection.credentials.values():
            assert env.get(variable), variable


@pytest.fixture
async def crm_cli(nats_server, tmp_path, monkeypatch):
    from cdp_crm.__main__ import setup
    from cdp_crm.settings import CrmSettings
    from cdp_kit.service import serving
    from cdp_kit.settings import load_settings

    async with HubSpotEmulator() as hubspot, SalesforceEmulator() as salesforce:
        ws = Workspace(tmp_path / "home")
        ws.prepare(())
        ports = {"collector.http": 1, "crm-hubspot.api": hubspot.port, "crm-salesforce.api": salesforce.port}
        env = crm_environment(ws, ports)
        for variable in [v for v in env if v.startswith("CDP_DEV_")]:
            monkeypatch.setenv(variable, env[variable])  # the connector reads credentials from its environment
        env |= {"CDP_NATS_URL": nats_server.url, "CDP_PARTITIONS": "2", "CDP_LOG_LEVEL": "WARNING"}
        settings = replace(
            load_settings(CrmSettings, env), grpc_port=0, metrics_port=0, collector_url="", shutdown_grace=1.0
        )
        async with serving(settings, setup) as runtime:
            ws.write_run(
                {
                    "pid": os.getpid(),
                    "nats": nats_server.url,
                    "admin_token_file": str(ws.admin_token_file),
                    "services": {"crm": {"grpc": f"127.0.0.1:{runtime.grpc.port}"}},
                }
            )
            async with Bus.connect(nats_server.url, name="cdpctl-crm-test") as bus:
                yield Cli(ws.root, nats_server.url), hubspot, salesforce, bus


async def change(bus: Bus, person: str, **traits: str) -> None:
    update = profile_pb2.ProfileChanged(person_id=person, cause="event", at=from_seconds(time.time()))
    for name, value in traits.items():
        update.traits[name].string_value = value
    batch = profile_pb2.ProfileChangedBatch(changes=[update])
    subject = subjects.profiles_changed(partition_for(person, 2))
    [result] = await bus.publisher.publish_batch(
        [OutMessage(subject, batch.SerializeToString(), f"{person}-{time.time()}")]
    )
    assert result.ok, result.error


async def test_an_operator_follows_records_into_the_local_crms_and_replays_a_refused_one(crm_cli):
    cli, hubspot, salesforce, bus = crm_cli
    await change(bus, "person-1", email="ada@example.com", first_name=" Ada ")
    contact = await eventually(lambda: hubspot.find("contacts", "cdp_id", "person-1"))
    assert contact["properties"]["email"] == "ada@example.com"
    assert contact["properties"]["firstname"] == "Ada"
    await eventually(lambda: salesforce.find("Contact", "CDP_Id__c", "person-1"))

    async def record_synced():
        result = await cli.run("crm", "record", "person-1", "--json")
        assert result.exit_code == 0, result.output
        records = {(r["connectionId"], r["mappingId"]): r for r in json.loads(result.output)}
        return all(r["state"] == "RECORD_STATE_SYNCED" for r in records.values()) and len(records) == 2 and records

    records = await eventually(record_synced)
    assert records[("hubspot", "contacts")]["crmId"] == contact["id"]

    status = json.loads((await cli.run("crm", "status", "--json")).output)
    assert {c["id"]: c["state"] for c in status["connections"]} == {
        "hubspot": "CONNECTION_STATE_ACTIVE",
        "salesforce": "CONNECTION_STATE_ACTIVE",
    }
    budget = next(b for b in status["budgets"] if b["account"] == "62515")
    assert budget["burstLimit"] == "190" and int(budget["dailyUsed"]) >= 1
    table = await cli.run("crm", "status")
    assert table.exit_code == 0 and "hubspot" in table.output and "62515" in table.output

    result = await cli.run("crm", "backfill", "hubspot", "--wait", "--json")
    assert result.exit_code == 0, result.output
    run = json.loads(result.output)
    assert (run["state"], run["total"], run["processed"]) == ("RUN_STATE_SUCCEEDED", "1", "1")
    runs = json.loads((await cli.run("crm", "runs", "--connection", "hubspot", "--json")).output)
    assert run["runId"] in [r["runId"] for r in runs]

    # HubSpot refuses the address: a dead letter with its reason, replayed once the profile is fixed.
    await change(bus, "person-2", email="not-an-email")

    async def dead_letter():
        result = await cli.run("crm", "dead-letters", "--connection", "hubspot", "--json")
        return json.loads(result.output)

    (letter,) = await eventually(dead_letter)
    assert (letter["personId"], letter["mappingId"], letter["reason"]) == ("person-2", "contacts", "invalid_value")
    table = await cli.run("crm", "dead-letters")
    assert "person-2" in table.output and "not-an-email" not in table.output  # the CRM's message may quote it
    result = await cli.run("crm", "dead-letters", "--connection", "hubspot", "--replay", "--json")
    assert result.exit_code == 0, result.output
    replay = json.loads(result.output)
    assert replay["replayed"] == "1" and replay["run"]["kind"] == "RUN_KIND_REPLAY"
    await change(bus, "person-2", email="grace@example.com")
    fixed = await eventually(lambda: hubspot.find("contacts", "cdp_id", "person-2"))
    assert fixed["properties"]["email"] == "grace@example.com"

    result = await cli.run("crm", "backfill", "hubspot", "--mapping", "nope", "--json")
    assert result.exit_code == 1
    error = json.loads(result.output)["error"]
    assert error["code"] == "INVALID_ARGUMENT" and [f["field"] for f in error["fields"]] == ["mapping_id"]
    result = await cli.run("crm", "backfill", "nowhere")
    assert result.exit_code == 1 and "NOT_FOUND" in result.output


async def test_an_operator_checks_a_connections_document_before_applying_it(crm_cli, tmp_path):
    cli = crm_cli[0]
    good = (cli.home / "crm" / "connections.yaml").read_text()  # the dev document, as make up wrote it
    (tmp_path / "good.yaml").write_text(good)
    result = await cli.run("crm", "validate", str(tmp_path / "good.yaml"), "--describe")
    assert result.exit_code == 0 and "no problems" in result.output, result.output
    (tmp_path / "bad.yaml").write_text(good.replace("source: scores.churn_risk", "source: score.churn_risk"))
    result = await cli.run("crm", "validate", str(tmp_path / "bad.yaml"), "--json")
    assert result.exit_code == 1
    assert [(p["mapping"], p["field"]) for p in json.loads(result.output)["problems"]] == [
        ("hubspot/contacts", "fields.cdp_churn_risk.source")
    ]
    result = await cli.run("crm", "validate", str(tmp_path / "missing.yaml"))
    assert result.exit_code == 2 and "FILE" in result.output


async def test_an_operator_replays_the_dead_letters_of_every_connection_and_finds_each_replay(crm_cli):
    """`crm dead-letters --replay` without --connection: the run names the one connection its letters are of,
    or - over several - is listed under each (and once in `crm runs`); --wait follows it to its outcome; with
    nothing to replay no run is started. An on-call trial's replay showed an empty connection and no
    `crm runs` listing ever showed it."""
    cli, hubspot, salesforce, bus = crm_cli

    async def replays(*connection: str) -> list[str]:
        result = await cli.run("crm", "runs", *connection, "--json")
        assert result.exit_code == 0, result.output
        return [r["runId"] for r in json.loads(result.output) if r["kind"] == "RUN_KIND_REPLAY"]

    result = await cli.run("crm", "dead-letters", "--replay")
    assert result.exit_code == 0 and "no dead letters to replay" in result.output, result.output
    assert json.loads((await cli.run("crm", "dead-letters", "--replay", "--json")).output).get("run") is None
    assert await replays() == []

    # Both CRMs refuse person-9's record: a dead letter in each connection.
    hubspot.faults.reject(lambda obj, record: record.get("cdp_id") == "person-9")
    salesforce.faults.reject(lambda obj, record: record.get("CDP_Id__c") == "person-9")
    await change(bus, "person-9", email="nine@example.com", last_name="Nine")

    async def dead_letters() -> list[dict]:
        letters = json.loads((await cli.run("crm", "dead-letters", "--json")).output)
        return len(letters) == 2 and letters

    assert {d["connectionId"] for d in await eventually(dead_letters)} == {"hubspot", "salesforce"}
    hubspot.faults.clear()
    salesforce.faults.clear()
    result = await cli.run("crm", "dead-letters", "--replay", "--wait", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    run = answer["run"]
    assert answer["replayed"] == "2" and run["state"] == "RUN_STATE_SUCCEEDED"
    assert (run["total"], run["processed"], run.get("connectionId", "")) == ("2", "2", "")
    assert hubspot.find("contacts", "cdp_id", "person-9") and salesforce.find("Contact", "CDP_Id__c", "person-9")
    assert await replays() == [run["runId"]]
    assert await replays("--connection", "hubspot") == [run["runId"]]
    assert await replays("--connection", "salesforce") == [run["runId"]]
    table = await cli.run("crm", "runs")
    assert run["runId"] in table.output and "(several)" in table.output

    # Only HubSpot refuses person-10: the replay is HubSpot's, listed under it and not under Salesforce.
    hubspot.faults.reject(lambda obj, record: record.get("cdp_id") == "person-10")
    await change(bus, "person-10", email="ten@example.com", last_name="Ten")
    await eventually(lambda: salesforce.find("Contact", "CDP_Id__c", "person-10"))

    async def hubspot_letter() -> list[dict]:
        return json.loads((await cli.run("crm", "dead-letters", "--json")).output)

    assert [d["personId"] for d in await eventually(hubspot_letter)] == ["person-10"]
    hubspot.faults.clear()
    result = await cli.run("crm", "dead-letters", "--replay", "--wait")
    assert result.exit_code == 0 and "replayed 1 dead letter(s)" in result.output, result.output
    [second] = [r for r in await replays() if r != run["runId"]]
    assert second in result.output
    assert await replays("--connection", "hubspot") == [second, run["runId"]]
    assert await replays("--connection", "salesforce") == [run["runId"]]
    assert hubspot.find("contacts", "cdp_id", "person-10")
