"""An inbound event within the collector's size limit, whatever the CRM record holds."""

from __future__ import annotations

from typing import Any

import orjson

# An event stays within the collector's (Segment's) 32 KB an event, measured as it does (compact UTF-8 JSON):
# a CRM field can hold far more (a pasted email thread), and an event over it would be refused - or, alone
# in a request over 500 KB, the request would, and the object's cursor could never pass it.
EVENT_BYTES = 32 * 1024
KEEP_CHARS = 1024  # the most of a long property an event keeps
# Properties an event never loses: what says which record it is.
ID_PROPERTIES = frozenset({"crm", "connection", "object", "crm_id", "crm_contact_id", "cdp_person_id", "truncated"})


def _size(value: Any) -> int:
    return len(orjson.dumps(value, default=str))


def fit(event: dict[str, Any]) -> dict[str, Any] | None:
    """The event within `EVENT_BYTES`, or None when nothing can make it fit. A track's longest properties are
    cut (a text to `KEEP_CHARS` characters at most, halved again while still too large; anything else left
    out), each one named in `properties.truncated`. An identify's longest traits are left out, never cut: a
    trait is the person's value, and a shortened one would be a wrong value in the profile."""
    if _size(event) <= EVENT_BYTES:
        return event
    if event["type"] == "identify":
        traits = dict(event["traits"])
        while traits and _size({**event, "traits": traits}) > EVENT_BYTES:
            del traits[max(traits, key=lambda name: _size(traits[name]))]
        shrunk = {**event, "traits": traits}
        return shrunk if traits and _size(shrunk) <= EVENT_BYTES else None
    properties = dict(event["properties"])
    cut: set[str] = set()
    shrunk = event
    while _size(shrunk) > EVENT_BYTES:
        names = [name for name in properties if name not in ID_PROPERTIES]
        if not names:
            return None
        name = max(names, key=lambda n: _size(properties[n]))
        value = properties[name]
        if isinstance(value, str) and len(value) > 1:
            properties[name] = value[: min(KEEP_CHARS, len(value) // 2)]
        else:
            del properties[name]
        cut.add(name)
        shrunk = {**event, "properties": {**properties, "truncated": sorted(cut)}}
    return shrunk
