"""What identity holds about a person, for the person's access request (`PrivacyService/ExportPerson`).

Per person asked for (`person_id`, then each merged person that is no longer part of it, e.g. split
away since): the graph's record of them - every identifier with its type and value (the person's own
data, returned to an authorised caller only: scope `privacy:export`), when it was attached and by which
merged person, its quarantine; the merges inside the person with their cause; its separations; the
identifiers dropped from its events. A person merged into `person_id` is part of its graph already.

Nothing of another person is given: a separation names only the person's own side (the other person is
someone else), and a dropped identifier that is not the person's own (it belongs to a person kept apart,
or a quarantined one) is given by its type only. A person identity does not know: an empty document.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cdp_identity.domain.normalize import split_key
from cdp_identity.engine import IdentityEngine
from cdp_kit.errors import NotFound
from cdp_kit.person_export import rfc3339


def _at(ms: int | None) -> str | None:
    return None if ms is None else rfc3339(ms / 1000)


def _person_document(engine: IdentityEngine, graph: dict[str, Any]) -> dict[str, Any]:
    own = {(i["type"], i["value"]) for i in graph["identifiers"]}
    root = engine.graph.persons.get(graph["person"])
    apart = root.apart if root is not None else {}
    identifiers = []
    for ident in graph["identifiers"]:
        state = engine.graph.identifiers.get(f"{ident['type']}:{ident['value']}")
        quarantined_at = state.quarantined_at if state is not None else None
        identifiers.append(
            {
                "type": ident["type"],
                "value": ident["value"],
                "added_at": _at(ident["added_at"]),
                "attached_to": ident["owner"],
                "quarantined": ident["quarantined"],
                "quarantined_at": _at(quarantined_at),
            }
        )
    merges = [
        {
            "merge_id": m["id"],
            "winner": m["winner"],
            "loser": m["loser"],
            "at": _at(m["at"]),
            "cause": dict(m.get("cause") or {}),
        }
        for m in graph["merges"]
    ]
    dropped = []
    for drop in graph["drops"]:
        kind, value = split_key(drop["identifier"])
        entry = {"type": kind, "reason": drop["reason"], "event_id": drop["event_id"], "at": _at(drop["at"])}
        if (kind, value) in own:
            entry["value"] = value
        dropped.append(entry)
    return {
        "person_id": graph["person"],
        "created_at": _at(graph["created_at"]),
        "identifiers": identifiers,
        "merges": merges,
        # A separation is (other person -> member of this one): only the member is the person's.
        "separations": [{"member": member} for member in sorted(apart.values())],
        "dropped_identifiers": dropped,
    }


async def export_person(engine: IdentityEngine, person_id: str, merged_person_ids: Sequence[str]) -> dict[str, Any]:
    persons: list[dict[str, Any]] = []
    seen: set[str] = set()
    for asked in (person_id, *merged_person_ids):
        try:
            graph = await engine.describe(asked)
        except NotFound:
            continue  # unknown, or deleted: nothing held under this id
        if graph["person"] in seen:
            continue  # merged into a person already given
        seen.add(graph["person"])
        persons.append(_person_document(engine, graph))
    return {"persons": persons} if persons else {}


__all__ = ["export_person"]
