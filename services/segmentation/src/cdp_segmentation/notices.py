"""Deletions the store no longer shows, applied again where a partition arrives: a restored store file
must not bring a deleted person back.

Segmentation learns of a deletion from profile's `removed` change on `profiles.changed.<p>`: the person
exits every segment (reason `removed`) and is deleted by the next snapshot, the files erased. An operator
who restores `segmentation.db` (architecture.md's recovery for a damaged store: stop, restore the file
with its -wal, start) from a copy taken before the deletion gets the person's fields and memberships
back, and the `removed` change may not come again: a partition's arrival replays the stream after its
snapshot, but the change may have aged out of PROFILES. The deletion's `privacy.deleted` notice is still
in PRIVACY (kept without an age limit): the service reads it whole at start
(`cdp_kit.bus.notices.read_notices`, before any partition is taken), and each partition that arrives (at
start, on a lease acquired later, reloaded after a failed batch) has the persons the notices name erased
once its snapshot is loaded, before the replay, the adoption of segments built elsewhere and its pipeline
(`erase_noticed`): out of every membership, timer and held field, their records deleted, the transitions
its outbox still holds for them taken out of the messages (the others' stay, under the same message
ids), the files erased. The replay skips every change of theirs (`SegmentationEngine.deleted`): what the
stream still holds from before the deletion does not bring them back either.

Nothing is published about them: not an exit (orchestration and the CRM connector had it, reason
`removed`, when the person was deleted, and they erased the person on the notice themselves; an exit
published again, under a new id, would reach them as news about a deleted person - a journey's exit step,
a CRM sync - carrying the id on the bus again), nor the stored transitions of theirs. It is idempotent: a
partition whose snapshot holds none of them writes nothing. Logged at WARNING: how many persons were
erased and the notices' request ids, never identifiers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from cdp.segmentation.v1 import segmentation_pb2
from cdp_kit.bus.notices import scrub_outbox as scrub
from cdp_kit.bus.notices import write_partition_erasure
from cdp_kit.engine.outbox import partition_prefix
from cdp_kit.storage import Delete, Put

if TYPE_CHECKING:
    from cdp_segmentation.engine import SegmentationEngine

log = logging.getLogger("cdp.segmentation.privacy")


async def erase_noticed(engine: SegmentationEngine, named: Mapping[str, str], partition: int) -> int:
    """Erase every person of `named` (the partition's: person -> request id) that the engine holds or the
    partition's outbox still has transitions of; nothing published. The number of persons erased."""
    if not named:
        return 0
    held = engine.held
    found = {p for p in named if p in engine.persons}
    for person_id in found:
        for segment_id in engine.persons[person_id].members:
            engine.members.get(segment_id, set()).discard(person_id)
        engine.forget_timer(person_id)
    # Loaded from the snapshot: a record to delete.
    stored = {p for p in found if p in held.versions}
    if found:
        held.forget(found.__contains__)
        if engine.index.percentiles:
            engine.percentiles_stale = True  # fewer persons in the population
    ops: list[Put | Delete] = [Delete(held.collection, p) for p in sorted(stored)]
    scrubbed: list[tuple[Put | Delete, set[str]]] = []
    if engine.stream is not None:
        scrubbed = await scrub_outbox(engine, engine.stream.outbox, partition, named)
    return await write_partition_erasure(engine.store, ops, found, scrubbed, dict(named), partition, log)


async def scrub_outbox(
    engine: SegmentationEngine, outbox: str, partition: int, named: Mapping[str, str]
) -> list[tuple[Put | Delete, set[str]]]:
    """The partition's outbox records without the transitions of `named` persons (`cdp_kit.bus.notices.
    scrub_outbox`): a copied file may hold transitions not yet published, which the pipeline publishes."""

    def rewrite(_subject: str, payload: bytes) -> tuple[bytes | None, set[str]] | None:
        batch = segmentation_pb2.SegmentEventBatch.FromString(payload)
        gone = {e.person_id for e in batch.events if e.person_id in named}
        if not gone:
            return None
        left = segmentation_pb2.SegmentEventBatch(events=[e for e in batch.events if e.person_id not in gone])
        return (left.SerializeToString() if left.events else None), gone

    return await scrub(engine.store, outbox, rewrite, prefix=partition_prefix(partition))
