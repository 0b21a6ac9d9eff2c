"""The identity process: consume events.raw, keep the graph, publish events.resolved and identity.*;
purge the persons privacy.deleted names."""

from __future__ import annotations

import asyncio
import gc
import json
import logging

from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp_identity.api import SCOPES, IdentityApi
from cdp_identity.domain.rules import MergeRules
from cdp_identity.engine import OUTBOX, IdentityEngine
from cdp_identity.export import export_person
from cdp_identity.matching_service import MatchingService, load_match_config
from cdp_identity.notices import apply_notices, events_retention
from cdp_identity.privacy import PrivacyHandler
from cdp_identity.settings import IdentitySettings
from cdp_identity.writer import OneWriter
from cdp_kit.bus import (
    Bus,
    ConsumerSpec,
    dead_letter_stream,
    events_raw_stream,
    events_resolved_stream,
    identity_stream,
    privacy_stream,
    subjects,
)
from cdp_kit.engine import EngineSpec, PartitionedEngine
from cdp_kit.errors import InvalidArgument
from cdp_kit.ownership import ownership_from_settings
from cdp_kit.person_export import export_service
from cdp_kit.service import ServiceRuntime, run_main
from cdp_kit.storage import open_store

log = logging.getLogger("cdp.identity")

# A privacy purge sweeps the stored graph once per batch of requests: give it time before JetStream
# redelivers (a redelivery would only find the work done).
PRIVACY_ACK_WAIT = 600.0
PRIVACY_BATCH = 100


def load_rules(settings: IdentitySettings) -> MergeRules:
    if settings.rules_file is None:
        return MergeRules.default()
    try:
        document = json.loads(settings.rules_file.read_text())
    except ValueError as exc:
        raise InvalidArgument("CDP_IDENTITY_RULES_FILE", f"{settings.rules_file} is not JSON: {exc}") from None
    return MergeRules.from_dict(document)


async def setup(runtime: ServiceRuntime) -> None:
    settings: IdentitySettings = runtime.settings  # type: ignore[assignment]
    # The hot graph is hundreds of thousands of long-lived objects; with the default generation-0
    # threshold (700) the collector keeps rescanning them and costs about a third of the per-event time
    # (measured with bench/identity). Collect young objects less often instead.
    gc.set_threshold(50_000, 20, 100)
    rules = load_rules(settings)
    match_config = load_match_config(settings.matching_file)
    store = await runtime.stack.enter_async_context(open_store(settings.store_url))
    bus = await runtime.stack.enter_async_context(
        Bus.connect(settings.nats_url, name=settings.service_name, telemetry=runtime.telemetry)
    )
    # EVENTS_RAW is the collector's (its retention and de-duplication window) and PRIVACY the profile
    # service's: read, verified (the provisioner makes every stream; identity's NATS user may not).
    await bus.ensure_read_streams(events_raw_stream(), privacy_stream())
    await bus.ensure_streams(
        events_resolved_stream(max_age=settings.retention_days * 86_400),
        identity_stream(),
        dead_letter_stream(),
    )
    engine = IdentityEngine(
        rules,
        store,
        bus.publisher,
        partitions=settings.partitions,
        telemetry=runtime.telemetry,
        shared_notify_max=settings.shared_notify_max,
    )
    # The key(s) deletion notices hash identifiers with: a suppressed person's events are dropped here too.
    engine.forgotten.keys = settings.identifier_hash_keys()  # required under tokens (settings.validate)
    await engine.start()
    matching = MatchingService(engine, store, match_config)
    await matching.start()
    # Before any event is resolved: the suppressions, and the deletions a restored store brought back.
    events_max_age = await events_retention(bus.js)
    await engine.load_forgotten(events_max_age)
    await apply_notices(engine, matching, bus.js)
    # One durable consumer per partition (the kit's partitioned engine, identity's logic): each
    # partition's events are applied in order, the next batch is resolved while the previous one is
    # written. The graph spans partitions, so every partition writes through identity's one write
    # chain, and one replica works on all of them: the holder of the writer lease (writer.py).
    partitioned = PartitionedEngine(
        engine,
        EngineSpec(
            service="identity",
            stream=subjects.EVENTS_RAW,
            subject_prefix=subjects.EVENTS_RAW_PREFIX,
            partitions=settings.partitions,
            batch_size=settings.batch_size,
            ack_wait=settings.ack_wait,
            description="identity: resolve events to persons",
            outbox=OUTBOX,  # one outbox for a privacy purge to clean
        ),
        bus=bus,
        store=store,
        chain=engine.chain,
    )
    engine.writer = False  # until the lease says so
    # Readiness follows the writer lease: a standby's API refuses, so Kubernetes routes to the writer
    # (the chart's readiness probe names this service; liveness, on "", stays SERVING).
    api_name = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name
    await runtime.grpc.set_ready(api_name, False)

    async def become_writer() -> None:
        await engine.become_writer()
        await runtime.grpc.set_ready(api_name, True)

    async def stop_writing() -> None:
        # Refused before anything is awaited: the release may be cut at any await (the lease lost).
        engine.writer = False
        await runtime.grpc.set_ready(api_name, False)
        await engine.stop_writing()

    ownership = await partitioned.start(
        OneWriter(
            await ownership_from_settings(settings, js=bus.js, group="identity", partitions=1),
            partitions=settings.partitions,
            become_writer=become_writer,
            stop_writing=stop_writing,
        )
    )
    serving = runtime.spawn(partitioned.serve(ownership), "resolve events.raw")

    async def release() -> None:
        # Pushed after the bus and the store: on the way out (SIGTERM) the lease is released and the
        # partitions drained before they close, so a standby takes over at once, not after the TTL.
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)

    runtime.stack.push_async_callback(release)
    runners = [partitioned.pipelines[p].runner for p in sorted(partitioned.pipelines)]
    # Every replica gets every deletion (one durable consumer per ordinal): each purges its own cache.
    privacy = bus.consumer(
        ConsumerSpec(
            stream=subjects.PRIVACY,
            durable=subjects.replica_durable("identity", "privacy", settings.pod_ordinal),
            filter_subjects=(subjects.PRIVACY_DELETED,),
            batch_size=PRIVACY_BATCH,
            ack_wait=PRIVACY_ACK_WAIT,
            max_ack_pending=PRIVACY_BATCH,
            description=f"identity: purge deleted persons (replica {settings.pod_ordinal})",
        ),
        PrivacyHandler(engine, matching, events_max_age=events_max_age).handle,
    )
    runtime.spawn(privacy.run(), f"consume {subjects.PRIVACY_DELETED}")
    runtime.parts.update(
        bus=bus,
        store=store,
        engine=engine,
        partitioned=partitioned,
        matching=matching,
        runners=runners,
        ownership=ownership,
        privacy_runner=privacy,
    )
    runtime.grpc.add_service(
        identity_pb2_grpc.add_IdentityServiceServicer_to_server,
        IdentityApi(engine, matching),
        identity_pb2.DESCRIPTOR.services_by_name["IdentityService"],
        scopes=SCOPES,
    )
    runtime.grpc.add_service(
        *export_service("identity", lambda person, merged, _context: export_person(engine, person, merged))
    )


def main() -> None:
    run_main(IdentitySettings, setup)


if __name__ == "__main__":
    main()
