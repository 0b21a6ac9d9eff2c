"""The profile process: consume events.resolved and identity.*, keep profiles, publish profiles.changed.

Which person partitions this replica works on comes from one ownership (`CDP_OWNERSHIP`, group
"profile"): acquiring partition p loads its profiles from the store and starts every partitioned input
on it (events.resolved.<p>, scores.updated.<p>, and identity.merged.<p> / identity.unmerged.<p>);
releasing it drains them and drops its profiles from memory (`ProfileEngine.start_partition` /
`stop_partition`). One ownership, not one per input: the inputs write the same profiles from one
in-memory copy, so a person must have one owner for all of them.
On SIGTERM every partition is released (drained, leases freed, member record removed) before the bus
and the store close, so the other replicas take over at once instead of after the TTL.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

from cdp.identity.v1 import identity_pb2_grpc
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp.segmentation.v1 import segmentation_pb2_grpc
from cdp_kit.bus import (
    Bus,
    ConsumerSpec,
    dead_letter_stream,
    events_resolved_stream,
    identity_stream,
    owned_partitions,
    privacy_stream,
    profiles_stream,
    scores_stream,
    subjects,
)
from cdp_kit.bus.notices import named_persons, read_deletions
from cdp_kit.bus.setup import consumer_exists
from cdp_kit.ownership import ownership_from_settings
from cdp_kit.person_export import export_service
from cdp_kit.service import ServiceRuntime, client_channel, run_main
from cdp_kit.storage import open_store
from cdp_profile import SERVICE
from cdp_profile.api import SCOPES, ProfileApi
from cdp_profile.domain import Retention
from cdp_profile.engine import ProfileEngine
from cdp_profile.notices import erase_noticed, republish_missing
from cdp_profile.routing import Router, holder_address, peer_addresses
from cdp_profile.settings import ProfileSettings
from cdp_profile.stream import partitioned_engines

log = logging.getLogger("cdp.profile")

GC_THRESHOLD = (50_000, 20, 100)
# The longest answer profile sends: a person's export (ExportPerson) holds their timeline, up to 1,000 events
# of up to 32 KB each as JSON, with their record (at most 8 MiB): past the kit's 16 MiB default, the export
# of a person with 1,008 events of 30 KB failed (RESOURCE_EXHAUSTED) however often it was asked.
MAX_SEND_BYTES = 64 * 1024 * 1024
# Seconds between the sweeps that collect what freezing kept (`sweep_frozen`).
GC_SWEEP_SECONDS = 3600.0


def freeze_survivors(phase: str, info: dict) -> None:
    """A `gc.callbacks` hook: once generation 0 has been collected `GC_THRESHOLD[1]` times, freeze what
    survived (`gc.freeze`) instead of letting the next collection be of generation 1. The survivors of
    20 young collections are the profiles' new timeline entries and fields, up to a million objects: a
    generation-1 collection rescanned them all, a 0.4 s pause of the event loop every ~85 s at 1,000
    events/s (bench_pipeline.py --trace: every probe behind it late by that much). Frozen, they are not
    scanned again until the next sweep; a reference cycle that dies after it was frozen waits for that
    sweep (what the generation-1 collections found: ~500 objects a pause)."""
    if phase == "stop" and info.get("generation") == 0 and gc.get_count()[1] >= GC_THRESHOLD[1]:
        gc.freeze()


async def sweep_frozen(every: float = GC_SWEEP_SECONDS) -> None:
    """Once every `every` seconds, collect everything once (frozen objects included) and freeze what is
    left: the cycles that died frozen are freed, so memory stays bounded by an interval's garbage. The
    sweep pauses the event loop for a full collection of the heap (~0.4 us an object, as the generation-1
    collections cost), once an hour instead of a generation-1 collection every minute or two: Python's own
    generation-2 collections, which freezing stops too, came about as rarely."""
    while True:
        await asyncio.sleep(every)
        started = time.perf_counter()
        gc.unfreeze()
        freed = gc.collect()
        gc.freeze()
        log.info(
            "swept frozen objects: %d unreachable freed, %d kept, %.0f ms",
            freed,
            gc.get_freeze_count(),
            (time.perf_counter() - started) * 1000,
        )


async def setup(runtime: ServiceRuntime) -> None:
    settings: ProfileSettings = runtime.settings  # type: ignore[assignment]
    # Hot profiles are many long-lived objects: collect young objects less often (see identity).
    gc.set_threshold(*GC_THRESHOLD)
    if freeze_survivors not in gc.callbacks:
        gc.callbacks.append(freeze_survivors)
        # Undone as the service stops (a process running it in-process, as tests do, goes on without it).
        runtime.stack.callback(gc.callbacks.remove, freeze_survivors)
        runtime.spawn(sweep_frozen(), "collect what freezing kept, hourly")
    store = await runtime.stack.enter_async_context(open_store(settings.store_url))
    bus = await runtime.stack.enter_async_context(
        Bus.connect(settings.nats_url, name=settings.service_name, telemetry=runtime.telemetry)
    )
    # Identity and scoring own and configure what profile reads, and the dead letters' stream is identity's
    # (profile writes into it): verified here, made by the provisioner (created if missing without credentials).
    await bus.ensure_read_streams(events_resolved_stream(), identity_stream(), scores_stream(), dead_letter_stream())
    await bus.ensure_streams(
        profiles_stream(max_age=settings.changes_retention_days * 86_400),
        privacy_stream(),
    )
    static = settings.ownership == "static"
    max_age = settings.timeline_max_age_days * 86_400 or None
    engine = ProfileEngine(
        store,
        bus.publisher,
        partitions=settings.partitions,
        # Static: the partitions are known now and loaded at start; leased: each is loaded as acquired.
        owned=owned_partitions(settings.partitions, settings.pod_ordinal, settings.replicas) if static else (),
        retention=Retention(max_events=settings.timeline_max_events, max_age_seconds=max_age),
        telemetry=runtime.telemetry,
        max_computed_traits=settings.max_computed_traits,
        identifier_hash_keys=settings.identifier_hash_keys(),
        timeline_pages=settings.timeline_pages,
    )
    await engine.start()
    runtime.stack.push_async_callback(engine.stop)
    # The partitioned inputs run on the kit's engine (stream.py): one ordered durable consumer per
    # owned partition, the next batch applied while the previous one is written.
    streams = partitioned_engines(
        engine, bus, partitions=settings.partitions, batch_size=settings.batch_size, ack_wait=settings.ack_wait
    )
    for stream in streams:  # made with this CDP_PARTITIONS, or the service stops (under leases too)
        await stream.check_partitions()
    # Deletions a restored store file no longer shows (notices.py): PRIVACY read whole, and the persons it
    # names erased where owned: the owned partitions now, before any input runs (their outboxes scrubbed of
    # them) or a read is served, and each partition acquired later (leases) as it arrives.
    # And the other way round: deletions the store records whose notices PRIVACY lacks (`nats/` restored
    # older than the store) are published again, or the collector and identity would not suppress them.
    try:
        deletions = await read_deletions(bus.js)
    except Exception as exc:  # its NATS user may not read PRIVACY (natsroles: profile `reads` it)
        log.error("privacy.deleted notices not read (%s): deletions a restored store lost stay undone", exc)
        deletions = None
    named = named_persons(deletions or [])
    await erase_noticed(engine, named, engine.owned)
    if deletions is not None:
        await republish_missing(engine, bus.js, {notice.request_id for notice in deletions})

    async def acquire(partition: int) -> None:
        await engine.start_partition(partition)
        await erase_noticed(engine, named, {partition}, outboxes=False)  # its inputs have started

    ownership = await ownership_from_settings(settings, js=bus.js, group=SERVICE, partitions=settings.partitions)
    await ownership.start(acquire if not static else engine.start_partition, engine.stop_partition)
    # Pushed after the bus and the store: on the way out it runs before they close.
    runtime.stack.push_async_callback(ownership.stop)
    runners = []
    # Merges arrive on identity.*.<p>, one of the partitioned inputs (stream.py). What an older identity
    # published unpartitioned is drained by this replica's durable of then, if it has one; none is
    # created (a new one would replay every stored merge, re-merging persons unmerged since).
    legacy = subjects.replica_durable(SERVICE, "identity", settings.pod_ordinal)
    if await consumer_exists(bus.js, subjects.IDENTITY, legacy):
        identity_runner = bus.consumer(
            ConsumerSpec(
                stream=subjects.IDENTITY,
                durable=legacy,
                filter_subjects=(subjects.IDENTITY_MERGED, subjects.IDENTITY_UNMERGED),
                batch_size=64,
                ack_wait=settings.ack_wait,
                max_ack_pending=64,
                description="profile: merges and unmerges an older identity published (drained)",
            ),
            engine.handle_identity,
        )
        runtime.spawn(identity_runner.run(), "consume identity.merged/unmerged (unpartitioned)")
        runners.append(identity_runner)
    identity_channel = client_channel(settings, settings.identity_address)
    runtime.stack.push_async_callback(identity_channel.close)
    if static:
        router = Router(
            partitions=settings.partitions,
            ordinal=settings.pod_ordinal,
            replicas=settings.replicas,
            addresses=peer_addresses(
                peers=settings.peers,
                pod_name=settings.pod_name,
                replicas=settings.replicas,
                grpc_port=settings.grpc_port,
            ),
            channel=lambda address: client_channel(settings, address),
        )
    else:
        # Leases: a request goes to the pod holding the person's partition. Kubernetes names holders
        # after their pods, which the headless Service resolves; NATS leases (local runs) forward nothing.
        kubernetes = settings.ownership == "kubernetes"
        router = Router(
            partitions=settings.partitions,
            ordinal=0,
            replicas=1,
            addresses=[],
            channel=lambda address: client_channel(settings, address),
            holder=ownership.holder,
            me=ownership.identity,
            address_of=(lambda holder: holder_address(holder, settings.grpc_port)) if kubernetes else None,
        )
    runtime.stack.push_async_callback(router.close)
    readers = None
    if settings.segmentation_address:
        # Asked before a computed trait is deleted: which segments and live journeys read it (api.py).
        segmentation_channel = client_channel(settings, settings.segmentation_address)
        runtime.stack.push_async_callback(segmentation_channel.close)
        readers = segmentation_pb2_grpc.SegmentationServiceStub(segmentation_channel)
    runtime.parts.update(
        bus=bus, store=store, engine=engine, streams=streams, ownership=ownership, runners=runners, router=router
    )
    api = ProfileApi(
        engine,
        identity_pb2_grpc.IdentityServiceStub(identity_channel),
        identity_token=settings.identity_token,
        router=router,
        segmentation=readers,
        segmentation_token=settings.segmentation_token,
    )
    runtime.grpc.add_service(
        profile_pb2_grpc.add_ProfileServiceServicer_to_server,
        api,
        profile_pb2.DESCRIPTOR.services_by_name["ProfileService"],
        scopes=SCOPES,
    )
    runtime.grpc.add_service(*export_service("profile", api.export_person))
    runtime.grpc.max_send_bytes = MAX_SEND_BYTES


def main() -> None:
    run_main(ProfileSettings, setup)


if __name__ == "__main__":
    main()
