"""`privacy.deleted` (stream PRIVACY) -> nothing of the person left in orchestration.

Two halves, because the person's state belongs to the engine of their partition (it may hold them in its
hot cache, mid-batch):

1. `PrivacyHandler` follows `privacy.deleted` with one durable consumer the replicas share
   (`orchestration-privacy`, each request handled once). For the person and every person merged into
   them it publishes a `forget` command to `orchestration.in.<p>` (message id `forget:<request>:<person>`,
   so a redelivered request is a JetStream duplicate) and waits until the engine has applied it.
2. `forget`, applied by that engine: the person's running instances end ("deleted", counted in the
   journey's stats), every timer of theirs is cancelled (instance timers, the arbiter's wake, scheduled
   entry slots), and their person record (view, identifiers, arbiter state: held actions, caps used),
   every instance record, decision, approval and Enroll answer (its key is the caller's idempotency key,
   which may carry personal data; the answer names its person) is deleted in the batch's commit. A marker
   `orchestration_forgotten/<request>:<person>` (counts only) tells the handler it is done, and a
   tombstone `orchestration_tombstones/<person>` (when, which request) makes the engine drop whatever
   reaches it for the person afterwards (`engine.py`): a profile change or event published before the
   deletion may be sourced after it, and must not fill the forgotten person's record again. Person ids
   are never reused (identity gives a returning customer a new one), so nothing real is dropped.
   Tombstones age out (`TombstoneSweeper`): after CDP_ORCHESTRATION_TOMBSTONE_DAYS (35 by default,
   refused at start below the longest a message for the person can still arrive - the dead-letter
   stream's 30 days, a dead letter being replayable, or this service's own stream retention) nothing
   for the person is left to drop, and every replica deletes the older ones, a bounded page at a time,
   every `SWEEP_INTERVAL` seconds (metric ``cdp.orchestration.tombstones.swept``).

Then the handler deletes what the dispatchers keep (the in-app inbox through `InboxChannel.forget`, the
send records and other outcome events), deletes the engine's published outbox records at a quiescent
point (they may hold the person's rendered actions), withdraws the person's actions still in the
ACTIONS stream (each erased by its sequence, with a "withdrawn" send record so a dispatcher that holds
it already sends nothing; `actions.crm` ones too, which the CRM connector has not taken yet), and
erases the store (`Store.erase`) so no bytes of the deleted records stay readable in its files. Only
then is the request acknowledged: a crash anywhere redelivers it, and every step is idempotent.

ACTIONS holds a message only until its dispatcher recorded the outcome (`dispatch.py` erases it then),
so what is left of a person there is what has not gone out: a channel whose dispatcher is behind or not
configured here, or a send being retried. An action the engine of another replica had not published yet
when the request was handled (its outbox lags the commit that forgot the person) is left to the stream's
retention (`CDP_ORCHESTRATION_RETENTION_DAYS`), and never sent (below).

Nothing goes out to a person whose deletion profile accepted (its notice stored in PRIVACY), though the
withdrawal above comes later: the handler learns of a notice when its consumer fetches it (after a bus
outage up to two seconds later, the fetch loop's back-off; longer when it is behind), and withdraws only
once the engine forgot the person. A dispatcher sending in between sent to a deleted person. So
(`Deletions`, asked by every dispatcher):
- the handler writes a marker `orchestration_deleted/<person>` (when, which request; no personal data) for
  every person of a notice as soon as it has it, before anything else; a dispatcher looks for the marker
  right before each send and withdraws the action instead (its send record "withdrawn"). Markers are
  swept with the tombstones, after CDP_ORCHESTRATION_TOMBSTONE_DAYS;
- before a dispatcher works a fetched batch it asks JetStream for this handler's consumer: when notices
  are stored that the handler has not acknowledged (fetched or not), it reads them (from the consumer's
  acknowledgement floor; at most `MAX_UNHANDLED`) and sends nothing to their persons. When that cannot be
  known (the bus does not answer; the consumer is missing while PRIVACY holds notices; the handler is
  further behind) the batch is handed back and nothing is sent.
  The look is taken again before a send once LOOK_EVERY (0.1 s) has passed, so a slow batch does not
  send on an old one.
What remains: a notice stored within LOOK_EVERY before a send and not yet marked by the handler (a
deletion accepted while the send was under way), and a send a provider had already taken.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError
from nats.js.errors import NotFoundError
from opentelemetry import metrics

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp.privacy.v1 import privacy_pb2
from cdp_kit.bus import Bus, ConsumerSpec, Delivery, partition_for, subjects
from cdp_kit.engine import PartitionedEngine
from cdp_kit.errors import Unavailable
from cdp_kit.storage import Delete, Put, Store
from cdp_kit.storage.expiry import ExpirySweeper, sweep_expired
from cdp_kit.storage.port import MAX_FIND_LIMIT
from cdp_orchestration import streams, timers
from cdp_orchestration.actions import ATTRIBUTION_HEADER
from cdp_orchestration.dispatch import erase_action, withdrawn_record
from cdp_orchestration.domain.arbiter import PersonState
from cdp_orchestration.domain.instance import Status
from cdp_orchestration.state import (
    APPROVALS,
    DECISIONS,
    ENROLLMENTS,
    FORGOTTEN,
    INSTANCES,
    MEMBERS,
    OUTCOMES,
    PERSONS,
    SENDS,
    TOMBSTONES,
    Batch,
    Partition,
    Person,
)

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

    from cdp_orchestration.apply import Applier
    from cdp_orchestration.channels.inapp import InboxChannel

log = logging.getLogger("cdp.orchestration.privacy")

SERVICE = "orchestration"
POLL = 0.05  # seconds between looks at the store while the handler waits for the engine
SWEEP_INTERVAL = 3600.0  # seconds between two sweeps of the aged-out tombstones
DAY = 86_400.0
#: person id -> {"at", "request_id"}: a deletion was accepted for the person; nothing is sent to them.
DELETED = "orchestration_deleted"
#: Notices the handler has not acknowledged that a dispatcher reads before a batch; beyond, it waits.
MAX_UNHANDLED = 1000
#: Seconds a dispatcher's look at those notices serves the sends after it, within a batch.
LOOK_EVERY = 0.1


def consumer_spec() -> ConsumerSpec:
    return ConsumerSpec(
        stream=subjects.PRIVACY,
        durable=subjects.shared_durable(SERVICE, "privacy"),
        filter_subjects=(subjects.PRIVACY_DELETED,),
        batch_size=16,
        ack_wait=300.0,
        max_deliver=100,  # a partition moving between replicas must not turn an erasure into a dead letter
        backoff=(1.0, 5.0, 15.0, 60.0),
        description="orchestration: forget deleted persons",
    )


def forgotten_key(request_id: str, person_id: str) -> str:
    return f"{request_id}:{person_id}"


async def forget(applier: Applier, hot: Partition, batch: Batch, person: Person, request_id: str, now: float) -> None:
    """The engine's half (see the module docstring). Idempotent: a person already forgotten has nothing left."""
    person_id = person.person_id
    ended = 0
    timers.cancel_all(batch, person)
    for instance in person.live.values():
        if instance.status is Status.RUNNING:
            ended += 1

            def counted(stats: dict) -> None:
                stats["ended"]["deleted"] = stats["ended"].get("deleted", 0) + 1

            applier.count(hot, batch, instance.journey_id, instance.version, counted)
    store = applier.store
    # Whatever this batch was about to write for the person goes, with what the store holds.
    for collection, key in list(batch.writes):
        if (collection == DECISIONS and key.startswith(f"{person_id}:")) or (
            collection in (INSTANCES, APPROVALS, ENROLLMENTS)
            and batch.writes[(collection, key)].get("person_id") == person_id
        ):
            batch.delete(collection, key)
    instances = await store.find(INSTANCES, "person_id", person_id, limit=MAX_FIND_LIMIT)
    approvals = await store.find(APPROVALS, "person_id", person_id, limit=MAX_FIND_LIMIT)
    # Enroll answers: their keys are the callers' idempotency keys, which may carry personal data.
    answers = await store.find(ENROLLMENTS, "person_id", person_id, limit=MAX_FIND_LIMIT)
    # Their rows among the segments' members (the engine's write drops those of `person.indexed` too).
    members = await store.find(MEMBERS, "person_id", person_id, limit=MAX_FIND_LIMIT)
    for collection, records in (
        (INSTANCES, instances),
        (APPROVALS, approvals),
        (ENROLLMENTS, answers),
        (MEMBERS, members),
    ):
        for record in records:
            batch.delete(collection, record.key)
    decisions = [record.key async for record in store.scan_all(DECISIONS, prefix=f"{person_id}:")]
    for key in decisions:
        batch.delete(DECISIONS, key)
    # The person starts again from nothing: an event of theirs in flight makes a new, empty view. Their rows of
    # every segment the record held are dropped by key with the record (`keep_members`), besides those found
    # above: a row `index_members` writes after that read is gone with them.
    person.indexed = person.indexed | frozenset(person.segments)
    person.fields.clear()
    person.segments.clear()
    person.state = PersonState(person_id)
    person.live.clear()
    person.changed.clear()
    person.entered.clear()
    person.wake = None
    person.slots.clear()
    person.ids.clear()
    person.merged_from.clear()
    person.merged_into = ""
    person.dirty = False
    person.forgotten = True
    batch.delete(PERSONS, person_id)
    batch.put(TOMBSTONES, person_id, {"at": now, "request_id": request_id})
    batch.put(
        FORGOTTEN,
        forgotten_key(request_id, person_id),
        {"at": now, "instances_ended": ended, "instances": len(instances), "decisions": len(decisions)},
    )
    log.info("person forgotten", extra={"request_id": request_id, "instances_ended": ended})


class PrivacyHandler:
    """The consumer's half (see the module docstring)."""

    def __init__(
        self,
        bus: Bus,
        store: Store,
        *,
        partitions: int,
        engine: PartitionedEngine | None = None,
        inbox: InboxChannel | None = None,
        answer_timeout: float = 60.0,
    ) -> None:
        self.bus = bus
        self.store = store
        self.partitions = partitions
        self.engine = engine
        self.inbox = inbox
        self.answer_timeout = answer_timeout

    async def handle(self, batch: Sequence[Delivery]) -> None:
        requests: list[tuple[Delivery, privacy_pb2.PrivacyDeleted]] = []
        for delivery in batch:
            try:
                request = privacy_pb2.PrivacyDeleted.FromString(delivery.data)
            except DecodeError as exc:
                delivery.reject("invalid_privacy_request", f"not a cdp.privacy.v1.PrivacyDeleted: {exc}")
                continue
            if not request.person_id or not request.request_id:
                delivery.reject("invalid_privacy_request", "person_id and request_id are required")
                continue
            requests.append((delivery, request))
        # Every request's markers first: the later ones of the batch wait for the earlier ones' engines.
        await self.mark([request for _, request in requests])
        for delivery, request in requests:
            if not await self.apply(request):
                delivery.retry("forget_not_applied_yet")

    async def mark(self, requests: Sequence[privacy_pb2.PrivacyDeleted]) -> None:
        """The requests' markers (`DELETED`): from now on no dispatcher sends to their persons."""
        now = time.time()
        marks = {
            person: Put(DELETED, person, {"at": now, "request_id": request.request_id})
            for request in requests
            for person in (request.person_id, *request.merged_person_ids)
        }
        if marks:
            await self.store.bulk_write(list(marks.values()))

    async def apply(self, request: privacy_pb2.PrivacyDeleted) -> bool:
        """Forget the request's persons; False when their engines have not applied it in time (retry)."""
        await self.mark([request])
        persons = list(dict.fromkeys([request.person_id, *request.merged_person_ids]))
        messages = [
            streams.command(
                partition_for(person, self.partitions),
                "forget",
                {"person_id": person, "request_id": request.request_id},
                f"forget:{request.request_id}:{person}",
            )
            for person in persons
        ]
        results = await self.bus.publisher.publish_batch(messages)
        if not all(result.ok for result in results):
            return False
        deadline = time.monotonic() + self.answer_timeout
        keys = [forgotten_key(request.request_id, person) for person in persons]
        while len(await self.store.get_many(FORGOTTEN, keys)) < len(keys):
            if time.monotonic() > deadline:
                log.warning("privacy request %s not applied by the engines yet", request.request_id)
                return False
            await asyncio.sleep(POLL)
        inbox_messages = sends = 0
        for person in persons:
            if self.inbox is not None:
                inbox_messages += await self.inbox.forget(person)
            sends += await self._delete_by_person(SENDS, person)
            await self._delete_by_person(OUTCOMES, person)
        await self._scrub_outbox()
        withdrawn = 0
        for person in persons:
            withdrawn += await self._withdraw_actions(person)
        await self.store.erase()  # the deletions are durable: leave no bytes of them in the store's files
        log.info(
            "privacy deletion applied",
            extra={
                "request_id": request.request_id,
                "persons": len(persons),
                "inbox_messages": inbox_messages,
                "sends": sends,
                "actions_withdrawn": withdrawn,
            },
        )
        return True

    async def _delete_by_person(self, collection: str, person_id: str) -> int:
        deleted = 0
        while found := await self.store.find(collection, "person_id", person_id, limit=500):
            await self.store.bulk_write([Delete(collection, record.key) for record in found])
            deleted += len(found)
        return deleted

    async def _withdraw_actions(self, person_id: str) -> int:
        """Erase the person's messages left in ACTIONS (all on their partition's subjects), each withdrawn
        first so a dispatcher holding it already sends nothing. The number withdrawn."""
        js = self.bus.js
        partition = partition_for(person_id, self.partitions)
        subject = f"{subjects.ACTIONS_PREFIX}.*.{partition}"
        withdrawn, seq = 0, 1
        while True:
            try:
                msg = await js.get_msg(subjects.ACTIONS, seq, subject=subject, next=True)
            except NotFoundError:
                return withdrawn
            assert msg.seq is not None
            seq = msg.seq + 1
            try:
                action = pb.ActionMessage.FromString(msg.data or b"")
            except DecodeError:
                continue
            if action.person_id != person_id:
                continue
            if ATTRIBUTION_HEADER not in (msg.headers or {}):  # an attribution sends nothing: none to withdraw
                record = withdrawn_record(action.channel, time.time())
                # It replaces what the record counted of the action's attempts and hand-backs.
                await self.store.bulk_write([Put(SENDS, action.action_id, record)])
            await erase_action(js, msg.seq)
            withdrawn += 1

    async def _scrub_outbox(self) -> None:
        """Delete this replica's published outbox records: they may hold the person's rendered actions.
        (A partition owned elsewhere deletes its own with its next commit.)"""
        engine = self.engine
        if engine is None:
            return
        async with engine.quiescent():
            # Quiescent: every batch applied is durable and published, so every record left is published.
            ops: list[Any] = [Delete(engine.outbox, record.key) async for record in self.store.scan_all(engine.outbox)]
            if ops:
                await self.store.bulk_write(ops)


class Deletions:
    """What a dispatcher asks before it sends (see the module docstring): the persons of the notices the
    handler has not acknowledged (`look`, before each batch, and again before a send once LOOK_EVERY has
    passed), and whether a person is marked (right before each send): `deleted`."""

    def __init__(self, store: Store, js: JetStreamContext, *, durable: str | None = None) -> None:
        self.store = store
        self.js = js
        self.durable = durable or consumer_spec().durable
        # Notices read and not yet below the consumer's acknowledgement floor: stream seq -> their persons
        # (a notice never changes), and how far the stream was read.
        self._notices: dict[int, tuple[str, ...]] = {}
        self._read_to = 0
        self._unhandled: frozenset[str] = frozenset()
        self._looked_at = -LOOK_EVERY  # monotonic time the last look began
        self._looking = asyncio.Lock()

    async def look(self) -> None:
        """Read the unhandled notices now. Unavailable when that cannot be known (nothing is to be sent)."""
        async with self._looking:
            began = time.monotonic()
            self._unhandled = await self.unhandled()
            self._looked_at = began

    async def deleted(self, person_id: str) -> bool:
        """Right before a send: whether a deletion of the person was accepted - their marker, or a notice
        the handler has not acknowledged at a look begun at most LOOK_EVERY s ago."""
        if await self.marked(person_id):
            return True
        if time.monotonic() - self._looked_at > LOOK_EVERY:
            async with self._looking:
                if time.monotonic() - self._looked_at > LOOK_EVERY:  # not looked at meanwhile
                    began = time.monotonic()
                    self._unhandled = await self.unhandled()
                    self._looked_at = began
        return person_id in self._unhandled

    async def marked(self, person_id: str) -> bool:
        return await self.store.get(DELETED, person_id) is not None

    async def unhandled(self) -> frozenset[str]:
        """The persons (merged ones too) of the notices in PRIVACY the handler has not acknowledged; none
        almost always, at the cost of one request. Unavailable when that cannot be known."""
        try:
            info = await self.js.consumer_info(subjects.PRIVACY, self.durable)
        except NotFoundError:
            return await self._without_consumer()
        except Exception as exc:
            raise Unavailable(f"privacy.deleted's progress unknown ({type(exc).__name__}); nothing is sent") from None
        floor = info.ack_floor.stream_seq or 0
        if self._read_to > (info.delivered.stream_seq or 0) + (info.num_pending or 0):
            self._notices, self._read_to = {}, 0  # the stream was made again: its sequence numbers too
        self._notices = {seq: persons for seq, persons in self._notices.items() if seq > floor}
        if not info.num_pending and not info.num_ack_pending:
            return frozenset()
        # Each notice is read once, from the floor (or where the last call stopped) to the stream's end.
        seq = max(floor, self._read_to) + 1
        while True:
            try:
                msg = await self.js.get_msg(subjects.PRIVACY, seq, subject=subjects.PRIVACY_DELETED, next=True)
            except NotFoundError:
                break
            except Exception as exc:
                raise Unavailable(f"privacy.deleted not readable ({type(exc).__name__}); nothing is sent") from None
            assert msg.seq is not None
            seq = self._read_to = msg.seq
            seq += 1
            try:
                notice = privacy_pb2.PrivacyDeleted.FromString(msg.data or b"")
            except DecodeError:
                continue  # the handler dead-letters it; it names nobody
            self._notices[msg.seq] = (notice.person_id, *notice.merged_person_ids)
            if len(self._notices) > MAX_UNHANDLED:
                raise Unavailable(f"more than {MAX_UNHANDLED} privacy deletions not handled yet; nothing is sent")
        return frozenset(person for persons in self._notices.values() for person in persons)

    async def _without_consumer(self) -> frozenset[str]:
        """No handler's consumer yet (a first start: the dispatchers start before it): fine while PRIVACY
        holds no notice, else nobody can tell which are handled."""
        try:
            stream = await self.js.stream_info(subjects.PRIVACY)
        except NotFoundError:
            return frozenset()
        except Exception as exc:
            raise Unavailable(f"privacy.deleted's progress unknown ({type(exc).__name__}); nothing is sent") from None
        if not stream.state.messages:
            return frozenset()
        raise Unavailable(f"{self.durable} does not exist yet while PRIVACY holds notices; nothing is sent")


class TombstoneSweeper(ExpirySweeper):
    """Deletes the tombstones older than `days` (see the module docstring): by then nothing that still
    reaches orchestration can be for the person. The tombstones and the dispatchers' markers (`DELETED`),
    not the `forgotten` markers: they hold counts under the request id and are what makes a redelivered
    request find its work done."""

    def __init__(
        self,
        store: Store,
        *,
        days: float,
        meter: metrics.Meter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        swept = (meter or metrics.get_meter("cdp.orchestration")).create_counter(
            "cdp.orchestration.tombstones.swept",
            unit="{tombstone}",
            description="privacy tombstones deleted once older than CDP_ORCHESTRATION_TOMBSTONE_DAYS",
        )
        super().__init__(store, TOMBSTONES, max_age=days * DAY, interval=SWEEP_INTERVAL, swept=swept, clock=clock)

    async def sweep(self) -> int:
        """The tombstones, then the dispatchers' markers (`DELETED`) of the same age."""
        deleted = await super().sweep()
        return deleted + await sweep_expired(self.store, DELETED, before=self.clock() - self.max_age)
