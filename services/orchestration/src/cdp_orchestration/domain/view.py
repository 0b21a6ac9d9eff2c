"""What the domain is told about a person and the events that reach it: plain frozen values, no I/O.

The service builds a `PersonView` from the profile it holds (flat field keys, as `cdp_kit.profile_fields`
names them: "traits.plan", "consent.purpose:Marketing", "scores.churn_risk") and the segments the person is
in, and an `Event` from each resolved event. The domain never fetches either: a stimulus carries what it
needs, so a replay of the same stimuli with the same views gives the same commands.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cdp_kit.profile_fields import CONSENT, TRAITS, field_key

# The root under which templates and conditions read an instance's entry properties ("entry.total"): the
# entry event's properties or an Enroll call's. Not a profile root: only an instance has them.
ENTRY = "entry"

# The trait holding a person's IANA time zone ("Europe/Berlin"); without it the rules' default zone applies.
TIMEZONE_FIELD = field_key(TRAITS, "timezone")

_EMPTY: Mapping[str, Any] = {}


@dataclass(frozen=True, slots=True)
class PersonView:
    """One person as the journeys and the arbiter see them at one instant."""

    person_id: str
    fields: Mapping[str, Any] = field(default_factory=dict)  # flat field key -> value
    segments: frozenset[str] = frozenset()
    # The person's recent events, when the service keeps them: event conditions (`performed(...)`) are then
    # answered from these; None reads them from the profile's computed traits instead.
    events: tuple[Event, ...] | None = None
    # Since when the fields lag behind the person's events: the time orchestration applied the earliest
    # event of theirs whose profile change has not reached it yet (the profile has not applied it, or its
    # change is still on its way). None: the fields are at least as new as every event seen. The arbiter
    # waits for the profile before deciding on fields that lag (`arbiter`, `Rules.profile_wait`).
    behind: float | None = None

    @property
    def timezone(self) -> str | None:
        zone = self.fields.get(TIMEZONE_FIELD)
        return zone if isinstance(zone, str) and zone else None

    def consent(self, kind: str, name: str) -> bool | None:
        """The person's consent for `purpose:<name>` or `channel:<name>`: True, False, or None (never given)."""
        value = self.fields.get(field_key(CONSENT, f"{kind}:{name}"))
        return value if isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class Event:
    """An event about the person: its id (stable across redeliveries: `<source id>:<messageId>`, the
    collector's dedup id, as one messageId sent through two sources is two events), name, type and epoch
    time, the identifiers it was sent with (userId, anonymousId; "" when absent), and its sender's messageId
    alone (`message_id`: the trigger id of the instances it started before the source was part of it)."""

    event_id: str
    name: str
    at: float
    type: str = "track"
    properties: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    context: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    user_id: str = ""
    anonymous_id: str = ""
    message_id: str = ""
