"""Channel dispatchers: `actions.<channel>.>` -> the channel's adapter, each action sent once, its outcome
reported back through the collector.

One durable consumer per channel (`orchestration-dispatch-<channel>`) hands each `ActionMessage` to the
adapter (`cdp_orchestration.channels`). A fetched batch is worked concurrently, at most `concurrency`
(CDP_ORCHESTRATION_DISPATCH_CONCURRENCY) actions in flight, so one slow provider answer does not hold up
the rest; one person's actions go one after another in the order they came (a reminder never overtakes
its first message, an attribution finds its send recorded). A provider that answers with Retry-After
pauses its destination (`Channel.destination`: the provider account, or a webhook's host): actions to it
not started yet are given back with that delay instead of sent (on their last delivery they are sent
anyway, so each ends with an outcome). The send is recorded in `orchestration_sends` under the action id
before the message is acknowledged, so a redelivery (a crash after the send, an acknowledgement lost)
finds the record and sends nothing. The window between the provider's answer and the record is the one
place a crash can send twice; adapters pass the action id to providers that take an idempotency key
(`channels` lists them).

Outcomes: accepted and rejected (for good) are final; a retryable failure is retried with the provider's
Retry-After or the consumer's backoff, and is final as "failed" on its last allowed attempt
(`MAX_DELIVER`). A provider asking for time - a 429 (`Outcome.later`), or its destination paused by an
earlier Retry-After - is not a failed attempt: the action is handed back for that long without using
one, the hand-backs counted in `orchestration_deferrals/<action id>` (a count, no personal data; deleted
with the outcome's record), and JetStream's own limit on deliveries (`DELIVERY_CAP`) is far above the
attempts. What bounds a receiver that keeps asking is time: CDP_ORCHESTRATION_DEFER_SECONDS (a day by
default) after the action was published, a 429 is final ("failed", ``http_429``) and a paused
destination is sent to anyway. A final
outcome becomes an outcome event (`channels.outcomes`: "Message Sent", "Message Bounced", "Message
Failed", with the action id and a deterministic messageId) posted to the collector's Segment API
(`/v1/batch`), the batch's together in one call once its sends are recorded, so it lands on the profile
and in the next model's training data. It is sent under the identifier the engine put on the action (`wire.IDENTITY_KEYS`: the person's userId, else one of their
anonymous ids), which identity resolves to the same person. An action for a person orchestration has
never seen an identifier of (enrolled through the API before any event of theirs arrived) has neither:
its outcome is recorded here only (`reported: "unattributed"`), never posted under the person id, which
identity would take for a new visitor, until the person's first identifier arrives: the engine then
publishes an attribution message for each of their recent sends (`actions.py`, header
`Cdp-Attribution`), and the dispatcher posts the recorded outcome under that identifier (sending
nothing; one that comes before its send's record waits for it), with the in-app opens recorded
unattributed for the person (`Opens.attribute`). The record says whether it was reported: a redelivery reports
what a failed report left behind, and the collector drops a duplicate messageId.

The action's message holds the person's rendered content and address, so it stays in ACTIONS no longer
than the dispatch needs it: once the outcome is recorded (and reported, when it can be), the dispatcher
deletes the message by its stream sequence, which JetStream erases (overwritten in the stream's files,
not only marked deleted). A message still being retried stays until its last delivery. A send record
that says "withdrawn" (`privacy.py`: the person was deleted before their action went out) makes the
dispatcher send nothing. Logs name the action id, channel and reason code, never an address or content.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError, ServerError

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.bus import Bus, ConsumerRunner, ConsumerSpec, Delivery, subjects
from cdp_kit.storage import Delete, Put, Store
from cdp_orchestration.actions import ATTRIBUTION_HEADER
from cdp_orchestration.channels import Action, Channel, Outcome
from cdp_orchestration.channels.outcomes import Feedback, attributed, feedback_from_outcome, track_event
from cdp_orchestration.channels.wire import action_from_message
from cdp_orchestration.state import OUTCOMES, PERSONS, SENDS

log = logging.getLogger("cdp.orchestration.dispatch")

MAX_DELIVER = 5  # attempts an action may fail (retryable) before its failure is final
# JetStream's limit on the dispatch consumer's deliveries: the attempts plus the hand-backs for a provider
# asking for time (which use none of them), bounded by time rather than by this.
DELIVERY_CAP = 1_000
DEFER_FOR = 86_400.0  # seconds after publication an action may keep waiting for a provider (the default)
DEFERRALS = "orchestration_deferrals"  # action id -> {"count"}: hand-backs that used no attempt
DEFAULT_CONCURRENCY = 16  # actions of one channel in flight at once (CDP_ORCHESTRATION_DISPATCH_CONCURRENCY)
NO_MESSAGE = 10057  # JetStream's error code for a message that is not (or no longer) in the stream

Report = Callable[[list[dict[str, Any]]], Awaitable[bool]]


class CollectorReporter:
    """Posts outcome events to the collector's Segment-compatible `/v1/batch` with the source's write key."""

    def __init__(self, url: str, write_key: str, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/") + "/v1/batch"
        # Segment's HTTP API: the write key as the Basic auth user, no password.
        self.headers = {"Authorization": "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()}
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))

    async def __call__(self, events: list[dict[str, Any]]) -> bool:
        try:
            async with self.session.post(self.url, json={"batch": events}, headers=self.headers) as response:
                if response.status < 300:
                    return True
                log.warning("outcome events not accepted by the collector: HTTP %d", response.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("outcome events not delivered to the collector: %s", type(exc).__name__)
        return False

    async def close(self) -> None:
        await self.session.close()


class Dispatcher:
    """Works one fetched batch at a time, its actions concurrently (at most `concurrency` in flight),
    each person's in the order they came; then posts the batch's outcomes in one collector call and
    erases what is done. `handle` returns (and the kit acknowledges) only after that."""

    def __init__(
        self,
        channel: Channel,
        store: Store,
        report: Report | None = None,
        *,
        js: JetStreamContext | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        defer_for: float = DEFER_FOR,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency={concurrency} is invalid: must be at least 1")
        self.channel = channel
        self.defer_for = defer_for
        self.store = store
        self.report = report
        self.js = js  # where the action messages are erased once done with (None: they stay)
        self._slots = asyncio.Semaphore(concurrency)
        # Destination (`Channel.destination`) -> monotonic time its provider asked us to wait until.
        self._paused: dict[str, float] = {}

    async def handle(self, batch: Sequence[Delivery]) -> None:
        by_person: dict[str, list[tuple[Delivery, Action]]] = {}
        for delivery in batch:
            try:
                action = action_from_message(pb.ActionMessage.FromString(delivery.data))
            except Exception as exc:
                delivery.reject("invalid_action", f"not an ActionMessage: {type(exc).__name__}")
                continue
            by_person.setdefault(action.person_id, []).append((delivery, action))
        done: list[tuple[Delivery, str, dict[str, Any]]] = []  # recorded, to report (when owed) and erase
        results = await asyncio.gather(
            *(self._person(actions, done) for actions in by_person.values()), return_exceptions=True
        )
        await self._report_and_erase(done)
        for result in results:
            if isinstance(result, BaseException):
                # A store fault mid-batch: the kit redelivers the batch; what was recorded is found then.
                raise result

    async def _person(
        self, actions: list[tuple[Delivery, Action]], done: list[tuple[Delivery, str, dict[str, Any]]]
    ) -> None:
        """One person's actions, one after another: a later message waits for the earlier one's send and
        record (a reminder never overtakes its first message; an attribution finds its send recorded)."""
        for delivery, action in actions:
            async with self._slots:
                record = await self._one(delivery, action)
            if record is not None:
                done.append((delivery, action.action_id, record))

    async def _one(self, delivery: Delivery, action: Action) -> dict[str, Any] | None:
        """Send one action (unless its record says it went already, or was withdrawn) and record it. The
        record, or None when the delivery was given back to be retried."""
        stored = await self.store.get(SENDS, action.action_id)
        if ATTRIBUTION_HEADER in delivery.headers:
            return await self._attribute(delivery, action, stored)
        if stored is not None:
            # Sent already (a redelivery, with perhaps its report still owed), or withdrawn.
            return stored.doc
        destination = self.channel.destination(action)
        wait = self._paused.get(destination, 0.0) - time.monotonic()
        # The provider asked for quiet (Retry-After): do not add to its load. Past the time bound the send
        # is tried anyway, so the action ends with an outcome rather than unrecorded.
        if wait > 0 and await self._defer(delivery, action, "provider_paused", wait):
            return None
        outcome = await self.channel.send(action)
        if not outcome.ok and outcome.retryable and outcome.retry_after:
            until = time.monotonic() + outcome.retry_after
            self._paused[destination] = max(self._paused.get(destination, 0.0), until)
        if not outcome.ok and outcome.retryable:
            if outcome.deferred:
                handed_back = await self._defer(delivery, action, outcome.reason, outcome.retry_after)
            else:
                handed_back = await self._attempts_used(delivery, action) < MAX_DELIVER
                if handed_back:
                    delivery.retry(outcome.reason, outcome.retry_after)
            if handed_back:
                log.warning("action %s on %s not sent yet: %s", action.action_id, self.channel.name, outcome.reason)
                return None
        record = self._record(action, outcome)
        if not attributed(record["event"]):
            log.warning("outcome of action %s not reported: the person has no known identifier", action.action_id)
            record["reported"] = "unattributed"
        ops: list[Put | Delete] = [Put(SENDS, action.action_id, record)]
        if delivery.num_delivered > 1:  # it may have been handed back: its count goes with it
            ops.append(Delete(DEFERRALS, action.action_id))
        await self.store.bulk_write(ops)
        if not outcome.ok:
            log.warning("action %s on %s failed for good: %s", action.action_id, self.channel.name, outcome.reason)
        return record

    async def _defer(self, delivery: Delivery, action: Action, reason: str, wait: float | None) -> bool:
        """Hand the action back for `wait` seconds (None: the consumer's backoff) without using one of its
        attempts - the provider asked for time. False once CDP_ORCHESTRATION_DEFER_SECONDS have passed
        since it was published, or when JetStream's own delivery limit would come first."""
        age = time.time() - delivery.msg.metadata.timestamp.timestamp()
        if age >= self.defer_for or delivery.num_delivered >= DELIVERY_CAP - MAX_DELIVER:
            return False
        stored = await self.store.get(DEFERRALS, action.action_id)
        count = stored.doc["count"] if stored is not None else 0
        await self.store.bulk_write([Put(DEFERRALS, action.action_id, {"count": count + 1})])
        delivery.retry(reason, wait)
        return True

    async def _attempts_used(self, delivery: Delivery, action: Action) -> int:
        """Deliveries of this action that tried to send (or were lost to a crash), the hand-backs left out."""
        if delivery.num_delivered == 1:
            return 1
        stored = await self.store.get(DEFERRALS, action.action_id)
        return delivery.num_delivered - (stored.doc["count"] if stored is not None else 0)

    async def _report_and_erase(self, done: list[tuple[Delivery, str, dict[str, Any]]]) -> None:
        """Post the batch's owed outcomes in one collector call, then erase the messages (those whose
        outcome the collector refused are kept, for a retry that posts it again)."""
        owed = [item for item in done if self.report is not None and item[2]["reported"] is False]
        if owed:
            events = {action_id: record for _, action_id, record in owed}  # one per action, if delivered twice
            assert self.report is not None
            if await self.report([record["event"] for record in events.values()]):
                await self.store.bulk_write(
                    [Put(SENDS, action_id, {**record, "reported": True}) for action_id, record in events.items()]
                )
            else:
                for delivery, _, _ in owed:
                    delivery.retry("outcome_not_reported")
                done = [item for item in done if item[2]["reported"] is not False]
        await asyncio.gather(*(self._erase_bounded(delivery) for delivery, _, _ in done))

    async def _erase_bounded(self, delivery: Delivery) -> None:
        async with self._slots:
            await self._erase(delivery)

    async def _attribute(self, delivery: Delivery, action: Action, stored: Any) -> dict[str, Any] | None:
        """An attribution message (`actions.py`): the person now has an identifier, so an outcome recorded
        without one goes in under it. Nothing is sent. The record to report, or None when there is none."""
        if stored is None:
            # The send itself is not recorded yet (its message waits behind this one): once it is.
            if delivery.num_delivered < MAX_DELIVER:
                delivery.retry("send_not_recorded_yet")
            else:
                await self._erase(delivery)
            return None
        record = stored.doc
        # In-app opens recorded before the person had an identifier go in too.
        await Opens(self.store, self.report).attribute(
            action.person_id, user_id=action.user_id, anonymous_id=action.anonymous_id
        )
        if record["reported"] == "unattributed" and (action.user_id or action.anonymous_id):
            event = {k: v for k, v in record["event"].items() if k not in ("userId", "anonymousId")}
            if action.user_id:
                event["userId"] = action.user_id
            else:
                event["anonymousId"] = action.anonymous_id
            record = {**record, "event": event, "reported": False}
            await self.store.bulk_write([Put(SENDS, action.action_id, record)])
        return record

    async def _erase(self, delivery: Delivery) -> None:
        """Delete the action's message: its outcome is recorded, nothing needs its content any more."""
        if self.js is None:
            return
        try:
            await erase_action(self.js, delivery.stream_seq)
        except Exception as exc:  # the retention ages it out still; the send is done either way
            log.warning("action message %d not erased: %s", delivery.stream_seq, type(exc).__name__)

    def _record(self, action: Action, outcome: Outcome) -> dict[str, Any]:
        feedback = feedback_from_outcome(action, outcome, final=True)
        assert feedback is not None  # a final outcome always says something
        return {
            "channel": self.channel.name,
            "person_id": action.person_id,
            "status": outcome.status,
            "reason": outcome.reason,
            "provider_id": outcome.provider_id or "",
            "at": time.time(),
            "event": track_event(
                feedback,
                person_id=action.person_id,
                user_id=action.user_id,
                anonymous_id=action.anonymous_id,
                attributes=action.attributes,
            ),
            "reported": False,
        }


class Opens:
    """Message Opened for in-app messages a person marked read (`InboxChannel.mark_read` returns the newly
    read ones, so each is opened once). Each event is recorded in `orchestration_outcomes` before it is
    posted, under the person's identifiers (`Person.ids`, as for sends) with the journey coordinates of its
    send; one the collector refused is posted again by the next call. A person with no known
    identifier gets the record only (`reported: "unattributed"`)."""

    def __init__(self, store: Store, report: Report | None = None) -> None:
        self.store = store
        self.report = report

    async def opened(self, person_id: str, action_ids: Sequence[str], *, at: float | None = None) -> None:
        if not action_ids:
            await self.flush()  # what an earlier call could not post
            return
        stored = await self.store.get(PERSONS, person_id)
        ids = (stored.doc.get("ids") or {}) if stored is not None else {}
        sends = await self.store.get_many(SENDS, list(action_ids))
        opened_at = datetime.fromtimestamp(at if at is not None else time.time(), UTC)
        writes = []
        for action_id in action_ids:
            send = sends.get(action_id)
            # The journey coordinates its send reported (what the outcome itself says is set again below).
            attributes = dict(send.doc["event"]["properties"]) if send is not None else {}
            event = track_event(
                Feedback(action_id, "opened", "inapp", at=opened_at),
                person_id=person_id,
                user_id=ids.get("user_id"),
                anonymous_id=ids.get("anonymous_id"),
                attributes={k: v for k, v in attributes.items() if k not in ("provider_id", "reason")},
            )
            reported: bool | str = False if attributed(event) else "unattributed"
            writes.append(
                Put(OUTCOMES, event["messageId"], {"person_id": person_id, "event": event, "reported": reported})
            )
        await self.store.bulk_write(writes)
        await self.flush()

    async def attribute(self, person_id: str, *, user_id: str | None, anonymous_id: str | None) -> None:
        """The person has an identifier now: their opens recorded without one go in under it."""
        if not (user_id or anonymous_id):
            return
        found = await self.store.find(OUTCOMES, "person_id", person_id, limit=500)
        writes = []
        for record in found:
            if record.doc["reported"] != "unattributed":
                continue
            event = {k: v for k, v in record.doc["event"].items() if k not in ("userId", "anonymousId")}
            event["userId" if user_id else "anonymousId"] = user_id or anonymous_id
            writes.append(Put(OUTCOMES, record.key, {**record.doc, "event": event, "reported": False}))
        if writes:
            await self.store.bulk_write(writes)
            await self.flush()

    async def flush(self) -> None:
        """Post the recorded outcome events the collector has not taken yet."""
        if self.report is None:
            return  # no collector configured: recorded here only
        pending = await self.store.find(OUTCOMES, "reported", False, limit=500)
        if pending and await self.report([record.doc["event"] for record in pending]):
            await self.store.bulk_write([Put(OUTCOMES, r.key, {**r.doc, "reported": True}) for r in pending])


def dispatcher(
    bus: Bus,
    store: Store,
    channel: Channel,
    *,
    report: Report | None = None,
    ack_wait: float = 60.0,
    concurrency: int = DEFAULT_CONCURRENCY,
    defer_for: float = DEFER_FOR,
) -> ConsumerRunner:
    spec = ConsumerSpec(
        stream=subjects.ACTIONS,
        durable=f"orchestration-dispatch-{channel.name}",
        filter_subjects=(subjects.actions_of(channel.name),),
        batch_size=32,
        ack_wait=ack_wait,
        max_deliver=DELIVERY_CAP,
        backoff=(0.5, 2.0, 10.0, 30.0, 60.0),
        description=f"orchestration: send {channel.name} actions",
    )
    handler = Dispatcher(channel, store, report, js=bus.js, concurrency=concurrency, defer_for=defer_for).handle
    return bus.consumer(spec, handler)


async def erase_action(js: JetStreamContext, seq: int) -> None:
    """Delete one ACTIONS message; JetStream overwrites its bytes (a delete without `no_erase`). One gone
    already is fine."""
    try:
        await js.delete_msg(subjects.ACTIONS, seq)
    except (NotFoundError, ServerError) as exc:
        if getattr(exc, "err_code", None) != NO_MESSAGE and not isinstance(exc, NotFoundError):
            raise


def withdrawn_record(channel: str, at: float) -> dict[str, Any]:
    """The send record of an action withdrawn before it went out (no person's data: it outlives them)."""
    return {"channel": channel, "status": "withdrawn", "reason": "person_deleted", "at": at, "reported": "withdrawn"}
