"""Deletions the store no longer shows, applied again at start: a restored file must not bring a person back.

An operator who restores `crm.db` (architecture.md's recovery for a damaged store: stop, restore the file
with its -wal, start) from a copy taken before a deletion gets the deleted person back in the connector:
their view, their links to CRM records with the values written there, changes queued for a CRM
(`crm_pending`, sent by the retrier), dead letters (sent by a replay), merges to do, and no tombstone, so a
late change of theirs is written too. The `crm-privacy` consumer is past the deletion's notice; the notice
itself is still in PRIVACY (kept without an age limit). So at start, before the inputs, the retrier, the
backfills, the pollers or the privacy consumer run, the connector reads the stream whole
(`cdp_kit.bus.notices.read_notices`) and, for every person a notice names that its store still holds (a
view, a record not erased, or an erasure of theirs stopped midway):

1. `fence`, in the store at once (no CRM called): a tombstone (the engine drops their inputs), and their
   view, queued changes, dead letters and merges deleted, the identifiers the erasure searches by kept
   under `crm_privacy/<request>:identifiers` as an erasure waiting for a CRM keeps them; the files erased.
   From then on nothing goes out to a CRM for them but the erasure.
2. `reapply`, in the background: the erasure again (`Privacy.erase(restored=True)`), per request. The CRMs
   hold the erasure done before the restore, so the repeat must be harmless: each record is read first by
   its match key, and only one still holding a value in a mapped field is anonymised (by its CRM id, which
   never creates a record); one gone or cleared already is not written; no upsert is sent; deletions,
   list removals and the search for the persons' identifiers go as in any erasure (none creates a record).
   Then the records become erasure records and `crm_privacy/<request>` is written. A CRM that does not
   answer makes it come again (1, 5, 15, then every 60 s) until done.

Idempotent: a person whose records are all erasure records and who has no view is not held, so a second
start (or another replica sharing the store) finds nothing left to do. An erasure still waiting for a CRM
at a plain restart (its notice not acknowledged yet) is held too: the repeat and the consumer's redelivery
then both try it, each harmless to the other. Logged at WARNING: how many persons and the notices'
request ids, never an identifier.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Mapping

from cdp.privacy.v1 import privacy_pb2
from cdp_crm.inbound.refused import letter_keys
from cdp_crm.privacy import Privacy
from cdp_crm.state import DEAD_LETTERS, ERASED, MERGES, PENDING, PERSONS, PRIVACY, RECORDS, TOMBSTONES
from cdp_kit.bus.notices import requests_named
from cdp_kit.storage import Delete, Put, Store

log = logging.getLogger("cdp.crm.privacy")

#: Seconds between two repeats of an erasure a CRM did not take yet (then the last, again and again).
BACKOFF = (1.0, 5.0, 15.0, 60.0)
#: Persons read at once from the store.
READ_CHUNK = 500


async def held(store: Store, named: Mapping[str, str]) -> list[tuple[str, list[str]]]:
    """The requests of `named` (person -> request id) whose persons the store still holds, with the persons
    named under each: (request id, persons). A person is held by a view or a record that is not an erasure
    record; a request, by one of its persons, or by its identifiers kept without its done record (an erasure
    stopped midway: a CRM searched for the persons is left)."""
    persons = sorted(named)
    views = await _present(store, PERSONS, persons)
    by_request: dict[str, list[str]] = defaultdict(list)
    for person in persons:
        # A notice without a request id is the erasure `person-<id>` of that person alone (privacy.py).
        by_request[named[person] or f"person-{person}"].append(person)
    keys = sorted(by_request)
    kept = await _present(store, PRIVACY, [k for key in keys for k in (key, f"{key}:identifiers")])
    found = []
    for key in keys:
        named_persons = by_request[key]
        stopped = f"{key}:identifiers" in kept and key not in kept
        if stopped or not views.isdisjoint(named_persons) or await _records_left(store, named_persons):
            found.append((key, named_persons))
    return found


async def _present(store: Store, collection: str, keys: list[str]) -> set[str]:
    present: set[str] = set()
    for start in range(0, len(keys), READ_CHUNK):
        present |= set(await store.get_many(collection, keys[start : start + READ_CHUNK]))
    return present


async def _records_left(store: Store, persons: list[str]) -> bool:
    for person in persons:
        records = await store.find(RECORDS, "person_id", person, limit=10_000)
        if any(r.doc.get("state") not in ERASED for r in records):
            return True
    return False


def request_of(key: str, persons: list[str]) -> privacy_pb2.PrivacyDeleted:
    if key == f"person-{persons[0]}" and len(persons) == 1:
        return privacy_pb2.PrivacyDeleted(person_id=persons[0])
    return privacy_pb2.PrivacyDeleted(request_id=key, person_id=persons[0], merged_person_ids=persons[1:])


async def fence(store: Store, privacy: Privacy, named: Mapping[str, str], now: float) -> list[tuple[str, list[str]]]:
    """Step 1 (module docstring) for every person of `named` the store still holds; the requests to apply
    again (`reapply`)."""
    requests = await held(store, named)
    if not requests:
        return []
    everyone = {p for _, persons in requests for p in persons}
    ops: list[Put | Delete] = []
    for key, persons in requests:
        records = [r for p in persons for r in await store.find(RECORDS, "person_id", p, limit=10_000)]
        # What the erasure searches the CRMs by (their email and phone), read before the view goes.
        ops.append(Put(PRIVACY, f"{key}:identifiers", await privacy.identifiers(key, persons, records)))
        ops += [Put(TOMBSTONES, p, {"at": now, "request": key}) for p in persons]
        ops += [Delete(PERSONS, p) for p in persons]
        ops += [Delete(PENDING, r.key) for r in records] + [Delete(DEAD_LETTERS, r.key) for r in records]
        ops += [Delete(DEAD_LETTERS, k) for k in letter_keys((r.key, r.doc) for r in records).values()]
    async for merge in store.scan_all(MERGES):
        if merge.doc.get("survivor") in everyone or merge.doc.get("loser") in everyone:
            ops.append(Delete(MERGES, merge.key))  # a carry-over would write the person's values
    await store.bulk_write(ops)
    await store.erase()
    text, shown = requests_named(key for key, _ in requests)
    log.warning(
        "the store still holds %d persons privacy.deleted notices name (restored from before their deletion, "
        "or an erasure waiting for a CRM) (requests %s): their views, queued changes and dead letters "
        "erased, their inputs dropped; their CRM records are checked and erased where they still hold data",
        len(everyone),
        text,
        extra={"persons": len(everyone), "requests": len(requests), "request_ids": shown},
    )
    return requests


async def reapply(store: Store, privacy: Privacy, requests: list[tuple[str, list[str]]]) -> None:
    """Step 2 (module docstring): each request's erasure again until every one is done."""
    left = list(requests)
    attempt = 0
    done = 0
    while left:
        waiting = []
        for key, persons in left:
            if attempt and await store.get(PRIVACY, key) is not None:
                done += 1  # done meanwhile (the privacy consumer's redelivery, another replica)
                continue
            try:
                finished = await privacy.erase(request_of(key, persons), restored=True)
            except Exception as exc:  # the store or a CRM failing: next time
                log.warning("crm erasure of a restored store failed", extra={"error": type(exc).__name__})
                finished = False
            if finished:
                done += 1
            else:
                waiting.append((key, persons))
        left = waiting
        if left:
            await asyncio.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
            attempt += 1
    if requests:
        log.warning(
            "crm erasures a restored store had lost are done again",
            extra={"requests": len(requests), "done": done},
        )
