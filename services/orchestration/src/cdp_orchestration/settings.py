"""Orchestration configuration: every variable, its default and meaning (also listed in the README)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdp_kit.bus import dead_letter_stream
from cdp_kit.errors import InvalidArgument
from cdp_kit.ownership import OwnershipSettings
from cdp_kit.settings import ServiceSettings, env
from cdp_kit.yamltext import YAMLError, load_yaml
from cdp_orchestration.catalogue import CatalogueError, read_catalogue
from cdp_orchestration.domain.document import Catalogue
from cdp_orchestration.domain.rules import Rules, parse_rules

# The longest a message may wait somewhere and still reach the engine: a dead letter, replayable for as long
# as the dead-letter stream keeps it.
DEAD_LETTER_DAYS = dead_letter_stream().max_age / 86_400
RULES_FIELD = "CDP_ORCHESTRATION_RULES_FILE"
# The shortest an in-app message is kept: a person who opens the app once a week still finds it.
INBOX_FLOOR_DAYS = 7.0


@dataclass(frozen=True, kw_only=True)
class OrchestrationSettings(OwnershipSettings, ServiceSettings):
    """Which person partitions this replica runs comes from `OwnershipSettings` (`CDP_OWNERSHIP`); a
    partition's instances and arbiter state live in the store, so a partition moves with nothing to copy."""

    service_name: str = env("OTEL_SERVICE_NAME", "orchestration", help="service name in traces, metrics and logs")
    grpc_port: int = env("CDP_GRPC_PORT", 50056, help="gRPC port (OrchestrationService, health, reflection)")
    rules_file: Path | None = env(
        "CDP_ORCHESTRATION_RULES_FILE",
        None,
        help="the arbiter's rules (caps, quiet hours, suppressions, approval gate) as JSON or YAML; "
        "unset: no caps, no quiet hours, no suppressions, approval only for actions marked so",
    )
    catalogue_file: Path | None = env(
        "CDP_ORCHESTRATION_CATALOGUE_FILE",
        None,
        help="what journeys are validated against, as JSON or YAML (catalogue.py): known events, segments, "
        "consent purposes, and field names per root; unset: only the profile's computed traits are checked",
    )
    profile_address: str = env(
        "CDP_PROFILE_ADDRESS",
        "",
        help="profile gRPC address (host:port): a journey whose conditions read past events has the computed "
        "traits they need defined there when it is published, and the person copies keep only the computed traits "
        "and scores something reads (reads.py); empty: such a journey cannot be published, and every field is kept",
    )
    profile_token: str = env(
        "CDP_PROFILE_TOKEN", "", help="bearer token for the profile service (profile:admin)", secret=True
    )
    segmentation_address: str = env(
        "CDP_SEGMENTATION_ADDRESS",
        "",
        help="segmentation gRPC address (host:port): the segments a journey enters on or reads must exist there "
        "(ListSegments, every page) to save or publish it, and a journey whose segment was deleted since says so "
        "(GetJourney's warnings); empty: segments are checked against the catalogue file only",
    )
    segmentation_token: str = env(
        "CDP_SEGMENTATION_TOKEN", "", help="bearer token for the segmentation service (segmentation:read)", secret=True
    )
    scoring_address: str = env(
        "CDP_SCORING_ADDRESS",
        "",
        help="scoring gRPC address (host:port): the scores.<name> a journey reads must be written by a model "
        "deployed there (ListModels) to save or publish it; empty, or listing no model yet: scores are checked "
        "against the catalogue file only",
    )
    scoring_token: str = env(
        "CDP_SCORING_TOKEN", "", help="bearer token for the scoring service (scoring:read)", secret=True
    )
    outcomes_url: str = env(
        "CDP_OUTCOMES_URL",
        "",
        help="the collector's Segment HTTP API (http://collector:8080): outcome events of sent actions (Message "
        "Sent, Bounced, Failed) and of in-app messages read (Message Opened) are posted to its /v1/batch; "
        "empty: outcomes are recorded here only",
    )
    outcomes_write_key: str = env(
        "CDP_OUTCOMES_WRITE_KEY", "", help="the collector source write key outcome events are sent with", secret=True
    )
    batch_size: int = env("CDP_ORCHESTRATION_BATCH_SIZE", 256, help="orchestration.in messages fetched per batch")
    ack_wait: float = env(
        "CDP_ORCHESTRATION_ACK_WAIT",
        30.0,
        help="seconds before JetStream redelivers an unacknowledged batch: the engine's (orchestration.in) and "
        "each channel dispatcher's (a dispatcher keeps the batch it works on from redelivery meanwhile, so this "
        "bounds how soon the actions of a dispatcher that died come back, not how long a send may take)",
    )
    dispatch_concurrency: int = env(
        "CDP_ORCHESTRATION_DISPATCH_CONCURRENCY",
        16,
        help="actions each channel's dispatcher has in flight to its provider at once (one person's in order)",
    )
    hot_persons: int = env(
        "CDP_ORCHESTRATION_HOT_PERSONS",
        100_000,
        help="persons (with their live instances and arbiter state) kept in memory across all partitions; "
        "the rest are read from the store when something happens to them",
    )
    retention_days: float = env(
        "CDP_ORCHESTRATION_RETENTION_DAYS", 7.0, help="days the ORCHESTRATION and ACTIONS streams keep messages"
    )
    max_attempts: int = env(
        "CDP_ORCHESTRATION_MAX_ATTEMPTS",
        5,
        help="attempts a dispatcher makes to send an action its provider keeps failing (a 5xx, a timeout, a "
        "refused connection), with back-off, before the action is dead-lettered with the reason; a provider "
        "asking for time (a 429) uses none. Also how often a refused outcome report is retried. From 1 to 100",
    )
    defer_seconds: float = env(
        "CDP_ORCHESTRATION_DEFER_SECONDS",
        86_400.0,
        help="seconds after an action was published that it may keep waiting for a provider asking for time "
        "(a 429, a Retry-After): such hand-backs use none of the action's attempts; past this a 429 is final "
        "(failed, http_429) and a paused destination is sent to anyway. Below CDP_ORCHESTRATION_RETENTION_DAYS",
    )
    pause_seconds: float = env(
        "CDP_ORCHESTRATION_PAUSE_SECONDS",
        3600.0,
        help="the longest a provider's Retry-After pauses its destination (a webhook host, a provider account) "
        "and holds the action it answered: one asking for longer (a day, by mistake or from a hostile webhook "
        "receiver) is asked again after this, by one probe while the others wait; another Retry-After then "
        "pauses it again (pauses.py). Positive",
    )
    breaker_timeouts: int = env(
        "CDP_ORCHESTRATION_BREAKER_TIMEOUTS",
        3,
        help="timeouts in a row (no answer between them) from one provider destination that open its breaker: "
        "the dispatcher then stops waiting on it, probes it, and counts the other attempts as made and timed "
        "out without a send (dispatch.py). At least 1",
    )
    breaker_probe_seconds: float = env(
        "CDP_ORCHESTRATION_BREAKER_PROBE_SECONDS",
        5.0,
        help="seconds after an unanswered probe before an open breaker probes its destination again. Positive",
    )
    tombstone_days: float = env(
        "CDP_ORCHESTRATION_TOMBSTONE_DAYS",
        35.0,
        help="days a deleted person's tombstone (person id, time, request id: no personal data) is kept, so "
        "what still reaches orchestration for them is dropped; then it is swept. At least the longest a message "
        "for them can still arrive: the dead-letter stream's 30 days (a dead letter can be replayed) and "
        "CDP_ORCHESTRATION_RETENTION_DAYS",
    )
    history_days: float = env(
        "CDP_ORCHESTRATION_HISTORY_DAYS",
        400.0,
        help="days a person's send records, decisions and ended instances (counted from the end, or from the end "
        "of the goal window if later) are kept; then they are swept (hourly, a bounded page at a time; metric "
        "cdp.orchestration.history.swept). Running instances stay whatever their age. At least the longest an "
        "action or a trigger can be delivered again, which these records keep from being sent or entered twice: "
        "the dead-letter stream's 30 days and CDP_ORCHESTRATION_RETENTION_DAYS. Decided approvals (from their answer or "
        "expiry) and Enroll answers (from when they were given) are kept as long",
    )
    inbox_days: float = env(
        "CDP_ORCHESTRATION_INBOX_DAYS",
        90.0,
        help="days an in-app message (with its rendered content) is kept in the person's inbox after it was added, "
        "read or not; then it is swept with the history (metric cdp.orchestration.history.swept, collection "
        "inbox). At least 7: a person who opens the app once a week still finds it",
    )
    answer_timeout: float = env(
        "CDP_ORCHESTRATION_ANSWER_TIMEOUT",
        10.0,
        help="seconds Enroll / ExitInstance / Approve / Reject wait for the engine to apply the command",
    )

    def rules(self, counted: frozenset[str] = frozenset()) -> Rules:
        """The rules file's rules, its conditions reading the `counted` fields as 0 where a person has none
        (the service compiles them with the set `arbiter_rules.compile_rules` keeps)."""
        document = self.rules_document()
        if document is None:
            return Rules()
        return parse_rules(document, RULES_FIELD, counted=counted)

    def rules_document(self) -> Any:
        """The rules file as read (None: no file)."""
        if self.rules_file is None:
            return None
        try:
            return load_yaml(self.rules_file.read_text())
        except YAMLError as exc:  # a repeated key, an alias bomb, a syntax error: named, not a traceback
            raise InvalidArgument(RULES_FIELD, f"{self.rules_file} is not valid YAML: {exc}") from None

    def catalogue(self) -> Catalogue | None:
        return read_catalogue(str(self.catalogue_file)) if self.catalogue_file is not None else None

    def validate(self) -> list[str]:
        problems = ServiceSettings.validate(self) + OwnershipSettings.validate(self)
        if self.catalogue_file is not None:
            try:
                self.catalogue()
            except OSError as exc:
                problems.append(
                    f"CDP_ORCHESTRATION_CATALOGUE_FILE={self.catalogue_file} cannot be read: {exc.strerror}"
                )
            except CatalogueError as exc:
                problems.append(f"CDP_ORCHESTRATION_CATALOGUE_FILE is invalid: {exc}")
        if self.rules_file is not None:
            try:
                self.rules()
            except OSError as exc:
                problems.append(f"CDP_ORCHESTRATION_RULES_FILE={self.rules_file} cannot be read: {exc.strerror}")
            except InvalidArgument as exc:
                problems.append(
                    f"CDP_ORCHESTRATION_RULES_FILE={self.rules_file} is invalid: {exc.field}: {exc.description}"
                )
            except Exception as exc:
                problems.append(
                    f"CDP_ORCHESTRATION_RULES_FILE={self.rules_file} is not JSON or YAML: {type(exc).__name__}"
                )
        if self.outcomes_url and not self.outcomes_write_key:
            problems.append("CDP_OUTCOMES_WRITE_KEY is required when CDP_OUTCOMES_URL is set")
        if self.batch_size < 1:
            problems.append(f"CDP_ORCHESTRATION_BATCH_SIZE={self.batch_size} is invalid: must be positive")
        if self.dispatch_concurrency < 1:
            problems.append(
                f"CDP_ORCHESTRATION_DISPATCH_CONCURRENCY={self.dispatch_concurrency} is invalid: must be positive"
            )
        if self.hot_persons < 1:
            problems.append(f"CDP_ORCHESTRATION_HOT_PERSONS={self.hot_persons} is invalid: must be positive")
        if not 1 <= self.max_attempts <= 100:
            problems.append(
                f"CDP_ORCHESTRATION_MAX_ATTEMPTS={self.max_attempts} is invalid: must be from 1 to 100 (the dispatch "
                "consumer's own delivery limit is a backstop far above it)"
            )
        if not 0 < self.defer_seconds < self.retention_days * 86_400:
            problems.append(
                f"CDP_ORCHESTRATION_DEFER_SECONDS={self.defer_seconds:g} is invalid: must be positive and below "
                f"CDP_ORCHESTRATION_RETENTION_DAYS ({self.retention_days:g} days), or the ACTIONS stream drops "
                "a waiting action before it ends with an outcome"
            )
        if not self.pause_seconds > 0:
            problems.append(
                f"CDP_ORCHESTRATION_PAUSE_SECONDS={self.pause_seconds:g} is invalid: must be positive (seconds a "
                "provider's Retry-After pauses its destination at most)"
            )
        floor = max(DEAD_LETTER_DAYS, self.retention_days)
        if not self.tombstone_days >= floor:
            problems.append(
                f"CDP_ORCHESTRATION_TOMBSTONE_DAYS={self.tombstone_days:g} is invalid: must be at least {floor:g}, "
                f"the longest a message for a deleted person can still reach orchestration (the dead-letter "
                f"stream keeps {DEAD_LETTER_DAYS:g} days, CDP_ORCHESTRATION_RETENTION_DAYS={self.retention_days:g}); "
                "a tombstone swept sooner lets it fill the person's record again"
            )
        if not self.history_days >= floor:
            problems.append(
                f"CDP_ORCHESTRATION_HISTORY_DAYS={self.history_days:g} is invalid: must be at least {floor:g}, the "
                f"longest an action or a trigger can be delivered again (the dead-letter stream keeps "
                f"{DEAD_LETTER_DAYS:g} days, CDP_ORCHESTRATION_RETENTION_DAYS={self.retention_days:g}); send "
                "records and instances swept sooner let it be sent or entered a second time"
            )
        if not self.inbox_days >= INBOX_FLOOR_DAYS:
            problems.append(
                f"CDP_ORCHESTRATION_INBOX_DAYS={self.inbox_days:g} is invalid: must be at least {INBOX_FLOOR_DAYS:g}, "
                "so a person who opens the app once a week still finds a message before it is swept"
            )
        if self.ack_wait <= 0:
            problems.append(f"CDP_ORCHESTRATION_ACK_WAIT={self.ack_wait:g} is invalid: must be positive")
        if self.breaker_timeouts < 1:
            problems.append(
                f"CDP_ORCHESTRATION_BREAKER_TIMEOUTS={self.breaker_timeouts} is invalid: must be at least 1"
            )
        if not self.breaker_probe_seconds > 0:
            problems.append(
                f"CDP_ORCHESTRATION_BREAKER_PROBE_SECONDS={self.breaker_probe_seconds:g} is invalid: must be positive"
            )
        if self.answer_timeout <= 0:
            problems.append(f"CDP_ORCHESTRATION_ANSWER_TIMEOUT={self.answer_timeout} is invalid: must be positive")
        return problems
