"""Events the collector refused (`invalid_events`): kept in the connection's dead letters, never only logged.

The collector stores the valid events of a batch and answers which it refused, each with the field and a
code. A refused event would be refused again if posted again, so the poller goes on; each is recorded in
`crm_dead_letters` (one per CRM record: a newer refusal replaces the older) with the reason
`collector_refused`, the collector's code and the field it names, so `cdpctl crm dead-letters` lists it
beside the records a CRM refused. Its mapping is `<connection>/inbound:<object>`: a replay passes over it
(no outbound mapping has that name) - the fix is in the CRM's record or the connection's mapping, and the
record's next change is read again. The letter holds the CRM's record id and codes, never the event's
values nor the person's CDP id: it is keyed by the CRM record (`letter_key`), so a privacy deletion erases,
and an export lists, the letters of the records the connector wrote for the person (`letter_keys`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from cdp_crm.domain.coalesce import UPSERT, Change
from cdp_crm.domain.isolation import DeadLetter
from cdp_crm.state import DEAD_LETTERS
from cdp_kit.storage import Put, Store

COLLECTOR_REFUSED = "collector_refused"
INBOUND = "inbound"


def letter_key(connection: str, obj: str, record_id: str) -> str:
    """The dead letter's key of an event read from CRM record `record_id` of `obj`."""
    return f"{INBOUND}:{connection}:{obj}:{record_id}"


def letter_keys(records: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[str, str]:
    """Record key -> the key of its refused-event letter, for each of these `crm_records` documents the
    CRM has an id for (the inbound side names records by it)."""
    return {
        key: letter_key(doc["connection"], doc["object"], doc["crm_id"])
        for key, doc in records
        if doc.get("crm_id") and doc.get("connection") and doc.get("object")
    }


def inbound_letter(connection: str, obj: str, record_id: str, rejected: Mapping[str, Any], now: float) -> DeadLetter:
    """The dead letter of one refused event: which record, why (the collector's code and field)."""
    field = str(rejected.get("field") or "")
    code = str(rejected.get("code") or "invalid")
    message = (
        f"the collector refused the event of {obj} record {record_id} ({code}"
        + (f" in {field}" if field else "")
        + "): it is not stored; fix the record in the CRM or the connection's mapping - its next change is read again"
    )
    change = Change(f"{connection}/{INBOUND}:{obj}", (("id", record_id),), {}, 0, UPSERT, "", INBOUND)
    return DeadLetter(
        connection, f"{connection}/{INBOUND}:{obj}", letter_key(connection, obj, record_id), COLLECTOR_REFUSED,
        code, message, 400, now, change,
    )  # fmt: skip


async def keep_refused(
    store: Store,
    connection: str,
    obj: str,
    rejected: list[Mapping[str, Any]],
    sent: Mapping[str, str],
    now: float,
) -> int:
    """Record each refused event (`sent`: message id -> CRM record id); returns how many were."""
    puts = []
    for entry in rejected:
        record_id = sent.get(str(entry.get("messageId", "")))
        if record_id is None:
            continue
        letter = inbound_letter(connection, obj, record_id, entry, now)
        puts.append(Put(DEAD_LETTERS, letter.record, letter.to_state()))
    if puts:
        await store.bulk_write(puts)
    return len(puts)
