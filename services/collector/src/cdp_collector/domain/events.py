"""Rules on a `cdp.events.v1.Event`, whichever door it came in by (Segment JSON over HTTP, protobuf over gRPC).

Validation reports every problem it finds in an event, in a fixed order (type, ids, then the per-type
rules), not just the first: a developer fixing a payload sees the whole list at once. Callers that can
carry only one error (gRPC EventResult.error) take the first.

`message_id` is the platform's dedup key. Segment and RudderStack SDKs always send one; when a client does
not, the collector makes a random one (uuid4) and marks the event with `extra["cdp:messageIdGenerated"] =
true`. Consequence: a client that retries an id-less event gets it stored twice — there is nothing to
recognise the retry by. Deriving the id from the content would instead merge two genuine identical events
(two clicks in the same millisecond), which is worse for a platform that counts things.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType

from google.protobuf.timestamp_pb2 import Timestamp

from cdp.events.v1 import events_pb2
from cdp_collector.domain.clock import TimestampError, corrected_ns, timestamp_to_ns
from cdp_collector.domain.errors import Code, FieldError, join
from cdp_collector.domain.limits import DEFAULT_LIMITS, Limits, check_event_bytes
from cdp_collector.domain.storable import id_problems, message_id_problem, struct_problems
from cdp_collector.domain.traits import store_reserved_traits
from cdp_kit.timestamps import datetime_to_ns, set_ns

#: Key in `Event.extra` marking a message_id the server generated. Clients may not send it themselves.
GENERATED_MESSAGE_ID_KEY = "cdp:messageIdGenerated"

TRACK = events_pb2.EVENT_TYPE_TRACK
IDENTIFY = events_pb2.EVENT_TYPE_IDENTIFY
ALIAS = events_pb2.EVENT_TYPE_ALIAS
PAGE = events_pb2.EVENT_TYPE_PAGE
SCREEN = events_pb2.EVENT_TYPE_SCREEN
GROUP = events_pb2.EVENT_TYPE_GROUP
_KNOWN_TYPES = frozenset({TRACK, IDENTIFY, ALIAS, PAGE, SCREEN, GROUP})

#: Proto field → the Segment JSON name, for errors about events that came in as JSON.
JSON_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "type": "type",
        "message_id": "messageId",
        "user_id": "userId",
        "anonymous_id": "anonymousId",
        "previous_id": "previousId",
        "group_id": "groupId",
        "event": "event",
        "context.group_id": "context.groupId",
        "extra": "extra",
        "sent_at": "sentAt",
        "timestamp": "timestamp",
        "original_timestamp": "originalTimestamp",
    }
)
_IDS = ("user_id", "anonymous_id", "previous_id", "group_id")


def partition_key(event: events_pb2.Event) -> str:
    """What orders a person's events: user_id, else anonymous_id (ARCHITECTURE §2)."""
    return event.user_id or event.anonymous_id


def new_message_id() -> str:
    return str(uuid.uuid4())


def validate_event(
    event: events_pb2.Event,
    *,
    limits: Limits = DEFAULT_LIMITS,
    base: str = "",
    names: Mapping[str, str] | None = None,
) -> list[FieldError]:
    """Every rule an event must meet to be accepted. `base` prefixes field paths (`batch[3]`, `events[3]`);
    `names` maps proto field names to the client's (JSON_NAMES for HTTP; None keeps proto names)."""
    errors: list[FieldError] = []
    kind = event.type
    if kind not in _KNOWN_TYPES:
        errors.append(
            FieldError(
                Code.INVALID_EVENT_TYPE,
                _field(base, names, "type"),
                f"type {_type_label(kind)} is not an event type: use one of track, identify, alias, page, screen, group",
            )
        )
    message_id = event.message_id
    if not message_id:
        errors.append(
            FieldError(
                Code.MISSING_FIELD,
                _field(base, names, "message_id"),
                f"{_label(names, 'message_id')} is required (a unique id per event)",
            )
        )
    elif len(message_id) > limits.max_message_id_chars:
        errors.append(
            _too_long(
                _field(base, names, "message_id"),
                _label(names, "message_id"),
                len(message_id),
                limits.max_message_id_chars,
            )
        )
    else:
        problem = message_id_problem(message_id, _field(base, names, "message_id"), _label(names, "message_id"))
        if problem is not None:
            errors.append(problem)
    for attr in _IDS:
        value = getattr(event, attr)
        if len(value) > limits.max_id_chars:
            errors.append(_too_long(_field(base, names, attr), _label(names, attr), len(value), limits.max_id_chars))
    context_group = event.context.group_id
    if len(context_group) > limits.max_id_chars:
        errors.append(
            _too_long(
                _field(base, names, "context.group_id"),
                _label(names, "context.group_id"),
                len(context_group),
                limits.max_id_chars,
            )
        )

    if kind == ALIAS:
        if not event.user_id:
            errors.append(
                FieldError(
                    Code.MISSING_FIELD,
                    _field(base, names, "user_id"),
                    f"alias needs {_label(names, 'user_id')}: the id the user is known by now",
                )
            )
        if not event.previous_id:
            errors.append(
                FieldError(
                    Code.MISSING_FIELD,
                    _field(base, names, "previous_id"),
                    f"alias needs {_label(names, 'previous_id')}: the id (userId or anonymousId) the user was known by before",
                )
            )
    elif not event.user_id and not event.anonymous_id:
        errors.append(
            FieldError(
                Code.MISSING_FIELD,
                _field(base, names, "user_id"),
                f"every event needs {_label(names, 'user_id')} or {_label(names, 'anonymous_id')}; neither is set",
            )
        )
    if kind == TRACK:
        name = event.event
        if not name.strip():
            errors.append(
                FieldError(
                    Code.MISSING_FIELD,
                    _field(base, names, "event"),
                    'track needs event: the action\'s name, e.g. "Order Completed"',
                )
            )
        elif len(name) > limits.max_event_name_chars:
            errors.append(
                _too_long(
                    _field(base, names, "event"),
                    _label(names, "event"),
                    len(name),
                    limits.max_event_name_chars,
                )
            )
    elif kind == GROUP and not event.group_id:
        errors.append(
            FieldError(
                Code.MISSING_FIELD,
                _field(base, names, "group_id"),
                f"group needs {_label(names, 'group_id')}: the account or company id",
            )
        )
    return errors


def prepare_grpc_event(
    event: events_pb2.Event,
    *,
    received_at: datetime,
    batch_sent_at: Timestamp | datetime | None,
    source_id: str,
    limits: Limits = DEFAULT_LIMITS,
    index: int | None = None,
) -> list[FieldError]:
    """Make a protobuf event from `CollectRequest.events` ready to store, in place, and return what is
    wrong with it (empty = accept).

    Sets received_at and source_id (a client cannot choose either), fills a missing message_id, corrects
    the timestamp for clock skew (the event's own sent_at, else `batch_sent_at` = CollectRequest.sent_at,
    as a Timestamp or an aware datetime; an all-zero Timestamp, which is how an unset field reads, counts
    as absent), then validates. Field paths are proto names, under `events[index]` when `index` is given
    (a request-level sent_at problem is reported on `sent_at`). The size limit is checked first, on the
    bytes as received; an oversized event is not examined further.
    """
    base = f"events[{index}]" if index is not None else ""
    too_large = check_event_bytes(event.ByteSize(), base, limits, measured="as the serialized protobuf Event")
    if too_large is not None:
        return [too_large]
    errors: list[FieldError] = []
    if GENERATED_MESSAGE_ID_KEY in event.extra.fields:
        errors.append(reserved_field_error(join(base, f"extra.{GENERATED_MESSAGE_ID_KEY}")))
    event.source_id = source_id
    received_ns = datetime_to_ns(received_at)
    set_ns(event.received_at, received_ns)
    if not event.message_id:
        event.message_id = new_message_id()
        event.extra.fields[GENERATED_MESSAGE_ID_KEY].bool_value = True

    where = "sent_at"
    try:
        sent_ns = None
        if event.HasField("sent_at"):
            where = join(base, "sent_at")
            sent_ns = timestamp_to_ns(event.sent_at)
        elif isinstance(batch_sent_at, datetime):
            where = "sent_at"  # the request's, shared by every event of it
            sent_ns = datetime_to_ns(batch_sent_at)
            set_ns(event.sent_at, sent_ns)
        elif batch_sent_at is not None and batch_sent_at.ByteSize():
            where = "sent_at"
            sent_ns = timestamp_to_ns(batch_sent_at)
            event.sent_at.CopyFrom(batch_sent_at)
        client_ns = None
        if event.HasField("original_timestamp") and event.HasField("timestamp"):
            # A replay (a Segment archive's row): its timestamp was corrected already and is the time.
            where = join(base, "original_timestamp")
            timestamp_to_ns(event.original_timestamp)
            where = join(base, "timestamp")
            client_ns = timestamp_to_ns(event.timestamp)
            sent_ns = None
        elif event.HasField("original_timestamp"):
            where = join(base, "original_timestamp")
            client_ns = timestamp_to_ns(event.original_timestamp)
        elif event.HasField("timestamp"):
            # A client that filled only `timestamp` meant its own clock's time: keep it as the original.
            where = join(base, "timestamp")
            client_ns = timestamp_to_ns(event.timestamp)
            event.original_timestamp.CopyFrom(event.timestamp)
        where = join(base, "timestamp")
        set_ns(event.timestamp, corrected_ns(received_at=received_ns, sent_at=sent_ns, client_time=client_ns))
    except TimestampError as exc:
        errors.append(FieldError(Code.INVALID_TIMESTAMP, where, str(exc)))

    errors.extend(validate_event(event, limits=limits, base=base))
    # What no store downstream can hold; nesting too, as no JSON walk has measured a protobuf event.
    errors.extend(id_problems(event, base=base, names=None))
    errors.extend(struct_problems(event, base=base, json_paths=False, max_depth=limits.max_depth))
    if not errors:
        store_reserved_traits(event)  # one name each (traits.py)
    return errors


def _label(names: Mapping[str, str] | None, proto_name: str) -> str:
    return names.get(proto_name, proto_name) if names is not None else proto_name


def _field(base: str, names: Mapping[str, str] | None, proto_name: str) -> str:
    return join(base, _label(names, proto_name))


def _type_label(kind: int) -> str:
    if kind == events_pb2.EVENT_TYPE_UNSPECIFIED:
        return "EVENT_TYPE_UNSPECIFIED (not set)"
    return str(kind)


def _too_long(path: str, label: str, length: int, limit: int) -> FieldError:
    return FieldError(Code.TOO_LONG, path, f"{label} is {length} characters; the limit is {limit}")


def reserved_field_error(path: str) -> FieldError:
    return FieldError(
        Code.RESERVED_FIELD,
        path,
        f"{GENERATED_MESSAGE_ID_KEY} is set by the collector only (it marks a message id the server generated): remove it",
    )
