"""The orchestration process: journeys, the per-person arbiter, durable timers, channel dispatchers, gRPC.

`orchestration.in.<p>` runs on the kit's partitioned engine (engine.py) over the partitions one ownership
gives (`CDP_OWNERSHIP`, group "orchestration"); the streams it needs are created at start (streams.py).
Journeys are loaded from the store before the engine starts; a change made through another replica's
API is announced on `orchestration.journeys.changed` and read again here. Each configured channel
(`channels.open_channels`: providers from the environment, and in-app) gets a dispatcher; CRM tasks need
none here: the arbiter's `actions.crm.<p>` messages are what the CRM connector consumes. `privacy.deleted`
is followed by one consumer the replicas share (privacy.py); at start, before any of that runs, the deletions
PRIVACY holds are applied again to a store restored from before them (notices.py). On SIGTERM the partitions are released (drained) before the bus and
the store close.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os

from cdp.orchestration.v1 import orchestration_pb2, orchestration_pb2_grpc
from cdp_kit.bus import Bus, dead_letter_stream, privacy_stream, subjects
from cdp_kit.bus.consumer import describe_error
from cdp_kit.bus.notices import read_notices
from cdp_kit.engine import EngineSpec, PartitionedEngine
from cdp_kit.ownership import ownership_from_settings
from cdp_kit.person_export import export_service
from cdp_kit.profile_client import ProfileClient
from cdp_kit.service import ServiceRuntime, client_channel, run_main
from cdp_kit.storage import open_store
from cdp_orchestration import streams
from cdp_orchestration.api import SCOPES, OrchestrationApi
from cdp_orchestration.arbiter_rules import compile_rules
from cdp_orchestration.catalogue import Catalogues, deployed_scores, live_segments, profile_computed_traits
from cdp_orchestration.channels import open_channels
from cdp_orchestration.channels.inapp import InboxChannel
from cdp_orchestration.consent import SendConsent
from cdp_orchestration.dispatch import CollectorReporter, Opens, dispatcher
from cdp_orchestration.engine import SERVICE, OrchestrationLogic
from cdp_orchestration.export import exporter
from cdp_orchestration.history import HistorySweeper
from cdp_orchestration.journeys import Journeys
from cdp_orchestration.notices import erase_noticed, unhandled_persons
from cdp_orchestration.privacy import PrivacyHandler, TombstoneSweeper, consumer_spec
from cdp_orchestration.reads import profile_fetch
from cdp_orchestration.settings import RULES_FIELD, OrchestrationSettings
from cdp_orchestration.state import prepare_store

log = logging.getLogger("cdp.orchestration")

GC_THRESHOLD = (50_000, 20, 100)
RESUME_ARMING_EVERY = 5.0  # seconds between tries to arm what a stopped publish left (`arm_resumed`)


async def setup(runtime: ServiceRuntime) -> None:
    settings: OrchestrationSettings = runtime.settings  # type: ignore[assignment]
    # The hot persons (up to CDP_ORCHESTRATION_HOT_PERSONS, with their views and instances) are many
    # long-lived objects, and every input allocates (decoded events, records): with the default
    # generation-0 threshold (700) the collector keeps rescanning them - about a quarter of the CPU of
    # applying the pipeline benchmark's inputs. Collect young objects less often (as identity, profile,
    # scoring and segmentation do).
    gc.set_threshold(*GC_THRESHOLD)
    store = await runtime.stack.enter_async_context(open_store(settings.store_url))
    await prepare_store(store)
    bus = await runtime.stack.enter_async_context(
        Bus.connect(settings.nats_url, name=settings.service_name, telemetry=runtime.telemetry)
    )
    # The streams orchestration sources are their publishers' to create and configure (ensuring them here
    # with default settings would reset, say, identity's retention); a source waits for its stream.
    await bus.ensure_read_streams(dead_letter_stream())  # identity's to configure
    await bus.ensure_read_streams(privacy_stream())
    retention = settings.retention_days * 86_400
    await bus.ensure_created(  # the timers stream first: the input sources it
        streams.timers_stream(), streams.actions_stream(max_age=retention), streams.input_stream(max_age=retention)
    )
    # Deletions a restored store file no longer shows (notices.py): PRIVACY read whole and the persons it
    # names that the store still holds erased (but those of notices the privacy consumer has yet to handle),
    # before the engine (and its outbox), the dispatchers, the privacy consumer or the API run, so nothing
    # goes out to them. Not read: nothing is sent (stop, retry).
    named = await read_notices(bus.js)
    unhandled = await unhandled_persons(store, bus.js) if named else frozenset()
    await erase_noticed(store, named, partitions=settings.partitions, unhandled=unhandled)
    journeys = Journeys(store)
    await journeys.load()

    async def on_journey_changed(msg) -> None:
        if not subjects.published_on(msg, subjects.ORCHESTRATION_JOURNEYS_CHANGED):
            return  # pushed here by another user's consumer (cdp_kit.bus.subjects.published_on)
        try:
            await journeys.reload(msg.data.decode())
        except Exception as exc:  # keep running the versions loaded; say why the change is not
            # the type and field only: a problem's text quotes the journey's conditions and values
            log.error(
                "could not read journey %s after another replica changed it: %s", msg.data.decode(), describe_error(exc)
            )

    subscription = await bus.nc.subscribe(subjects.ORCHESTRATION_JOURNEYS_CHANGED, cb=on_journey_changed)
    runtime.stack.push_async_callback(subscription.unsubscribe)

    async def announce(journey_id: str) -> None:
        await bus.nc.publish(subjects.ORCHESTRATION_JOURNEYS_CHANGED, journey_id.encode())

    channels = open_channels(os.environ, store=store)
    inbox = channels.get("inapp")
    if inbox is not None:
        await inbox.start()  # type: ignore[attr-defined]
    report = None
    if settings.outcomes_url:
        report = CollectorReporter(settings.outcomes_url, settings.outcomes_write_key)
        runtime.stack.push_async_callback(report.close)
    define_traits = None
    computed = None
    person_exists = None
    fetch = None  # with the profile service: only the fields read are kept (`reads.py`)
    if settings.profile_address:
        profile_channel = client_channel(settings, settings.profile_address)
        runtime.stack.push_async_callback(profile_channel.close)
        profile = ProfileClient(profile_channel, settings.profile_token)
        computed = profile_computed_traits(profile_channel, settings.profile_token)
        fetch = profile_fetch(profile_channel, settings.profile_token)

        async def define_traits(definitions) -> None:
            await profile.define(definitions, field="definition.computed_traits.{name}")

        async def person_exists(person_id: str) -> bool:
            # one GetProfile: an Enroll for an id the profile has never seen is refused NOT_FOUND (an outage
            # of the profile service answers UNAVAILABLE, to retry)
            return await profile.fields(person_id) is not None

    # Its conditions read a count or sum computed trait a person lacks as 0, with the set kept for the document.
    rules = await compile_rules(settings.rules_document(), store, computed, RULES_FIELD)
    consent = SendConsent(store, journeys, rules)  # asked again before each attempt (dispatch.py)
    tasks = []
    dispatchers = {}
    for channel in channels.values():
        runtime.stack.push_async_callback(channel.close)
        runner = dispatchers[channel.name] = dispatcher(
            bus, store, channel, report=report, ack_wait=settings.ack_wait,
            concurrency=settings.dispatch_concurrency, defer_for=settings.defer_seconds,
            max_attempts=settings.max_attempts, consent=consent, breaker_after=settings.breaker_timeouts,
            probe_every=settings.breaker_probe_seconds, pause_at_most=settings.pause_seconds,
        )  # fmt: skip
        tasks.append(runtime.spawn(runner.run(), f"dispatch actions.{channel.name}"))

    logic = OrchestrationLogic(
        store,
        journeys,
        rules,
        partitions=settings.partitions,
        hot_persons=settings.hot_persons,
        meter=runtime.telemetry.meter,
        profile=fetch,
    )
    spec = EngineSpec(
        service=SERVICE,
        stream=subjects.ORCHESTRATION,
        subject_prefix=subjects.ORCHESTRATION_IN_PREFIX,
        partitions=settings.partitions,
        batch_size=settings.batch_size,
        ack_wait=settings.ack_wait,
        in_flight=1,  # the hot cache may drop only what is durable (engine.py)
        description="orchestration: journeys and the arbiter",
    )
    engine = PartitionedEngine(logic, spec, bus=bus, store=store, chain=logic.chain)
    ownership = await engine.start(
        await ownership_from_settings(settings, js=bus.js, group=SERVICE, partitions=settings.partitions)
    )
    tasks.append(runtime.spawn(engine.serve(ownership), "apply orchestration.in"))
    # What start-up built (modules, journeys and their compiled conditions) lives as long as the process:
    # kept out of the collector's scans.
    gc.freeze()
    privacy = PrivacyHandler(
        bus,
        store,
        partitions=settings.partitions,
        engine=engine,
        # The inbox collection is forgotten even when this process runs no in-app dispatcher.
        inbox=inbox if isinstance(inbox, InboxChannel) else InboxChannel(store),
    )
    tasks.append(runtime.spawn(bus.consumer(consumer_spec(), privacy.handle).run(), "consume privacy.deleted"))
    sweeper = TombstoneSweeper(store, days=settings.tombstone_days, meter=runtime.telemetry.meter)
    tasks.append(runtime.spawn(sweeper.run(), "sweep aged-out tombstones"))
    history = HistorySweeper(
        store, days=settings.history_days, inbox_days=settings.inbox_days, meter=runtime.telemetry.meter
    )
    tasks.append(runtime.spawn(history.run(), "sweep aged-out history"))

    async def release() -> None:
        # Pushed after the bus and the store: on the way out the partitions are released (drained) and the
        # dispatchers stopped before those close.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    runtime.stack.push_async_callback(release)
    segments = scores = None
    if settings.segmentation_address:
        segmentation_channel = client_channel(settings, settings.segmentation_address)
        runtime.stack.push_async_callback(segmentation_channel.close)
        segments = live_segments(segmentation_channel, settings.segmentation_token)
    if settings.scoring_address:
        scoring_channel = client_channel(settings, settings.scoring_address)
        runtime.stack.push_async_callback(scoring_channel.close)
        scores = deployed_scores(scoring_channel, settings.scoring_token)

    api = OrchestrationApi(
        journeys=journeys,
        store=store,
        bus=bus,
        partitions=settings.partitions,
        inbox=inbox,
        answer_timeout=settings.answer_timeout,
        announce=announce,
        define_traits=define_traits,
        opens=Opens(store, report),
        catalogues=Catalogues(settings.catalogue(), computed, segments=segments, scores=scores),
        person_exists=person_exists,
        stopping=runtime.stopping,  # open SubscribeInbox streams end as the service starts stopping
    )

    async def arm_resumed() -> None:
        # Scheduled journeys whose publish stopped before every member of the segment was armed (a crash).
        while True:
            try:
                armed = await api.resume_arming()
            except Exception as exc:  # the bus or the store not answering yet: asked again
                log.warning("could not arm the members of scheduled journeys yet: %s", describe_error(exc))
                await asyncio.sleep(RESUME_ARMING_EVERY)
                continue
            if armed:
                log.warning("armed the members of %d scheduled journeys whose publish had stopped half way", armed)
            return

    tasks.append(asyncio.create_task(arm_resumed(), name="arm scheduled journeys' members"))
    runtime.parts.update(
        bus=bus, store=store, engine=engine, journeys=journeys, ownership=ownership, api=api, dispatchers=dispatchers
    )
    runtime.grpc.add_service(
        orchestration_pb2_grpc.add_OrchestrationServiceServicer_to_server,
        api,
        orchestration_pb2.DESCRIPTOR.services_by_name["OrchestrationService"],
        scopes=SCOPES,
    )
    # PrivacyService/ExportPerson (scope privacy:export): what the store holds about a person (export.py).
    runtime.grpc.add_service(*export_service(SERVICE, exporter(store)))


def main() -> None:
    run_main(OrchestrationSettings, setup)


if __name__ == "__main__":
    main()
