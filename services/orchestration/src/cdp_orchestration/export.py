"""What orchestration keeps about one person, as plain JSON, for their access request (PrivacyService/ExportPerson).

The persons asked about are the request's `person_id`, its `merged_person_ids` (identity's graph) and
anyone orchestration itself recorded as merged into one of them (`merged_from` on the person record, at
any depth): what is kept under any of their ids is the person's. Only records keyed or indexed by one of
those ids are read, the same ones a privacy deletion removes (`privacy.py`), so the answer names no other
person: a decision, approval, send or inbox message belongs to the person its own `person_id` names.

Sections (each a list, empty when nothing is kept):

- `persons`: per person id, the held view of their profile (`fields`: the flat profile fields journeys
  read, consent among them as `consent.*`; `segments`), the arbiter's state (`frequency`: the sends of
  the last eight days, kept for frequency caps; a send of an exempt category, such as transactional, is
  kept with no channel and `exempt: true`, and counts toward no cap; `deferred` and `awaiting_approval`: actions held; `last_seen`: watched
  event times), the last entry per journey, the identifiers their events came with, and merge links;
- `instances`: journey, version, state, current step, entered/ended, outcome, the steps taken;
- `decisions`: every arbiter decision (sent, deferred, capped, ...);
- `approvals`: actions held by an approval gate and their answer;
- `inbox`: in-app messages with their content (title, body, url, data) and when read;
- `sends`: each action's send record (channel, status, reason, attempts, time, the outcome event);
  no content is kept for a send, only for an in-app message;
- `outcome_events`: outcome events (in-app opens) not yet taken by the collector;
- `enrollments`: Enroll's answers, kept so a retried call gets the first one: `key` as the store keeps it
  (`<journey id>:<idempotency key>`, the key being the caller's, which may carry personal data), its
  `journey_id` and `idempotency_key`, whether the call `entered` the person, the `instance_id` it made or
  the `reason` it did not, when (`at`), and the `person_id` it names. An answer is found by that person id:
  answers written before a build that kept it name no one and cannot be found by person (a deletion does
  not find them either; they age out after CDP_ORCHESTRATION_HISTORY_DAYS), and an answer written before
  the journey id was kept with it gives `journey_id` and `idempotency_key` as null (its `key` holds both).

Times are RFC 3339 strings (UTC). Reads are from the store only; nothing is changed. The servicer, its
scope (`privacy:export`) and the request's checks are the kit's (`cdp_kit.person_export`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from cdp_kit.person_export import Exporter, rfc3339
from cdp_kit.storage import Store
from cdp_kit.storage.port import MAX_FIND_LIMIT
from cdp_orchestration.channels.inapp import COLLECTION as INBOX
from cdp_orchestration.domain.records import user_data_from
from cdp_orchestration.state import APPROVALS, DECISIONS, ENROLLMENTS, INSTANCES, OUTCOMES, PERSONS, SENDS

# Record fields holding epoch seconds; the export gives them as RFC 3339.
_SECONDS = frozenset(
    {"at", "entered_at", "trigger_at", "goal_until", "converted_at", "ended_at", "until", "requested_at"}
    | {"expires_at", "decided_at", "proposed_at"}
)


def _from_ms(ms: int | None) -> str | None:
    return rfc3339(ms / 1000) if ms is not None else None


def _times(doc: dict[str, Any], drop: Iterable[str] = ()) -> dict[str, Any]:
    """A stored record as plain JSON: its epoch-seconds fields as RFC 3339, nested records likewise."""
    out: dict[str, Any] = {}
    skip = set(drop)
    for key, value in doc.items():
        if key in skip:
            continue
        if key in _SECONDS and isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = rfc3339(value)
        elif isinstance(value, dict):
            out[key] = _times(value)
        else:
            out[key] = value
    return out


async def persons_of(store: Store, person_ids: Sequence[str]) -> list[str]:
    """The request's persons and everyone orchestration recorded as merged into them, each once."""
    persons = list(dict.fromkeys(p for p in person_ids if p))
    level = persons
    while level:
        found = await store.get_many(PERSONS, level)
        absorbed = [p for r in found.values() for p in r.doc.get("merged_from") or {} if p not in persons]
        absorbed = list(dict.fromkeys(absorbed))
        persons += absorbed
        level = absorbed
    return persons


def _person(person_id: str, doc: dict[str, Any]) -> dict[str, Any]:
    arbiter = doc.get("arbiter") or {}
    return {
        "person_id": person_id,
        "fields": user_data_from(doc.get("fields")),
        "segments": list(doc.get("segments") or []),
        "frequency": [
            {"at": rfc3339(at), "channel": channel, "action_id": action_id, "exempt": not channel}
            for at, channel, action_id in arbiter.get("sent", [])
        ],
        "deferred": [_times(held) for held in arbiter.get("deferred", [])],
        "awaiting_approval": [_times(held) for held in arbiter.get("awaiting", [])],
        "last_seen": {name: rfc3339(at) for name, at in (arbiter.get("last_seen") or {}).items()},
        "last_entered": {journey: rfc3339(at) for journey, at in (doc.get("entered") or {}).items()},
        "identifiers": dict(doc.get("ids") or {}),
        "merged_from": sorted(doc.get("merged_from") or {}),
        "merged_into": doc.get("merged_into") or "",
    }


def _instance(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": doc["id"],
        "person_id": doc["person_id"],
        "journey_id": doc["journey_id"],
        "version": doc["version"],
        "state": doc["status"],
        "step": doc.get("node"),
        "entered_at": rfc3339(doc.get("entered_at")),
        "ended_at": rfc3339(doc.get("ended_at")),
        "outcome": doc.get("end_reason"),
        "converted_at": rfc3339(doc.get("converted_at")),
        "entry": _times(user_data_from(doc.get("entry"))),
        "variants": dict(doc.get("variants") or {}),
        "steps": [{"node": node, "at": rfc3339(at), "outcome": outcome} for node, at, outcome in doc.get("steps", [])],
    }


def _inbox(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "message_id": doc["action_id"],
        "person_id": doc["person_id"],
        "title": doc.get("title"),
        "body": doc.get("body"),
        "url": doc.get("url"),
        "data": dict(doc.get("data") or {}),
        "created_at": _from_ms(doc.get("created_at_ms")),
        "read_at": _from_ms(doc.get("read_at_ms")),
    }


def _enrollment(key: str, doc: dict[str, Any]) -> dict[str, Any]:
    journey = doc.get("journey_id")
    named = isinstance(journey, str) and key.startswith(f"{journey}:")
    return {
        "key": key,
        "journey_id": journey if named else None,
        "idempotency_key": key[len(journey) + 1 :] if named else None,
        "entered": doc.get("entered"),
        "instance_id": doc.get("instance_id"),
        "reason": doc.get("reason"),
        "at": rfc3339(doc.get("at")),
        "person_id": doc.get("person_id"),
    }


async def export_person(store: Store, person_id: str, merged_person_ids: Sequence[str] = ()) -> dict[str, Any]:
    """The document ExportPerson answers with: empty (no sections) when nothing is kept for the person."""
    persons = await persons_of(store, [person_id, *merged_person_ids])
    document: dict[str, list[dict[str, Any]]] = {
        "persons": [],
        "instances": [],
        "decisions": [],
        "approvals": [],
        "inbox": [],
        "sends": [],
        "outcome_events": [],
        "enrollments": [],
    }
    records = await store.get_many(PERSONS, persons)
    for person in persons:
        if person in records:
            document["persons"].append(_person(person, records[person].doc))
        for record in await store.find(INSTANCES, "person_id", person, limit=MAX_FIND_LIMIT):
            document["instances"].append(_instance(record.doc))
        # Keys start with the person id; the record's own person_id is checked too, so an id that is a
        # prefix of another's (with its separator) never reads the other's records.
        async for record in store.scan_all(DECISIONS, prefix=f"{person}:"):
            if record.doc.get("person_id") == person:
                document["decisions"].append(_times(record.doc))
        for record in await store.find(APPROVALS, "person_id", person, limit=MAX_FIND_LIMIT):
            document["approvals"].append(_times(record.doc))
        async for record in store.scan_all(INBOX, prefix=f"{person}/"):
            if record.doc.get("person_id") == person:
                document["inbox"].append(_inbox(record.doc))
        for record in await store.find(SENDS, "person_id", person, limit=MAX_FIND_LIMIT):
            document["sends"].append({"action_id": record.key, **_times(record.doc, drop=("reported", "seq"))})
        for record in await store.find(OUTCOMES, "person_id", person, limit=MAX_FIND_LIMIT):
            document["outcome_events"].append({"message_id": record.key, **_times(record.doc, drop=("reported",))})
        for record in await store.find(ENROLLMENTS, "person_id", person, limit=MAX_FIND_LIMIT):
            document["enrollments"].append(_enrollment(record.key, record.doc))
    return {name: rows for name, rows in document.items() if rows}


def exporter(store: Store) -> Exporter:
    """`export_person` as the kit's servicer calls it."""

    async def export(person_id: str, merged_person_ids: Sequence[str], context: Any) -> dict[str, Any]:
        # The kit's servicer has refused ids the store cannot hold as keys, naming the request's field.
        return await export_person(store, person_id, merged_person_ids)

    return export
