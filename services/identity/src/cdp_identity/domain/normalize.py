"""Identifier normalisation: the same person written two ways must become one key.

Emails are trimmed and lower-cased, phones become E.164 (`+4915112345678`), `lower` folds case, `exact`
only trims. A type with `hash` stores the SHA-256 hex of the normalised value (a value that already is a
64-digit hex digest is taken as pre-hashed by the client). The result is a key `"<type>:<value>"`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache

import phonenumbers

from cdp_identity.domain.rules import IdentifierType, MergeRules

MAX_VALUE_CHARS = 512
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}\Z")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+\Z")


@dataclass(frozen=True, slots=True)
class Identifier:
    """One normalised identifier: `key` is what the graph stores (`"email:ada@example.com"`)."""

    type: str
    value: str
    priority: int
    # Computed once: the graph reads it several times per event, and normalised identifiers are cached.
    key: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.type}:{self.value}")


@dataclass(frozen=True, slots=True)
class Rejected:
    """An identifier that cannot take part in linking, and why (`blocked`, `invalid`, `unknown_type`)."""

    type: str
    value: str
    reason: str


def split_key(key: str) -> tuple[str, str]:
    kind, _, value = key.partition(":")
    return kind, value


class Normalizer:
    """Normalises raw (type, value) pairs under one set of rules; results are cached (hot identifiers
    repeat on almost every event)."""

    def __init__(self, rules: MergeRules, cache_size: int = 262_144, events_cache_size: int = 32_768) -> None:
        self.rules = rules
        self.normalize_one = lru_cache(maxsize=cache_size)(self._normalize_one)
        # Whole events' pairs too: a person's events carry the same ones over and over. Bounded (about
        # 500 bytes an entry): past `events_cache_size` entries it starts again.
        self._events: dict[tuple[tuple[str, str], ...], tuple[tuple[Identifier, ...], tuple[Rejected, ...]]] = {}
        self._events_limit = events_cache_size

    def normalize(self, pairs: list[tuple[str, str]]) -> tuple[list[Identifier], list[Rejected]]:
        """Normalised identifiers (deduplicated, strongest first) and the rejected ones (new lists each
        call: the caller may change them)."""
        key = tuple(pairs)
        known = self._events.get(key)
        if known is None:
            if len(self._events) >= self._events_limit:
                self._events.clear()
            accepted, rejected = self._normalize(pairs)
            known = self._events[key] = (tuple(accepted), tuple(rejected))
        return list(known[0]), list(known[1])

    def _normalize(self, pairs: list[tuple[str, str]]) -> tuple[list[Identifier], list[Rejected]]:
        accepted: dict[str, Identifier] = {}
        rejected: list[Rejected] = []
        for kind, value in pairs:
            result = self.normalize_one(kind, value)
            if isinstance(result, Rejected):
                rejected.append(result)
            else:
                accepted.setdefault(result.key, result)
        ordered = sorted(accepted.values(), key=lambda i: (i.priority, i.value))
        return ordered, rejected

    def _normalize_one(self, kind_name: str, value: str) -> Identifier | Rejected:
        kind = self.rules.type(kind_name)
        if kind is None:
            return Rejected(kind_name, _redact(value), "unknown_type")
        if not isinstance(value, str) or "\x00" in value:
            # A NUL cannot be part of a stored key on any backend: such a value identifies nothing.
            return Rejected(kind_name, "", "invalid")
        if self.rules.is_blocked(kind, value):
            return Rejected(kind_name, _redact(value), "blocked")
        normalized = self._apply(kind, value.strip())
        if normalized is None or len(normalized) > MAX_VALUE_CHARS:
            return Rejected(kind_name, _redact(value), "invalid")
        if kind.hash:
            if _SHA256_HEX.match(normalized.lower()):
                normalized = normalized.lower()  # pre-hashed by the client, in either hex case
            else:
                normalized = hashlib.sha256(normalized.encode()).hexdigest()
        return Identifier(kind.name, normalized, kind.priority)

    def _apply(self, kind: IdentifierType, value: str) -> str | None:
        if kind.normalize == "email":
            folded = value.lower()
            if kind.hash and _SHA256_HEX.match(folded):
                return folded
            return folded if _EMAIL.match(folded) else None
        if kind.normalize == "phone":
            if kind.hash and _SHA256_HEX.match(value.lower()):
                return value.lower()
            try:
                number = phonenumbers.parse(value, self.rules.default_phone_region)
            except phonenumbers.NumberParseException:
                return None
            if not phonenumbers.is_possible_number(number):
                return None
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
        if kind.normalize == "lower":
            return value.lower() or None
        return value or None


def _redact(value: object) -> str:
    """Rejected values are reported, not stored in full: keep a short, recognisable prefix."""
    text = str(value)
    return text if len(text) <= 4 else text[:4] + "…"
