"""One partition's pipeline: fetch, decode, apply, commit, publish, acknowledge (`cdp_kit.engine`).

Two tasks per partition. The *applier* fetches a batch, decodes it, skips what the checkpoint covers,
calls `apply` and submits the batch's commit to the write chain, then goes on with the next batch
while that commit is in flight (at most `in_flight` batches between apply and acknowledgement). The
*settler* takes the batches in the same order, waits for each commit, acknowledges the batch's
deliveries and publishes its messages (one socket write for both; the commit put the messages in the
outbox, so a process that dies in between loses none). So the checkpoint and the acknowledgements only
ever advance over a contiguous durable prefix, and batch n+1 is applied while batch n is being written.

Fetching: one standing pull request serves many batches (`cdp_kit.bus.consumer.StandingPull`); a
batch is what has arrived in its inbox. A batch that has to wait for a slot (every one held by a
commit: the store is the bottleneck) takes what arrived in the meantime when it gets one, up to one
more batch's worth: under load, batches grow instead of queueing, so each commit, publish and
acknowledgement carries more messages and the cost per message falls as the rate rises. Stopping
closes the pull so nothing more is delivered to it, and what was delivered and not handled comes again
first to the next owner (restarted at the floor).

Failure: a commit that fails (or an `apply` that raises) stops the applier; every batch after it fails
too (the chain), nothing after it is acknowledged. Once the settler has drained, `recover` is called,
the checkpoint and the outbox are read back from the store (a commit reported failed may have landed),
the consumer is restarted at its acknowledgement floor (so everything unacknowledged comes again, in
order), and the next batch is handled *carefully*: through `ConsumerRunner`'s isolation, one batch at a
time, split in halves on failure, so one bad message is dead-lettered alone and an outage dead-letters
nothing. Then pipelining resumes. A stop does not wait for the careful path's retries (an outage's
last forever): it ends them between attempts, and what is not acknowledged comes again to the next owner.

Fencing: the ownership stops a replica from *starting* work on a partition after its lease is lost, but a
replica that stalled (a long pause, a frozen VM, a store answering late) wakes with commits already on
their way. So each pipeline is an owner with a token of its own: when it starts it *claims* each input's
checkpoint record (writes its token into it, at the version it read; until that write lands the
partition is not ready), and every commit writes the checkpoint with the token only at the version this
owner last wrote (`expected_version`). A commit of an owner whose claim another has overtaken fails whole
(the store writes a commit all or nothing), and that owner, reading the record back to recover, finds
another's token: it stops working on the partition (`fenced`, logged at ERROR and counted) and leaves it
to the ownership, acknowledging, publishing and writing nothing more. A write reported failed that had
landed is told apart by the token: the record is its own, so it goes on.

The fence keeps the stalled owner's writes out; its pulls need a check of their own. Woken, its standing
pull finds no heartbeat for longer than it waits and asks again of the consumer, which the new owner
restarted under the same name: the server hands the stalled owner messages the new owner never sees, and
they stay unacknowledged while the new owner applies what came after them (then, when they come again
after `ack_wait`, they are behind the checkpoint: skipped as applied, lost). Every delivery of a
partition's consumer is its owner's, so each one follows the last in the consumer's sequence: a binding
notes where the sequence stands before it asks for anything (and binds again if something is already
out elsewhere), and a delivery that skips a number means another subscriber took the ones between. The
fetch is then dropped and the consumer bound again, restarted at its acknowledgement floor, so those
messages come again before anything newer.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import nats.errors
from nats.js.errors import NotFoundError
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from cdp_kit.bus import Delivery, OutMessage, subjects
from cdp_kit.bus.consumer import ConsumerRunner, PullLost, StandingPull, _raise_if_cancelling, describe_error
from cdp_kit.engine import outbox
from cdp_kit.engine.chain import WriteChain
from cdp_kit.engine.logic import Many, Reject
from cdp_kit.errors import Unavailable
from cdp_kit.storage import Put, WriteOp

if TYPE_CHECKING:
    from cdp_kit.engine.engine import PartitionedEngine

log = logging.getLogger("cdp.engine")

LAG_POLL_SECONDS = 5.0
MAX_TRACE_LINKS = 32


@dataclass(slots=True)
class _Batch:
    deliveries: list[list[Delivery]]  # per input, in the engine's order of inputs
    last_seqs: list[int | None]  # per input: its last position in the batch (None: nothing of it)
    messages: list[OutMessage]
    outbox_keys: list[tuple[_Feed, str]]  # the outbox records this batch wrote
    commit: asyncio.Future | None
    submitted: float
    claims: list[_Feed]  # the inputs whose checkpoint it writes: this owner's once it has landed


class _Feed:
    """One input of a partition's pipeline: the engine's own (`spec`), or one of its `also` inputs. Each
    has its durable consumer, its checkpoint and its outbox; a round of the pipeline takes what has
    arrived on every input."""

    def __init__(self, pipeline: PartitionPipeline, logic, spec, checkpoints: str, outbox_name: str) -> None:
        partition = pipeline.partition
        self.logic = logic
        self.spec = spec
        self.subject = subjects.partitioned(spec.subject_prefix, partition)
        # Held state (a logic that snapshots) replays from where its consumer got: a consumer whose state
        # a nats-server restart would lose cannot say (`EngineSpec.consumer`).
        self.consumer = spec.consumer(partition, memory_state=not hasattr(logic, "snapshot"))
        self.runner = ConsumerRunner(
            pipeline.engine.bus.js,
            self.consumer,
            lambda deliveries: pipeline._careful(self, deliveries),
            pipeline.engine.bus.telemetry,
        )
        self.checkpoints = checkpoints
        self.outbox = outbox_name
        self.attrs = {"service": spec.service}
        self.partition_attrs = {"service": spec.service, "partition": partition}
        # The position whose effects are durable (the stored checkpoint), and the last one applied to
        # hot state (ahead of it while commits are in flight). Messages at or below `position` are
        # skipped: they were applied already.
        self.checkpoint = 0
        self.position = 0
        # The stored checkpoint record's version as this pipeline last read or wrote it (0: none), and
        # whether a checkpoint write of this owner's has landed (claimed): each one expects that version.
        self.version = 0
        self.claimed = False
        self.pending = 0  # messages in the stream not yet delivered (lag), polled
        # The consumer sequence of the last message its consumer delivered to this pipeline's binding
        # (None: unbound): every delivery of the consumer comes here, so each one follows the last.
        self.delivered: int | None = None
        self.published: list[str] = []  # its outbox records published: deleted in the next commit
        self.pull: StandingPull | None = None
        # Several inputs: what this input's fetcher took from its pull, not yet taken by a round.
        self.arrived: list = []
        self.room = asyncio.Event()
        self.fetcher: asyncio.Task | None = None


class PartitionPipeline:
    def __init__(self, engine: PartitionedEngine, partition: int) -> None:
        self.engine = engine
        self.logic = engine.logic
        self.spec = engine.spec
        self.partition = partition
        self.chain = engine.chain or WriteChain(engine.store)
        self.feeds = [_Feed(self, *feed) for feed in engine.feeds]
        # The stage histograms are per service, not per partition: a histogram series is ~19 exposition
        # lines, and per partition they made a replica's /metrics page hundreds of KB (its scrape a share
        # of the process' CPU). The lag gauge and a recovery, one line each, name the partition.
        self.attrs = self.feeds[0].attrs
        self.partition_attrs = self.feeds[0].partition_attrs
        self.ready = asyncio.Event()
        self.idle = asyncio.Event()  # nothing applied and not yet acknowledged
        self.idle.set()
        self._in_flight = 0
        self._stopping = asyncio.Event()
        self._failure: BaseException | None = None
        self._last_commit: asyncio.Future | None = None
        # Careful path: committed, not published (the outbox records and the messages).
        self._unpublished: list[tuple[list[tuple[_Feed, str]], list[OutMessage]]] = []
        self._slots = asyncio.Semaphore(self.spec.in_flight)
        self._arrival = asyncio.Event()  # several inputs: a fetcher added something
        # Set while no careful attempt is between its apply and its commit or recovery: `stop()` may end
        # the careful path then (`_handle_carefully`) and leave the hot state as the store has it.
        self._careful_idle = asyncio.Event()
        self._careful_idle.set()
        self.task: asyncio.Task | None = None
        # This owner's token (one per pipeline: a partition started again is a new owner), claimed in each
        # input's checkpoint record; `fenced` once another owner's claim has overtaken it.
        self.token = uuid.uuid4().hex
        self.fenced = False

    # The engine's own input, as the tests and the services read it.

    @property
    def subject(self) -> str:
        return self.feeds[0].subject

    @property
    def consumer(self):
        return self.feeds[0].consumer

    @property
    def runner(self) -> ConsumerRunner:
        return self.feeds[0].runner

    @property
    def checkpoint(self) -> int:
        return self.feeds[0].checkpoint

    @property
    def position(self) -> int:
        return self.feeds[0].position

    @property
    def pending(self) -> int:
        return self.feeds[0].pending

    # --- life cycle ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Work on the partition until `stop()` (drains) or cancellation (a crash: nothing drains)."""
        delay = 0.1
        lag = asyncio.create_task(self._poll_lag(), name=f"lag {self.consumer.durable}")
        me = asyncio.current_task()
        try:
            while not self._stopping.is_set():
                try:
                    await self._run_once()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the store or the bus at start-up, or a bug: start over
                    # Not after a cancellation the failing step lost (a store or bus client's reply in its
                    # loop turn, `_raise_if_cancelling`): starting over ran on for as long as the outage.
                    _raise_if_cancelling(me)
                    log.warning(
                        "engine partition %s of %s restarting after %s",
                        self.partition,
                        self.spec.service,
                        describe_error(exc),
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        finally:
            lag.cancel()
            for feed in self.feeds:
                feed.runner.retire()  # its lag and age leave /metrics with the partition (bus/consumer.py)
            await self._unsubscribe()

    def begin_stop(self) -> None:
        """Stop fetching (nothing awaited): the pipeline drains and ends whether or not `stop()` is
        awaited."""
        self._stopping.set()
        # A fetch waiting for messages returns now, not after the fetch timeout.
        self._arrival.set()
        for feed in self.feeds:
            if feed.pull is not None:
                feed.pull.wake()

    async def stop(self) -> None:
        """Stop fetching, let every applied batch commit, publish and be acknowledged, then return
        (the partition can go to another replica)."""
        self.begin_stop()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)

    async def _run_once(self) -> None:
        await self._restore()
        await self._subscribe()
        self.ready.set()
        careful = False
        me = asyncio.current_task()
        while not self._stopping.is_set():
            _raise_if_cancelling(me)
            if careful:
                if self._failure is not None:  # set by a fetch (its stream recreated): not by a batch
                    await self._recover()
                    await self._subscribe()
                    continue
                rounds = await self._fetch()
                if any(rounds):
                    # ConsumerRunner's isolation: whole batch first, then halves down to one message.
                    for feed, msgs in zip(self.feeds, rounds, strict=True):
                        if msgs and not self._stopping.is_set():
                            await self._handle_carefully(feed, msgs)
                    careful = False
                continue
            await self._pipelined()
            if self._failure is not None:
                await self._recover()
                await self._subscribe()
                careful = True
        if not self.fenced:
            await self._flush_published(wait=True)

    async def _restore(self) -> None:
        """Read the checkpoints back, and publish what the outboxes still hold (a previous owner's or a
        failed commit's messages) before anything newer."""
        store = self.engine.store
        for feed in self.feeds:
            record = await store.get(feed.checkpoints, feed.subject)
            doc = record.doc if record is not None else {}
            if feed.claimed and doc.get("owner") != self.token:
                self._fence(feed, record.version if record is not None else 0)
                return
            feed.checkpoint = feed.position = doc.get("stream_seq", 0)
            feed.version = record.version if record is not None else 0
            # A write reported failed that had landed: the record is this owner's all the same.
            feed.claimed = feed.claimed or doc.get("owner") == self.token
            feed.published = []
            if not feed.claimed:
                # The record as it was (its position, and the time it was written: the rewind guard reads
                # it) with this owner's token, so a stalled owner's commit cannot land from now on. Written
                # outside the chain: it depends on no hot state, and its failure (VersionConflict: written
                # meanwhile; an outage) must not fail the chain's later writes. The pipeline starts again.
                claim = {"stream_seq": 0, **doc, "owner": self.token}
                await store.bulk_write([Put(feed.checkpoints, feed.subject, claim, expected_version=feed.version)])
                feed.version += 1
                feed.claimed = True
        deletes = []
        for feed in self.feeds:
            records = [r async for r in store.scan_all(feed.outbox, prefix=outbox.partition_prefix(self.partition))]
            for record in records:
                while not await self._publish(outbox.messages_of(record)):
                    if self._stopping.is_set():
                        return
                    # A cancellation the publish lost: the record stays for whoever publishes next.
                    _raise_if_cancelling(asyncio.current_task())
                    await asyncio.sleep(self.spec.publish_backoff[-1])
            deletes.extend(outbox.delete_record(feed.outbox, r.key) for r in records)
        if deletes:
            await self.chain.submit(deletes)

    def _checkpoint(self, feed: _Feed, stream_seq: int) -> Put:
        """The write of `feed`'s checkpoint, fenced: it lands only if the record is still at the version
        this owner last wrote (a commit is written whole or not at all, so none of its writes land)."""
        put = Put(
            feed.checkpoints,
            feed.subject,
            {"stream_seq": stream_seq, "at": time.time(), "owner": self.token},
            expected_version=feed.version,
        )
        feed.version += 1
        return put

    def _fence(self, feed: _Feed, version: int) -> None:
        """Another owner has claimed the partition since this one did: stop working on it."""
        self.fenced = True
        self._stopping.set()
        self._arrival.set()
        self.engine.m_fenced.add(1, self.partition_attrs)
        log.error(
            "engine partition %s of %s: another owner has claimed checkpoint %s (at version %s, this owner "
            "wrote up to %s); this replica stops working on the partition and writes, acknowledges and "
            "publishes nothing more of it (a replica that stalled past its lease, or one the ownership "
            "does not know of: two static replicas on one store)",
            self.partition,
            feed.spec.service,
            feed.subject,
            version,
            feed.version,
            extra={"partition": self.partition, "subject": feed.subject},
        )

    async def _recover(self) -> None:
        """After a failed batch: wait for every write submitted so far, let the logic drop its hot
        state, and start again from what the store holds."""
        log.warning(
            "engine partition %s of %s recovering after a failed batch: %s",
            self.partition,
            self.spec.service,
            describe_error(self._failure) if self._failure else "unknown",
        )
        self.engine.m_recoveries.add(1, self.partition_attrs)
        await self.chain.settle()
        for logic in {id(feed.logic): feed.logic for feed in self.feeds}.values():
            await logic.recover(self.partition)
        if self.engine.chain is None:
            self.chain.reset()  # its own chain; a shared one is reset by the logic's `recover`
        self._last_commit = None
        self._failure = None
        self._unpublished = []
        await self._restore()  # fenced: sets `_stopping`, and the loops end

    async def _subscribe(self) -> None:
        """(Re)bind the partition's consumers; an ordered consumer with unacknowledged messages is
        restarted at its acknowledgement floor, so they come again in order."""
        await self._unsubscribe()
        for feed in self.feeds:
            if not await self._bind(feed):
                return
        if len(self.feeds) > 1:
            for feed in self.feeds:
                feed.fetcher = asyncio.create_task(self._fetcher(feed), name=f"fetch {feed.consumer.durable}")

    async def _bind(self, feed: _Feed) -> bool:
        delay = 0.1
        me = asyncio.current_task()
        while True:
            _raise_if_cancelling(me)  # a cancellation a binding request lost: no binding again
            if self._stopping.is_set():
                # Stopping while the consumer cannot be bound (nats-server gone: `cdpctl up` killed ends
                # every child at once): stay unbound, `_fetch` hands over nothing, and the loops see the stop.
                return False
            try:
                if feed.checkpoint:
                    await self._rewind_if_ahead(feed)
                if feed.checkpoint:
                    # A consumer that does not exist (a memory consumer after a nats-server restart) starts
                    # after the checkpoint: nothing up to it needs reading again.
                    await feed.runner.provision(start_seq=feed.checkpoint + 1)
                else:
                    await feed.runner.provision()  # nothing applied yet: from the stream's beginning
                js = self.engine.bus.js
                subscription = await js.pull_subscribe_bind(durable=feed.consumer.durable, stream=feed.consumer.stream)
                # Where its deliveries stand before this binding asks for any: from here on each one comes
                # here, in sequence (`_taken`). One outstanding already went to another subscriber since
                # the consumer was provisioned (a stale owner's pull): restarted at its floor again.
                info = await js.consumer_info(feed.consumer.stream, feed.consumer.durable)
                if info.num_ack_pending:
                    await subscription.unsubscribe()
                    raise Unavailable(f"{info.num_ack_pending} messages delivered elsewhere")
                feed.delivered = info.delivered.consumer_seq or 0 if info.delivered is not None else 0
                feed.pull = StandingPull(feed.runner.nc, subscription, feed.consumer.batch_size)
                return True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("engine consumer %s not ready: %s", feed.consumer.durable, describe_error(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _rewind_if_ahead(self, feed: _Feed) -> None:
        """A checkpoint past what the stream holds for the partition: resume from the stream's last
        position of its subject.

        A stream restored from a copy older than the store's (nats/ copied before data/; separate volume
        snapshots) or deleted and created again numbers new messages from its own last sequence, at or
        below the checkpoint: they would be skipped as applied, silently. What the stream holds for the
        subject is older than the store, so it was applied: the partition resumes right after the
        subject's last message, the stored checkpoint is lowered to it (so this is said once), and the
        operator is told (ERROR, `cdp.engine.checkpoint.rewinds`). Nothing is applied twice: the
        positions between it and the checkpoint never reached this stream.

        Normal, not rewound: the subject's messages up to the checkpoint purged, aged out or deleted
        (its first sequence past the checkpoint, or none left) - JetStream's sequences never go back, so
        the stream's last sequence is still at or past the checkpoint and its message at the checkpoint,
        if any, is still this subject's."""
        ahead = await self._held_if_ahead(feed)
        if ahead is None:
            return
        last, held = ahead
        await self.chain.submit([self._checkpoint(feed, held)])
        feed.claimed = True
        where = {"partition": self.partition, "subject": feed.subject, "stream": feed.consumer.stream}
        if last >= feed.checkpoint:  # made again since, and already as far: every message in it is new
            log.error(
                "engine partition %s of %s: checkpoint %s was written before stream %s was created again, which "
                "holds messages up to sequence %s for the partition; resuming after sequence %s (messages "
                "numbered at or below the checkpoint would have been skipped)",
                self.partition,
                feed.spec.service,
                feed.checkpoint,
                feed.consumer.stream,
                last,
                held,
                extra=where,
            )
        else:
            log.error(
                "engine partition %s of %s: checkpoint %s is past the stream's last sequence %s for the "
                "partition; resuming after sequence %s (a stream restored older than the store, or created "
                "again: messages numbered at or below the checkpoint would have been skipped)",
                self.partition,
                feed.spec.service,
                feed.checkpoint,
                last,
                held,
                extra=where,
            )
        self.engine.m_rewinds.add(1, feed.partition_attrs)
        feed.checkpoint = feed.position = held

    async def _held_if_ahead(self, feed: _Feed) -> tuple[int, int] | None:
        """If the checkpoint is past what the stream holds for `feed`'s subject (`_rewind_if_ahead`): the
        stream's last sequence for the subject (0: none), and the last one the store applied - its last
        message stored before the checkpoint was written (0: none; a stream created since holds nothing
        it applied). None if it is not past."""
        js = self.engine.bus.js
        stream = feed.consumer.stream
        checkpoint = feed.checkpoint
        try:
            last_msg = await js.get_last_msg(stream, feed.subject)
        except NotFoundError:
            last_msg = None  # no message of the subject (purged, aged out, a new stream)
        held = last_msg.seq or 0 if last_msg is not None else 0
        if held >= checkpoint:
            # At or past the checkpoint: normal - unless the stream was made again after the checkpoint was
            # written and has already numbered as many new messages (published before this bind: events
            # the collector took while the partition was still binding after nats-server came back on an
            # empty store). Then nothing in it was applied, and its messages up to the checkpoint would be
            # skipped as applied, without a word. A stream made again has none of the old consumers: one
            # that exists says the stream is the one the checkpoint was written against (and a service's
            # clock, which `written` is read from, cannot make a rewind of a stream it is consuming).
            info = await js.stream_info(stream)
            written = await self._written_at(feed)
            if written is None or info.created is None or info.created.timestamp() <= written:
                return None
            try:
                await js.consumer_info(stream, feed.consumer.durable)
                return None
            except NotFoundError:
                return held, 0
        info = await js.stream_info(stream)
        if (info.state.last_seq or 0) >= checkpoint:
            try:
                at = await js.get_msg(stream, checkpoint)
            except NotFoundError:
                return None  # deleted or aged out: the sequence is still the one this store applied
            if at.subject == feed.subject:
                return None
            # Another subject's message at the checkpoint: the stream's sequences started again.
        if last_msg is None:
            return 0, 0
        written = await self._written_at(feed)
        if written is None:
            return held, held
        if info.created is not None and info.created.timestamp() > written:
            return held, 0  # created after the checkpoint was written: nothing in it was applied
        if last_msg.time is None or last_msg.time.timestamp() <= written:
            return held, held
        # Messages of the subject came after the checkpoint was written (published since the stream came
        # back): the last one before it, by halving (each step one get of the subject's next message).
        lo, hi = 0, held  # lo: applied (or none); hi: not applied
        while hi - lo > 1:
            mid = (lo + hi) // 2
            try:
                msg = await js.get_msg(stream, mid, subject=feed.subject, next=True)
            except NotFoundError:
                msg = None
            if msg is None or (msg.seq or 0) >= hi:
                hi = mid
            elif msg.time is not None and msg.time.timestamp() <= written:
                lo = msg.seq or 0
            else:
                hi = msg.seq or 0
        return held, lo

    async def _written_at(self, feed: _Feed) -> float | None:
        """When `feed`'s stored checkpoint was written (epoch seconds; None: not recorded)."""
        record = await self.engine.store.get(feed.checkpoints, feed.subject)
        return record.doc.get("at") if record is not None else None

    async def _unsubscribe(self) -> None:
        """Stop the standing pulls: once this returns nothing more is delivered to them, and what was
        delivered and not handled is redelivered first to the next owner (`StandingPull`)."""
        for feed in self.feeds:
            if feed.fetcher is not None:
                fetcher, feed.fetcher = feed.fetcher, None
                fetcher.cancel()
                await asyncio.gather(fetcher, return_exceptions=True)
            # Taken from the pull, not handled: unacknowledged, so they come again from the floor.
            feed.arrived = []
            if feed.pull is not None:
                pull, feed.pull = feed.pull, None
                await pull.close()

    async def _fetch(self, timeout: float | None = None) -> list[list]:
        """The next round, per input (waiting up to `timeout`, the consumer's fetch timeout by default;
        0: only what has arrived). One input is fetched here; several by a fetcher each (`_fetcher`),
        a round taking what every one of them has."""
        if len(self.feeds) == 1:
            return [await self._fetch_one(self.feeds[0], timeout)]
        if timeout is None:
            timeout = self.spec.fetch_timeout
        if timeout > 0 and not any(feed.arrived for feed in self.feeds):
            self._arrival.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._arrival.wait()
            except TimeoutError:
                pass
        rounds = []
        for feed in self.feeds:
            rounds.append(feed.arrived)
            feed.arrived = []
            feed.room.set()
        return rounds

    async def _fetcher(self, feed: _Feed) -> None:
        """Several inputs: take what arrives on `feed`'s pull, up to a batch ahead of the rounds."""
        me = asyncio.current_task()
        while True:
            _raise_if_cancelling(me)
            if self._stopping.is_set():
                return  # a woken pull no longer waits: fetching on would spin
            if len(feed.arrived) >= feed.consumer.batch_size:
                feed.room.clear()
                await feed.room.wait()
                continue
            if feed.pull is None:
                await asyncio.sleep(feed.consumer.fetch_timeout)
                continue
            msgs = await self._fetch_one(feed, None)
            if msgs:
                feed.arrived.extend(msgs)
                self._arrival.set()

    async def _fetch_one(self, feed: _Feed, timeout: float | None) -> list:
        if feed.pull is None:  # unbound: only while stopping (`_subscribe`)
            return []
        try:
            msgs = await feed.pull.fetch(feed.consumer.fetch_timeout if timeout is None else timeout)
        except nats.errors.TimeoutError:
            return []
        except PullLost:
            log.warning("engine consumer %s: connection re-established; resubscribing", feed.consumer.durable)
            await self._rebind(feed)
            return []
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A consumer the server lost (deleted, its stream restored) is created again at the checkpoint:
            # nothing after it is missed, what is applied already is skipped by position (bus/consumer.py).
            if await feed.runner.recover_missing(exc, start_seq=feed.checkpoint + 1):
                feed.delivered = 0  # created again: its deliveries are numbered from 1
                if self._failure is None and feed.checkpoint and await self._held_if_ahead(feed) is not None:
                    # Its stream was deleted and created again: positions at or below the checkpoint are
                    # new. Recovery reads the checkpoint back and binds again, which rewinds it.
                    self._failure = Unavailable("the partition's stream ends before its checkpoint")
                return []
            log.warning("fetch from %s failed: %s", feed.consumer.durable, describe_error(exc))
            await asyncio.sleep(0.2)
            return []
        if not self._taken(feed, msgs):
            # A delivery of the consumer went to another subscriber: a replica woken from a stall, whose
            # standing pull asked again of the consumer this owner restarted under the same name. It will
            # acknowledge nothing (fenced), and applying the newer messages would move the checkpoint past
            # what it took: when that came again after `ack_wait`, it was skipped as applied, and lost.
            log.warning(
                "engine consumer %s: messages delivered to another subscriber; restarting at the floor",
                feed.consumer.durable,
                extra={"partition": self.partition, "subject": feed.subject},
            )
            await self._rebind(feed)
            return []
        return msgs

    @staticmethod
    def _taken(feed: _Feed, msgs: list) -> bool:
        """Whether `msgs` follow, in the consumer's sequence, what it delivered here before (noted). A
        consumer delivers in increasing sequence, so the first and the last tell it: the first follows
        the last noted, and the run between them holds no number another subscriber took. Only those two
        are read (a message's sequence parses its reply subject: per message, it was a hot-path cost)."""
        if not msgs:
            return True
        first = msgs[0].metadata.sequence.consumer
        last = msgs[-1].metadata.sequence.consumer if len(msgs) > 1 else first
        if (feed.delivered is not None and first != feed.delivered + 1) or last - first != len(msgs) - 1:
            return False
        feed.delivered = last
        return True

    async def _rebind(self, feed: _Feed) -> None:
        """Bind `feed`'s consumer again, restarted at its acknowledgement floor (it has messages delivered
        and not acknowledged: `ConsumerRunner.provision`): what was lost in flight or taken by another
        subscriber comes again, before anything newer (batches in flight come again too, and are skipped
        by position once they are durable). What was taken and not yet handled comes again too: dropped,
        so positions stay in order."""
        feed.arrived = []
        feed.delivered = None
        if feed.pull is not None:
            pull, feed.pull = feed.pull, None
            await pull.close()
        await self._bind(feed)

    async def _poll_lag(self) -> None:
        me = asyncio.current_task()
        while True:
            _raise_if_cancelling(me)  # a cancellation a request's reply swallowed (bus/consumer.py)
            for feed in self.feeds:
                try:
                    info = await self.engine.bus.js.consumer_info(feed.consumer.stream, feed.consumer.durable)
                    feed.pending = info.num_pending or 0
                    await feed.runner.observe(info)  # its lag and oldest age on /metrics (bus/consumer.py)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    pass
            await asyncio.sleep(LAG_POLL_SECONDS)

    # --- the pipelined path -------------------------------------------------------------------------

    async def _pipelined(self) -> None:
        """Apply batches ahead of their commits until a failure or `stop()`; returns once every batch
        it applied has been settled."""
        queue: asyncio.Queue[_Batch | None] = asyncio.Queue()
        self._queue = queue
        settler = asyncio.create_task(self._settle_loop(), name=f"settle {self.consumer.durable}")
        me = asyncio.current_task()
        try:
            while not self._stopping.is_set() and self._failure is None:
                _raise_if_cancelling(me)
                rounds = await self._fetch()
                if not any(rounds):
                    await self._flush_published()
                    continue
                fetched = time.perf_counter()
                self._record_bus_wait(next(msgs[0] for msgs in rounds if msgs))
                if self._slots.locked():
                    # Every slot is held by a commit: what arrives while this batch waits joins it.
                    await self._slots.acquire()
                    if len(self.feeds) > 1:
                        for msgs, more in zip(rounds, await self._fetch(0.0), strict=True):
                            msgs.extend(more)
                    elif len(rounds[0]) < self.consumer.batch_size:
                        rounds[0].extend(await self._fetch_one(self.feeds[0], 0.0))
                else:
                    await self._slots.acquire()
                # A snapshot waits for a quiescent point. Nothing awaits between the gate and
                # `_begin` (a set event's wait returns at once), so a snapshot never sees this
                # pipeline idle while it applies.
                await self.engine.gate.wait()
                if self._failure is not None:
                    self._slots.release()
                    break  # not applied, not acknowledged: redelivered after recovery
                self._begin()
                self.engine.m_slot_wait.record((time.perf_counter() - fetched) * 1000, self.attrs)
                try:
                    batch = await self._apply([[Delivery(m) for m in msgs] for msgs in rounds])
                except Exception as exc:
                    self._failure = exc
                    self._end()
                    self._slots.release()
                    break
                queue.put_nowait(batch)
        except asyncio.CancelledError:
            settler.cancel()
            raise
        queue.put_nowait(None)
        await settler

    def _record_bus_wait(self, msg) -> None:
        """How long the batch's oldest message sat in JetStream (the stream's clock is this host's or
        a peer's; a negative skew is recorded as 0)."""
        try:
            stored = msg.metadata.timestamp.timestamp()
        except Exception:
            return  # not a JetStream delivery (tests' fakes)
        self.engine.m_bus_wait.record(max(0.0, (time.time() - stored) * 1000), self.attrs)

    def _begin(self) -> None:
        self._in_flight += 1
        self.idle.clear()

    def _end(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self.idle.set()

    def _decode(self, feed: _Feed, deliveries: list[Delivery]) -> list:
        # Reading a message's position parses its reply subject: read each one only when the batch
        # starts at or below the position (a redelivery after a crash or a failed commit).
        check = deliveries[0].stream_seq <= feed.position
        items = []
        append, decode = items.append, feed.logic.decode
        for delivery in deliveries:
            if check and delivery.stream_seq <= feed.position:
                continue  # applied before: acknowledged with the batch
            try:
                item = decode(delivery)
            except Reject as bad:
                delivery.reject(bad.reason, str(bad))
                continue
            if type(item) is Many:
                items.extend(item)
            else:
                append(item)
        return items

    async def _apply(self, rounds: list[list[Delivery]]) -> _Batch:
        """Decode, apply, and submit the batch's commit (state + outbox + checkpoint, one bulk write per
        input, queued one behind the other: the chain lands them in one write when it can)."""
        messages: list[OutMessage] = []
        keys: list[tuple[_Feed, str]] = []
        last_seqs: list[int | None] = []
        claims: list[_Feed] = []
        commit = None
        for feed, deliveries in zip(self.feeds, rounds, strict=True):
            if not deliveries:
                last_seqs.append(None)
                continue
            last = deliveries[-1].stream_seq
            last_seqs.append(last)
            effects = await self._apply_feed(feed, deliveries)
            # From here to the submit nothing awaits: commits are queued in the order batches were
            # applied (a chain shared by several partitions depends on it). So each input's writes are
            # submitted right after its `apply`, before the next input's may await.
            ops: list[WriteOp] = []
            if effects is not None:
                ops.extend(effects.writes)
                if effects.messages:
                    put = outbox.put_record(feed.outbox, self.partition, last, effects.messages)
                    ops.append(put)
                    keys.append((feed, put.key))
                    messages.extend(effects.messages)
            if feed.published:
                ops.extend(outbox.delete_record(feed.outbox, k) for k in feed.published)
                feed.published = []
            if last > feed.position:
                ops.append(self._checkpoint(feed, last))
                claims.append(feed)
                feed.position = last
            if ops:
                commit = self._last_commit = self.chain.submit(ops, after=self._last_commit)
        return _Batch(rounds, last_seqs, messages, keys, commit, time.perf_counter(), claims)

    async def _apply_feed(self, feed: _Feed, deliveries: list[Delivery]):
        started = time.perf_counter()
        items = self._decode(feed, deliveries)
        if not items:
            return None
        engine = self.engine
        decoded = time.perf_counter()
        engine.m_decode.record((decoded - started) * 1000, feed.attrs)
        started = decoded
        with engine.tracer.start_as_current_span(
            f"{feed.consumer.stream} apply",
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": feed.subject,
                "messaging.batch.message_count": len(deliveries),
                "cdp.partition": self.partition,
            },
        ) as span:
            if span.is_recording():
                # Reading a message's trace context parses its headers: only for a span that is kept
                # (the kit's sampler decides on the batch's own trace id, not on its links).
                for d in deliveries[:MAX_TRACE_LINKS]:
                    context = trace.get_current_span(d.trace_context()).get_span_context()
                    if context.is_valid:
                        span.add_link(context)
            try:
                effects = await feed.logic.apply(self.partition, items)
            except Exception as exc:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise
        engine.m_apply.record((time.perf_counter() - started) * 1000, feed.attrs)
        return effects

    async def _settle_loop(self) -> None:
        me = asyncio.current_task()
        while (batch := await self._queue.get()) is not None:
            _raise_if_cancelling(me)
            try:
                await self._settle(batch)
            finally:
                self._end()
                self._slots.release()
            if self._queue.empty():
                # No batch behind this one to carry the outbox deletes: write them now, so a quiet
                # partition leaves nothing in the outbox.
                await self._flush_published()

    async def _settle(self, batch: _Batch) -> None:
        if batch.commit is not None:
            try:
                await batch.commit  # the batch's last write: the chain lands the earlier ones first
            except Exception as exc:
                if self._failure is None:
                    self._failure = exc
                return  # not acknowledged: redelivered after recovery
            self.engine.m_commit.record((time.perf_counter() - batch.submitted) * 1000, self.attrs)
            for feed in batch.claims:
                feed.claimed = True
            for feed, last in zip(self.feeds, batch.last_seqs, strict=True):
                if last is not None:
                    feed.checkpoint = max(feed.checkpoint, last)
        elif self._failure is not None:
            return
        acknowledging = time.perf_counter()
        # Acknowledged before the messages are published: the commit that just landed holds them in the
        # outbox, which is published (by this settler, or by the next owner's `_restore` before anything
        # newer) and deleted only once JetStream stored them. Acknowledging first puts the
        # acknowledgements and the publish in one socket write (nats-py sends what is buffered when its
        # flusher next runs) instead of two, a round trip apart.
        for feed, deliveries in zip(self.feeds, batch.deliveries, strict=True):
            if deliveries:
                await feed.runner._settle(deliveries, None, final=True)
        self.engine.m_ack.record((time.perf_counter() - acknowledging) * 1000, self.attrs)
        if batch.messages:
            attempt = 0
            while not await self._publish(batch.messages):
                if self._stopping.is_set() and attempt:
                    batch.outbox_keys = []  # left in the outbox for whoever owns the partition next
                    break
                # A cancellation the publish lost (`abort`, a crash, cancels the settler once): the
                # messages stay in the outbox, as above. Retrying ran on while the bus refused.
                _raise_if_cancelling(asyncio.current_task())
                await asyncio.sleep(self.spec.publish_backoff[min(attempt, len(self.spec.publish_backoff) - 1)])
                attempt += 1
            for feed, key in batch.outbox_keys:
                feed.published.append(key)

    async def _publish(self, messages: list[OutMessage]) -> bool:
        """One attempt to get every message stored by JetStream (ones already stored are duplicates)."""
        started = time.perf_counter()
        try:
            results = await self.engine.bus.publisher.publish_batch(messages)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("engine %s: publish failed: %s", self.consumer.durable, describe_error(exc))
            return False
        failed = sum(1 for r in results if not r.ok)
        if failed:
            log.warning(
                "engine %s: %d of %d messages not stored; retrying", self.consumer.durable, failed, len(results)
            )
            return False
        self.engine.m_publish.record((time.perf_counter() - started) * 1000, self.attrs)
        return True

    async def _flush_published(self, *, wait: bool = False) -> None:
        """Delete published outbox records when no batch comes to carry the deletes."""
        if self._failure is not None or not any(feed.published for feed in self.feeds):
            return
        ops = []
        for feed in self.feeds:
            ops.extend(outbox.delete_record(feed.outbox, k) for k in feed.published)
            feed.published = []
        commit = self._last_commit = self.chain.submit(ops, after=self._last_commit)
        if wait:
            try:
                await commit
            except Exception:
                pass  # published anyway; the next owner publishes them again (duplicates) and deletes them
        else:
            commit.add_done_callback(_retrieve)

    # --- the careful path (after a failure) ---------------------------------------------------------

    async def _handle_carefully(self, feed: _Feed, msgs: list) -> None:
        """`feed`'s runner handles `msgs` (its isolation), or gives up when `stop()` is called.

        The runner retries in place with backoff: forever while the store is unavailable (an outage
        dead-letters nothing), for minutes while a part fails on its own (its rounds hold the rest at
        the spec's last backoff). A stop waiting for that kept a service past its shutdown grace, to be
        killed there. So a stop ends it at once, unless an attempt is between its apply and its commit
        or recovery (the hot state would hold what the store does not): then when that attempt ends.
        What the runner has not acknowledged comes again to the next owner (its consumer restarts at
        the acknowledgement floor); what it committed is covered by the checkpoint, so not applied twice."""
        handling = asyncio.create_task(feed.runner._handle(msgs), name=f"careful {feed.consumer.durable}")
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait((handling, stopping), return_when=asyncio.FIRST_COMPLETED)
            if not handling.done():
                while not self._careful_idle.is_set() and not handling.done():
                    idle = asyncio.ensure_future(self._careful_idle.wait())
                    try:
                        await asyncio.wait((handling, idle), return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        idle.cancel()
                # No await between the idle point and the cancel; an attempt begun after it raises
                # `_Stopping` before applying anything (`_careful`).
                handling.cancel()
            try:
                await handling
            except (asyncio.CancelledError, _Stopping):
                if asyncio.current_task().cancelling() or not self._stopping.is_set():
                    raise  # this task itself was cancelled (a crash, `abort`)
        finally:
            stopping.cancel()
            if not handling.done():
                handling.cancel()

    async def _careful(self, feed: _Feed, deliveries) -> None:
        """ConsumerRunner handler of `feed`: one part of a batch, applied, committed and published before
        the runner acknowledges it. Raises (after recovering) when any step fails; the runner then
        retries the part, splits it, or dead-letters a message that fails alone."""
        if self._stopping.is_set():
            raise _Stopping  # not an Exception: the runner neither retries nor dead-letters on it
        deliveries = list(deliveries)
        await self._publish_unpublished()
        await self.engine.gate.wait()
        if self._stopping.is_set():
            raise _Stopping
        self._begin()
        self._careful_idle.clear()
        try:
            batch = await self._apply([deliveries if f is feed else [] for f in self.feeds])
            if batch.commit is not None:
                await batch.commit
                for claimed in batch.claims:
                    claimed.claimed = True
        except Exception as exc:
            self._failure = exc
            await self._recover()
            raise
        finally:
            self._end()
            self._careful_idle.set()
        if deliveries:
            feed.checkpoint = max(feed.checkpoint, deliveries[-1].stream_seq)
        if batch.messages:
            self._unpublished.append((batch.outbox_keys, batch.messages))
            await self._publish_unpublished()

    async def _publish_unpublished(self) -> None:
        """Messages of parts committed carefully but not yet stored by JetStream, oldest first."""
        while self._unpublished:
            keys, messages = self._unpublished[0]
            if not await self._publish(messages):
                # Durable in the outbox; the runner retries the part, finds it applied, and comes here.
                raise Unavailable("the batch's messages were not stored by JetStream; retrying")
            self._unpublished.pop(0)
            for feed, key in keys:
                feed.published.append(key)


class _Stopping(BaseException):
    """A careful attempt begun after `stop()`: nothing applied; the runner passes it up unhandled."""


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
