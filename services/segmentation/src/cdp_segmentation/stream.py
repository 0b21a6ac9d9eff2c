"""Segmentation's stream on the kit's `PartitionedEngine`: `profiles.changed.<p>` in, `segments.entered.<p>`
/ `segments.exited.<p>` out (the contract and its invariants: `cdp_kit.engine`).

What segmentation gives the engine (`ChangesLogic`): `decode` a `ProfileChangedBatch`, `apply` it to the
held fields and memberships and return the transitions as the batch's messages (stable ids, see
engine.py), `recover` a partition by reloading it, and `snapshot` the held state at a quiescent point.
The kit does the rest: ordered durable consumer `segmentation-p<p>`, checkpoint
`segmentation_checkpoints/profiles.changed.<p>` committed with an outbox record of the batch's
transitions (one write per batch, none per person), publish with retry, acknowledgement, pipelining.
The batch's own write, while a time-based segment is live: the clock it was evaluated with, which a
replay evaluates it with again (engine.py, `replay`); for a batch of messages the replay applied already
(redelivered after a restart) that fired timers, the round they were fired in (`timer_round`).

Held state is not written per change: `snapshot` writes the persons changed since the last one and the
positions they include (`segmentation_snapshots`), every `CDP_SEGMENTATION_SNAPSHOT_SECONDS`, at a
quiescent point (every applied batch durable and published), so a snapshot never holds a membership
whose transition the bus may not get; the pipelines go on once the cut is copied, while it is written.

A partition that arrives (`start_partition`: start-up, or a lease moving here) is loaded from the
snapshot and brought up to the engine's checkpoint (or further: what its consumer was given) by
replaying `profiles.changed` before its pipeline applies anything; what the replay finds past the
engine's checkpoint is published under the ids it had (JetStream drops the duplicates), after the
partition's outbox (`published_through`); what is at or below it is on the bus already, and a snapshot
a crash cut short could make the replay find only part of it (engine.py, `replay`). A partition that
leaves (`stop_partition`) is drained, snapshotted, and dropped. A failed commit (`recover`) reloads the
partition the same way.

Timers (time conditions): due timers of a partition fire in its next `apply`, before its changes, so
their transitions go out in the partition's order, committed with the batch in the outbox. A partition
with no batch for a while has its due timers fired by the timer loop at a quiescent point (nothing of
any partition in flight), recorded (engine.py, `timer_round`) and published before the pipelines go on.
Either way their ids come from the person and the due instant, and a replay fires them again at the
time they fired (the batch's clock, or the round's): a timer fired again after a crash (its state was
not snapshotted yet) finds what it found, a JetStream duplicate.

`quiescent` is serialised here (snapshots, timer rounds and segment builds each hold every pipeline
for a moment and must not release each other's hold).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from nats.js.errors import NotFoundError

from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import Bus, Delivery, OutMessage, subjects
from cdp_kit.bus.consumer import describe_error
from cdp_kit.engine import Effects, EngineSpec, PartitionedEngine, Reject, WriteChain, outbox
from cdp_kit.storage import Store
from cdp_kit.storage.model import MAX_KEY_CHARS
from cdp_segmentation.engine import SegmentationEngine

SERVICE = "segmentation"

log = logging.getLogger("cdp.segmentation.stream")


@dataclass(slots=True)
class Changes:
    """One `profiles.changed.<p>` message, decoded."""

    seq: int
    message: profile_pb2.ProfileChangedBatch


def decode(delivery: Delivery) -> Changes:
    message = profile_pb2.ProfileChangedBatch()
    try:
        message.ParseFromString(delivery.data)
    except DecodeError as exc:
        raise Reject("invalid_message", "data", f"not a cdp.profile.v1.ProfileChangedBatch ({exc})") from None
    for index, change in enumerate(message.changes):
        person_id = change.person_id
        if len(person_id) > MAX_KEY_CHARS or "\x00" in person_id:
            # Skipped where it is applied (evaluation.py); dead-lettered here, alone, so it is seen.
            delivery.reject_part(
                index,
                change.SerializeToString(),
                "invalid_person_id",
                f"changes[{index}].person_id: not a person id the store can key (1-{MAX_KEY_CHARS} characters, no NUL)",
            )
    return Changes(delivery.stream_seq, message)


def engine_spec(
    *, partitions: int, batch_size: int, ack_wait: float, snapshot_every: float, standby: str = ""
) -> EngineSpec:
    """Durables `segmentation-p<p>` (as before the engine); a standby replica's are its own
    (`segmentation-r<ordinal>-p<p>`, with checkpoints and outbox of its own)."""
    service = f"{SERVICE}-{standby}" if standby else SERVICE
    return EngineSpec(
        service=service,
        stream=subjects.PROFILES,
        subject_prefix=subjects.PROFILES_CHANGED_PREFIX,
        partitions=partitions,
        batch_size=batch_size,
        ack_wait=ack_wait,
        snapshot_every=snapshot_every,
        description=f"{service}: memberships of the persons of one partition",
    )


class ChangesLogic:
    """What segmentation does with a batch of `profiles.changed.<p>` (`cdp_kit.engine.Logic`)."""

    def __init__(self, engine: SegmentationEngine, stream: SegmentationStream) -> None:
        self.engine = engine
        self.stream = stream

    def decode(self, delivery: Delivery) -> Changes:
        return decode(delivery)

    async def apply(self, partition: int, items: list[Changes]) -> Effects:
        # The batch's clock, while a time-based segment is live: committed with its checkpoint, read by a
        # replay (engine.py, `replay`).
        writes: list = []
        messages = await self.engine.apply_changes(partition, items, writes)
        return Effects(writes=writes, messages=messages)

    async def recover(self, partition: int) -> None:
        # The held state of the partition may hold changes whose transitions never became durable.
        await self.engine.reload_partition(partition, self.stream.history(partition))
        # The chain is shared: writes after the failed one failed with it (each partition's next write
        # also waits for its own previous one, so none lands past a failure of its partition).
        await self.stream.chain.settle()
        self.stream.chain.reset()

    async def snapshot(self, positions: Mapping[int, int]) -> None:
        # Its presence turns on the kit's snapshot loop (`EngineSpec.snapshot_every`); the loop calls
        # `SegmentationStream.snapshot`, which lets the pipelines go on once the cut is copied.
        await self.engine.snapshot_at(positions)


class SegmentationStream(PartitionedEngine):
    """The partitioned engine, with segmentation's arrival and departure of a partition."""

    def __init__(self, engine: SegmentationEngine, spec: EngineSpec, *, bus: Bus, store: Store) -> None:
        # One chain for every partition: their batches' commits (checkpoint and outbox) land together,
        # one store round trip per round instead of one per batch (group commit, `WriteChain`).
        super().__init__(ChangesLogic(engine, self), spec, bus=bus, store=store, chain=WriteChain(store))
        self.engine = engine
        self._quiet = asyncio.Lock()
        self._snapshotting = asyncio.Lock()
        engine.stream = self

    async def start_partition(self, partition: int) -> None:
        if partition in self.pipelines:
            return
        delay = 0.1
        while True:
            try:
                await self.engine.arrive(partition, self.history(partition))
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store or the bus: the partition is ours, so try again
                log.warning("partition %s not loaded (%s); retrying in %.1fs", partition, describe_error(exc), delay)
                self.engine.leave(partition)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        await super().start_partition(partition)

    async def stop_partition(self, partition: int) -> None:
        if partition not in self.pipelines:
            return
        try:
            await super().stop_partition(partition)
            # Drained: everything applied is durable and published. Snapshot before letting go, so the next
            # owner starts from the state this replica reached rather than replaying to it.
            await self.snapshot()
        finally:
            # Cancelled too (the ownership cuts a release its lease no longer covers): the partition is
            # given up all the same, unsnapshotted (the next owner replays from the last snapshot).
            self.engine.leave(partition)

    @contextlib.asynccontextmanager
    async def quiescent(self):
        async with self._quiet:
            async with super().quiescent() as positions:
                yield positions

    async def snapshot(self) -> int:  # type: ignore[override]
        """Snapshot the held state (the interval's, a build's, a departure's): the cut is taken at a
        quiescent point, and the pipelines go on as soon as it is copied, while it is written. One at
        a time. A failure loses nothing: the persons stay dirty and a restart replays from the older
        positions."""
        async with self._snapshotting:
            copied = asyncio.Event()
            async with self.quiescent() as positions:
                writing = asyncio.ensure_future(self.engine.snapshot_at(positions, copied=copied.set))
                cut = asyncio.ensure_future(copied.wait())
                await asyncio.wait({writing, cut}, return_when=asyncio.FIRST_COMPLETED)
                cut.cancel()
            try:
                return await writing
            except Exception as exc:
                self.engine.log_snapshot_failure(exc)
                return 0

    @contextlib.asynccontextmanager
    async def snapshots_held(self):
        """No snapshot starts within; one under way finishes first (the engine's adoption, a partition at
        a time: a snapshot half-way would mark every served partition as done)."""
        async with self._snapshotting:
            yield

    async def published_through(
        self, partition: int, publish: Callable[[Sequence[OutMessage]], Awaitable[None]]
    ) -> int:
        """Before a partition's replay: publish what its outbox holds (batches committed, not yet
        published), and return its checkpoint, up to which every message's transitions are then on the
        bus. The pipeline publishes the outbox again when it starts (duplicates) and deletes it; the
        replay publishes nothing at or below the checkpoint (engine.py, `replay`), and what it finds
        after it goes out after the outbox, in stream order."""
        subject = subjects.profiles_changed(partition)
        record = await self.store.get(self.checkpoints, subject)
        async for held in self.store.scan_all(self.outbox, prefix=outbox.partition_prefix(partition)):
            await publish(outbox.messages_of(held))
        return record.doc.get("stream_seq", 0) if record is not None else 0

    def history(self, partition: int):
        """A function of the position the held state includes: the partition's messages after it, up to
        the engine's checkpoint or the last one its consumer was given, whichever is later."""

        async def since(after: int) -> AsyncIterator[tuple[str, int, bytes]]:
            subject = subjects.profiles_changed(partition)
            record = await self.store.get(self.checkpoints, subject)
            end = record.doc.get("stream_seq", 0) if record is not None else 0
            js = self.bus.js
            try:
                info = await js.consumer_info(self.spec.stream, self.spec.consumer(partition).durable)
                end = max(end, info.delivered.stream_seq or 0)
            except NotFoundError:
                pass
            seq = after + 1
            while seq <= end:
                try:
                    msg = await js.get_msg(self.spec.stream, seq=seq, subject=subject, next=True)
                except NotFoundError:
                    return
                if msg.seq > end:
                    return
                yield subject, msg.seq, msg.data or b""
                seq = msg.seq + 1

        return since
