"""The CRM connector process: outbound sync, inbound feedback, privacy, gRPC.

At start the connections document is read and validated (with each CRM's described schema where the
adapter can describe it), every credential variable must be set, and the streams it needs exist. The
persons privacy.deleted notices name that a restored store still holds are fenced off, before anything
else runs, and erased again (notices.py). Then: `crm.in.<p>` runs on the kit's partitioned engine
(engine.py) over the partitions one ownership gives (`CDP_OWNERSHIP`, group "crm"); the owner of a
partition retries its queued changes; `privacy.deleted` is consumed on one durable the replicas share
(privacy.py); each connection's changes are read by the replica owning the connection's partition
(inbound/: HubSpot search, Salesforce SOQL on SystemModstamp, Dataverse change tracking, Zoho
If-Modified-Since) - HubSpot's also at once on a signed webhook (`CDP_CRM_WEBHOOK_PORT`) - and posted to the collector (when `CDP_CRM_COLLECTOR_URL` is set). On SIGTERM the
partitions are released (drained) before the bus, the HTTP session and the store close.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time

import aiohttp
from aiohttp import web
from opentelemetry.metrics import Observation

from cdp.crm.v1 import crm_pb2, crm_pb2_grpc
from cdp_crm import streams
from cdp_crm.api import SCOPES, CrmApi
from cdp_crm.budgets import SharedBudget
from cdp_crm.connectors import credentials, open_available, unset
from cdp_crm.delivery import Deliverer
from cdp_crm.domain.mapping import Connection, MappingInvalid, load_connections
from cdp_crm.engine import SERVICE, CrmLogic
from cdp_crm.export import exporter
from cdp_crm.inbound import Collector, HubSpotWebhooks, Poller, WebhookSweeper, open_poller
from cdp_crm.notices import fence, reapply
from cdp_crm.people import ProfileDirectory, profile_fetch, profile_identifiers
from cdp_crm.privacy import Privacy, TombstoneSweeper, consumer_spec
from cdp_crm.runs import GC_THRESHOLD, Runs
from cdp_crm.settings import CrmSettings
from cdp_crm.state import prepare_store
from cdp_kit.bus import (
    Bus,
    dead_letter_stream,
    partition_for,
    privacy_stream,
    profiles_stream,
    segments_stream,
    subjects,
)
from cdp_kit.bus.notices import read_notices
from cdp_kit.engine import EngineSpec, PartitionedEngine
from cdp_kit.ownership import ownership_from_settings
from cdp_kit.person_export import export_service
from cdp_kit.service import ServiceRuntime, client_channel, run_main
from cdp_kit.stopping import cancel_and_wait
from cdp_kit.storage import Store, open_store

log = logging.getLogger("cdp.crm")

DESCRIBE_WAIT = 60.0  # seconds describing at start may wait for the account's budget
# A grant whose sender died is held this long past CDP_CRM_REQUEST_TIMEOUT (the longest a request may be on
# its way: bytes a killed process left in its socket still arrive), then ages out of the window.
HOLD_PAST_TIMEOUT = 5.0


def budget_hold(settings: CrmSettings) -> float:
    return settings.request_timeout + HOLD_PAST_TIMEOUT


async def describe(adapters, connections: tuple[Connection, ...], store: Store, hold: float = 120.0) -> dict:
    """Each connection's CRM schema of the objects its mappings name; a CRM that cannot describe is left
    out (its mappings are checked without a schema), never given an empty one.

    Describing is one request per object, taken from the account's shared budget like any other: a
    process started right after a crashed one that used up the burst window waits for the window (up to
    `DESCRIBE_WAIT` seconds, then checks without the schema) rather than going over the CRM's limit."""
    schemas = {}
    for connection in connections:
        adapter = adapters.get(connection.id)
        if adapter is None:
            continue
        objects = sorted({m.object for m in connection.mappings})
        budget = SharedBudget(store, connection, hold=hold)
        reservation = await budget.acquire(len(objects), time.time, time.time() + DESCRIBE_WAIT)
        if reservation is None:
            log.warning("crm describe skipped: no budget left", extra={"connection": connection.id})
            continue
        try:
            schema = await adapter.describe(objects)
        except Exception as exc:
            log.warning("crm describe failed", extra={"connection": connection.id, "error": type(exc).__name__})
            continue
        finally:
            await budget.settle(reservation, time.time())  # the answers are in: the slots age from now
        if schema:
            schemas[connection.id] = schema
    return schemas


async def setup(runtime: ServiceRuntime) -> None:
    settings: CrmSettings = runtime.settings  # type: ignore[assignment]
    gc.set_threshold(*GC_THRESHOLD)  # a bulk backfill's page is many objects alive at once (runs.py)
    path = settings.connections_file
    text = path.read_text()
    form = "yaml" if path.suffix in (".yaml", ".yml") else "json"
    connections = load_connections(text, form=form)  # the document on its own first: fail before any call

    store = await runtime.stack.enter_async_context(open_store(settings.store_url))
    await prepare_store(store)
    bus = await runtime.stack.enter_async_context(
        Bus.connect(settings.nats_url, name=settings.service_name, telemetry=runtime.telemetry)
    )
    # Profile's, segmentation's and the privacy streams are their owners' to configure (retention above all):
    # created with defaults when missing, never changed here.
    await bus.ensure_read_streams(profiles_stream(), segments_stream(), privacy_stream())
    await bus.ensure_read_streams(dead_letter_stream())  # identity's to configure
    retention = settings.retention_days * 86_400
    await bus.ensure_created(streams.actions_stream(max_age=retention), streams.input_stream(max_age=retention))
    session = await runtime.stack.enter_async_context(aiohttp.ClientSession())

    adapters, unstarted = open_available(connections, session, os.environ, timeout=settings.request_timeout)
    for connection_id, variables in unstarted.items():
        # Not started, named with its unset variables (never a value); the other connections run.
        log.error("crm connection not started: credentials not set", extra={"connection": connection_id,
                  "variables": ",".join(variables)})  # fmt: skip
    if connections and not adapters:  # nothing to run: stop, naming the variables
        raise MappingInvalid([p for c in connections for p in unset(c, os.environ)])
    hold = budget_hold(settings)
    listed = load_connections(text, await describe(adapters, connections, store, hold), form=form)
    connections = tuple(c for c in listed if c.id in adapters)
    budgets = {c.id: SharedBudget(store, c, hold=hold) for c in connections}
    deliverer = Deliverer(adapters, budgets, retry_for=settings.retry_for, bulk_poll_seconds=settings.bulk_poll_seconds)
    runtime.stack.push_async_callback(deliverer.close)  # the probes of connections held while their CRM fails
    meter = runtime.telemetry.meter
    deliverer.observe(meter)
    people = fetch = identifiers = None
    if settings.profile_store_url:
        profiles = await runtime.stack.enter_async_context(open_store(settings.profile_store_url))
        channel = client_channel(settings, settings.profile_address)
        runtime.stack.push_async_callback(channel.close)
        fetch = profile_fetch(channel, settings.profile_token, timeout=settings.request_timeout)
        people = ProfileDirectory(profiles, fetch, store)
        # A person a CRM user made is written to their contact, not to a new one (engine.py `claim`).
        identifiers = profile_identifiers(channel, settings.profile_token, timeout=settings.request_timeout)
    # With the profile service a backfill reads from, the person views keep only the mapped fields and a
    # profile change of nothing mapped costs no read or write (engine.py).
    logic = CrmLogic(store, connections, deliverer, meter=meter, refresh=fetch, identifiers=identifiers)

    budget_left: dict[str, dict] = {}

    def observe_budget(_options):
        for account, status in list(budget_left.items()):
            attrs = {"account": account}
            if status.get("daily_remaining") is not None:
                yield Observation(status["daily_remaining"], {**attrs, "limit": "daily"})
            if status.get("burst_remaining") is not None:
                yield Observation(status["burst_remaining"], {**attrs, "limit": "burst"})

    meter.create_observable_gauge(
        "cdp.crm.budget.remaining", callbacks=[observe_budget], unit="{unit}",
        description="API units left in each CRM account's budget (burst window and day)",
    )  # fmt: skip

    privacy = Privacy(
        store,
        logic.mappings,
        deliverer,
        retry_for=settings.retry_for,
        settled=logic.settled,
        partitions=settings.partitions,
        policies={c.id: c.on_delete or settings.privacy_policy for c in connections},
        unstarted=unstarted,
    )
    # Deletions a restored store file no longer shows (notices.py): PRIVACY read whole, and every person it
    # names that the store still holds fenced off now - before any input, retry, backfill or poller runs -,
    # their CRM records checked and erased again in the background.
    try:
        named = await read_notices(bus.js)
    except Exception as exc:  # a get by sequence: its NATS user consumes PRIVACY, so natsauth grants it
        log.error("privacy.deleted notices not read (%s): deletions a restored store lost stay undone", exc)
        named = {}
    restored = await fence(store, privacy, named, time.time())

    spec = EngineSpec(
        service=SERVICE,
        stream=subjects.CRM,
        subject_prefix=subjects.CRM_IN_PREFIX,
        partitions=settings.partitions,
        batch_size=settings.batch_size,
        ack_wait=settings.ack_wait,
        in_flight=1,  # a batch reads the record states the one before it wrote (engine.py)
        description="crm: profile, segment and action changes to the CRMs",
    )
    engine = PartitionedEngine(logic, spec, bus=bus, store=store)
    logic.engine = engine
    ownership = await engine.start(
        await ownership_from_settings(settings, js=bus.js, group=SERVICE, partitions=settings.partitions)
    )
    tasks = [
        runtime.spawn(engine.serve(ownership), "apply crm.in"),
        runtime.spawn(logic.retry_forever(engine, 5.0), "retry queued crm changes"),
    ]
    if restored:

        async def erase_restored() -> None:
            await reapply(store, privacy, restored)
            await asyncio.Event().wait()  # done; a background task of the service ends with it

        tasks.append(runtime.spawn(erase_restored(), "erase again what a restored store held"))
    tasks.append(runtime.spawn(bus.consumer(consumer_spec(), privacy.handle).run(), "consume privacy.deleted"))
    sweeper = TombstoneSweeper(store, days=settings.tombstone_days, meter=meter)
    tasks.append(runtime.spawn(sweeper.run(), "sweep aged-out tombstones"))

    async def refresh_budgets() -> None:
        while True:
            for budget in budgets.values():
                try:
                    budget_left[budget.account] = await budget.status(deliverer.clock())
                except Exception:
                    pass  # the gauge keeps its last value; the store's failure shows elsewhere
            await asyncio.sleep(10.0)

    tasks.append(runtime.spawn(refresh_budgets(), "observe crm budgets"))

    if settings.collector_url:
        collector = Collector(session, settings.collector_url, settings.collector_write_key)
        hooks: dict[str, tuple[Poller, str]] = {}
        for connection in connections:
            secrets = credentials(connection, os.environ)
            poller = open_poller(
                store, connection, adapters[connection.id], budgets[connection.id], collector, session, secrets,
                timeout=settings.request_timeout,
            )  # fmt: skip
            if connection.kind == "hubspot" and "client_secret" in secrets:
                hooks[connection.id] = (poller, secrets["client_secret"])
            logic.inbound[connection.id] = poller  # read the CRM's news before writing to it (engine.py)
            home = partition_for(connection.id, settings.partitions)
            owned = lambda home=home: home in engine.owned()  # noqa: E731 - the replica owning it reads it
            tasks.append(runtime.spawn(poller.run(settings.poll_seconds, owned), f"read {connection.id}"))
        if settings.webhook_port:
            taking = HubSpotWebhooks(hooks, public_url=settings.webhook_public_url, meter=meter, store=store)
            webhooks = web.AppRunner(taking.app)  # what one replica took, every replica sees (crm_webhooks)
            tasks.append(runtime.spawn(WebhookSweeper(store).run(), "sweep webhook signatures taken"))
            await webhooks.setup()
            runtime.stack.push_async_callback(webhooks.cleanup)
            await web.TCPSite(webhooks, settings.grpc_host, settings.webhook_port).start()
            for connection in connections:
                if connection.webhooks is None or connection.id not in hooks:
                    continue
                # Point the app's webhooks here (the local HubSpot under `make up`); polling stays the net.
                refused = await adapters[connection.id].register_webhooks(
                    connection.webhooks.app_id,
                    connection.webhooks.target_url,
                    credentials(connection, os.environ)["developer_key"],
                )
                if refused is not None:
                    log.warning(
                        "hubspot webhooks not registered; changes are polled",
                        extra={"connection": connection.id, "reason": refused.reason, "crm_code": refused.code},
                    )

    runs = Runs(logic, partitions=settings.partitions, people=people)

    async def release() -> None:
        """Before the store and the bus close: the backfills first (each left `cancelled`, to be resumed),
        then the loops. Within one grace in all: a task that does not end is named in the log and left,
        rather than holding the stop (and the process) for ever. The deliverer is stopped first: a batch
        being written to a CRM that answers 503 or 429 to everything ends its retries at once (what it
        did not write is queued for the next owner) instead of holding the partition's drain past the
        grace for up to CDP_CRM_RETRY_FOR; a request already on its way is cut short too, as a lost
        answer, rather than waited for up to CDP_CRM_REQUEST_TIMEOUT."""
        deadline = time.monotonic() + settings.shutdown_grace
        deliverer.stop()
        await runs.close(grace=settings.shutdown_grace)
        await cancel_and_wait(tasks, deadline - time.monotonic(), log)

    runtime.stack.push_async_callback(release)
    tasks.append(runtime.spawn(runs.watch(), "resume interrupted crm backfills"))

    async def describe_document(parsed):
        return await describe(adapters, parsed, store, hold)

    api = CrmApi(store=store, connections=listed, deliverer=deliverer, budgets=budgets, runs=runs,
                 describe=describe_document, unstarted=unstarted)  # fmt: skip
    runtime.parts.update(bus=bus, store=store, engine=engine, ownership=ownership, api=api, logic=logic)
    runtime.grpc.add_service(
        crm_pb2_grpc.add_CrmServiceServicer_to_server,
        api,
        crm_pb2.DESCRIPTOR.services_by_name["CrmService"],
        scopes=SCOPES,
    )
    # PrivacyService/ExportPerson (scope privacy:export): what the store holds about a person (export.py).
    runtime.grpc.add_service(*export_service(SERVICE, exporter(store, connections)))


def main() -> None:
    run_main(CrmSettings, setup)


if __name__ == "__main__":
    main()
