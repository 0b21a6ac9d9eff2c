"""`PartitionedEngine`: a pipeline per owned partition, started and stopped as ownership changes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from cdp_kit.bus import Bus, ConsumerSpec, partition_count, subjects
from cdp_kit.engine import outbox
from cdp_kit.engine.chain import WriteChain
from cdp_kit.engine.logic import Logic
from cdp_kit.engine.pipeline import PartitionPipeline
from cdp_kit.ownership import Ownership, StaticOwnership
from cdp_kit.stopping import raise_if_cancelling
from cdp_kit.storage import Store
from cdp_kit.telemetry import LATENCY_BUCKETS_MS, observe_on

log = logging.getLogger("cdp.engine")


async def _nothing() -> None:
    """A release of a partition this engine does not run."""


@dataclass(frozen=True)
class EngineSpec:
    """Where a partitioned service reads and how hard it pipelines.

    `service` names its durables (`<service>-p<p>`), its checkpoints (`<service>_checkpoints`, keyed by
    subject) and its outbox (`<service>_engine_outbox`); `stream` and `subject_prefix` its input
    (`<prefix>.<p>`); `partitions` how many there are."""

    service: str
    stream: str
    subject_prefix: str
    partitions: int
    batch_size: int = 256
    # Batches applied and not yet acknowledged, per partition: 1 is no pipelining.
    in_flight: int = 3
    ack_wait: float = 30.0
    max_deliver: int = 5
    backoff: tuple[float, ...] = (0.2, 1.0, 5.0, 15.0, 60.0)
    fetch_timeout: float = 1.0
    publish_backoff: tuple[float, ...] = (0.05, 0.2, 1.0, 2.0)
    # Seconds between `Logic.snapshot` calls (services holding state without writing it per change).
    snapshot_every: float | None = None
    description: str = ""
    # The outbox collection (default `<service>_engine_outbox`). A service may share its own outbox
    # collection: the engine's records are keyed `<partition>:<position>` and hold `messages`.
    outbox: str | None = None

    def __post_init__(self) -> None:
        if self.in_flight < 1:
            raise ValueError("in_flight must be at least 1")
        if self.partitions < 1:
            raise ValueError("partitions must be at least 1")

    def consumer(self, partition: int, *, memory_state: bool = True) -> ConsumerSpec:
        """The partition's durable consumer. `memory_state` (`ConsumerSpec.memory_state`): the checkpoint is
        the position that counts, so a consumer lost with a nats-server restart is created again after it.
        Not for held state (a logic that snapshots): its start replays what the consumer was given after
        the snapshot (`cdp_kit.bus.delivered_since`), which only a consumer the restart kept can say."""
        return ConsumerSpec(
            stream=self.stream,
            durable=subjects.partition_durable(self.service, partition),
            filter_subjects=(subjects.partitioned(self.subject_prefix, partition),),
            batch_size=self.batch_size,
            ack_wait=self.ack_wait,
            max_deliver=self.max_deliver,
            backoff=self.backoff,
            # Room for every batch in flight and the one being fetched.
            max_ack_pending=self.batch_size * (self.in_flight + 1),
            fetch_timeout=self.fetch_timeout,
            ordered=True,
            memory_state=memory_state,
            description=self.description or f"{self.service}: partition {partition}",
        )


class PartitionedEngine:
    """Runs `logic` over the partitions this replica owns (the contract: `cdp_kit.engine`).

    `chain`: one `WriteChain` for every partition (and whatever else the service writes through it),
    for a service whose hot state spans partitions; by default each partition has its own.

    `also`: more inputs partitioned the same way, each a logic and the spec of its stream (its
    `service` names its durables, checkpoints and outbox, as for an engine of its own, so an input
    moved into another engine resumes where it was). A partition's one pipeline reads all of them: a
    round takes what has arrived on each, applies each input's items with its logic (in the order of
    the inputs), and commits, publishes and acknowledges them together - one round's fixed costs
    instead of one per input. There is no order between inputs (there was none between engines);
    within each, everything above holds."""

    def __init__(
        self,
        logic: Logic,
        spec: EngineSpec,
        *,
        bus: Bus,
        store: Store,
        chain: WriteChain | None = None,
        also: Sequence[tuple[Logic, EngineSpec]] = (),
    ) -> None:
        self.logic = logic
        self.spec = spec
        self.bus = bus
        self.store = store
        self.chain = chain
        self.checkpoints = subjects.checkpoints_collection(spec.service)
        self.outbox = spec.outbox or outbox.outbox_collection(spec.service)
        # Every input: (logic, spec, checkpoints collection, outbox collection); the engine's own first.
        self.feeds = [(logic, spec, self.checkpoints, self.outbox)]
        for other_logic, other in also:
            if other.partitions != spec.partitions:
                raise ValueError(f"input {other.service} has {other.partitions} partitions, not {spec.partitions}")
            collection = other.outbox or outbox.outbox_collection(other.service)
            self.feeds.append((other_logic, other, subjects.checkpoints_collection(other.service), collection))
        # Outbox records are keyed by partition and their input's stream position: one outbox per input.
        if len({feed[3] for feed in self.feeds}) < len(self.feeds):
            raise ValueError("each input of an engine needs an outbox of its own")
        self.pipelines: dict[int, PartitionPipeline] = {}
        self._cut: set[int] = set()  # partitions whose release was cut short since they last started
        # Per partition released and not yet drained: its pipeline (a release cancelled before its drain
        # began leaves it here, stopped and not aborted, until the partition starts again).
        self._releasing: dict[int, PartitionPipeline] = {}
        self._count_lock = asyncio.Lock()
        self._count_checked = False
        self.gate = asyncio.Event()  # cleared while anyone holds (or waits for) a quiescent point
        self.gate.set()
        self.holders = 0  # quiescent() callers inside or waiting: the gate opens when the last leaves
        telemetry = bus.telemetry
        self.tracer = telemetry.tracer
        meter = telemetry.meter
        # Where a batch's time goes, stage by stage (`cdp_kit.engine`): bus wait, slot wait, decode,
        # apply, commit, publish, acknowledge. bench/bench_profile.py reports them per benchmark.
        self.m_bus_wait = meter.create_histogram(
            "cdp.engine.bus.wait.duration",
            unit="ms",
            description="time a batch's oldest message waited in JetStream before its partition fetched it",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self.m_slot_wait = meter.create_histogram(
            "cdp.engine.slot.wait.duration",
            unit="ms",
            description="time a fetched batch waited for a pipeline slot (every slot held by a commit in flight)",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self.m_decode = meter.create_histogram(
            "cdp.engine.decode.duration",
            unit="ms",
            description="time to decode one batch's messages",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self.m_ack = meter.create_histogram(
            "cdp.engine.ack.duration",
            unit="ms",
            description="time to acknowledge one batch's messages once its effects are durable and published",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self.m_apply = meter.create_histogram(
            "cdp.engine.batch.apply.duration",
            unit="ms",
            description="time to apply one batch to hot state",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self.m_commit = meter.create_histogram(
            "cdp.engine.commit.duration",
            unit="ms",
            description="time from submitting a batch's commit to it being durable",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self.m_publish = meter.create_histogram(
            "cdp.engine.publish.duration",
            unit="ms",
            description="time to get a batch's messages stored by JetStream",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self.m_snapshot_failures = meter.create_counter(
            "cdp.engine.snapshot.failures",
            unit="{snapshot}",
            description="interval snapshots that failed (the next interval tries again)",
        )
        self.m_recoveries = meter.create_counter(
            "cdp.engine.recoveries", unit="{recovery}", description="pipelines restarted after a failed batch"
        )
        self.m_fenced = meter.create_counter(
            "cdp.engine.partition.fenced",
            unit="{partition}",
            description="partitions this replica stopped working on because another owner had claimed them "
            "(a replica that stalled past its lease, or two replicas the ownership does not know of)",
        )
        self.m_rewinds = meter.create_counter(
            "cdp.engine.checkpoint.rewinds",
            unit="{rewind}",
            description="partitions whose checkpoint was past the last sequence the stream holds for them "
            "(a stream restored older than the store, or recreated), resumed from that sequence",
        )
        observe_on(
            meter,
            "cdp.engine.lag",
            self,
            PartitionedEngine._observe_lag,
            lambda callback: meter.create_observable_gauge(
                "cdp.engine.lag",
                callbacks=[callback],
                unit="{message}",
                description="messages of an owned partition not yet delivered to its pipeline",
            ),
        )

    def _observe_lag(self):
        from opentelemetry.metrics import Observation

        for pipeline in list(self.pipelines.values()):
            for feed in pipeline.feeds:
                yield Observation(feed.pending, feed.partition_attrs)

    @property
    def outboxes(self) -> list[str]:
        """The outbox collection of each input."""
        return [feed[3] for feed in self.feeds]

    # --- partitions ---------------------------------------------------------------------------------

    def owned(self) -> set[int]:
        return set(self.pipelines)

    async def start_partition(self, partition: int) -> None:
        """Start working on `partition` (an ownership's `on_acquire`)."""
        if partition in self.pipelines:
            return
        await self.check_partitions()
        left = self._releasing.get(partition)
        if left is not None:
            # Its last release never ended: cancelled before its drain began (see `stop_partition`), the
            # pipeline was told to stop and nobody aborted it. Aborted now, as the cut would have.
            log.warning(
                "engine partition %s of %s: its last release was cancelled before it began; aborted now",
                partition,
                self.spec.service,
                extra={"partition": partition},
            )
            self._abort(partition, left)
            if left.task is not None:
                await asyncio.wait({left.task})
        if partition in self._cut:
            # Its last release was cut short: hot state may hold what never landed. Recovered as after a
            # failed batch (each logic waits for the writes still in flight, then drops that state).
            for logic in {id(feed[0]): feed[0] for feed in self.feeds}.values():
                await logic.recover(partition)
            self._cut.discard(partition)
        pipeline = PartitionPipeline(self, partition)
        pipeline.task = asyncio.create_task(pipeline.run(), name=f"{self.spec.service} partition {partition}")
        self.pipelines[partition] = pipeline

    def stop_partition(self, partition: int) -> Coroutine[Any, Any, None]:
        """Stop fetching, drain the commits in flight, acknowledge, release (an ownership's
        `on_release`): the returned coroutine ends when another replica may take the partition.

        Not a coroutine function: the partition leaves the pipelines and its pipeline stops fetching
        when this is *called*. A service releasing several engines' partitions together
        (`asyncio.gather(*(e.stop_partition(p) for e in engines))`) hands the ownership a release whose
        drains are tasks of their own; a cut arriving before they began (the lease already lost when the
        release was called: a replica woken from a stall) cancels them before a line of theirs runs. The
        pipeline, stopped already, then drains alone instead of working on as if nothing happened, and
        is aborted should the partition come back here (`start_partition`).

        Cancelled (the ownership cuts a release its lease no longer covers), the partition is aborted
        as a crash would abort it: its pipeline is cancelled (nothing more acknowledged or published)
        and its own write chain aborted (nothing more of its written); a chain shared with other
        partitions lands what it already holds. Its hot state may then hold changes the store never
        gets: should the partition come back here, the logic recovers it first (`start_partition`)."""
        pipeline = self.pipelines.pop(partition, None)
        if pipeline is None:
            return _nothing()
        pipeline.begin_stop()
        self._releasing[partition] = pipeline
        return self._release(partition, pipeline)

    async def _release(self, partition: int, pipeline: PartitionPipeline) -> None:
        try:
            await pipeline.stop()  # cancelled, its gather cancels the pipeline's task
        except asyncio.CancelledError:
            self._abort(partition, pipeline)
            raise
        if self._releasing.get(partition) is pipeline:
            del self._releasing[partition]

    def _abort(self, partition: int, pipeline: PartitionPipeline) -> None:
        """Abort a released partition's pipeline as a crash would (nothing more of it acknowledged,
        published or written), and recover the logic's hot state should the partition come back."""
        if pipeline.task is not None:
            pipeline.task.cancel()
        if pipeline.chain is not self.chain:
            pipeline.chain.abort()
        self._cut.add(partition)
        if self._releasing.get(partition) is pipeline:
            del self._releasing[partition]

    async def wait_ready(self) -> None:
        """Every owned partition restored and subscribed (tests, start-up probes)."""
        await asyncio.gather(*(p.ready.wait() for p in list(self.pipelines.values())))

    async def run(self, ownership: Ownership | None = None) -> None:
        """Work on the partitions `ownership` gives (all of them by default) until cancelled; then
        release them, draining what is in flight."""
        ownership = await self.start(ownership)
        await self.serve(ownership)

    async def start(self, ownership: Ownership | None = None) -> Ownership:
        """Take the partitions `ownership` gives (all of them by default): their pipelines exist when
        this returns. Then `serve(ownership)`."""
        await self.check_partitions()  # before any lease is taken
        ownership = ownership or StaticOwnership(partitions=self.spec.partitions)
        await ownership.start(self.start_partition, self.stop_partition)
        return ownership

    async def check_partitions(self) -> None:
        """The streams this engine reads were made with its partition count (`cdp_kit.bus.partition_count`;
        on a bare nats-server the first engine records it): checked once, before the first partition
        starts. PartitionsMismatch, naming both counts, stops the service."""
        async with self._count_lock:
            if not self._count_checked:
                streams = [feed[1].stream for feed in self.feeds]
                record = not getattr(self.bus, "provisioned", False)
                wait = getattr(self.bus, "provision_wait", 0.0)
                await partition_count.check(self.bus.js, self.spec.partitions, streams, record=record, wait=wait)
                self._count_checked = True

    async def serve(self, ownership: Ownership) -> None:
        """Snapshot at the interval (if the logic snapshots) until cancelled; then release every
        partition, draining."""
        try:
            if self.spec.snapshot_every is not None and hasattr(self.logic, "snapshot"):
                me = asyncio.current_task()
                while True:
                    await asyncio.sleep(self.spec.snapshot_every)
                    try:
                        await self.snapshot()
                    except Exception as exc:  # the next interval tries again; the stream goes on
                        # Not after a stop the snapshot's store client lost (a reply in the cancellation's
                        # loop turn, `cdp_kit.stopping`): the loop ran on, and the release never came.
                        raise_if_cancelling(me)
                        self.m_snapshot_failures.add(1, {"service": self.spec.service})
                        log.warning("snapshot of %s failed: %s", self.spec.service, type(exc).__name__)
            else:
                await asyncio.Event().wait()
        finally:
            await ownership.stop()
            await self.close()

    async def close(self) -> None:
        """Stop every partition, draining."""
        partitions = list(self.pipelines)
        await asyncio.gather(*(self.stop_partition(p) for p in partitions))

    def abort(self) -> None:
        """Stop at once without draining, as a crash would (tests): nothing more is written,
        published or acknowledged."""
        for pipeline in self.pipelines.values():
            if pipeline.task is not None:
                pipeline.task.cancel()
        for chain in {id(p.chain): p.chain for p in self.pipelines.values()}.values():
            chain.abort()
        self.pipelines.clear()

    # --- snapshots ----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def quiescent(self):
        """Hold every pipeline before its next apply, and wait until every batch applied so far is
        durable and acknowledged. Yields each owned partition's checkpoint.

        Several holders may be inside at once (a snapshot and a timer round); the pipelines go on
        only when the last one has left."""
        self.holders += 1
        self.gate.clear()
        try:
            await asyncio.gather(*(p.idle.wait() for p in list(self.pipelines.values())))
            yield {p: pipeline.checkpoint for p, pipeline in self.pipelines.items()}
        finally:
            self.holders -= 1
            if self.holders == 0:
                self.gate.set()

    async def snapshot(self) -> None:
        async with self.quiescent() as positions:
            await self.logic.snapshot(positions)  # type: ignore[attr-defined]
