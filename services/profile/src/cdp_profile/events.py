"""From bus payloads to domain events, and from domain values to protobuf (both directions are hot)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2

from cdp.events.v1 import events_pb2
from cdp_kit.timestamps import NANOS, event_stamp, to_seconds
from cdp_profile.domain import ProfileEvent
from cdp_profile.domain.events import EMPTY, KeptContext

_TYPES = {
    events_pb2.EVENT_TYPE_TRACK: "track",
    events_pb2.EVENT_TYPE_IDENTIFY: "identify",
    events_pb2.EVENT_TYPE_ALIAS: "alias",
    events_pb2.EVENT_TYPE_PAGE: "page",
    events_pb2.EVENT_TYPE_SCREEN: "screen",
    events_pb2.EVENT_TYPE_GROUP: "group",
}


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    # By key: the map's `items()` is collections.abc's view, a Python-level iterator (every event's
    # properties come through here).
    fields = struct.fields
    return {key: value_to_python(fields[key]) for key in fields}


def value_to_python(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        # JSON has one number type; whole numbers come back as ints so "3" items stay 3, not 3.0.
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [value_to_python(v) for v in value.list_value.values]
    return None


def python_to_value(data: Any, out: struct_pb2.Value | None = None) -> struct_pb2.Value:
    value = out if out is not None else struct_pb2.Value()
    if data is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(data, bool):
        value.bool_value = data
    elif isinstance(data, int | float):
        value.number_value = data
    elif isinstance(data, str):
        value.string_value = data
    elif isinstance(data, Mapping):
        value.struct_value.update(_jsonable(data))
    elif isinstance(data, list | tuple):
        value.list_value.extend(_jsonable(list(data)))
    else:
        value.string_value = str(data)
    return value


def _jsonable(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {str(k): _jsonable(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_jsonable(v) for v in data]
    return data


def dict_to_struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(_jsonable(data))
    return struct


def event_time(event: events_pb2.Event) -> float:
    """When the event happened (`cdp_kit.timestamps.event_stamp`: Segment's `timestamp`, never later than its
    arrival), in seconds: a future-dated event stored before the collector capped it is no person's last-seen,
    inside every window and at the head of the timeline for ever."""
    stamp = event_stamp(event)
    return to_seconds(stamp) if stamp is not None else 0.0


def received_time(event: events_pb2.Event) -> float:
    return to_seconds(event.received_at) if event.HasField("received_at") else event_time(event)


def event_id_of(event: events_pb2.Event) -> str:
    """The id every effect is idempotent on: the collector's dedup id (source + message id)."""
    return f"{event.source_id}:{event.message_id}"


# Segment's JSON names of the context objects' fields, as (protobuf field, JSON key); see CONTEXT_FIELDS.
_CONTEXT_OBJECTS = (
    (
        "device",
        "device",
        (
            ("id", "id"),
            ("advertising_id", "advertisingId"),
            ("manufacturer", "manufacturer"),
            ("model", "model"),
            ("name", "name"),
            ("type", "type"),
        ),
    ),
    ("os", "os", (("name", "name"), ("version", "version"))),
    (
        "campaign",
        "campaign",
        (("name", "name"), ("source", "source"), ("medium", "medium"), ("term", "term"), ("content", "content")),
    ),
    (
        "page",
        "page",
        (("path", "path"), ("referrer", "referrer"), ("search", "search"), ("title", "title"), ("url", "url")),
    ),
    ("app", "app", (("name", "name"), ("version", "version"), ("build", "build"), ("namespace", "namespace"))),
)


def _location_dict(location: events_pb2.Location) -> dict[str, Any]:
    values = {}
    for name in ("city", "country", "region"):
        if value := getattr(location, name):
            values[name] = value
    # proto3 doubles have no presence: (0, 0) is "not sent", but one zero coordinate of a pair is real.
    if location.latitude or location.longitude:
        values["latitude"] = location.latitude
        values["longitude"] = location.longitude
    return values


def context_to_dict(context: events_pb2.Context) -> dict[str, Any]:
    """The context as computed traits read it (`$context.<path>`): Segment's key names, non-empty fields only."""
    out: dict[str, Any] = {}
    if context.ip:
        out["ip"] = context.ip
    if context.locale:
        out["locale"] = context.locale
    if context.timezone:
        out["timezone"] = context.timezone
    if context.user_agent:
        out["userAgent"] = context.user_agent
    for field_name, key, fields in _CONTEXT_OBJECTS:
        if context.HasField(field_name):
            message = getattr(context, field_name)
            values = {json_name: value for proto_name, json_name in fields if (value := getattr(message, proto_name))}
            if values:
                out[key] = values
    if context.HasField("location"):
        values = _location_dict(context.location)
        if values:
            out["location"] = values
    return out


_CONTEXT_SCALARS = {"ip": "ip", "locale": "locale", "timezone": "timezone", "userAgent": "user_agent"}
_CONTEXT_OBJECT_FIELDS = {key: (field_name, fields) for field_name, key, fields in _CONTEXT_OBJECTS}


def _context_field(context: events_pb2.Context, top: str) -> Any:
    """One top-level field of `context_to_dict(context)` (None when it would be absent)."""
    scalar = _CONTEXT_SCALARS.get(top)
    if scalar is not None:
        return getattr(context, scalar) or None
    if top == "location":
        return (_location_dict(context.location) or None) if context.HasField("location") else None
    field_name, fields = _CONTEXT_OBJECT_FIELDS[top]
    if not context.HasField(field_name):
        return None
    message = getattr(context, field_name)
    return {json_name: value for proto_name, json_name in fields if (value := getattr(message, proto_name))} or None


def context_kept(context: events_pb2.Context, paths: tuple[tuple[str, ...], ...]) -> Mapping[str, Any]:
    """`context_subset(context_to_dict(context), paths)` without converting the fields `paths` leave out
    (`ComputedTraits.context_keep`: what the definitions read and timeline entries keep); EMPTY if none."""
    out = KeptContext(paths)
    tops: dict[str, Any] = {}
    for path in paths:
        top = path[0]
        if top in tops:
            value = tops[top]
        else:
            value = tops[top] = _context_field(context, top)
        if value is None:
            continue
        if len(path) == 1:
            out[top] = value
            continue
        leaf = value.get(path[1]) if type(value) is dict else None
        if leaf is None:
            continue
        node = out.get(top)
        if node is None:
            node = out[top] = {}
        node[path[1]] = leaf
    return out or EMPTY


def to_profile_event(
    resolved: events_pb2.ResolvedEvent,
    *,
    needs_context: bool = False,
    context_keep: tuple[tuple[str, ...], ...] | None = None,
) -> ProfileEvent:
    """The domain event; its `context` is converted only with `needs_context` (some definition reads it),
    and with `context_keep` only the fields at those paths (what definitions read and timeline entries
    keep: the rest would be converted to be dropped)."""
    return event_and_received(resolved, resolved.event, needs_context, context_keep)[0]


def event_and_received(
    resolved: events_pb2.ResolvedEvent,
    event: events_pb2.Event,
    needs_context: bool,
    context_keep: tuple[tuple[str, ...], ...] | None,
) -> tuple[ProfileEvent, float]:
    """`to_profile_event`, and `received_time` of the event (both read its times: each event of every batch
    comes through here)."""
    kind = _TYPES.get(event.type, "track")
    category = ""
    if kind == "track":
        name = event.event
    elif kind == "page" or kind == "screen":
        name = event.name
        category = event.category
    else:
        name = ""
    consent: dict[str, bool] = {}
    context: Mapping[str, Any] = EMPTY
    if event.HasField("context"):
        event_context = event.context
        if event_context.HasField("consent"):
            for purpose, granted in event_context.consent.category_preferences.items():
                consent[f"purpose:{purpose}"] = granted
            for channel, granted in event_context.consent.channel_preferences.items():
                consent[f"channel:{channel}"] = granted
        if needs_context:
            if context_keep is not None:
                context = context_kept(event_context, context_keep)
            else:
                context = context_to_dict(event_context) or EMPTY
    # event_time and received_time at once (`cdp_kit.timestamps.event_stamp`'s rule)
    if event.HasField("received_at"):
        received_at = event.received_at
        received = received_at.seconds + received_at.nanos / NANOS
        if event.HasField("timestamp"):
            stamp = event.timestamp
            seconds, nanos = stamp.seconds, stamp.nanos
            if seconds * NANOS + nanos > received_at.seconds * NANOS + received_at.nanos:
                at = received
            else:
                at = seconds + nanos / NANOS
        else:
            at = received
    else:
        at = received = event_time(event)
    shared = resolved.shared_with
    source = event.source_id  # read once: each read of a string field makes a new str
    return (
        ProfileEvent(
            f"{source}:{event.message_id}",  # event_id_of
            kind,
            name,
            at,
            source or "unknown",
            (struct_to_dict(event.properties) if event.HasField("properties") else {})
            if not category
            else _page_properties(event, category),
            struct_to_dict(event.traits) if event.HasField("traits") else {},
            consent,
            tuple(resolved.identifiers),
            event.group_id,
            context,
            event.user_id,
            event.anonymous_id,
            dict(shared) if shared else EMPTY,
        ),
        received,
    )


def _page_properties(event: events_pb2.Event, category: str) -> dict[str, Any]:
    """A page's or screen's properties with its top-level `category` (the Python and Ruby SDKs' `category`
    argument) among them, as Segment's facade gives a page's properties to every destination: the call's
    category wins over a `category` property. So the timeline entry keeps it (its `name` has a field of its
    own), and a computed trait's `where` can read it like any property."""
    properties = struct_to_dict(event.properties) if event.HasField("properties") else {}
    properties["category"] = category
    return properties
