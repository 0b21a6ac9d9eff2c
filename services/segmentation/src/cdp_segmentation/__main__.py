"""The segmentation process: consume profiles.changed, keep memberships, publish segments.entered/exited."""

from __future__ import annotations

import gc
import logging

from nats.js.errors import NotFoundError

from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_kit.bus import (
    Bus,
    ConsumerSpec,
    dead_letter_stream,
    owned_partitions,
    profiles_stream,
    segments_stream,
    subjects,
)
from cdp_kit.profile_client import ProfileClient
from cdp_kit.service import ServiceRuntime, client_channel, run_main
from cdp_kit.storage import open_store
from cdp_segmentation.api import SCOPES, SegmentationApi
from cdp_segmentation.engine import ANNOUNCE, SegmentationEngine
from cdp_segmentation.settings import SegmentationSettings

log = logging.getLogger("cdp.segmentation")


async def setup(runtime: ServiceRuntime) -> None:
    settings: SegmentationSettings = runtime.settings  # type: ignore[assignment]
    # The held fields are many long-lived objects: collect young objects less often (see profile).
    gc.set_threshold(50_000, 20, 100)
    store = await runtime.stack.enter_async_context(open_store(settings.store_url))
    bus = await runtime.stack.enter_async_context(
        Bus.connect(settings.nats_url, name=settings.service_name, telemetry=runtime.telemetry)
    )
    await bus.ensure_streams(
        profiles_stream(), segments_stream(max_age=settings.segments_retention_days * 86_400), dead_letter_stream()
    )
    profile: ProfileClient | None = None
    if settings.profile_address:
        channel = client_channel(settings, settings.profile_address)
        runtime.stack.push_async_callback(channel.close)
        profile = ProfileClient(channel, settings.profile_token)
    if settings.standby:
        # Every partition, with positions of its own: "segmentation-r<ordinal>-p<p>".
        partitions, namespace = list(range(settings.partitions)), f"_r{settings.pod_ordinal}"
        standby = f"r{settings.pod_ordinal}"

        def durable(p: int) -> str:
            return subjects.partition_durable("segmentation", p, input=standby)
    else:
        partitions = owned_partitions(settings.partitions, settings.pod_ordinal, settings.replicas)
        namespace = ""

        def durable(p: int) -> str:
            return subjects.partition_durable("segmentation", p)

    origin = {"Cdp-Origin": f"{settings.service_name}-{settings.pod_ordinal}-{id(settings)}"}

    async def announce(what: str) -> None:
        await bus.nc.publish(ANNOUNCE, what.encode(), headers=origin)

    async def stream_ends() -> dict[str, int]:
        ends = {}
        for p in partitions:
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
        owned=partitions,
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
    )
    await engine.start()
    runtime.stack.push_async_callback(engine.stop)
    durables = {subjects.profiles_changed(p): durable(p) for p in partitions}
    replayed = await engine.replay(engine.held.since(bus.js, subjects.PROFILES, durables))
    if replayed:
        log.info("state brought up to date from the PROFILES stream", extra={"changes": replayed})
    gc.freeze()
    engine.resume_builds()

    async def on_announced(msg) -> None:
        if (msg.headers or {}).get("Cdp-Origin") == origin["Cdp-Origin"]:
            return
        try:
            await engine.reload(msg.data.decode())
        except Exception as exc:  # its next restart loads the segment from the store
            log.error("could not follow a segment change another replica made: %r", exc)

    subscription = await bus.nc.subscribe(ANNOUNCE, cb=on_announced)
    runtime.stack.push_async_callback(subscription.unsubscribe)
    runners = []
    for p in partitions:
        runner = bus.consumer(
            ConsumerSpec(
                stream=subjects.PROFILES,
                durable=durable(p),
                filter_subjects=(subjects.profiles_changed(p),),
                batch_size=settings.batch_size,
                ack_wait=settings.ack_wait,
                max_ack_pending=settings.batch_size,
                # Each person's changes in stream order, across failures and restarts.
                ordered=True,
                description=f"segmentation: memberships of the persons of partition {p}",
            ),
            engine.handle,
        )
        runtime.spawn(runner.run(), f"consume {subjects.profiles_changed(p)}")
        runners.append(runner)
    runtime.parts.update(bus=bus, store=store, engine=engine, runners=runners)
    runtime.grpc.add_service(
        segmentation_pb2_grpc.add_SegmentationServiceServicer_to_server,
        SegmentationApi(engine),
        segmentation_pb2.DESCRIPTOR.services_by_name["SegmentationService"],
        scopes=SCOPES,
    )


def main() -> None:
    run_main(SegmentationSettings, setup)


if __name__ == "__main__":
    main()
