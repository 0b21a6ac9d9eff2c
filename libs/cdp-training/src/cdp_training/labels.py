"""What a model learns to predict, written as data: the label of a point-in-time training row.

A label is read from what happened to the person *after* the cut-off T, within a window (T, T + window],
or, with `after`, a window that opens a while later, (T + after, T + after + window]:

    {"kind": "no_activity", "after": "30d", "window": "60d"}       churn: lapsed a month on, no event in the 60 days after
    {"kind": "goal_event", "window": "30d", "events": [{"name": "Order Completed"}]}       conversion
    {"kind": "label_event", "window": "90d",
     "events": [{"name": "Chargeback"}, {"name": "CRM Ticket Closed", "where": {"resolution": "fraud"}}]}  fraud
    {"kind": "orders_and_value", "window": "365d", "events": [{"name": "Order Completed"}],
     "value_property": "total"}                                                  CLV: orders and their value
    {"kind": "channel_answered", "window": "30d", "events": [{"name": "Email Opened"}, ...],
     "property": "channel", "classes": ["email", "sms", "push", "in_app"],
     "aliases": {"inapp": "in_app", "webpush": "push"}}                          next best channel

`events` lists what qualifies: each a `name` (an event name; absent: any name), an optional `type`
(track, page, screen, identify, group, alias; absent: any) and an optional `where` (property -> value
every match must carry). `no_activity` without `events` counts every event the person made (events the
platform published on their behalf, identity's "Identifier Shared", qualify only for a match that names
them). `after` (a duration, 0 or more; absent: 0) skips what happens in (T, T + after]: "lapsed a month on" is not "already gone", and an
event in the month of grace is no answer to it. A label is known only once its `horizon` (after + window)
has passed: nothing reads a cut-off later than the last event the store holds minus the horizon. A `channel_answered` row's label
is the class answered most in the window (ties: the one answered first); a person who answered none has
no label and no row; `aliases` maps other names senders use for a class onto it (orchestration's outcome
events say "inapp" and "webpush" where the classes say "in_app" and "push"). Every error names the field (`label.window`, `label.events[1].where`) and what to write.

The spec travels with the model (`training.label` in its ModelSpec), so a version says what it predicts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cdp_kit.durations import DURATION_RE, format_duration, parse_duration
from cdp_kit.errors import InvalidArgument
from cdp_profile.domain import TimelineEntry

NO_ACTIVITY, GOAL_EVENT, LABEL_EVENT, ORDERS_AND_VALUE, CHANNEL_ANSWERED = (
    "no_activity",
    "goal_event",
    "label_event",
    "orders_and_value",
    "channel_answered",
)
KINDS = (NO_ACTIVITY, GOAL_EVENT, LABEL_EVENT, ORDERS_AND_VALUE, CHANNEL_ANSWERED)
BINARY_KINDS = frozenset({NO_ACTIVITY, GOAL_EVENT, LABEL_EVENT})
EVENT_TYPES = ("track", "page", "screen", "identify", "group", "alias")
_KEYS = ("kind", "after", "window", "events", "value_property", "property", "classes", "aliases")
_MATCH_KEYS = ("name", "type", "where")


@dataclass(frozen=True, slots=True)
class EventMatch:
    name: str | None = None
    type: str | None = None
    where: tuple[tuple[str, Any], ...] = ()

    def matches(self, entry: TimelineEntry) -> bool:
        if self.name is not None and entry.name != self.name:
            return False
        if self.type is not None and entry.type != self.type:
            return False
        return all(entry.properties.get(key) == value for key, value in self.where)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.name is not None:
            out["name"] = self.name
        if self.type is not None:
            out["type"] = self.type
        if self.where:
            out["where"] = dict(self.where)
        return out


def _match(data: Any, where: str) -> EventMatch:
    if not isinstance(data, Mapping):
        raise InvalidArgument(where, f"{data!r} must be an object like {{'name': 'Order Completed'}}")
    for key in data:
        if key not in _MATCH_KEYS:
            raise InvalidArgument(f"{where}.{key}", f"unknown key; known: {', '.join(_MATCH_KEYS)}")
    name, kind, condition = data.get("name"), data.get("type"), data.get("where", {})
    if name is not None and (not isinstance(name, str) or not name):
        raise InvalidArgument(f"{where}.name", f"{name!r} must be a non-empty event name")
    if kind is not None and kind not in EVENT_TYPES:
        raise InvalidArgument(f"{where}.type", f"{kind!r} is not one of {', '.join(EVENT_TYPES)}")
    if not isinstance(condition, Mapping) or not all(isinstance(k, str) and k for k in condition):
        raise InvalidArgument(f"{where}.where", "must be an object of property name -> the value it must hold")
    if name is None and kind is None and not condition:
        raise InvalidArgument(where, "matches every event: give a name, a type or a where")
    return EventMatch(name, kind, tuple(sorted(condition.items())))


def _offset(value: Any, where: str) -> float:
    """`after`: a duration like `window`'s, where 0 (no offset) is allowed too."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value == 0:
        return 0.0
    if isinstance(value, str) and (match := DURATION_RE.match(value)) and float(match.group(1)) == 0:
        return 0.0
    if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
        raise InvalidArgument(where, f"{value!r} must not be negative: the window opens at or after the cut-off")
    if isinstance(value, str) and value.strip().startswith("-"):
        raise InvalidArgument(where, f"{value!r} must not be negative: the window opens at or after the cut-off")
    return parse_duration(value, where)


@dataclass(frozen=True, slots=True)
class LabelSpec:
    kind: str
    window: float  # seconds after the cut-off
    events: tuple[EventMatch, ...] = ()
    value_property: str | None = None
    channel_property: str | None = None
    classes: tuple[str, ...] = ()
    # channel_answered: another name a sender gives a class (orchestration says "inapp" for "in_app")
    aliases: tuple[tuple[str, str], ...] = ()
    after: float = 0.0  # seconds after the cut-off before the window opens

    @property
    def horizon(self) -> float:
        """Seconds after the cut-off until the label is known: the window closes at T + after + window."""
        return self.after + self.window

    @classmethod
    def from_dict(cls, data: Any, where: str = "label") -> LabelSpec:
        if not isinstance(data, Mapping):
            raise InvalidArgument(where, f"{data!r} must be an object with 'kind' and 'window'")
        for key in data:
            if key not in _KEYS:
                raise InvalidArgument(f"{where}.{key}", f"unknown key; known: {', '.join(_KEYS)}")
        kind = data.get("kind")
        if kind not in KINDS:
            raise InvalidArgument(f"{where}.kind", f"{kind!r} is not one of {', '.join(KINDS)}")
        if "window" not in data:
            raise InvalidArgument(f"{where}.window", "is required: how long after the cut-off to look, e.g. '90d'")
        window = parse_duration(data["window"], f"{where}.window")
        after = _offset(data.get("after", 0), f"{where}.after")
        raw_events = data.get("events", [])
        if not isinstance(raw_events, list):
            raise InvalidArgument(f"{where}.events", "must be a list of event matches like {'name': 'Order Completed'}")
        events = tuple(_match(item, f"{where}.events[{i}]") for i, item in enumerate(raw_events))
        if not events and kind != NO_ACTIVITY:
            raise InvalidArgument(f"{where}.events", f"a {kind} label needs at least one event to look for")
        value_property = data.get("value_property")
        if kind == ORDERS_AND_VALUE:
            if not isinstance(value_property, str) or not value_property:
                raise InvalidArgument(f"{where}.value_property", "name the property holding an order's value")
        elif value_property is not None:
            raise InvalidArgument(f"{where}.value_property", f"only {ORDERS_AND_VALUE} labels read a value")
        prop, classes = data.get("property"), data.get("classes", [])
        if kind == CHANNEL_ANSWERED:
            if not isinstance(prop, str) or not prop:
                raise InvalidArgument(f"{where}.property", "name the property holding the channel answered")
            if (
                not isinstance(classes, list)
                or len(classes) < 2
                or not all(isinstance(c, str) and c for c in classes)
                or len(set(classes)) != len(classes)
            ):
                raise InvalidArgument(f"{where}.classes", "list at least two distinct channel names")
        aliases = data.get("aliases", {})
        if kind == CHANNEL_ANSWERED:
            if not isinstance(aliases, Mapping):
                raise InvalidArgument(f"{where}.aliases", "must be an object of the name events carry -> a class")
            for name, target in aliases.items():
                if not isinstance(name, str) or not name or target not in classes:
                    raise InvalidArgument(
                        f"{where}.aliases.{name}", f"{target!r} is not one of the classes ({', '.join(classes)})"
                    )
                if name in classes:
                    raise InvalidArgument(f"{where}.aliases.{name}", "is a class itself, not another name for one")
        elif aliases:
            raise InvalidArgument(f"{where}.aliases", f"only {CHANNEL_ANSWERED} labels have aliases")
        else:
            if prop is not None:
                raise InvalidArgument(f"{where}.property", f"only {CHANNEL_ANSWERED} labels read a property")
            if classes:
                raise InvalidArgument(f"{where}.classes", f"only {CHANNEL_ANSWERED} labels have classes")
        return cls(kind, window, events, value_property, prop, tuple(classes), tuple(sorted(aliases.items())), after)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.after:
            out["after"] = format_duration(self.after)
        out["window"] = format_duration(self.window)
        if self.events:
            out["events"] = [match.to_dict() for match in self.events]
        if self.value_property is not None:
            out["value_property"] = self.value_property
        if self.channel_property is not None:
            out["property"] = self.channel_property
            out["classes"] = list(self.classes)
        if self.aliases:
            out["aliases"] = dict(self.aliases)
        return out

    @property
    def columns(self) -> tuple[str, ...]:
        """The label's columns in a training set."""
        return ("orders", "value") if self.kind == ORDERS_AND_VALUE else ("label",)

    def qualifies(self, entry: TimelineEntry) -> bool:
        # An event the platform published (identity's "Identifier Shared") is not the person's doing: it
        # qualifies only for a match that names it, so a dormant account is not "active" because a new
        # account joined its phone (profile's `last_seen` ignores it the same way).
        if entry.platform:
            return any(match.name == entry.name and match.matches(entry) for match in self.events)
        return not self.events or any(match.matches(entry) for match in self.events)

    def label(self, after: Iterable[TimelineEntry], cutoff: float) -> tuple[float, ...] | None:
        """The label from the person's entries after the cut-off (any order); None: no label, no row.
        Only entries in (cutoff + after, cutoff + after + window] count."""
        start = cutoff + self.after
        end = start + self.window
        hits = [e for e in after if start < e.at <= end and self.qualifies(e)]
        if self.kind == NO_ACTIVITY:
            return (0.0 if hits else 1.0,)
        if self.kind in (GOAL_EVENT, LABEL_EVENT):
            return (1.0 if hits else 0.0,)
        if self.kind == ORDERS_AND_VALUE:
            value = 0.0
            for entry in hits:
                amount = entry.properties.get(self.value_property)
                if isinstance(amount, int | float) and not isinstance(amount, bool):
                    value += float(amount)
            return (float(len(hits)), value)
        counts: dict[str, int] = {}
        first: dict[str, float] = {}
        aliases = dict(self.aliases)
        for entry in sorted(hits):
            channel = entry.properties.get(self.channel_property)
            channel = aliases.get(channel, channel) if isinstance(channel, str) else channel
            if channel in self.classes:
                counts[channel] = counts.get(channel, 0) + 1
                first.setdefault(channel, entry.at)
        if not counts:
            return None
        best = max(counts, key=lambda c: (counts[c], -first[c]))
        return (float(self.classes.index(best)),)
