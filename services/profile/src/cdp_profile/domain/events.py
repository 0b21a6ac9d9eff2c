"""What a profile is built from: resolved events, the timeline entries they leave, and how long those are kept.

Events also carry what pseudo-paths read (Segment's context, the user and anonymous ids, identity's counts
of other persons sharing the event's identifiers); timeline entries keep the part of it that backfills and
merges replay.

Values inside events (properties, traits) are JSON values: dicts, lists, strings, numbers, booleans and
null. The profile keeps references to them rather than copies (copying every event would cost more than
applying it), so an event must not be mutated after it was applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

from cdp_kit.errors import InvalidArgument

EVENT_TYPES = frozenset({"track", "identify", "page", "screen", "group", "alias"})
# identify and group events carry their data in `traits`; the others in `properties`. Computed traits,
# `where` filters and timeline entries read this "payload", so a computed trait over identify events
# can count plan changes the same way one over track events counts orders.
TRAIT_PAYLOAD_TYPES = frozenset({"identify", "group"})
# Sources of the events the platform itself publishes on a person's behalf: identity's "Identifier Shared"
# (another person joined this one on an identifier). They carry neither a user id nor an anonymous id, which
# no client event can lack (the collector refuses it), so a client source an operator happened to call
# "identity" is never taken for the platform. Such an event is not the person's activity: it stays in the
# timeline and feeds the computed traits that name it, but moves no `last_seen`, `first_seen` or
# `event_count`, and a trait over any event (no `event_names`) does not read it.
PLATFORM_SOURCES = frozenset({"identity"})


def is_platform_event(source: str, user_id: str, anonymous_id: str) -> bool:
    """Whether an event was published by the platform itself rather than sent about the person's doing."""
    return source in PLATFORM_SOURCES and not user_id and not anonymous_id


class _Empty(dict):
    """The shared empty default of the `context` fields: hashable (a dataclass default may be), refusing
    writes, and a dict, so reading it and testing it for emptiness cost what they cost on any dict."""

    __slots__ = ()

    def __hash__(self) -> int:
        return 0

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("EMPTY is shared: it cannot be changed")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse


EMPTY: Mapping[str, Any] = _Empty()

# The Segment event context as computed traits read it (`$context.<path>`), with Segment's JSON key names:
# top-level field -> None for a value, or the names of an object's fields. Only non-empty fields are present.
CONTEXT_FIELDS: Mapping[str, tuple[str, ...] | None] = MappingProxyType(
    {
        "ip": None,
        "locale": None,
        "timezone": None,
        "userAgent": None,
        "device": ("id", "advertisingId", "manufacturer", "model", "name", "type"),
        "location": ("city", "country", "latitude", "longitude", "region"),
        "os": ("name", "version"),
        "campaign": ("name", "source", "medium", "term", "content"),
        "page": ("path", "referrer", "search", "title", "url"),
        "app": ("name", "version", "build", "namespace"),
    }
)
# What a timeline entry keeps of an event's context, besides the fields the defined computed traits read:
# the fields fraud and send-time definitions use, so one declared later can be backfilled from them. (The
# engine converts the context only while some definition reads `$context` or `$hour`; entries of events
# applied before that have none.)
TIMELINE_CONTEXT: tuple[tuple[str, ...], ...] = (
    ("ip",),
    ("timezone",),
    ("device", "id"),
    ("location", "country"),
    ("location", "city"),
    ("location", "latitude"),
    ("location", "longitude"),
)


class KeptContext(dict):
    """A context made with only the fields at `paths` (`cdp_profile.events.context_kept`): what
    `context_subset(..., paths)` gives, so taking that subset of it again returns it as it is."""

    __slots__ = ("paths",)

    def __init__(self, paths: tuple[tuple[str, ...], ...]) -> None:
        super().__init__()
        self.paths = paths


def context_subset(context: Mapping[str, Any], paths: tuple[tuple[str, ...], ...]) -> Mapping[str, Any]:
    """The part of `context` at `paths` (none a prefix of another; leaves are shared, not copied); EMPTY if none."""
    if type(context) is KeptContext and context.paths is paths:
        return context
    out: dict[str, Any] = {}
    for path in paths:
        value: Any = context
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
            if value is None:
                break
        if value is None:
            continue
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out or EMPTY


@dataclass(slots=True)
class ProfileEvent:
    """One event identity already resolved to a person. Every effect is idempotent on `event_id`.

    Not changed once made (the profile keeps references to its values), but not `frozen`: one is made per
    event of every batch, and a frozen dataclass's `__init__` (a call per field to get past the freeze)
    cost six times as much as plain slot stores."""

    event_id: str
    type: str  # "track" | "identify" | "page" | "screen" | "group" | "alias"
    name: str  # track event name, page/screen name ("" otherwise)
    at: float  # event time, epoch seconds
    source: str  # source id, "api", "salesforce", ...
    properties: Mapping[str, Any] = field(default_factory=dict)
    traits: Mapping[str, Any] = field(default_factory=dict)
    consent: Mapping[str, bool] = field(default_factory=dict)  # "purpose:<Name>" / "channel:<name>" -> granted
    identifiers: tuple[str, ...] = ()  # "type:value", strongest first
    group_id: str = ""
    # Segment's context (see CONTEXT_FIELDS). The engine fills it only while a definition reads `$context`
    # or `$hour`: converting it costs time on the hot path.
    context: Mapping[str, Any] = EMPTY
    user_id: str = ""
    anonymous_id: str = ""
    # Identity's `ResolvedEvent.shared_with`: identifier type -> other persons seen with the event's
    # identifiers of that type in the day before it (`$shared.<type>`); EMPTY for almost every event.
    shared: Mapping[str, int] = EMPTY

    def payload(self) -> Mapping[str, Any]:
        """The data computed traits and the timeline read: traits for identify/group, properties otherwise."""
        return self.traits if self.type in TRAIT_PAYLOAD_TYPES else self.properties

    @property
    def platform(self) -> bool:
        """Published by the platform (see PLATFORM_SOURCES), not the person's activity."""
        return is_platform_event(self.source, self.user_id, self.anonymous_id)


class TimelineEntry(NamedTuple):
    """One event on a person's timeline.

    A named tuple rather than a dataclass: one is created per applied event (the hot path), and tuple order
    *is* the timeline order — (at, event_id) first, and event ids are unique, so later fields never decide.
    `origin` is the person the event was first resolved to; it decides which side keeps the entry when a
    merge is undone. `context`, `user_id`, `anonymous_id` and `shared` are what the pseudo-paths `$context`,
    `$hour`, `$user_id`, `$anonymous_id` and `$shared` read, so backfills and merges replay those as live
    application saw them: the context is only the subset TIMELINE_CONTEXT names plus the fields definitions read.
    """

    at: float
    event_id: str
    type: str
    name: str
    properties: Mapping[str, Any]
    source: str
    origin: str
    context: Mapping[str, Any] = EMPTY
    user_id: str = ""
    anonymous_id: str = ""
    shared: Mapping[str, int] = EMPTY

    def cursor(self) -> tuple[float, str]:
        return (self.at, self.event_id)

    @property
    def platform(self) -> bool:
        """The entry of an event the platform published (see PLATFORM_SOURCES), not the person's activity."""
        return is_platform_event(self.source, self.user_id, self.anonymous_id)

    def to_doc(self) -> dict[str, Any]:
        doc = {
            "at": self.at,
            "event_id": self.event_id,
            "type": self.type,
            "name": self.name,
            "properties": dict(self.properties),
            "source": self.source,
            "origin": self.origin,
        }
        # Only when present: most entries have no context, and entries stored before had none of these.
        if self.context:
            doc["context"] = dict(self.context)
        if self.user_id:
            doc["user_id"] = self.user_id
        if self.anonymous_id:
            doc["anonymous_id"] = self.anonymous_id
        if self.shared:
            doc["shared"] = dict(self.shared)
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> TimelineEntry:
        return cls(
            doc["at"],
            doc["event_id"],
            doc["type"],
            doc.get("name", ""),
            doc.get("properties", {}),
            doc.get("source", ""),
            doc["origin"],
            doc.get("context") or EMPTY,
            doc.get("user_id", ""),
            doc.get("anonymous_id", ""),
            doc.get("shared") or EMPTY,
        )

    # The persisted form is also the readable one.
    to_dict = to_doc
    from_dict = from_doc


@dataclass(slots=True, frozen=True)
class Retention:
    """How much timeline a profile keeps: at most `max_events` entries, none older than `max_age_seconds`.

    The oldest entries (by event time) go first. Retention bounds the timeline only: traits, consent and
    computed traits keep everything they summarise. One value is configured per deployment and given to
    the profile at construction (`Profile.new`, `Profile.from_doc`), so no call can forget it.
    """

    max_events: int = 1000
    max_age_seconds: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_events, bool) or not isinstance(self.max_events, int) or self.max_events < 1:
            raise InvalidArgument("retention.max_events", f"{self.max_events!r} must be a whole number of at least 1")
        age = self.max_age_seconds
        if age is not None and (isinstance(age, bool) or not isinstance(age, (int, float)) or not age > 0):
            raise InvalidArgument(
                "retention.max_age_seconds", f"{age!r} must be a number of seconds above zero, or None to keep any age"
            )


DEFAULT_RETENTION = Retention()
