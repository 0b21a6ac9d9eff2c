"""Computed traits are configuration, not code: a definition names an operation over matching events.

    {"name": "orders_30d", "op": "count", "event_names": ["Order Completed"], "window": "30d"}
    {"name": "revenue", "op": "sum", "event_names": ["Order Completed"], "property": "total"}
    {"name": "favourite_category", "op": "most_frequent", "event_type": "page", "property": "category",
     "where": {"site": ["shop", "outlet"]}}

An event matches when its type is `event_type` (or that is "any"), its name is one of `event_names` (or
that is empty; an event the platform published, like identity's "Identifier Shared", only when it is one of
them: it is not the person's activity, so a trait over any event does not count it), and every `where` path holds what is asked there: a value (equal to it), a list (one of
them; null matches a missing value too), or an operator object, all of whose operators must hold:

    {"total": {"$gt": 50, "$lte": 100}}      {"$context.page.path": {"$starts_with": "/pricing"}}
    {"plan": {"$in": ["pro", "team"]}}       {"tags": {"$contains": "vip"}}      {"coupon": {"$exists": true}}

    $eq, $ne               equal: numbers to numbers (as doubles: 1 == 1.0), strings to strings, booleans
                           to booleans (true is not 1); $ne holds for every present value that is not equal
    $gt, $gte, $lt, $lte   numbers with numbers, strings with strings by code point; false across types
                           and on booleans
    $in                    equal to one of a non-empty list
    $contains              a string holding the operand (a string), or a list holding an element equal to it
    $starts_with           a string starting with the operand (a string)
    $exists                true: a value is there; false: there is none

A missing or null value makes every operator false but {"$exists": false}, and so does a number that is
no finite double (NaN, infinity, an integer beyond 1.8e308). Operands are strings, finite numbers or
booleans; null is none (use $exists). These are the segmentation service's rules too: it compiles event
conditions of segments into computed traits with these filters.

The key "$expr" holds comparisons of numbers computed from the event's paths, every one of which must hold
(the segment language's arithmetic inside an event condition, `properties.total > properties.shipping * 2`):

    {"$expr": [{"$gt": [{"path": "total"}, {"$multiply": [{"path": "shipping"}, 2]}]}]}

Each is one of $eq $ne $gt $gte $lt $lte with two operands; an operand is a finite number, {"path": <a
path, pseudo-paths included>} or one of $add $subtract $multiply $divide with two operands (at most
MAX_EXPRESSION_DEPTH deep). It is arithmetic on doubles, as the language's (`cdp_lang.values.calculate`): a
path without a number (missing, null, a string, a boolean, a list, NaN, infinity), a division by zero and
a result that is no finite double are no value, and a comparison with no value on either side is false
($ne too).

Each `where` entry is compiled once into a predicate (`Operators`, `Expressions`, `_one_of`), so an event
pays for a few comparisons, not for reading the definition.

`property` is a dot path into the event's payload (properties; traits for identify and group events).
Events without a value there do not contribute, and neither do null values; sum, avg, min and max also
skip values that are not finite numbers (booleans are not numbers). For `count`, `property` is optional:
when given, only events that have a value there are counted.

Pseudo-paths read the event itself rather than its payload, in `property`, `compare` and `where` keys
(paths starting with "$" are reserved for them):

    $at                  the event time, epoch seconds (float)
    $hour                the hour of day (0-23) of the event time in the event's `context.timezone` (an IANA
                         name) when that is a valid one, else in UTC
    $context.<path>      Segment's event context (see `events.CONTEXT_FIELDS`), e.g. $context.device.id,
                         $context.location (an object), $context.location.country, $context.ip
    $user_id             the event's userId; missing when empty
    $anonymous_id        the event's anonymousId; missing when empty
    $shared.<type>       how many OTHER persons identity saw with the event's identifiers of that type
                         (device_id, phone, anonymous_id, ...) in the day before it; missing when none

    {"name": "shared_device_accounts_24h", "op": "max", "event_type": "any", "property": "$shared.device_id",
     "event_names": ["Login", "Order Completed", "Identifier Shared"], "window": "24h"}

    {"name": "last_order_at", "op": "max", "event_names": ["Order Completed"], "property": "$at"}
    {"name": "best_send_hour", "op": "most_frequent", "event_type": "any", "property": "$hour"}
    {"name": "devices_24h", "op": "unique_count", "event_type": "any", "property": "$context.device.id",
     "window": "24h"}

Two operations exist for fraud signals:

- `max_speed`: `property` is an object with numeric `latitude` and `longitude` (typically
  $context.location). The value is the highest ground speed, in km/h, between two time-consecutive
  located events: great-circle distance on a 6371 km sphere over the time between them, that time counted
  as at least MIN_SPEED_SECONDS (clock noise must not turn 1 km into 10,000 km/h); identical coordinates
  are 0. With a window, both events of a pair are inside it. Null while fewer than two events are located.
- `mismatch_count`: how many matching events hold non-null scalar values at both `property` and `compare`
  that differ (strings compared case-insensitively after stripping; blank strings are no value; values of
  different JSON types differ, 1 and 1.0 do not). Every event with both values contributes (a match
  counts 0), so the trait shows 0 once something was compared.

    {"name": "max_speed_7d", "op": "max_speed", "event_type": "any", "property": "$context.location",
     "window": "7d"}
    {"name": "geo_mismatch_24h", "op": "mismatch_count", "event_names": ["Order Completed"],
     "property": "card_country", "compare": "$context.location.country", "window": "24h"}

The registry indexes definitions by (event type, event name), so an event costs one dict lookup plus the
definitions that actually match it. Definitions without pseudo-paths are extracted from the payload as
they always were; only those with pseudo-paths pay for `EventScope`.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import re
import reprlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from cdp_kit.durations import format_duration, parse_duration
from cdp_kit.errors import InvalidArgument
from cdp_profile.domain.events import CONTEXT_FIELDS, EVENT_TYPES, TIMELINE_CONTEXT

OPS = (
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "first",
    "last",
    "most_frequent",
    "unique",
    "unique_count",
    "max_speed",
    "mismatch_count",
)
NUMERIC_OPS = frozenset({"sum", "avg", "min", "max"})
TRAIT_EVENT_TYPES = (*sorted(EVENT_TYPES), "any")
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")
_KNOWN_KEYS = ("name", "op", "event_type", "event_names", "property", "where", "window", "compare")
_MATCH_CACHE_LIMIT = 4096
_ZONE_CACHE_LIMIT = 1024

# Pseudo-paths that are one value (nothing after them); `$context` needs a field after it, `$shared` an
# identifier type (identity's type names).
VALUE_PSEUDO_PATHS = ("$at", "$hour", "$user_id", "$anonymous_id")
PSEUDO_PATHS = (*VALUE_PSEUDO_PATHS, "$context", "$shared")
IDENTIFIER_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}\Z")

MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING", "__slots__": ()})()

# A definition is configuration a caller sends: bounded, so one cannot make the service hold, hash, store
# and publish megabytes per trait. Its canonical JSON (what is stored and listed) is at most this long.
MAX_DEFINITION_BYTES = 64 * 1024

# Errors quote what was refused, shortened and at most three levels deep: a value nested a thousand
# levels (a `where` operand is a scalar or a list of them, nothing deeper) must get an error naming its
# field, not a RecursionError from printing it.
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother = 3, 80, 80
_SHOWN.maxlist = _SHOWN.maxdict = _SHOWN.maxtuple = 8


def _shown(value: Any) -> str:
    return _SHOWN.repr(value)


def parse_window(value: Any, field_name: str = "window") -> float | None:
    """Seconds from None (lifetime), 3600, "90s", "15m", "12h", "30d" or "2w"."""
    return None if value is None else parse_duration(value, field_name)


def format_window(seconds: float | None) -> str | float | None:
    return None if seconds is None else format_duration(seconds)


def _parse_path(value: Any, field_name: str) -> tuple[str, ...]:
    if isinstance(value, str) and value.startswith("$"):
        return _parse_pseudo_path(value, field_name)
    if not isinstance(value, str) or not value or any(not part for part in value.split(".")):
        raise InvalidArgument(
            field_name, f"{_shown(value)} is not a property path: use names joined by dots, like 'cart.total'"
        )
    return tuple(value.split("."))


def _parse_pseudo_path(value: str, field_name: str) -> tuple[str, ...]:
    parts = tuple(value.split("."))
    root = parts[0]
    if root not in PSEUDO_PATHS:
        raise InvalidArgument(
            field_name,
            f"{_shown(value)} is not a pseudo-path: use {', '.join(VALUE_PSEUDO_PATHS)}, $context.<field> "
            "or $shared.<identifier type> (paths starting with '$' are reserved for them)",
        )
    if root == "$shared":
        if len(parts) != 2 or not IDENTIFIER_TYPE_RE.match(parts[1]):
            raise InvalidArgument(
                field_name,
                f"{_shown(value)}: $shared needs one identifier type after it, like '$shared.device_id'",
            )
        return parts
    if root != "$context":
        if len(parts) > 1:
            raise InvalidArgument(field_name, f"{_shown(value)}: {root} is one value; use it alone, without '.<field>'")
        return parts
    if len(parts) == 1 or not parts[1]:
        raise InvalidArgument(
            field_name, f"{_shown(value)} names no context field: use e.g. '$context.device.id' or '$context.location'"
        )
    top = parts[1]
    if top not in CONTEXT_FIELDS:
        raise InvalidArgument(
            field_name, f"{_shown(value)}: {_shown(top)} is not a context field; known: {', '.join(CONTEXT_FIELDS)}"
        )
    fields = CONTEXT_FIELDS[top]
    if len(parts) > 2:
        if fields is None:
            raise InvalidArgument(
                field_name, f"{_shown(value)}: $context.{top} is one value; use it without '.<field>'"
            )
        if len(parts) > 3 or parts[2] not in fields:
            raise InvalidArgument(
                field_name, f"{_shown(value)} is not a field of $context.{top}; known: {', '.join(fields)}"
            )
    return parts


def _context_read(path: tuple[str, ...]) -> tuple[str, ...] | None:
    """The context fields a path reads (`$hour` reads the time zone); None when it reads none."""
    if path[0] == "$context":
        return path[1:]
    if path[0] == "$hour":
        return ("timezone",)
    return None


def _is_context_object(path: tuple[str, ...]) -> bool:
    return path[0] == "$context" and len(path) == 2 and CONTEXT_FIELDS[path[1]] is not None


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, bool, int, float))


def dig(payload: Any, path: tuple[str, ...]) -> Any:
    """The value at a dot path, or MISSING. Exceptions are the cheap way to say "not a dict here"."""
    try:
        for key in path:
            payload = payload[key]
    except (KeyError, TypeError, IndexError):
        return MISSING
    return payload


def _equal(a: Any, b: Any) -> bool:
    # JSON equality: booleans are not numbers (True == 1 in Python), but 1 and 1.0 are the same number.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


_zones: dict[str, ZoneInfo | None] = {}


def local_hour(at: float, timezone: Any) -> int:
    """The hour of day (0-23) of epoch time `at` in IANA zone `timezone`; in UTC when that is not a valid zone."""
    zone = None
    if type(timezone) is str and timezone:
        zone = _zones.get(timezone, MISSING)
        if zone is MISSING:
            try:
                zone = ZoneInfo(timezone)
            except (KeyError, ValueError, OSError):  # ZoneInfoNotFoundError is a KeyError
                zone = None
            if len(_zones) >= _ZONE_CACHE_LIMIT:
                _zones.clear()  # time zones are client data: never let the cache grow without bound
            _zones[timezone] = zone
    if zone is not None:
        try:
            return datetime.fromtimestamp(at, zone).hour
        except (OverflowError, OSError, ValueError):
            pass
    return int(at // 3600 % 24)


def _pseudo_at(source: Any) -> Any:
    return source.at


def _pseudo_hour(source: Any) -> Any:
    return local_hour(source.at, source.context.get("timezone"))


def _pseudo_context(source: Any) -> Any:
    return source.context


def _pseudo_user_id(source: Any) -> Any:
    if not source.user_id:
        raise KeyError("$user_id")
    return source.user_id


def _pseudo_anonymous_id(source: Any) -> Any:
    if not source.anonymous_id:
        raise KeyError("$anonymous_id")
    return source.anonymous_id


def _pseudo_shared(source: Any) -> Any:
    return source.shared


_PSEUDO_READERS = {
    "$at": _pseudo_at,
    "$hour": _pseudo_hour,
    "$context": _pseudo_context,
    "$user_id": _pseudo_user_id,
    "$anonymous_id": _pseudo_anonymous_id,
    "$shared": _pseudo_shared,
}


class EventScope:
    """What a definition with pseudo-paths reads: the payload, plus `$at`, `$hour`, `$context`, `$user_id`,
    `$anonymous_id` and `$shared` from `source` (a `ProfileEvent` live, its `TimelineEntry` in backfills and
    merges: both have `at`, `context`, `user_id`, `anonymous_id` and `shared`). Reads like the payload
    mapping would."""

    __slots__ = ("payload", "source")

    def __init__(self, payload: Mapping[str, Any], source: Any) -> None:
        self.payload = payload
        self.source = source

    def __getitem__(self, key: str) -> Any:
        reader = _PSEUDO_READERS.get(key)
        if reader is None:
            return self.payload[key]
        return reader(self.source)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


def _location(value: Any) -> Any:
    """[latitude, longitude] of an object holding them as finite numbers in range, else MISSING."""
    if not isinstance(value, Mapping):
        return MISSING
    lat, lon = value.get("latitude"), value.get("longitude")
    for number in (lat, lon):
        kind = type(number)
        if (kind is not int and kind is not float) or not math.isfinite(number):
            return MISSING
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        return MISSING
    return [lat, lon]


def _comparable(value: Any) -> bool:
    kind = type(value)
    if kind is str:
        return bool(value.strip())
    return kind is bool or kind is int or kind is float


def differs(a: Any, b: Any) -> bool:
    """mismatch_count's rule: strings case-insensitively after stripping, other scalars as JSON values."""
    if type(a) is str and type(b) is str:
        return a.strip().casefold() != b.strip().casefold()
    return not _equal(a, b)


@dataclass(slots=True, frozen=True)
class ComputedTrait:
    """One declared computed trait. The constructor validates and normalises (see `from_dict`)."""

    name: str
    op: str
    event_type: str = "track"
    event_names: tuple[str, ...] = ()
    property: str | None = None
    # path -> allowed value(s) or an operator object; given as a mapping, held as sorted
    # ((path, (value, ...) | Operators), ...) so it hashes.
    where: Any = ()
    window: Any = None  # seconds, or "30d"-style text; held as float seconds, None = lifetime
    compare: str | None = None  # mismatch_count only: the path `property` is compared with
    # Derived once, read per event.
    path: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)
    # (path, predicate) per `where` entry: each compiled once here, called with the value found (or MISSING).
    filters: tuple[tuple[tuple[str, ...], Callable[[Any], bool]], ...] = field(
        default=(), init=False, repr=False, compare=False
    )
    numeric: bool = field(default=False, init=False, repr=False, compare=False)
    compare_path: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)
    # max_speed and mismatch_count turn the value found into their contribution.
    shaped: bool = field(default=False, init=False, repr=False, compare=False)
    # Some path is a pseudo-path: extract from an `EventScope`, not from the bare payload.
    reads_event: bool = field(default=False, init=False, repr=False, compare=False)
    # The context fields the paths read (`$hour` reads the time zone).
    context_paths: tuple[tuple[str, ...], ...] = field(default=(), init=False, repr=False, compare=False)
    # A hash of the canonical definition: a stored computed state remembers it, so a changed definition is
    # never mixed with contributions made under the old one.
    signature: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise InvalidArgument(
                "name",
                f"{_shown(self.name)} is not a valid name: use a lower-case letter, then letters, digits or '_' (64 at most)",
            )
        if self.op not in OPS:
            raise InvalidArgument("op", f"{_shown(self.op)} is not an operation; use one of: {', '.join(OPS)}")
        if self.event_type not in TRAIT_EVENT_TYPES:
            raise InvalidArgument(
                "event_type",
                f"{_shown(self.event_type)} is not an event type; use one of: {', '.join(TRAIT_EVENT_TYPES)}",
            )
        names = self.event_names
        if isinstance(names, str):
            names = (names,)
        if not isinstance(names, (list, tuple)) or any(not isinstance(n, str) or not n for n in names):
            raise InvalidArgument("event_names", f"{_shown(self.event_names)} must be a list of non-empty event names")
        set_(self, "event_names", tuple(sorted(set(names))))
        if self.property is None:
            if self.op != "count":
                raise InvalidArgument("property", f"is required for op {_shown(self.op)}: name the value to aggregate")
        else:
            set_(self, "path", _parse_path(self.property, "property"))
        if self.op == "mismatch_count":
            if self.compare is None:
                raise InvalidArgument(
                    "compare",
                    "is required for op 'mismatch_count': name the path `property` is compared with, "
                    "like '$context.location.country'",
                )
            set_(self, "compare_path", _parse_path(self.compare, "compare"))
            for name, path in (("property", self.path), ("compare", self.compare_path)):
                if _is_context_object(path):
                    raise InvalidArgument(
                        name,
                        f"{'.'.join(path)!r} is an object; compare one of its fields, like '$context.location.country'",
                    )
        elif self.compare is not None:
            raise InvalidArgument(
                "compare", f"{_shown(self.compare)}: only op 'mismatch_count' compares two paths; remove 'compare'"
            )
        if self.op == "max_speed" and (
            self.path[0] in VALUE_PSEUDO_PATHS
            or self.path[0] == "$shared"
            or (self.path[0] == "$context" and not _is_location(self.path))
        ):
            raise InvalidArgument(
                "property",
                f"{_shown(self.property)} holds no latitude and longitude: max_speed reads an object with both, "
                "like '$context.location'",
            )
        set_(self, "where", _normalise_where(self.where))
        set_(self, "filters", tuple((_filter_path(path), _predicate(allowed)) for path, allowed in self.where))
        set_(self, "window", parse_window(self.window))
        set_(self, "numeric", self.op in NUMERIC_OPS)
        set_(self, "shaped", self.op in ("max_speed", "mismatch_count"))
        paths = [self.path, self.compare_path, *(path for path, _ in self.filters)]
        paths.extend(path for _, allowed in self.where if isinstance(allowed, Expressions) for path in allowed.paths)
        set_(self, "reads_event", any(path and path[0].startswith("$") for path in paths))
        reads = {_context_read(path) for path in paths if path}
        set_(self, "context_paths", tuple(sorted(read for read in reads if read is not None)))
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        if len(canonical) > MAX_DEFINITION_BYTES:
            raise InvalidArgument(
                "definition",
                f"{len(canonical)} bytes as JSON (most of it in `where`, `event_names` or a path); "
                f"at most {MAX_DEFINITION_BYTES}",
            )
        set_(self, "signature", hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest())

    @classmethod
    def from_dict(cls, data: Any) -> ComputedTrait:
        if not isinstance(data, Mapping):
            raise InvalidArgument("computed_trait", f"{_shown(data)} must be an object with 'name' and 'op'")
        for key in data:
            if key not in _KNOWN_KEYS:
                raise InvalidArgument(str(key), f"unknown setting; known: {', '.join(_KNOWN_KEYS)}")
        for key in ("name", "op"):
            if key not in data:
                raise InvalidArgument(key, "is required")
        return cls(
            name=data["name"],
            op=data["op"],
            event_type=data.get("event_type", "track"),
            event_names=data.get("event_names", ()),
            property=data.get("property"),
            where=data.get("where", ()),
            window=data.get("window"),
            compare=data.get("compare"),
        )

    def to_dict(self) -> dict[str, Any]:
        document = {
            "name": self.name,
            "op": self.op,
            "event_type": self.event_type,
            "event_names": list(self.event_names),
            "property": self.property,
            "where": {path: _where_document(allowed) for path, allowed in self.where},
            "window": format_window(self.window),
        }
        # Only when set: the signature (a hash of this document) of every other definition stays as it was.
        if self.compare is not None:
            document["compare"] = self.compare
        return document

    def matches_event(self, event_type: str, event_name: str, platform: bool = False) -> bool:
        """Whether an event of this type and name feeds the trait. An event the platform published
        (`platform`, see events.PLATFORM_SOURCES) feeds only a trait that names it in `event_names`."""
        if self.event_type not in ("any", event_type):
            return False
        if platform:
            return event_name in self.event_names
        return not self.event_names or event_name in self.event_names

    def extract(self, payload: Any) -> Any:
        """The contribution an event with this payload makes, or MISSING when it makes none.

        A definition that `reads_event` is given an `EventScope` (payload plus pseudo-paths) instead.
        """
        for path, holds in self.filters:
            if not holds(dig(payload, path)):
                return MISSING
        path = self.path
        if not path:
            return None  # count without property: the event itself is the contribution
        value = payload.get(path[0], MISSING) if len(path) == 1 else dig(payload, path)
        if value is MISSING or value is None:
            return MISSING
        if self.op == "count":
            return None
        if self.numeric:
            kind = type(value)
            if (kind is not int and kind is not float) or not math.isfinite(value):
                return MISSING
        elif self.shaped:
            if self.op == "max_speed":
                return _location(value)
            path = self.compare_path
            other = payload.get(path[0], MISSING) if len(path) == 1 else dig(payload, path)
            if not _comparable(value) or not _comparable(other):
                return MISSING
            return differs(value, other)
        return value


def _is_location(path: tuple[str, ...]) -> bool:
    fields = CONTEXT_FIELDS.get(path[1]) if len(path) == 2 else None
    return fields is not None and "latitude" in fields and "longitude" in fields


# --- where filters ------------------------------------------------------------------------------------------

WHERE_OPERATORS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$contains", "$starts_with", "$exists")
_INF = math.inf
EXPRESSIONS = "$expr"  # the `where` key of comparisons with arithmetic (see the module docstring)
_EXPRESSION_COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "$eq": operator.eq,
    "$ne": operator.ne,
    "$gt": operator.gt,
    "$gte": operator.ge,
    "$lt": operator.lt,
    "$lte": operator.le,
}
ARITHMETIC_OPERATORS = ("$add", "$subtract", "$multiply", "$divide")
# Arithmetic a definition nests at most this deep: far more than the segment language writes (12), and
# little enough that reading one never recurses far.
MAX_EXPRESSION_DEPTH = 32


def _filter_path(path: str) -> tuple[str, ...]:
    """The path a `where` entry's predicate is given the value of: "$expr" reads the whole event."""
    return () if path == EXPRESSIONS else tuple(path.split("."))


def _normalise_where(where: Any) -> tuple[tuple[str, tuple[Any, ...] | Operators | Expressions], ...]:
    if isinstance(where, tuple) and all(isinstance(item, tuple) and len(item) == 2 for item in where):
        where = {path: list(allowed) if isinstance(allowed, tuple) else allowed for path, allowed in where}
    if not isinstance(where, Mapping):
        raise InvalidArgument(
            "where",
            f"{_shown(where)} must be an object of property path -> required value(s) or an object of operators",
        )
    items: list[tuple[str, tuple[Any, ...] | Operators | Expressions]] = []
    for path, allowed in where.items():
        if path == EXPRESSIONS:
            items.append((path, allowed if isinstance(allowed, Expressions) else Expressions(allowed)))
            continue
        _parse_path(path, f"where.{path}")
        if isinstance(allowed, Operators):
            items.append((path, allowed))
            continue
        if isinstance(allowed, Mapping):
            items.append((path, Operators(allowed, path)))
            continue
        values = allowed if isinstance(allowed, list) else [allowed]
        if not values or not all(_is_scalar(v) for v in values):
            raise InvalidArgument(
                f"where.{path}",
                f"{_shown(allowed)} must be a string, number, boolean or null, a non-empty list of them, "
                'or an object of operators like {"$gt": 50}',
            )
        items.append((path, tuple(values)))
    return tuple(sorted(items, key=lambda item: item[0]))


def _where_document(allowed: tuple[Any, ...] | Operators | Expressions) -> Any:
    if isinstance(allowed, Operators | Expressions):
        return allowed.to_dict()
    return allowed[0] if len(allowed) == 1 else list(allowed)


def _predicate(allowed: tuple[Any, ...] | Operators | Expressions) -> Callable[[Any], bool]:
    return allowed.holds if isinstance(allowed, Operators | Expressions) else _one_of(allowed)


def _one_of(allowed: tuple[Any, ...]) -> Callable[[Any], bool]:
    """A plain `where` value: equal to one of `allowed` (booleans apart from numbers, 1 == 1.0); a null among
    them matches a missing or null value too."""
    missing_ok = None in allowed
    booleans = frozenset(a for a in allowed if isinstance(a, bool))
    others = tuple(a for a in allowed if a is not None and not isinstance(a, bool))

    def holds(value: Any) -> bool:
        if value is MISSING or value is None:
            return missing_ok
        if type(value) is bool:
            return value in booleans
        return value in others

    return holds


class Operators:
    """A `where` operator object, like {"$gt": 50, "$lte": 100}: every operator must hold.

    Validated and compiled once into `holds` (the value found, or MISSING -> bool), so an event pays for a
    few comparisons, not for reading the object. Two are equal when their canonical JSON is: 1, 1.0 and
    true stay different operands (Python's == would mix them up), so a changed definition is seen as one.
    """

    __slots__ = ("_key", "holds", "operators")

    def __init__(self, document: Mapping[str, Any], path: str) -> None:
        field_name = f"where.{path}"
        if not document:
            raise InvalidArgument(
                field_name, f"{{}} is an empty operator object: give at least one of {', '.join(WHERE_OPERATORS)}"
            )
        for name in document:
            if name not in WHERE_OPERATORS:
                nested = (
                    ""
                    if isinstance(name, str) and name.startswith("$")
                    else f"; to filter on a nested property, make its dot path the key, like '{path}.{name}'"
                )
                raise InvalidArgument(
                    f"{field_name}.{name}",
                    f"{_shown(name)} is not an operator; use {', '.join(WHERE_OPERATORS)}{nested}",
                )
        self.operators: tuple[tuple[str, Any], ...] = tuple(
            (name, _operand(name, document[name], f"{field_name}.{name}")) for name in sorted(document)
        )
        self.holds = _all_of(tuple(_CHECKS[name](operand) for name, operand in self.operators))
        self._key = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def to_dict(self) -> dict[str, Any]:
        return {name: list(operand) if name == "$in" else operand for name, operand in self.operators}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Operators) and other._key == self._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"Operators({self._key})"


class Expressions:
    """A `where`'s "$expr": comparisons of numbers computed from the event's paths, every one of which must
    hold (see the module docstring).

    Validated and compiled once into `holds` (the event's payload, or its `EventScope` -> bool); `paths` are
    the paths it reads. Kept as written: the comparisons' order and the numbers as given (1 and 1.0 stay
    different operands in its identity, as in `Operators`)."""

    __slots__ = ("_key", "document", "holds", "paths")

    def __init__(self, document: Any, field_name: str = f"where.{EXPRESSIONS}") -> None:
        if not isinstance(document, list | tuple) or not document:
            raise InvalidArgument(
                field_name,
                f'{_shown(document)} must be a non-empty list of comparisons like {{"$gt": [{{"path": "total"}}, 50]}}',
            )
        paths: list[tuple[str, ...]] = []
        checks = []
        for index, item in enumerate(document):
            at = f"{field_name}[{index}]"
            if not isinstance(item, Mapping) or len(item) != 1:
                raise InvalidArgument(
                    at, f'{_shown(item)} must be one comparison like {{"$gt": [{{"path": "total"}}, 50]}}'
                )
            [(name, operands)] = item.items()
            if name not in _EXPRESSION_COMPARISONS:
                raise InvalidArgument(
                    f"{at}.{name}", f"{_shown(name)} is not a comparison; use {', '.join(_EXPRESSION_COMPARISONS)}"
                )
            left, right = _two_operands(operands, f"{at}.{name}", paths, 0)
            checks.append(_compared(_EXPRESSION_COMPARISONS[name], left, right))
        self.document = [dict(item) for item in document]
        self.paths = tuple(paths)
        self.holds = _all_of(tuple(checks))
        self._key = json.dumps(self.document, sort_keys=True, separators=(",", ":"))

    def to_dict(self) -> list[dict[str, Any]]:
        return self.document

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Expressions) and other._key == self._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"Expressions({self._key})"


_Number = Callable[[Any], float | None]


def _two_operands(operands: Any, at: str, paths: list[tuple[str, ...]], depth: int) -> tuple[_Number, _Number]:
    if not isinstance(operands, list | tuple) or len(operands) != 2:
        raise InvalidArgument(at, f'{_shown(operands)} must be a list of two operands, like [{{"path": "total"}}, 2]')
    return _number_of(operands[0], f"{at}[0]", paths, depth), _number_of(operands[1], f"{at}[1]", paths, depth)


def _number_of(operand: Any, at: str, paths: list[tuple[str, ...]], depth: int) -> _Number:
    """An operand of "$expr" compiled to a function of the event: a finite double, or None for no value."""
    if isinstance(operand, Mapping) and len(operand) == 1:
        [(name, value)] = operand.items()
        if name == "path":
            path = _parse_path(value, f"{at}.path")
            paths.append(path)
            return lambda payload: _number(dig(payload, path))
        if name in ARITHMETIC_OPERATORS:
            if depth >= MAX_EXPRESSION_DEPTH:
                raise InvalidArgument(
                    at, f"arithmetic nests at most {MAX_EXPRESSION_DEPTH} levels deep: compute the value elsewhere"
                )
            left, right = _two_operands(value, f"{at}.{name}", paths, depth + 1)
            return _calculation(name, left, right)
        if isinstance(name, str) and name.startswith("$"):
            raise InvalidArgument(
                at, f"{_shown(name)} is not an arithmetic operator; use {', '.join(ARITHMETIC_OPERATORS)}"
            )
    if type(operand) in (int, float) and _number(operand) is not None:
        constant = float(operand)
        return lambda payload: constant
    raise InvalidArgument(
        at,
        f'{_shown(operand)} must be a finite number, {{"path": ...}} or arithmetic like '
        f'{{"$multiply": [{{"path": "shipping"}}, 2]}}',
    )


def _calculation(name: str, left: _Number, right: _Number) -> _Number:
    """`left <name> right` on doubles: None when either is None, for a division by zero and for a result
    that is no finite double (the segment language's `calculate`)."""

    def calculated(payload: Any) -> float | None:
        a = left(payload)
        if a is None:
            return None
        b = right(payload)
        if b is None:
            return None
        if name == "$add":
            result = a + b
        elif name == "$subtract":
            result = a - b
        elif name == "$multiply":
            result = a * b
        elif b == 0.0:
            return None
        else:
            result = a / b
        return result if result - result == 0.0 else None  # x - x is NaN for infinities and NaN

    return calculated


def _compared(compare: Callable[[float, float], bool], left: _Number, right: _Number) -> Callable[[Any], bool]:
    def holds(payload: Any) -> bool:
        a = left(payload)
        if a is None:
            return False
        b = right(payload)
        return b is not None and compare(a, b)

    return holds


def _is_operand(value: Any) -> bool:
    return isinstance(value, (str, bool)) or (isinstance(value, (int, float)) and _number(value) is not None)


def _operand(name: str, operand: Any, field_name: str) -> Any:
    """The operand, validated; `$in`'s list as a tuple. Numbers stay as written (the definition's JSON does not
    change); the checks compare them as doubles."""
    if name == "$exists":
        if not isinstance(operand, bool):
            raise InvalidArgument(
                field_name,
                f'{_shown(operand)} must be true or false ({{"$exists": false}} matches a missing or null value)',
            )
        return operand
    if name == "$starts_with":
        if not isinstance(operand, str):
            raise InvalidArgument(field_name, f"{_shown(operand)} must be a string")
        return operand
    if name == "$in":
        if not isinstance(operand, (list, tuple)) or not operand or not all(_is_operand(v) for v in operand):
            raise InvalidArgument(
                field_name, f"{_shown(operand)} must be a non-empty list of strings, finite numbers or booleans"
            )
        return tuple(operand)
    if operand is None:
        raise InvalidArgument(
            field_name, 'null is not an operand: match a missing or null value with {"$exists": false}'
        )
    if not _is_operand(operand):
        raise InvalidArgument(field_name, f"{_shown(operand)} must be a string, a finite number or a boolean")
    return operand


# Each check is called with whatever is at the path (MISSING, None, any JSON value) and is false for a
# missing or null value, and for a number that is not a finite double (an event's NaN or infinity, or an
# integer too large for a double, counts as missing). These are the segmentation service's rules too.


def _number(value: Any) -> float | None:
    """A JSON number as the double comparisons use (integers beyond 2**53 round, as in JSON); None for
    anything else: booleans are not numbers, and NaN, infinities and integers too large are no value."""
    kind = type(value)
    if kind is float:
        return value if -_INF < value < _INF else None
    if kind is int:
        try:
            return float(value)
        except OverflowError:
            return None
    return None


def _present(value: Any) -> bool:
    if value is MISSING or value is None:
        return False
    kind = type(value)
    return (kind is not int and kind is not float) or _number(value) is not None


def _absent(value: Any) -> bool:
    return not _present(value)


def _never(value: Any) -> bool:
    return False


def _equals(operand: Any) -> Callable[[Any], bool]:
    """Strings equal strings, booleans booleans, and numbers numbers (1 == 1.0); nothing else is equal."""
    if isinstance(operand, bool):
        return lambda value: value is operand
    if isinstance(operand, str):
        return lambda value: type(value) is str and value == operand
    number = _number(operand)
    return lambda value: _number(value) == number  # None (no number) equals no operand


def _not_equals(operand: Any) -> Callable[[Any], bool]:
    equals = _equals(operand)
    return lambda value: _present(value) and not equals(value)


def _ordering(compare: Callable[[Any, Any], bool]) -> Callable[[Any], Callable[[Any], bool]]:
    """Numbers with numbers, strings with strings (by code point); booleans have no order."""

    def build(operand: Any) -> Callable[[Any], bool]:
        if isinstance(operand, bool):
            return _never
        if isinstance(operand, str):
            return lambda value: type(value) is str and compare(value, operand)
        number = _number(operand)
        return lambda value: (found := _number(value)) is not None and compare(found, number)

    return build


def _any_of(operands: tuple[Any, ...]) -> Callable[[Any], bool]:
    # One set per JSON type keeps `$in` to a hash lookup and booleans apart from numbers.
    strings = frozenset(o for o in operands if isinstance(o, str))
    booleans = frozenset(o for o in operands if isinstance(o, bool))
    numbers = frozenset(_number(o) for o in operands if not isinstance(o, (str, bool)))

    def holds(value: Any) -> bool:
        kind = type(value)
        if kind is str:
            return value in strings
        if kind is int or kind is float:
            return _number(value) in numbers  # None (no finite double) is in no set
        if kind is bool:
            return value in booleans
        return False

    return holds


def _contains(operand: Any) -> Callable[[Any], bool]:
    """A string holding the operand (a string) as a substring, or a list holding an element equal to it."""
    equals = _equals(operand)
    text = operand if isinstance(operand, str) else None

    def holds(value: Any) -> bool:
        kind = type(value)
        if kind is list or kind is tuple:
            return any(equals(item) for item in value)
        return text is not None and kind is str and text in value

    return holds


def _starts_with(operand: str) -> Callable[[Any], bool]:
    return lambda value: type(value) is str and value.startswith(operand)


def _exists(wanted: bool) -> Callable[[Any], bool]:
    return _present if wanted else _absent


def _all_of(checks: tuple[Callable[[Any], bool], ...]) -> Callable[[Any], bool]:
    if len(checks) == 1:
        return checks[0]

    def holds(value: Any) -> bool:
        for check in checks:  # noqa: SIM110 - all() over a generator costs more per event than this loop
            if not check(value):
                return False
        return True

    return holds


_CHECKS: dict[str, Callable[[Any], Callable[[Any], bool]]] = {
    "$eq": _equals,
    "$ne": _not_equals,
    "$gt": _ordering(operator.gt),
    "$gte": _ordering(operator.ge),
    "$lt": _ordering(operator.lt),
    "$lte": _ordering(operator.le),
    "$in": _any_of,
    "$contains": _contains,
    "$starts_with": _starts_with,
    "$exists": _exists,
}


class ComputedTraits:
    """The declared computed traits, indexed by (event type, event name) for the per-event lookup.

    `needs_context`: some definition reads `$context` or `$hour`, so events need their context (the engine
    converts it only then). `context_keep`: the context fields a timeline entry keeps, TIMELINE_CONTEXT
    plus every field a definition reads, so backfills and merges replay what live application read.
    """

    __slots__ = ("_by_name", "_cache", "context_keep", "needs_context")

    def __init__(self, traits: Iterable[ComputedTrait] = ()) -> None:
        self._by_name: dict[str, ComputedTrait] = {}
        for trait in traits:
            if trait.name in self._by_name:
                raise InvalidArgument("name", f"computed trait {_shown(trait.name)} is declared twice")
            self._by_name[trait.name] = trait
        self._cache: dict[tuple[str, str], tuple[ComputedTrait, ...]] = {}
        read = {path for trait in self._by_name.values() for path in trait.context_paths}
        self.needs_context = bool(read)
        wanted = read.union(TIMELINE_CONTEXT)
        # A field inside one kept whole is not kept twice.
        self.context_keep = tuple(
            sorted(path for path in wanted if not any(path[:n] in wanted for n in range(1, len(path))))
        )

    @classmethod
    def from_dicts(cls, items: Any) -> ComputedTraits:
        if not isinstance(items, (list, tuple)):
            raise InvalidArgument("computed_traits", f"{_shown(items)} must be a list of definitions")
        traits = []
        for index, item in enumerate(items):
            try:
                traits.append(ComputedTrait.from_dict(item))
            except InvalidArgument as error:
                raise InvalidArgument(f"computed_traits[{index}].{error.field}", error.description) from None
        return cls(traits)

    def to_dicts(self) -> list[dict[str, Any]]:
        return [trait.to_dict() for trait in self._by_name.values()]

    def matching(self, event_type: str, event_name: str, platform: bool = False) -> tuple[ComputedTrait, ...]:
        """The definitions an event of this type and name feeds (cached; the set of names is small). A
        platform event (`platform`) feeds only those naming it: they are among the cached ones."""
        key = (event_type, event_name)
        found = self._cache.get(key)
        if found is None:
            found = tuple(t for t in self._by_name.values() if t.matches_event(event_type, event_name))
            if len(self._cache) >= _MATCH_CACHE_LIMIT:
                self._cache.clear()  # event names are client data: never let the cache grow without bound
            self._cache[key] = found
        if platform and found:
            return tuple(t for t in found if event_name in t.event_names)  # rare: not worth a cache
        return found

    def get(self, name: str) -> ComputedTrait | None:
        return self._by_name.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[ComputedTrait]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)
