"""Versioned facts: trait values, group memberships and consent, each with provenance and full history.

A history is a list of versions sorted by (event time, event id). The current version is the last one: a
late event with an older time lands in the middle (kept for "what did we know on date D") without
overwriting a newer value. Ties on time go to the greater event id, so every replica picks the same one.
"""

from __future__ import annotations

import re
from bisect import bisect_right, insort
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, NamedTuple

from cdp_kit.errors import InvalidArgument

#: A consent key: "purpose:" or "channel:" and the name as the consent context sent it. Any name the collector
#: accepts is held (spaces, ':', any length: "purpose:Marketing Emails", which a journey's action may name):
#: one left out here was a consent decision dropped without a word after the collector answered it stored.
#: NUL, which no store can hold in a field name, is refused at the edge and by `check_consent_key`.
CONSENT_KEY_RE = re.compile(r"^(?:purpose|channel):[^\x00]+\Z")

_version_key = attrgetter("at", "event_id")
_version_at = attrgetter("at")


@dataclass(slots=True, frozen=True)
class TraitVersion:
    """One value a trait had, where it came from and when. `value` None means the trait was removed.

    `at` is the event time (what the source claims), `recorded_at` when the profile learned it.
    """

    value: Any
    source: str
    event_id: str
    at: float
    recorded_at: float

    def to_doc(self) -> list[Any]:
        return [self.value, self.source, self.event_id, self.at, self.recorded_at]

    @classmethod
    def from_doc(cls, doc: list[Any]) -> TraitVersion:
        return cls(*doc)

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "source": self.source,
            "event_id": self.event_id,
            "at": self.at,
            "recorded_at": self.recorded_at,
        }


@dataclass(slots=True, frozen=True)
class ConsentState:
    """One consent decision for a purpose ("purpose:Marketing") or a channel ("channel:email").

    Stored decisions have an empty `history`; the one a view hands out carries every decision on that key
    up to the view's date, oldest first (itself last).
    """

    granted: bool
    source: str
    at: float
    event_id: str
    history: tuple[ConsentState, ...] = field(default=(), repr=False)

    def to_doc(self) -> list[Any]:
        return [self.granted, self.source, self.at, self.event_id]

    @classmethod
    def from_doc(cls, doc: list[Any]) -> ConsentState:
        return cls(*doc)

    def to_dict(self) -> dict[str, Any]:
        return {"granted": self.granted, "source": self.source, "at": self.at, "event_id": self.event_id}

    def with_history(self, history: list[ConsentState]) -> ConsentState:
        return ConsentState(self.granted, self.source, self.at, self.event_id, tuple(history))


class Score(NamedTuple):
    """A model's output written back to the profile. The newest (at, model, version) wins; no history.

    A named tuple (immutable like a frozen dataclass, made in a third of the time): every scores batch makes
    one per score of each person it names."""

    value: float
    model: str
    version: str
    at: float

    def key(self) -> tuple[float, str, str]:
        return (self.at, self.model, self.version)

    def to_doc(self) -> list[Any]:
        return [self.value, self.model, self.version, self.at]

    @classmethod
    def from_doc(cls, doc: list[Any]) -> Score:
        return cls(*doc)

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "model": self.model, "version": self.version, "at": self.at}


def record(history: list[Any], version: Any) -> bool:
    """Insert `version` in time order; True when it became the current (last) version."""
    if not history:
        history.append(version)
        return True
    last = history[-1]
    if (version.at, version.event_id) > (last.at, last.event_id):
        history.append(version)
        return True
    insort(history, version, key=_version_key)
    return False


def as_of(history: list[Any], at: float | None) -> Any:
    """The version that was current at time `at` (the latest with `at <= at`), or None."""
    if not history:
        return None
    if at is None:
        return history[-1]
    index = bisect_right(history, at, key=_version_at)
    return history[index - 1] if index else None


def up_to(history: list[Any], at: float | None) -> list[Any]:
    """The versions recorded with an event time at or before `at` (all of them for None)."""
    return history if at is None else history[: bisect_right(history, at, key=_version_at)]


def latest(histories: Iterable[list[Any]], at: float | None = None) -> Any:
    """The current version over several parts' histories of one key (a merged profile)."""
    best = None
    for history in histories:
        version = as_of(history, at)
        if version is not None and (best is None or (version.at, version.event_id) > (best.at, best.event_id)):
            best = version
    return best


def same_value(a: Any, b: Any) -> bool:
    """Equality that tells JSON types apart: True is not 1, 1 is not 1.0 (a change of type is a change)."""
    return type(a) is type(b) and a == b


def check_consent_key(key: Any, field_name: str) -> None:
    if not isinstance(key, str) or not CONSENT_KEY_RE.match(key):
        raise InvalidArgument(
            field_name, f"{key!r} is not a consent key: use 'purpose:<Name>' or 'channel:<name>' (a name without NUL)"
        )
