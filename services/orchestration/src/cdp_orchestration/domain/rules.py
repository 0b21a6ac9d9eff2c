"""The arbiter's rules, as an operator writes them (JSON or YAML), validated with errors naming the field.

    {"timezone": "UTC",                                  # for people whose profile has no traits.timezone
     "exempt_categories": ["transactional"],             # never capped, never held for quiet hours,
                                                         # sent without a purpose consent (channel consent
                                                         # and suppression rules still apply)
     "caps": [{"id": "email-daily", "channel": "email", "per": "day", "limit": 1},
              {"id": "all-weekly", "per": "week", "limit": 5}],            # no channel: every channel
     "quiet_hours": {"from": "21:00", "to": "08:00", "channels": ["email", "sms", "push"]},
     "suppressions": [{"id": "no-offer-after-ticket", "categories": ["offer"],
                       "after_event": "Support Ticket Opened", "within": "1d"},
                      {"id": "no-promo-at-risk", "categories": ["promotion"],
                       "condition": "scores.churn_risk > 0.8 and traits.open_tickets > 0"}],
     "approval": {"above": 100, "expires_after": "2d"},  # value above 100 waits for a person to approve
     "max_hold": "7d",                                   # a deferral never reaches past proposal + max_hold
     "profile_wait": "10m"}                              # the longest an action waits for the profile to
                                                         # apply the person's events (then decided on what
                                                         # orchestration knows, "profile_unavailable")

Days and weeks are calendar ones in the person's zone (weeks from Monday). A suppression with both
`after_event` and `condition` applies when both hold; `categories` and `channels` narrow what it applies to
(absent: everything).

A suppression's condition reads a named computed trait of kind count or sum that a person lacks as 0, as a
journey's conditions and segments do (`computed.tickets_today < 1` holds for someone with no ticket), when
`parse_rules` is given those fields (`counted`, from the profile service's ListComputedTraits; the service
keeps the set it compiled a rules document with, `arbiter_rules.py`); without them it reads as missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cdp_kit.durations import parse_duration
from cdp_kit.errors import InvalidArgument
from cdp_orchestration.domain import clock
from cdp_orchestration.domain.conditions import ProfileCondition, profile_condition
from cdp_orchestration.domain.journey import CHANNELS


@dataclass(frozen=True, slots=True)
class Cap:
    id: str
    limit: int
    per: str  # "day" | "week"
    channel: str | None = None  # None: all channels together


@dataclass(frozen=True, slots=True)
class QuietHours:
    start: tuple[int, int]
    end: tuple[int, int]
    channels: frozenset[str] | None = None  # None: every channel

    def applies(self, channel: str) -> bool:
        return self.channels is None or channel in self.channels


@dataclass(frozen=True, slots=True)
class Suppression:
    id: str
    categories: frozenset[str] | None = None
    channels: frozenset[str] | None = None
    after_event: str | None = None
    within: float | None = None
    condition: ProfileCondition | None = None

    def applies(self, category: str, channel: str) -> bool:
        return (self.categories is None or category in self.categories) and (
            self.channels is None or channel in self.channels
        )


@dataclass(frozen=True, slots=True)
class Approval:
    above: float | None = None  # None: only actions marked approval: true wait
    expires_after: float = 2 * 86400.0


@dataclass(frozen=True, slots=True)
class Rules:
    timezone: str = "UTC"
    exempt_categories: frozenset[str] = frozenset({"transactional"})
    caps: tuple[Cap, ...] = ()
    quiet_hours: QuietHours | None = None
    suppressions: tuple[Suppression, ...] = ()
    approval: Approval = field(default_factory=Approval)
    max_hold: float = 7 * 86400.0
    # The longest an action waits for the profile to apply the person's events before it is decided on the
    # fields orchestration has (`arbiter`: "profile_unavailable").
    profile_wait: float = 600.0
    # The counted fields (count / sum computed traits, "computed.tickets_today") its conditions read as 0
    # where a person has none: the ones `parse_rules` was given that they read.
    counted: frozenset[str] = frozenset()

    @property
    def fields(self) -> frozenset[str]:
        """The profile fields its suppression conditions read ("computed.tickets_today", "traits.plan")."""
        return frozenset(f for s in self.suppressions if s.condition is not None for f in s.condition.fields)

    @property
    def watched_events(self) -> frozenset[str]:
        """Event names the arbiter must `observe` for its suppression rules."""
        return frozenset(s.after_event for s in self.suppressions if s.after_event is not None)


_KEYS = (
    "timezone",
    "exempt_categories",
    "caps",
    "quiet_hours",
    "suppressions",
    "approval",
    "max_hold",
    "profile_wait",
)


def parse_rules(document: Any, field_name: str = "rules", *, counted: frozenset[str] = frozenset()) -> Rules:
    """Rules from their document; InvalidArgument naming the first bad field (`rules.caps[0].limit`).
    `counted`: the field keys of computed traits of kind count or sum (`conditions.counted_fields`), which
    the suppression conditions read as 0 where a person has none."""
    if not isinstance(document, Mapping):
        raise InvalidArgument(field_name, "must be an object")
    _known(document, _KEYS, field_name)
    timezone = document.get("timezone", "UTC")
    if (why := clock.zone_problem(timezone)) is not None:
        raise InvalidArgument(f"{field_name}.timezone", why)
    exempt = _names(document.get("exempt_categories", ["transactional"]), f"{field_name}.exempt_categories")
    caps = tuple(_cap(item, f"{field_name}.caps[{i}]") for i, item in enumerate(_list(document, "caps", field_name)))
    if len({cap.id for cap in caps}) != len(caps):
        raise InvalidArgument(f"{field_name}.caps", "cap ids must be unique")
    quiet = _quiet(document["quiet_hours"], f"{field_name}.quiet_hours") if "quiet_hours" in document else None
    suppressions = tuple(
        _suppression(item, f"{field_name}.suppressions[{i}]", counted)
        for i, item in enumerate(_list(document, "suppressions", field_name))
    )
    if len({s.id for s in suppressions}) != len(suppressions):
        raise InvalidArgument(f"{field_name}.suppressions", "suppression ids must be unique")
    approval = _approval(document.get("approval", {}), f"{field_name}.approval")
    max_hold = parse_duration(document.get("max_hold", "7d"), f"{field_name}.max_hold")
    profile_wait = parse_duration(document.get("profile_wait", "10m"), f"{field_name}.profile_wait")
    read = frozenset(f for s in suppressions if s.condition is not None for f in s.condition.counted)
    return Rules(timezone, exempt, caps, quiet, suppressions, approval, max_hold, profile_wait, read)


def _known(tree: Mapping[str, Any], allowed: tuple[str, ...], at: str) -> None:
    for key in tree:
        if key not in allowed:
            raise InvalidArgument(f"{at}.{key}", f"unknown key here; known: {', '.join(allowed)}")


def _list(document: Mapping[str, Any], key: str, at: str) -> list[Any]:
    value = document.get(key, [])
    if not isinstance(value, list):
        raise InvalidArgument(f"{at}.{key}", "must be a list")
    return value


def _names(value: Any, at: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InvalidArgument(at, f"{value!r} must be a list of names")
    return frozenset(value)


def _channels(value: Any, at: str) -> frozenset[str]:
    names = _names(value, at)
    for name in sorted(names - set(CHANNELS)):
        raise InvalidArgument(at, f"{name!r} is not a channel; use {', '.join(CHANNELS)}")
    return names


def _id(tree: Mapping[str, Any], at: str) -> str:
    value = tree.get("id")
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{at}.id", "is required: a name that decisions can cite")
    return value


def _cap(tree: Any, at: str) -> Cap:
    if not isinstance(tree, Mapping):
        raise InvalidArgument(at, 'must be {"id": ..., "per": "day", "limit": 1, "channel": "email"}')
    _known(tree, ("id", "per", "limit", "channel"), at)
    per = tree.get("per")
    if per not in ("day", "week"):
        raise InvalidArgument(f"{at}.per", f"{per!r} must be 'day' or 'week' (calendar, in the person's zone)")
    limit = tree.get("limit")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise InvalidArgument(f"{at}.limit", f"{limit!r} must be a whole number from 0")
    channel = tree.get("channel")
    if channel is not None and channel not in CHANNELS:
        raise InvalidArgument(f"{at}.channel", f"{channel!r} is not a channel; use {', '.join(CHANNELS)}")
    return Cap(_id(tree, at), limit, per, channel)


def _quiet(tree: Any, at: str) -> QuietHours:
    if not isinstance(tree, Mapping):
        raise InvalidArgument(at, 'must be {"from": "21:00", "to": "08:00"}')
    _known(tree, ("from", "to", "channels"), at)
    times = []
    for key in ("from", "to"):
        try:
            times.append(clock.time_of_day(tree.get(key)))
        except ValueError as error:
            raise InvalidArgument(f"{at}.{key}", str(error)) from None
    if times[0] == times[1]:
        raise InvalidArgument(f"{at}.to", "equals 'from': quiet hours would never end")
    channels = _channels(tree["channels"], f"{at}.channels") if "channels" in tree else None
    return QuietHours(times[0], times[1], channels)


def _suppression(tree: Any, at: str, counted: frozenset[str] = frozenset()) -> Suppression:
    if not isinstance(tree, Mapping):
        raise InvalidArgument(at, 'must be {"id": ..., "categories": [...], "after_event": ..., "within": "1d"}')
    _known(tree, ("id", "categories", "channels", "after_event", "within", "condition"), at)
    rule_id = _id(tree, at)
    categories = _names(tree["categories"], f"{at}.categories") if "categories" in tree else None
    channels = _channels(tree["channels"], f"{at}.channels") if "channels" in tree else None
    after_event = tree.get("after_event")
    within = None
    if after_event is not None:
        if not isinstance(after_event, str) or not after_event:
            raise InvalidArgument(f"{at}.after_event", f"{after_event!r} must be an event name")
        within = parse_duration(tree.get("within"), f"{at}.within")
    elif "within" in tree:
        raise InvalidArgument(f"{at}.within", "applies to after_event; name the event")
    condition = (
        profile_condition(tree["condition"], f"{at}.condition", counted=counted) if "condition" in tree else None
    )
    if after_event is None and condition is None:
        raise InvalidArgument(at, "needs after_event (with within) or a condition, or both")
    return Suppression(rule_id, categories, channels, after_event, within, condition)


def _approval(tree: Any, at: str) -> Approval:
    if not isinstance(tree, Mapping):
        raise InvalidArgument(at, 'must be {"above": 100, "expires_after": "2d"}')
    _known(tree, ("above", "expires_after"), at)
    above = tree.get("above")
    if above is not None and (isinstance(above, bool) or not isinstance(above, int | float) or above < 0):
        raise InvalidArgument(f"{at}.above", f"{above!r} must be a number from 0")
    expires_after = parse_duration(tree.get("expires_after", "2d"), f"{at}.expires_after")
    return Approval(float(above) if above is not None else None, expires_after)
