"""The journeys every replica runs, read from the store and kept parsed in memory.

A journey is stored as one record (`orchestration_journeys`, keyed by journey id) holding its state, its
published versions as written, and its draft:

    {"state": "active", "versions": {"1": {...document...}}, "draft": null | {...},
     "created_at": 1733300000.0, "updated_at": ..., "published_at": ...}

A published version never changes, so a parsed `Journey` is cached for good; the record's state and its
draft are read again whenever the API changes the journey (and, on other replicas, when the change is
announced on `orchestration.journeys.changed`). The engine reads only `live()` (journeys taking entries)
and `version(id, v)` (any published version a running instance is on).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from cdp_kit.errors import NotFound
from cdp_kit.storage import Put, Store
from cdp_orchestration.domain.document import parse_journey
from cdp_orchestration.domain.journey import Journey
from cdp_orchestration.domain.lifecycle import JourneyRecord, State

JOURNEYS = "orchestration_journeys"


def record_doc(record: JourneyRecord, previous: Mapping[str, Any] | None, now: float) -> dict[str, Any]:
    previous = previous or {}
    published = set(record.versions) - {int(v) for v in previous.get("versions", {})}
    return {
        "state": record.state.value,
        "versions": {str(v): dict(j.document) for v, j in sorted(record.versions.items())},
        "draft": dict(record.draft.document) if record.draft is not None else None,
        "name": (record.draft or record.live).name if (record.draft or record.live) else "",  # type: ignore[union-attr]
        "priority": (record.draft or record.live).priority if (record.draft or record.live) else 0,  # type: ignore[union-attr]
        "created_at": previous.get("created_at", now),
        "updated_at": now,
        "published_at": now if published else previous.get("published_at"),
    }


class Journeys:
    """Parsed journey records, by id."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.records: dict[str, JourneyRecord] = {}
        self.docs: dict[str, dict[str, Any]] = {}
        self._versions: dict[tuple[str, int], Journey] = {}

    async def load(self) -> None:
        async for stored in self.store.scan_all(JOURNEYS):
            self._take(stored.key, stored.doc)

    async def reload(self, journey_id: str) -> JourneyRecord | None:
        stored = await self.store.get(JOURNEYS, journey_id)
        if stored is None:
            self.records.pop(journey_id, None)
            self.docs.pop(journey_id, None)
            return None
        return self._take(journey_id, stored.doc)

    def _take(self, journey_id: str, doc: dict[str, Any]) -> JourneyRecord:
        versions = {}
        for text, document in doc.get("versions", {}).items():
            key = (journey_id, int(text))
            if key not in self._versions:
                self._versions[key] = parse_journey(document)
            versions[int(text)] = self._versions[key]
        draft = parse_journey(doc["draft"]) if doc.get("draft") else None
        record = JourneyRecord(journey_id, State(doc["state"]), versions, draft)
        self.records[journey_id] = record
        self.docs[journey_id] = doc
        return record

    def get(self, journey_id: str) -> JourneyRecord:
        record = self.records.get(journey_id)
        if record is None:
            raise NotFound(f"journey {journey_id} does not exist")
        return record

    def live(self) -> list[Journey]:
        """The live version of every journey taking entries now."""
        return [r.live for r in self.records.values() if r.accepts_entries and r.live is not None]

    def version(self, journey_id: str, version: int) -> Journey | None:
        return self._versions.get((journey_id, version))

    async def save(self, record: JourneyRecord, *, expected_version: int | None = None) -> dict[str, Any]:
        """Store the record (a put with the stored version expected, so two writers cannot both win)."""
        stored = await self.store.get(JOURNEYS, record.id)
        doc = record_doc(record, stored.doc if stored else None, time.time())
        await self.store.bulk_write([Put(JOURNEYS, record.id, doc, expected_version=stored.version if stored else 0)])
        self._take(record.id, doc)
        return doc
