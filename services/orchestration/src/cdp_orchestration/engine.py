"""Orchestration on the kit's partitioned engine: `orchestration.in.<p>` -> journeys, the arbiter, timers, actions.

One engine per person partition applies everything about a person in stream order (`streams` says what
reaches `orchestration.in.<p>`): resolved events, segment and profile changes, fired timers and the API's
commands (and the engines' own: `forget` for a privacy deletion, `privacy.py`; `handover` / `adopt` when a
person is merged into another, `merges.py`). For each, `OrchestrationLogic.apply` loads the person (their
view, their arbiter state, their live instances), feeds the domain (`instance.step`, `arbiter.decide` / `release` / `approve` / `reject` /
`withdraw` / `observe`, `entry.admit`), and returns `Effects`:

- writes: the person record, each changed instance, the decisions appended to the person's history,
  approvals, experiment / end counts, Enroll answers;
- messages (published only once those writes are durable, from the engine's outbox): timer schedules
  and cancellations (`streams.schedule` / `cancel`, message id = timer id) and `actions.<channel>.<p>`
  (message id = action id).

Invariants:
- Time is the input message's JetStream timestamp (plus `clock_offset`, a test knob): a batch applied
  again after a crash sees the same time, so the domain gives the same ids and decisions and every
  message it publishes is a JetStream duplicate of the first attempt (the engine skips positions at or
  below its checkpoint anyway; this covers the outbox being published twice).
- The person record lists the instances that can still react (running, or ended and still watching their
  goal), so a stimulus never scans the store. Ended instances leave the list; their records stay.
- One wake timer per person at `arbiter.next_wake(state)` (held actions due, approvals expiring): when
  it fires, `release`. A timer the person or instance no longer expects changes nothing.
- Hot state is a bounded cache per partition (`hot_persons`): persons beyond it are dropped least
  recently used and read back from the store. The engine runs with one batch in flight, so whatever is
  dropped is durable already; a failed commit drops the partition's cache (`recover`).
- Logs name ids and kinds, never profile values.

Metrics: `cdp.orchestration.decisions` (by kind), `cdp.orchestration.actions` (published, by channel),
`cdp.orchestration.entries` (instances started, by journey), `cdp.orchestration.timer.lateness` (ms from
a timer's due time to the server storing its fire: what message schedules cost under load); the engine's
own per-stage metrics come from the kit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import orjson
from opentelemetry import metrics

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.bus import Delivery, OutMessage, subjects
from cdp_kit.engine import Effects
from cdp_kit.storage import Store
from cdp_kit.telemetry import LATENCY_BUCKETS_MS
from cdp_kit.timestamps import from_seconds
from cdp_orchestration import streams
from cdp_orchestration.channels.wire import ANONYMOUS_ID, USER_ID
from cdp_orchestration.domain import arbiter, entry
from cdp_orchestration.domain.arbiter import Decision, Kind, ProposedAction, Ruling
from cdp_orchestration.domain.instance import (
    ActionOutcome,
    Assigned,
    CancelTimer,
    Command,
    End,
    Enter,
    EventArrived,
    ExitRequest,
    Instance,
    ProfileChanged,
    ProposeAction,
    RecordGoal,
    ScheduleTimer,
    Status,
    Stimulus,
    TimerFired,
    WithdrawAction,
    migrate,
    new_instance,
    step,
)
from cdp_orchestration.domain.journey import Action, Journey, ScheduleEntry
from cdp_orchestration.domain.lifecycle import MigrationPlan, State
from cdp_orchestration.domain.records import (
    instance_record,
)
from cdp_orchestration.domain.rules import Rules
from cdp_orchestration.domain.templates import MissingField
from cdp_orchestration.domain.view import Event
from cdp_orchestration.inputs import Input, decode
from cdp_orchestration.journeys import Journeys
from cdp_orchestration.merges import adopt, handover, request_handovers
from cdp_orchestration.privacy import forget
from cdp_orchestration.state import (
    APPROVALS,
    DECISIONS,
    ENROLLMENTS,
    INSTANCES,
    PERSONS,
    STATS,
    Batch,
    Partition,
    Person,
    decision_key,
    load_persons,
    load_stats,
    slot_id,
    stats_doc,
    stats_key,
    wake_id,
)

log = logging.getLogger("cdp.orchestration")

SERVICE = "orchestration"

# Where an action's address is read from, per channel (the `address` map of ActionMessage).
ADDRESS_FIELDS = {
    "email": ("email", "traits.email"),
    "sms": ("phone", "traits.phone"),
    "push": ("push_token", "traits.push_token"),
    "webpush": ("webpush_subscription", "traits.webpush_subscription"),
    "webhook": ("webhook_url", "traits.webhook_url"),
}


class OrchestrationLogic:
    """The engine's `Logic` for `orchestration.in.<p>` (the contract: `cdp_kit.engine`)."""

    def __init__(
        self,
        store: Store,
        journeys: Journeys,
        rules: Rules,
        *,
        partitions: int,
        hot_persons: int = 100_000,
        clock_offset: float = 0.0,
        meter: metrics.Meter | None = None,
    ) -> None:
        self.store = store
        self.journeys = journeys
        self.rules = rules
        self.partitions = partitions
        self.hot_per_partition = max(1, hot_persons // partitions)
        self.clock_offset = clock_offset
        self.hot: dict[int, Partition] = {}
        meter = meter or metrics.get_meter("cdp.orchestration")
        self.m_decisions = meter.create_counter(
            "cdp.orchestration.decisions", unit="{decision}", description="arbiter decisions, by kind"
        )
        self.m_actions = meter.create_counter(
            "cdp.orchestration.actions", unit="{action}", description="actions published to their channel"
        )
        self.m_entries = meter.create_counter(
            "cdp.orchestration.entries", unit="{instance}", description="journey instances started"
        )
        self.m_lateness = meter.create_histogram(
            "cdp.orchestration.timer.lateness",
            unit="ms",
            description="time from a durable timer's due time to the server storing its fire",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )

    # --- decode ------------------------------------------------------------------------------------------

    def decode(self, delivery: Delivery) -> list[Input]:
        at = delivery.msg.metadata.timestamp.timestamp() + self.clock_offset
        stream, what = streams.kind_of(delivery.headers)
        inputs = decode(stream, what, delivery.data, at)
        if stream == subjects.ORCHESTRATION_TIMERS and "d" in inputs[0].data:
            self.m_lateness.record(max(0.0, (at - self.clock_offset - inputs[0].data["d"]) * 1000))
        return inputs

    # --- apply -------------------------------------------------------------------------------------------

    async def apply(self, partition: int, items: list[list[Input]]) -> Effects:
        hot = self.hot.setdefault(partition, Partition())
        batch = Batch(partition)
        if not hot.stats_loaded:
            await load_stats(self.store, partition, hot)
        inputs = [i for item in items for i in item]
        await load_persons(self.store, hot, {i.person_id for i in inputs})
        for one in inputs:
            person = hot.persons[one.person_id]
            hot.persons.move_to_end(one.person_id)
            batch.touched[person.person_id] = person
            await self._handle(hot, batch, person, one)
        for person in batch.touched.values():
            for instance in person.changed.values():
                batch.put(INSTANCES, instance.id, instance_record(instance))
            person.changed.clear()
            if person.dirty:
                batch.put(PERSONS, person.person_id, person.record())
                person.dirty = False
            elif person.forgotten:
                batch.delete(PERSONS, person.person_id)
            person.forgotten = False
        for key in batch.stats:
            # A copy: the counters go on changing in memory while this write is on its way.
            batch.put(STATS, key, orjson.loads(orjson.dumps(hot.stats[key])))
        while len(hot.persons) > self.hot_per_partition:
            hot.persons.popitem(last=False)
        return Effects(batch.ops(), batch.messages)

    async def recover(self, partition: int) -> None:
        self.hot.pop(partition, None)

    async def _handle(self, hot: Partition, batch: Batch, person: Person, one: Input) -> None:
        now = one.at
        kind = one.kind
        if kind == "event":
            event: Event = one.data
            self._learn_ids(person, event)
            if event.name in self.rules.watched_events:
                state = arbiter.observe(person.state, event, self.rules)  # type: ignore[arg-type]
                if state is not person.state:
                    person.state, person.dirty = state, True
            for instance in list(person.live.values()):
                await self._step(hot, batch, person, instance, EventArrived(event), now)
            # Only the journeys whose entry names this event; the view is built once, after the steps above.
            for journey in entry.entered_by_event(self.journeys.entering_on_event(event.name), event, person.view, now):
                await self._enter(hot, batch, person, journey, event.event_id, Enter(event), now)
        elif kind == "segment":
            segment_event_id, segment, entered = one.data
            if entered:
                person.segments.add(segment)
            else:
                person.segments.discard(segment)
            person.dirty = True
            await self._profile_changed(hot, batch, person, now)
            for journey in self.journeys.entering_on_segment(segment):
                if entry.enters_on_segment(journey, segment, entered):
                    await self._enter(hot, batch, person, journey, segment_event_id, Enter(), now)
            for scheduled in self.journeys.scheduled_on(segment):
                self._arm(batch, person, scheduled, now)
        elif kind == "profile":
            updates, removed, cause, merged = one.data
            for key, value in updates.items():
                if value is None:
                    person.fields.pop(key, None)
                else:
                    person.fields[key] = value
            person.dirty = True
            if merged:
                request_handovers(self.partitions, batch, person.person_id, merged, now)
            if removed and cause == "merge":
                # Merged into another person: the survivor's engine asks for the instances (`merges`); until
                # then they wait, and the view copied of the profile goes.
                person.fields.clear()
                person.segments.clear()
            elif removed:
                # The profile is gone (deleted): its instances end, and what was copied of it here goes too.
                for instance in list(person.live.values()):
                    await self._step(hot, batch, person, instance, ExitRequest("profile_removed"), now)
                person.live.clear()  # nothing more will come for this person id, goals included
                person.fields.clear()
                person.segments.clear()
                for journey_id, (timer, _at) in list(person.slots.items()):
                    batch.messages.append(streams.cancel(batch.partition, timer))
                    del person.slots[journey_id]
            else:
                await self._profile_changed(hot, batch, person, now)
        elif kind == "timer":
            instance = person.live.get(one.data["i"])
            if instance is not None:
                await self._step(hot, batch, person, instance, TimerFired(one.data["t"]), now)
        elif kind == "wake":
            if person.wake is not None and person.wake[0] == one.data["w"]:
                person.wake = None
                person.dirty = True
                await self._ruling(
                    hot, batch, person, arbiter.release(person.state, person.view(), self.rules, now), now
                )
        elif kind == "slot":
            await self._slot(hot, batch, person, one.data, now)
        elif kind == "arm":
            record = await self.journeys.reload(one.data["journey_id"])
            if record is not None and record.live is not None:
                self._arm(batch, person, record.live, now)
        elif kind == "enroll":
            await self._enroll(hot, batch, person, one.data, now)
        elif kind == "exit":
            instance = person.live.get(one.data["instance_id"])
            if instance is not None and instance.status is not Status.ENDED:
                await self._step(hot, batch, person, instance, ExitRequest(one.data["reason"]), now)
        elif kind in ("approve", "reject"):
            action_id = one.data["action_id"]
            if kind == "approve":
                ruling = arbiter.approve(person.state, action_id, person.view(), self.rules, now)  # type: ignore[arg-type]
            else:
                ruling = arbiter.reject(person.state, action_id, now)  # type: ignore[arg-type]
            answer = (action_id, one.data.get("decided_by", ""), one.data.get("note", ""))
            await self._ruling(hot, batch, person, ruling, now, answer=answer)
        elif kind == "migrate":
            await self._migrate(person, one.data)
        elif kind == "forget":
            await forget(self, hot, batch, person, one.data["request_id"], now)
        elif kind == "handover":
            handover(self.partitions, batch, person, one.data["survivor"], now)
        elif kind == "adopt":
            await adopt(self, hot, batch, person, one.data, now)
        for instance in list(person.live.values()):
            if instance.status is Status.ENDED and not instance.watching_goal(now):
                del person.live[instance.id]  # its goal window has closed: nothing can reach it any more
                person.dirty = True
        self._keep_wake(batch, person)

    @staticmethod
    def _learn_ids(person: Person, event: Event) -> None:
        """Keep the identifiers the person's events come with: outcome events go back in under them."""
        for key, value in ((USER_ID, event.user_id), (ANONYMOUS_ID, event.anonymous_id)):
            if value and person.ids.get(key) != value:
                person.ids[key] = value
                person.dirty = True

    def _arm(self, batch: Batch, person: Person, journey: Journey, now: float) -> None:
        """Keep one timer at the person's next slot of a scheduled journey while they are in its segment (the
        slot is read in their zone); none once they left it or the journey no longer runs on a schedule."""
        schedule = journey.entry if isinstance(journey.entry, ScheduleEntry) else None
        current = person.slots.get(journey.id)
        record = self.journeys.records.get(journey.id)
        wanted = (
            schedule is not None
            and schedule.segment in person.segments
            and record is not None
            and record.state is not State.ARCHIVED
        )
        if wanted and current is not None and current[1] > now:
            return  # armed already
        if current is not None:
            batch.messages.append(streams.cancel(batch.partition, current[0]))
            del person.slots[journey.id]
            person.dirty = True
        if not wanted:
            return
        at = entry.next_scheduled_entry(journey, person.view(), now)
        if at is None:
            return
        timer = slot_id(journey.id, person.person_id, at)
        due = at - self.clock_offset
        payload = {"s": journey.id, "p": person.person_id, "at": at, "d": due}
        batch.messages.append(streams.schedule(batch.partition, timer, due, payload))
        person.slots[journey.id] = (timer, at)
        person.dirty = True

    async def _slot(self, hot: Partition, batch: Batch, person: Person, body: dict, now: float) -> None:
        """A scheduled journey's slot came: the person enters (if it takes entries and they are still in the
        segment), and the next slot is armed."""
        journey_id = body["s"]
        current = person.slots.get(journey_id)
        if current is None or current[0] != slot_id(journey_id, person.person_id, body["at"]):
            return  # cancelled, or re-armed since
        del person.slots[journey_id]
        person.dirty = True
        record = await self.journeys.reload(journey_id)
        journey = record.live if record is not None else None
        if journey is None:
            return
        schedule = journey.entry if isinstance(journey.entry, ScheduleEntry) else None
        if record.accepts_entries and schedule is not None and schedule.segment in person.segments:  # type: ignore[union-attr]
            trigger = entry.schedule_trigger(body["at"])
            await self._enter(hot, batch, person, journey, trigger, Enter(), now)
        # The next slot is after this one (a slot that fired early by a rounding never repeats itself).
        self._arm(batch, person, journey, max(now, body["at"]))

    async def _profile_changed(self, hot: Partition, batch: Batch, person: Person, now: float) -> None:
        for instance in list(person.live.values()):
            if instance.status is Status.RUNNING:
                await self._step(hot, batch, person, instance, ProfileChanged(), now)

    async def _enter(
        self, hot: Partition, batch: Batch, person: Person, journey, trigger: str, stimulus: Enter, now: float
    ) -> tuple[bool, str, str]:
        """(entered, instance id, reason) for one trigger of one journey."""
        instance = new_instance(journey, person.person_id, trigger)
        if instance.id in person.live or await self.store.get(INSTANCES, instance.id) is not None:
            return True, instance.id, "admitted"  # this trigger started it already
        running = sum(1 for i in person.live.values() if i.journey_id == journey.id and i.status is Status.RUNNING)
        history = entry.EntryHistory(running=running, last_entered_at=person.entered.get(journey.id))
        admission = entry.admit(journey, history, now)
        if not admission.admitted:
            return False, "", admission.reason
        person.entered[journey.id] = now
        person.dirty = True
        self.m_entries.add(1, {"journey": journey.id})
        self._count(hot, batch, journey.id, journey.version, lambda s: s.__setitem__("entered", s["entered"] + 1))
        await self._step(hot, batch, person, instance, stimulus, now)
        return True, instance.id, "admitted"

    async def _enroll(self, hot: Partition, batch: Batch, person: Person, body: dict, now: float) -> None:
        key = f"{body['journey_id']}:{body['idempotency_key']}"
        if await self.store.get(ENROLLMENTS, key) is not None or (ENROLLMENTS, key) in batch.writes:
            return  # answered already
        # Read again: the journey may have been published through another replica a moment ago.
        record = await self.journeys.reload(body["journey_id"])
        journey = record.live if record is not None else None
        if record is None or journey is None:
            answer = (False, "", "not_found")
        elif not record.accepts_entries:
            answer = (False, "", record.state.value)
        elif not entry.enters_on_api(journey):
            answer = (False, "", "not_api_entry")
        else:
            answer = await self._enter(
                hot,
                batch,
                person,
                journey,
                f"enroll:{body['idempotency_key']}",
                Enter(properties=body.get("properties") or {}),
                now,
            )
        entered, instance_id, reason = answer
        batch.put(ENROLLMENTS, key, {"entered": entered, "instance_id": instance_id, "reason": reason, "at": now})

    async def _migrate(self, person: Person, body: dict) -> None:
        instance = person.live.get(body["instance_id"])
        new = await self._version(body["journey_id"], body["to_version"])
        if instance is None or new is None or instance.version != body["from_version"]:
            return
        plan = MigrationPlan(
            body["journey_id"], body["from_version"], body["to_version"], frozenset(body["moves"]), frozenset()
        )
        moved = migrate(instance, new, plan)
        if moved is not None:
            person.live[moved.id] = moved
            person.changed[moved.id] = moved

    # --- the domain's commands ------------------------------------------------------------------------------

    async def _step(
        self, hot: Partition, batch: Batch, person: Person, instance: Instance, stimulus: Stimulus, now: float
    ) -> None:
        journey = await self._version(instance.journey_id, instance.version)
        if journey is None:
            log.error(
                "instance %s runs journey %s v%d, which is not loaded",
                instance.id,
                instance.journey_id,
                instance.version,
            )
            return
        record = self.journeys.records.get(instance.journey_id)
        if record is not None and record.state is State.ARCHIVED and instance.status is Status.RUNNING:
            # Whatever reaches an instance of an archived journey ends it, should ArchiveJourney's sweep have
            # missed it (the call interrupted half-way).
            stimulus = ExitRequest("archived")
        after, commands = step(instance, journey, stimulus, person.view(), now)
        if after != instance:
            person.changed[after.id] = after
            if after.status is Status.ENDED and not after.watching_goal(now):
                if person.live.pop(after.id, None) is not None:
                    person.dirty = True
            else:
                if after.id not in person.live:
                    person.dirty = True
                person.live[after.id] = after
        await self._carry(hot, batch, person, after, commands, now)

    async def _carry(
        self, hot: Partition, batch: Batch, person: Person, instance: Instance, commands: list[Command], now: float
    ) -> None:
        p = batch.partition
        for command in commands:
            if isinstance(command, ScheduleTimer):
                due = command.at - self.clock_offset
                payload = {"t": command.timer_id, "i": command.instance_id, "p": person.person_id, "d": due}
                batch.messages.append(streams.schedule(p, command.timer_id, due, payload))
            elif isinstance(command, CancelTimer):
                batch.messages.append(streams.cancel(p, command.timer_id))
            elif isinstance(command, ProposeAction):
                ruling = arbiter.decide(person.state, command.action, person.view(), self.rules, now)  # type: ignore[arg-type]
                await self._ruling(hot, batch, person, ruling, now, proposed=command.action)
            elif isinstance(command, WithdrawAction):
                await self._ruling(hot, batch, person, arbiter.withdraw(person.state, command.action_id, now), now)  # type: ignore[arg-type]
            elif isinstance(command, Assigned):

                def assigned(stats: dict, c: Assigned = command) -> None:
                    cell = stats["variants"].setdefault(c.node_id, {}).setdefault(c.variant, [0, 0])
                    cell[0] += 1

                self._count(hot, batch, command.journey_id, command.version, assigned)
            elif isinstance(command, RecordGoal):

                def converted(stats: dict, c: RecordGoal = command) -> None:
                    stats["converted"] += 1
                    for node_id, variant in c.variants.items():
                        stats["variants"].setdefault(node_id, {}).setdefault(variant, [0, 0])[1] += 1

                self._count(hot, batch, command.journey_id, command.version, converted)
            elif isinstance(command, End):

                def ended(stats: dict, c: End = command) -> None:
                    stats["ended"][c.reason] = stats["ended"].get(c.reason, 0) + 1

                self._count(hot, batch, instance.journey_id, instance.version, ended)

    async def _ruling(
        self,
        hot: Partition,
        batch: Batch,
        person: Person,
        ruling: Ruling,
        now: float,
        *,
        answer: tuple[str, str, str] | None = None,
        proposed: ProposedAction | None = None,
    ) -> None:
        """Record the ruling's decisions, publish what was sent, and tell each instance about its action.
        `answer`: (action id, decided by, note) of an approver's call; `proposed`: the action just proposed."""
        # Each action is rendered from its own journey version (an instance migrated meanwhile keeps it).
        held = (*person.state.deferred, *person.state.awaiting) if person.state is not None else ()
        versions = {h.action.action_id: h.action.journey_version for h in held}
        if proposed is not None:
            versions[proposed.action_id] = proposed.journey_version
        if ruling.state is not person.state:
            person.state = ruling.state
            person.dirty = True
        for index, decision in enumerate(ruling.decisions):
            kind, reason = decision.kind.value, decision.reason
            if decision.kind is Kind.SENT:
                failure = await self._send(batch, person, decision, versions.get(decision.action_id))
                if failure is not None:
                    kind, reason = "failed", failure
            doc = {
                "action_id": decision.action_id,
                "journey_id": decision.journey_id,
                "instance_id": decision.instance_id,
                "person_id": decision.person_id,
                "node_id": decision.node_id,
                "channel": decision.channel,
                "category": decision.category,
                "kind": kind,
                "reason": reason,
                "rule": decision.by or "",
                "until": decision.until,
                "at": decision.at,
            }
            batch.put(DECISIONS, decision_key(person.person_id, decision, index), doc)
            self.m_decisions.add(1, {"kind": kind})
            await self._approval(batch, person, decision, answer)
            instance = person.live.get(decision.instance_id)
            # An instance that ended in this batch (its pending action withdrawn) is no longer live.
            known = instance or person.changed.get(decision.instance_id)

            def counted(stats: dict, k: str = kind) -> None:
                stats["decisions"][k] = stats["decisions"].get(k, 0) + 1

            if known is not None:
                self._count(hot, batch, decision.journey_id, known.version, counted)
            if instance is not None:
                await self._step(hot, batch, person, instance, ActionOutcome(decision.action_id, decision.kind), now)

    async def _approval(
        self, batch: Batch, person: Person, decision: Decision, answer: tuple[str, str, str] | None
    ) -> None:
        """Keep the approval list: a record when an action starts waiting, closed by the answer or expiry."""
        if decision.kind is Kind.AWAITING_APPROVAL:
            held = next((h for h in person.state.awaiting if h.action.action_id == decision.action_id), None)  # type: ignore[union-attr]
            if held is None:
                return
            action = held.action
            batch.put(
                APPROVALS,
                action.action_id,
                {
                    "action_id": action.action_id,
                    "journey_id": action.journey_id,
                    "instance_id": action.instance_id,
                    "person_id": action.person_id,
                    "channel": action.channel,
                    "category": action.category,
                    "value": action.value or 0.0,
                    "state": "pending",
                    "requested_at": decision.at,
                    "expires_at": held.until,
                    "decided_at": None,
                    "decided_by": "",
                    "note": "",
                },
            )
            return
        answered = answer is not None and answer[0] == decision.action_id
        state = {Kind.REJECTED: "rejected", Kind.EXPIRED: "expired"}.get(decision.kind)
        if state is None and answered:
            state = "approved"
        if state is None:
            return
        doc = batch.writes.get((APPROVALS, decision.action_id))
        if doc is None:
            stored = await self.store.get(APPROVALS, decision.action_id)
            if stored is None:
                return  # it never waited for approval (a deferred action expiring, say)
            doc = stored.doc
        if doc["state"] != "pending":
            return
        decided_by, note = (answer[1], answer[2]) if answered and answer is not None else ("", "")
        batch.put(
            APPROVALS,
            decision.action_id,
            {**doc, "state": state, "decided_at": decision.at, "decided_by": decided_by, "note": note},
        )

    async def _version(self, journey_id: str, version: int) -> Journey | None:
        """A published version; read from the store when this replica has not seen it yet (it was published
        through another replica and the announcement is still on its way)."""
        journey = self.journeys.version(journey_id, version)
        if journey is None:
            await self.journeys.reload(journey_id)
            journey = self.journeys.version(journey_id, version)
        return journey

    async def _send(self, batch: Batch, person: Person, decision: Decision, version: int | None) -> str | None:
        """Publish the sent action on actions.<channel>.<p>; the reason it could not be, or None."""
        instance = person.live.get(decision.instance_id)
        if version is None and instance is not None:
            version = instance.version
        journey = await self._version(decision.journey_id, version) if version is not None else None
        node = journey.nodes.get(decision.node_id) if journey is not None else None
        if not isinstance(node, Action):
            return "failed: the action's journey version is not loaded"
        try:
            content = node.template.render(person.view(), instance.entry if instance is not None else None)
        except MissingField as missing:
            log.warning(
                "action %s not sent: its template reads %s, which the person lacks", decision.action_id, missing.field
            )
            return f"failed: template part {missing.part!r} reads {missing.field}, which this person does not have"
        message = pb.ActionMessage(
            action_id=decision.action_id,
            person_id=person.person_id,
            journey_id=decision.journey_id,
            journey_version=journey.version,  # type: ignore[union-attr]
            instance_id=decision.instance_id,
            node_id=decision.node_id,
            channel=decision.channel,
            category=decision.category,
            content=content,
            decided_at=from_seconds(decision.at),
        )
        if decision.channel == "crm":
            message.crm_kind = content.get("kind", "task")
        address = ADDRESS_FIELDS.get(decision.channel)
        if address is not None:
            value = person.fields.get(address[1])
            if isinstance(value, str) and value:
                message.address[address[0]] = value
        # Who the person is to identity, for the outcome events (`wire.IDENTITY_KEYS`): the userId when one is
        # known, else an anonymous id; neither for a person no event has named yet.
        if person.ids.get(USER_ID):
            message.address[USER_ID] = person.ids[USER_ID]
        elif person.ids.get(ANONYMOUS_ID):
            message.address[ANONYMOUS_ID] = person.ids[ANONYMOUS_ID]
        self.m_actions.add(1, {"channel": decision.channel})
        batch.messages.append(
            OutMessage(
                subject=subjects.actions(decision.channel, batch.partition),
                payload=message.SerializeToString(),
                msg_id=decision.action_id,
            )
        )
        return None

    def _keep_wake(self, batch: Batch, person: Person) -> None:
        """One durable timer per person at the arbiter's next wake."""
        at = arbiter.next_wake(person.state) if person.state is not None else None
        current = person.wake
        if (current[1] if current else None) == at:
            return
        if current is not None:
            batch.messages.append(streams.cancel(batch.partition, current[0]))
        person.wake = None
        if at is not None:
            timer = wake_id(person.person_id, at)
            due = at - self.clock_offset
            payload = {"w": timer, "p": person.person_id, "d": due}
            batch.messages.append(streams.schedule(batch.partition, timer, due, payload))
            person.wake = (timer, at)
        person.dirty = True

    def _count(
        self, hot: Partition, batch: Batch, journey_id: str, version: int, change: Callable[[dict], None]
    ) -> None:
        key = stats_key(journey_id, version, batch.partition)
        stats = hot.stats.get(key)
        if stats is None:
            stats = hot.stats[key] = stats_doc()
        change(stats)
        batch.stats.add(key)
