"""Deletions the store no longer shows, applied again at start: a restored file must not bring a person back.

An operator who restores orchestration's store (architecture.md's recovery for a damaged store: stop, restore
the file with its -wal, start) from a copy taken before a deletion gets the deleted person back: their
record (view, identifiers, arbiter state with held actions), instances, decisions, approvals, send records,
outcome events and in-app inbox, and whatever of theirs the engine's outbox had not published yet (rendered
actions, timers). The `orchestration-privacy` consumer is past the deletion and does not see it again. The
deletion's `privacy.deleted` notice is still in PRIVACY (kept without an age limit), so at start - before
the engine's inputs and outbox, the dispatchers, the privacy consumer and the API run - orchestration reads
the stream whole (`cdp_kit.bus.notices.read_notices`) and erases every person a notice names that the store
still holds anything of (`erase_noticed`): what the two halves of a deletion delete (`privacy.py`), in
one pass over the store, since no engine holds anyone yet:
- the person record, every instance, decision (refused entries too), approval and Enroll answer (those that
  name the person: written before a build that kept the person id, they age out only); a running instance is
  counted ended ("deleted") in its journey's counters, as `forget` counts it;
- send records, outcome events not posted yet, the in-app inbox, their rows among the segments' members;
- the outbox records' messages for them (an action on `actions.<channel>.<p>`, a timer scheduled for them);
  everyone else's stay, under the same message ids, and are published when the engine starts;
- their tombstone and deletion marker are written again (`orchestration_tombstones`, `orchestration_deleted`,
  the notice's request id), so the engine drops what still reaches them and no dispatcher sends to them;
then the store is erased (`Store.erase`) so no bytes of the deleted records stay readable in its files.
Nothing is published: no new notice, no outcome event. It is idempotent: a person the store holds nothing of
is left alone, so a normal start (or a second replica's, sharing the store) changes nothing. A notice the
privacy consumer has not acknowledged yet (stored while the service was down, or being handled by another
replica) is left to it, as always (`unhandled_persons`): its engine may hold the person, and its own
erasure follows; the dispatchers send nothing to its persons meanwhile (`privacy.Deletions`). The ACTIONS
stream is not restored with the store, and the deletion withdrew the person's actions from it then.
Logged at WARNING: how many persons were erased and the notices' request ids, never identifiers.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from google.protobuf.message import DecodeError

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.bus import partition_for, subjects
from cdp_kit.bus.notices import requests_named
from cdp_kit.engine.outbox import outbox_collection
from cdp_kit.errors import Unavailable
from cdp_kit.storage import Delete, Put, Store
from cdp_orchestration.channels.inapp import COLLECTION as INBOX
from cdp_orchestration.engine import SERVICE
from cdp_orchestration.privacy import DELETED, Deletions
from cdp_orchestration.state import (
    APPROVALS,
    DECISIONS,
    ENROLLMENTS,
    INSTANCES,
    MEMBERS,
    OUTCOMES,
    PERSONS,
    SENDS,
    STATS,
    TOMBSTONES,
    stats_doc,
    stats_key,
)

log = logging.getLogger("cdp.orchestration.privacy")

#: Persons looked up at once.
WINDOW = 64
#: Records deleted in one write.
PAGE = 500
_BY_PERSON = (INSTANCES, APPROVALS, ENROLLMENTS, SENDS, OUTCOMES, MEMBERS)


async def holds(store: Store, person_id: str) -> bool:
    """Whether the store keeps anything of the person (the markers a deletion leaves aside)."""
    if await store.get(PERSONS, person_id) is not None:
        return True
    for collection in _BY_PERSON:
        if await store.find(collection, "person_id", person_id, limit=1):
            return True
    for collection, prefix in ((DECISIONS, f"{person_id}:"), (INBOX, f"{person_id}/")):
        if (await store.scan(collection, prefix=prefix, limit=1)).records:
            return True
    return False


async def unhandled_persons(store: Store, js: Any) -> frozenset[str]:
    """The persons of the notices the privacy consumer has not acknowledged (`Deletions.unhandled`); none
    when that cannot be told (no consumer yet, too many): then every named person is erased here."""
    try:
        return await Deletions(store, js).unhandled()
    except Unavailable:
        return frozenset()


async def erase_noticed(
    store: Store,
    named: dict[str, str],
    *,
    partitions: int,
    unhandled: frozenset[str] = frozenset(),
    clock: Callable[[], float] = time.time,
) -> int:
    """Erase every person of `named` (person -> request id) the store holds anything of, but those of
    `unhandled` (see the module docstring); the number of persons erased. Run before the engine and the
    dispatchers start."""
    candidates = sorted(set(named) - unhandled)
    found: list[str] = []
    for start in range(0, len(candidates), WINDOW):
        window = candidates[start : start + WINDOW]
        for person, held in zip(window, await asyncio.gather(*(holds(store, p) for p in window)), strict=True):
            if held:
                found.append(person)
    if not found:
        return 0
    now = clock()
    erased = set(found)
    counts = {
        "instances": 0,
        "instances_ended": 0,
        "decisions": 0,
        "approvals": 0,
        "enroll_answers": 0,
        "sends": 0,
        "inbox_messages": 0,
    }
    ended: dict[str, int] = {}  # stats key -> running instances of erased persons
    for person in found:
        instances = await _delete_by_person(store, INSTANCES, person)
        counts["instances"] += len(instances)
        for doc in instances:
            if doc.get("status") == "running":
                counts["instances_ended"] += 1
                key = stats_key(doc["journey_id"], doc["version"], partition_for(person, partitions))
                ended[key] = ended.get(key, 0) + 1
        counts["approvals"] += len(await _delete_by_person(store, APPROVALS, person))
        counts["enroll_answers"] += len(await _delete_by_person(store, ENROLLMENTS, person))
        counts["sends"] += len(await _delete_by_person(store, SENDS, person))
        await _delete_by_person(store, OUTCOMES, person)
        await _delete_by_person(store, MEMBERS, person)
        counts["decisions"] += await _delete_by_prefix(store, DECISIONS, f"{person}:")
        counts["inbox_messages"] += await _delete_by_prefix(store, INBOX, f"{person}/")
    requests = {named[person] for person in found}
    ops: list[Put | Delete] = []
    for key, count in sorted(ended.items()):
        stored = await store.get(STATS, key)
        stats = stored.doc if stored is not None else stats_doc()
        stats["ended"]["deleted"] = stats["ended"].get("deleted", 0) + count
        ops.append(Put(STATS, key, stats))
    for person in found:
        marker = {"at": now, "request_id": named[person]}
        ops += [Delete(PERSONS, person), Put(TOMBSTONES, person, marker), Put(DELETED, person, marker)]
    ops += await _outbox_scrub(store, erased)
    await store.bulk_write(ops)
    await store.erase()  # the deletions are durable: leave no bytes of them in the store's files
    text, shown = requests_named(requests)
    log.warning(
        "erased %d persons a restored store still held although privacy.deleted notices name them "
        "(requests %s); nothing published again",
        len(found),
        text,
        extra={"erased": len(found), "requests": len(requests), "request_ids": shown, **counts},
    )
    return len(found)


async def _delete_by_person(store: Store, collection: str, person_id: str) -> list[dict[str, Any]]:
    deleted: list[dict[str, Any]] = []
    while found := await store.find(collection, "person_id", person_id, limit=PAGE):
        await store.bulk_write([Delete(collection, record.key) for record in found])
        deleted += [record.doc for record in found]
    return deleted


async def _delete_by_prefix(store: Store, collection: str, prefix: str) -> int:
    keys = [record.key async for record in store.scan_all(collection, prefix=prefix)]
    for start in range(0, len(keys), PAGE):
        await store.bulk_write([Delete(collection, key) for key in keys[start : start + PAGE]])
    return len(keys)


async def _outbox_scrub(store: Store, persons: set[str]) -> list[Put | Delete]:
    """The engine's outbox records rewritten without the messages for `persons`: a file copied while the
    service ran may hold rendered actions, timers and merge commands not yet published, which the engine
    publishes when it starts. The other messages stay, under the same message ids."""
    name = outbox_collection(SERVICE)
    ops: list[Put | Delete] = []
    async for record in store.scan_all(name):
        messages = record.doc.get("messages", [])
        kept = [message for message in messages if not _persons_of(message) & persons]
        if len(kept) != len(messages):
            ops.append(Put(name, record.key, {**record.doc, "messages": kept}) if kept else Delete(name, record.key))
    return ops


def _persons_of(message: dict[str, Any]) -> set[str]:
    """The persons an outbox message is about: an action's, a scheduled timer's (`{"p": ...}`), a command's
    (`person_id`, and a merge's `from` / `survivor`); none for anything else (a timer's cancellation)."""
    subject = message.get("subject", "")
    payload = base64.b64decode(message.get("payload", ""))
    if subject.startswith(subjects.ACTIONS_PREFIX + "."):
        try:
            return {pb.ActionMessage.FromString(payload).person_id}
        except DecodeError:
            return set()
    if not payload or not subject.startswith(
        (subjects.ORCHESTRATION_TIMERS_PREFIX + ".", subjects.ORCHESTRATION_IN_PREFIX + ".")
    ):
        return set()
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return set()
    if not isinstance(body, dict):
        return set()
    return {body[field] for field in ("p", "person_id", "from", "survivor") if isinstance(body.get(field), str)}
