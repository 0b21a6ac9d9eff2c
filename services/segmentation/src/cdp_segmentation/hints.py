"""Warnings for a definition that reads the held profiles wrong: an audience that is empty for a reason.

Traits and consent are open-ended, so a definition reading them is never refused (fields.py refuses only
scores and computed traits nothing writes). But `traits.vip = "true"` where every profile holds vip as
true/false, or `consent.purpose:Marketing` where the profiles' purpose is `marketing`, matches no one and
says nothing. `CreateSegment`, `UpdateSegment` and `Estimate` therefore answer with warnings naming the
field and what the held profiles have there:

- a field compared with a literal (=, !=, <, <=, >, >=, in, starts_with) of a type no held profile has in
  it, while some have a value of another type: "traits.vip is compared with text, but the profiles hold
  true/false there";
- a consent key no held profile has: "consent.purpose:Marketing: no profile has this consent key; known:
  consent.purpose:marketing, ...";
- a trait no held profile has, with the names close to it.

What is held is this replica's persons (all of them, or its partitions' when replicas split them). Nothing
is said when no person is held (a new platform), nor about `exists`, comparisons with another field, a
percentile or a time. Warnings name fields and types, never values: a definition's literals are customer
data. Cost: one pass over the held persons per field compared (stopping at the first value of the
literal's type; about 0.3 s per million persons, yielding to the stream every CHUNK persons), and, when a
field is held by no one, one over the keys of at most NAMES_FROM persons for the names close to it.
"""

from __future__ import annotations

import asyncio
import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from cdp_kit.profile_fields import CONSENT, TRAITS
from cdp_lang.nodes import And, Condition, Date, FieldRef, Not, Now, Or, Percentile, path_key

CHECKED_OPS = ("=", "!=", "<", "<=", ">", ">=", "in", "starts_with")
LISTED = 8  # known names a warning lists at most
CHUNK = 65_536  # persons read between two yields to the event loop
NAMES_FROM = 100_000  # persons whose keys give the names close to an unknown one

_KIND_NAMES = {"text": "text", "bool": "true/false", "number": "a number", "list": "a list", "object": "an object"}


def kind_of(value: Any) -> str | None:
    """The type a value has in the language's terms (None: no value)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, str):
        return "text"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, dict):
        return "object"
    return None


async def definition_warnings(node: Any, fields: Iterable[Mapping[str, Any]]) -> list[str]:
    """The warnings for a definition (its node) over the held persons' flat fields (each person's mapping)."""
    rows = fields if isinstance(fields, list) else list(fields)
    if not rows:
        return []
    found: list[str] = []
    seen: set[tuple[str, tuple[str, ...], frozenset[str]]] = set()
    for condition in _conditions(node):
        root = condition.path[0]
        if root not in (TRAITS, CONSENT) or condition.op not in CHECKED_OPS:
            continue
        value = condition.value
        if isinstance(value, FieldRef | Percentile | Now | Date):
            continue
        wanted = frozenset(k for v in (value if isinstance(value, tuple) else (value,)) if (k := kind_of(v)))
        key = (condition.field, condition.sub, wanted)
        if key in seen or not wanted:
            continue
        seen.add(key)
        held = await _kinds_held(rows, condition.field, condition.sub, wanted)
        name = path_key(condition.path)
        if held is None:
            continue  # some profile holds a value of a type it is compared with
        if held:
            compared = " or ".join(sorted(_KIND_NAMES[k] for k in wanted))
            holds = " and ".join(sorted(_KIND_NAMES[k] for k in held))
            found.append(f"{name} is compared with {compared}, but the profiles hold {holds} there")
        elif not condition.sub:
            found.append(_unknown(root, condition.field, rows))
        else:
            found.append(f"{name}: no profile has a value there")
    return found


async def _kinds_held(
    rows: list[Mapping[str, Any]], field: str, sub: tuple[str, ...], wanted: frozenset[str]
) -> set[str] | None:
    """The kinds the persons hold in the field, or None as soon as one holds a wanted kind."""
    held: set[str] = set()
    for start in range(0, len(rows), CHUNK):
        if start:
            await asyncio.sleep(0)  # the stream goes on between chunks
        for fields in rows[start : start + CHUNK]:
            value = fields.get(field)
            for step in sub:
                value = value.get(step) if isinstance(value, dict) else None
            kind = kind_of(value)
            if kind is None:
                continue
            if kind in wanted:
                return None
            held.add(kind)
    return held


def _unknown(root: str, field: str, rows: list[Mapping[str, Any]]) -> str:
    prefix = root + "."
    keys: set[str] = set()
    for fields in rows[:NAMES_FROM]:  # set.update per person: the keys are few, the persons many
        keys.update(fields)
    names = sorted(k for k in keys if k.startswith(prefix))
    what = "consent key" if root == CONSENT else "trait"
    # by name (the shared root would make every key look close)
    name, by_name = field[len(prefix) :], {n[len(prefix) :]: n for n in names}
    close = [by_name[n] for n in difflib.get_close_matches(name, sorted(by_name), n=3, cutoff=0.6)]
    close += [n for n in names if n not in close and n.lower() == field.lower()]
    if close:
        return f"{_shown(field)}: no profile has this {what}; did you mean {' or '.join(map(_shown, close[:3]))}?"
    if names:
        more = f" and {len(names) - LISTED} more" if len(names) > LISTED else ""
        return f"{_shown(field)}: no profile has this {what}; known: {', '.join(map(_shown, names[:LISTED]))}{more}"
    return f"{_shown(field)}: no profile has this {what}; no profile has any {root} field"


def _shown(key: str) -> str:
    """A flat field key as a definition names it: `consent.`purpose:ads.personalised`` for the consent key
    `purpose:ads.personalised` (`path_key`), so a name a warning suggests reads back as that field."""
    root, _, name = key.partition(".")
    return path_key((root, name))


def _conditions(node: Any) -> list[Condition]:
    if isinstance(node, Not):
        return _conditions(node.operand)
    if isinstance(node, And | Or):
        return [c for operand in node.operands for c in _conditions(operand)]
    return [node] if isinstance(node, Condition) else []
