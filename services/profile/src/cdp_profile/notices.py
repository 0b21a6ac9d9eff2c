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

from cdp.profile.v1 import profile_pb2
from cdp_kit.bus.notices import requests_named, scrub_outbox
from cdp_kit.bus.subjects import PROFILES_CHANGED_PREFIX
from cdp_kit.storage import Delete, Put
from cdp_profile.records import SCORES, TIMELINE, timeline_key, timeline_prefix

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
            timeline_keys.update(timeline_key(e) for e in profile.events(limit=1_000_000)[0])
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
