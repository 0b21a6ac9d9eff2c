"""What scoring holds about a person, for the person's access request (`PrivacyService/ExportPerson`).

Per person asked for (`person_id`, then each merged person still held under its own id): the copy of its
profile fields scoring holds (`fields`, every field it keeps for the person, as held: flat names such as
`traits.plan`, `computed.orders_30d`;
`last_change_at`, the time of the last profile change applied), and what its scores were when last
published, per model (`published`: the version and each score by name; see published.py), if any.
Scoring keeps nothing else under a person: scores themselves live on the profile, and the training runs
read the store's rows without keeping a copy per person. A person scoring never held: an empty document.

Each replica holds the persons of its partitions only (`engine.ready`: restored, up to the checkpoint).
A person of another partition is asked of the replica holding it (`cdp_kit.person_export.Owners`), and
its entry put in the answer in the order asked; a replica that cannot reach that one answers UNAVAILABLE
naming the partition, so no person held elsewhere is ever answered with "nothing held".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cdp_kit.person_export import Owners, rfc3339
from cdp_scoring.engine import CHANGED_AT, ScoringEngine
from cdp_scoring.published import EPOCH, PUBLISHED


def _published(engine: ScoringEngine, person_id: str, fields: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for model in sorted(m for m in fields.get(PUBLISHED) or {} if m != EPOCH):
        entry = engine.published.entry(person_id, model)
        if not entry:
            continue  # written under an earlier epoch: no longer what counts as published
        version, values = entry[0], list(entry[1:])
        registered = engine.registry.models.get(model)
        found = registered.versions.get(version) if registered is not None else None
        names = list(found.spec.score_names) if found is not None else None
        scores = dict(zip(names, values, strict=False)) if names and len(names) == len(values) else values
        out[model] = {"version": version, "scores": scores}
    return out


def _held(engine: ScoringEngine, person_id: str) -> dict[str, Any] | None:
    fields = engine.fields.get(person_id)
    if fields is None:
        return None
    changed_at = fields.get(CHANGED_AT)
    return {
        "person_id": person_id,
        "fields": {k: v for k, v in sorted(fields.items()) if not k.startswith("$")},
        "last_change_at": rfc3339(changed_at) if isinstance(changed_at, int | float) else None,
        "published": _published(engine, person_id, fields),
    }


async def export_person(
    engine: ScoringEngine,
    person_id: str,
    merged_person_ids: Sequence[str],
    owners: Owners | None = None,
    context: Any = None,
) -> dict[str, Any]:
    """The document (`owners` None: what this engine holds, as with one replica holding everything)."""
    persons = []
    for asked in (person_id, *merged_person_ids):
        if owners is not None and not owners.holds(asked):
            persons += (await owners.ask(asked, context)).get("persons", [])
            continue
        # Checked and read with no await between: the partition cannot leave in the middle.
        held = _held(engine, asked)
        if held is not None:
            persons.append(held)
    return {"persons": persons} if persons else {}


__all__ = ["export_person"]
