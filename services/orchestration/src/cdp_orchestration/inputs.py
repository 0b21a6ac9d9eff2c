"""What reaches `orchestration.in.<p>`, decoded: one `Input` per thing that happened to one person.

`decode(stream, what, data, at)` reads a message by where it came from (`streams.kind_of`): resolved events,
segment changes (with the time of the profile change they were decided on) and profile changes (with
their time) (batches: one Input each), fired timers (instance timers and
per-person wake timers, scheduled-entry slots), and the API's commands (enroll, exit, approve, reject,
migrate, arm; forget: a privacy deletion; handover and adopt: a merge, restore and adopt: an unmerge,
`merges.py`). A profile change is (flat field updates, removed, cause, persons merged into it, the person
it was split from by an unmerge or "", the ids of the events it applied). `at` is the
message's stream time, so a redelivered message is applied at the time it was first stored.

A resolved event is a `ResolvedInput`: its id, name and the identifiers identity linked are read at once;
its type and time (`event_time`: never later than when the collector received it) when asked for, and its
properties and context (most of what decoding an event cost) only when something asks for them
(`ResolvedInput.event()`). Most events reach persons no instance waits on and no journey enters
on them: for those only the identifiers are kept (`engine.py`). A payload that can never be read is still
rejected here, as when everything was read at once: the one thing reading properties or context can
refuse is a number that is not finite, and a message whose bytes could hold one (`_maybe_non_finite`) is
read whole before it is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
from google.protobuf import descriptor, json_format, struct_pb2

from cdp.events.v1 import events_pb2
from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2
from cdp_kit.bus import subjects
from cdp_kit.engine import Reject
from cdp_kit.profile_fields import COMPUTED, CONSENT, SCORES, TRAITS, value_to_python
from cdp_kit.timestamps import NANOS, event_stamp, to_seconds
from cdp_orchestration.domain.view import Event

if TYPE_CHECKING:
    from cdp_orchestration.reads import Keep


class Input(NamedTuple):
    """One thing that happened to one person, at `at` (the message's stream time). A tuple: one is made
    for every event and profile change, and a frozen dataclass costs twice as much to make."""

    # event | segment | profile | timer | wake | slot | enroll | exit | approve | reject | migrate | arm
    kind: str
    person_id: str
    at: float
    data: Any = None


COMMANDS = frozenset(
    {"enroll", "exit", "approve", "reject", "migrate", "arm", "forget", "handover", "adopt", "restore"}
)


def decode(stream: str, what: str, data: bytes, at: float, keep: Keep | None = None) -> list[Input]:
    """The inputs one message carries; `Reject` for one that can never be applied. `keep`: the computed traits
    and scores a profile change's updates keep (`reads.py`; None: every field)."""
    try:
        if stream == subjects.EVENTS_RESOLVED:
            batch = events_pb2.ResolvedEventBatch.FromString(data)
            read_now = _maybe_non_finite(data)
            return [Input("event", r.person_id, at, ResolvedInput(r, read_now)) for r in batch.events if r.person_id]
        if stream == subjects.SEGMENTS:
            batch = segmentation_pb2.SegmentEventBatch.FromString(data)
            return [
                Input("segment", e.person_id, at, (e.id, e.segment_id, e.entered, _change_time(e), e.reason))
                for e in batch.events
            ]
        if stream == subjects.PROFILES:
            batch = profile_pb2.ProfileChangedBatch.FromString(data)
            changes = []
            for c in batch.changes:
                # Each submessage or repeated field read makes a Python object: read once each. A slice is a
                # list, made in C; most changes merge nobody, and score changes list no event.
                stamp, event_ids = c.at, c.event_ids
                changes.append(
                    Input(
                        "profile",
                        c.person_id,
                        at,
                        (
                            change_updates(c, keep),
                            c.removed,
                            c.cause,
                            c.merged[:] if c.merged else [],
                            c.split_from,
                            event_ids[:] if event_ids else [],
                            stamp.seconds + stamp.nanos / NANOS,  # `to_seconds`, inline
                        ),
                    )
                )
            return changes
        if stream == subjects.ORCHESTRATION_TIMERS:
            body = orjson.loads(data)
            kind = "wake" if "w" in body else "slot" if "s" in body else "timer"
            return [Input(kind, body["p"], at, body)]
        if stream == "command":
            if what not in COMMANDS:
                raise Reject("unknown_command", "Cdp-Command", f"not one of {', '.join(sorted(COMMANDS))}")
            body = orjson.loads(data)
            return [Input(what, body["person_id"], at, body)]
    except Reject:
        raise
    except Exception as exc:  # a payload that is not what its stream carries can never be applied
        raise Reject(
            "invalid_payload", stream or "headers", f"not a {stream or 'known'} message: {type(exc).__name__}"
        ) from None
    raise Reject("unknown_input", "headers", "neither sourced from a known stream nor an API command")


def change_updates(change: profile_pb2.ProfileChanged, keep: Keep | None = None) -> dict[str, Any]:
    """The flat field updates a profile change carries (None: the field is gone), the same, in the same order,
    as `cdp_kit.profile_fields.change_fields` gives them. Every profile change is read here, most of them
    moving a few computed traits or scores: a map is read key by key (its `items()` is the generic Python
    mapping view, about twice as slow), and a map left empty is not visited. With `keep`, only the computed
    traits and scores it names (a name not kept is not read at all)."""
    updates: dict[str, Any] = {}
    kept_computed = keep.computed if keep is not None else None
    kept_scores = keep.scores if keep is not None else None
    computed = change.computed if kept_computed is None or kept_computed else None  # none kept: not read
    for prefix, values, kept in ((_COMPUTED, computed, kept_computed), (_TRAITS, change.traits, None)):
        if values:
            for name in values if kept is None else [n for n in kept if n in values]:
                value = values[name]
                kind = value.WhichOneof("kind")
                if kind == "number_value":
                    updates[prefix + name] = value.number_value
                elif kind == "string_value":
                    updates[prefix + name] = value.string_value
                else:
                    updates[prefix + name] = value_to_python(value)
    consent = change.consent
    if consent:
        for key in consent:
            updates[_CONSENT + key] = consent[key]
    scores = change.scores
    if scores:
        for name in scores if kept_scores is None else [n for n in kept_scores if n in scores]:
            updates[_SCORES + name] = scores[name]
    return updates


_TRAITS, _COMPUTED, _CONSENT, _SCORES = (root + "." for root in (TRAITS, COMPUTED, CONSENT, SCORES))


# The causes of a segment change that are a profile change (segmentation's `reason`): its `at` is then that
# change's time, which orchestration gets too (`ProfileChanged.at`), from another source.
_PROFILE_CAUSES = frozenset({"event", "api", "merge", "unmerge", "expiry", "backfill", "score"})


def _change_time(event: segmentation_pb2.SegmentEvent) -> float:
    """The time of the profile change a segment change was decided on (0: it was not one: a timer, another
    segment, a definition changed)."""
    return to_seconds(event.at) if event.reason in _PROFILE_CAUSES and event.HasField("at") else 0.0


# A double that is not finite (NaN, infinity) has all eleven exponent bits set; stored little-endian, its
# last two bytes are 0xF0-0xFF then 0x7F or 0xFF. Text (UTF-8) never holds that pair, so a message without
# it holds no such number, and its properties and context can be read later without a refusal.
def _maybe_non_finite(data: bytes) -> bool:
    """Whether `data` holds a byte 0xF0-0xFF followed by 0x7F or 0xFF. Each second byte is found by
    `bytes.find` (memchr): a few an event at most, where a regular expression testing every position
    cost ~5 µs an event, more than reading the rest of it."""
    for second in _SECOND_BYTES:
        at = data.find(second, 1)
        while at > 0:
            if data[at - 1] >= 0xF0:
                return True
            at = data.find(second, at + 1)
    return False


_SECOND_BYTES = (b"\x7f", b"\xff")


class ResolvedInput:
    """A resolved event as the engine gets it: id, name and identifiers at once; its time and type
    (`at`, `type`) when asked for, and the `Event` with properties and context (`event()`) when it is
    first asked for, then kept. Most events give the engine their identifiers only."""

    __slots__ = ("_event", "_resolved", "anonymous_id", "event_id", "name", "source_id", "user_id")

    def __init__(self, resolved: events_pb2.ResolvedEvent, read_now: bool = False) -> None:
        message = resolved.event
        self.event_id = message.message_id
        self.source_id = message.source_id
        self.name = message.event or message.name
        self.user_id, self.anonymous_id = message.user_id, message.anonymous_id
        if resolved.dropped:  # identity left some out: keep only those it linked (`resolved_event`)
            self.user_id = _linked(resolved, "user_id", self.user_id)
            self.anonymous_id = _linked(resolved, "anonymous_id", self.anonymous_id)
        self._resolved: events_pb2.ResolvedEvent | None = resolved
        self._event: Event | None = None
        if read_now:
            self.event()

    def event(self) -> Event:
        if self._event is None:
            assert self._resolved is not None
            self._event = resolved_event(self._resolved)
            self._resolved = None  # the message (and the batch it is part of) can go
        return self._event

    @property
    def at(self) -> float:
        """When the event happened (`event_time`)."""
        if self._event is not None:
            return self._event.at
        assert self._resolved is not None
        return event_time(self._resolved.event)

    @property
    def type(self) -> str:
        if self._event is not None:
            return self._event.type
        assert self._resolved is not None
        return _type_name(self._resolved.event.type)

    @property
    def profile_id(self) -> str:
        """The id the profile applies the event under and lists in its change (`cdp_profile.events.event_id_of`:
        the collector's dedup id)."""
        return f"{self.source_id}:{self.event_id}"

    @property
    def properties(self) -> Mapping[str, Any]:
        return self.event().properties

    @property
    def context(self) -> Mapping[str, Any]:
        return self.event().context


def resolved_event(resolved: events_pb2.ResolvedEvent) -> Event:
    """The event, keeping only the identifiers identity linked to the person: one it left out (quarantined,
    blocked, over a limit) would not lead an outcome event back to them."""
    found = event(resolved.event)
    if not resolved.dropped:  # most events: nothing left out
        return found
    user_id = _linked(resolved, "user_id", found.user_id)
    anonymous_id = _linked(resolved, "anonymous_id", found.anonymous_id)
    if (user_id, anonymous_id) != (found.user_id, found.anonymous_id):
        found = replace(found, user_id=user_id, anonymous_id=anonymous_id)
    return found


def _linked(resolved: events_pb2.ResolvedEvent, kind: str, value: str) -> str:
    """The event's own `kind` identifier, or "" when identity left that very value out. Another value of
    the kind left out (an alias's previous user id, refused for the one-user-id limit) says nothing of the
    event's own, which identity linked."""
    if value and any(d.type == kind and d.value in (value, value.strip()) for d in resolved.dropped):
        return ""
    return value


def event(message: events_pb2.Event) -> Event:
    """A resolved event as the domain sees it (its id `<source id>:<messageId>`, name, type, time, properties,
    context)."""
    type_name = _type_name(message.type)
    properties = struct_dict(message.properties) if message.HasField("properties") else {}
    context = context_dict(message.context) if message.HasField("context") else {}
    return Event(
        f"{message.source_id}:{message.message_id}",  # the collector's dedup id, as `ResolvedInput.profile_id`
        message.event or message.name,
        event_time(message),
        type_name,
        properties,
        context,
        user_id=message.user_id,
        anonymous_id=message.anonymous_id,
        message_id=message.message_id,
    )


def event_time(message: events_pb2.Event) -> float:
    """When the event happened (`cdp_kit.timestamps.event_stamp`: never later than its arrival), in seconds to
    the microsecond. Capped, an event stored with a future date is no watched event's `last_seen` for ever
    (a suppression that never lapses), no goal's `converted_at` and no instance's trigger time."""
    stamp = event_stamp(message)
    return stamp.ToMicroseconds() / 1e6 if stamp is not None else 0.0


# EventType number -> the name the domain uses ("track"), filled as types are met.
_TYPE_NAMES: dict[int, str] = {}


def _type_name(number: int) -> str:
    found = _TYPE_NAMES.get(number)
    if found is None:
        found = _TYPE_NAMES[number] = events_pb2.EventType.Name(number).removeprefix("EVENT_TYPE_").lower()
    return found


def context_dict(context: events_pb2.Context) -> dict[str, Any]:
    """An event's context as `json_format.MessageToDict(context, preserving_proto_field_name=True)` gives
    it (the fields set, by proto name; doubles that are not finite as "NaN" / "Infinity" / "-Infinity"),
    read field by field from the fields set: json_format's generic printer cost ~40 µs an event, the
    largest part of decoding one. A field of a kind this reader does not know, or anything it cannot
    convert, goes to json_format for the whole context, so the result (or the error) is json_format's."""
    try:
        return _message_dict(context)
    except Exception:
        return json_format.MessageToDict(context, preserving_proto_field_name=True)


_FD = descriptor.FieldDescriptor
_AS_IS = frozenset(
    {
        _FD.TYPE_STRING,
        _FD.TYPE_BOOL,
        _FD.TYPE_INT32,
        _FD.TYPE_SINT32,
        _FD.TYPE_SFIXED32,
        _FD.TYPE_UINT32,
        _FD.TYPE_FIXED32,
    }
)
_STRUCT = struct_pb2.Struct.DESCRIPTOR.full_name


class _Unknown(Exception):
    """A field this reader leaves to json_format."""


def _message_dict(message: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fd, value in message.ListFields():
        how = _PLANS.get(fd)
        if how is None:
            how = _PLANS[fd] = _plan(fd)
        if how is _AS_IS_VALUE:
            out[fd.name] = value
        elif how is _DOUBLE:
            out[fd.name] = value if math.isfinite(value) else _NON_FINITE[repr(value)]
        elif how is _MAP:
            out[fd.name] = dict(value)
        elif how is _STRUCT_VALUE:
            out[fd.name] = struct_dict(value)
        elif how is _NESTED:
            out[fd.name] = _message_dict(value)
        else:
            raise _Unknown(fd.name)
    return out


# How a field is read, decided once per field descriptor.
_AS_IS_VALUE, _DOUBLE, _MAP, _STRUCT_VALUE, _NESTED, _UNKNOWN = "as is", "double", "map", "struct", "nested", "unknown"
_PLANS: dict[Any, str] = {}


def _plan(fd: Any) -> str:
    kind = fd.type
    if kind != _FD.TYPE_MESSAGE:
        if fd.is_repeated:
            return _UNKNOWN
        return _AS_IS_VALUE if kind in _AS_IS else _DOUBLE if kind == _FD.TYPE_DOUBLE else _UNKNOWN
    nested = fd.message_type
    if nested.GetOptions().map_entry:
        key, value = nested.fields_by_name["key"], nested.fields_by_name["value"]
        return _MAP if key.type == _FD.TYPE_STRING and value.type in _AS_IS else _UNKNOWN
    if fd.is_repeated:
        return _UNKNOWN
    if nested.full_name == _STRUCT:
        return _STRUCT_VALUE
    # Another well-known type (Timestamp, wrappers) has a JSON form of its own: json_format's.
    return _NESTED if nested.file.package.startswith("cdp.") else _UNKNOWN


_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def struct_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A `Struct` as plain Python, as `json_format.MessageToDict` gives it (numbers as floats, null as None;
    a NaN or infinite number is refused the same way), without its generic per-field machinery: every
    event's properties go through here."""
    return {key: _plain(value) for key, value in struct.fields.items()}


def _plain(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise ValueError("a Value.number_value is not finite")
        return number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_dict(value.struct_value)
    if kind == "list_value":
        return [_plain(item) for item in value.list_value.values]
    return None
