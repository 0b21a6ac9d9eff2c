"""Deletions the store no longer shows, applied again at start: a restored file must not bring a person back.

An operator who restores `profile.db` (architecture.md's recovery for a damaged store: stop, restore the
file with its -wal, start) from a copy taken before a deletion gets the deleted person back: profile,
timeline, identifiers. The deletion's `privacy.deleted` notice is still in PRIVACY (kept without an age
limit), so at start, before the partitioned inputs run and before reads are served, profile reads the
stream whole (`cdp_kit.bus.notices.read_notices`) and erases every person a notice names that its
store still holds (`erase_noticed`): the same erasure as `Delete` (the person and every person merged into it become bare markers, their timeline
entries and scores are deleted, the files erased), without a new notice, a new `removed` change or a new
request record. A person is erased where it is owned: the owned partitions at start (static ownership,
a store per replica) and each partition as it is acquired (leases, a shared store); it is idempotent, so a
partition acquired again finds nothing left to do. A notice names its person and the persons merged into
it, so merged persons are covered whether the restored file holds them merged or still apart.
Logged at WARNING: how many persons were erased and the notices' request ids, never identifiers.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import TYPE_CHECKING

from nats.js.errors import NotFoundError

from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import OutMessage
from cdp_kit.bus.notices import requests_named, scrub_outbox
from cdp_kit.bus.subjects import PRIVACY, PRIVACY_DELETED, PROFILES_CHANGED_PREFIX
from cdp_kit.errors import Unavailable
from cdp_kit.storage import Delete, Put
from cdp_profile.records import DELETIONS, SCORES, TIMELINE, timeline_prefix
from cdp_profile.timeline import row_keys

if TYPE_CHECKING:
    from cdp_profile.engine import ProfileEngine

log = logging.getLogger("cdp.profile.privacy")


async def erase_noticed(
    engine: ProfileEngine, named: dict[str, str], partitions: Collection[int], *, outboxes: bool = True
) -> int:
    """Erase every person of `partitions` that `named` holds and the store still keeps alive or merged
    away (Delete's erasure, nothing published); the number of persons erased. `outboxes`: the inputs of
    these partitions have not started, and their outbox records are rewritten without these persons' changes
    (a partition acquired under leases has published its outbox by then: left alone)."""
    hot = engine.hot
    candidates = sorted(p for p in named if engine.partition_of(p) in partitions)
    if not candidates:
        return 0
    # A partition held whole is in memory already (`state.py`); only the others are read from the store.
    await hot.load([p for p in candidates if engine.partition_of(p) not in hot.whole])
    found = [p for p in candidates if p in hot.profiles or p in hot.tombstones]
    if not found:
        return 0
    now = engine.clock()
    origins_of: dict[str, tuple[str, list[str]]] = {}  # person -> (request id, itself and those merged into it)
    timeline_keys: set[str] = set()
    for person in found:
        profile = hot.profiles.get(person)
        origins = [person]
        if profile is not None:
            origins += list(profile.view(now=now).merged_from)
            timeline_keys.update(row_keys(profile.parts.values()))  # rows written here, maybe not landed yet
        origins_of[person] = (named[person], origins)
    everyone = sorted({o for _, origins in origins_of.values() for o in origins})
    await hot.load(everyone)  # their versions: a marker is a versioned write like any other
    for origin in everyone:
        async for record in engine.store.scan_all(TIMELINE, prefix=timeline_prefix(origin)):
            timeline_keys.add(record.key)
    ops: list[Put | Delete] = [Delete(TIMELINE, key) for key in sorted(timeline_keys)]
    marked: set[str] = set()
    requests: set[str] = set()
    for person, (request_id, origins) in origins_of.items():
        requests.add(request_id)
        hot.profiles.pop(person, None)
        for origin in origins:
            if origin in marked:
                continue
            marked.add(origin)
            hot.profiles.pop(origin, None)
            hot.tombstones.pop(origin, None)
            hot.deleted[origin] = now
            ops.append(hot.versioned_put(origin, {"deleted_at": now, "request_id": request_id}))
            ops.append(Delete(SCORES, origin))
    if outboxes:
        ops.extend(await _outbox_scrub(engine, marked))
    await engine.commit({}, ops=ops)
    await engine.privacy.erase_files()
    text, shown = requests_named(requests)
    log.warning(
        "erased %d persons a restored store still held although privacy.deleted notices name them "
        "(requests %s); nothing published again",
        len(marked),
        text,
        extra={"erased": len(marked), "requests": len(requests), "request_ids": shown},
    )
    return len(marked)


async def _outbox_scrub(engine: ProfileEngine, persons: set[str]) -> list[Put | Delete]:
    """The partitioned inputs' outbox records without the changes of `persons` (`cdp_kit.bus.notices.
    scrub_outbox`): a file copied while the service ran may hold change messages not yet published, with the
    person's values, which the inputs would publish when they start."""

    def rewrite(subject: str, payload: bytes) -> tuple[bytes | None, set[str]] | None:
        if not subject.startswith(PROFILES_CHANGED_PREFIX + "."):
            return None
        batch = profile_pb2.ProfileChangedBatch.FromString(payload)
        gone = {change.person_id for change in batch.changes if change.person_id in persons}
        if not gone:
            return None
        left = [change for change in batch.changes if change.person_id not in persons]
        if not left:
            return None, gone
        batch.ClearField("changes")
        batch.changes.extend(left)
        return batch.SerializeToString(), gone

    ops: list[Put | Delete] = []
    for name in sorted({outbox for stream in engine.streams for outbox in stream.outboxes}):
        ops.extend(op for op, _ in await scrub_outbox(engine.store, name, rewrite))
    return ops


async def republish_missing(engine: ProfileEngine, js, in_stream: set[str]) -> int:
    """Publish again every deletion this store records whose notice a PRIVACY restored older than the
    store lacks (`in_stream`: the request ids of the notices it holds). `nats/` restored from before a
    deletion, or separate volume snapshots, leave PRIVACY without the notice while the stores know of the
    deletion, and the collector and identity, which learn who is suppressed from PRIVACY alone, accepted
    the person's events again. Older is told by sequence: each record keeps where PRIVACY stored its
    notice, and a stream whose last sequence is below it has lost it; a notice an operator purged from a
    stream that went on (to lift a suppression: privacy.md) stays purged. Logged at ERROR with the request
    ids; the number published. Unavailable when JetStream does not store them (the service does not start
    without them, and tries again when restarted)."""
    try:
        last = (await js.stream_info(PRIVACY)).state.last_seq or 0
    except NotFoundError:
        last = 0
    missing: list[tuple[str, bytes]] = []
    async for record in engine.store.scan_all(DELETIONS):
        doc = record.doc
        # Pending ones are Privacy.complete's; a record from before sequences were kept cannot be told.
        if not doc.get("published") or record.key in in_stream or not doc.get("notice") or not doc.get("seq"):
            continue
        if doc["seq"] > last:
            missing.append((record.key, bytes.fromhex(doc["notice"])))
    if not missing:
        return 0
    results = await engine.publisher.publish_batch(
        [OutMessage(subject=PRIVACY_DELETED, payload=data, msg_id=f"privacy:{rid}") for rid, data in missing]
    )
    failed = [rid for (rid, _), result in zip(missing, results, strict=True) if not result.ok]
    if failed:
        raise Unavailable(f"{len(failed)} deletion notices PRIVACY lost were not stored again ({results[0].error})")
    stored = {rid: result.seq for (rid, _), result in zip(missing, results, strict=True)}
    await engine.store.bulk_write(
        [
            Put(DELETIONS, rid, {**(await engine.store.get(DELETIONS, rid)).doc, "seq": seq})
            for rid, seq in stored.items()
        ]
    )
    text, shown = requests_named(stored)
    log.error(
        "PRIVACY lacked %d deletion notices this store records: the stream is older than the store (nats/ "
        "restored from before them); published again (requests %s)",
        len(missing),
        text,
        extra={"republished": len(missing), "request_ids": shown},
    )
    return len(missing)
