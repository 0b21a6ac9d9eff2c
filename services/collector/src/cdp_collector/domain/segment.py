"""Segment HTTP tracking API payloads → `cdp.events.v1.Event`.

`parse_request(kind, body, ...)` takes the body of `/v1/{kind}` (already decompressed) and returns, per
item of the request, an Event or its errors — or raises RequestRejected for the request as a whole.
Shapes accepted:

- single calls `/v1/track|identify|alias|page|screen|group`: the body is one event; `type` may be left out
  (the endpoint implies it) but if sent must match the endpoint;
- `/v1/batch`: `{"batch": [...], "sentAt", "context", "integrations", "writeKey"}`; every item needs `type`.
  The batch-level `context` and `integrations` are merged under each item's own, one level deep (an item's
  `context.library` replaces the batch's whole `library`, as in Segment). Other unknown batch-level keys are
  shared by every item like unknown item keys (kept in `Event.extra`); batch-level keys that name an
  event field (`userId`, `messageId`, …) are refused with `misplaced_field` — copying a `messageId` onto
  every item would make them duplicates of each other.

Field names are Segment's camelCase; the snake_case spellings (`user_id`, `anonymous_id`, `message_id`,
`previous_id`, `group_id`, `sent_at`, `original_timestamp`, `received_at`, `write_key`) are accepted too,
although the Segment (2.4.0) and RudderStack (2.1.9) Python SDKs send camelCase only. Sending both spellings
with different values is `conflicting_fields`. Errors name fields as the client spelled them.

What the SDKs put on the wire, and how it is handled:

- every key on every call, `null` when unknown (`"anonymousId": null`, `"category": null`): null for a
  known field means absent (an unknown key keeps its null in extra);
- `userId`/`anonymousId` stringified, but `previousId` and `groupId` passed through as numbers when the
  caller gave numbers (`require(..., ID_TYPES)` with numbers.Number): integer ids become strings
  (`42` → `"42"`), any other type (float, boolean, object) is `invalid_type`;
- `timestamp` as isoformat with an offset (`…T12:00:00.123+00:00`, RudderStack with microseconds); the
  batch carries `sentAt`; `context.library = {"name": "analytics-python", "version": …}`;
- RudderStack: `"channel": "server"` at top level (kept in extra), `integrations: {"All": true}`, and
  identify traits *only* in `context.traits` ("traits not needed at root level", says its client) — for an
  identify without top-level `traits`, `Event.traits` is filled from `context.traits` (kept there too), so
  identity and profile find identify traits in one place whichever SDK sent them;
- reserved traits camelCase (`firstName`, `lastName`, `createdAt`, as analytics.js apps send them) in a
  person's or a group's traits are stored under their snake_case names, and `name` filled from the first
  and last names (`traits.py`; the collector's README has the table);
- Segment's `writeKey` inside the body (an alternative to Basic auth): returned as
  `ParsedRequest.write_key` for the HTTP layer to authenticate with, and never stored in an event.

The body is decoded by `decode.py` (which also says how an unpaired surrogate escape, half an emoji, is
kept as U+FFFD rather than costing a batch); `parse_decoded` converts a body already decoded, so that the
HTTP API can authenticate the write key in a body before any event in it is looked at.

Other decisions: a client-sent `receivedAt` is ignored (the server's clock sets it); when both `timestamp`
and `originalTimestamp` are sent (a replay of a Segment archive or warehouse row: the SDKs send one of
them), `timestamp` is the event's time as sent (never later than the arrival; Segment corrected it
already) and `originalTimestamp` is kept as the original; unknown top-level keys go to
`Event.extra`, unknown context keys to `Context.extra` (see context.py).

Every problem in an event is reported (one per field), then the event is dropped as a whole. An event
over the size limit is reported as only that: it is not examined further.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

import orjson
from google.protobuf.timestamp_pb2 import Timestamp

from cdp.events.v1 import events_pb2
from cdp_collector.domain.clock import TimestampError, corrected_ns, parse_timestamp
from cdp_collector.domain.context import context_parts, fill_context_structs
from cdp_collector.domain.decode import DecodedBody, decode_body
from cdp_collector.domain.errors import Code, FieldError, RequestRejected, described, described_pair, join, json_type
from cdp_collector.domain.events import (
    ALIAS,
    GENERATED_MESSAGE_ID_KEY,
    GROUP,
    IDENTIFY,
    JSON_NAMES,
    PAGE,
    SCREEN,
    TRACK,
    new_message_id,
    reserved_field_error,
    validate_event,
)
from cdp_collector.domain.limits import (
    DEFAULT_LIMITS,
    Limits,
    check_event_bytes,
    check_event_count,
)
from cdp_collector.domain.storable import id_problems, struct_problems, unnamed_consent
from cdp_collector.domain.structs import fill_struct
from cdp_collector.domain.traits import group_dict, person_dict
from cdp_kit.timestamps import NANOS, datetime_to_ns, set_ns

EVENT_TYPES: Mapping[str, int] = MappingProxyType(
    {"track": TRACK, "identify": IDENTIFY, "alias": ALIAS, "page": PAGE, "screen": SCREEN, "group": GROUP}
)
_TYPES = dict(EVENT_TYPES)  # read once per event: a plain dict's `get` is the cheaper
#: The `kind`s parse_request understands: the path segment after /v1/.
KINDS = frozenset({"batch", *EVENT_TYPES})

_MEASURED = "as the event object re-encoded as compact JSON"

# Top-level event keys → a slot; slots of one kind are contiguous so one comparison sorts a key.
(
    _MESSAGE_ID,
    _USER_ID,
    _ANONYMOUS_ID,
    _PREVIOUS_ID,
    _GROUP_ID,  # ids: strings, integers become strings
    _EVENT,
    _NAME,
    _CATEGORY,  # strings
    _TYPE,
    _PROPERTIES,
    _TRAITS,
    _INTEGRATIONS,
    _CONTEXT,  # objects
    _TIMESTAMP,
    _ORIGINAL_TIMESTAMP,
    _SENT_AT,  # client times
    _RECEIVED_AT,
    _WRITE_KEY,  # read elsewhere or ignored
) = range(18)
_CAMEL = (
    "messageId", "userId", "anonymousId", "previousId", "groupId", "event", "name", "category", "type",
    "properties", "traits", "integrations", "context", "timestamp", "originalTimestamp", "sentAt",
    "receivedAt", "writeKey",
)  # fmt: skip
_PROTO = (
    "message_id", "user_id", "anonymous_id", "previous_id", "group_id", "event", "name", "category", "type",
    "properties", "traits", "integrations", "context", "timestamp", "original_timestamp", "sent_at",
    "received_at", "write_key",
)  # fmt: skip
# A plain dict, never changed: looked up for every key of every event, and a MappingProxyType's `get`
# costs half as much again as a dict's.
_SLOTS: dict[str, int] = {
    **{name: slot for slot, name in enumerate(_CAMEL)},
    **{name: slot for slot, name in enumerate(_PROTO)},
}
# What a slot holds before the event sets it: "" for strings (empty = not set, as in proto3).
_UNSET = ("",) * _TYPE + (None,) * (len(_CAMEL) - _TYPE)
_BATCH_ENVELOPE = frozenset(
    {
        "batch",
        "sentAt",
        "sent_at",
        "context",
        "integrations",
        "writeKey",
        "write_key",
        "receivedAt",
        "received_at",
    }
)
_NUL_ESCAPE = b"\\u0000"


@dataclass(slots=True)
class ParsedRequest:
    """The events of one accepted request, index-aligned with its items (a single call has one).

    `events[i]` is the i-th event ready to store, or None when it was refused; `errors[i]` is then its
    first problem (None for a good event) and `all_errors[i]` every problem found (empty for a good event).
    `message_ids[i]` is the event's id — for a refused event the id the client sent, when readable, so a
    response can name it. A request refused as a whole raises RequestRejected instead.
    """

    events: list[events_pb2.Event | None] = field(default_factory=list)
    errors: list[FieldError | None] = field(default_factory=list)
    all_errors: list[tuple[FieldError, ...]] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)
    #: Segment lets clients send the write key in the body instead of Basic auth.
    write_key: str | None = None

    def add(self, event: events_pb2.Event | None, problems: tuple[FieldError, ...], item: object) -> None:
        self.events.append(event)
        self.errors.append(problems[0] if problems else None)
        self.all_errors.append(problems)
        self.message_ids.append(event.message_id if event is not None else _sent_message_id(item))

    def assign_source(self, source_id: str) -> None:
        """For a request authenticated by the write key in its body, parsed before its source was known."""
        for event in self.events:
            if event is not None:
                event.source_id = source_id

    def valid(self) -> list[tuple[int, events_pb2.Event]]:
        return [(index, event) for index, event in enumerate(self.events) if event is not None]


def _sent_message_id(item: object) -> str:
    if type(item) is dict:
        for key in ("messageId", "message_id"):
            value = item.get(key)
            if type(value) is str or type(value) is int:
                return str(value)
    return ""


def parse_request(
    kind: str,
    body: bytes,
    *,
    received_at: datetime,
    source_id: str,
    limits: Limits = DEFAULT_LIMITS,
) -> ParsedRequest:
    """Parse the body of `POST /v1/{kind}` (decompressed) into events. `received_at` is the server's clock
    (timezone-aware); `source_id` the source the write key belongs to ("" if only the body's writeKey
    will tell: then call `assign_source`).

    Raises RequestRejected when the request as a whole is refused: request_too_large, invalid_json,
    nesting_too_deep (beyond the decoder's 1,024 levels), invalid_type (body not an object), and for
    /v1/batch too_many_events or a bad envelope (missing_field/invalid_type `batch`, invalid_timestamp
    `sentAt`, invalid_type `context`/`integrations`, misplaced_field). Problems with single events are
    in the result instead. Raises ValueError for an unknown `kind`: a bug in the caller, not the request.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: expected one of {sorted(KINDS)}")
    return parse_decoded(kind, decode_body(body, limits), received_at=received_at, source_id=source_id, limits=limits)


def parse_decoded(
    kind: str,
    decoded: DecodedBody,
    *,
    received_at: datetime,
    source_id: str,
    limits: Limits = DEFAULT_LIMITS,
) -> ParsedRequest:
    """`parse_request` for a body `decode_body` has decoded already (a body read for its key only, not
    exactly, is decoded again here). Raises what parse_request raises, but for the body's own problems."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: expected one of {sorted(KINDS)}")
    if not decoded.exact:
        decoded = decode_body(decoded.body, limits)
    document, write_key, body = decoded.document, decoded.write_key, decoded.body
    received_ns = datetime_to_ns(received_at)
    # Every event of the request gets this arrival time: one Timestamp, copied into each by its constructor.
    received = set_ns(Timestamp(), received_ns)
    # JSON carries NUL only as this escape (a raw control character is invalid JSON), so a body without it
    # skips the walk for NUL in keys and identifier traits (storable.py).
    has_nul = _NUL_ESCAPE in body
    if kind == "batch":
        return _parse_batch(document, write_key, received_ns, received, source_id, limits, has_nul)
    event, problems = _convert(
        document,
        size=_measure(document),
        expected=kind,
        has_nul=has_nul,
        base="",
        batch_sent=None,
        received_ns=received_ns,
        received=received,
        source_id=source_id,
        limits=limits,
    )
    parsed = ParsedRequest(write_key=write_key)
    parsed.add(event, problems, document)
    return parsed


def _measure(item: dict) -> int:
    try:
        return len(orjson.dumps(item))
    except orjson.JSONEncodeError:
        # Integers beyond 64 bits (from the exact re-decode); such an event is refused anyway.
        return len(json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode())


def _parse_batch(
    document: dict,
    write_key: str | None,
    received_ns: int,
    received: Timestamp,
    source_id: str,
    limits: Limits,
    has_nul: bool,
) -> ParsedRequest:
    items = document.get("batch")
    if items is None:
        raise RequestRejected(Code.MISSING_FIELD, "batch", "a /v1/batch request needs batch: an array of events")
    if type(items) is not list:
        raise RequestRejected(Code.INVALID_TYPE, "batch", f"batch must be an array of events; got {json_type(items)}")
    too_many = check_event_count(len(items), limits)
    if too_many is not None:
        raise RequestRejected.of(too_many)

    batch_sent = None
    for key in ("sentAt", "sent_at"):
        value = document.get(key)
        if value is not None:
            try:
                batch_sent = parse_timestamp(value)
            except TimestampError as exc:
                raise RequestRejected(Code.INVALID_TIMESTAMP, key, f"{key} {exc}") from None
            break
    shared: dict = {}
    for key, value in document.items():
        if key in _BATCH_ENVELOPE:
            continue
        if key in _SLOTS:
            raise RequestRejected(
                Code.MISPLACED_FIELD,
                key,
                f"{key} belongs on each event inside batch, not on the batch itself: move it into the items",
            )
        shared[key] = value
    shared_context = document.get("context")
    shared_integrations = document.get("integrations")
    for key, value in (("context", shared_context), ("integrations", shared_integrations)):
        if value is not None and type(value) is not dict:
            raise RequestRejected(Code.INVALID_TYPE, key, f"{key} must be an object; got {json_type(value)}")

    parsed = ParsedRequest(write_key=write_key)
    merge = bool(shared or shared_context or shared_integrations)
    # ParsedRequest.add inlined: this loop runs for every event of every batch.
    events, errors, all_errors, message_ids = parsed.events, parsed.errors, parsed.all_errors, parsed.message_ids
    dumps, encode_error = orjson.dumps, orjson.JSONEncodeError
    for index, item in enumerate(items):
        base = f"batch[{index}]"
        if type(item) is not dict:
            problem = FieldError(
                Code.INVALID_TYPE, base, f"each batch item must be an event object; got {json_type(item)}"
            )
            parsed.add(None, (problem,), item)
            continue
        if merge:
            item = _merge(item, shared, shared_context, shared_integrations)
        try:
            size = len(dumps(item))
        except encode_error:
            size = _measure(item)
        event, problems = _convert(
            item,
            size=size,
            expected=None,
            has_nul=has_nul,
            base=base,
            batch_sent=batch_sent,
            received_ns=received_ns,
            received=received,
            source_id=source_id,
            limits=limits,
        )
        if event is not None:
            events.append(event)
            errors.append(None)
            all_errors.append(())
            message_ids.append(event.message_id)
        else:
            parsed.add(None, problems, item)
    return parsed


def _merge(item: dict, shared: dict, context: dict | None, integrations: dict | None) -> dict:
    merged = {**shared, **item} if shared else dict(item)
    for key, defaults in (("context", context), ("integrations", integrations)):
        if defaults:
            own = merged.get(key)
            if own is None:
                merged[key] = defaults
            elif type(own) is dict:
                merged[key] = {**defaults, **own}
            # anything else is the item's own mistake, reported as such
    return merged


def _convert(
    item: dict,
    *,
    size: int,
    expected: str | None,
    has_nul: bool,
    base: str,
    batch_sent: int | None,
    received_ns: int,
    received: Timestamp,
    source_id: str,
    limits: Limits,
) -> tuple[events_pb2.Event | None, tuple[FieldError, ...]]:
    if size > limits.max_event_bytes:
        return None, (check_event_bytes(size, base, limits, measured=_MEASURED),)  # type: ignore[arg-type]

    # One pass over the keys: each value is checked and converted where it is met (this is the hot loop).
    values: list = list(_UNSET)
    spelled: list[str] | None = None  # the client's spelling of each field, once it used a snake_case alias
    extra: dict | None = None
    errors: list[FieldError] = []
    slots = _SLOTS
    for key, value in item.items():
        slot = slots.get(key)
        if slot is None:
            if key == GENERATED_MESSAGE_ID_KEY:
                errors.append(reserved_field_error(join(base, key)))
            if extra is None:
                extra = {}
            extra[key] = value
            continue
        if value is None or slot >= _RECEIVED_AT:
            continue
        if key != _CAMEL[slot] and not values[slot]:
            # Name the field as the client did, in errors found here and by validation later.
            if spelled is None:
                spelled = list(_CAMEL)
            spelled[slot] = key
        kind = type(value)
        if slot < _TYPE:
            if kind is not str:
                if kind is int and slot <= _GROUP_ID:
                    value = str(value)
                else:
                    errors.append(_not_a_string(base, key, value, slot <= _GROUP_ID))
                    continue
            if not value:
                continue
        elif slot == _TYPE:
            pass
        elif slot <= _CONTEXT:
            if kind is not dict:
                errors.append(
                    FieldError(
                        Code.INVALID_TYPE,
                        join(base, key),
                        f"{key} must be an object ({{...}}); got {described(value)}",
                    )
                )
                continue
        else:
            try:
                value = parse_timestamp(value)
            except TimestampError as exc:
                errors.append(FieldError(Code.INVALID_TIMESTAMP, join(base, key), f"{key} {exc}"))
                continue
        first = values[slot]
        if first:
            if first != value:
                first_key = spelled[slot] if spelled is not None else _CAMEL[slot]
                errors.append(_conflict(base, first_key, key, _CAMEL[slot], first, value))
            continue
        values[slot] = value

    said = values[_TYPE]
    event_type = _TYPES.get(said, 0) if expected is None and type(said) is str else 0
    if not event_type:  # sent with the endpoint's type, or another case _event_type sorts out and names
        event_type = _event_type(said, expected, base, spelled, errors)
    message_id = values[_MESSAGE_ID]
    if not message_id:
        message_id = new_message_id()
        if extra is None:
            extra = {}
        extra[GENERATED_MESSAGE_ID_KEY] = True
    client_ns = values[_ORIGINAL_TIMESTAMP]
    # Both sent: a replay of a Segment archive or warehouse row, whose `timestamp` is already corrected
    # (SDKs send one or the other). It is the event's time as it is, never later than the arrival.
    replayed_ns = values[_TIMESTAMP] if client_ns is not None else None
    if client_ns is None:
        client_ns = values[_TIMESTAMP]
    sent_ns = values[_SENT_AT]
    if sent_ns is None:
        sent_ns = batch_sent

    # The context's typed fields go into the constructor (context.py); its Structs are filled below.
    context_traits = context_rest = None
    context = values[_CONTEXT]
    if context:
        context, context_traits, context_rest = context_parts(context)
    # Each argument costs upb a field lookup even when it is "" (unset), a third of the constructor's time
    # for a track call: the four string fields most events leave empty are passed only when one is set.
    if values[_PREVIOUS_ID] or values[_GROUP_ID] or values[_NAME] or values[_CATEGORY]:
        event = events_pb2.Event(
            context=context or None,
            message_id=message_id,
            type=event_type,
            user_id=values[_USER_ID],
            anonymous_id=values[_ANONYMOUS_ID],
            previous_id=values[_PREVIOUS_ID],
            group_id=values[_GROUP_ID],
            event=values[_EVENT],
            name=values[_NAME],
            category=values[_CATEGORY],
            source_id=source_id,
            received_at=received,
        )
    else:
        event = events_pb2.Event(
            context=context or None,
            message_id=message_id,
            type=event_type,
            user_id=values[_USER_ID],
            anonymous_id=values[_ANONYMOUS_ID],
            event=values[_EVENT],
            source_id=source_id,
            received_at=received,
        )
    max_depth = limits.max_depth
    value = values[_PROPERTIES]
    if value:
        problem = fill_struct(
            event.properties, value, depth=2, path=_path(base, spelled, _PROPERTIES), max_depth=max_depth
        )
        if problem is not None:
            errors.append(problem)
    value = values[_TRAITS]
    if value:
        # Reserved traits under one name each (traits.py): a person's, a group's; other calls' as sent.
        if event_type == IDENTIFY:
            value = person_dict(value)
        elif event_type == GROUP:
            value = group_dict(value)
        problem = fill_struct(event.traits, value, depth=2, path=_path(base, spelled, _TRAITS), max_depth=max_depth)
        if problem is not None:
            errors.append(problem)
    value = values[_INTEGRATIONS]
    if value:
        problem = fill_struct(
            event.integrations, value, depth=2, path=_path(base, spelled, _INTEGRATIONS), max_depth=max_depth
        )
        if problem is not None:
            errors.append(problem)
    if context_traits or context_rest:
        if context_traits:
            context_traits = person_dict(context_traits)
        problem = fill_context_structs(
            event.context, context_traits, context_rest, path=_path(base, spelled, _CONTEXT), max_depth=max_depth
        )
        if problem is not None:
            errors.append(problem)
    if extra:
        problem = fill_struct(event.extra, extra, depth=1, path=base, max_depth=max_depth)
        if problem is not None:
            errors.append(problem)
    if has_nul:
        errors.extend(struct_problems(event, base=base, json_paths=True, max_depth=None))
    if event_type == IDENTIFY and values[_TRAITS] is None and event.context.HasField("traits"):
        event.traits.CopyFrom(event.context.traits)

    # set_ns inlined (three Timestamps an event).
    if sent_ns is not None:
        stamp = event.sent_at
        stamp.seconds, stamp.nanos = divmod(sent_ns, NANOS)
    stamp = event.timestamp
    if client_ns is None:
        stamp.seconds, stamp.nanos = divmod(received_ns, NANOS)
    else:
        original = event.original_timestamp
        original.seconds, original.nanos = divmod(client_ns, NANOS)
        try:
            if replayed_ns is not None:
                at = corrected_ns(received_at=received_ns, sent_at=None, client_time=replayed_ns)
            else:
                at = corrected_ns(received_at=received_ns, sent_at=sent_ns, client_time=client_ns)
            stamp.seconds, stamp.nanos = divmod(at, NANOS)
        except TimestampError as exc:
            errors.append(FieldError(Code.INVALID_TIMESTAMP, _path(base, spelled, _TIMESTAMP), str(exc)))

    plain = not errors and _plainly_valid(event_type, message_id, values, context, limits)
    if plain and not has_nul:  # the common event
        return event, ()
    names = JSON_NAMES
    if spelled is not None:
        names = {**JSON_NAMES, **{_PROTO[slot]: spelled[slot] for slot in range(len(_CAMEL))}}
    problems = [] if plain else validate_event(event, limits=limits, base=base, names=names)
    if not plain and event.context.HasField("consent"):
        problems += unnamed_consent(event.context.consent, base=base, json_paths=True)
    if has_nul:
        problems += id_problems(event, base=base, names=names)
    if errors:
        # One problem per field, the first found: a field that could not be read also looks "missing" to
        # validation, and a conflicting spelling may be mistyped too.
        seen: set[str] = set()
        unique = []
        for problem in (*errors, *problems):
            if problem.field not in seen:
                seen.add(problem.field)
                unique.append(problem)
        return None, tuple(unique)
    if problems:
        return None, tuple(problems)
    return event, ()


def _plainly_valid(event_type: int, message_id: str, values: list, context: dict | None, limits: Limits) -> bool:
    """True only when `validate_event` would find nothing wrong, judged on the Python values the event was
    built from instead of reading each field back from the protobuf (the common event: validation is then
    skipped). False means "look closer": validate_event finds and names the problems, if any."""
    if (
        not message_id
        or len(message_id) > limits.max_message_id_chars
        or not message_id.isprintable()  # storable.message_id_problem's quick test
        or message_id != message_id.strip()
    ):
        return False
    user_id, anonymous_id, previous_id, group_id = values[_USER_ID : _GROUP_ID + 1]
    max_id = limits.max_id_chars
    if len(user_id) > max_id or len(anonymous_id) > max_id or len(previous_id) > max_id or len(group_id) > max_id:
        return False
    if context and len(context.get("group_id", "")) > max_id:  # context_parts' typed fields
        return False
    if context and (consent := context.get("consent")) and any("" in names for names in consent.values()):
        return False  # a consent decision without a name (storable.unnamed_consent)
    if event_type == TRACK:
        name = values[_EVENT]
        return bool((user_id or anonymous_id) and name.strip() and len(name) <= limits.max_event_name_chars)
    if event_type == ALIAS:
        return bool(user_id and previous_id)
    if event_type == GROUP:
        return bool((user_id or anonymous_id) and group_id)
    return bool(event_type and (user_id or anonymous_id))


def _path(base: str, spelled: list[str] | None, slot: int) -> str:
    return join(base, spelled[slot] if spelled is not None else _CAMEL[slot])


def _not_a_string(base: str, key: str, value: object, is_id: bool) -> FieldError:
    wanted = "a string (or an integer)" if is_id else "a string"
    return FieldError(Code.INVALID_TYPE, join(base, key), f"{key} must be {wanted}; got {described(value)}")


def _event_type(
    value: object, expected: str | None, base: str, spelled: list[str] | None, errors: list[FieldError]
) -> int:
    if expected is not None:
        if value is not None and value != expected:
            errors.append(
                FieldError(
                    Code.INVALID_EVENT_TYPE,
                    _path(base, spelled, _TYPE),
                    f"type is {_type_said(value)} but the request went to /v1/{expected}: send it to the matching "
                    "endpoint or /v1/batch, or leave type out",
                )
            )
        return EVENT_TYPES[expected]
    if value is None:
        errors.append(
            FieldError(
                Code.MISSING_FIELD,
                _path(base, spelled, _TYPE),
                "every batch item needs type: one of track, identify, alias, page, screen, group",
            )
        )
        return 0
    event_type = EVENT_TYPES.get(value) if type(value) is str else None  # type: ignore[call-overload]
    if event_type is None:
        errors.append(
            FieldError(
                Code.INVALID_EVENT_TYPE,
                _path(base, spelled, _TYPE),
                f"type is {described(value)}, not an event type: use one of track, identify, alias, page, screen, group",
            )
        )
        return 0
    return event_type


def _type_said(value: object) -> str:
    """An event type is a word of the API and named as sent; anything else only described."""
    return value if type(value) is str and value in EVENT_TYPES else described(value)  # type: ignore[return-value]


def _conflict(base: str, first_key: str, second_key: str, camel: str, first: object, second: object) -> FieldError:
    return FieldError(
        Code.CONFLICTING_FIELDS,
        join(base, second_key),
        f"{first_key} and {second_key} are both set, to different values ({described_pair(first, second)}): "
        f"send only {camel}",
    )
