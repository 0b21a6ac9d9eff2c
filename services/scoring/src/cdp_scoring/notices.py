"""Deletions the store no longer shows, applied again where a partition is taken: a restored store file
must not bring a deleted person back.

Scoring learns of a deletion from profile's `removed` change on `profiles.changed.<p>` and erases the
person's held fields then (`cdp_kit.held`: deleted by the next snapshot, the files erased). An operator who
restores `scoring.db` (architecture.md's recovery for a damaged store: stop, restore the file with its
-wal, start) from a copy taken before the deletion gets the person's fields back - traits, computed
traits, consent, the scores last published - and the `removed` change does not come again: the partition
consumers are past it, and it may have aged out of PROFILES. The deletion's `privacy.deleted` notice is
still in PRIVACY (kept without an age limit): the service reads it whole at start
(`cdp_kit.bus.notices.read_notices`, before any partition is taken), and each partition, once restored
(snapshot, then the stream up to the checkpoint) and before its pipeline starts - at start, on a lease
acquired later, after a failed batch - has the persons the notices name erased (`erase_noticed`):
forgotten, their records deleted, the scores its outbox still holds for them taken out of the messages
(the others' stay, under the same message ids), the files erased. Nothing is published: profile already
holds the person as deleted, and a score for them would only carry their data on the bus again. Changes
of theirs that still reach the engine (the stream before the deletion, replayed, or delivered again by a
consumer created anew at the restored checkpoint) are skipped (`ScoringEngine.deleted`). It is
idempotent: a partition whose store holds none of them writes nothing. Logged at WARNING: how many persons
were erased and the notices' request ids, never identifiers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from cdp.scoring.v1 import scoring_pb2
from cdp_kit.bus.notices import scrub_outbox as scrub
from cdp_kit.bus.notices import write_partition_erasure
from cdp_kit.engine.outbox import partition_prefix
from cdp_kit.storage import Delete, Put
from cdp_scoring.engine import FIELDS

if TYPE_CHECKING:
    from cdp_scoring.engine import ScoringEngine

log = logging.getLogger("cdp.scoring.privacy")


async def erase_noticed(engine: ScoringEngine, named: Mapping[str, str], partition: int, outbox: str) -> int:
    """Erase every person of `named` (the partition's: person -> request id) that the engine holds or the
    partition's outbox still has scores of; nothing published. The number of persons erased."""
    if not named:
        return 0
    held = engine.held
    found = {p for p in named if p in engine.fields}
    # Loaded from the snapshot: a record to delete (the others came from the stream's replay only).
    stored = {p for p in found if p in held.versions}
    if found:
        held.forget(found.__contains__)
    ops: list[Put | Delete] = [Delete(FIELDS, p) for p in sorted(stored)]
    scrubbed = await scrub_outbox(engine, outbox, partition, named)
    return await write_partition_erasure(engine.store, ops, found, scrubbed, dict(named), partition, log)


async def scrub_outbox(
    engine: ScoringEngine, outbox: str, partition: int, named: Mapping[str, str]
) -> list[tuple[Put | Delete, set[str]]]:
    """The partition's outbox records without the score rows of `named` persons (`cdp_kit.bus.notices.
    scrub_outbox`): a copied file may hold scores not yet published, which the pipeline publishes at start."""

    def rewrite(_subject: str, payload: bytes) -> tuple[bytes | None, set[str]] | None:
        batch = scoring_pb2.ScoresUpdatedBatch.FromString(payload)
        gone = {p for b in (batch, *batch.more) for p in b.person_ids if p in named}
        if not gone:
            return None
        for columns in (batch, *batch.more):
            _drop_rows(columns, gone)
        # The versions whose columns still hold a person; the first of them carries the others.
        left = [columns for columns in (batch, *batch.more) if columns.person_ids]
        if not left:
            return None, gone
        first = scoring_pb2.ScoresUpdatedBatch()
        first.CopyFrom(left[0])
        first.ClearField("more")
        first.more.extend(left[1:])
        return first.SerializeToString(), gone

    return await scrub(engine.store, outbox, rewrite, prefix=partition_prefix(partition))


def _drop_rows(columns: scoring_pb2.ScoresUpdatedBatch, persons: set[str]) -> None:
    """Take the rows of `persons` out of one version's columns (values row-major, one time per person)."""
    width = len(columns.scores)
    keep = [i for i, p in enumerate(columns.person_ids) if p not in persons]
    if len(keep) == len(columns.person_ids):
        return
    person_ids = [columns.person_ids[i] for i in keep]
    values = [v for i in keep for v in columns.values[i * width : (i + 1) * width]]
    at_ms = [columns.at_ms[i] for i in keep if i < len(columns.at_ms)]
    del columns.person_ids[:]
    columns.person_ids.extend(person_ids)
    del columns.values[:]
    columns.values.extend(values)
    del columns.at_ms[:]
    columns.at_ms.extend(at_ms)
