"""Computed traits are configuration, not code: a definition names an operation over matching events.

    {"name": "orders_30d", "op": "count", "event_names": ["Order Completed"], "window": "30d"}
    {"name": "revenue", "op": "sum", "event_names": ["Order Completed"], "property": "total"}
    {"name": "favourite_category", "op": "most_frequent", "event_type": "page", "property": "category",
     "where": {"site": ["shop", "outlet"]}}

An event matches when its type is `event_type` (or that is "any"), its name is one of `event_names` (or
that is empty), and every `where` path holds the required value (a list means "one of"; null matches a
missing value too). `property` is a dot path into the event's payload (properties; traits for identify
and group events). Events without a value there do not contribute, and neither do null values; sum, avg,
min and max also skip values that are not finite numbers (booleans are not numbers). For `count`,
`property` is optional: when given, only events that have a value there are counted.

The registry indexes definitions by (event type, event name), so an event costs one dict lookup plus the
definitions that actually match it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from cdp_kit.durations import format_duration, parse_duration
from cdp_kit.errors import InvalidArgument
from cdp_profile.domain.events import EVENT_TYPES

OPS = ("count", "sum", "avg", "min", "max", "first", "last", "most_frequent", "unique", "unique_count")
NUMERIC_OPS = frozenset({"sum", "avg", "min", "max"})
TRAIT_EVENT_TYPES = (*sorted(EVENT_TYPES), "any")
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_KNOWN_KEYS = ("name", "op", "event_type", "event_names", "property", "where", "window")
_MATCH_CACHE_LIMIT = 4096

MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING", "__slots__": ()})()


def parse_window(value: Any, field_name: str = "window") -> float | None:
    """Seconds from None (lifetime), 3600, "90s", "15m", "12h", "30d" or "2w"."""
    return None if value is None else parse_duration(value, field_name)


def format_window(seconds: float | None) -> str | float | None:
    return None if seconds is None else format_duration(seconds)


def _parse_path(value: Any, field_name: str) -> tuple[str, ...]:
    if not isinstance(value, str) or not value or any(not part for part in value.split(".")):
        raise InvalidArgument(
            field_name, f"{value!r} is not a property path: use names joined by dots, like 'cart.total'"
        )
    return tuple(value.split("."))


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


@dataclass(slots=True, frozen=True)
class ComputedTrait:
    """One declared computed trait. The constructor validates and normalises (see `from_dict`)."""

    name: str
    op: str
    event_type: str = "track"
    event_names: tuple[str, ...] = ()
    property: str | None = None
    # path -> allowed values; given as a mapping, held as sorted ((path, (value, ...)), ...) so it hashes.
    where: Any = ()
    window: Any = None  # seconds, or "30d"-style text; held as float seconds, None = lifetime
    # Derived once, read per event.
    path: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)
    filters: tuple[tuple[tuple[str, ...], tuple[Any, ...]], ...] = field(
        default=(), init=False, repr=False, compare=False
    )
    numeric: bool = field(default=False, init=False, repr=False, compare=False)
    # A hash of the canonical definition: a stored computed state remembers it, so a changed definition is
    # never mixed with contributions made under the old one.
    signature: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise InvalidArgument(
                "name",
                f"{self.name!r} is not a valid name: use a lower-case letter, then letters, digits or '_' (64 at most)",
            )
        if self.op not in OPS:
            raise InvalidArgument("op", f"{self.op!r} is not an operation; use one of: {', '.join(OPS)}")
        if self.event_type not in TRAIT_EVENT_TYPES:
            raise InvalidArgument(
                "event_type", f"{self.event_type!r} is not an event type; use one of: {', '.join(TRAIT_EVENT_TYPES)}"
            )
        names = self.event_names
        if isinstance(names, str):
            names = (names,)
        if not isinstance(names, (list, tuple)) or any(not isinstance(n, str) or not n for n in names):
            raise InvalidArgument("event_names", f"{self.event_names!r} must be a list of non-empty event names")
        set_(self, "event_names", tuple(sorted(set(names))))
        if self.property is None:
            if self.op != "count":
                raise InvalidArgument("property", f"is required for op {self.op!r}: name the value to aggregate")
        else:
            set_(self, "path", _parse_path(self.property, "property"))
        set_(self, "where", _normalise_where(self.where))
        set_(self, "filters", tuple((tuple(path.split(".")), allowed) for path, allowed in self.where))
        set_(self, "window", parse_window(self.window))
        set_(self, "numeric", self.op in NUMERIC_OPS)
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        set_(self, "signature", hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest())

    @classmethod
    def from_dict(cls, data: Any) -> ComputedTrait:
        if not isinstance(data, Mapping):
            raise InvalidArgument("computed_trait", f"{data!r} must be an object with 'name' and 'op'")
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
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op": self.op,
            "event_type": self.event_type,
            "event_names": list(self.event_names),
            "property": self.property,
            "where": {path: allowed[0] if len(allowed) == 1 else list(allowed) for path, allowed in self.where},
            "window": format_window(self.window),
        }

    def matches_event(self, event_type: str, event_name: str) -> bool:
        return (self.event_type in ("any", event_type)) and (not self.event_names or event_name in self.event_names)

    def extract(self, payload: Any) -> Any:
        """The contribution an event with this payload makes, or MISSING when it makes none."""
        for path, allowed in self.filters:
            value = dig(payload, path)
            if value is MISSING or value is None:
                if None not in allowed:
                    return MISSING
            elif not any(_equal(value, a) for a in allowed):
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
        return value


def _normalise_where(where: Any) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if isinstance(where, tuple) and all(isinstance(item, tuple) and len(item) == 2 for item in where):
        where = {path: list(allowed) if isinstance(allowed, tuple) else allowed for path, allowed in where}
    if not isinstance(where, Mapping):
        raise InvalidArgument("where", f"{where!r} must be an object of property path -> required value(s)")
    items = []
    for path, allowed in where.items():
        _parse_path(path, f"where.{path}")
        values = allowed if isinstance(allowed, list) else [allowed]
        if not values or not all(_is_scalar(v) for v in values):
            raise InvalidArgument(
                f"where.{path}", f"{allowed!r} must be a string, number, boolean or null, or a non-empty list of them"
            )
        items.append((path, tuple(values)))
    return tuple(sorted(items, key=lambda item: item[0]))


class ComputedTraits:
    """The declared computed traits, indexed by (event type, event name) for the per-event lookup."""

    __slots__ = ("_by_name", "_cache")

    def __init__(self, traits: Iterable[ComputedTrait] = ()) -> None:
        self._by_name: dict[str, ComputedTrait] = {}
        for trait in traits:
            if trait.name in self._by_name:
                raise InvalidArgument("name", f"computed trait {trait.name!r} is declared twice")
            self._by_name[trait.name] = trait
        self._cache: dict[tuple[str, str], tuple[ComputedTrait, ...]] = {}

    @classmethod
    def from_dicts(cls, items: Any) -> ComputedTraits:
        if not isinstance(items, (list, tuple)):
            raise InvalidArgument("computed_traits", f"{items!r} must be a list of definitions")
        traits = []
        for index, item in enumerate(items):
            try:
                traits.append(ComputedTrait.from_dict(item))
            except InvalidArgument as error:
                raise InvalidArgument(f"computed_traits[{index}].{error.field}", error.description) from None
        return cls(traits)

    def to_dicts(self) -> list[dict[str, Any]]:
        return [trait.to_dict() for trait in self._by_name.values()]

    def matching(self, event_type: str, event_name: str) -> tuple[ComputedTrait, ...]:
        """The definitions an event of this type and name feeds (cached; the set of names is small)."""
        key = (event_type, event_name)
        found = self._cache.get(key)
        if found is None:
            found = tuple(t for t in self._by_name.values() if t.matches_event(event_type, event_name))
            if len(self._cache) >= _MATCH_CACHE_LIMIT:
                self._cache.clear()  # event names are client data: never let the cache grow without bound
            self._cache[key] = found
        return found

    def get(self, name: str) -> ComputedTrait | None:
        return self._by_name.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[ComputedTrait]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)
