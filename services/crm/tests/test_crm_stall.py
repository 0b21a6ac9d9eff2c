"""A CRM that stalls - its process stopped, so requests hang rather than fail - while persons keep coming:
every change lands once the CRM answers again, or is visibly queued or dead-lettered meanwhile; none is
acknowledged and forgotten. The local HubSpot runs as its own process (`python -m cdp_crm_emulators`), and
is paused with SIGSTOP and resumed with SIGCONT, as an on-call trial did under `make up`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import aiohttp
import pytest

from cdp.crm.v1 import crm_pb2
from cdp_crm.api import CrmApi
from cdp_crm.delivery import HOLD_BACKOFF, Deliverer
from cdp_crm.domain.mapping import parse_connections
from cdp_crm.state import PENDING, PERSONS, RECORDS
from cdp_crm_emulators.salesforce import SalesforceEmulator
from cdp_testing import pausing
from cdp_testing.crm import hubspot_document

# The held connection's probes, 15 times faster like the tests' other settings: the process waits up to 30 s
# between two, so a probe that failed just before the CRM came back left its changes queued that long.
HOLD_FASTER = tuple(step / 15 for step in HOLD_BACKOFF)


class EmulatorProcess:
    """The local HubSpot as a process: its URL, its records read over its inspection API."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cdp_crm_emulators", "hubspot", "--port", "0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        # Its first line says where it listens: a JSON log line with the `url`.
        self.base_url = json.loads(self.proc.stdout.readline())["url"]

    def pause(self) -> None:
        pausing.pause(self.proc.pid)  # stopped for certain, not only signalled

    def resume(self) -> None:
        pausing.resume(self.proc.pid)

    async def contacts(self, session: aiohttp.ClientSession) -> list[dict]:
        async with session.get(f"{self.base_url}/_emulator/records/contacts") as response:
            return await response.json()

    def close(self) -> None:
        self.resume()
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def hubspot_process():
    emulator = EmulatorProcess()
    yield emulator
    emulator.close()


def two_crms(hubspot: str, salesforce: str) -> dict:
    """HubSpot and Salesforce as `make up` connects them (libs/cdpctl's dev connections)."""
    return {
        "connections": [
            {
                "id": "hubspot", "kind": "hubspot", "account": "62515", "url": hubspot,
                "credentials": {"token": "HUBSPOT_TOKEN"},
                "mappings": [
                    {"id": "contacts", "object": "contacts", "match": {"cdp_id": "person.id"},
                     "fields": {"email": "traits.email", "firstname": "traits.first_name"}},
                    {"id": "success-task", "object": "tasks", "action": "task",
                     "idempotency_field": "cdp_idempotency_key", "about": {"mapping": "contacts"},
                     "fields": {"hs_task_subject": "action.subject"}},
                ],
            },
            {
                "id": "salesforce", "kind": "salesforce", "account": "local-org", "url": salesforce,
                "credentials": {"client_id": "SF_ID", "client_secret": "SF_SECRET"},
                "mappings": [
                    {"id": "contacts", "object": "Contact", "match": {"CDP_Id__c": "person.id"},
                     "fields": {"Email": "traits.email", "LastName": {"source": "traits.last_name",
                                                                      "default": "(unknown)"}}},
                ],
            },
        ]
    }  # fmt: skip


async def test_persons_identified_while_the_crm_hangs_all_land_once_it_answers(world_factory, hubspot_process):
    """The on-call trial, 15 times faster: a person identified every 0.67 s (10 s) while HubSpot hangs for
    10 s (2.5 min), eight partitions, HubSpot and Salesforce. It passes on the code it was written against
    too (the loss was not reproduced here): it guards the promise and checks the pending figure."""
    salesforce = await SalesforceEmulator().start()
    world = await world_factory(hubspot_process)
    env = {"SF_ID": salesforce.client_id, "SF_SECRET": salesforce.client_secret}
    # The process' defaults (a 30 s request, 60 s of retries, 120 s before JetStream redelivers, 1 to 30 s
    # between probes of a held connection), 15 times faster.
    await world.start(
        two_crms(hubspot_process.base_url, salesforce.base_url), env=env, retry_for=4.0, request_timeout=2.0,
        ack_wait=8.0, partitions=8, hold_backoff=HOLD_FASTER,
    )  # fmt: skip
    persons = [f"person-{i}" for i in range(16)]
    await world.profiles({persons[0]: {"traits.email": "p0@example.com"}})

    async def landed(wanted):
        found = {c["properties"].get("cdp_id") for c in await hubspot_process.contacts(world.session)}
        return set(wanted) <= found

    await world.eventually(lambda: landed(persons[:1]))
    hubspot_process.pause()
    try:
        for i, person in enumerate(persons[1:], start=1):
            await world.profiles({person: {"traits.email": f"p{i}@example.com"}})
            await asyncio.sleep(0.67)
    finally:
        hubspot_process.resume()

    async def every_one_landed():
        return await landed(persons)

    try:
        await world.eventually(every_one_landed, timeout=40.0)
    except AssertionError as lost:
        found = {c["properties"].get("cdp_id") for c in await hubspot_process.contacts(world.session)}
        missing = sorted(set(persons) - found)
        views = await world.store.get_many(PERSONS, missing)
        pending = [r.key async for r in world.store.scan_all(PENDING)]
        records = [(r.doc["person_id"], r.doc["state"]) async for r in world.store.scan_all(RECORDS)]
        raise AssertionError(
            f"missing {missing}; views {sorted(views)}; pending {pending}; records {records}"
        ) from lost
    # Nothing is left queued, and the figure the on-call engineer reads (`cdpctl crm status`: the stream
    # run's pending) says so - it counts what is queued now, not every time something was queued.
    await world.eventually(lambda: _nothing_queued(world.store), timeout=20.0)
    api = CrmApi(
        store=world.store, connections=world.connections, deliverer=world.logic.deliverer, budgets={}, runs=None
    )
    for connection in ("hubspot", "salesforce"):
        run = await api.GetRun(crm_pb2.GetRunRequest(run_id=f"stream-{connection}"), None)
        assert run.pending_retry == 0, connection
    await salesforce.close()


async def _nothing_queued(store) -> bool:
    return not [r async for r in store.scan_all(PENDING)]


async def test_the_stream_runs_pending_figure_is_what_is_queued_now(world_factory, hubspot_process):
    """While the CRM hangs its changes are queued and the stream run's pending says how many; once they
    are written it says none (it used to add up every time a change was queued again)."""
    world = await world_factory(hubspot_process)
    await world.start(retry_for=1.0, request_timeout=0.5, hold_backoff=HOLD_FASTER)
    api = CrmApi(store=world.store, connections=world.connections, deliverer=world.logic.deliverer, budgets={},
                 runs=None)  # fmt: skip

    async def pending() -> int:
        return (await api.GetRun(crm_pb2.GetRunRequest(run_id="stream-hs"), None)).pending_retry

    hubspot_process.pause()
    try:
        await world.profiles({f"person-{i}": {"traits.email": f"p{i}@example.com"} for i in range(3)})
        # Queued, then retried and queued again a few times while the CRM hangs.
        await world.eventually(lambda: _queued_at_least(world.store, 3, rounds=3))
        assert await pending() == 3
    finally:
        hubspot_process.resume()
    await world.eventually(lambda: _nothing_queued(world.store), timeout=20.0)
    assert await pending() == 0


async def _queued_at_least(store, n: int, *, rounds: int) -> bool:
    queued = [r.doc async for r in store.scan_all(PENDING)]
    return len(queued) >= n and all(doc["attempts"] >= rounds for doc in queued)


def test_a_held_connection_is_tried_again_after_the_steps_it_was_given():
    """The steps between tries of a held connection are the deliverer's to be given (the process keeps
    `HOLD_BACKOFF`); the last one repeats."""
    [connection] = parse_connections(hubspot_document("http://127.0.0.1:9"))
    mapping = connection.mappings[0]
    now = 1000.0
    # An adapter with neither a probe nor a lookup: the connection is tried again by its next write.
    deliverer = Deliverer({connection.id: object()}, {}, clock=lambda: now, hold_backoff=(0.5, 2.0))
    tries = []
    for _ in range(3):
        deliverer.read_failed(mapping, "TimeoutError")
        tries.append(deliverer.health[connection.id].retry_at - now)
    assert tries == [0.5, 2.0, 2.0]
    assert deliverer.resting(connection.id)
    assert Deliverer({connection.id: object()}, {}).hold_backoff == HOLD_BACKOFF
