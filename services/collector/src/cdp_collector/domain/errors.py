"""The collector's error vocabulary: a stable machine code, the field at fault, and what would be valid.

These are values, not exceptions: one request can hold many bad events and the caller answers all of them
at once (HTTP 400 body, gRPC EventResult.error). The codes are part of the public API — clients branch on
them — so never rename one; add a new code instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Code(StrEnum):
    # Only ever whole-request problems (RequestRejected).
    INVALID_JSON = "invalid_json"
    REQUEST_TOO_LARGE = "request_too_large"
    TOO_MANY_EVENTS = "too_many_events"
    MISPLACED_FIELD = "misplaced_field"
    # Problems with one event; the batch envelope's own problems reuse them in a RequestRejected.
    INVALID_TYPE = "invalid_type"
    MISSING_FIELD = "missing_field"
    INVALID_EVENT_TYPE = "invalid_event_type"
    CONFLICTING_FIELDS = "conflicting_fields"
    TOO_LONG = "too_long"
    INVALID_TIMESTAMP = "invalid_timestamp"
    INTEGER_OUT_OF_RANGE = "integer_out_of_range"
    NESTING_TOO_DEEP = "nesting_too_deep"
    EVENT_TOO_LARGE = "event_too_large"
    RESERVED_FIELD = "reserved_field"
    #: A character a downstream store cannot hold where it is (NUL in an identifier or an object key,
    #: a control character in the message id): see storable.py.
    INVALID_CHARACTER = "invalid_character"
    # Not a problem with the event: dropped on purpose because its person asked to be suppressed.
    SUPPRESSED = "suppressed"


@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem. `field` is a path in the client's own field names (`batch[3].userId`,
    `events[2].user_id`, `properties.items[0].price`); the empty string means the request body itself."""

    code: Code
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field or '(body)'}: {self.message} [{self.code}]"


def json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for messages a client developer recognises."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _count(n: int, noun: str, plural: str = "") -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"


def described(value: object) -> str:
    """What came, as an error message tells it: the JSON type and its length, never the value itself.
    SDKs log the answers they get, and a value in the wrong field is often an email or a name: "a string
    of 20 characters", "an object with 2 entries", "an array of 3 items", "a number", "a boolean", "null"."""
    if isinstance(value, str):
        return f"a string of {_count(len(value), 'character')}"
    if isinstance(value, dict):
        return f"an object with {_count(len(value), 'entry', 'entries')}"
    if isinstance(value, list):
        return f"an array of {_count(len(value), 'item')}"
    kind = json_type(value)
    return "null" if kind == "null" else f"a {kind}"


def described_pair(first: object, second: object) -> str:
    """Two values of one field, told apart without showing them: "strings of 3 and 20 characters"."""
    if isinstance(first, str) and isinstance(second, str):
        return f"strings of {len(first)} and {_count(len(second), 'character')}"
    return f"{described(first)} and {described(second)}"


def join(base: str, name: str) -> str:
    """`batch[3]` + `userId` → `batch[3].userId`; a single call has no base."""
    return f"{base}.{name}" if base else name


class RequestRejected(Exception):
    """The whole request is refused and nothing in it is accepted: the body is not JSON, not an object,
    too large, has too many events, or a malformed batch envelope. Raised rather than returned so that no
    caller can mistake a refused request for an empty one.

    `status` is the HTTP status Segment's tracking API answers with (413 for a body over the size limit,
    400 otherwise); transports may raise this themselves for their own checks (bad gzip: 400, an
    unsupported Content-Encoding: 415) and pass the status they want.
    """

    def __init__(self, code: str, field: str, message: str, *, status: int | None = None) -> None:
        super().__init__(f"{field or '(body)'}: {message} [{code}]")
        self.code = code
        self.field = field
        self.message = message
        self.status = status if status is not None else (413 if code == Code.REQUEST_TOO_LARGE else 400)

    @classmethod
    def of(cls, error: FieldError) -> RequestRejected:
        return cls(error.code, error.field, error.message)

    @property
    def error(self) -> FieldError:
        return FieldError(self.code, self.field, self.message)  # type: ignore[arg-type]
