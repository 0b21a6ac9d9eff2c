"""Delivering a batch without letting one bad record hold back the others, and dead letters for the bad ones.

An adapter answers each request with a `BatchOutcome`: per-record results (the CRM wrote some records and
rejected others, each with its own error) or one error for the whole request. `Isolation` turns those
answers into what to do next:

- a record the CRM wrote is synced (its CRM id, created or updated);
- a record the CRM rejected for itself (an invalid email, a value too long) becomes a `DeadLetter` carrying
  the CRM's own code and message under a reason code; the rest of the batch is unaffected;
- a request refused for what it asks of every record (an unknown field, a missing permission:
  `CrmError.every_record`) dead-letters them all at once, since splitting cannot help;
- a request refused as a whole for another non-transient reason (one bad record fails the lot: a HubSpot 400, a
  Dataverse change set, Salesforce with allOrNone) is split in halves, and the halves sent again, until
  the bad record is alone and dead-lettered; every good record is written, at O(log n) extra requests per
  bad one;
- a transient failure (429, 5xx, a timeout, a connection dropped after the CRM committed) is retried
  whole, unchanged and never split: every write is an upsert by its key, so sending it again after a lost
  answer changes nothing. Nothing transient is ever dead-lettered; the service retries under its budget.

Dead letters hold the change (to replay it after a fix) and the CRM's message, which may quote the
rejected value: both are stored, never logged - `DeadLetter.log_fields()` is what a log line may carry.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cdp_crm.domain.coalesce import Change, Link

# Reason codes of a rejected record (dead-lettered) ...
INVALID_VALUE = "invalid_value"  # the CRM refused a value (format, length, picklist)
UNKNOWN_FIELD = "unknown_field"  # the mapping names a field the CRM does not have
DUPLICATE = "duplicate"  # the match key matched several records, or a unique field clashed
NOT_FOUND = "not_found"  # update_only, and there is no such record
PERMISSION = "permission"  # the integration user may not write this record or field
REJECTED = "rejected"  # any other per-record refusal
REJECTION_REASONS = (INVALID_VALUE, UNKNOWN_FIELD, DUPLICATE, NOT_FOUND, PERMISSION, REJECTED)
# ... and of a transient failure (retried, never dead-lettered).
THROTTLED = "throttled"  # 429, REQUEST_LIMIT_EXCEEDED, service protection
UNAVAILABLE = "unavailable"  # 5xx
ANSWER_LOST = "answer_lost"  # timeout or connection dropped: the write may have committed
AUTH = "auth"  # bad or expired credentials: the connection fails until fixed, records wait
TRANSIENT_REASONS = (THROTTLED, UNAVAILABLE, ANSWER_LOST, AUTH)


@dataclass(frozen=True)
class CrmError:
    reason: str
    code: str = ""  # the CRM's own code: INVALID_EMAIL_ADDRESS, VALIDATION_ERROR, 0x80060888
    message: str = ""  # the CRM's own message: may quote values, so stored but never logged
    status: int = 0  # HTTP status, 0 if none came back
    retry_after: str | None = None
    daily: bool = False  # a daily-limit refusal: wait for the next day, not the window
    # The refusal is about the request, not a record in it (an unknown field, a missing permission):
    # splitting cannot isolate anything, so every record is dead-lettered at once.
    every_record: bool = False
    fields: tuple[str, ...] = ()

    @property
    def transient(self) -> bool:
        return self.reason in TRANSIENT_REASONS

    def __repr__(self) -> str:
        return f"CrmError(reason={self.reason!r}, code={self.code!r}, status={self.status})"


@dataclass(frozen=True)
class RecordResult:
    record: str  # coalesce.record_key of the change
    ok: bool
    crm_id: str | None = None
    created: bool | None = None
    error: CrmError | None = None


@dataclass(frozen=True)
class BatchOutcome:
    """One request's answer: per-record results, or `error` for the request as a whole."""

    results: Mapping[str, RecordResult] = field(default_factory=dict)
    error: CrmError | None = None
    headers: Mapping[str, str] = field(default_factory=dict)  # for Budget.observe

    @classmethod
    def failed(cls, error: CrmError, headers: Mapping[str, str] | None = None) -> BatchOutcome:
        return cls({}, error, dict(headers or {}))


@dataclass(frozen=True)
class DeadLetter:
    """A record the CRM refused, with why, to list, fix and replay. One per record: a newer failure of the
    same record replaces the older one (its id is the record key)."""

    connection: str
    mapping: str  # "<connection>/<mapping>"
    record: str
    reason: str
    crm_code: str
    crm_message: str
    http_status: int
    failed_at: float
    change: Change
    attempts: int = 1

    @property
    def id(self) -> str:
        return self.record

    def log_fields(self) -> dict[str, Any]:
        """What may go in a log line: ids and codes, never values or the CRM's message."""
        return {
            "connection": self.connection,
            "mapping": self.mapping,
            "record": self.record,
            "reason": self.reason,
            "crm_code": self.crm_code,
            "http_status": self.http_status,
        }

    def __repr__(self) -> str:
        return "DeadLetter(" + ", ".join(f"{k}={v!r}" for k, v in self.log_fields().items()) + ")"

    def replay(self) -> Change:
        """The change to send again (after the mapping or the data was fixed)."""
        c = self.change
        return Change(c.mapping, c.key, dict(c.fields), c.stamp, c.op, c.person_id, c.trigger, c.link)

    def to_state(self) -> dict[str, Any]:
        c = self.change
        return {
            "connection": self.connection,
            "mapping": self.mapping,
            "record": self.record,
            "reason": self.reason,
            "crm_code": self.crm_code,
            "crm_message": self.crm_message,
            "http_status": self.http_status,
            "failed_at": self.failed_at,
            "attempts": self.attempts,
            "change": {
                "mapping": c.mapping,
                "key": [list(k) for k in c.key],
                "fields": c.fields,
                "stamp": c.stamp,
                "op": c.op,
                "person_id": c.person_id,
                "trigger": c.trigger,
                "link": None
                if c.link is None
                else {"object": c.link.object, "key": [list(k) for k in c.link.key], "field": c.link.field},
            },
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> DeadLetter:
        c = state["change"]
        link = c.get("link")
        change = Change(
            c["mapping"], tuple((k, v) for k, v in c["key"]), dict(c["fields"]), c["stamp"], c["op"],
            c["person_id"], c["trigger"],
            None if link is None else Link(link["object"], tuple((k, v) for k, v in link["key"]), link["field"]),
        )  # fmt: skip
        return cls(
            state["connection"], state["mapping"], state["record"], state["reason"], state["crm_code"],
            state["crm_message"], state["http_status"], state["failed_at"], change, state["attempts"],
        )  # fmt: skip


class Isolation:
    """One batch's delivery: `next_batch()` to send, `record(batch, outcome, now)` with the CRM's answer,
    until `done`. Synced results, dead letters and batches to retry later accumulate on the object."""

    def __init__(self, changes: Sequence[Change]) -> None:
        self._pending: deque[list[Change]] = deque([list(changes)] if changes else [])
        self.synced: list[tuple[Change, RecordResult]] = []
        self.dead: list[DeadLetter] = []
        self.retry: list[list[Change]] = []  # transient failures: send again, whole, when allowed
        self.retry_errors: list[CrmError] = []
        self.requests = 0

    @property
    def done(self) -> bool:
        return not self._pending

    def next_batch(self) -> list[Change] | None:
        return self._pending[0] if self._pending else None

    def record(self, batch: list[Change], outcome: BatchOutcome, now: float) -> None:
        assert self._pending and self._pending[0] is batch, "record the batch next_batch() returned"
        self._pending.popleft()
        self.requests += 1
        error = outcome.error
        if error is not None:
            if error.transient:
                self.retry.append(batch)
                self.retry_errors.append(error)
            elif len(batch) == 1 or error.every_record:
                for change in batch:
                    self._dead(change, error, now)
            else:
                middle = len(batch) // 2
                # Halves go first, so isolating a bad record finishes before anything else is sent.
                self._pending.appendleft(batch[middle:])
                self._pending.appendleft(batch[:middle])
            return
        unanswered: list[Change] = []
        for change in batch:
            result = outcome.results.get(change.record)
            if result is None:
                unanswered.append(change)
            elif result.ok:
                self.synced.append((change, result))
            elif result.error is not None and result.error.transient:
                self.retry.append([change])
                self.retry_errors.append(result.error)
            else:
                self._dead(change, result.error or CrmError(REJECTED), now)
        if unanswered:
            # The CRM answered without a word on these: ask again rather than assume either way.
            self.retry.append(unanswered)
            self.retry_errors.append(CrmError(ANSWER_LOST, message="no result for these records"))

    def _dead(self, change: Change, error: CrmError, now: float) -> None:
        connection = change.mapping.partition("/")[0]
        dead = DeadLetter(
            connection, change.mapping, change.record, error.reason, error.code, error.message, error.status,
            now, change,
        )  # fmt: skip
        self.dead.append(dead)
