"""What segmentation holds about a person, for the person's access request (`PrivacyService/ExportPerson`).

Per person asked for (`person_id`, then each merged person still held under its own id): its
memberships (segment id, and since when, RFC 3339) and the copy of its profile fields that the segments'
conditions read (`fields`, as held: flat names such as `traits.plan`, `scores.churn`). Segmentation does
not keep why a person entered a segment (the `segments.entered` entry said so when it was published),
so a membership has no reason. The persons answered for are those of the partitions this replica holds
(all of them with one replica). A person segmentation never held: an empty document.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cdp_kit.person_export import rfc3339
from cdp_segmentation.engine import SegmentationEngine


async def export_person(engine: SegmentationEngine, person_id: str, merged_person_ids: Sequence[str]) -> dict[str, Any]:
    persons = []
    for asked in (person_id, *merged_person_ids):
        person = engine.persons.get(asked)
        if person is None:
            continue
        persons.append(
            {
                "person_id": asked,
                "memberships": [
                    {"segment_id": segment_id, "since": rfc3339(since)}
                    for segment_id, since in sorted(person.members.items())
                ],
                "fields": dict(sorted(person.fields.items())),
            }
        )
    return {"persons": persons} if persons else {}


__all__ = ["export_person"]
