"""What the CRM connector keeps about one person, as plain JSON, for their access request
(PrivacyService/ExportPerson).

The persons asked about are the request's `person_id` and its `merged_person_ids` (identity's graph). Only
what is keyed by one of their ids, or by a CRM record the connector wrote for one of them (`crm_records`
indexed by `person_id`), is read - the same things a privacy deletion erases (`privacy.py`) - so the answer
names no other person.

Sections:

- `views`: per person id, the view the connector keeps to project records from (`crm_persons`): the flat
  profile fields (with a profile service configured only the fields some mapping reads), the segments;
- `connections`: per connection (its id and provider), per record the connector wrote for the person:
  the mapping, the CRM object, the CRM's id for it (`remote_id`), its state, the field values the CRM
  took last (`fields`; an erased record holds none), list membership, when last synced and updated; the
  values sent since whose answer never came (`sent`, per field, when kept: the CRM may hold them); with
  it, when kept, the change still queued for the CRM (`pending`: its fields and attempts),
  the dead letter naming the record (`dead_letter`: ids, reason and CRM code only, no values), the dead
  letter of an event read from the record that the collector refused (`inbound_dead_letter`: its key,
  reason `collector_refused`, the collector's code; no values), and what
  the inbound side saw last of the record when it read the CRM's changes (`inbound`: the watched status or
  stage and when read; the connector keeps a digest of the other fields, no values).

Times are RFC 3339 strings (UTC). Reads are from the store only; nothing is changed. An unknown person
gives an empty document. The servicer, its scope (`privacy:export`) and the request's checks are the
kit's (`cdp_kit.person_export`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cdp_crm.domain.mapping import Connection
from cdp_crm.inbound.refused import letter_keys
from cdp_crm.state import CURSORS, DEAD_LETTERS, PENDING, PERSONS, RECORDS
from cdp_kit import person_export
from cdp_kit.person_export import Exporter
from cdp_kit.storage import Store
from cdp_kit.storage.port import MAX_FIND_LIMIT


def rfc3339(seconds: float | None) -> str | None:
    return person_export.rfc3339(seconds) if seconds else None  # 0: never (a record not synced yet)


def _record(key: str, doc: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "record": key,
        "person_id": doc.get("person_id", ""),
        "mapping": doc.get("mapping", ""),
        "object": doc.get("object", ""),
        "remote_id": doc.get("crm_id"),
        "state": doc.get("state", ""),
        "fields": dict(doc.get("fields") or {}),
        "list_member": doc.get("member"),
        "synced_at": rfc3339(doc.get("synced_at")),
        "updated_at": rfc3339(doc.get("updated_at")),
        **({"sent": {k: list(v) for k, v in doc["sent"].items()}} if doc.get("sent") else {}),
    }


def _pending(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {"op": doc.get("op", ""), "fields": dict(doc.get("fields") or {}), "attempts": doc.get("attempts", 1)}


def _dead_letter(doc: Mapping[str, Any]) -> dict[str, Any]:
    # Ids and the CRM's verdict only: the refused change's values are in the record's own `fields`.
    return {
        "person_id": doc.get("person_id", ""),
        "reason": doc.get("reason", ""),
        "crm_code": doc.get("crm_code", ""),
        "http_status": doc.get("http_status", 0),
        "attempts": doc.get("attempts", 1),
        "failed_at": rfc3339(doc.get("failed_at")),
    }


def _inbound(doc: Mapping[str, Any]) -> dict[str, Any]:
    stamp = doc.get("stamp")
    return {"watched": doc.get("watched"), "read_at": stamp if isinstance(stamp, str) else rfc3339(stamp)}


async def export_person(
    store: Store, connections: Sequence[Connection], person_id: str, merged_person_ids: Sequence[str] = ()
) -> dict[str, Any]:
    """The document ExportPerson answers with: empty (no sections) when nothing is kept for the person."""
    persons = list(dict.fromkeys(p for p in (person_id, *merged_person_ids) if p))
    providers = {c.id: c.kind for c in connections}
    document: dict[str, Any] = {}
    views = await store.get_many(PERSONS, persons)
    if views:
        document["views"] = [
            {
                "person_id": p,
                "fields": dict(views[p].doc.get("fields") or {}),
                "segments": list(views[p].doc.get("segments") or []),
            }
            for p in persons
            if p in views
        ]
    records = [r for p in persons for r in await store.find(RECORDS, "person_id", p, limit=MAX_FIND_LIMIT)]
    keys = [r.key for r in records]
    pending = await store.get_many(PENDING, keys) if keys else {}
    letters = await store.get_many(DEAD_LETTERS, keys) if keys else {}
    refused_keys = letter_keys((r.key, r.doc) for r in records)
    refused = await store.get_many(DEAD_LETTERS, list(refused_keys.values())) if refused_keys else {}
    memo_keys = {
        r.key: f"{r.doc['connection']}:{r.doc['object']}:{r.doc['crm_id']}" for r in records if r.doc.get("crm_id")
    }
    memos = await store.get_many(CURSORS, list(memo_keys.values())) if memo_keys else {}
    by_connection: dict[str, list[dict[str, Any]]] = {}
    for stored in records:
        row = _record(stored.key, stored.doc)
        if stored.key in pending:
            row["pending"] = _pending(pending[stored.key].doc)
        if stored.key in letters:
            row["dead_letter"] = _dead_letter(letters[stored.key].doc)
        letter = refused.get(refused_keys.get(stored.key, ""))
        if letter is not None:
            row["inbound_dead_letter"] = {"record": letter.key, **_dead_letter(letter.doc)}
        memo = memos.get(memo_keys.get(stored.key, ""))
        if memo is not None:
            row["inbound"] = _inbound(memo.doc)
        by_connection.setdefault(stored.doc.get("connection", ""), []).append(row)
    if by_connection:
        document["connections"] = [
            {"connection": connection, "provider": providers.get(connection, ""), "records": rows}
            for connection, rows in sorted(by_connection.items())
        ]
    return document


def exporter(store: Store, connections: Sequence[Connection]) -> Exporter:
    """`export_person` as the kit's servicer calls it."""

    async def export(person_id: str, merged_person_ids: Sequence[str], context: Any) -> dict[str, Any]:
        # The kit's servicer has refused ids the store cannot hold as keys, naming the request's field.
        return await export_person(store, connections, person_id, merged_person_ids)

    return export
