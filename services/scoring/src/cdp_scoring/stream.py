"""`profiles.changed.<p>` on the kit's partitioned engine: what scoring gives it (`ScoringLogic`), and
the partitions' held fields following ownership (`ScoringStream`).

Per batch of a partition (`apply`): each change updates the person's flat fields, a burst of changes
to one person is folded into one scoring, and the persons whose model inputs changed join the next
scoring round (rounds.py: one onnxruntime call per model for every partition's persons). The batch's
effects are the round's messages for the partition's persons (`scores.updated.<p>`, ids hashed from
their bytes); the kit commits them with the checkpoint (its outbox), publishes them once durable, then
acknowledges. Nothing else is written per batch: the fields are held, not stored.

The fields of partition p at any moment include exactly the changes up to the last position applied,
and the engine's checkpoint says up to where their scores are durable. Hence:

- **Snapshots** are taken at the engine's quiescent points (every applied batch durable and
  acknowledged), where the two positions are equal: the copy of the fields is taken there, with each
  partition's checkpoint as its snapshot position, and written while batches are applied again. A
  snapshot never holds a change whose scores could still be lost. Besides the periodic ones, a pass that
  publishes outside the stream path takes one (`snapshot_since`; requests.py: `_stamps_durable`), so that
  the stamps it hands out outlive a crash.
- **A partition arrives** (start, or an ownership's acquire): its persons are loaded from the last
  snapshot and `profiles.changed.<p>` is replayed from the snapshot's position *up to the engine's
  checkpoint*, without scoring (those scores were published, or wait in the outbox); then the persons
  PRIVACY's deletion notices name are erased from it (notices.py: a store file restored from before a
  deletion must not bring the person back), and a model whose live version (or canary) is not the one
  the partition's record says its persons were scored with scores the persons held (deployments.py),
  before its pipeline starts. Whatever comes
  after the checkpoint is delivered by the engine and scored. Replaying past the checkpoint would apply
  changes whose scores may never have been made durable, and then score nothing when they come again.
- **A failed batch** (`recover`): the partition is rebuilt the same way, so the batches redelivered
  after the checkpoint are applied, and scored, on fields that do not hold them yet.
- **A partition leaves** (release): the engine drains it, a last snapshot is taken at a quiescent
  point, and its persons are forgotten: the next owner loads them from there.

A crash at any point therefore costs a replay, never a score: the outbox holds what was committed, the
rest is redelivered and applied on fields rebuilt to the checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping

from google.protobuf.message import DecodeError
from nats.js.errors import NotFoundError

from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import Bus, Delivery, subjects
from cdp_kit.bus.consumer import describe_error
from cdp_kit.engine import Effects, EngineSpec, PartitionedEngine, Reject, outbox_collection
from cdp_kit.engine.pipeline import PartitionPipeline
from cdp_kit.errors import Unavailable
from cdp_scoring.engine import CHECKPOINTS, SERVICE, ScoringEngine
from cdp_scoring.notices import erase_noticed

log = logging.getLogger("cdp.scoring.stream")


class ScoringLogic:
    """The partitioned engine's `Logic` for `profiles.changed.<p>` (decode / apply / recover / snapshot)."""

    def __init__(self, engine: ScoringEngine, bus: Bus) -> None:
        self.engine = engine
        self.js = bus.js
        # partition -> the checkpoint its fields were restored to (the engine's own view of the
        # checkpoint may lag it until its pipeline has read the store)
        self.restored_at: dict[int, int] = {}
        self._writing: asyncio.Task | None = None
        # Snapshots copied at a cut (numbered from 1), and the latest of them written whole (`snapshot_since`).
        self.cuts = 0
        self.cuts_written = 0
        # One snapshot at a time: `PartitionedEngine.quiescent` holds every pipeline through one gate.
        self.lock = asyncio.Lock()
        self.outbox = outbox_collection(SERVICE)

    # --- the Logic ----------------------------------------------------------------------------------

    def decode(self, delivery: Delivery) -> profile_pb2.ProfileChangedBatch:
        message = profile_pb2.ProfileChangedBatch()
        try:
            message.ParseFromString(delivery.data)
        except DecodeError:
            raise Reject("invalid_message", "payload", "not a cdp.profile.v1.ProfileChangedBatch") from None
        return message

    async def apply(self, partition: int, items: list[profile_pb2.ProfileChangedBatch]) -> Effects:
        engine = self.engine
        engine.at_cut = False  # the fields move past the quiescent point
        if partition not in engine.ready:
            # Its restore failed (the store or the bus was down): the engine recovers the partition,
            # which restores it, and applies the batch again.
            raise Unavailable("the partition's fields are not restored yet")
        touched, changed_at, oldest = engine.apply_batch(items)
        if not touched:
            return Effects()
        try:
            messages = await engine.score_round(partition, touched, changed_at)
        except BaseException:
            # The fields hold the batch, its scores are lost: not ready (no snapshot copies them) until
            # `recover` has rebuilt the partition.
            engine.ready.discard(partition)
            raise
        if oldest is not math.inf:
            engine._m_freshness.record(max(0.0, (engine.clock() - oldest) * 1000))
        return Effects(messages=messages)

    async def recover(self, partition: int) -> None:
        """A batch of `partition` failed: its fields may hold changes whose scores are not durable."""
        await self.restore(partition)

    async def snapshot(self, positions: Mapping[int, int]) -> None:
        """At a quiescent point: the fields of every ready partition include exactly its checkpoint.
        The copy is taken before this returns; the write goes on while batches are applied again."""
        if self._writing is not None and not self._writing.done():
            return  # the previous snapshot is still being written: the next interval takes this one's place
        engine = self.engine
        if any(partition not in engine.ready for partition in positions):
            return  # a partition being restored or recovered: its fields are not at its checkpoint
        for partition, position in positions.items():
            if partition in engine.ready:
                subject = subjects.profiles_changed(partition)
                engine.held.applied[subject] = max(position, self.restored_at.get(partition, 0))
        engine.at_cut = True
        self._writing = asyncio.create_task(self._write(), name="scoring snapshot")
        # The snapshot's first step copies the fields; it runs now, before any batch is applied again.
        # Should it not have, the next apply ends the cut and that snapshot is skipped (`behind`).
        await asyncio.sleep(0)

    async def _write(self) -> None:
        engine, cut = self.engine, 0

        def copied() -> None:
            # Called right where the copy was taken, or found not needed (nothing dirty): at the cut still. A
            # batch applied before that ended the cut, and nothing was copied (`behind`).
            nonlocal cut
            if engine.at_cut:
                self.cuts += 1
                cut = self.cuts

        try:
            await engine.held.snapshot(copied=copied)
        except Exception as exc:  # kept dirty: the next snapshot writes them; a restart replays further
            log.warning("fields snapshot failed: %s", describe_error(exc))
            return
        self.cuts_written = max(self.cuts_written, cut)

    async def written(self) -> None:
        """Wait until the snapshot being written (if any) has landed or failed."""
        if self._writing is not None:
            await asyncio.gather(self._writing, return_exceptions=True)

    # --- partitions ---------------------------------------------------------------------------------

    async def restore(self, partition: int) -> int:
        """Bring `partition`'s fields to the engine's checkpoint: the last snapshot, then
        `profiles.changed.<p>` from its position up to the checkpoint, not scored. Returns the changes
        replayed."""
        started = time.perf_counter()
        engine = self.engine
        subject = subjects.profiles_changed(partition)
        # A snapshot being written lands first, so the load reads what it wrote. From the check on,
        # nothing awaits until the partition's persons are forgotten: a snapshot started later copies
        # none of them but those the replay brings back, at positions the checkpoint covers.
        while self._writing is not None and not self._writing.done():
            await self.written()
        since = await engine.load_partition(partition)
        record = await engine.store.get(CHECKPOINTS, subject)
        until = record.doc.get("stream_seq", 0) if record is not None else 0
        replayed = 0
        async for data in self._history(subject, since, until):
            replayed += engine.replay_message(data)
        # Deleted persons a restored store file (or the replay of the stream before their removal) brings
        # back: erased before the pipeline publishes the outbox or applies anything (notices.py).
        await erase_noticed(engine, engine.deleted_by_partition.get(partition, {}), partition, self.outbox)
        self.restored_at[partition] = until
        engine.ready.add(partition)
        engine._m_restore.record((time.perf_counter() - started) * 1000, {"partition": partition})
        if replayed:
            log.info(
                "partition fields restored",
                extra={"partition": partition, "snapshot": since, "checkpoint": until, "changes": replayed},
            )
        return replayed

    async def drop(self, partition: int) -> None:
        """`partition` went to another replica: forget its fields (after the snapshot being written)."""
        while self._writing is not None and not self._writing.done():
            await self.written()
        self.engine.forget_partition(partition)
        self.restored_at.pop(partition, None)

    async def _history(self, subject: str, after: int, until: int) -> AsyncIterator[bytes]:
        """The payloads of `subject` in (after, until], in stream order."""
        seq = after + 1
        while seq <= until:
            try:
                msg = await self.js.get_msg(subjects.PROFILES, seq=seq, subject=subject, next=True)
            except NotFoundError:
                return
            if msg.seq > until:
                return
            yield msg.data or b""
            seq = msg.seq + 1


class ScoringStream(PartitionedEngine):
    """The partitioned engine over `ScoringLogic`, restoring a partition's fields before its pipeline
    starts and dropping them once it has stopped (the ownership's acquire and release hooks)."""

    logic: ScoringLogic

    async def start_partition(self, partition: int) -> None:
        if partition in self.pipelines:
            return
        engine = self.logic.engine
        async with engine.arriving():
            await self.logic.restore(partition)
            try:
                # A version made live (or a canary) while the partition was held nowhere, or by a replica that
                # had not scored its persons yet: they are scored now (deployments.py), in the background.
                await engine.score_held_if_stale(partition)
            except Exception as exc:
                log.warning(
                    "could not check which versions partition %d's persons were scored with: %s",
                    partition,
                    describe_error(exc),
                )
            await super().start_partition(partition)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Partitions being released: draining, and drained but not yet in a last snapshot and dropped.
        # The pipelines drain at once (a stop releases every partition together; each waits up to a
        # fetch timeout for its pull to return); what follows runs under the logic's lock.
        self._draining: set[int] = set()
        self._drained: dict[int, PartitionPipeline] = {}
        self._released = asyncio.Condition(self.logic.lock)

    async def stop_partition(self, partition: int) -> None:
        # No snapshot while a partition drains: its fields may hold batches not yet durable, and a
        # snapshot copies every held person. Taking the lock here waits for a snapshot being copied.
        #
        # Cancelled (the ownership cuts a release its lease no longer covers: `cdp_kit.ownership.leased`),
        # the partition is given up all the same: its pipeline stops (the engine aborts it; cut before the
        # drain began, its task is cancelled here and the engine aborts it should the partition come back)
        # and its fields are forgotten, so this replica neither works on the partition nor answers from
        # fields the new owner updates. Before, a cut while a snapshot held the lock never told the engine:
        # the pipeline worked on, fenced at its next commit, and the partition, back here, was taken for
        # running (held and idle). Then, told to stop but left to drain alone, the pipeline scored the batch
        # it had in flight on the fields forgotten meanwhile (a person on no inputs), committed and published it.
        try:
            async with self._released:
                pipeline = self.pipelines.get(partition)
                if pipeline is None:
                    return
                self._draining.add(partition)
        except asyncio.CancelledError:
            pipeline = self.pipelines.get(partition)
            super().stop_partition(partition).close()  # stopped at the call; aborted should it come back
            if pipeline is not None and pipeline.task is not None:
                pipeline.task.cancel()  # nothing more of it scored, committed or published
            await self.logic.drop(partition)
            raise
        try:
            await super().stop_partition(partition)  # drained: what was applied is durable and acknowledged
        except asyncio.CancelledError:
            await self.logic.drop(partition)
            raise
        finally:
            async with self._released:
                self._draining.discard(partition)
                self._released.notify_all()
        async with self._released:
            self._drained[partition] = pipeline
            # The partitions released together are snapshotted together, once all have drained: until
            # then another one's fields may be ahead of its checkpoint.
            await self._released.wait_for(lambda: not self._draining)
            drained, self._drained = self._drained, {}
            if not drained:
                return  # a partition released with this one took the last snapshot and dropped it
            engine = self.logic.engine
            if all(p in engine.ready and d.position == d.checkpoint for p, d in drained.items()):
                # A last snapshot with the partitions' final checkpoints: their next owners replay less.
                async with self.quiescent() as positions:
                    if self._consistent():
                        await self.logic.snapshot({**positions, **{p: d.checkpoint for p, d in drained.items()}})
            for p in drained:
                await self.logic.drop(p)

    async def snapshot(self) -> None:
        """At a quiescent point (one at a time: `quiescent` holds every pipeline through one gate); none
        while partitions are being released (`stop_partition` takes theirs)."""
        async with self.logic.lock, self.quiescent() as positions:
            if self._consistent() and not self._draining and not self._drained:
                await self.logic.snapshot(positions)

    def _consistent(self) -> bool:
        """Every partition's fields hold exactly what is durable. Not so for a partition whose commit
        failed and which is not recovered yet (applied past its checkpoint): no snapshot until it is."""
        return all(pipeline.position == pipeline.checkpoint for pipeline in self.pipelines.values())

    async def snapshot_now(self) -> None:
        """Snapshot at the next quiescent point and wait until it is written (tests, operators)."""
        await self.snapshot()
        await self.logic.written()

    async def snapshot_since(self, timeout: float = 30.0) -> bool:
        """Until a snapshot whose copy of the fields is taken from now on is written (False: none within
        `timeout`; the periodic ones go on). A quiescent point is waited for as the periodic snapshot waits,
        once: the stream path pauses no longer than for one of those. A snapshot may be skipped (one still
        being written, a partition being restored or released, a commit not recovered yet, a failed write):
        then again, shortly after."""
        logic = self.logic
        wanted = logic.cuts + 1  # a copy taken before now may predate what the caller changed
        deadline = asyncio.get_running_loop().time() + timeout
        delay = 0.05
        while True:
            await self.snapshot_now()
            if logic.cuts_written >= wanted:
                return True
            if asyncio.get_running_loop().time() + delay > deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


def scoring_stream(
    engine: ScoringEngine, bus: Bus, *, partitions: int, batch_size: int, ack_wait: float, snapshot_every: float
) -> ScoringStream:
    """`profiles.changed.<p>` for `engine`: durables `scoring-p<p>` and checkpoints in
    `scoring_checkpoints` (the names scoring used before the engine), outbox `scoring_engine_outbox`."""
    spec = EngineSpec(
        service=SERVICE,
        stream=subjects.PROFILES,
        subject_prefix=subjects.PROFILES_CHANGED_PREFIX,
        partitions=partitions,
        batch_size=batch_size,
        ack_wait=ack_wait,
        snapshot_every=snapshot_every,
        description="scoring: re-score persons whose model inputs changed",
    )
    stream = ScoringStream(ScoringLogic(engine, bus), spec, bus=bus, store=engine.store)
    # A pass that publishes outside the stream path snapshots the stamps it hands out (requests.py).
    engine.snapshot_fields = stream.snapshot_since
    return stream
