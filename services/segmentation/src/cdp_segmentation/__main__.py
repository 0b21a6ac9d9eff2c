"""The segmentation process: consume profiles.changed, keep memberships, publish segments.entered/exited."""

from __future__ import annotations

import asyncio
import gc
import logging

from nats.js.errors import NotFoundError

from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_kit.bus import Bus, dead_letter_stream, owned_partitions, profiles_stream, segments_stream, subjects
from cdp_kit.bus.consumer import describe_error
from cdp_kit.bus.notices import by_partition, read_notices
from cdp_kit.ownership import StaticOwnership, ownership_from_settings
from cdp_kit.person_export import export_service, replica_owners
from cdp_kit.profile_client import ProfileClient
from cdp_kit.service import ServiceRuntime, client_channel, run_main
from cdp_kit.storage import open_store
from cdp_segmentation.api import SCOPES, SegmentationApi
from cdp_segmentation.engine import ANNOUNCE, SegmentationEngine
from cdp_segmentation.explain import Explainer
from cdp_segmentation.export import export_person
from cdp_segmentation.fields import computed_traits, deployed_models, field_sources, model_readers
from cdp_segmentation.journeys import live_journeys
from cdp_segmentation.settings import SegmentationSettings
from cdp_segmentation.stream import SERVICE, SegmentationStream, engine_spec
from cdp_segmentation.summaries import SharedPercentiles

log = logging.getLogger("cdp.segmentation")


async def setup(runtime: ServiceRuntime) -> None:
    settings: SegmentationSettings = runtime.settings  # type: ignore[assignment]
    # The held fields are many long-lived objects: collect young objects less often (see profile).
    gc.set_threshold(50_000, 20, 100)
    store = await runtime.stack.enter_async_context(open_store(settings.store_url))
    bus = await runtime.stack.enter_async_context(
        Bus.connect(settings.nats_url, name=settings.service_name, telemetry=runtime.telemetry)
    )
    await bus.ensure_read_streams(profiles_stream())  # profile's: never reconfigured here
    await bus.ensure_streams(segments_stream(max_age=settings.segments_retention_days * 86_400))
    await bus.ensure_read_streams(dead_letter_stream())  # identity's to configure
    profile: ProfileClient | None = None
    # What a new definition may read (fields.py): the computed traits profile defines, the scores of the
    # models scoring has deployed; a service not configured leaves its root unchecked.
    models = computed = readers = None
    if settings.profile_address:
        channel = client_channel(settings, settings.profile_address)
        runtime.stack.push_async_callback(channel.close)
        profile = ProfileClient(channel, settings.profile_token)
        computed = computed_traits(channel, settings.profile_token)
    if settings.scoring_address:
        scoring_channel = client_channel(settings, settings.scoring_address)
        runtime.stack.push_async_callback(scoring_channel.close)
        models = deployed_models(scoring_channel, settings.scoring_token)
        # Deployed models keep the computed traits their features read from being deleted (fields.py).
        readers = model_readers(scoring_channel, settings.scoring_token)
    journeys = None
    if settings.orchestration_address:
        # Live journeys keep the segments and computed traits they use from being deleted (journeys.py).
        orchestration_channel = client_channel(settings, settings.orchestration_address)
        runtime.stack.push_async_callback(orchestration_channel.close)
        journeys = live_journeys(orchestration_channel, settings.orchestration_token)
    shared: SharedPercentiles | None = None
    if settings.standby:
        # Every partition, with positions, snapshots and outbox of its own: "segmentation-r<ordinal>-p<p>".
        standby, namespace = f"r{settings.pod_ordinal}", f"_r{settings.pod_ordinal}"
        ownership = StaticOwnership(partitions=settings.partitions)
        preload = list(range(settings.partitions))
    else:
        standby, namespace = "", ""
        ownership = await ownership_from_settings(settings, js=bus.js, group=SERVICE, partitions=settings.partitions)
        # Static partitions are known now: their snapshot is loaded in one scan at start. Leased ones
        # are loaded as they arrive.
        static = settings.ownership == "static"
        preload = owned_partitions(settings.partitions, settings.pod_ordinal, settings.replicas) if static else []
        if not (static and settings.replicas == 1):
            # Replicas split the partitions: one percentile over everyone, through NATS KV (percentiles.py).
            shared = await SharedPercentiles.open(bus.js, SERVICE)

    origin = {"Cdp-Origin": f"{settings.service_name}-{settings.pod_ordinal}-{id(settings)}"}

    async def announce(what: str) -> None:
        await bus.nc.publish(ANNOUNCE, what.encode(), headers=origin)

    async def stream_ends() -> dict[str, int]:
        ends = {}
        for p in sorted(engine.owned):
            subject = subjects.profiles_changed(p)
            try:
                ends[subject] = (await bus.js.get_last_msg(subjects.PROFILES, subject)).seq
            except NotFoundError:
                continue
        return ends

    engine = SegmentationEngine(
        store,
        bus.publisher,
        partitions=settings.partitions,
        owned=preload,
        telemetry=runtime.telemetry,
        profile_source=profile.fields if profile else None,
        define_traits=profile.define if profile else None,
        traits_ready=profile.ready if profile else None,
        undefine_traits=profile.undefine if profile else None,
        stream_ends=stream_ends,
        snapshot_interval=settings.snapshot_interval,
        timer_resolution=settings.timer_resolution,
        namespace=namespace,
        announce=announce,
        max_computed_traits=settings.max_computed_traits,
        percentile_interval=settings.percentile_interval,
        shared_percentiles=shared,
        known_fields=field_sources(models=models, computed=computed),
        live_journeys=journeys,
        model_readers=readers,
        max_estimates=settings.max_estimates,
        estimate_seconds=settings.estimate_seconds,
        estimate_traits=settings.estimate_traits,
        readers_cache_seconds=settings.readers_cache_seconds,
    )
    stream = SegmentationStream(
        engine,
        engine_spec(
            partitions=settings.partitions,
            batch_size=settings.batch_size,
            ack_wait=settings.ack_wait,
            snapshot_every=settings.snapshot_interval,
            standby=standby,
        ),
        bus=bus,
        store=store,
    )
    # Deletions a restored store file no longer shows (notices.py): PRIVACY read whole now, and the persons
    # it names erased from each partition as it arrives (here, or later under leases), before its replay.
    try:
        engine.deleted = await read_notices(bus.js)
    except Exception as exc:  # its NATS user may not read PRIVACY (natsroles: segmentation `reads` it)
        log.error("privacy.deleted notices not read (%s): deletions a restored store lost stay undone", exc)
    engine.deleted_by_partition = by_partition(engine.deleted, settings.partitions)
    await engine.start()
    runtime.stack.push_async_callback(engine.stop)
    # Each owned partition is loaded, replayed up to where the stream had got, then served.
    ownership = await stream.start(ownership)
    gc.freeze()
    engine.resume_builds()
    serving = runtime.spawn(stream.serve(ownership), "consume profiles.changed.<p>")

    async def stop_stream() -> None:
        # Before the engine's final snapshot and the bus closing: release the partitions, draining.
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)

    runtime.stack.push_async_callback(stop_stream)

    async def on_announced(msg) -> None:
        if (msg.headers or {}).get("Cdp-Origin") == origin["Cdp-Origin"] or not subjects.published_on(msg, ANNOUNCE):
            return  # its own, or pushed here by another user's consumer (cdp_kit.bus.subjects.published_on)
        try:
            await engine.reload(msg.data.decode())
        except Exception as exc:  # its next restart loads the segment from the store
            # Type and field only: a stored definition that does not compile is quoted in the error's text.
            log.error("could not follow a segment change another replica made", extra={"error": describe_error(exc)})

    subscription = await bus.nc.subscribe(ANNOUNCE, cb=on_announced)
    runtime.stack.push_async_callback(subscription.unsubscribe)

    # The readers of a computed trait are kept a few seconds (cache.py), forgotten when a journey or a
    # model changes.
    for subject, cached in (
        (subjects.ORCHESTRATION_JOURNEYS_CHANGED, engine.readers_journeys),
        (subjects.SCORING_MODELS_CHANGED, engine.readers_models),
    ):
        if cached is not None:

            async def forget(msg, cached=cached, subject=subject) -> None:
                if subjects.published_on(msg, subject):
                    cached.forget()

            changes = await bus.nc.subscribe(subject, cb=forget)
            runtime.stack.push_async_callback(changes.unsubscribe)
    runtime.parts.update(bus=bus, store=store, engine=engine, stream=stream)
    # An export or an explanation of a person of a partition another replica holds asks that replica
    # (export.py, explain.py).
    owners = replica_owners(
        settings,
        ownership,
        held=lambda: engine.active,
        channel=lambda address: client_channel(settings, address),
        peers=settings.peers,
        peers_variable="CDP_SEGMENTATION_PEERS",
        replicas=1 if settings.standby else None,
    )
    runtime.stack.push_async_callback(owners.close)
    explainer = Explainer(engine, owners)
    runtime.grpc.add_service(
        segmentation_pb2_grpc.add_SegmentationServiceServicer_to_server,
        SegmentationApi(engine, explainer),
        segmentation_pb2.DESCRIPTOR.services_by_name["SegmentationService"],
        scopes=SCOPES,
    )
    runtime.grpc.add_service(
        *export_service(
            "segmentation", lambda person, merged, context: export_person(engine, person, merged, owners, context)
        )
    )


def main() -> None:
    run_main(SegmentationSettings, setup)


if __name__ == "__main__":
    main()
