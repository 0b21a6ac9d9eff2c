"""What identity holds about a person, for the person's access request (`PrivacyService/ExportPerson`).

Per person asked for (`person_id`, then each merged person that is no longer part of it, e.g. split
away since): the graph's record of them - every identifier with its type and value (the person's own
data, returned to an authorised caller only: scope `privacy:export`), when it was attached and by which
merged person, its quarantine; the merges inside the person with their cause; its separations; the
merges undone between it and another person (`unmerged`, the trail GetGraph shows; both sides keep it);
the identifiers dropped from its events. A person merged into `person_id` is part of its graph already.

Nothing of another person is given: a separation names only the person's own side (the other person is
someone else), and a dropped identifier that is not the person's own (it belongs to a person kept apart,
or a quarantined one) is given by its type only. An undone merge (`merge_id`, `merged_at`, `undone_at`,
`undone_by`: the name of the token that undid it, `reason`) gives its `winner` and `loser` when that side
is the person's own (the person or one merged into them) and null for the other side. A merge's `cause`
(in `merges` and `unmerged`) gives the rule, the `detail` (an operator's or reviewer's words, as
written), the identifiers that caused it - the person's own with their value, another's by their type
only (one event can merge three persons, and an undo split one of them away again) - and, as a count
(`records`), the matched records it came from (their ids are not given: the graph does not say whose
they are, and a record id may be a user id); its `event_id` is null when it holds something it leaves
out. The free texts (`reason`, `detail`) are given as the operator wrote them. A person identity does
not know: an empty document.
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


def _cause(engine: IdentityEngine, cause: dict[str, Any], own: set[str]) -> dict[str, Any]:
    """A merge's cause as the person may see it (see the module docstring): nothing of anyone else."""
    identifiers: list[dict[str, str]] = []
    hidden: list[str] = []  # what the cause holds of someone else (or of no one the graph can say)
    records = 0
    for key in cause.get("identifiers") or []:
        kind, value = split_key(key)
        if key in own:
            identifiers.append({"type": kind, "value": value})
            continue
        hidden.append(key)
        if value and engine.normalizer.rules.type(kind) is not None:
            identifiers.append({"type": kind})  # another person's identifier (split away since)
        else:
            records += 1  # a matched record's id (matching's cause): whose, the graph does not say
    event_id = cause.get("event_id", "")
    if any(key in event_id or (split_key(key)[1] and split_key(key)[1] in event_id) for key in hidden):
        event_id = None  # matching's "<rule>:<record>:<record>", or an id carrying another's value
    return {
        "rule": cause.get("rule", ""),
        "detail": cause.get("detail", ""),
        "event_id": event_id,
        "identifiers": identifiers,
        "records": records,
    }


def _undone(engine: IdentityEngine, undone: dict[str, Any], own: set[str], members: set[str]) -> dict[str, Any]:
    """An undone merge as the person may see it: the other side's person id is null."""
    return {
        "merge_id": undone["id"],
        "winner": undone["winner"] if undone["winner"] in members else None,
        "loser": undone["loser"] if undone["loser"] in members else None,
        "merged_at": _at(undone["at"]),
        "undone_at": _at(undone["undone_at"]),
        "undone_by": undone.get("undone_by", ""),
        "reason": undone.get("reason", ""),
        "cause": _cause(engine, undone.get("cause") or {}, own),
    }


def _person_document(engine: IdentityEngine, graph: dict[str, Any]) -> dict[str, Any]:
    own = {(i["type"], i["value"]) for i in graph["identifiers"]}
    own_keys = {f"{kind}:{value}" for kind, value in own}
    # The person and everyone merged into them: the sides of an undone merge that are the person's own.
    members = {graph["person"], *(p for m in graph["merges"] for p in (m["winner"], m["loser"]))}
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
            "cause": _cause(engine, m.get("cause") or {}, own_keys),
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
        "unmerged": [_undone(engine, undone, own_keys, members) for undone in graph["undone"]],
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
