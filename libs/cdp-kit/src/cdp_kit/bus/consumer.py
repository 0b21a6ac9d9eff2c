"""Durable JetStream consumers: fetch in batches, hand them to a handler, acknowledge only after it
returned (its effect is durable by then), retry with backoff, dead-letter with the reason.

    async def handle(batch: Sequence[Delivery]) -> None:
        for d in batch:
            if bad(d):
                d.reject("invalid_event", "missing person id")     # → dead-letter stream, not retried
        await store.bulk_write(...)                               # durable before we return
    runner = bus.consumer(ConsumerSpec(stream=subjects.EVENTS_RAW, durable=subjects.partition_durable("identity", 3),
                                       filter_subjects=(subjects.events_raw(3),)), handle)
    runtime.spawn(runner.run(), "consume events.raw.3")

Outcomes per message: acknowledged (default), `retry(reason, delay)` (redelivered later), or
`reject(reason, detail)` (published to `dlq.<stream>.<durable>` with the reason in headers, then
terminated). A message whose deliveries run out without any outcome (the process kept crashing on it) is
copied to the dead-letter stream from the server's max-deliveries advisory.

The handler contract: a handler may be called again with messages it has already seen, in part or in
whole (a failed batch is retried and split, a crash redelivers everything unacknowledged), and must skip
what it has already applied - the partition engines do so by stream position. Everything below relies
on that.

A handler that raises. One bad message must not cost its neighbours, and a store that is down must not
empty the stream into the dead-letter stream. The rule:

- A batch of one message that fails is retried with backoff (in place for an ordered consumer, by
  redelivery otherwise) and dead-lettered on its last allowed delivery: there is no neighbour to tell a
  bad message from a broken store.
- A batch of several that fails is split in halves, in place; the first half is handled completely
  (and acknowledged) before the second, and a failing half is split again, down to single messages. So
  stream order holds for what is handled, and every message that can be handled is.
- A single message that fails there is retried in place with backoff, up to `max_deliver` attempts
  (the rest of the batch is kept from redelivery meanwhile). If it still fails it becomes the *suspect*
  and the runner goes on with the next part: if that part is handled, the suspect's failure was its own
  and it is dead-lettered with its reason (the exception type and message) - the handled part is the
  proof, so a healthy store never loses more than the bad message. The last message of a batch has no
  next part: like a batch of one, it is dead-lettered after its retries.
- A handler that raises `cdp_kit.errors.Unavailable` (or an error caused by one) says its store or
  another dependency cannot take the work now: that is never the message's fault, whatever the count.
  The part is retried in place with the longest backoff until the dependency answers (the messages
  kept from redelivery meanwhile, ordered consumer or not), and such rounds do not count against a
  suspect; nothing is dead-lettered for it. A full disk or a store down for an hour holds the
  partition (its lag shows it) and loses nothing.
- If the message after the suspect fails too, two neighbours fail on their own: that is the store (or
  whatever the handler needs), not a message. Nothing is dead-lettered; the runner waits the longest
  backoff and starts again with everything of the batch not yet handled, as one batch. Only after
  `max_deliver` such rounds without progress is the suspect dead-lettered (a run of bad messages, or an
  outage that long, must not hold the partition forever); an outage therefore costs at most one message
  per `max_deliver` rounds rather than every batch it touches.

A consumer the server has lost (deleted by an operator or with stale credentials, a stream restored
from a backup without it: JetStream error 10014, "consumer not found") is created again, with the same
config, by the runner that finds it gone - when a fetch fails, and by the lag poll every few seconds (a
fetch to a missing consumer may just time out). Its acknowledgements went with it, so where it starts
decides what is missed: every message not acknowledged must come (a privacy deletion never seen is a
person's data kept), and what was acknowledged may come again (the contract above; the privacy handlers
find a request done by its id, or nothing of the person left to purge). So it starts after the highest
acknowledgement floor the runner saw (at start and in the lag poll): everything up to it was handled.
From the stream's beginning instead it would replay what must not be (profile's drained consumer of
legacy merges would re-merge persons unmerged since), and a consumer created to deliver only new
messages (`DeliverPolicy.NEW`, scoring's label watch) has its floor where it started. Without a floor,
or when the stream was restored from an older backup (numbered again from below that floor), it starts
at the stream's beginning (the spec's `DeliverPolicy.ALL`). The partition engines pass their checkpoint
(`recover_missing(start_seq=...)`): nothing up to it needs applying. A warning names the consumer and
`cdp.bus.consumer.recreated` counts it. The partition engines' consumers keep their state in the server's
memory (`ConsumerSpec.memory_state`), so every nats-server restart loses them: the engine binds its
consumer again and `provision(start_seq=...)` creates it right after the checkpoint (no warning: that is
the expected way back), as `recover_missing` would.

Logs name the consumer, positions and the exception type (and an `InvalidArgument`'s field), never the
exception's text: service exceptions quote identifiers. The dead-letter header keeps a capped detail
(the dead-letter stream holds the payload anyway).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import nats.errors
import orjson
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from cdp_kit.bus import rawevents, subjects
from cdp_kit.bus.setup import answered
from cdp_kit.errors import InvalidArgument, Unavailable
from cdp_kit.stopping import raise_if_cancelling
from cdp_kit.telemetry import LATENCY_BUCKETS_MS, Telemetry, extract_context, observe_on

log = logging.getLogger("cdp.bus")

T = TypeVar("T")

DLQ_REASON = "Cdp-Dlq-Reason"
DLQ_DETAIL = "Cdp-Dlq-Detail"
DLQ_SUBJECT = "Cdp-Dlq-Subject"
DLQ_STREAM = "Cdp-Dlq-Stream"
DLQ_SEQ = "Cdp-Dlq-Stream-Seq"
DLQ_CONSUMER = "Cdp-Dlq-Consumer"
DLQ_DELIVERIES = "Cdp-Dlq-Deliveries"
DLQ_TIME = "Cdp-Dlq-Time"
DLQ_DETAIL_MAX = 512
#: How a dead letter sent back to its stream (`cdpctl dlq --replay`) begins its `Nats-Msg-Id`:
#: `replay:<stream>:<consumer>:<seq>[:<part>]`. Not the original's id (which the duplicate window may still
#: hold), and not an event's: a consumer that names events by their message id takes the event's own.
REPLAY_PREFIX = "replay:"
#: On the dead letter of one part of a message that carries several (`Delivery.reject_part`): its index.
#: The letter's body is that part alone; `Cdp-Dlq-Stream-Seq` names the whole message.
DLQ_PART = "Cdp-Dlq-Part"
# A part's dead letter is one event, not the batch: the header that marks a batch is not copied to it.
PART_DROPPED_HEADERS = frozenset({rawevents.EVENTS_HEADER})
# JetStream's API error code for "consumer not found" (the stream exists; code 10059 is a missing stream).
CONSUMER_NOT_FOUND = 10014


def describe_error(exc: BaseException) -> str:
    """An exception as a log may show it: its type, and for bad input the field - never its text,
    which quotes identifier values (e-mail addresses, user ids)."""
    if isinstance(exc, InvalidArgument):
        return f"{type(exc).__name__} (field {exc.field})"
    return type(exc).__name__


def describe_failure(exc: BaseException) -> str:
    """A handler's failure as a dead letter's detail says it: `describe_error`, and where the exception
    was raised (the innermost frame's file, line and function: code, never values). The exception's own
    text is left out because it quotes what the code had in hand: a person's time zone in an `OSError`'s
    file name, an e-mail address in a `KeyError` - and `cdpctl dlq` shows the detail to every operator,
    long after a deletion took the person's data out of the stores."""
    where = ""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        code = tb.tb_frame.f_code
        where = f" at {code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno} in {code.co_name}"
    return describe_error(exc) + where


def is_outage(error: BaseException) -> bool:
    """The handler's dependency said it cannot take the work now (`Unavailable`: the store's disk is
    full, its server is down), directly or as the cause: an outage, never the message's fault."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, Unavailable):
            return True
        seen.add(id(cause))
        cause = cause.__cause__
    return False


def _more_waiting(msg: Msg) -> bool:
    """Whether the consumer had messages waiting behind `msg` when it was delivered (True when its
    metadata cannot be read: then asking costs one round trip, never a message)."""
    try:
        return msg.metadata.num_pending > 0
    except Exception:
        return True


def _next_nowait(inbox) -> Msg | None:
    """The next message waiting in a subscription's inbox, or None: what nats-py's `next_msg` does with a
    message already there (its bookkeeping included), without its task per call."""
    queue = inbox._pending_queue
    if queue.empty():
        return None
    msg = queue.get_nowait()
    inbox._pending_size -= len(msg.data)
    queue.task_done()
    return msg


def _halves(msgs: list[Msg]) -> list[list[Msg]]:
    middle = len(msgs) // 2
    return [msgs[:middle], msgs[middle:]]


@dataclass(frozen=True)
class ConsumerSpec:
    stream: str
    durable: str
    filter_subjects: tuple[str, ...]
    batch_size: int = 256
    # How long a fetched message may stay unacknowledged before JetStream redelivers it.
    ack_wait: float = 30.0
    max_deliver: int = 5
    # Delay before redelivery after the n-th failure (the last value repeats).
    backoff: tuple[float, ...] = (0.2, 1.0, 5.0, 15.0, 60.0)
    max_ack_pending: int = 20_000
    # Concurrent fetch-and-handle loops. 1 keeps the stream's order (partition owners need that).
    concurrency: int = 1
    fetch_timeout: float = 1.0
    description: str = ""
    # Partition owners: messages are handled in stream order even across failures and restarts. A
    # failing batch is retried in place (its messages kept from redelivery meanwhile) rather than naked,
    # so nothing newer is handled before it; and a consumer that starts with messages delivered but not
    # acknowledged (its last owner died) is recreated at its acknowledgement floor, so those come again
    # first rather than after newer ones once their ack_wait runs out. Handlers still skip positions
    # they have already applied: everything after the floor is delivered again. Acknowledged once a
    # batch (AckPolicy.ALL: the last message's acknowledgement covers the ones before it); a consumer
    # found with another policy (made by an earlier version) is created again at its floor.
    ordered: bool = False
    # The server keeps the consumer's state (what it delivered, its acknowledgement floor) in memory, not
    # in a file: nats-server rewrites a file consumer's state file (a temporary file written, then
    # renamed) after every round of deliveries, up to about ten times a second per busy consumer - a
    # fifth of the server's CPU in the whole-pipeline benchmark. A nats-server restart loses such a
    # consumer; its owner creates it again where its own position says (`provision(start_seq=...)`,
    # `recover_missing(start_seq=...)`). Only for owners that keep their position themselves: the
    # partition engines (their checkpoints).
    memory_state: bool = False
    # Seconds to wait after a batch smaller than `batch_size` before fetching again, so that what arrives
    # meanwhile comes as one batch: for consumers to which a message's latency does not matter, every
    # fetch (a pull or two), span and metric record is then paid once per batch rather than per message.
    linger: float = 0.0

    def __post_init__(self) -> None:
        if self.max_deliver < 1:
            raise ValueError("max_deliver must be at least 1")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.ordered and self.concurrency != 1:
            raise ValueError("an ordered consumer handles one batch at a time (concurrency 1)")
        if not self.filter_subjects:
            raise ValueError("a consumer needs at least one filter subject")

    def config(self) -> api.ConsumerConfig:
        subjects = list(self.filter_subjects)
        return api.ConsumerConfig(
            durable_name=self.durable,
            description=self.description or None,
            # An ordered consumer settles its messages in stream order, so acknowledging a batch's last
            # message says the same as acknowledging each one: one acknowledgement a batch (`_settle`).
            ack_policy=api.AckPolicy.ALL if self.ordered else api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=self.ack_wait,
            max_deliver=self.max_deliver,
            max_ack_pending=self.max_ack_pending,
            filter_subject=subjects[0] if len(subjects) == 1 else None,
            filter_subjects=subjects if len(subjects) > 1 else None,
            mem_storage=True if self.memory_state else None,
        )

    def delay_after(self, deliveries: int) -> float:
        return self.backoff[min(max(deliveries, 1), len(self.backoff)) - 1]


class Delivery:
    """One delivered message and the outcome the handler chose for it."""

    __slots__ = ("delay", "detail", "msg", "outcome", "parts", "reason")

    def __init__(self, msg: Msg) -> None:
        self.msg = msg
        self.outcome = "ack"
        self.reason = ""
        self.detail = ""
        self.delay: float | None = None
        # Parts of a message that carries several (`cdp_kit.bus.rawevents`) rejected on their own:
        # index -> (the part's bytes, reason, detail). Dead-lettered alone; the message is acknowledged.
        self.parts: dict[int, tuple[bytes, str, str]] | None = None

    @property
    def data(self) -> bytes:
        return self.msg.data

    @property
    def subject(self) -> str:
        return self.msg.subject

    @property
    def headers(self) -> dict[str, str]:
        return self.msg.headers or {}

    @property
    def msg_id(self) -> str | None:
        return self.headers.get("Nats-Msg-Id")

    @property
    def stream_seq(self) -> int:
        return self.msg.metadata.sequence.stream

    @property
    def num_delivered(self) -> int:
        return self.msg.metadata.num_delivered

    def trace_context(self):
        return extract_context(self.msg.headers)

    def retry(self, reason: str, delay: float | None = None) -> None:
        self.outcome, self.reason, self.delay = "retry", reason, delay

    def reject(self, reason: str, detail: str = "") -> None:
        """Permanently unprocessable: goes to the dead-letter stream with this reason."""
        self.outcome, self.reason, self.detail = "reject", reason, detail

    def reject_part(self, index: int, data: bytes, reason: str, detail: str = "") -> None:
        """One part of a message that carries several (its `index` and bytes) can never be applied: it
        goes to the dead-letter stream alone, with this reason; the rest of the message is applied and
        the message acknowledged. Rejecting the same part again (the message handled again) keeps one."""
        if self.parts is None:
            self.parts = {}
        self.parts[index] = (data, reason, detail)


Handler = Callable[[Sequence[Delivery]], Awaitable[None]]


# nats-py swallows a CancelledError that lands inside its flush path (`_flush_pending`), and every nats-py
# request returns its reply instead when the cancellation lands in the loop turn the reply does (Python
# 3.11's `asyncio.wait_for`), so a cancelled loop could run on forever: the loops check (cdp_kit.stopping).
_raise_if_cancelling = raise_if_cancelling


class ConsumerRunner:
    def __init__(self, js: JetStreamContext, spec: ConsumerSpec, handler: Handler, telemetry: Telemetry) -> None:
        self.js = js
        self.nc = js._nc
        self.spec = spec
        self.handler = handler
        self.tracer = telemetry.tracer
        self.pending = 0  # messages not yet delivered to us, from the last consumer info poll
        # When the oldest message not acknowledged was stored (None: none waiting, or not known), polled.
        self.oldest_at: datetime | None = None
        self._may_read: bool | None = None  # whether this connection may get the stream's messages
        self.handled = 0
        self.dead_lettered = 0
        self.recreated = 0  # times the consumer was found gone and created again
        # Whether its lag and oldest age are on /metrics: from when it runs until it stops (`retire`). A runner
        # that stopped lives on until a full garbage collection (a partition pipeline's is in a cycle), which
        # services that raise the collector's thresholds or freeze start-up's objects may never run: its last
        # values stayed on the page beside the next owner's, the oldest age growing at each scrape.
        self.reporting = True
        # Acknowledging a message acknowledges every one before it (an ordered consumer's: `_settle`).
        self._ack_all = spec.config().ack_policy == api.AckPolicy.ALL
        # Where the consumer starts if it has to be created again (module docstring): after the highest
        # acknowledgement floor seen.
        self._floor = 0
        self._recreating = asyncio.Lock()
        self._ready = asyncio.Event()
        attrs = {"stream": spec.stream, "consumer": spec.durable}
        self._attrs = attrs
        meter = telemetry.meter
        self._m_handled = meter.create_counter(
            "cdp.bus.consumed", unit="{message}", description="messages handled, by outcome"
        )
        self._m_latency = meter.create_histogram(
            "cdp.bus.handle.duration",
            unit="ms",
            description="handler time per batch",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self._m_recreated = meter.create_counter(
            "cdp.bus.consumer.recreated",
            unit="{consumer}",
            description="durable consumers found gone on the server (deleted, a stream restored) and created again",
        )
        observe_on(
            meter,
            "cdp.bus.consumer.lag",
            self,
            ConsumerRunner._observe_lag,
            lambda callback: meter.create_observable_gauge(
                "cdp.bus.consumer.lag",
                callbacks=[callback],
                unit="{message}",
                description="messages in the stream this consumer has not received yet",
            ),
        )
        observe_on(
            meter,
            "cdp.bus.consumer.oldest_age",
            self,
            ConsumerRunner._observe_oldest,
            lambda callback: meter.create_observable_gauge(
                "cdp.bus.consumer.oldest_age",
                callbacks=[callback],
                unit="s",
                description="age of the oldest message this consumer has not acknowledged (0: none waiting)",
            ),
        )

    def _observe_lag(self):
        from opentelemetry.metrics import Observation

        if self.reporting:
            yield Observation(self.pending, self._attrs)

    def _observe_oldest(self):
        from opentelemetry.metrics import Observation

        if not self._may_read or not self.reporting:
            return  # stopped, not polled yet, or its user may not read the stream: no series rather than a false 0
        # Aged at each scrape from the message's own time: a stuck consumer's age grows between polls too.
        oldest = self.oldest_at
        age = 0.0 if oldest is None else max(0.0, (datetime.now(UTC) - oldest).total_seconds())
        yield Observation(age, self._attrs)

    async def observe(self, info: api.ConsumerInfo) -> None:
        """Take the consumer's lag from `info` (its consumer info, polled): messages not yet delivered, and
        when the oldest one not acknowledged was stored (`oldest_unacknowledged`: one request more, only
        with a backlog, and only where this connection's user may read the stream's messages)."""
        self.pending = info.num_pending or 0
        if self._may_read is None:
            self._may_read = may_read_messages(self.nc, self.spec.stream)
        if self._may_read:
            self.oldest_at = await oldest_unacknowledged(self.js, info)

    def retire(self) -> None:
        """It stopped consuming here (cancelled, its partition released): its lag and oldest age leave
        /metrics now, not when the garbage collector frees it; the consumer's next owner reports them."""
        self.reporting = False
        self.pending = 0
        self.oldest_at = None

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def provision(self, *, start_seq: int | None = None) -> None:
        """Create or update the durable consumer (idempotent). `start_seq`: where a consumer that does not
        exist starts (a partition engine's checkpoint + 1: nothing up to it needs reading again; a memory
        consumer is gone after a nats-server restart); by default at the stream's beginning. Each request a
        stalled server does not answer in time is asked again (`cdp_kit.bus.setup`)."""
        config = self.spec.config()
        try:
            info = await self._asked(lambda: self.js.consumer_info(self.spec.stream, self.spec.durable))
            self._saw(info)
            current = info.config
            if (
                (self.spec.ordered and (info.num_ack_pending or 0) > 0)
                or current.ack_policy != config.ack_policy
                or bool(current.mem_storage) != bool(config.mem_storage)
            ):
                # JetStream cannot change a consumer's acknowledgement policy or where it keeps its state
                # (a consumer made by an earlier version): it is created again at its floor, as after a crash.
                await self._restart_at_floor(info, config)
                return
            if (
                current.max_deliver != config.max_deliver
                or round(current.ack_wait or 0, 3) != round(config.ack_wait or 0, 3)
                or sorted(current.filter_subjects or [current.filter_subject or ""])
                != sorted(self.spec.filter_subjects)
                or current.max_ack_pending != config.max_ack_pending
            ):
                # Where it starts cannot change on an update (an ordered consumer may have been restarted
                # at its floor).
                config.deliver_policy, config.opt_start_seq = current.deliver_policy, current.opt_start_seq
                # Same durable name: an update.
                await self._asked(lambda: self.js.add_consumer(self.spec.stream, config))
        except NotFoundError:
            await self._start_at(config, start_seq)
            await self._asked(lambda: self.js.add_consumer(self.spec.stream, config))

    def _asked(self, request: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        """A setup request, asked again while a stalled server does not answer it in time."""
        return answered(self.js, f"consumer {self.spec.durable} of stream {self.spec.stream}", request)

    async def _start_at(self, config: api.ConsumerConfig, start_seq: int | None) -> None:
        """Make `config` start at `start_seq` - unless the stream ends before it (restored from an older
        backup: its positions are not ours), then at the stream's beginning (the spec's policy)."""
        if start_seq is None or start_seq <= 1:
            return
        last = (await self._asked(lambda: self.js.stream_info(self.spec.stream))).state.last_seq or 0
        if start_seq > last + 1:
            return
        config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = start_seq

    async def _restart_at_floor(self, info: api.ConsumerInfo, config: api.ConsumerConfig) -> None:
        floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
        try:
            await self._asked(lambda: self.js.delete_consumer(self.spec.stream, self.spec.durable))
        except NotFoundError:
            pass  # deleted by a request whose answer did not come back in time (asked again), or by a peer
        config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = (floor or 0) + 1
        await self._asked(lambda: self.js.add_consumer(self.spec.stream, config))
        log.info(
            "consumer %s restarted at its acknowledgement floor",
            self.spec.durable,
            extra={"floor": floor, "unacknowledged": info.num_ack_pending},
        )

    def _saw(self, info: api.ConsumerInfo) -> None:
        if info.ack_floor is not None:
            self._floor = max(self._floor, info.ack_floor.stream_seq or 0)

    async def recover_missing(self, error: BaseException | None = None, *, start_seq: int | None = None) -> bool:
        """Create the consumer again if the server says it does not exist (error 10014; the module
        docstring says why and where it starts); True when it did. `error`: what a fetch failed with -
        only an answer from JetStream (a status, no responders) is worth asking about; a connection
        that is down is not. `start_seq`: start there (a partition engine's checkpoint + 1) rather than
        after the acknowledgement floor seen."""
        if error is not None and not isinstance(error, (nats.js.errors.APIError, nats.errors.NoRespondersError)):
            return False
        async with self._recreating:  # concurrent fetch loops, and the lag poll: one of them creates it
            try:
                await self.js.consumer_info(self.spec.stream, self.spec.durable)
                return False
            except NotFoundError as exc:
                if exc.err_code != CONSUMER_NOT_FOUND:
                    return False  # the stream is gone: no consumer to create until it is back
            except asyncio.CancelledError:
                raise
            except Exception:
                return False  # the bus: the fetch (or the poll) is retried and asks again
            config = self.spec.config()
            if start_seq is None and self._floor:
                start_seq = self._floor + 1
            try:
                if start_seq is not None:
                    last = (await self.js.stream_info(self.spec.stream)).state.last_seq or 0
                    if start_seq > last + 1:
                        start_seq = None  # restored from an older backup: its positions are not ours
                if start_seq is not None:
                    config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
                    config.opt_start_seq = max(start_seq, 1)
                # Another replica sharing the durable may have created it since: the same config is no
                # conflict.
                await self.js.add_consumer(self.spec.stream, config)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "consumer %s is gone and could not be created again: %s", self.spec.durable, describe_error(exc)
                )
                return False
        self.recreated += 1
        self._m_recreated.add(1, self._attrs)
        log.warning(
            "consumer %s did not exist on the server (deleted, or its stream restored): created it again",
            self.spec.durable,
            extra={
                "stream": self.spec.stream,
                "consumer": self.spec.durable,
                "deliver_policy": config.deliver_policy.value if config.deliver_policy else None,
                "start_seq": config.opt_start_seq,
            },
        )
        return True

    async def run(self) -> None:
        """Consume until cancelled. Survives NATS outages: fetches fail, we wait and try again."""
        me = asyncio.current_task()
        self.reporting = True
        try:
            await self._run(me)
        finally:
            self.retire()

    async def _run(self, me: asyncio.Task | None) -> None:
        delay = 0.1
        while True:
            _raise_if_cancelling(me)
            try:
                await self.provision()
                subscription = await self.js.pull_subscribe_bind(durable=self.spec.durable, stream=self.spec.stream)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS down at start-up: keep trying, loudly
                log.warning("consumer %s not ready: %s", self.spec.durable, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        advisories = await self.nc.subscribe(self.advisory_subject, cb=self._on_max_deliveries)
        self._ready.set()
        lag_task = asyncio.create_task(self._poll_lag(), name=f"lag {self.spec.durable}")
        try:
            # A stop that came while binding and was swallowed there (above) is still owed: the fetch loops
            # are tasks of their own, never cancelled, and would run on for ever (a stop during start hung).
            _raise_if_cancelling(me)
            await asyncio.gather(*(self._loop(subscription) for _ in range(self.spec.concurrency)))
        finally:
            lag_task.cancel()
            try:
                await advisories.unsubscribe()
                await subscription.unsubscribe()
            except Exception:
                pass

    async def _poll_lag(self) -> None:
        me = asyncio.current_task()
        while True:
            _raise_if_cancelling(me)
            try:
                info = await self.js.consumer_info(self.spec.stream, self.spec.durable)
                self._saw(info)
                await self.observe(info)
            except asyncio.CancelledError:
                raise
            except NotFoundError as exc:
                if exc.err_code == CONSUMER_NOT_FOUND:
                    await self.recover_missing()  # a fetch to a missing consumer may just time out
            except Exception:
                pass
            await asyncio.sleep(5.0)

    async def _loop(self, subscription) -> None:
        failures = closed_rounds = 0
        me = asyncio.current_task()
        while True:
            _raise_if_cancelling(me)
            try:
                msgs = await self._fetch(subscription)
                failures = 0
            except nats.errors.TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.nc.is_closed:
                    # An orderly stop closes the connection a moment before it cancels this loop: wait for
                    # that quietly. Still here seconds later, the connection was closed for good (nats-py
                    # never reopens one, e.g. after its credentials were refused): that is worth an error.
                    closed_rounds += 1
                    if closed_rounds == 50:
                        log.error("connection of %s is closed: this consumer receives nothing", self.spec.durable)
                    await asyncio.sleep(0.1)
                    continue
                if await self.recover_missing(exc):
                    failures = 0
                    continue
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning("fetch from %s failed (%s); retrying", self.spec.durable, exc)
                await asyncio.sleep(min(0.1 * failures, 2.0))
                continue
            if msgs:
                await self._handle(msgs)
                if self.spec.linger and len(msgs) < self.spec.batch_size:
                    await asyncio.sleep(self.spec.linger)

    async def _fetch(self, subscription) -> list[Msg]:
        """Up to a batch of what is there now, or else the next message the moment it comes.

        nats-py's `fetch(batch)`, when nothing is waiting, holds the first message that comes until the
        whole batch is in or `fetch_timeout` passes: a partition receiving a few messages a second would
        hand each over up to a second late. So: wait for one message, then take, without waiting, what
        else is there (a no-wait pull, answered at once with the messages and then a 404 status).

        The no-wait pull is asked only when something else is there: a delivered message says how many
        of the consumer's messages were still waiting behind it (`num_pending` in its metadata). On a
        quiet stream that is none, and the message is handed over at once instead of after one more
        round trip to the server - on every hop of the pipeline, where a busy machine makes each round
        trip cost a scheduling delay in two processes. That count can be short: nats-server raises it off
        its stream's signal queue, after a message is stored and its publish acknowledged, so a message can
        say none wait behind it while more are stored. Those come with the next fetch, at once."""
        msgs = await subscription.fetch(1, timeout=self.spec.fetch_timeout)
        wanted = self.spec.batch_size - len(msgs)
        if wanted <= 0:
            return msgs
        inbox = subscription._sub  # nats-py keeps the pull subscription's inbox and subjects private
        if msgs and inbox._pending_queue.empty() and not _more_waiting(msgs[-1]):
            return msgs
        await self.nc.publish(
            subscription._nms, orjson.dumps({"batch": wanted, "no_wait": True}), reply=subscription._deliver
        )
        while wanted > 0:
            # What has arrived is taken as it is: nats-py's `next_msg` makes a task (and a uuid) per call.
            msg = _next_nowait(inbox)
            if msg is None:
                try:
                    msg = await inbox.next_msg(timeout=self.spec.fetch_timeout)
                except (TimeoutError, nats.errors.TimeoutError):
                    break  # anything that still comes waits in the inbox for the next fetch
            status = (msg.headers or {}).get("Status")
            if status is None:
                msgs.append(msg)
                wanted -= 1
            elif status in ("404", "408"):
                break  # no (more) messages: the pull is over
        return msgs

    async def _handle(self, msgs: list[Msg]) -> None:
        deliveries, error = await self._attempt(msgs)
        if error is None:
            await self._settle(deliveries, None, final=self.spec.ordered)
        elif len(msgs) > 1:
            await self._isolate(msgs)
        elif self.spec.ordered or is_outage(error):
            # The same message again after a pause, before anything newer. An outage too, ordered or
            # not: a redelivery would spend the message's deliveries (JetStream's max_deliver) on it.
            deliveries, error = await self._retry_in_place(msgs, msgs, tried=1)
            await self._settle(deliveries, error, final=True)
        else:
            await self._settle(deliveries, error)  # redelivered later, or dead-lettered on its last delivery

    async def _retry_in_place(
        self, part: list[Msg], unsettled: list[Msg], *, tried: int = 0
    ) -> tuple[list[Delivery], BaseException | None]:
        """Attempt `part` until it succeeds or `max_deliver` attempts have failed, pausing with backoff
        between attempts while keeping every unsettled message of the batch from redelivery."""
        attempt = tried
        while True:
            if attempt:
                await self._hold(unsettled, self.spec.delay_after(attempt))
                self._retried(len(part))
            deliveries, error = await self._attempt(part)
            attempt += 1
            if error is None or (attempt >= self.spec.max_deliver and not is_outage(error)):
                return deliveries, error

    async def _isolate(self, msgs: list[Msg]) -> None:
        """Handle a batch the handler raised on, part by part, so only messages that fail on their own
        are dead-lettered (the rule is in the module docstring)."""
        parts = _halves(msgs)[::-1]  # a stack: the next part, in stream order, is on top
        unsettled = list(msgs)
        suspect: tuple[Delivery, BaseException] | None = None
        rounds = 0  # restarts since the batch last made progress

        async def done(deliveries: list[Delivery], error: BaseException | None) -> None:
            await self._settle(deliveries, error, final=True if error is not None else self.spec.ordered)
            settled = {id(d.msg) for d in deliveries}
            unsettled[:] = [m for m in unsettled if id(m) not in settled]

        while parts:
            part = parts.pop()
            if len(part) == 1 and suspect is None:
                deliveries, error = await self._retry_in_place(part, unsettled)
            else:
                deliveries, error = await self._attempt(part)
            if error is None:
                if suspect is not None:
                    # Its neighbour is handled, it is not: the failure is the message's own.
                    await done([suspect[0]], suspect[1])
                    suspect = None
                await done(deliveries, None)
                rounds = 0
            elif len(part) > 1:
                parts.extend(_halves(part)[::-1])
            elif suspect is None:
                suspect = (deliveries[0], error)
            else:
                # Two neighbours failing on their own: the handler's dependencies are down. Wait, then
                # everything not yet handled again, as one batch.
                rounds += 0 if is_outage(error) else 1
                if rounds >= self.spec.max_deliver:
                    await done([suspect[0]], suspect[1])
                    rounds = 0
                log.warning(
                    "handler of %s fails on consecutive messages; retrying the rest of the batch",
                    self.spec.durable,
                    extra={"round": rounds, "unsettled": len(unsettled)},
                )
                suspect = None
                await self._hold(unsettled, self.spec.backoff[-1])
                self._retried(len(unsettled))
                parts = [list(unsettled)]
        if suspect is not None:  # the batch's last message: nothing after it to compare with
            await done([suspect[0]], suspect[1])

    def _retried(self, messages: int) -> None:
        """`messages` are attempted again in place (an outage, an ordered consumer's failure): a retry on
        `cdp.bus.consumed` as a redelivery is (`_settle`). Only redeliveries were counted, so a store
        outage, retried in place for as long as it lasts, never moved the series the "Batches retried"
        alert reads (docs/operations.md), nor did any partition engine's failed batch."""
        self._m_handled.add(messages, {**self._attrs, "outcome": "retry"})

    async def _hold(self, msgs: list[Msg], delay: float) -> None:
        step = max(0.05, min(delay, self.spec.ack_wait / 3))
        deadline = time.monotonic() + delay
        me = asyncio.current_task()
        while True:
            # Every retry of a part waits here first. A cancellation the handler lost (a request's reply
            # in its loop turn, see `_raise_if_cancelling`) ends the retries: an outage's never end on
            # their own, so the task ran on for ever. Nothing of the part was acknowledged: it comes again.
            _raise_if_cancelling(me)
            for msg in msgs:
                try:
                    await msg.in_progress()
                except Exception:
                    pass  # the bus is down: the retry fails too, or the messages come back in order anyway
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            await asyncio.sleep(min(step, remaining))

    async def _attempt(self, msgs: list[Msg]) -> tuple[list[Delivery], BaseException | None]:
        deliveries = [Delivery(m) for m in msgs]
        links = []
        for d in deliveries[:32]:  # a span with thousands of links helps nobody
            span_context = trace.get_current_span(d.trace_context()).get_span_context()
            if span_context.is_valid:
                links.append(Link(span_context))
        parent = deliveries[0].trace_context() if len(deliveries) == 1 else None
        started = time.perf_counter()
        with self.tracer.start_as_current_span(
            f"{self.spec.stream} process",
            context=parent,
            kind=SpanKind.CONSUMER,
            links=links,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": self.spec.stream,
                "messaging.consumer.group.name": self.spec.durable,
                "messaging.batch.message_count": len(msgs),
            },
        ) as span:
            try:
                await self.handler(deliveries)
                error: BaseException | None = None
            except asyncio.CancelledError:
                # Shutting down mid-batch: nothing acknowledged, JetStream redelivers after ack_wait.
                raise
            except Exception as exc:
                error = exc
                # The type only: exception text quotes identifiers, and spans are exported like logs.
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                log.warning(
                    "handler of %s failed on %d messages (from position %d): %s",
                    self.spec.durable,
                    len(msgs),
                    deliveries[0].stream_seq,
                    describe_error(exc),
                )
        self._m_latency.record((time.perf_counter() - started) * 1000, self._attrs)
        return deliveries, error

    async def _settle(self, deliveries: list[Delivery], error: BaseException | None, *, final: bool = False) -> None:
        """Acknowledge, redeliver later, or dead-letter each message. `final`: no redelivery (an ordered
        consumer already retried the batch in place)."""
        counts = {"ack": 0, "retry": 0, "dead_letter": 0}
        # An ordered consumer's (AckPolicy.ALL): acknowledging a message acknowledges every one before it,
        # and every settle is final (acknowledged or dead-lettered, never redelivered). So one
        # acknowledgement, of the last message, stands for the batch; a dead-lettered message's
        # termination acknowledges the ones before it too.
        ack_last = self._ack_all and final
        for d in deliveries:
            try:
                if d.parts and error is None and d.outcome == "ack":
                    # Its rejected parts are stored as dead letters before the message is acknowledged:
                    # if that fails, the message comes again and so do they (one copy each: `_dead_letter`).
                    counts["dead_letter"] += await self._dead_letter_parts(d)
                if ack_last and error is None and d.outcome == "ack":
                    counts["ack"] += 1
                    if d is deliveries[-1]:
                        await d.msg.ack()
                    continue
                last_try = final or d.num_delivered >= self.spec.max_deliver
                if error is not None:
                    if last_try:
                        await self._dead_letter(d, "handler_error", describe_failure(error))
                        counts["dead_letter"] += 1
                    else:
                        await d.msg.nak(delay=self.spec.delay_after(d.num_delivered))
                        counts["retry"] += 1
                elif d.outcome == "ack":
                    await d.msg.ack()
                    counts["ack"] += 1
                elif d.outcome == "reject":
                    await self._dead_letter(d, d.reason, d.detail)
                    counts["dead_letter"] += 1
                elif last_try:
                    await self._dead_letter(d, d.reason or "retries_exhausted", "gave up after retries")
                    counts["dead_letter"] += 1
                else:
                    await d.msg.nak(delay=d.delay if d.delay is not None else self.spec.delay_after(d.num_delivered))
                    counts["retry"] += 1
            except Exception as exc:
                # Could not ack/nak/dead-letter (bus trouble): JetStream redelivers after ack_wait.
                log.warning("could not settle message %s of %s: %s", d.stream_seq, self.spec.durable, exc)
        self.handled += counts["ack"]
        self.dead_lettered += counts["dead_letter"]
        for outcome, n in counts.items():
            if n:
                self._m_handled.add(n, {**self._attrs, "outcome": outcome})

    async def _dead_letter(self, d: Delivery, reason: str, detail: str) -> None:
        await self.publish_dead_letter(
            data=d.data,
            headers=d.headers,
            subject=d.subject,
            seq=d.stream_seq,
            deliveries=d.num_delivered,
            reason=reason,
            detail=detail,
        )
        await d.msg.term()

    async def _dead_letter_parts(self, d: Delivery) -> int:
        """Store each rejected part of `d` as a dead letter of its own; how many were stored now."""
        stored = 0
        for index, (data, reason, detail) in sorted((d.parts or {}).items()):
            stored += await self.publish_dead_letter(
                data=data,
                headers={k: v for k, v in d.headers.items() if k not in PART_DROPPED_HEADERS},
                subject=d.subject,
                seq=d.stream_seq,
                deliveries=d.num_delivered,
                reason=reason,
                detail=detail,
                part=index,
            )
        return stored

    async def publish_dead_letter(
        self,
        *,
        data: bytes,
        headers: dict[str, str],
        subject: str,
        seq: int,
        deliveries: int,
        reason: str,
        detail: str,
        part: int | None = None,
    ) -> bool:
        """Store the dead letter; False when it was stored before (the same position, by another path).
        `part`: the letter is that part of the message at `seq`, not the whole message (`reject_part`)."""
        dlq_headers = {k: v for k, v in headers.items() if not k.startswith("Nats-")}
        position = str(seq) if part is None else f"{seq}:{part}"
        if part is not None:
            dlq_headers[DLQ_PART] = str(part)
        dlq_headers.update(
            {
                # Keyed on the original position so a retried dead-lettering stores one copy.
                "Nats-Msg-Id": f"dlq:{self.spec.stream}:{self.spec.durable}:{position}",
                DLQ_REASON: reason or "unspecified",
                DLQ_DETAIL: (detail or "")[:DLQ_DETAIL_MAX].replace("\r", " ").replace("\n", " "),
                DLQ_SUBJECT: subject,
                DLQ_STREAM: self.spec.stream,
                DLQ_SEQ: str(seq),
                DLQ_CONSUMER: self.spec.durable,
                DLQ_DELIVERIES: str(deliveries),
                DLQ_TIME: datetime.now(UTC).isoformat(timespec="milliseconds"),
            }
        )
        ack = await self.js.publish(
            subjects.dead_letter(self.spec.stream, self.spec.durable), data, headers=dlq_headers
        )
        # Logged once a dead letter: the runner giving up and the MAX_DELIVERIES advisory may both store it
        # (the second is a duplicate). The reason is a code; the detail may quote the payload's values and
        # stays out of the log.
        if getattr(ack, "duplicate", False):
            return False
        if part is None:
            log.warning("dead-lettered message %d of %s: %s", seq, self.spec.durable, reason)
        else:
            log.warning("dead-lettered part %d of message %d of %s: %s", part, seq, self.spec.durable, reason)
        return True

    @property
    def advisory_subject(self) -> str:
        """Where nats-server says this consumer gave up on a message (max deliveries reached)."""
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.spec.stream}.{self.spec.durable}"

    async def _on_max_deliveries(self, msg: Msg) -> None:
        # Only what nats-server published on the subject. Any service keeping a consumer can make it a push
        # consumer delivering onto it (the create permission does not see the deliver subject), and one
        # that writes into a stream it consumes (orchestration) chooses the bytes: an advisory taken from it
        # would copy whichever message of this stream it names into the dead letters, for a replay to
        # resend. Such a message keeps its stream subject (`subjects.published_on`).
        if not subjects.published_on(msg, self.advisory_subject):
            return
        try:
            advisory = orjson.loads(msg.data)
            seq = int(advisory["stream_seq"])
            deliveries = int(advisory.get("deliveries", self.spec.max_deliver))
            stored = await self.js.get_msg(self.spec.stream, seq)
            stored_now = await self.publish_dead_letter(
                data=stored.data or b"",
                headers=stored.headers or {},
                subject=stored.subject or "",
                seq=seq,
                deliveries=deliveries,
                reason="max_deliveries",
                detail="deliveries ran out without an outcome (handler crashed or exceeded ack_wait)",
            )
            if stored_now:  # not already dead-lettered by the runner itself (counted there)
                self.dead_lettered += 1
                self._m_handled.add(1, {**self._attrs, "outcome": "dead_letter"})
        except Exception as exc:
            log.error("could not dead-letter after max deliveries advisory: %s", exc)


class PullLost(Exception):
    """The connection was re-established: messages delivered as it broke are lost; resubscribe (for an
    ordered consumer, at the acknowledgement floor) before fetching again."""


class StandingPull:
    """A partition owner's fetches from one long-lived pull request instead of a new one per batch.

    `ConsumerRunner._fetch` sends a pull request (and, when more is waiting, a no-wait one) for every
    batch: a socket write and a request the server sets up and tears down, most of what a batch of a few
    messages costs both processes. Here a request asks for `batch_size` messages with a long `expires`
    and an idle heartbeat; the server pushes messages into the inbox as they are stored, a batch is what
    has arrived, and a new request is added when fewer than half a batch remain outstanding (requests
    are served in the order they were made, so counting each message against the oldest is exact). A
    quiet stream still hands a message over the moment it comes.

    Invariants the owner relies on:
    - Every message taken from the inbox is returned to the caller, in stream order; one that comes
      with or after a status is never dropped (a dropped message would be acknowledged by no one while
      newer ones are handled).
    - A request that is no longer served (expired: its local deadline, half a second before the server's
      408; the consumer deleted or changed: other statuses; no heartbeat for twice its interval) is
      forgotten and replaced, so a fetch never waits on a request the server has dropped. A status never
      costs a message taken with it: `fetch` raises one only when nothing else came. After a reconnect `fetch` raises `PullLost`: messages on
      their way when the connection broke are lost and stay unacknowledged, and an owner that went on
      with newer ones would find them applied (skipped) when they came back after `ack_wait`.
    - `close()` unsubscribes the inbox and waits for the server to confirm (a PING round trip), so
      nothing is delivered to it afterwards. What was delivered and not taken is unacknowledged: the
      next owner of an ordered consumer (another replica, or this one after a failed batch) restarts it
      at its acknowledgement floor (`ConsumerRunner.provision`), so those messages come again at once
      and first, not after `ack_wait`.
    """

    EXPIRES = 30.0
    HEARTBEAT = 2.5

    def __init__(self, nc, subscription, batch_size: int, *, expires: float = EXPIRES, heartbeat: float = HEARTBEAT):
        self.nc = nc
        self.subscription = subscription
        self.inbox = subscription._sub  # nats-py keeps the pull subscription's inbox and subjects private
        self.batch_size = batch_size
        self.expires = expires
        self.heartbeat = heartbeat
        self._requests: deque[list] = deque()  # [messages still owed, local deadline], oldest first
        self._outstanding = 0
        self._heard = time.monotonic()  # last message or status from the server on this inbox
        self._reconnects = nc.stats.get("reconnects", 0)
        # `wake()`: the owner is stopping; a fetch returns what it has at once instead of waiting.
        self._woken = False
        self._waiting: asyncio.Timeout | None = None  # the timeout of a fetch waiting for the inbox
        self._request_body = orjson.dumps(
            {
                "batch": batch_size,
                "expires": int(expires * 1e9),
                "idle_heartbeat": int(heartbeat * 1e9),
            }
        )

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def _forget(self) -> None:
        self._requests.clear()
        self._outstanding = 0

    def _age(self) -> None:
        """Forget requests the server no longer serves."""
        now = time.monotonic()
        reconnects = self.nc.stats.get("reconnects", 0)
        if reconnects != self._reconnects:
            self._reconnects = reconnects
            self._forget()
            # Messages the server sent as the connection broke are lost and unacknowledged; newer ones
            # must not be handled before they come again (the owner restarts at the floor).
            raise PullLost("reconnected: the standing pull and what was in flight to it are gone")
        elif self._requests and now - self._heard > 2 * self.heartbeat + 0.5 and self.inbox._pending_queue.empty():
            self._forget()  # heartbeats stopped (none waits unread in the inbox): the requests are gone
        while self._requests and self._requests[0][1] <= now:
            self._outstanding -= self._requests.popleft()[0]

    async def _top_up(self) -> None:
        self._age()
        if self._outstanding * 2 < self.batch_size:
            if not self._requests:
                self._heard = time.monotonic()  # heartbeats are due from now on
            # Forgotten a little before the server expires it: a stale request is replaced, never waited on.
            self._requests.append([self.batch_size, time.monotonic() + self.expires - 0.5])
            self._outstanding += self.batch_size
            await self.nc.publish(self.subscription._nms, self._request_body, reply=self.subscription._deliver)

    def _take(self, msg: Msg, msgs: list[Msg]) -> BaseException | None:
        """Count one message from the inbox: appended to `msgs`, or a status acted on (an error to raise
        if nothing else comes with it). Never raises: the messages taken before a status are the caller's."""
        self._heard = time.monotonic()
        headers = msg.headers
        status = headers.get("Status") if headers else None
        if status is None:
            msgs.append(msg)
            if self._requests:
                self._outstanding -= 1
                self._requests[0][0] -= 1
                if self._requests[0][0] <= 0:
                    self._requests.popleft()
            return None
        if status == "100":
            return None  # idle heartbeat (or flow control, unused by pull consumers)
        if status in ("404", "408"):
            # 408: a request expired. `_age` forgot it already: it forgets each request half a second before
            # the server expires it, and runs before the inbox is read - also when the owner was busy past
            # the expiry and the notice waited in the inbox. Forgetting the oldest again here dropped a
            # request still standing from the count (the server then held more than counted), and a notice
            # finding none left was taken for an error that lost the messages read with it.
            return None
        # 409 (consumer deleted, leadership change, a limit), 503 (no such consumer): nothing is owed.
        self._forget()
        try:
            nats.js.errors.APIError.from_msg(msg)  # raises the status' error (nats-py declares NoReturn)
        except nats.js.errors.APIError as error:
            return error
        return nats.js.errors.APIError(code=int(status) if status.isdigit() else None)

    def _next_nowait(self) -> Msg | None:
        return _next_nowait(self.inbox)

    def wake(self) -> None:
        """The owner is stopping: a fetch waiting for messages returns what it has now (nothing), and
        later ones do not wait. A stop need not sit out the fetch timeout."""
        self._woken = True
        # Not one that is firing already (asyncio refuses to move it): that fetch sees `_woken` next.
        if self._waiting is not None and not self._waiting.expired():
            self._waiting.reschedule(asyncio.get_running_loop().time())

    async def fetch(self, timeout: float) -> list[Msg]:
        """What has arrived, up to a batch, or else the next message the moment it comes; [] after
        `timeout` with nothing. Raises the server's error (a status) when it comes with no message."""
        if self.nc.is_closed:
            raise nats.errors.ConnectionClosedError
        msgs: list[Msg] = []
        error: BaseException | None = None
        await self._top_up()
        deadline = time.monotonic() + timeout
        queue = self.inbox._pending_queue
        while not msgs:
            msg = self._next_nowait()
            if msg is None:
                now = time.monotonic()
                remaining = deadline - now
                if remaining <= 0 or self._woken:
                    break
                # Awake by the oldest request's deadline, so its successor is asked before the server
                # expires it: a quiet stream never goes without a request waiting.
                wait = min(remaining, self.heartbeat)
                if self._requests:
                    wait = max(0.0, min(wait, self._requests[0][1] - now))
                try:
                    async with asyncio.timeout(wait) as self._waiting:
                        msg = await queue.get()
                except TimeoutError:
                    if self._woken:
                        break
                    await self._top_up()  # replaces a request that expired or the server has dropped
                    continue
                finally:
                    self._waiting = None
                self.inbox._pending_size -= len(msg.data)
                queue.task_done()
            error = self._take(msg, msgs) or error
            if not msgs:
                if error is not None:
                    raise error
                await self._top_up()  # a status: an expired request is replaced at once
        while len(msgs) < self.batch_size:
            msg = self._next_nowait()
            if msg is None:
                break
            self._take(msg, msgs)
        if msgs:
            await self._top_up()
        return msgs

    async def close(self, timeout: float = 2.0) -> None:
        """Unsubscribe and make sure the server has stopped delivering to the inbox (see above)."""
        self._forget()
        task = asyncio.current_task()
        try:
            await self.subscription.unsubscribe()
            # Not when cancelled (a crash needs no drain; the UNSUB precedes anything this connection
            # sends next), and shielded: nats-py breaks the connection when a PING's answer finds its
            # future cancelled.
            if self.nc.is_connected and not (task is not None and task.cancelling()):
                await asyncio.shield(self.nc.flush(timeout=timeout))
        except Exception:
            pass  # the connection is gone: so is the inbox's interest on the server


async def oldest_unacknowledged(js: JetStreamContext, info: api.ConsumerInfo) -> datetime | None:
    """When the oldest message consumer `info` has not acknowledged was stored, or None when none waits
    (nothing pending, nothing unacknowledged) or the stream no longer holds it. That message is the first
    one its filter takes after its acknowledgement floor (everything up to the floor is acknowledged, and
    the first one after it is not, or the floor would be past it): one request per filter subject (one
    for every consumer of the platform but profile's drained merges), only for a consumer with a backlog."""
    if not (info.num_pending or 0) and not (info.num_ack_pending or 0):
        return None
    floor = (info.ack_floor.stream_seq if info.ack_floor is not None else 0) or 0
    config = info.config
    filters = list(config.filter_subjects or ()) or [config.filter_subject or ">"]
    oldest: datetime | None = None
    for subject in filters:
        try:
            msg = await js.get_msg(info.stream_name, floor + 1, subject=subject, next=True)
        except NotFoundError:
            continue  # nothing of that subject after the floor (or it aged out of the stream)
        if msg.time is not None and (oldest is None or msg.time < oldest):
            oldest = msg.time
    return oldest


def may_read_messages(nc, stream: str) -> bool:
    """Whether connection `nc` may get single messages of `stream`: a service's user may only where its
    role grants it (`cdp_kit.natsauth.permissions`); asking anyway would be refused by nats-server (a
    permissions violation in its log) and answered by nothing until the request's timeout. A connection
    without a service's user (tests, an operator) may."""
    from cdp_kit.natsauth import ROLES, permissions, role_of

    user = nc.options.get("user") if getattr(nc, "options", None) else None
    user = user() if callable(user) else user
    role = ROLES.get(role_of(user)) if user else None
    if role is None:
        return True
    return f"$JS.API.STREAM.MSG.GET.{stream}" in permissions(role)["publish"]["allow"]


async def delivered_since(
    js: JetStreamContext, stream: str, subjects: Mapping[str, str], positions: Mapping[str, int]
) -> AsyncIterator[tuple[str, int, bytes]]:
    """For state snapshotted with its stream positions: the messages of each subject after its position,
    up to the last one the subject's durable consumer (`subjects`: subject -> durable name) was given;
    later ones the consumer delivers itself. Yields (subject, stream position, payload) in stream order
    per subject. A durable that does not exist yet starts at the stream's beginning: nothing to catch up."""
    for subject, durable in subjects.items():
        try:
            info = await js.consumer_info(stream, durable)
        except NotFoundError:
            continue
        end = info.delivered.stream_seq or 0
        seq = positions.get(subject, 0) + 1
        while seq <= end:
            try:
                msg = await js.get_msg(stream, seq=seq, subject=subject, next=True)
            except NotFoundError:
                break
            if msg.seq > end:
                break
            yield subject, msg.seq, msg.data or b""
            seq = msg.seq + 1
