"""Channel dispatchers: `actions.<channel>.>` -> the channel's adapter, each action sent once, its outcome
reported back through the collector.

One durable consumer per channel (`orchestration-dispatch-<channel>`) hands each `ActionMessage` to the
adapter (`cdp_orchestration.channels`). A fetched batch is worked concurrently, at most `concurrency`
(CDP_ORCHESTRATION_DISPATCH_CONCURRENCY) actions in flight, so one slow provider answer does not hold up
the rest; one person's actions go one after another in the order they came (a reminder never overtakes
its first message, an attribution finds its send recorded). The consumer's ack wait is
CDP_ORCHESTRATION_ACK_WAIT; the batch being worked is kept from redelivery meanwhile (`in_progress` every
third of it, for up to KEEP_AT_MOST), so a long batch is not handed to another replica mid-send, and a
dispatcher that died has its batch back after the ack wait. A provider that answers with Retry-After
pauses its destination (`Channel.destination`: the provider account, or a webhook's host; `pauses.py`):
actions to it not started yet are given back with that delay instead of sent (for at most
CDP_ORCHESTRATION_DEFER_SECONDS, then they are sent anyway, so each ends with an outcome). A pause lasts at
most CDP_ORCHESTRATION_PAUSE_SECONDS (an hour), however long the provider asked; one it asked longer for
ends with one probe, the others waiting for its answer. The send is recorded in `orchestration_sends` under the action id
before the message is acknowledged, so a redelivery (a crash after the send, an acknowledgement lost)
finds the record and sends nothing. The window between the provider's answer and the record is the one
place a crash can send twice, once for each send in flight then (at most `concurrency`); adapters pass the
action id to providers that take an idempotency key (`channels` lists them), and email sends it again under
the same Message-ID.

Outcomes: accepted and rejected (for good) are final. A retryable failure (a 5xx, a timeout, a refused
connection, an adapter that raised) is one attempt; the action gets `max_attempts`
(CDP_ORCHESTRATION_MAX_ATTEMPTS, 5) of them, each after the dispatcher's own back-off (`BACKOFF`, by
attempts made) or the provider's Retry-After (at most CDP_ORCHESTRATION_PAUSE_SECONDS). The dispatcher counts them itself, in the action's send
record (`orchestration_sends`, status "pending", with the stream position of its message): an attempt
after the first is recorded before it is made, so a crash between attempts or during one never resets
the count (the first attempt is recorded only once it failed, so a send that goes through costs one
write; a first delivery that left no trace counts as made). At the bound the failure is final ("failed",
`dead_lettered`, with the attempts) and the message goes to the dead-letter stream with the reason
(`dlq.ACTIONS.orchestration-dispatch-<channel>`, `cdpctl dlq`; metric
`cdp.orchestration.dispatch.dead_lettered`), whatever JetStream's delivery count says: the consumer's
`DELIVERY_CAP` is only a backstop. A replay of that dead letter (a new stream position) starts a new round
of attempts; a redelivery of the dead-lettered message itself sends nothing. A provider asking for time -
a 429 (`Outcome.later`), or its destination paused by an earlier Retry-After - is not an attempt: the
action is handed back for that long, at most CDP_ORCHESTRATION_PAUSE_SECONDS (hand-backs counted in the
record as `deferrals`). What bounds a
receiver that keeps asking is time: CDP_ORCHESTRATION_DEFER_SECONDS (a day by default) after the action
was published, a 429 is final ("failed", ``http_429``, dead-lettered) and a paused destination is sent to
anyway.

A provider that does not answer (a wedged relay that accepts connections and says nothing: outcome reason
``timeout``) is not waited on for every attempt: each destination has a breaker (`breaker.py`), open after
CDP_ORCHESTRATION_BREAKER_TIMEOUTS (3) timeouts in a row, probed at most every
CDP_ORCHESTRATION_BREAKER_PROBE_SECONDS (5). While it is open, every attempt but a probe is counted as made
and failed (``timeout``) without sending it: handed back with its back-off as after a real timeout, so the
actions go through their attempts and the dead letter on the documented schedule (the send record counts
these in `skipped`, and a dead letter's detail says "n not made"). Nothing is acknowledged that was not
sent: a replay of the dead letter once the provider is back sends it.

A store failing on one action's record (reading it, counting an attempt, recording the outcome) costs
that action one attempt, counted by the dispatcher in memory since the record is what fails, and at
`max_attempts` it is dead-lettered (``store_fault``); the rest of its batch goes on. A send the provider
took whose outcome the store did not record is remembered, so its redeliveries record it and send nothing
(a dead letter says "sent ... but not recorded"). Only a store down for the whole batch (every action
`Unavailable`, none through) hands the batch back to the kit, at no attempt's cost.

A final outcome becomes an outcome event (`channels.outcomes`: "Message Sent", "Message Bounced", "Message
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
not only marked deleted); a dead-lettered one once its copy is in the dead-letter stream. A message
still being retried stays until its last delivery. An outcome the collector refuses is posted again on
redelivery, `max_attempts` times, then the message is dead-lettered (``outcome_not_reported``; a replay
posts it). A send record
that says "withdrawn" (`privacy.py`: the person was deleted before their action went out) makes the
dispatcher send nothing, and so does a person's deletion accepted before the send (`privacy.Deletions`:
the notices the privacy handler has not acknowledged, read before each batch and again while it is worked,
and its marker, looked for right before each send). The person's consent is asked again right before each
attempt, as the arbiter asked it (`consent.py`: one read of the person's record): a purpose or channel
consent withdrawn since the action was let through ends it unsent, its record "withdrawn" with reason
``consent_withdrawn`` (and `by`: "purpose:<P>" or "channel:<C>"), nothing posted, nothing dead-lettered,
the message erased (metric `cdp.orchestration.dispatch.withdrawn`). Logs name the action id, channel and
reason code, never an address or content.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError, ServerError
from opentelemetry import metrics

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.bus import Bus, ConsumerRunner, ConsumerSpec, Delivery, subjects
from cdp_kit.errors import Unavailable
from cdp_kit.storage import Put, Store
from cdp_orchestration.actions import ATTRIBUTION_HEADER
from cdp_orchestration.breaker import BREAKER_AFTER, PROBE, PROBE_EVERY, SKIP, TIMEOUT, Breakers
from cdp_orchestration.channels import Action, Channel, Outcome
from cdp_orchestration.channels.outcomes import Feedback, attributed, feedback_from_outcome, track_event
from cdp_orchestration.channels.wire import action_from_message
from cdp_orchestration.pauses import PAUSE_AT_MOST, Pauses
from cdp_orchestration.state import OUTCOMES, PERSONS, SENDS

if TYPE_CHECKING:
    from cdp_orchestration.consent import SendConsent
    from cdp_orchestration.privacy import Deletions

log = logging.getLogger("cdp.orchestration.dispatch")

MAX_ATTEMPTS = 5  # real attempts an action gets before it is dead-lettered (CDP_ORCHESTRATION_MAX_ATTEMPTS)
# Seconds before the next attempt after the n-th failed one (the last repeats), when the provider named none.
BACKOFF = (0.5, 2.0, 10.0, 30.0, 60.0)
# JetStream's limit on the dispatch consumer's deliveries: only a backstop. The attempts are counted here,
# and the hand-backs for a provider asking for time (which use none of them) are bounded by time.
DELIVERY_CAP = 1_000
DEFER_FOR = 86_400.0  # seconds after publication an action may keep waiting for a provider (the default)
PENDING = "pending"  # a send record's status while the action has attempts or hand-backs behind it, no outcome
DEFAULT_CONCURRENCY = 16  # actions of one channel in flight at once (CDP_ORCHESTRATION_DISPATCH_CONCURRENCY)
# Actions with store faults (and sends whose outcome the store did not record) one dispatcher remembers.
MAX_REMEMBERED = 10_000
# Seconds a batch being worked is kept from redelivery (`Dispatcher._keep`): far above what its sends can take
# (adapter timeouts, the breaker), so only a stuck one runs past it.
KEEP_AT_MOST = 600.0
NO_MESSAGE = 10057  # JetStream's error code for a message that is not (or no longer) in the stream
CONSENT_WITHDRAWN = "consent_withdrawn"  # a send record's reason: the consent was withdrawn before it went out

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


@dataclass(frozen=True)
class Tries:
    """What an action has used so far: attempts made (or begun), hand-backs, the last failure's reason,
    and of the attempts those counted without a send (`skipped`: the destination's breaker was open)."""

    attempts: int = 0
    deferrals: int = 0
    reason: str = ""
    skipped: int = 0

    @classmethod
    def of(cls, stored: dict[str, Any] | None, delivery: Delivery) -> Tries:
        if stored is not None and stored["status"] == PENDING:
            return cls(stored["attempts"], stored["deferrals"], stored["reason"], stored.get("skipped", 0))
        # Nothing recorded yet. The first attempt is recorded only once it failed: a delivery before this
        # one that left no trace may have died while the provider had it, so it counts as made.
        return cls(attempts=1 if delivery.num_delivered > 1 else 0)


class Dispatcher:
    """Works one fetched batch at a time, its actions concurrently (at most `concurrency` in flight),
    each person's in the order they came; then posts the batch's outcomes in one collector call and
    erases (or dead-letters) what is done. `handle` returns (and the kit settles) only after that."""

    def __init__(
        self,
        channel: Channel,
        store: Store,
        report: Report | None = None,
        *,
        js: JetStreamContext | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        defer_for: float = DEFER_FOR,
        max_attempts: int = MAX_ATTEMPTS,
        backoff: Sequence[float] = BACKOFF,
        meter: metrics.Meter | None = None,
        pause_at_most: float = PAUSE_AT_MOST,
        deletions: Deletions | None = None,
        breaker_after: int = BREAKER_AFTER,
        probe_every: float = PROBE_EVERY,
        consent: SendConsent | None = None,
        ack_wait: float | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency={concurrency} is invalid: must be at least 1")
        if not 1 <= max_attempts < DELIVERY_CAP // 2:
            raise ValueError(f"max_attempts={max_attempts} is invalid: must be from 1 to {DELIVERY_CAP // 2 - 1}")
        self.channel = channel
        self.defer_for = defer_for
        self.max_attempts = max_attempts
        self.backoff = tuple(backoff)
        self.breakers = Breakers(channel, after=breaker_after, probe_every=probe_every)  # one per destination
        self.store = store
        self.report = report
        self.js = js  # where the action messages are erased once done with (None: they stay)
        self.deletions = deletions  # whom a privacy deletion was accepted for (None: not asked)
        self.consent = consent  # the person's consent, asked again before each attempt (None: not asked)
        # The consumer's ack wait: a batch being worked is kept from redelivery (`_keep`); None: not kept.
        self.ack_wait = ack_wait
        # Publishes a dead letter before the message is erased (the consumer's; None: the kit's own, at settle).
        self.runner: ConsumerRunner | None = None
        self._slots = asyncio.Semaphore(concurrency)
        # The destinations whose provider asked for time (Retry-After), each for at most `pause_at_most`.
        self.pauses = Pauses(channel.name, at_most=pause_at_most, probe_every=probe_every)
        # Action id -> store faults on its record so far (`_store_fault`); forgotten once it goes through.
        self._store_faults: dict[str, int] = {}
        # Action id -> the final outcome of a send whose record is not written yet, and the attempts it took.
        self._unrecorded: dict[str, tuple[Outcome, Tries]] = {}
        meter = meter or metrics.get_meter("cdp.orchestration")
        self.m_retries = meter.create_counter(
            "cdp.orchestration.dispatch.retries",
            unit="{action}",
            description="actions handed back to be tried again, by kind: attempt (a failed one), deferral "
            "(the provider asked for time), report (the collector refused the outcome)",
        )
        self.m_dead_lettered = meter.create_counter(
            "cdp.orchestration.dispatch.dead_lettered",
            unit="{action}",
            description="actions given up on and dead-lettered, by channel and reason",
        )
        self.m_withdrawn = meter.create_counter(
            "cdp.orchestration.dispatch.withdrawn",
            unit="{action}",
            description="actions ended unsent at send time, by channel and reason (consent_withdrawn)",
        )

    async def handle(self, batch: Sequence[Delivery]) -> None:
        keeping = asyncio.create_task(self._keep(batch)) if self.ack_wait else None
        try:
            await self._handle(batch)
        finally:
            if keeping is not None:
                keeping.cancel()
                await asyncio.gather(keeping, return_exceptions=True)

    async def _keep(self, batch: Sequence[Delivery]) -> None:
        """Tell JetStream the batch is still being worked, every third of the ack wait: a batch may take
        longer than CDP_ORCHESTRATION_ACK_WAIT (its slowest sends one after another, each up to its
        adapter's timeout), and a message redelivered meanwhile - to another replica - could be sent twice.
        The ack wait then bounds how soon a dead dispatcher's batch comes back, not how long a send takes.
        For KEEP_AT_MOST seconds: a batch still not done then is stuck, and JetStream may redeliver it."""
        assert self.ack_wait is not None
        deadline = time.monotonic() + KEEP_AT_MOST
        while time.monotonic() < deadline:
            await asyncio.sleep(self.ack_wait / 3)
            for delivery in batch:
                try:
                    await delivery.msg.in_progress()
                except Exception:  # the bus is down, or the message is settled or erased already
                    pass

    async def _handle(self, batch: Sequence[Delivery]) -> None:
        if self.deletions is not None:
            # Unavailable when it cannot be known: the kit hands the batch back and nothing is sent.
            await self.deletions.look()
        by_person: dict[str, list[tuple[Delivery, Action]]] = {}
        for delivery in batch:
            try:
                action = action_from_message(pb.ActionMessage.FromString(delivery.data))
            except Exception as exc:
                delivery.reject("invalid_action", f"not an ActionMessage: {type(exc).__name__}")
                continue
            by_person.setdefault(action.person_id, []).append((delivery, action))
        done: list[tuple[Delivery, str, dict[str, Any]]] = []  # recorded, to report (when owed) and erase
        faults: list[tuple[Delivery, Action, Exception]] = []  # the store failed on the action's record
        results = await asyncio.gather(
            *(self._person(actions, done, faults) for actions in by_person.values()), return_exceptions=True
        )
        await self._report_and_erase(done)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        worked = sum(results)  # actions whose store work went through
        if faults and not worked and all(isinstance(exc, Unavailable) for _, _, exc in faults):
            # The store is down, not one record: the kit hands the whole batch back (its back-off) and no
            # action pays for the outage; what was recorded is found on redelivery.
            raise faults[0][2]
        for delivery, action, exc in faults:
            await self._store_fault(delivery, action, exc)

    async def _person(
        self,
        actions: list[tuple[Delivery, Action]],
        done: list[tuple[Delivery, str, dict[str, Any]]],
        faults: list[tuple[Delivery, Action, Exception]],
    ) -> int:
        """One person's actions, one after another: a later message waits for the earlier one's send and
        record (a reminder never overtakes its first message; an attribution finds its send recorded).
        One the store fails on is set aside (`_store_fault`) and the next goes on, as after a failed
        attempt. How many went through the store."""
        worked = 0
        for delivery, action in actions:
            async with self._slots:
                try:
                    record = await self._one(delivery, action)
                except Exception as exc:
                    faults.append((delivery, action, exc))
                    continue
            worked += 1
            self._store_faults.pop(action.action_id, None)
            if record is not None:
                done.append((delivery, action.action_id, record))
        return worked

    async def _store_fault(self, delivery: Delivery, action: Action, exc: Exception) -> None:
        """The store failed on this action's record while it was being worked (read, attempt or outcome not
        recorded): that costs it one attempt, counted here - the record is what failed - and at
        `max_attempts` it is dead-lettered (`store_fault`) rather than redelivered up to DELIVERY_CAP times
        with its batch. The count is this process's: a restart starts it again (the cap still bounds it)."""
        if len(self._store_faults) >= MAX_REMEMBERED:  # actions gone some other way: start the counts again
            self._store_faults.clear()
            self._unrecorded.clear()
        faults = self._store_faults[action.action_id] = self._store_faults.get(action.action_id, 0) + 1
        log.warning(
            "the store failed on action %s on %s: %s (attempt %d of %d)",
            action.action_id,
            self.channel.name,
            type(exc).__name__,
            faults,
            self.max_attempts,
        )
        if faults < self.max_attempts:
            delivery.retry("store_fault", self._backoff(faults))
            self.m_retries.add(1, {"channel": self.channel.name, "kind": "attempt"})
            return
        del self._store_faults[action.action_id]
        detail = f"{faults} attempts; the store failed on the action's record each time, the last: {type(exc).__name__}"
        sent = self._unrecorded.pop(action.action_id, None)
        if sent is not None:  # a replay of the dead letter sends it again: say so
            detail += f"; sent ({sent[0].status}) but not recorded"
        async with self._slots:
            await self._dead_letter(delivery, "store_fault", detail)

    async def _one(self, delivery: Delivery, action: Action) -> dict[str, Any] | None:
        """Send one action (unless its record says it went already, was given up on, or was withdrawn) and
        record it. The record, or None when the delivery was given back to be tried again."""
        sent = self._unrecorded.get(action.action_id)
        if sent is not None and ATTRIBUTION_HEADER not in delivery.headers:
            # An earlier delivery sent it and the store failed to record the outcome: record it, send nothing.
            record = await self._final(delivery, action, *sent)
            self._unrecorded.pop(action.action_id, None)
            return record
        found = await self.store.get(SENDS, action.action_id)
        if ATTRIBUTION_HEADER in delivery.headers:
            return await self._attribute(delivery, action, found)
        stored = found.doc if found is not None else None
        if stored is not None and stored["status"] != PENDING and not _replayed(stored, delivery):
            # Sent already (a redelivery, with perhaps its report still owed), given up on, or withdrawn.
            return stored
        tries = Tries.of(stored, delivery)
        if tries.attempts >= self.max_attempts:
            # The last attempt was begun and its answer lost (the process died during it): that was all.
            failure = Outcome.failed(tries.reason or "no_answer", retryable=True)
            return await self._final(delivery, action, failure, tries, dead_lettered=True)
        destination = self.channel.destination(action)
        wait, probe = self.pauses.gate(destination)
        # The provider asked for quiet (Retry-After), or the probe after its pause is out: do not add to its
        # load. Past the time bound the send is tried anyway, so the action ends with an outcome rather than
        # unrecorded.
        if wait > 0 and await self._defer(delivery, action, tries, "provider_paused", wait):
            return None
        try:
            return await self._attempt(delivery, action, stored, tries, destination, probe)
        finally:
            if probe:  # sent or not: the next action is the probe unless its answer ended or renewed the pause
                self.pauses.probed(destination)

    async def _attempt(
        self,
        delivery: Delivery,
        action: Action,
        stored: dict[str, Any] | None,
        tries: Tries,
        destination: str,
        probe: bool,
    ) -> dict[str, Any] | None:
        """One attempt of the action to `destination`, not paused (or sent anyway, its wait bound over), or
        the probe after a pause (`probe`): unless the person was deleted, their consent withdrawn, or the
        destination's breaker skips it. The record, or None when the delivery was given back."""
        if self.deletions is not None and await self.deletions.deleted(action.person_id):
            # The person's deletion was accepted: withdrawn (`privacy.py`), as its handler would have.
            record = withdrawn_record(self.channel.name, time.time())
            await self.store.bulk_write([Put(SENDS, action.action_id, record)])
            log.info("action %s on %s withdrawn: person deleted", action.action_id, self.channel.name)
            return record
        if self.consent is not None:
            # Asked again before each attempt (one read of the person's record): a consent withdrawn since the
            # arbiter let the action through, or since its last attempt, ends it here, unsent.
            refused = await self.consent.refused(action)
            if refused is not None:
                return await self._consent_withdrawn(delivery, action, tries, *refused)
        gate, breaker = self.breakers.gate(destination, action)
        if gate == SKIP:  # its breaker is open, and this attempt is not its probe
            return await self._unanswered(delivery, action, tries)
        try:
            if stored is not None or delivery.num_delivered > 1:
                # Tried before: this attempt is counted before it is made, so dying during it cannot undo it.
                await self._pending(delivery, action, replace(tries, attempts=tries.attempts + 1))
            outcome = await self._send(action)
        finally:
            if gate == PROBE and breaker is not None:
                self.breakers.probed(breaker)
        self.breakers.heard(destination, outcome)
        # The provider's Retry-After pauses the destination, capped (`pauses.py`); the wait granted is this
        # action's too. Any other answer to the probe ends a pause the cap cut short.
        granted = self.pauses.heard(destination, outcome, probe=probe)
        if outcome.ok or not outcome.retryable:
            # Kept until its record is written: a store failing on that record must not make it go out again.
            sent = self._unrecorded[action.action_id] = (outcome, replace(tries, attempts=tries.attempts + 1))
            record = await self._final(delivery, action, *sent)
            self._unrecorded.pop(action.action_id, None)
            return record
        if outcome.deferred:
            if await self._defer(delivery, action, tries, outcome.reason, granted):
                return None
            # Asked for time for longer than the bound: given up on, with the hand-backs it had.
            return await self._final(delivery, action, outcome, tries, dead_lettered=True)
        tries = Tries(tries.attempts + 1, tries.deferrals, outcome.reason, tries.skipped)
        if tries.attempts >= self.max_attempts:
            return await self._final(delivery, action, outcome, tries, dead_lettered=True)
        await self._pending(delivery, action, tries)
        backoff = self._backoff(tries.attempts)
        delay = granted if granted is not None else backoff
        if delay > backoff:
            # The provider's Retry-After (capped), up to the wait bound (`_bounded`); past it, the usual back-off.
            delay = max(backoff, self._bounded(delivery, delay))
        delivery.retry(outcome.reason, delay)
        self.m_retries.add(1, {"channel": self.channel.name, "kind": "attempt"})
        log.warning(
            "action %s on %s not sent yet: %s (attempt %d of %d)",
            action.action_id,
            self.channel.name,
            outcome.reason,
            tries.attempts,
            self.max_attempts,
        )
        return None

    async def _consent_withdrawn(
        self, delivery: Delivery, action: Action, tries: Tries, kind: str, name: str
    ) -> dict[str, Any]:
        """The person's consent no longer allows the action (`consent.py`): it ends unsent, its record
        "withdrawn" (reason ``consent_withdrawn``, `by` the purpose or channel), no outcome posted and
        nothing dead-lettered (a dead letter would keep the rendered message); the message is erased."""
        record = {
            "channel": self.channel.name, "person_id": action.person_id, "status": "withdrawn",
            "reason": CONSENT_WITHDRAWN, "by": f"{kind}:{name}", "at": time.time(), "reported": "withdrawn",
            "attempts": tries.attempts, "deferrals": tries.deferrals, "skipped": tries.skipped,
            "seq": delivery.stream_seq, "delivered": delivery.num_delivered, "dead_lettered": False,
        }  # fmt: skip
        await self.store.bulk_write([Put(SENDS, action.action_id, record)])
        self.m_withdrawn.add(1, {"channel": self.channel.name, "reason": CONSENT_WITHDRAWN})
        log.info(
            "action %s on %s withdrawn: no consent for %s %s any more", action.action_id, self.channel.name, kind, name
        )
        return record

    async def _unanswered(self, delivery: Delivery, action: Action, tries: Tries) -> dict[str, Any] | None:
        """The destination's breaker is open: this attempt is counted as made and timed out, without
        waiting on the provider, and the action is handed back with its back-off (or, at the bound,
        dead-lettered), as after a real timeout."""
        tries = Tries(tries.attempts + 1, tries.deferrals, TIMEOUT, tries.skipped + 1)
        failure = Outcome.failed(TIMEOUT, retryable=True)
        if tries.attempts >= self.max_attempts:
            return await self._final(delivery, action, failure, tries, dead_lettered=True)
        await self._pending(delivery, action, tries)
        delivery.retry(TIMEOUT, self._backoff(tries.attempts))
        self.m_retries.add(1, {"channel": self.channel.name, "kind": "attempt"})
        log.debug(
            "action %s on %s not sent: its provider does not answer (attempt %d of %d)",
            action.action_id,
            self.channel.name,
            tries.attempts,
            self.max_attempts,
        )
        return None

    async def _send(self, action: Action) -> Outcome:
        try:
            return await self.channel.send(action)
        except Exception as exc:
            # Adapters answer with an outcome (`channels.base`); one that raises anyway has failed this
            # attempt like a provider fault, and uses one - never an unbounded run of redeliveries.
            log.warning("channel %s raised on action %s: %s", self.channel.name, action.action_id, type(exc).__name__)
            return Outcome.failed(f"error_{type(exc).__name__}", retryable=True)

    def _backoff(self, failures: int) -> float:
        return self.backoff[min(max(failures, 1), len(self.backoff)) - 1]

    async def _pending(self, delivery: Delivery, action: Action, tries: Tries) -> None:
        """Record what the action has used so far (no outcome yet; no content, no address)."""
        record = {
            "channel": self.channel.name,
            "person_id": action.person_id,
            "status": PENDING,
            "reason": tries.reason,
            "at": time.time(),
            "seq": delivery.stream_seq,
            "attempts": tries.attempts,
            "deferrals": tries.deferrals,
            "skipped": tries.skipped,
        }
        await self.store.bulk_write([Put(SENDS, action.action_id, record)])

    async def _final(
        self, delivery: Delivery, action: Action, outcome: Outcome, tries: Tries, *, dead_lettered: bool = False
    ) -> dict[str, Any]:
        if self.deletions is not None and await self.deletions.deleted(action.person_id):
            # The person's deletion was accepted while the provider had the message (a privacy trial's relay
            # answered 7 s after the deletion was confirmed). What went out cannot be recalled; what is kept
            # of it must hold nothing of theirs, and its outcome event, posted under their user id, would
            # make a new person of them: the record keeps no person, address or event, and nothing is posted
            # or dead-lettered (a dead letter would keep the rendered message).
            record = {
                "channel": self.channel.name, "status": outcome.status, "reason": outcome.reason,
                "at": time.time(), "reported": "person_deleted", "attempts": tries.attempts,
                "seq": delivery.stream_seq, "delivered": delivery.num_delivered, "dead_lettered": False,
            }  # fmt: skip
            await self.store.bulk_write([Put(SENDS, action.action_id, record)])
            log.info(
                "action %s on %s ended after its person's deletion: outcome not reported",
                action.action_id,
                self.channel.name,
            )
            return record
        record = self._record(action, outcome)
        record.update(
            attempts=tries.attempts,
            deferrals=tries.deferrals,
            skipped=tries.skipped,
            seq=delivery.stream_seq,
            delivered=delivery.num_delivered,
            dead_lettered=dead_lettered,
        )
        if not attributed(record["event"]):
            log.warning("outcome of action %s not reported: the person has no known identifier", action.action_id)
            record["reported"] = "unattributed"
        await self.store.bulk_write([Put(SENDS, action.action_id, record)])
        if not outcome.ok:
            log.warning(
                "action %s on %s failed for good: %s (%d attempts)",
                action.action_id,
                self.channel.name,
                outcome.reason,
                tries.attempts,
            )
        return record

    @staticmethod
    def _age(delivery: Delivery) -> float:
        """Seconds since the action was published."""
        return time.time() - delivery.msg.metadata.timestamp.timestamp()

    def _bounded(self, delivery: Delivery, wait: float) -> float:
        """`wait`, cut to end when the action's wait bound does (CDP_ORCHESTRATION_DEFER_SECONDS after it was
        published, which settings keep below the ACTIONS stream's retention). A provider's Retry-After (four
        months, say) was handed to JetStream as it came: the message expired before its redelivery, and
        the action was left with no outcome, no dead letter and a `pending` send record for ever."""
        return max(0.0, min(wait, self.defer_for - self._age(delivery)))

    async def _defer(self, delivery: Delivery, action: Action, tries: Tries, reason: str, wait: float | None) -> bool:
        """Hand the action back for `wait` seconds (None: the back-off) without using one of its attempts -
        the provider asked for time. False once CDP_ORCHESTRATION_DEFER_SECONDS have passed since it was
        published, or when JetStream's own delivery limit would come first."""
        if self._age(delivery) >= self.defer_for or delivery.num_delivered >= DELIVERY_CAP - self.max_attempts:
            return False
        tries = replace(tries, deferrals=tries.deferrals + 1)
        await self._pending(delivery, action, tries)
        delivery.retry(reason, self._bounded(delivery, wait if wait is not None else self._backoff(tries.deferrals)))
        self.m_retries.add(1, {"channel": self.channel.name, "kind": "deferral"})
        log.warning("action %s on %s handed back: %s", action.action_id, self.channel.name, reason)
        return True

    async def _report_and_erase(self, done: list[tuple[Delivery, str, dict[str, Any]]]) -> None:
        """Post the batch's owed outcomes in one collector call, then erase the messages, or dead-letter
        those given up on. One whose outcome the collector refused is kept for a retry that posts it
        again, up to `max_attempts` deliveries; then it is dead-lettered too."""
        refused: set[int] = set()
        owed = [item for item in done if self.report is not None and item[2]["reported"] is False]
        if owed:
            events = {action_id: record for _, action_id, record in owed}  # one per action, if delivered twice
            assert self.report is not None
            if await self.report([record["event"] for record in events.values()]):
                await self._mark_reported(
                    [Put(SENDS, action_id, {**record, "reported": True}) for action_id, record in events.items()]
                )
            else:
                refused = {id(delivery) for delivery, _, _ in owed}
        await asyncio.gather(*(self._settle(delivery, record, id(delivery) in refused) for delivery, _, record in done))

    async def _mark_reported(self, marks: list[Put]) -> None:
        """Record that the outcomes are posted. One record the store fails on must not hand the whole batch
        back (to be posted and fail again, up to DELIVERY_CAP times): each is then marked on its own, and
        one still failing stays unmarked - its event is with the collector, which drops a duplicate
        messageId should it be posted again."""
        try:
            await self.store.bulk_write(marks)
            return
        except Exception:
            pass
        for mark in marks:
            try:
                await self.store.bulk_write([mark])
            except Exception as exc:
                log.warning("outcome of action %s posted, not marked reported: %s", mark.key, type(exc).__name__)

    async def _settle(self, delivery: Delivery, record: dict[str, Any], refused: bool) -> None:
        letter = None
        if record.get("dead_lettered") and record.get("seq") == delivery.stream_seq:
            skipped = record.get("skipped", 0)
            made = f" ({skipped} not made: the provider did not answer)" if skipped else ""
            detail = (
                f"{record['attempts']} attempts{made}, {record['deferrals']} hand-backs; the last: {record['reason']}"
            )
            letter = (record["reason"], detail)
        if refused:
            reports = _reports_tried(delivery, record)
            if reports < self.max_attempts:
                delivery.retry("outcome_not_reported", self._backoff(reports))
                self.m_retries.add(1, {"channel": self.channel.name, "kind": "report"})
                return
            owed = f"the collector refused the outcome event {reports} times"
            letter = (letter[0], f"{letter[1]}; {owed}") if letter else ("outcome_not_reported", owed)
        async with self._slots:
            if letter is None:
                await self._erase(delivery)
            else:
                await self._dead_letter(delivery, *letter)

    async def _dead_letter(self, delivery: Delivery, reason: str, detail: str) -> None:
        """The message to the dead-letter stream with the reason (`cdpctl dlq`), then erased here. The kit
        publishes it again when it settles the rejection: the same message id, so the stream keeps one."""
        if self.runner is not None:
            try:
                await self.runner.publish_dead_letter(
                    data=delivery.data,
                    headers=delivery.headers,
                    subject=delivery.subject,
                    seq=delivery.stream_seq,
                    deliveries=delivery.num_delivered,
                    reason=reason,
                    detail=detail,
                )
                await self._erase(delivery)
            except Exception as exc:  # the kit tries again when it settles; the message stays till then
                log.warning("action message %d not dead-lettered yet: %s", delivery.stream_seq, type(exc).__name__)
        delivery.reject(reason, detail)
        self.m_dead_lettered.add(1, {"channel": self.channel.name, "reason": reason})

    async def _attribute(self, delivery: Delivery, action: Action, found: Any) -> dict[str, Any] | None:
        """An attribution message (`actions.py`): the person now has an identifier, so an outcome recorded
        without one goes in under it. Nothing is sent. The record to report, or None when there is none."""
        if found is None or found.doc["status"] == PENDING:
            # The send itself has no outcome yet (its message waits behind this one, or is being retried).
            if delivery.num_delivered < self.max_attempts:
                delivery.retry("send_not_recorded_yet")
            else:
                await self._erase(delivery)
            return None
        record = found.doc
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


def _replayed(stored: dict[str, Any], delivery: Delivery) -> bool:
    """A dead letter of this action replayed (`cdpctl dlq --replay`: a new stream position): a new round of
    attempts. The dead-lettered message itself, delivered again, is not one."""
    return (
        stored["status"] == "failed" and bool(stored.get("dead_lettered")) and stored.get("seq") != delivery.stream_seq
    )


def _reports_tried(delivery: Delivery, record: dict[str, Any]) -> int:
    """Deliveries of this message that tried to post its outcome: those since the outcome was recorded
    (none of them hands back for a provider), or all of an attribution's or a replay's."""
    if record.get("seq") == delivery.stream_seq:
        return delivery.num_delivered - record["delivered"] + 1
    return delivery.num_delivered


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
            # (None while the send has no outcome yet, or was withdrawn.)
            sent = send.doc.get("event") if send is not None else None
            attributes = dict(sent["properties"]) if sent is not None else {}
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
    max_attempts: int = MAX_ATTEMPTS,
    backoff: Sequence[float] = BACKOFF,
    breaker_after: int = BREAKER_AFTER,
    probe_every: float = PROBE_EVERY,
    consent: SendConsent | None = None,
    pause_at_most: float = PAUSE_AT_MOST,
) -> ConsumerRunner:
    spec = ConsumerSpec(
        stream=subjects.ACTIONS,
        durable=f"orchestration-dispatch-{channel.name}",
        filter_subjects=(subjects.actions_of(channel.name),),
        batch_size=32,
        ack_wait=ack_wait,
        max_deliver=DELIVERY_CAP,
        backoff=BACKOFF,  # the kit's, for a batch the handler raised on (the store down)
        description=f"orchestration: send {channel.name} actions",
    )
    handler = Dispatcher(
        channel,
        store,
        report,
        js=bus.js,
        concurrency=concurrency,
        defer_for=defer_for,
        max_attempts=max_attempts,
        backoff=backoff,
        meter=bus.telemetry.meter,
        deletions=_deletions(store, bus.js),
        breaker_after=breaker_after,
        probe_every=probe_every,
        consent=consent,
        ack_wait=ack_wait,
        pause_at_most=pause_at_most,
    )
    runner = bus.consumer(spec, handler.handle)
    handler.runner = runner
    return runner


def _deletions(store: Store, js: JetStreamContext) -> Deletions:
    from cdp_orchestration.privacy import Deletions  # privacy.py imports this module

    return Deletions(store, js)


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
