"""CRM connector benchmarks, each beside its baseline measured in the same run.

crm-outbound       records/s the connector (`python -m cdp_crm`, 4 partitions, on a real nats-server) writes
                   to the local HubSpot (its own process, at HubSpot's documented limit: 190 requests per
                   rolling 10 s, 100 inputs a batch upsert = 1,900 records/s) from profile changes published
                   on profiles.changed, while faults are injected every two seconds (a 429, a 503, a
                   connection dropped after the write committed). The connector runs with its defaults
                   (crm.in 64 messages a batch, CDP_CRM_BATCH_SIZE). Baseline: a raw client sending batch upserts of 100 at
                   exactly the budget (one request every 10/190 s) to a fresh local HubSpot. Target: >= 90 %
                   of the baseline. `params` carry what must be 0: requests HubSpot
                   answered over its limit (`over_budget`, the connector's only) and duplicates (contacts
                   beyond one per person).
crm-bulk-backfill  records/s of a backfill with bulk=true (runs.Runs over the connector's view of N persons:
                   Salesforce Bulk API 2.0 ingest jobs of 10,000, CSV, polled, results read back into record
                   states) against the local Salesforce (its own process). Baseline: a raw HTTP client
                   creating one job per 10,000 rows, uploading the same CSV, closing, polling and reading
                   the successful results. Full size: --records 1000000 (the connector holds two pages
                   of 10,000 at a time: ~150 MB here at any size; the local Salesforce holds every
                   record and job result, ~650 MB after 200,000 of ours and 200,000 raw).
crm-signal-task    p99 from a signal to the task created at the local HubSpot (in this process, so the
                   moment the task is written is seen directly), 10 probes/s: each task is one request,
                   and the connection's budget is HubSpot's 190 requests per 10 s, so a faster probe
                   would measure the queue behind the budget, not the path. The connector's mappings
                   cannot create a task from a profile change or a segment entry themselves (an action
                   mapping listens to actions.crm only: orchestration decides who gets a task), so the
                   signal is a segment entry: `segments.entered.<p>` as segmentation publishes it, through
                   orchestration (`python -m cdp_orchestration`, a journey entered on the segment whose
                   node is a CRM task) and the connector (`python -m cdp_crm`). The step before - a profile
                   change making the segment entry - is segmentation's own benchmark. `params.stages`
                   holds the second stage alone, as before: an actions.crm message published to the task
                   written (`action_to_task`). Baseline: one bare JetStream hop at the same rate. Target
                   p99 <= 1 s.

    make bench-crm                                   # all three at small sizes
    python bench/bench_crm.py --outbound-records 100000 --records 1000000   # all three at full size
    python bench/bench_crm.py --only bulk --records 1000000                  # the backfill alone

Sizes: --outbound-records (20,000), --records (bulk backfill, 50,000), --probes (200).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import gc
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import grpc

sys.path.insert(0, str(Path(__file__).parent))
from benchlib import bench_hop, percentile, write_result

from cdp.crm.v1 import crm_pb2, crm_pb2_grpc
from cdp.orchestration.v1 import orchestration_pb2, orchestration_pb2_grpc
from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2
from cdp_crm import streams
from cdp_crm.adapters.salesforce import SalesforceAdapter
from cdp_crm.budgets import SharedBudget
from cdp_crm.delivery import Deliverer
from cdp_crm.domain.coalesce import task_key
from cdp_crm.domain.mapping import parse_connections
from cdp_crm.engine import CrmLogic
from cdp_crm.runs import BULK_PAGE, GC_THRESHOLD, Runs
from cdp_crm.settings import CrmSettings
from cdp_crm.state import PERSONS, RUNS, prepare_store
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_kit.bus import Bus, OutMessage, dead_letter_stream, partition_for, profiles_stream, segments_stream, subjects
from cdp_kit.natsserver import NatsServer, free_port, wait_for_port
from cdp_kit.storage import Put, open_store
from cdp_kit.timestamps import from_seconds
from cdp_testing.processes import ServiceProcess

PARTITIONS = 4
HUBSPOT_TOKEN = "pat-local-hubspot"
BURST, WINDOW, BATCH = 190, 10.0, 100
# crm.in messages per engine batch: the service's default (CDP_CRM_BATCH_SIZE), reported in params.
OUTBOUND_BATCH = next(f.default for f in dataclasses.fields(CrmSettings) if f.name == "batch_size")
LIMIT_RECORDS_PER_S = BURST / WINDOW * BATCH
PROBE_INTERVAL = 0.1  # crm-signal-task: 10 probes/s, half the connection's request budget


@contextlib.contextmanager
def emulator_process(crm: str, workdir: Path, **options):
    """A local CRM in its own process (`python -m cdp_crm_emulators`): its base URL."""
    port = free_port()
    args = [sys.executable, "-m", "cdp_crm_emulators", crm, f"--port={port}"]
    args += [f"--set={k}={json.dumps(v)}" for k, v in options.items()]
    with open(workdir / f"{crm}-{port}.log", "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        if not wait_for_port("127.0.0.1", port, 30):
            raise RuntimeError(f"the local {crm} did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def connector(workdir: Path, nats_url: str, document: dict, **env: str) -> ServiceProcess:
    path = workdir / "connections.json"
    path.write_text(json.dumps(document))
    return ServiceProcess(
        "crm",
        "cdp_crm",
        workdir,
        {
            "CDP_NATS_URL": nats_url,
            "CDP_STORE_URL": f"sqlite:///{workdir}/crm.db",
            "CDP_PARTITIONS": str(PARTITIONS),
            "CDP_CRM_CONNECTIONS_FILE": str(path),
            "CDP_CRM_REQUEST_TIMEOUT": "10",
            "CDP_CRM_RETRY_FOR": "30",
            "CDP_METRICS_PORT": str(free_port()),
            "HUBSPOT_TOKEN": HUBSPOT_TOKEN,
            **env,
        },
    )


def hubspot_document(base_url: str, *, tasks: bool = False) -> dict:
    mappings = [
        {"id": "contacts", "object": "contacts", "match": {"cdp_id": "person.id"},
         "fields": {"email": "traits.email", "firstname": "traits.first_name", "cdp_churn_risk": "scores.churn_risk"}},
    ]  # fmt: skip
    if tasks:
        mappings.append(
            {"id": "success-task", "object": "tasks", "action": "task", "idempotency_field": "cdp_idempotency_key",
             "fields": {"hs_task_subject": "action.subject", "hs_task_body": "action.signals"}}
        )  # fmt: skip
    connection = {"id": "hs", "kind": "hubspot", "account": "62515", "url": base_url,
                  "credentials": {"token": "HUBSPOT_TOKEN"}, "mappings": mappings,
                  "limits": {"burst": BURST, "window_seconds": WINDOW}}  # fmt: skip
    return {"connections": [connection]}


async def ensure_upstream(bus: Bus) -> None:
    await bus.ensure_streams(profiles_stream(), segments_stream(), dead_letter_stream())
    await streams.ensure_streams(bus.js)  # ACTIONS and the connector's input stream


async def publish_profiles(bus: Bus, persons: list[str]) -> None:
    by_partition: dict[int, list[str]] = {}
    for person in persons:
        by_partition.setdefault(partition_for(person, PARTITIONS), []).append(person)
    messages = []
    for partition, people in by_partition.items():
        for start in range(0, len(people), 100):
            batch = profile_pb2.ProfileChangedBatch()
            for person in people[start : start + 100]:
                change = batch.changes.add(person_id=person, cause="event", at=from_seconds(time.time()))
                change.traits["email"].string_value = f"{person}@example.com"
                change.traits["first_name"].string_value = person.upper()
                change.scores["churn_risk"] = 0.5
            messages.append(
                OutMessage(subjects.profiles_changed(partition), batch.SerializeToString(), f"{people[start]}+{BATCH}")
            )
    for start in range(0, len(messages), 200):
        results = await bus.publisher.publish_batch(messages[start : start + 200])
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]


async def stream_counts(address: str) -> dict:
    async with grpc.aio.insecure_channel(address) as channel:
        run = await crm_pb2_grpc.CrmServiceStub(channel).GetRun(crm_pb2.GetRunRequest(run_id="stream-hs"), timeout=10)
    return {"created": run.created, "updated": run.updated, "dead": run.dead_lettered, "pending": run.pending_retry}


# --- (a) sustained outbound ---------------------------------------------------------------------------


async def raw_at_budget(base_url: str, records: int) -> float:
    """Records/s a bare client reaches sending batch upserts of 100 at exactly 190 requests / 10 s."""
    interval = WINDOW / BURST
    headers = {"Authorization": f"Bearer {HUBSPOT_TOKEN}"}
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        sent = []
        for n, start in enumerate(range(0, records, BATCH)):
            due = started + n * interval
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            inputs = [
                {"idProperty": "cdp_id", "id": f"raw-{i}",
                 "properties": {"email": f"raw-{i}@example.com", "firstname": f"RAW-{i}", "cdp_churn_risk": "0.5"}}
                for i in range(start, min(records, start + BATCH))
            ]  # fmt: skip
            sent.append(
                asyncio.create_task(_post(session, f"{base_url}/crm/v3/objects/contacts/batch/upsert", inputs, headers))
            )
        statuses = await asyncio.gather(*sent)
        elapsed = time.perf_counter() - started
    # Sent at exactly the limit, a request now and then lands a hair inside the rolling window of the one 190
    # before it (timer jitter): it is answered 429 and sent again a second later, as any client would.
    assert all(s == 200 for s in statuses), f"the raw client's requests failed: {statuses}"
    return records / elapsed


async def _post(session: aiohttp.ClientSession, url: str, inputs: list, headers: dict) -> int:
    while True:
        async with session.post(url, json={"inputs": inputs}, headers=headers) as response:
            await response.read()
            if response.status != 429:
                return response.status
        await asyncio.sleep(1.0)


async def sync(bus, session, address: str, base_url: str, persons: list[str], done_before: int, faults: list) -> float:
    """Publish the persons' profile changes; seconds until the connector has written (or refused) them all.
    `faults`: what to inject into the local HubSpot every two seconds meanwhile (the first entry once)."""
    started = time.perf_counter()
    await publish_profiles(bus, persons)
    rounds = 0
    while True:
        counts = await stream_counts(address)
        if counts["created"] + counts["updated"] + counts["dead"] >= done_before + len(persons):
            return time.perf_counter() - started
        async with session.post(f"{base_url}/_emulator/faults", json={"kind": "status", "n": 0}) as response:
            queued = (await response.json())["pending"]
        if not queued:  # the last ones were met by requests: inject the next (never a growing backlog)
            for fault in faults[1:] if rounds else faults:
                async with session.post(f"{base_url}/_emulator/faults", json=fault) as response:
                    await response.read()
            rounds += 1
        await asyncio.sleep(2.0 if faults else 0.1)


async def run_outbound(records: int, workdir: Path) -> None:
    faulty = max(1000, records // 4)
    # A 429 (once: the budget then waits out HubSpot's whole window, by design), a 503, and a connection
    # dropped after the write committed (every two seconds).
    faults = [{"kind": "status", "status": 429}, {"kind": "status", "status": 503}, {"kind": "drop"}]
    server = NatsServer(workdir / "nats").start()
    try:
        with emulator_process("hubspot", workdir, burst_limit=BURST, burst_window=WINDOW) as base_url:
            async with Bus.connect(server.url, name="bench-crm") as bus:
                await ensure_upstream(bus)
            proc = connector(workdir, server.url, hubspot_document(base_url))
            proc.start(60)
            try:
                async with Bus.connect(server.url, name="bench-crm") as bus, aiohttp.ClientSession() as session:
                    # Sustained: N persons' changes in, written at the pace the shared budget allows.
                    persons = [f"person-{i:07d}" for i in range(records)]
                    elapsed = await sync(bus, session, proc.grpc_address, base_url, persons, 0, [])
                    # Then more with faults injected: nothing duplicated, nothing over the limit.
                    more = [f"person-{i:07d}" for i in range(records, records + faulty)]
                    faulty_elapsed = await sync(bus, session, proc.grpc_address, base_url, more, records, faults)
                    counts = await stream_counts(proc.grpc_address)
                    async with session.get(f"{base_url}/_emulator/budget") as response:
                        budget = await response.json()
                    async with session.get(f"{base_url}/_emulator/records/contacts") as response:
                        contacts = await response.json()
                    async with session.get(f"{base_url}/_emulator/requests") as response:
                        faulted = sum(1 for r in await response.json() if r.get("faulted"))
            finally:
                proc.stop()
        ours = records / elapsed
        ids = [c["properties"]["cdp_id"] for c in contacts]
        with emulator_process("hubspot", workdir, burst_limit=BURST, burst_window=WINDOW) as fresh:
            baseline = await raw_at_budget(fresh, records)
    finally:
        server.close()
    write_result(
        "crm-outbound",
        value=ours,
        unit="records/s",
        baseline=baseline,
        higher_is_better=True,
        params={
            "records": records, "partitions": PARTITIONS, "limit": f"{BURST} requests / {WINDOW:g} s x {BATCH}",
            "batch_messages": OUTBOUND_BATCH,
            "limit_records_per_s": LIMIT_RECORDS_PER_S, "of_limit": round(ours / LIMIT_RECORDS_PER_S, 3),
            "with_faults": {"records": faulty, "records_per_s": round(faulty / faulty_elapsed, 1),
                            "faults_hit": faulted},
            "over_budget": budget["over_budget"], "duplicates": len(ids) - len(set(ids)),
            "contacts": len(ids), "missing": records + faulty - len(set(ids)),
            "requests": budget["daily_used"], "dead_lettered": counts["dead"],
        },
    )  # fmt: skip


# --- (b) bulk backfill --------------------------------------------------------------------------------


def salesforce_document(base_url: str) -> dict:
    return {
        "connections": [
            {"id": "sf", "kind": "salesforce", "url": base_url,
             "credentials": {"client_id": "SF_ID", "client_secret": "SF_SECRET"},
             "mappings": [{"id": "contacts", "object": "Contact", "match": {"CDP_Id__c": "person.id"},
                           "triggers": ["backfill"],
                           "fields": {"Email": "traits.email", "LastName": "traits.last_name",
                                      "FirstName": "traits.first_name"}}]}
        ]
    }  # fmt: skip


async def raw_bulk(base_url: str, records: int) -> float:
    """Records/s of a bare Bulk API 2.0 client: per 10,000 rows a job, the CSV uploaded, closed, polled,
    the successful results read."""
    async with aiohttp.ClientSession() as session:
        form = {"grant_type": "client_credentials", "client_id": "local-consumer-key",
                "client_secret": "local-consumer-secret"}  # fmt: skip
        async with session.post(f"{base_url}/services/oauth2/token", data=form) as response:
            token = (await response.json())["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        api = f"{base_url}/services/data/v62.0/jobs/ingest"
        started = time.perf_counter()
        for start in range(0, records, BULK_PAGE):
            spec = {"object": "Contact", "externalIdFieldName": "CDP_Id__c", "contentType": "CSV",
                    "operation": "upsert", "lineEnding": "LF"}  # fmt: skip
            async with session.post(api, json=spec, headers=headers) as response:
                job = (await response.json())["id"]
            data = bulk_csv(range(start, min(records, start + BULK_PAGE)), "raw")
            async with session.put(f"{api}/{job}/batches", data=data, headers={**headers, "Content-Type": "text/csv"}):
                pass
            async with session.patch(f"{api}/{job}", json={"state": "UploadComplete"}, headers=headers):
                pass
            while True:
                async with session.get(f"{api}/{job}", headers=headers) as response:
                    if (await response.json())["state"] in ("JobComplete", "Failed", "Aborted"):
                        break
                await asyncio.sleep(0.2)
            async with session.get(f"{api}/{job}/successfulResults", headers=headers) as response:
                await response.read()
        return records / (time.perf_counter() - started)


def bulk_csv(numbers, prefix: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["CDP_Id__c", "Email", "LastName", "FirstName"])
    for i in numbers:
        writer.writerow([f"{prefix}-{i:07d}", f"{prefix}-{i}@example.com", f"Person{i}", f"P{i}"])
    return out.getvalue()


async def run_bulk(records: int, workdir: Path) -> None:
    gc.set_threshold(*GC_THRESHOLD)  # as the service sets it: Runs runs in this process here
    with emulator_process("salesforce", workdir, daily_limit=10_000_000) as base_url:
        store = open_store(f"sqlite:///{workdir}/crm-bulk.db")
        await prepare_store(store)
        for start in range(0, records, 5000):
            await store.bulk_write(
                [Put(PERSONS, f"person-{i:07d}", {"fields": {"traits.email": f"person-{i}@example.com",
                                                             "traits.last_name": f"Person{i}",
                                                             "traits.first_name": f"P{i}"},
                                                  "segments": [], "stamp": 1})
                 for i in range(start, min(records, start + 5000))]
            )  # fmt: skip
        connections = parse_connections(salesforce_document(base_url))
        async with aiohttp.ClientSession() as session:
            adapter = SalesforceAdapter(
                session, client_id="local-consumer-key", client_secret="local-consumer-secret", login_url=base_url,
                timeout=300.0,
            )  # fmt: skip
            budgets = {c.id: SharedBudget(store, c) for c in connections}
            deliverer = Deliverer({"sf": adapter}, budgets, retry_for=60.0, bulk_poll_seconds=0.2)
            logic = CrmLogic(store, connections, deliverer)
            runs = Runs(logic, partitions=1)
            started = time.perf_counter()
            run_id, _ = await runs.start_backfill("sf", bulk=True)
            while (doc := (await store.get(RUNS, run_id)).doc)["state"] == "running":  # noqa: ASYNC110 - another task's
                await asyncio.sleep(0.2)
            elapsed = time.perf_counter() - started
        await store.close()
        baseline = await raw_bulk(base_url, records)
    assert doc["state"] == "succeeded", doc
    write_result(
        "crm-bulk-backfill",
        value=records / elapsed,
        unit="records/s",
        baseline=baseline,
        higher_is_better=True,
        params={"records": records, "seconds": round(elapsed, 2), "job_size": BULK_PAGE,
                "created": doc["created"], "dead_lettered": doc["dead_lettered"], "api_units": doc["api_units"]},
    )  # fmt: skip


# --- (c) signal -> CRM task ---------------------------------------------------------------------------


class WatchedHubSpot(HubSpotEmulator):
    """The local HubSpot, noting when each task is first written (perf_counter), by its idempotency key
    and by its subject."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.task_written: dict[str, float] = {}
        self.subject_written: dict[str, float] = {}

    def _write(self, obj, record_id, properties):
        record = super()._write(obj, record_id, properties)
        key = record["properties"].get("cdp_idempotency_key")
        if obj == "tasks" and key and key not in self.task_written:
            self.task_written[key] = time.perf_counter()
            self.subject_written.setdefault(str(record["properties"].get("hs_task_subject")), time.perf_counter())
        return record


SEGMENT = "fraud_risk"
# A journey as a risk team writes it: whoever enters the segment gets a review task in the CRM.
REVIEW_JOURNEY = {
    "id": "review-fraud-risk",
    "version": 1,
    "name": "A fraud signal opens a review task",
    "priority": 90,
    "category": "service",
    "timezone": "UTC",
    "entry": {"segment": SEGMENT, "on": "entered"},
    "nodes": [
        {
            "id": "review",
            "type": "action",
            "channel": "crm",
            "purpose": "Service",
            "category": "transactional",
            "template": {"kind": "task", "subject": "Review probe {{ traits.probe }}", "body": "Fraud signal"},
        }
    ],
}


def orchestration(workdir: Path, nats_url: str) -> ServiceProcess:
    return ServiceProcess(
        "orchestration",
        "cdp_orchestration",
        workdir,
        {
            "CDP_NATS_URL": nats_url,
            "CDP_STORE_URL": f"sqlite:///{workdir}/orchestration.db",
            "CDP_PARTITIONS": str(PARTITIONS),
            "CDP_METRICS_PORT": str(free_port()),
        },
    )


async def segment_to_task(probes: int, server_url: str, workdir: Path, hubspot: WatchedHubSpot) -> list[float]:
    """ms from each probe's segments.entered to its task at the CRM, through orchestration and the
    connector (both already running)."""
    persons = [f"probe-person-{n}" for n in range(probes)]
    async with Bus.connect(server_url, name="bench-crm") as bus:
        # The persons as profile publishes them: consent to the service purpose, the trait the task names.
        messages = []
        for n, person in enumerate(persons):
            change = profile_pb2.ProfileChanged(person_id=person, cause="api", at=from_seconds(time.time()))
            change.traits["probe"].string_value = str(n)
            change.consent["purpose:Service"] = True
            batch = profile_pb2.ProfileChangedBatch(changes=[change])
            subject = subjects.profiles_changed(partition_for(person, PARTITIONS))
            messages.append(OutMessage(subject, batch.SerializeToString(), f"probe-profile-{n}"))
        for result in await bus.publisher.publish_batch(messages):
            assert result.ok, result.error
        await asyncio.sleep(3.0)  # orchestration has read them before their segment entries come
        sent: dict[str, float] = {}
        for n, person in enumerate(persons):
            tick = time.perf_counter()
            entry = segmentation_pb2.SegmentEvent(
                id=f"probe-entry-{n}", person_id=person, segment_id=SEGMENT, entered=True, reason="score"
            )
            entry.at.CopyFrom(from_seconds(time.time()))
            batch = segmentation_pb2.SegmentEventBatch(events=[entry])
            subject = subjects.segments_entered(partition_for(person, PARTITIONS))
            sent[f"Review probe {n}"] = time.perf_counter()
            [result] = await bus.publisher.publish_batch([OutMessage(subject, batch.SerializeToString(), entry.id)])
            assert result.ok, result.error
            await asyncio.sleep(max(0.0, PROBE_INTERVAL - (time.perf_counter() - tick)))
        deadline = time.perf_counter() + 60
        while not set(sent) <= set(hubspot.subject_written) and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    return [(hubspot.subject_written[k] - t) * 1000 for k, t in sent.items() if k in hubspot.subject_written]


async def publish_journey(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = orchestration_pb2_grpc.OrchestrationServiceStub(channel)
        definition = orchestration_pb2.JourneyDefinition(json=json.dumps(REVIEW_JOURNEY))
        created = await stub.CreateJourney(orchestration_pb2.CreateJourneyRequest(definition=definition), timeout=30)
        await stub.PublishJourney(orchestration_pb2.PublishJourneyRequest(journey_id=created.id), timeout=60)


async def run_signal(probes: int, workdir: Path) -> None:
    server = NatsServer(workdir / "nats-signal").start()
    try:
        async with WatchedHubSpot() as hubspot:
            async with Bus.connect(server.url, name="bench-crm") as bus:
                await ensure_upstream(bus)
            # The local HubSpot answers on this process's event loop: starting and stopping the processes
            # (which wait for them) happen in a thread, so the connector's describe at start and the
            # requests it drains at stop are answered meanwhile.
            proc = connector(workdir, server.url, hubspot_document(hubspot.base_url, tasks=True))
            await asyncio.to_thread(proc.start, 60)
            journeys = orchestration(workdir, server.url)
            sent: dict[str, float] = {}
            try:
                await asyncio.to_thread(journeys.start, 60)
                await publish_journey(journeys.grpc_address)
                signal = await segment_to_task(probes, server.url, workdir, hubspot)
                await asyncio.to_thread(journeys.stop)
                await asyncio.sleep(WINDOW)  # the first stage's requests leave the budget's rolling window
                async with Bus.connect(server.url, name="bench-crm") as bus:
                    for n in range(probes):
                        tick = time.perf_counter()
                        person = f"person-{n % 500}"
                        action = orchestration_pb2.ActionMessage(
                            action_id=f"act-{n}", person_id=person, channel="crm", crm_kind="task", category="risk"
                        )
                        action.content["subject"] = "Fraud signal: review the account"
                        action.signals.add(name="fraud_score", value="0.97")
                        subject = subjects.actions(subjects.CRM_CHANNEL, partition_for(person, PARTITIONS))
                        sent[task_key("hs", "success-task", f"act-{n}")] = time.perf_counter()
                        [result] = await bus.publisher.publish_batch(
                            [OutMessage(subject, action.SerializeToString(), f"act-{n}")]
                        )
                        assert result.ok, result.error
                        await asyncio.sleep(max(0.0, PROBE_INTERVAL - (time.perf_counter() - tick)))
                    # The signal stage's tasks are written already: wait for this stage's own.
                    deadline = time.perf_counter() + 60
                    while not set(sent) <= set(hubspot.task_written) and time.perf_counter() < deadline:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
            finally:
                await asyncio.to_thread(journeys.stop)
                await asyncio.to_thread(proc.stop)
            latencies = [(hubspot.task_written[k] - t) * 1000 for k, t in sent.items() if k in hubspot.task_written]
            tasks = len(hubspot.records("tasks"))
        hop = await bench_hop(server.url, max(2.0, probes * PROBE_INTERVAL), rate=20 * 50, payload=b"x" * 300)
    finally:
        server.close()
    action_to_task = {"from": "actions.crm", "p99_ms": round(percentile(latencies, 99), 1),
                      "p50_ms": round(percentile(latencies, 50), 1), "tasks_seen": len(latencies)}  # fmt: skip
    write_result(
        "crm-signal-task",
        value=percentile(signal, 99),
        unit="ms",
        baseline=hop["p99_ms"],
        higher_is_better=False,
        params={"from": "segments.entered (through orchestration and the connector)", "probes": probes,
                "tasks_seen": len(signal), "tasks_in_crm": tasks, "p50_ms": round(percentile(signal, 50), 1),
                "stages": {"action_to_task": action_to_task}, "hop": hop, "target_p99_ms": 1000},
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="outbound,bulk,signal", help="which: outbound, bulk, signal")
    parser.add_argument("--outbound-records", type=int, default=int(os.environ.get("BENCH_CRM_OUTBOUND", "20000")))
    parser.add_argument("--records", type=int, default=int(os.environ.get("BENCH_CRM_RECORDS", "50000")))
    parser.add_argument("--probes", type=int, default=int(os.environ.get("BENCH_CRM_PROBES", "200")))
    parser.add_argument("--workdir", default=None, help="keep logs and stores here (default: a temporary folder)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    with contextlib.ExitStack() as stack:
        tmp = args.workdir or stack.enter_context(tempfile.TemporaryDirectory())
        Path(tmp).mkdir(parents=True, exist_ok=True)
        if "outbound" in only:
            asyncio.run(run_outbound(args.outbound_records, Path(tmp)))
        if "bulk" in only:
            asyncio.run(run_bulk(args.records, Path(tmp)))
        if "signal" in only:
            asyncio.run(run_signal(args.probes, Path(tmp)))


if __name__ == "__main__":
    main()
