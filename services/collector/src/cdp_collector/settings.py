"""Collector configuration: every variable, its default and meaning (also listed in the README)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cdp_kit.settings import ServiceSettings, env


@dataclass(frozen=True, kw_only=True)
class CollectorSettings(ServiceSettings):
    service_name: str = env("OTEL_SERVICE_NAME", "collector", help="service name in traces, metrics and logs")
    grpc_port: int = env("CDP_GRPC_PORT", 50051, help="gRPC port (CollectorService, health, reflection)")
    http_host: str = env("CDP_HTTP_HOST", "0.0.0.0", help="address the Segment-compatible HTTP API binds")
    http_port: int = env("CDP_HTTP_PORT", 8080, help="Segment-compatible HTTP API port (/v1/batch, /v1/track, …)")
    sources_file: Path = env(
        "CDP_COLLECTOR_SOURCES_FILE",
        help='JSON {"sources": [{"id", "name", "write_key"}]}: the write keys clients may send with',
    )
    max_event_bytes: int = env(
        "CDP_COLLECTOR_MAX_EVENT_BYTES", 32 * 1024, help="largest event accepted (Segment: 32 KB)"
    )
    max_batch_bytes: int = env(
        "CDP_COLLECTOR_MAX_BATCH_BYTES", 500 * 1024, help="largest request body, decompressed (Segment: 500 KB)"
    )
    max_batch_events: int = env(
        "CDP_COLLECTOR_MAX_BATCH_EVENTS", 2500, help="most events in one request (Segment: 2,500)"
    )
    ack_timeout: float = env(
        "CDP_COLLECTOR_ACK_TIMEOUT", 5.0, help="seconds to wait for JetStream to acknowledge a batch"
    )
    max_in_flight: int = env(
        "CDP_COLLECTOR_MAX_IN_FLIGHT", 50_000, help="events awaiting JetStream acknowledgement before callers get 429"
    )
    dedup_window: float = env(
        "CDP_EVENTS_DEDUP_WINDOW", 600.0, help="seconds JetStream remembers message ids to drop retried events"
    )
    retention_days: float = env("CDP_EVENTS_RETENTION_DAYS", 7.0, help="days events.raw keeps events")
    http_header_timeout: float = env(
        "CDP_COLLECTOR_HTTP_HEADER_TIMEOUT",
        10.0,
        help="seconds an HTTP connection has to send a request's headers, counted from when it opened or its "
        "previous answer was sent (so also how long an idle keep-alive connection stays open); then it is closed",
    )
    http_body_timeout: float = env(
        "CDP_COLLECTOR_HTTP_BODY_TIMEOUT",
        30.0,
        help="seconds an HTTP request has to send its whole body once its headers arrived; slower gets 408 and "
        "the connection is closed",
    )
    suppression_load_timeout: float = env(
        "CDP_COLLECTOR_SUPPRESSION_LOAD_TIMEOUT",
        60.0,
        help="seconds start-up may take to read every privacy.deleted suppression before reporting ready",
    )

    def validate(self) -> list[str]:
        problems = super().validate()
        if not self.sources_file.is_file():
            problems.append(f"CDP_COLLECTOR_SOURCES_FILE={str(self.sources_file)!r} is not a readable file")
        for name, value in (
            ("CDP_COLLECTOR_MAX_EVENT_BYTES", self.max_event_bytes),
            ("CDP_COLLECTOR_MAX_BATCH_BYTES", self.max_batch_bytes),
            ("CDP_COLLECTOR_MAX_BATCH_EVENTS", self.max_batch_events),
            ("CDP_COLLECTOR_MAX_IN_FLIGHT", self.max_in_flight),
        ):
            if value < 1:
                problems.append(f"{name}={value} is invalid: must be positive")
        for name, seconds in (
            ("CDP_COLLECTOR_HTTP_HEADER_TIMEOUT", self.http_header_timeout),
            ("CDP_COLLECTOR_HTTP_BODY_TIMEOUT", self.http_body_timeout),
        ):
            if not seconds > 0:
                problems.append(f"{name}={seconds} is invalid: must be a positive number of seconds")
        if self.suppression_load_timeout <= 0:
            problems.append(
                f"CDP_COLLECTOR_SUPPRESSION_LOAD_TIMEOUT={self.suppression_load_timeout} is invalid: must be positive"
            )
        return problems
