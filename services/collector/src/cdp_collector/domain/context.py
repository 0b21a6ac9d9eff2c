"""Segment's `context` object → the typed `cdp.events.v1.Context`.

Context is metadata SDKs fill in by themselves (device, app, library, page, campaign, …), and real SDKs
disagree on details: `app.build` as a number, extra `utm_*` keys in `campaign`, a `device` given as a
string. Rejecting the event for that would punish users for their SDK, and dropping the value would lose
data, so the rule is:

- a known key whose value fits the typed field goes there; `null` for a known key means "not set", as in
  the SDKs, which send nulls for everything they do not know (an unknown key's null is kept, like any value);
- anything else — unknown keys, and known keys whose value does not fit (wrong type, an int32 that
  overflows) — is kept exactly as sent in `Context.extra`, at the same place: `context.campaign.utm_id`
  lands in `extra["campaign"]["utm_id"]`, a string `context.device` in `extra["device"]`.

So `Context` plus `Context.extra` always hold everything the client sent. The only errors context can
cause are the ones every Struct can (nesting, integers beyond 2^53) and `context` not being an object.

snake_case spellings (`user_agent`, `advertising_id`, `category_preferences`, …) are read as aliases; when
both spellings are sent the camelCase one wins and the snake_case one is kept in `extra`.
"""

from __future__ import annotations

from cdp.events.v1 import events_pb2
from cdp_collector.domain.errors import FieldError, join
from cdp_collector.domain.structs import MAX_SAFE_INTEGER, fill_struct

# How a JSON value must look to go into a typed field.
_STRING, _BOOL, _DOUBLE, _INT32, _ID = range(5)
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _fields(*specs: tuple[str, str, int], **aliases: str) -> dict[str, tuple[str, int, str | None]]:
    """client key → (proto attribute, wanted type, the camelCase key an alias yields to, or None).

    The tables are plain dicts, never changed after import: every context key of every event is looked up
    in them, and a MappingProxyType's `get` costs half as much again as a dict's."""
    table = {client: (attr, kind, None) for client, attr, kind in specs}
    for alias, client in aliases.items():
        attr, kind, _ = table[client]
        table[alias] = (attr, kind, client)
    return table


_DEVICE = _fields(
    ("id", "id", _STRING),
    ("advertisingId", "advertising_id", _STRING),
    ("adTrackingEnabled", "ad_tracking_enabled", _BOOL),
    ("manufacturer", "manufacturer", _STRING),
    ("model", "model", _STRING),
    ("name", "name", _STRING),
    ("type", "type", _STRING),
    ("token", "token", _STRING),
    advertising_id="advertisingId",
    ad_tracking_enabled="adTrackingEnabled",
)
_CAMPAIGN = _fields(*((name, name, _STRING) for name in ("name", "source", "medium", "term", "content")))
_LIBRARY = _fields(("name", "name", _STRING), ("version", "version", _STRING))
_PAGE = _fields(*((name, name, _STRING) for name in ("path", "referrer", "search", "title", "url")))
_APP = _fields(*((name, name, _STRING) for name in ("name", "version", "build", "namespace")))
_OS = _fields(("name", "name", _STRING), ("version", "version", _STRING))
_LOCATION = _fields(
    ("city", "city", _STRING),
    ("country", "country", _STRING),
    ("latitude", "latitude", _DOUBLE),
    ("longitude", "longitude", _DOUBLE),
    ("region", "region", _STRING),
    ("speed", "speed", _DOUBLE),
)
_NETWORK = _fields(
    ("bluetooth", "bluetooth", _BOOL),
    ("carrier", "carrier", _STRING),
    ("cellular", "cellular", _BOOL),
    ("wifi", "wifi", _BOOL),
)
_SCREEN = _fields(("width", "width", _INT32), ("height", "height", _INT32), ("density", "density", _DOUBLE))

# context key → (Context attribute, table of its fields)
_OBJECTS = {
    "device": ("device", _DEVICE),
    "campaign": ("campaign", _CAMPAIGN),
    "library": ("library", _LIBRARY),
    "page": ("page", _PAGE),
    "app": ("app", _APP),
    "os": ("os", _OS),
    "location": ("location", _LOCATION),
    "network": ("network", _NETWORK),
    "screen": ("screen", _SCREEN),
}
_SCALARS = _fields(
    ("ip", "ip", _STRING),
    ("userAgent", "user_agent", _STRING),
    ("locale", "locale", _STRING),
    ("timezone", "timezone", _STRING),
    ("groupId", "group_id", _ID),
    user_agent="userAgent",
    group_id="groupId",
)
_PREFERENCES = _fields(
    ("categoryPreferences", "category_preferences", _BOOL),
    ("channelPreferences", "channel_preferences", _BOOL),
    category_preferences="categoryPreferences",
    channel_preferences="channelPreferences",
)


def fill_context(context: events_pb2.Context, source: dict, *, path: str, max_depth: int) -> FieldError | None:
    """Map the JSON object `source` (the event's `context`, nesting level 2) into `context`."""
    typed, traits, leftovers = context_parts(source)
    if typed:
        context.MergeFrom(events_pb2.Context(**typed))
    return fill_context_structs(context, traits, leftovers, path=path, max_depth=max_depth)


def context_parts(source: dict) -> tuple[dict, dict | None, dict | None]:
    """`source` split three ways: the typed fields as `Context` constructor arguments (sub-messages and
    maps as dicts, only those with something in them), `traits` and what goes to `extra` (None when
    empty). Building the Context in one constructor call costs about half of setting its fields one by one;
    the two Structs are filled after, by `fill_context_structs`."""
    typed: dict = {}
    traits: dict | None = None
    leftovers: dict | None = None
    scalars = _SCALARS
    objects = _OBJECTS
    for key, value in source.items():
        spec = scalars.get(key)
        if spec is not None:
            if value is None:
                continue
            attr, want, yields_to = spec
            fits = value if type(value) is str else _fitting(value, want)
            if fits is not None and (yields_to is None or yields_to not in source):
                typed[attr] = fits
                continue
        elif key in objects:
            if value is None:
                continue
            if type(value) is dict:
                attr, table = objects[key]
                fields, rest = _message_parts(value, table)
                if fields:
                    typed[attr] = fields
                if rest:
                    leftovers = leftovers or {}
                    leftovers[key] = rest
                continue
        elif key == "traits":
            if value is None:
                continue
            if type(value) is dict:
                if value:
                    traits = value
                continue
        elif key == "consent" and (value is None or type(value) is dict):
            if value is None:
                continue
            fields, rest = _consent_parts(value)
            if fields:
                typed["consent"] = fields
            if rest:
                leftovers = leftovers or {}
                leftovers[key] = rest
            continue
        if leftovers is None:
            leftovers = {}
        leftovers[key] = value
    return typed, traits, leftovers


def fill_context_structs(
    context: events_pb2.Context, traits: dict | None, leftovers: dict | None, *, path: str, max_depth: int
) -> FieldError | None:
    """The second half of `fill_context`: `context.traits` and `context.extra` (level 3 and 2), from
    `context_parts`. Returns the first problem (traits' before extra's)."""
    if traits:
        problem = fill_struct(context.traits, traits, depth=3, path=join(path, "traits"), max_depth=max_depth)
        if problem:
            return problem
    if leftovers:
        return fill_struct(context.extra, leftovers, depth=2, path=path, max_depth=max_depth)
    return None


def _message_parts(source: dict, table: dict) -> tuple[dict, dict | None]:
    fields: dict = {}
    rest: dict | None = None
    for key, value in source.items():
        spec = table.get(key)
        if spec is not None:
            if value is None:
                continue
            attr, want, yields_to = spec
            fits = value if want == _STRING and type(value) is str else _fitting(value, want)
            if fits is not None and (yields_to is None or yields_to not in source):
                fields[attr] = fits
                continue
        if rest is None:
            rest = {}
        rest[key] = value
    return fields, rest


def _fitting(value: object, want: int) -> object:
    """`value` as the typed field wants it, or None when it does not fit without changing it."""
    kind = type(value)
    if want == _STRING:
        return value if kind is str else None
    if want == _DOUBLE:
        # A double holds ints exactly only up to 2^53; bigger ones stay as sent in extra (and are refused there).
        if kind is float or (kind is int and -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER):  # type: ignore[operator]
            return value
        return None
    if want == _BOOL:
        return value if kind is bool else None
    if want == _ID:
        # Like the top-level ids: an integer group id is the same id as its decimal string.
        return str(value) if kind is int else None
    # int32 (screen size): 1080.0 is the same number as 1080, so it fits; 1080.5 does not.
    if (kind is int or (kind is float and value.is_integer())) and _INT32_MIN <= value <= _INT32_MAX:  # type: ignore[union-attr,operator]
        return int(value)  # type: ignore[call-overload]
    return None


def _consent_parts(source: dict) -> tuple[dict, dict | None]:
    fields: dict = {}
    rest: dict | None = None
    for key, value in source.items():
        spec = _PREFERENCES.get(key)
        if spec is not None and value is None:
            continue
        if spec is not None and type(value) is dict and (spec[2] is None or spec[2] not in source):
            granted_by_purpose: dict = {}
            odd: dict | None = None
            for purpose, granted in value.items():
                if type(granted) is bool:
                    granted_by_purpose[purpose] = granted
                else:
                    odd = odd or {}
                    odd[purpose] = granted
            if granted_by_purpose:
                fields[spec[0]] = granted_by_purpose
            if odd:
                rest = rest or {}
                rest[key] = odd
            continue
        rest = rest or {}
        rest[key] = value
    return fields, rest
