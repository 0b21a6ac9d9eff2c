"""What segmentation holds about a person, for the person's access request (`PrivacyService/ExportPerson`).

Per person asked for (`person_id`, then each merged person still held under its own id): its
memberships (segment id, and since when, RFC 3339) and the copy of its profile fields that the segments'
conditions read (`fields`, as held: flat names such as `traits.plan`, `scores.churn`). Segmentation does
not keep why a person entered a segment (the `segments.entered` entry said so when it was published),
so a membership has no reason. A person segmentation never held: an empty document.

Each replica holds the persons of its partitions only (`engine.active`: loaded and brought up to date).
A person of another partition is asked of the replica holding it (`cdp_kit.person_export.Owners`), and
its entry put in the answer in the order asked; a replica that cannot reach that one answers UNAVAILABLE
naming the partition, so no person held elsewhere is ever answered with "nothing held". A standby
replica (`CDP_SEGMENTATION_STANDBY`) holds every partition and answers for everyone itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cdp_kit.person_export import Owners, rfc3339
from cdp_segmentation.engine import SegmentationEngine


def _held(engine: SegmentationEngine, person_id: str) -> dict[str, Any] | None:
    person = engine.persons.get(person_id)
    if person is None:
        return None
    return {
        "person_id": person_id,
        "memberships": [
            {"segment_id": segment_id, "since": rfc3339(since)} for segment_id, since in sorted(person.members.items())
        ],
        "fields": dict(sorted(person.fields.items())),
    }


async def export_person(
    engine: SegmentationEngine,
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
