"""What a person projects to in the CRM, per mapping, and whether a change needs a write.

`project(mapping, source)` is the CRM record a person maps to: its match key and field values. In upsert
and update_only modes a missing source leaves the CRM's value alone (the field is left out); in mirror mode
it clears it (None). A value a transform cannot handle counts as missing, never as an error stopping the
record. `changed_fields(previous, current)` is what a write must carry (empty: nothing mapped changed, no
API call); `reads(mapping)` is the set of flat keys a mapping reads, so a profile change touching none of
them is skipped without projecting (`touches`).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cdp_crm.domain.coalesce import Link, task_key
from cdp_crm.domain.mapping import ACTION, PERSON_ID, FieldMapping, ObjectMapping, Transform, map_key
from cdp_crm.domain.mapping_model import SEGMENTS

# --- projection -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """What a mapping reads about one person: flat profile fields, segment ids, and the action if any."""

    person_id: str
    profile: Mapping[str, Any] = field(default_factory=dict)
    segments: frozenset[str] = frozenset()
    action: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Projection:
    """The CRM record a person maps to: its match key (CRM field -> value) and the mapped field values."""

    mapping: str
    key: tuple[tuple[str, str], ...]
    fields: Mapping[str, Any]
    link: Link | None = None  # for a task or case: the person's record it is about
    # False: the person holds no value the mapping reads (`held`); written only over a record written before
    # (a mirror clearing it), never as a new record holding only its match key.
    holds: bool = True

    @property
    def key_values(self) -> dict[str, str]:
        return dict(self.key)


@dataclass(frozen=True)
class Skipped:
    """Why a person maps to no record: the match key's source is empty (nothing to upsert by)."""

    mapping: str
    field: str
    reason: str = "match_key_missing"  # or NO_MAPPED_VALUE: the person holds none of the mapped fields


_MISSING = object()
NO_MAPPED_VALUE = "no_mapped_value"


def reads(mapping: ObjectMapping) -> frozenset[str]:
    """The flat profile keys (and `segments`, `segments.<id>`) whose change can change the projection."""
    # Kept on the (frozen) mapping once computed, as functools.cached_property does: a batch asks for every
    # person it projects.
    found = mapping.__dict__.get("_reads")
    if found is None:
        keys = {fm.source for fm in (*mapping.match, *mapping.fields) if fm.source is not None}
        if mapping.segment is not None:
            keys.add(f"{SEGMENTS}.{mapping.segment}")
        found = frozenset(k for k in keys if k != PERSON_ID and not k.startswith(ACTION + "."))
        mapping.__dict__["_reads"] = found
    return found


def touches(mapping: ObjectMapping, changed_keys: set[str] | frozenset[str]) -> bool:
    """True when a profile change naming `changed_keys` may change what this mapping writes."""
    wanted = reads(mapping)
    if SEGMENTS in wanted and any(k.startswith(SEGMENTS + ".") for k in changed_keys):
        return True
    return not wanted.isdisjoint(changed_keys)


def held(source: Source) -> frozenset[str]:
    """The keys `touches` takes that this person holds a value for: its profile fields with a value and
    `segments.<id>` for each segment it is in. The stream writes a person only when a value a mapping
    reads changes (`touches`), so one for whom `touches(mapping, held(source))` is false was never written
    by it: a backfill skips them too rather than make a record holding only its match key."""
    fields = (k for k, v in source.profile.items() if v is not None)
    return frozenset((*fields, *(f"{SEGMENTS}.{s}" for s in source.segments)))


def holds_any(mapping: ObjectMapping, source: Source) -> bool:
    """`touches(mapping, held(source))`, without building `held`: whether the person holds a value of a key
    the mapping reads (with `segments` read, any segment will do)."""
    wanted = reads(mapping)
    prefix = SEGMENTS + "."
    if SEGMENTS in wanted and (
        source.segments or any(k.startswith(prefix) and v is not None for k, v in source.profile.items())
    ):
        return True
    for key in wanted:
        if source.profile.get(key) is not None:
            return True
        if key.startswith(prefix) and key[len(prefix) :] in source.segments:
            return True
    return False


def marked(mapping: ObjectMapping, source: Source, projection: Projection | Skipped) -> Projection | Skipped:
    """`projection` with `holds` false when `source` holds none of the values `mapping` reads - the persons
    a backfill skips (`held`): the stream writes them only over a record it wrote before."""
    if isinstance(projection, Projection) and not holds_any(mapping, source):
        return replace(projection, holds=False)
    return projection


def in_scope(mapping: ObjectMapping, source: Source) -> bool:
    """False when the mapping is limited to a segment the person is not in."""
    return mapping.segment is None or mapping.segment in source.segments


def project(mapping: ObjectMapping, source: Source, about: ObjectMapping | None = None) -> Projection | Skipped:
    """The record `source` maps to. Field values are plain JSON values (None clears, in mirror mode).

    For an action mapping with `about`, pass that record mapping: the task or case links to the person's
    record of it (no link when the person has no match key there: the task still matters more)."""
    key: list[tuple[str, str]] = []
    match = mapping.match
    if mapping.kind == "action":
        action_id = (source.action or {}).get("id")
        if not action_id or mapping.idempotency_field is None:
            return Skipped(mapping.name, "action.id")
        key.append((mapping.idempotency_field, task_key(mapping.connection, mapping.id, str(action_id))))
    for fm in match:
        value = _value(fm, source)
        if value is _MISSING or value is None or value == "":
            return Skipped(mapping.name, f"match.{fm.crm_field}")
        key.append((fm.crm_field, str(value)))
    fields: dict[str, Any] = {}
    for fm in mapping.fields:
        value = _value(fm, source)
        if value is _MISSING:
            if mapping.mode == "mirror":
                fields[fm.crm_field] = None
            continue
        fields[fm.crm_field] = value
    link = None
    if mapping.about is not None and about is not None:
        target = project(about, source)
        if isinstance(target, Projection):
            link = Link(about.object, target.key, mapping.about.field)
    return Projection(mapping.name, tuple(key), fields, link)


def cleared(mapping: ObjectMapping, source: Source) -> Projection | Skipped:
    """What mirror mode writes for a person who left the mapping's segment: the same record with every
    mapped field cleared (None). For a list mapping the change is a REMOVE of the membership instead
    (`coalesce.REMOVE`); its fields are empty either way."""
    current = project(mapping, source)
    if isinstance(current, Skipped):
        return current
    fields = {} if mapping.kind == "list" else {fm.crm_field: None for fm in mapping.fields}
    return Projection(current.mapping, current.key, fields)


def changed_fields(previous: Projection | None, current: Projection) -> dict[str, Any]:
    """The fields a write must carry: all of them for a record never written, else those whose value
    differs from what was last written (empty: no write)."""
    if previous is None or previous.key != current.key:
        return dict(current.fields)
    return {k: v for k, v in current.fields.items() if k not in previous.fields or previous.fields[k] != v}


def _value(fm: FieldMapping, source: Source) -> Any:
    if fm.source is None:
        return fm.value
    value = _read(fm.source, source)
    if value is _MISSING or value is None:
        return _MISSING if fm.default is None else fm.default
    for transform in fm.transforms:
        value = _apply(transform, value)
        if value is None:
            return _MISSING if fm.default is None else fm.default
    if fm.translate is not None:
        key = map_key(value)
        if key in fm.translate:
            value = fm.translate[key]
    return _whole(value)


def _whole(value: Any) -> Any:
    """A whole float as an int: the profile holds every number as a double, and 12345.0 goes out as JSON
    `12345.0`, which a CRM's text field reads as "12345.0". As 12345 a text field reads "12345" and a number
    field still takes a number."""
    if type(value) is float and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _text(value: Any) -> str:
    """A value as a text transform reads it: whole floats without ".0", booleans as JSON spells them."""
    return map_key(value) if isinstance(value, bool | float) else str(value)


def _read(name: str, source: Source) -> Any:
    if name == PERSON_ID:
        return source.person_id
    if name == SEGMENTS:
        return sorted(source.segments)
    root, _, rest = name.partition(".")
    if root == SEGMENTS:
        return rest in source.segments
    if root == ACTION:
        return (source.action or {}).get(rest, _MISSING)
    return source.profile.get(name, _MISSING)


def _apply(transform: Transform, value: Any) -> Any:
    """One transform; None when the value cannot be transformed (treated as missing, never as an error
    that would stop the whole record)."""
    name = transform.name
    try:
        if name == "string":
            return _text(value)
        if name == "number":
            return _finite(float(value))
        if name == "integer":
            return _int64(int(float(value)))
        if name == "boolean":
            if isinstance(value, str):
                return value.strip().lower() in ("true", "yes", "1", "y")
            return bool(value)
        if name == "trim":
            return _text(value).strip()
        if name == "lower":
            return _text(value).lower()
        if name == "upper":
            return _text(value).upper()
        if name == "round":
            return round(_finite(float(value)), int(transform.arg or 0))
        if name == "truncate":
            return _text(value)[: int(transform.arg or 0)]
        if name == "join":
            items = value if isinstance(value, list | tuple | set | frozenset) else [value]
            return (transform.arg or ";").join(map_key(v) for v in items)
        if name in ("date", "datetime"):
            moment = _moment(value)
            if moment is None:
                return None
            moment = moment.astimezone(dt.UTC)  # "10:00+02:00" is 08:00Z, not 10:00Z
            return moment.date().isoformat() if name == "date" else moment.isoformat(timespec="seconds")[:19] + "Z"
    except (TypeError, ValueError, OverflowError, OSError):  # OSError: fromtimestamp(-1e18)
        return None
    raise AssertionError(f"unknown transform {name}")  # validation admits only the names above


def _finite(number: float) -> float:
    """`number`, or ValueError for NaN and the infinities: JSON has neither (they go out as null, which
    clears the CRM's value), and NaN never equals the value written before, so it would be written again
    at every change."""
    if not math.isfinite(number):
        raise ValueError("not a finite number")
    return number


def _int64(number: int) -> int:
    """`number`, or ValueError past the signed 64-bit range: no CRM integer field holds more (Dataverse's
    BigInt is 64-bit, Salesforce's widest number 18 digits), and the connector's store cannot hold the record
    of what was written - the batch failed at its commit and was run again until its message was
    dead-lettered, other persons' changes with it ("100000000000000000000" from a text trait)."""
    if not -(2**63) <= number < 2**63:
        raise ValueError("not a 64-bit integer")
    return number


def _moment(value: Any) -> dt.datetime | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = value / 1000 if value > 1e11 else value  # epoch milliseconds or seconds
        return dt.datetime.fromtimestamp(seconds, dt.UTC)
    if isinstance(value, str):
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
    return None
