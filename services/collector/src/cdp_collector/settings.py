"""Collector configuration: every variable, its default and meaning (also listed in the README)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cdp_collector.connections import default_max_connections, most_connections_allowed
from cdp_collector.http import body_ceiling, trusted_networks
from cdp_kit.identifier_hash import IdentifierHashSettings
from cdp_kit.service import open_file_limit
from cdp_kit.settings import ServiceSettings, env


@dataclass(frozen=True, kw_only=True)
class CollectorSettings(IdentifierHashSettings, ServiceSettings):
    service_name: str = env("OTEL_SERVICE_NAME", "collector", help="service name in traces, metrics and logs")
    grpc_port: int = env("CDP_GRPC_PORT", 50051, help="gRPC port (CollectorService, health, reflection)")
    http_host: str = env("CDP_HTTP_HOST", "0.0.0.0", help="address the Segment-compatible HTTP API binds")
    http_port: int = env("CDP_HTTP_PORT", 8080, help="Segment-compatible HTTP API port (/v1/batch, /v1/track, …)")
    sources_file: Path = env(
        "CDP_COLLECTOR_SOURCES_FILE",
        help='JSON {"sources": [{"id", "name", "write_key", "enabled", "limits", "kind", "identity_secret"}]}: the '
        "write keys clients may send with, each source's limits, whether its key is public (kind client) and its "
        "identity verification secret (see Sources)",
    )
    phone_region: str = env(
        "CDP_COLLECTOR_PHONE_REGION",
        "US",
        help="region a suppressed phone written without its country code is read in (ISO 3166, e.g. DE): "
        "identity's default_phone_region; empty: only phones written +<digits> are checked",
    )
    cors_origins: tuple[str, ...] = env(
        "CDP_COLLECTOR_CORS_ORIGINS",
        ("*",),
        help="origins whose pages may post events from a browser (comma-separated, e.g. "
        "https://shop.example.com); * allows any: the write key admits an event",
    )
    fill_context_ip: bool = env(
        "CDP_COLLECTOR_FILL_CONTEXT_IP",
        True,
        help="fill context.ip of a client-side event (posted to /v1/t, /v1/i, /v1/p, /v1/s, /v1/g, /v1/a or /v1/b, "
        "Segment's browser and mobile SDKs' paths) that has none with the request's address, as Segment does; "
        "false: store only what the client sent (an IP address is personal data)",
    )
    trusted_proxies: tuple[str, ...] = env(
        "CDP_COLLECTOR_TRUSTED_PROXIES",
        (),
        help="addresses or networks of the proxies and load balancers in front of the collector "
        "(comma-separated, e.g. 10.0.0.0/8,192.168.1.5): only from them is X-Forwarded-For read, from the "
        "right, and its last address that is none of them taken as the client's (context.ip; the SDK settings' "
        "protocol from X-Forwarded-Proto); empty: the connection's peer address, whatever headers say",
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
    # -- How many HTTP connections are held at once (connections.py): past a cap, refused and told to retry.
    http_max_connections: int | None = env(
        "CDP_COLLECTOR_HTTP_MAX_CONNECTIONS",
        None,
        help="most HTTP connections open at once; more are answered 503 too_many_connections with Retry-After "
        "and closed (unset: half the process's open-file limit, ulimit -n, and at most 10000; at most three "
        "quarters of that limit)",
    )
    http_max_connections_per_client: int = env(
        "CDP_COLLECTOR_HTTP_MAX_CONNECTIONS_PER_CLIENT",
        0,
        help="most HTTP connections open at once from one client address; more are answered 429 "
        "too_many_connections with Retry-After and closed (0: no such cap; behind a load balancer or proxy every "
        "client has its address, so leave it 0 there)",
    )
    http_body_budget_bytes: int = env(
        "CDP_COLLECTOR_HTTP_BODY_BUDGET_BYTES",
        128 * 1024 * 1024,
        help="bytes of HTTP request bodies received at once (each counts its Content-Length; a chunked one the "
        "most a body may be); a request that would go over is answered 503 busy with Retry-After before its body "
        "is read. At least the largest body (CDP_COLLECTOR_MAX_BATCH_BYTES, plus 1% and 4 KB)",
    )
    suppression_load_timeout: float = env(
        "CDP_COLLECTOR_SUPPRESSION_LOAD_TIMEOUT",
        60.0,
        help="seconds start-up may take to read every privacy.deleted suppression before reporting ready",
    )

    def http_connection_cap(self) -> int:
        """CDP_COLLECTOR_HTTP_MAX_CONNECTIONS, or what it is when unset."""
        return self.http_max_connections or default_max_connections()

    def validate(self) -> list[str]:
        problems = ServiceSettings.validate(self) + IdentifierHashSettings.validate(self)
        if not self.sources_file.is_file():
            problems.append(f"CDP_COLLECTOR_SOURCES_FILE={str(self.sources_file)!r} is not a readable file")
        try:
            trusted_networks(self.trusted_proxies)
        except ValueError as exc:
            problems.append(f"CDP_COLLECTOR_TRUSTED_PROXIES is invalid: {exc}")
        if self.phone_region and not (
            len(self.phone_region) == 2 and self.phone_region.isalpha() and self.phone_region.isupper()
        ):
            problems.append(
                f"CDP_COLLECTOR_PHONE_REGION={self.phone_region!r} is invalid: an ISO 3166 alpha-2 region like 'DE', or empty"
            )
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
        files = open_file_limit()
        if self.http_max_connections is not None and not 1 <= self.http_max_connections <= most_connections_allowed(
            files
        ):
            problems.append(
                f"CDP_COLLECTOR_HTTP_MAX_CONNECTIONS={self.http_max_connections} is invalid: must be from 1 to "
                f"{most_connections_allowed(files)}, three quarters of the process's open-file limit ({files}); "
                "raise the limit (ulimit -n) or lower the setting, or unset it"
            )
        largest = body_ceiling(self.max_batch_bytes)
        if self.http_body_budget_bytes < largest:
            problems.append(
                f"CDP_COLLECTOR_HTTP_BODY_BUDGET_BYTES={self.http_body_budget_bytes} is invalid: must be at least "
                f"{largest}, the longest body CDP_COLLECTOR_MAX_BATCH_BYTES={self.max_batch_bytes} lets through"
            )
        if self.http_max_connections_per_client < 0:
            problems.append(
                f"CDP_COLLECTOR_HTTP_MAX_CONNECTIONS_PER_CLIENT={self.http_max_connections_per_client} is invalid: "
                "must be 0 (no per-client cap) or more"
            )
        if self.suppression_load_timeout <= 0:
            problems.append(
                f"CDP_COLLECTOR_SUPPRESSION_LOAD_TIMEOUT={self.suppression_load_timeout} is invalid: must be positive"
            )
        return problems
