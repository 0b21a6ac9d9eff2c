"""The collector process: gRPC CollectorService + the Segment HTTP API, publishing to events.raw, and
following privacy.deleted for the people whose events it must no longer collect."""

from __future__ import annotations

from cdp.collector.v1 import collector_pb2, collector_pb2_grpc
from cdp_collector.api import CollectorApi
from cdp_collector.connections import ConnectionLimits
from cdp_collector.domain import Limits, SuppressionList
from cdp_collector.http import HttpApi, read_ceiling, start_http
from cdp_collector.ingest import Ingestor
from cdp_collector.key_refusals import KeyRefusals
from cdp_collector.privacy import SuppressionFollower
from cdp_collector.settings import CollectorSettings
from cdp_collector.source_limits import SourceLimiter
from cdp_collector.sources import SourceRegistry
from cdp_kit.bus import Bus, events_raw_stream, partition_count, privacy_stream, subjects
from cdp_kit.interceptors import PUBLIC
from cdp_kit.service import ServiceRuntime, run_main


async def setup(runtime: ServiceRuntime) -> None:
    settings: CollectorSettings = runtime.settings  # type: ignore[assignment]
    sources = SourceRegistry(settings.sources_file, runtime.telemetry)
    limits = Limits(
        max_event_bytes=settings.max_event_bytes,
        max_batch_bytes=settings.max_batch_bytes,
        max_batch_events=settings.max_batch_events,
    )
    bus = await runtime.stack.enter_async_context(
        Bus.connect(
            settings.nats_url,
            name=settings.service_name,
            telemetry=runtime.telemetry,
            ack_timeout=settings.ack_timeout,
            max_in_flight=settings.max_in_flight,
        )
    )
    await bus.ensure_streams(
        events_raw_stream(max_age=settings.retention_days * 86_400, duplicate_window=settings.dedup_window)
    )
    # Events are routed to events.raw.<partition> by CDP_PARTITIONS: the count the stream was made with.
    await partition_count.check(
        bus.js, settings.partitions, [subjects.EVENTS_RAW], record=not bus.provisioned, wait=bus.provision_wait
    )
    # Every stream is the provisioner's to make (cdp_kit.provision, run by cdpctl up and the chart's Job):
    # under its own NATS user a service only verifies them. PRIVACY is the profile service's.
    await bus.ensure_read_streams(privacy_stream())
    # Every suppression made so far is known before the first request is answered (setup ends before
    # the service reports SERVING and before the HTTP API reports ready).
    # Matched with the key(s) profile hashes deletion notices with (CDP_PRIVACY_HASH_KEY_FILE).
    suppression = SuppressionList(settings.identifier_hash_keys(), phone_region=settings.phone_region or None)
    follower = SuppressionFollower(bus.nc, bus.js, suppression)
    runtime.stack.push_async_callback(follower.stop)
    await follower.load(settings.suppression_load_timeout)
    ingestor = Ingestor(bus.publisher, settings.partitions, runtime.telemetry, duplicate_window=settings.dedup_window)
    # Each source's own limits (its entry in the sources file), one bucket a source for both front doors.
    limiter = SourceLimiter(runtime.telemetry)
    runtime.stack.callback(limiter.close)
    # Requests refused for their write key, by why and (a disabled source) which: both front doors.
    key_refusals = KeyRefusals(runtime.telemetry)
    runtime.stack.callback(key_refusals.close)
    runtime.parts.update(bus=bus, ingestor=ingestor, sources=sources, suppression=suppression, limiter=limiter)
    # Collect authenticates with the source's write key (like the HTTP API), not a bearer token. Its
    # write key is public, so the port is the internet's: no longer a message than a request within the
    # limit can be (the HTTP API reads no more either).
    runtime.grpc.max_receive_bytes = read_ceiling(limits)
    runtime.grpc.add_service(
        collector_pb2_grpc.add_CollectorServiceServicer_to_server,
        CollectorApi(sources, ingestor, limits, suppression, limiter, key_refusals),
        collector_pb2.DESCRIPTOR.services_by_name["CollectorService"],
        scopes={"Collect": PUBLIC},
    )
    http = HttpApi(
        sources,
        ingestor,
        limits,
        suppression,
        telemetry=runtime.telemetry,
        body_timeout=settings.http_body_timeout,
        body_budget=settings.http_body_budget_bytes,
        cors_origins=settings.cors_origins,
        limiter=limiter,
        key_refusals=key_refusals,
        fill_context_ip=settings.fill_context_ip,
        trusted_proxies=settings.trusted_proxies,
    )
    runtime.stack.callback(http.abandoned.close)
    runner, port = await start_http(
        http,
        settings.http_host,
        settings.http_port,
        shutdown_grace=settings.shutdown_grace,
        header_timeout=settings.http_header_timeout,
        connections=ConnectionLimits(settings.http_connection_cap(), settings.http_max_connections_per_client),
    )
    runtime.stack.push_async_callback(runner.cleanup)
    http.ready = True
    runtime.stack.callback(lambda: setattr(http, "ready", False))
    runtime.endpoints["http"] = f"http://{settings.http_host}:{port}"
    runtime.ports["http"] = port


def main() -> None:
    run_main(CollectorSettings, setup)


if __name__ == "__main__":
    main()
