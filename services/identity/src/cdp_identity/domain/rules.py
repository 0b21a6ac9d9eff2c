"""Merge rules: which identifier types exist, their priority, limits, blocked values and normalisation.

Rules are configuration (a JSON document, `CDP_IDENTITY_RULES_FILE`), not code. The list order of `types`
is the priority: the first type is the strongest evidence of who someone is. When an event would break a
limit, the lowest-priority identifier is dropped from that event's linking (and the drop is recorded).

    {
      "types": [
        {"name": "user_id", "limit": 1},
        {"name": "email", "normalize": "email", "limit": 5, "window": "7d", "hash": false},
        {"name": "device_id", "quarantine_after": 3},
        {"name": "loyalty_id", "paths": ["traits.loyalty_id", "properties.loyalty_id"], "limit": 1}
      ],
      "blocked": {"values": ["guest"], "patterns": ["^test-"]},
      "quarantine_window": "30d",
      "default_phone_region": "DE"
    }
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import phonenumbers

from cdp_kit.durations import parse_duration
from cdp_kit.errors import InvalidArgument

NORMALIZERS = ("email", "phone", "lower", "exact")
TYPE_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}\Z")

# Values clients send when they have no identifier; linking on them would glue strangers together.
DEFAULT_BLOCKED_VALUES = frozenset(
    {
        "",
        "null",
        "none",
        "nil",
        "undefined",
        "anonymous",
        "unknown",
        "guest",
        "n/a",
        "na",
        "nan",
        "0",
        "-1",
        "[object object]",
        "true",
        "false",
    }
)
DEFAULT_BLOCKED_PATTERNS = (r"^[0-]*$",)

_CRM_IDS = ("salesforce_id", "hubspot_id", "dynamics_id", "zoho_id")


def _default_types() -> list[dict[str, Any]]:
    # No limit on CRM ids: one person often has several records in a CRM (the duplicates matching
    # exists to find), and merging them must stay possible.
    crm = [
        {
            "name": name,
            "paths": [f"traits.{name}", f"context.traits.{name}", f"context.externalIds.{name}"],
        }
        for name in _CRM_IDS
    ]
    return [
        {"name": "user_id", "limit": 1, "paths": ["user_id"]},
        *crm,
        {"name": "email", "normalize": "email", "limit": 5, "paths": ["traits.email", "context.traits.email"]},
        {
            "name": "phone",
            "normalize": "phone",
            "limit": 3,
            "quarantine_after": 5,
            "paths": ["traits.phone", "context.traits.phone"],
        },
        {"name": "device_id", "limit": 20, "quarantine_after": 3, "paths": ["context.device.id"]},
        {"name": "anonymous_id", "quarantine_after": 5, "paths": ["anonymous_id"]},
    ]


@dataclass(frozen=True)
class IdentifierType:
    name: str
    priority: int  # 0 is the strongest
    normalize: str = "exact"
    limit: int | None = None  # most identifiers of this type on one person
    window: float | None = None  # seconds: the limit counts only identifiers added this recently
    hash: bool = False  # store SHA-256 of the normalised value instead of the value
    paths: tuple[str, ...] = ()
    blocked_values: frozenset[str] = frozenset()
    blocked_patterns: tuple[re.Pattern[str], ...] = ()
    quarantine_after: int | None = None  # distinct persons within the quarantine window
    # What an event of a browser or mobile source (Event.source_trust not SERVER) may do with this type:
    # "never" (left out: client_source), "verified" (one another person holds is left out unless the
    # source verified the event's user id: unverified_claim), "always" (links as from a server).
    from_client: str = "always"


FROM_CLIENT = ("never", "verified", "always")
# Defaults of the built-in types: a CRM id comes from the CRM, never from a browser; a user id, email or
# phone names a person, whom a visitor may not take over by sending it (when its source verifies).
_FROM_CLIENT_DEFAULTS = {
    **dict.fromkeys(_CRM_IDS, "never"),
    "user_id": "verified",
    "email": "verified",
    "phone": "verified",
}


@dataclass(frozen=True)
class MergeRules:
    types: tuple[IdentifierType, ...]
    blocked_values: frozenset[str] = DEFAULT_BLOCKED_VALUES
    blocked_patterns: tuple[re.Pattern[str], ...] = field(
        default_factory=lambda: tuple(re.compile(p) for p in DEFAULT_BLOCKED_PATTERNS)
    )
    quarantine_window: float = 30 * 86400.0
    default_phone_region: str = "US"

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {t.name: t for t in self.types})

    def type(self, name: str) -> IdentifierType | None:
        return self._by_name.get(name)  # type: ignore[attr-defined]

    def require_type(self, name: str, field_name: str = "type") -> IdentifierType:
        found = self.type(name)
        if found is None:
            known = ", ".join(t.name for t in self.types)
            raise InvalidArgument(field_name, f"unknown identifier type {name!r}; configured types: {known}")
        return found

    def is_blocked(self, kind: IdentifierType, value: str) -> bool:
        folded = value.strip().lower()
        if folded in self.blocked_values or folded in kind.blocked_values:
            return True
        return any(p.search(folded) for p in self.blocked_patterns) or any(
            p.search(folded) for p in kind.blocked_patterns
        )

    @classmethod
    def default(cls) -> MergeRules:
        return cls.from_dict({})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MergeRules:
        if not isinstance(data, Mapping):
            raise InvalidArgument("rules", "must be a JSON object")
        unknown = set(data) - {
            "types",
            "blocked",
            "quarantine_window",
            "default_phone_region",
            "replace_default_blocked",
        }
        if unknown:
            raise InvalidArgument(f"rules.{sorted(unknown)[0]}", "unknown setting")
        raw_types = data.get("types", _default_types())
        if not isinstance(raw_types, list) or not raw_types:
            raise InvalidArgument("types", "must be a non-empty list (its order is the priority)")
        types = []
        seen: set[str] = set()
        for index, raw in enumerate(raw_types):
            kind = _parse_type(raw, index)
            if kind.name in seen:
                raise InvalidArgument(f"types[{index}].name", f"{kind.name!r} is declared twice")
            seen.add(kind.name)
            types.append(kind)
        blocked = data.get("blocked", {})
        if not isinstance(blocked, Mapping):
            raise InvalidArgument("blocked", 'must be an object {"values": [...], "patterns": [...]}')
        values, patterns = _parse_blocked(blocked, "blocked")
        replace_default = data.get("replace_default_blocked", False)
        if not isinstance(replace_default, bool):
            raise InvalidArgument("replace_default_blocked", f"{replace_default!r} must be true or false")
        if not replace_default:
            values |= DEFAULT_BLOCKED_VALUES
            patterns = tuple(re.compile(p) for p in DEFAULT_BLOCKED_PATTERNS) + patterns
        region = data.get("default_phone_region", "US")
        if not isinstance(region, str) or region not in phonenumbers.SUPPORTED_REGIONS:
            raise InvalidArgument("default_phone_region", f"{region!r} is not an ISO 3166 alpha-2 region like 'DE'")
        window = parse_duration(data.get("quarantine_window", "30d"), "quarantine_window")
        return cls(
            types=tuple(types),
            blocked_values=values,
            blocked_patterns=patterns,
            quarantine_window=window,
            default_phone_region=region,
        )


def _parse_blocked(blocked: Mapping[str, Any], prefix: str) -> tuple[frozenset[str], tuple[re.Pattern[str], ...]]:
    values = blocked.get("values", [])
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise InvalidArgument(f"{prefix}.values", "must be a list of strings")
    raw_patterns = blocked.get("patterns", [])
    if not isinstance(raw_patterns, list):
        raise InvalidArgument(f"{prefix}.patterns", "must be a list of regular expressions")
    patterns = []
    for i, pattern in enumerate(raw_patterns):
        try:
            patterns.append(re.compile(pattern))
        except (re.error, TypeError) as exc:
            raise InvalidArgument(
                f"{prefix}.patterns[{i}]", f"{pattern!r} is not a regular expression: {exc}"
            ) from None
    return frozenset(v.strip().lower() for v in values), tuple(patterns)


def _parse_type(raw: Any, index: int) -> IdentifierType:
    where = f"types[{index}]"
    if not isinstance(raw, Mapping):
        raise InvalidArgument(where, 'must be an object like {"name": "email", "limit": 5}')
    allowed = {"name", "normalize", "limit", "window", "hash", "paths", "blocked", "quarantine_after", "from_client"}
    unknown = set(raw) - allowed
    if unknown:
        raise InvalidArgument(
            f"{where}.{sorted(unknown)[0]}", f"unknown setting; allowed: {', '.join(sorted(allowed))}"
        )
    name = raw.get("name")
    if not isinstance(name, str) or not TYPE_NAME_RE.match(name):
        raise InvalidArgument(f"{where}.name", f"{name!r} is not a type name: lower-case letters, digits, _")
    defaults = {t["name"]: t for t in _default_types()}.get(name, {})
    normalize = raw.get("normalize", defaults.get("normalize", "exact"))
    if normalize not in NORMALIZERS:
        raise InvalidArgument(f"{where}.normalize", f"{normalize!r} is not one of {', '.join(NORMALIZERS)}")
    # A listed built-in type keeps its default limit and quarantine unless the entry says otherwise
    # (null switches them off).
    limit = raw.get("limit", defaults.get("limit"))
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidArgument(f"{where}.limit", f"{limit!r} must be a positive integer (or absent for no limit)")
    window = raw.get("window")
    if window is not None:
        if limit is None:
            raise InvalidArgument(f"{where}.window", "a window only makes sense with a limit")
        window = parse_duration(window, f"{where}.window")
    hashed = raw.get("hash", False)
    if not isinstance(hashed, bool):
        raise InvalidArgument(f"{where}.hash", "must be true or false")
    paths = raw.get("paths", defaults.get("paths", [f"traits.{name}", f"context.traits.{name}"]))
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise InvalidArgument(f"{where}.paths", "must be a non-empty list of event paths like 'traits.email'")
    quarantine_after = raw.get("quarantine_after", defaults.get("quarantine_after"))
    if quarantine_after is not None and (
        isinstance(quarantine_after, bool) or not isinstance(quarantine_after, int) or quarantine_after < 2
    ):
        raise InvalidArgument(f"{where}.quarantine_after", f"{quarantine_after!r} must be an integer of at least 2")
    blocked = raw.get("blocked", {})
    if not isinstance(blocked, Mapping):
        raise InvalidArgument(f"{where}.blocked", 'must be an object {"values": [...], "patterns": [...]}')
    values, patterns = _parse_blocked(blocked, f"{where}.blocked")
    from_client = raw.get("from_client", _FROM_CLIENT_DEFAULTS.get(name, "always"))
    if from_client not in FROM_CLIENT:
        raise InvalidArgument(f"{where}.from_client", f"{from_client!r} is not one of {', '.join(FROM_CLIENT)}")
    return IdentifierType(
        name=name,
        priority=index,
        normalize=normalize,
        limit=limit,
        window=window,
        hash=hashed,
        paths=tuple(paths),
        blocked_values=values,
        blocked_patterns=patterns,
        quarantine_after=quarantine_after,
        from_client=from_client,
    )
