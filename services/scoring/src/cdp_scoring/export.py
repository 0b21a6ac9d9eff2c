"""What scoring holds about a person, for the person's access request (`PrivacyService/ExportPerson`).

Per person asked for (`person_id`, then each merged person still held under its own id): the copy of its
profile fields the models read (`fields`, as held: flat names such as `traits.plan`, `computed.orders_30d`;
`last_change_at`, the time of the last profile change applied), and what its scores were when last
published, per model (`published`: the version and each score by name; see published.py), if any.
Scoring keeps nothing else under a person: scores themselves live on the profile, and the training runs
read the store's rows without keeping a copy per person. The persons answered for are those of the
partitions this replica holds (all of them with one replica). A person scoring never held: an empty
document.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cdp_kit.person_export import rfc3339
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


async def export_person(engine: ScoringEngine, person_id: str, merged_person_ids: Sequence[str]) -> dict[str, Any]:
    persons = []
    for asked in (person_id, *merged_person_ids):
        fields = engine.fields.get(asked)
        if fields is None:
            continue
        changed_at = fields.get(CHANGED_AT)
        persons.append(
            {
                "person_id": asked,
                "fields": {k: v for k, v in sorted(fields.items()) if not k.startswith("$")},
                "last_change_at": rfc3339(changed_at) if isinstance(changed_at, int | float) else None,
                "published": _published(engine, asked, fields),
            }
        )
    return {"persons": persons} if persons else {}


__all__ = ["export_person"]
