"""Each CRM connection's delivery is its own: one CRM refusing every request (a revoked token, an outage)
delays only its own writes - they are held, in `crm_pending`, and retried with a back-off - while the other
CRMs' writes keep landing as they would. The held work is committed with the batch: a crash loses none of
it, and it lands once the CRM takes requests again.

The CRM-administrator trial under `make up` saw HubSpot's 401 storm hold Salesforce's writes back 52-104 s:
every batch retried HubSpot for `CDP_CRM_RETRY_FOR` before it wrote Salesforce at all."""

from __future__ import annotations

import pytest

from cdp_crm.adapters.salesforce import SalesforceAdapter
from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.coalesce import UPSERT, Change, record_key
from cdp_crm.inbound import HubSpotPoller, Poller
from cdp_crm.inbound.salesforce import SalesforceReader
from cdp_crm.state import PENDING, RECORDS, SYNCED
from cdp_crm.writes import change_doc
from cdp_crm_emulators.dynamics import DynamicsEmulator
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_crm_emulators.salesforce import SalesforceEmulator
from cdp_crm_emulators.zoho import ZohoEmulator
from cdp_kit.storage import Put

from .conftest import TOKEN
from .test_crm_stall import hubspot_process  # noqa: F401 - the fixture: the local HubSpot as a process


def two_crms(hubspot: str, salesforce: str) -> dict:
    return {
        "connections": [
            {
                "id": "hubspot", "kind": "hubspot", "account": "62515", "url": hubspot,
                "credentials": {"token": "HUBSPOT_TOKEN"},
                "mappings": [
                    {"id": "contacts", "object": "contacts", "match": {"cdp_id": "person.id"},
                     "fields": {"email": "traits.email"}},
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


def _wire_pollers(world, salesforce: SalesforceEmulator, collector, *, timeout: float) -> None:
    """Each connection's inbound poller, wired to the engine as the process wires them (engine `read_first`
    reads a connection's news before its writes)."""
    hs_connection, sf_connection = world.connections
    hs_poller = HubSpotPoller(
        world.store, hs_connection, world.session, TOKEN, SharedBudget(world.store, hs_connection),
        collector.client(world.session), objects=("contacts",), timeout=timeout,
    )  # fmt: skip
    adapter = SalesforceAdapter(
        world.session, client_id=salesforce.client_id, client_secret=salesforce.client_secret,
        login_url=salesforce.base_url,
    )  # fmt: skip
    reader = SalesforceReader(sf_connection, adapter, SharedBudget(world.store, sf_connection))
    sf_poller = Poller(world.store, sf_connection, reader, collector.client(world.session), objects=("Contact",))
    world.logic.inbound = {"hubspot": hs_poller, "salesforce": sf_poller}


async def test_a_crm_refusing_every_request_delays_only_its_own_writes(world_factory):
    hubspot = await HubSpotEmulator().start()
    salesforce = await SalesforceEmulator().start()
    try:
        world = await world_factory(hubspot)
        document = two_crms(hubspot.base_url, salesforce.base_url)
        env = {"SF_ID": salesforce.client_id, "SF_SECRET": salesforce.client_secret}
        # A batch may retry a failing CRM for 25 s (the process' default is 60): longer than the 15 s the
        # Salesforce writes are waited for below.
        await world.start(document, env=env, retry_for=25.0, ack_wait=60.0, partitions=1)
        hubspot.tokens = set()  # the private app's token revoked: every HubSpot request is answered 401
        persons = [f"person-{i}" for i in range(3)]
        for i, person in enumerate(persons):
            await world.profiles({person: {"traits.email": f"p{i}@example.com", "traits.last_name": f"L{i}"}})

            def in_salesforce(wanted=persons[: i + 1]) -> bool:
                return {c["CDP_Id__c"] for c in salesforce.records("Contact")} >= set(wanted)

            # One after another: each person reaches Salesforce while HubSpot still refuses everything.
            await world.eventually(in_salesforce)
        assert hubspot.records("contacts") == []

        async def held(n: int) -> bool:
            return len([r async for r in world.store.scan_all(PENDING)]) == n

        # HubSpot's share is held in the store, committed with the batches: a crash now loses none of it.
        await world.eventually(lambda: held(3))
        world.abort()
        hubspot.tokens = {TOKEN}
        await world.start(document, env=env, retry_for=25.0, ack_wait=60.0, partitions=1)

        def in_hubspot() -> bool:
            found = {c["properties"].get("cdp_id"): c["properties"] for c in hubspot.records("contacts")}
            return set(found) == set(persons) and all(
                found[p]["email"] == f"p{i}@example.com" for i, p in enumerate(persons)
            )

        await world.eventually(in_hubspot)
        await world.eventually(lambda: held(0))
        assert len(salesforce.records("Contact")) == 3
    finally:
        await hubspot.close()
        await salesforce.close()


async def test_a_crm_answering_again_takes_its_held_writes_without_a_restart(world_factory):
    """The back-off ends by itself: once the CRM takes requests, what was held lands, and later writes go
    straight through again."""
    hubspot = await HubSpotEmulator().start()
    salesforce = await SalesforceEmulator().start()
    try:
        world = await world_factory(hubspot)
        document = two_crms(hubspot.base_url, salesforce.base_url)
        env = {"SF_ID": salesforce.client_id, "SF_SECRET": salesforce.client_secret}
        await world.start(document, env=env, retry_for=25.0, ack_wait=60.0, partitions=1)
        hubspot.faults.fail_next(5000, status=503)  # HubSpot down
        await world.profiles({"person-a": {"traits.email": "a@example.com", "traits.last_name": "A"}})
        await world.eventually(lambda: len(salesforce.records("Contact")) == 1)
        await world.profiles({"person-b": {"traits.email": "b@example.com", "traits.last_name": "B"}})
        await world.eventually(lambda: len(salesforce.records("Contact")) == 2)
        hubspot.faults.clear()  # up again
        await world.eventually(lambda: len(hubspot.records("contacts")) == 2)
        await world.profiles({"person-c": {"traits.email": "c@example.com", "traits.last_name": "C"}})
        await world.eventually(
            lambda: len(hubspot.records("contacts")) == 3 and len(salesforce.records("Contact")) == 3
        )
    finally:
        await hubspot.close()
        await salesforce.close()


async def test_a_crm_that_hangs_delays_only_its_own_writes_with_the_pollers_reading_first(
    world_factory,
    hubspot_process,  # noqa: F811 - the fixture imported above
    collector,
):
    """HubSpot's process stopped (SIGSTOP: requests hang until their timeout), the inbound pollers wired as
    the process wires them - each connection's news read before its writes (engine `read_first`). The first
    batch meets the hang: its Salesforce write goes at once (the next test), but the batch is committed
    only after HubSpot's read timed out (20 s here) and its write was queued; from then on the connection
    is held and Salesforce's writes go through at once, while HubSpot's are queued; they land once it
    answers."""
    salesforce = await SalesforceEmulator().start()
    try:
        world = await world_factory(hubspot_process)
        document = two_crms(hubspot_process.base_url, salesforce.base_url)
        env = {"SF_ID": salesforce.client_id, "SF_SECRET": salesforce.client_secret}
        await world.start(document, env=env, retry_for=25.0, ack_wait=60.0, request_timeout=20.0, partitions=1)
        _wire_pollers(world, salesforce, collector, timeout=20.0)
        hubspot_process.pause()
        try:
            await world.profiles({"person-0": {"traits.email": "p0@example.com", "traits.last_name": "L0"}})
            await world.eventually(lambda: {c["CDP_Id__c"] for c in salesforce.records("Contact")} == {"person-0"},
                                   timeout=40.0)  # fmt: skip

            async def first_batch_committed() -> bool:  # HubSpot's read timed out (20 s), its write queued
                return len([r async for r in world.store.scan_all(PENDING)]) == 1

            await world.eventually(first_batch_committed, timeout=40.0)
            persons = [f"person-{i}" for i in range(4)]
            for i, person in enumerate(persons[1:], start=1):
                await world.profiles({person: {"traits.email": f"p{i}@example.com", "traits.last_name": f"L{i}"}})

                def in_salesforce(wanted=persons[: i + 1]) -> bool:
                    return {c["CDP_Id__c"] for c in salesforce.records("Contact")} >= set(wanted)

                await world.eventually(in_salesforce)  # 15 s: less than a read's timeout
        finally:
            hubspot_process.resume()

        async def in_hubspot() -> bool:
            found = {c["properties"].get("cdp_id") for c in await hubspot_process.contacts(world.session)}
            return found >= set(persons)

        await world.eventually(in_hubspot, timeout=60.0)
    finally:
        await salesforce.close()


async def test_a_crm_that_hangs_does_not_delay_the_first_batch_of_the_others(
    world_factory,
    hubspot_process,  # noqa: F811 - the fixture imported above
    collector,
):
    """Each connection of a batch is delivered on its own (engine `deliver_planned`): the very first batch
    meeting a HubSpot that hangs (its process stopped) writes Salesforce's record at once, while HubSpot's
    read before its write is still waiting - here for a request timeout of 5 minutes, so before the change
    Salesforce's write came only after it. The batch is committed (acknowledged) only once HubSpot's share
    is settled too: nothing of it is queued or recorded while HubSpot hangs, and once it answers, its
    record is written by the same batch."""
    salesforce = await SalesforceEmulator().start()
    try:
        world = await world_factory(hubspot_process)
        document = two_crms(hubspot_process.base_url, salesforce.base_url)
        env = {"SF_ID": salesforce.client_id, "SF_SECRET": salesforce.client_secret}
        await world.start(document, env=env, retry_for=240.0, ack_wait=600.0, request_timeout=300.0, partitions=1)
        _wire_pollers(world, salesforce, collector, timeout=300.0)
        hubspot_process.pause()
        try:
            await world.profiles({"person-0": {"traits.email": "p0@example.com", "traits.last_name": "L0"}})
            await world.eventually(lambda: {c["CDP_Id__c"] for c in salesforce.records("Contact")} == {"person-0"},
                                   timeout=30.0)  # fmt: skip
            # HubSpot still hangs, and the batch still waits for it: nothing of HubSpot's is queued or
            # recorded yet, and HubSpot's connection is not held (its read has not failed).
            assert [r.key async for r in world.store.scan_all(PENDING)] == []
            assert await world.store.get(RECORDS, record_key("hubspot/contacts", (("cdp_id", "person-0"),))) is None
            assert world.logic.deliverer.health["hubspot"].held_since == 0.0
        finally:
            hubspot_process.resume()

        async def in_hubspot() -> bool:
            found = {c["properties"].get("cdp_id") for c in await hubspot_process.contacts(world.session)}
            return found == {"person-0"}

        await world.eventually(in_hubspot, timeout=30.0)

        async def settled() -> bool:
            keys = [record_key(m, ((f, "person-0"),)) for m, f in (("hubspot/contacts", "cdp_id"),
                                                                   ("salesforce/contacts", "CDP_Id__c"))]  # fmt: skip
            found = await world.store.get_many(RECORDS, keys)
            return len(found) == 2 and all(r.doc.get("state") == SYNCED for r in found.values())

        await world.eventually(settled, timeout=30.0)
        assert [r.key async for r in world.store.scan_all(PENDING)] == []
        assert len(salesforce.records("Contact")) == 1
    finally:
        await salesforce.close()


async def test_a_crm_over_its_daily_limit_does_not_hold_the_batches_of_the_others(world_factory):
    """HubSpot answers its daily limit (429 DAILY): the account's budget allows no request before the next
    UTC day, so HubSpot's share of each batch is queued at once (`crm_pending`, retried when the budget
    allows) instead of being tried again until `CDP_CRM_RETRY_FOR` ran out - which held every later batch,
    and so every later Salesforce write, that long (here 200 s)."""
    hubspot = await HubSpotEmulator(daily_limit=0).start()
    salesforce = await SalesforceEmulator().start()
    try:
        world = await world_factory(hubspot)
        document = two_crms(hubspot.base_url, salesforce.base_url)
        env = {"SF_ID": salesforce.client_id, "SF_SECRET": salesforce.client_secret}
        await world.start(document, env=env, retry_for=200.0, ack_wait=300.0, partitions=1)
        persons = [f"person-{i}" for i in range(3)]
        for i, person in enumerate(persons):
            await world.profiles({person: {"traits.email": f"p{i}@example.com", "traits.last_name": f"L{i}"}})

            def in_salesforce(wanted=persons[: i + 1]) -> bool:
                return {c["CDP_Id__c"] for c in salesforce.records("Contact")} >= set(wanted)

            await world.eventually(in_salesforce, timeout=30.0)

        async def held(n: int) -> bool:
            return len([r async for r in world.store.scan_all(PENDING)]) == n

        await world.eventually(lambda: held(3), timeout=30.0)  # HubSpot's share, queued for its next day
        assert hubspot.records("contacts") == []
        assert world.logic.deliverer.health["hubspot"].state == "throttled"
    finally:
        await hubspot.close()
        await salesforce.close()


async def test_a_crm_that_hangs_does_not_delay_the_queued_changes_of_the_others(world_factory, hubspot_process):  # noqa: F811
    """Queued changes (`crm_pending`) of two connections are retried (engine `retry_pending`) while HubSpot's
    process is stopped and not yet held (it answered until now): Salesforce's queued change is written
    while HubSpot's request still hangs (a 5-minute request timeout here), not after it."""
    salesforce = await SalesforceEmulator().start()
    try:
        world = await world_factory(hubspot_process)
        document = two_crms(hubspot_process.base_url, salesforce.base_url)
        env = {"SF_ID": salesforce.client_id, "SF_SECRET": salesforce.client_secret}
        await world.start(document, env=env, retry_for=25.0, ack_wait=600.0, request_timeout=300.0, partitions=1)
        # A person whose HubSpot record sorts first among the queued changes (as the retrier reads them).
        person = next(
            p for p in (f"person-{i}" for i in range(100))
            if record_key("hubspot/contacts", (("cdp_id", p),)) < record_key("salesforce/contacts", (("CDP_Id__c", p),))
        )  # fmt: skip
        queued = [
            Change("hubspot/contacts", (("cdp_id", person),), {"email": "q@example.com"}, 1, UPSERT, person, "t"),
            Change("salesforce/contacts", (("CDP_Id__c", person),), {"Email": "q@example.com", "LastName": "Q"}, 1,
                   UPSERT, person, "t"),
        ]  # fmt: skip
        hubspot_process.pause()
        try:
            await world.store.bulk_write([Put(PENDING, c.record, change_doc(c, 0)) for c in queued])
            world.logic.queued.set()  # as a batch that queued them would
            await world.eventually(lambda: {c["CDP_Id__c"] for c in salesforce.records("Contact")} == {person},
                                   timeout=30.0)  # fmt: skip
            held = {r.doc["connection"] async for r in world.store.scan_all(PENDING)}
            assert held == {"hubspot", "salesforce"}  # the retry round is still waiting on HubSpot
        finally:
            hubspot_process.resume()

        async def settled() -> bool:
            found = {c["properties"].get("cdp_id") for c in await hubspot_process.contacts(world.session)}
            return found == {person} and not [r async for r in world.store.scan_all(PENDING)]

        await world.eventually(settled, timeout=30.0)
        assert len(salesforce.records("Contact")) == 1
    finally:
        await salesforce.close()


def _one_crm(emulator) -> tuple[dict, dict[str, str]]:
    """A Dynamics 365 or Zoho connection with a contacts mapping, and its credentials."""
    if isinstance(emulator, DynamicsEmulator):
        connection = {
            "id": "crm", "kind": "dynamics", "url": emulator.base_url, "auth_url": emulator.base_url,
            "credentials": {"tenant_id": "DYN_TENANT", "client_id": "DYN_ID", "client_secret": "DYN_SECRET"},
            "mappings": [{"id": "contacts", "object": "contacts", "match": {"cdp_id": "person.id"},
                          "fields": {"emailaddress1": "traits.email", "lastname": "traits.last_name"}}],
        }  # fmt: skip
        env = {"DYN_TENANT": emulator.tenant, "DYN_ID": emulator.client_id, "DYN_SECRET": emulator.client_secret}
    else:
        connection = {
            "id": "crm", "kind": "zoho", "url": emulator.base_url,
            "credentials": {"client_id": "ZOHO_ID", "client_secret": "ZOHO_SECRET", "refresh_token": "ZOHO_REFRESH"},
            "mappings": [{"id": "contacts", "object": "Contacts", "match": {"CDP_Id": "person.id"},
                          "fields": {"Email": "traits.email", "Last_Name": "traits.last_name"}}],
        }  # fmt: skip
        env = {"ZOHO_ID": emulator.client_id, "ZOHO_SECRET": emulator.client_secret}
        env["ZOHO_REFRESH"] = "1000.local-refresh-token"
    return {"connections": [connection]}, env


# Per CRM: the emulator, the object and match field of its contacts, and which requests are its probes and
# which its writes.
PROBED = {
    "dynamics": (DynamicsEmulator, "contacts", "cdp_id", lambda p: p.endswith("/WhoAmI"), lambda p: "$batch" in p),
    "zoho": (ZohoEmulator, "Contacts", "CDP_Id", lambda p: "fields=id&per_page=1" in p, lambda p: "/upsert" in p),
}


@pytest.mark.parametrize("crm", sorted(PROBED))
async def test_a_held_dynamics_or_zoho_connection_is_probed_and_comes_back_when_its_crm_answers(world_factory, crm):
    """D5 for Dynamics 365 and Zoho: a connection held on failures is probed with a cheap authenticated read
    (the Web API's WhoAmI; a Zoho module's first id), not tried again with its queued write at each step,
    and comes back by itself once the CRM answers: the queued change lands."""
    emulator_class, obj, match, is_probe, is_write = PROBED[crm]
    async with emulator_class() as emulator:
        world = await world_factory(emulator)
        document, env = _one_crm(emulator)
        await world.start(document, env=env, retry_for=25.0, ack_wait=60.0, partitions=1)
        emulator.faults.fail_next(5000, status=503)  # the CRM down
        await world.profiles({"person-a": {"traits.email": "a@example.com", "traits.last_name": "A"}})

        async def queued() -> int:
            return len([r async for r in world.store.scan_all(PENDING)])

        await world.eventually(queued)  # held: its change is queued, committed with the batch
        held_at = len(emulator.requests)
        await world.eventually(lambda: any(is_probe(r.path) for r in list(emulator.requests)[held_at:]))
        assert not any(is_write(r.path) for r in list(emulator.requests)[held_at:])  # no write tried meanwhile
        emulator.faults.clear()  # up again
        await world.eventually(lambda: emulator.find(obj, match, "person-a") is not None)

        async def synced() -> bool:
            record = await world.store.get(RECORDS, record_key("crm/contacts", ((match, "person-a"),)))
            return record is not None and record.doc["state"] == SYNCED and not await queued()

        await world.eventually(synced)
