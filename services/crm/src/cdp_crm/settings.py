"""CRM connector configuration: every variable, its default and meaning (also listed in the README).

The connections document (`CDP_CRM_CONNECTIONS_FILE`) is required: a connector without connections has
nothing to do, so start-up stops naming the variable. Credentials are not settings: the document names
the environment variables holding them, read when a connection's adapter is opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cdp_kit.bus import dead_letter_stream
from cdp_kit.ownership import OwnershipSettings
from cdp_kit.settings import ServiceSettings, env

PRIVACY_POLICIES = ("anonymise", "delete")
# The longest a message may wait somewhere and still reach the connector: a dead letter, replayable for as
# long as the dead-letter stream keeps it.
DEAD_LETTER_DAYS = dead_letter_stream().max_age / 86_400


@dataclass(frozen=True, kw_only=True)
class CrmSettings(OwnershipSettings, ServiceSettings):
    """Which person partitions this replica syncs comes from `OwnershipSettings` (`CDP_OWNERSHIP`); what was
    last written per record, the dead letters, the budgets and the inbound cursors live in the store, so a
    partition (or the inbound side) moves with nothing to copy."""

    service_name: str = env("OTEL_SERVICE_NAME", "crm", help="service name in traces, metrics and logs")
    grpc_port: int = env("CDP_GRPC_PORT", 50057, help="gRPC port (CrmService, health, reflection)")
    connections_file: Path = env(
        "CDP_CRM_CONNECTIONS_FILE",
        help="the connections document (JSON, or YAML by its .yaml/.yml suffix): CRMs, credentials' variable "
        "names, limits, mappings (the README shows one)",
    )
    collector_url: str = env(
        "CDP_CRM_COLLECTOR_URL",
        "",
        help="the collector's HTTP API (http://collector:8080): CRM changes are posted there as events; "
        "empty: nothing is read from the CRMs",
    )
    collector_write_key: str = env(
        "CDP_CRM_COLLECTOR_WRITE_KEY", "", help="the collector write key of the CRM source", secret=True
    )
    webhook_port: int = env(
        "CDP_CRM_WEBHOOK_PORT",
        0,
        help="port of the HTTP endpoint receiving HubSpot's signed webhooks (POST /webhooks/hubspot/<connection>; "
        "the connection's credentials name the app's client_secret); 0: off, changes are polled only",
    )
    webhook_public_url: str = env(
        "CDP_CRM_WEBHOOK_PUBLIC_URL",
        "",
        help="the base URL HubSpot calls the webhook endpoint at, as it signs it (behind a proxy); empty: as received",
    )
    profile_store_url: str = env(
        "CDP_CRM_PROFILE_STORE_URL",
        "",
        help="the profile service's store (read only), listing every person a backfill reaches - with "
        "CDP_PROFILE_ADDRESS, which serves their fields; empty: a backfill reaches the persons the connector "
        "has seen change",
    )
    profile_address: str = env("CDP_PROFILE_ADDRESS", "", help="the profile service's gRPC address (backfills)")
    profile_token: str = env("CDP_PROFILE_TOKEN", "", help="the token presented to the profile service", secret=True)
    bulk_poll_seconds: float = env(
        "CDP_CRM_BULK_POLL_SECONDS", 2.0, help="seconds between two reads of a Bulk API job's state"
    )
    poll_seconds: float = env("CDP_CRM_POLL_SECONDS", 30.0, help="seconds between two reads of a CRM's changes")
    # A batch should be deliverable within CDP_CRM_RETRY_FOR at the account's rate: at HubSpot's 19 requests/s
    # shared by four partitions, 64 messages of up to 100 changes take ~14 s, where 256 outlasted the deadline,
    # queued the rest for retry and held the store's writer (and the budget's writes) with one huge commit.
    batch_size: int = env("CDP_CRM_BATCH_SIZE", 64, help="crm.in messages fetched per batch (coalesced per batch)")
    ack_wait: float = env("CDP_CRM_ACK_WAIT", 120.0, help="seconds before JetStream redelivers an unacknowledged batch")
    retry_for: float = env(
        "CDP_CRM_RETRY_FOR",
        60.0,
        help="seconds a batch keeps retrying a CRM that throttles or fails before what is left is queued "
        "(crm_pending, retried by the partition's owner: nothing lost); with CDP_CRM_REQUEST_TIMEOUT below "
        "CDP_CRM_ACK_WAIT",
    )
    request_timeout: float = env("CDP_CRM_REQUEST_TIMEOUT", 30.0, help="seconds one CRM request may take")
    privacy_policy: str = env(
        "CDP_CRM_PRIVACY_POLICY",
        "anonymise",
        help="what privacy.deleted does in a CRM whose connection sets no on_delete: anonymise (every mapped "
        "field cleared, list memberships removed, the record kept under its opaque CDP id) or delete (the "
        "records, tasks and cases deleted from the CRM)",
    )
    retention_days: float = env("CDP_CRM_RETENTION_DAYS", 7.0, help="days the CRM input stream keeps messages")
    tombstone_days: float = env(
        "CDP_CRM_TOMBSTONE_DAYS",
        35.0,
        help="days a deleted person's tombstone (person id, time, request id: no personal data) is kept, so "
        "what still reaches the connector for them is dropped; then it is swept. At least the longest a message "
        "for them can still arrive: the dead-letter stream's 30 days (a dead letter can be replayed) and "
        "CDP_CRM_RETENTION_DAYS",
    )

    def validate(self) -> list[str]:
        problems = [*ServiceSettings.validate(self), *OwnershipSettings.validate(self)]
        if not self.connections_file.is_file():
            problems.append(f"CDP_CRM_CONNECTIONS_FILE={str(self.connections_file)!r} is not a readable file")
        if self.privacy_policy not in PRIVACY_POLICIES:
            problems.append(
                f"CDP_CRM_PRIVACY_POLICY={self.privacy_policy!r} is invalid: must be one of {', '.join(PRIVACY_POLICIES)}"
            )
        if self.retry_for <= 0 or self.retry_for + self.request_timeout >= self.ack_wait:
            problems.append(
                f"CDP_CRM_RETRY_FOR={self.retry_for} must be positive, and with CDP_CRM_REQUEST_TIMEOUT "
                f"({self.request_timeout}) below CDP_CRM_ACK_WAIT ({self.ack_wait}): a batch must be settled "
                "before JetStream delivers it again"
            )
        floor = max(DEAD_LETTER_DAYS, self.retention_days)
        if not self.tombstone_days >= floor:
            problems.append(
                f"CDP_CRM_TOMBSTONE_DAYS={self.tombstone_days:g} is invalid: must be at least {floor:g}, the "
                f"longest a message for a deleted person can still reach the connector (the dead-letter stream "
                f"keeps {DEAD_LETTER_DAYS:g} days, CDP_CRM_RETENTION_DAYS={self.retention_days:g}); a tombstone "
                "swept sooner lets it write the person to a CRM again"
            )
        if self.profile_store_url and not self.profile_address:
            problems.append(
                "CDP_CRM_PROFILE_STORE_URL needs CDP_PROFILE_ADDRESS: the store lists the persons, the profile "
                "service serves their fields"
            )
        if self.collector_url and not self.collector_url.startswith(("http://", "https://")):
            problems.append(f"CDP_CRM_COLLECTOR_URL={self.collector_url!r} must be an http(s) URL")
        return problems
