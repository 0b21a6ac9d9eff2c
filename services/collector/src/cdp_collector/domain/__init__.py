"""The collector's rules, as plain Python: Segment JSON → Event, validation, limits, clock-skew correction,
suppression of people who asked to be deleted.

A request body is decoded first (`decode_body`: JSON and the write key it carries) and its events
converted and validated after (`parse_decoded`), so a transport can authenticate in between;
`parse_request` does both. No I/O, gRPC or NATS here: `api.py` and the HTTP server call these and map
the FieldErrors they return, and the RequestRejected they raise, to status codes (gRPC INVALID_ARGUMENT;
HTTP 400, 413 for `request_too_large` — RequestRejected.status says which).
"""

from cdp_collector.domain.clock import TimestampError, corrected_ns, parse_timestamp
from cdp_collector.domain.decode import DecodedBody, decode_body
from cdp_collector.domain.errors import Code, FieldError, RequestRejected
from cdp_collector.domain.events import (
    GENERATED_MESSAGE_ID_KEY,
    partition_key,
    prepare_grpc_event,
    validate_event,
)
from cdp_collector.domain.limits import (
    DEFAULT_LIMITS,
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    MAX_DEPTH,
    MAX_EVENT_BYTES,
    Limits,
    check_event_count,
    check_request_bytes,
)
from cdp_collector.domain.segment import KINDS, ParsedRequest, parse_decoded, parse_request
from cdp_collector.domain.suppression import (
    SUPPRESSED_MESSAGE,
    SuppressionList,
    identifier_hash,
    identifier_key,
    identifier_keys,
)

__all__ = [
    "DEFAULT_LIMITS",
    "GENERATED_MESSAGE_ID_KEY",
    "KINDS",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_EVENTS",
    "MAX_DEPTH",
    "MAX_EVENT_BYTES",
    "SUPPRESSED_MESSAGE",
    "Code",
    "DecodedBody",
    "FieldError",
    "Limits",
    "ParsedRequest",
    "RequestRejected",
    "SuppressionList",
    "TimestampError",
    "check_event_count",
    "check_request_bytes",
    "corrected_ns",
    "decode_body",
    "identifier_hash",
    "identifier_key",
    "identifier_keys",
    "parse_decoded",
    "parse_request",
    "parse_timestamp",
    "partition_key",
    "prepare_grpc_event",
    "validate_event",
]
