"""The segmentation process: consume profiles.changed, keep memberships, publish segments.entered/exited."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import json_format
from nats.js.errors import NotFoundError

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_kit.bus import (
    Bus,
    ConsumerSpec,
    dead_letter_stream,
    delivered_since,
    owned_partitions,
    profiles_stream,
    segments_stream,
)
from cdp_kit.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from cdp_kit.profile_fields import profile_fields
from cdp_kit.service import ServiceRuntime, client_channel, run_main
from cdp_kit.storage import open_store
from cdp_segmentation.api import SCOPES, SegmentationApi
from cdp_segmentation.engine import ANNOUNCE, SegmentationEngine
from cdp_segmentation.settings import SegmentationSettings

log = logging.getLogger("cdp.segmentation")


class ProfileClient:
    """What segmentation asks the profile service: a person's fields, and the computed traits that event
    conditions compile to (defined, then waited for until their backfill is done)."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        self.stub = profile_pb2_grpc.ProfileServiceStub(channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def fields(self, person_id: str) -> dict[str, Any] | None:
        try:
            profile = await self.stub.GetProfile(
                profile_pb2.GetProfileRequest(person_id=person_id), metadata=self.metadata, timeout=5.0
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise Unavailable(f"profile service: {exc.code().name} {exc.details()}", retry_after=1.0) from None
        return profile_fields(profile)

    async def define(self, definitions: Sequence[Mapping[str, Any]]) -> None:
        for definition in definitions:
            message = profile_pb2.ComputedTraitDefinition(
                name=definition["name"],
                op=definition["op"],
                event_type=definition.get("event_type") or "",
                event_names=list(definition.get("event_names") or ()),
                property=definition.get("property") or "",
                window=definition.get("window") or "",
            )
            if definition.get("where"):
                json_format.ParseDict(dict(definition["where"]), message.where)
            try:
                await self.stub.DefineComputedTrait(
                    profile_pb2.DefineComputedTraitRequest(definition=message), metadata=self.metadata, timeout=10.0
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidArgument(
                        "definition", f"an event condition the profile service refuses: {exc.details()}"
                    ) from None
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise ResourceExhausted(
                        f"the profile service holds no more computed traits: {exc.details()}",
                        retry_after=60.0,
                        reason="computed_traits_exhausted",
                    ) from None
                raise FailedPrecondition(
                    f"could not define computed trait {definition['name']!r} on the profile service: "
                    f"{exc.code().name} {exc.details()}",
                    reason="profile_unavailable",
                ) from None

    async def undefine(self, names: Sequence[str]) -> None:
        for name in names:
            try:
                await self.stub.DeleteComputedTrait(
                    profile_pb2.DeleteComputedTraitRequest(name=name), metadata=self.metadata, timeout=10.0
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise Unavailable(f"profile service: {exc.code().name} {exc.details()}") from None

    async def ready(self, names: Sequence[str], timeout: float = 600.0) -> None:
        """Wait until the profile service has backfilled every named computed trait."""
        wanted = set(names)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                listed = await self.stub.ListComputedTraits(
                    profile_pb2.ListComputedTraitsRequest(), metadata=self.metadata, timeout=10.0
                )
            except grpc.aio.AioRpcError as exc:
                raise FailedPrecondition(
                    f"could not follow computed traits on the profile service: {exc.code().name} {exc.details()}",
                    reason="profile_unavailable",
                ) from None
            states = {t.definition.name: t.state for t in listed.traits}
            missing = wanted - states.keys()
            if missing:
                raise FailedPrecondition(
                    f"computed traits {', '.join(sorted(missing))} vanished from the profile service",
                    reason="trait_missing",
                )
            if all(states[name] == "ready" for name in wanted):
                return
            if loop.time() > deadline:
                raise Unavailable("the profile service is still backfilling the segment's event conditions")
            await asyncio.sleep(0.1)


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
        partitions, namespace, durable = list(range(settings.partitions)), f"_r{settings.pod_ordinal}", "segmentation-r"
        durable += f"{settings.pod_ordinal}-p"
    else:
        partitions = owned_partitions(settings.partitions, settings.pod_ordinal, settings.replicas)
        namespace, durable = "", "segmentation-p"
    origin = {"Cdp-Origin": f"{settings.service_name}-{settings.pod_ordinal}-{id(settings)}"}

    async def announce(what: str) -> None:
        await bus.nc.publish(ANNOUNCE, what.encode(), headers=origin)

    async def stream_ends() -> dict[str, int]:
        ends = {}
        for p in partitions:
            subject = f"profiles.changed.{p}"
            try:
                ends[subject] = (await bus.js.get_last_msg("PROFILES", subject)).seq
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
    replayed = await engine.replay(
        delivered_since(
            bus.js, "PROFILES", {f"profiles.changed.{p}": f"{durable}{p}" for p in partitions}, engine.applied
        )
    )
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
                stream="PROFILES",
                durable=f"{durable}{p}",
                filter_subjects=(f"profiles.changed.{p}",),
                batch_size=settings.batch_size,
                ack_wait=settings.ack_wait,
                max_ack_pending=settings.batch_size,
                # Each person's changes in stream order, across failures and restarts.
                ordered=True,
                description=f"segmentation: memberships of the persons of partition {p}",
            ),
            engine.handle,
        )
        runtime.spawn(runner.run(), f"consume profiles.changed.{p}")
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
