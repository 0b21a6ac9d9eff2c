"""Orchestration on the kit's partitioned engine: `orchestration.in.<p>` -> journeys, the arbiter, timers, actions.

One engine per person partition applies everything about a person in stream order (`streams` says what
reaches `orchestration.in.<p>`): resolved events, segment and profile changes, fired timers and the API's
commands (and the engines' own: `forget` for a privacy deletion, `privacy.py`; `handover` / `adopt` when a
person is merged into another, `restore` / `adopt` when an unmerge splits them again, `merges.py`). For each, `OrchestrationLogic.apply` loads the person (their
view, their arbiter state, their live instances), routes the input to what it does to them, and returns
`Effects`. The work is split by what it owns:

- `engine.py` (here): decoding, the batch (load, route each input, collect the writes, trim the cache);
- `apply.py` (`Applier`): the per-person apply - instances stepped (`instance.step`), entries admitted
  (`entry.admit`), the domain's commands carried out, counters kept; the one interface `merges.py` and
  `privacy.py` change a person through;
- `actions.py`: the arbiter's rulings (`arbiter.decide` / `release` / `approve` / `reject` / `withdraw`)
  recorded as decisions and approvals, sent actions rendered and published;
- `timers.py`: instance timers, the per-person wake and scheduled-entry slots.

What a batch returns:

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
- An event, profile change or segment change is offered only to the person's instances it can move, not to
  each of them (`wakes.py`): what they decide is what offering it to every one decides.
- One wake timer per person at `arbiter.next_wake(state)` (held actions due, approvals expiring): when
  it fires, `release`. A timer the person or instance no longer expects changes nothing.
- Hot state is a bounded cache per partition (`hot_persons`): persons beyond it are dropped least
  recently used and read back from the store. The engine runs with one batch in flight, so whatever is
  dropped is durable already; a failed commit drops the partition's cache (`recover`).
- One write chain for every partition (`chain`, handed to the kit's engine): commits submitted while
  another is being written land together in one store transaction (the chain's group commit). A
  partition's batches are small at everyday rates, and a transaction per batch (begin, the versions
  read, commit) was most of what writing one cost. A failed group fails every partition's write in it
  and after it; each of those partitions recovers (drops its cache, reads back from the store), and the
  chain is reset once the failure has settled (`recover`).
- Logs name ids and kinds, never profile values.

Ordering of events and profile changes: events reach this engine from `events.resolved` and, in parallel,
through the profile, whose change for an event (listing its id) usually arrives here a moment after the
event itself, and not at all while the profile is stopped. A decision is made on fields at least as new as
the person's events: `Person.saw_event` notes the latest event whose change has not arrived
(`PersonView.behind`: since when), `Person.profile_applied` clears it when a change lists that event (the
profile applies one person's events in order, so it covers the earlier ones), and the arbiter holds an
action proposed meanwhile (`Held.profile`, no decision yet): the change releases it at once, or the
person's wake decides it at `Rules.profile_wait` on the fields held, its reason naming
`profile_unavailable`. Noting an event costs no store read nor write of its own. An event entry whose `if`
is false while the fields lag behind that very event is parked with the person (`Person.parked`, in memory)
and checked again when the change arrives (`_release_parked`): a condition on a trait the event sets reads
the value the event set.

Metrics: `cdp.orchestration.decisions` (by kind), `cdp.orchestration.actions` (published, by channel),
`cdp.orchestration.held` (gauge: actions held for the profile now), `cdp.orchestration.held.expired`
(actions decided on lagging fields because their `profile_wait` ran out, by kind),
`cdp.orchestration.entries` (instances started, by journey), `cdp.orchestration.timer.lateness` (ms from
a timer's due time to the server storing its fire: what message schedules cost under load); the engine's
own per-stage metrics come from the kit.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from opentelemetry import metrics

from cdp_kit.bus import Delivery, subjects
from cdp_kit.engine import Effects, WriteChain
from cdp_kit.storage import Store
from cdp_kit.telemetry import LATENCY_BUCKETS_MS
from cdp_orchestration import actions, streams, timers
from cdp_orchestration.apply import ENTRY_IF, Applier, when
from cdp_orchestration.channels.wire import ANONYMOUS_ID, USER_ID
from cdp_orchestration.domain import arbiter, entry
from cdp_orchestration.domain.instance import Enter, EventArrived, ExitRequest, Status, TimerFired
from cdp_orchestration.domain.records import instance_record
from cdp_orchestration.domain.rules import Rules
from cdp_orchestration.inputs import Input, ResolvedInput, decode
from cdp_orchestration.journeys import Journeys
from cdp_orchestration.merges import adopt, give_back, handover, request_handovers, request_restore
from cdp_orchestration.privacy import forget
from cdp_orchestration.reads import Fetch, Reads
from cdp_orchestration.state import (
    ENROLLMENTS,
    INSTANCES,
    MAX_PARKED,
    PERSONS,
    STATS,
    Batch,
    Partition,
    Person,
    keep_members,
    load_persons,
    load_stats,
)

log = logging.getLogger("cdp.orchestration")

SERVICE = "orchestration"
# The reason segmentation gives the exits DeleteSegment publishes (one per member).
SEGMENT_DELETED = "deleted"


class OrchestrationLogic:
    """The engine's `Logic` for `orchestration.in.<p>` (the contract: `cdp_kit.engine`): decodes inputs,
    routes each to what it does to its person (`apply.Applier`, `timers`, `merges`, `privacy`) and turns
    the batch into `Effects`."""

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
        profile: Fetch | None = None,
    ) -> None:
        """`profile`: the profile service's BatchGetProfiles (`reads.profile_fetch`); with it, only the profile
        fields something here reads are kept (`reads.py`); without it, every field."""
        self.store = store
        self.journeys = journeys
        self.rules = rules
        self.partitions = partitions
        self.hot_per_partition = max(1, hot_persons // partitions)
        self.clock_offset = clock_offset
        self.hot: dict[int, Partition] = {}
        # Shared by every partition's pipeline (group commit, see the module docstring).
        self.chain = WriteChain(store)
        meter = meter or metrics.get_meter("cdp.orchestration")
        self.watched_events = rules.watched_events  # a property that builds the set each time it is read
        self.applier = Applier(store, journeys, rules, clock_offset=clock_offset, meter=meter)
        self.reads = Reads(journeys, rules, profile) if profile is not None else None
        if self.reads is not None:
            self.applier.scores_partial = self.reads.scores_partial
        meter.create_observable_gauge(
            "cdp.orchestration.held",
            callbacks=[self._observe_held],
            unit="{action}",
            description="actions held until the profile applies the person's latest event (no decision yet), "
            "of the persons this replica has read since it started",
        )
        meter.create_observable_gauge(
            "cdp.orchestration.journeys.invalid",
            callbacks=[self._observe_invalid],
            unit="{version}",
            description="stored journey versions and drafts that no longer validate (out of service until a "
            "fixed version is published; the log names each, with its field)",
        )
        self.m_lateness = meter.create_histogram(
            "cdp.orchestration.timer.lateness",
            unit="ms",
            description="time from a durable timer's due time to the server storing its fire",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )

    def _observe_held(self, _options: Any) -> list[metrics.Observation]:
        # Read by the metric reader's thread: each dict is copied at once (a C-level copy, under the GIL).
        return [metrics.Observation(sum(sum(list(hot.holding.values())) for hot in list(self.hot.values())))]

    def _observe_invalid(self, _options: Any) -> list[metrics.Observation]:
        return [metrics.Observation(len(self.journeys.invalid))]

    # --- decode ------------------------------------------------------------------------------------------

    def decode(self, delivery: Delivery) -> list[Input]:
        at = delivery.msg.metadata.timestamp.timestamp() + self.clock_offset
        stream, what = streams.kind_of(delivery.headers)
        inputs = decode(stream, what, delivery.data, at, self.reads.keep() if self.reads is not None else None)
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
        ids = {i.person_id for i in inputs}
        reads = self.reads
        if reads is None:
            await load_persons(self.store, hot, ids)
        else:
            # Before anything reads them: the persons kept under another set of fields are brought to this one
            # (`reads.py`), those lacking a field read now read again from the profile service.
            keep = reads.keep()
            await load_persons(self.store, hot, ids, keep.fingerprint)
            await reads.bring_up([hot.persons[p] for p in ids], keep)
        persons, touched = hot.persons, batch.touched
        for one in inputs:
            person = persons[one.person_id]
            persons.move_to_end(one.person_id)
            if person.forgotten and one.kind != "forget":
                await self._dropped(batch, one)
                continue
            touched[one.person_id] = person
            done = self._quick(hot, batch, person, one) if one.kind in _QUICK else None
            if done is _DONE:
                continue
            await self._handle(hot, batch, person, one, done)
        for person in touched.values():
            if person.changed:
                for instance in person.changed.values():
                    batch.put(INSTANCES, instance.id, instance_record(instance))
                person.changed.clear()
            if person.dirty:
                batch.put(PERSONS, person.person_id, person.record())
                person.dirty = False
            if person.segments != person.indexed:
                keep_members(batch, person)  # the segments' members, as the record holds them
        for key in batch.stats:
            # A copy: the counters go on changing in memory while this write is on its way.
            batch.put(STATS, key, orjson.loads(orjson.dumps(hot.stats[key])))
        while len(hot.persons) > self.hot_per_partition:
            hot.persons.popitem(last=False)
        return Effects(batch.ops(), batch.messages)

    async def recover(self, partition: int) -> None:
        self.hot.pop(partition, None)
        # The chain is shared: the writes after the failed one failed with it, whichever partition made them
        # (each of those recovers too; each partition's next write also waits for its own previous one, so
        # none lands past a failure of its own partition). Reset once they have all settled.
        await self.chain.settle()
        self.chain.reset()

    def _quick(self, hot: Partition, batch: Batch, person: Person, one: Input) -> Any:
        """Most inputs, applied without a coroutine of their own (one per input in `_handle`, with its
        dispatch, was about a tenth of what applying one cost): an event of a person no instance of whom waits
        on anything, under a name no journey enters on and the arbiter does not watch, and a profile change
        of a person with no live instance moving no field kept here (a score or a computed trait nothing here
        reads: most of them). Each does what `_handle` does for it, in the same order; the fields catching up
        with the person's events (most profile changes of an event do: its event set the lag) releases
        nothing when nothing waits for them (`_waiting`). `_DONE` when that was all; else how far it got, for
        `_handle` to go on from: None (nothing done), `_SEEN` (an event noted by `saw_event`, its identifiers
        learnt), `_RELEASED` (an event noted, or a profile change applied, that ended the fields' lag while
        something waits for them: it is to be decided)."""
        now = one.at
        if one.kind == "event":
            resolved: ResolvedInput = one.data
            # Until the profile's change for this event arrives, the fields lag behind it (see "Ordering" above).
            if person.saw_event(resolved.profile_id, now) and _waiting(person):
                return _RELEASED
            self._learn_ids(batch, person, resolved)
            name = resolved.name
            if (
                name in self.watched_events
                or person.live
                or self.journeys.paused_on_event(name)
                or self.journeys.entering_on_event(name)
            ):
                return _SEEN
            self._after(hot, batch, person, now)
            return _DONE
        updates, removed, _cause, merged, split_from, event_ids, change_at = one.data
        if updates or removed or merged or split_from or person.live:
            return None
        caught_up = person.profile_applied(event_ids, now) if event_ids else False
        if person.change_seen(change_at):
            caught_up = person.pending is None
        if caught_up and _waiting(person):
            return _RELEASED
        self._after(hot, batch, person, now)
        return _DONE

    async def _handle(self, hot: Partition, batch: Batch, person: Person, one: Input, begun: Any = None) -> None:
        """`begun`: how far `_quick` got with the input (None: it did nothing of it)."""
        now = one.at
        kind = one.kind
        if kind == "event":
            resolved: ResolvedInput = one.data
            # Until the profile's change for this event arrives, the fields lag behind it (see "Ordering" above).
            released = begun is _RELEASED if begun is not None else person.saw_event(resolved.profile_id, now)
            if released:
                await self._release_parked(hot, batch, person, now)
                await self._release_held(hot, batch, person, now)
            self._learn_ids(batch, person, resolved)
            # Most events reach a person no instance of whom waits on anything, under a name no journey enters
            # on and the arbiter does not watch: their identifiers are all they give, and their properties and
            # context are never read (`inputs.ResolvedInput`).
            watched = resolved.name in self.watched_events
            paused = self.journeys.paused_on_event(resolved.name)
            if not (watched or person.live or paused or self.journeys.entering_on_event(resolved.name)):
                return self._after(hot, batch, person, now)
            event = resolved.event()
            if watched:
                state = arbiter.observe(person.state, event, self.rules)  # type: ignore[arg-type]
                if state is not person.state:
                    person.state, person.dirty = state, True
            # Only the instances this event can move (`wakes.py`): its name in their filters, and those whose
            # conditions may answer otherwise than when they were last stepped.
            for instance in person.offered(self.journeys, now, event=event.name):
                await self.applier.step(hot, batch, person, instance, EventArrived(event), now)
            # Only the journeys whose entry names this event; the view is built once, after the steps above.
            candidates = self.journeys.entering_on_event(event.name, event.properties)
            refused: list = []
            for journey in entry.entered_by_event(candidates, event, person.view, now, refused):
                await self.applier.enter(
                    hot, batch, person, journey, event.event_id, Enter(event), now, before=event.message_id
                )
            if refused and person.pending is not None and person.pending[0] == resolved.profile_id:
                # The fields lag behind this very event (its profile change is on its way): a condition on a
                # trait it sets would read the old value. Checked again when the change arrives.
                parked = person.parked if person.parked is not None else []
                person.parked = parked
                for journey in refused:
                    if len(parked) >= MAX_PARKED:
                        await self._recheck(hot, batch, person, *parked.pop(0), now)
                    parked.append((journey, event, now))
                refused = []
            for journey in refused:
                self._refused_by_condition(batch, person, journey, now)
            for journey in paused:
                if journey.entry.event.matches(event):  # type: ignore[union-attr]
                    self.applier.paused(batch, person, journey.id, now)
        elif kind == "segment":
            segment_event_id, segment, entered, change_at, reason = one.data
            if change_at:
                person.segment_ahead(change_at, now)
            if entered:
                person.segments.add(segment)
            else:
                person.segments.discard(segment)
            person.dirty = True
            await self.applier.profile_changed(hot, batch, person, now, fields=(), segments=(segment,))
            # A segment deleted (DeleteSegment, `force` past the journeys entering on it) publishes every
            # member's exit: its members left nothing, so no journey `on: exited` of it enters them (each
            # got that journey's goodbye). Their membership goes, and wait and exit conditions see it.
            entering = reason != SEGMENT_DELETED
            for journey in self.journeys.entering_on_segment(segment) if entering else ():
                if entry.enters_on_segment(journey, segment, entered):
                    await self.applier.enter(hot, batch, person, journey, segment_event_id, Enter(), now)
            for journey in self.journeys.paused_on_segment(segment) if entering else ():
                if entry.enters_on_segment(journey, segment, entered):
                    self.applier.paused(batch, person, journey.id, now)
            for scheduled in self.journeys.scheduled_on(segment):
                timers.arm(self.applier, batch, person, scheduled, now)
        elif kind == "profile" and begun is _RELEASED:
            # `_quick` applied it up to the fields catching up: what waited for them is decided.
            await self._release_parked(hot, batch, person, now)
            await self._release_held(hot, batch, person, now)
        elif kind == "profile":
            updates, removed, cause, merged, split_from, event_ids, change_at = one.data
            # Merges, splits and removals change the person whatever their fields; a plain change only when a
            # value moved (`_update_fields`).
            moved = _update_fields(person.fields, updates)
            if moved or removed or merged or split_from:
                person.dirty = True
            caught_up = person.profile_applied(event_ids, now) if event_ids else False
            if person.change_seen(change_at):
                caught_up = person.pending is None
            if merged:
                request_handovers(self.partitions, batch, person.person_id, merged, now)
            if split_from:
                # An unmerge made this person again: what came from them goes back (`merges`).
                request_restore(self.partitions, batch, person, split_from, now)
            if removed and cause == "merge":
                # Merged into another person: the survivor's engine asks for the instances (`merges`); until
                # then they wait, and the view copied of the profile goes.
                person.fields.clear()
                person.segments.clear()
            elif removed:
                # The profile is gone (deleted): its instances end, and what was copied of it here goes too.
                for instance in list(person.live.values()):
                    await self.applier.step(hot, batch, person, instance, ExitRequest("profile_removed"), now)
                person.live.clear()  # nothing more will come for this person id, goals included
                person.fields.clear()
                person.segments.clear()
                for journey_id, (timer, _at) in list(person.slots.items()):
                    batch.messages.append(streams.cancel(batch.partition, timer))
                    del person.slots[journey_id]
            else:
                if person.live:
                    # A merge or a split offers every running instance the change; any other, those reading a
                    # field it moved (and those its catching up concerns: `wakes.py`).
                    changed = None if merged or split_from else moved
                    await self.applier.profile_changed(hot, batch, person, now, fields=changed, segments=())
                if caught_up:
                    await self._release_parked(hot, batch, person, now)
                    await self._release_held(hot, batch, person, now)
        elif kind == "timer":
            instance = person.live.get(one.data["i"])
            if instance is not None:
                await self.applier.step(hot, batch, person, instance, TimerFired(one.data["t"]), now)
        elif kind == "wake":
            if person.wake is not None and person.wake[0] == one.data["w"]:
                person.wake = None
                person.dirty = True
                await self.applier.rule(
                    hot, batch, person, arbiter.release(person.state, person.view(), self.rules, now), now
                )
        elif kind == "slot":
            await timers.slot(self.applier, hot, batch, person, one.data, now)
        elif kind == "arm":
            record = await self.journeys.reload(one.data["journey_id"])
            if record is not None and record.live is not None:
                timers.arm(self.applier, batch, person, record.live, now)
        elif kind == "enroll":
            await self.applier.enroll(hot, batch, person, one.data, now)
        elif kind == "exit":
            instance = person.live.get(one.data["instance_id"])
            if instance is not None and instance.status is not Status.ENDED:
                await self.applier.step(hot, batch, person, instance, ExitRequest(one.data["reason"]), now)
        elif kind in ("approve", "reject"):
            action_id = one.data["action_id"]
            if kind == "approve":
                ruling = arbiter.approve(person.state, action_id, person.view(), self.rules, now)  # type: ignore[arg-type]
            else:
                ruling = arbiter.reject(person.state, action_id, now)  # type: ignore[arg-type]
            answer = (action_id, one.data.get("decided_by", ""), one.data.get("note", ""))
            await self.applier.rule(hot, batch, person, ruling, now, answer=answer)
        elif kind == "migrate":
            await self.applier.migrate(person, one.data)
        elif kind == "forget":
            await forget(self.applier, hot, batch, person, one.data["request_id"], now)
        elif kind == "handover":
            handover(self.partitions, batch, person, one.data["survivor"], now)
        elif kind == "adopt":
            await adopt(self.applier, hot, batch, person, one.data, now)
        elif kind == "restore":
            await give_back(self.applier, self.partitions, batch, person, one.data["restored"], now)
        self._after(hot, batch, person, now)

    async def _release_parked(self, hot: Partition, batch: Batch, person: Person, now: float) -> None:
        """The fields caught up with the person's events: the event entries whose condition was false on the
        fields before them are checked again (see "Entry conditions wait for the profile" in the README)."""
        parked = person.parked
        if not parked:
            return
        person.parked = None
        for journey, event, at in parked:
            await self._recheck(hot, batch, person, journey, event, at, now)

    async def _recheck(
        self, hot: Partition, batch: Batch, person: Person, journey: Any, event: Any, at: float, now: float
    ) -> None:
        """One parked event entry, decided on the fields as they are now: entered (the event's trigger, so a
        copy never enters twice), or recorded as refused by its condition."""
        if journey not in self.journeys.entering_on_event(event.name, event.properties):
            return  # paused, archived or replaced since: what reaches the journey now decides
        if entry.entered_by_event((journey,), event, person.view, now):
            await self.applier.enter(
                hot, batch, person, journey, event.event_id, Enter(event), now, before=event.message_id
            )
        else:
            self._refused_by_condition(batch, person, journey, now)

    def _refused_by_condition(self, batch: Batch, person: Person, journey: Any, now: float) -> None:
        reason = f"not entered: entry condition `{entry.condition_text(journey)}` was false at {when(now)}"
        self.applier.not_entered(batch, person, journey.id, ENTRY_IF, reason, now)

    async def _release_held(self, hot: Partition, batch: Batch, person: Person, now: float) -> None:
        """The fields caught up with the person's events: actions waiting for them are decided now (see
        "Ordering" above)."""
        state = person.state
        if state is not None and any(held.profile for held in state.deferred):
            await self.applier.rule(hot, batch, person, arbiter.release(state, person.view(), self.rules, now), now)

    def _after(self, hot: Partition, batch: Batch, person: Person, now: float) -> None:
        """What every input ends with: instances whose goal window closed are let go, the person's wake
        timer follows their arbiter state, and the actions they have held for the profile are counted
        (`cdp.orchestration.held`)."""
        state = person.state
        if (
            not person.live
            and person.wake is None
            and (state is None or not (state.deferred or state.awaiting))
            and person.person_id not in hot.holding
        ):
            return  # most persons: no instance, nothing held, no wake - nothing below would change
        held = sum(1 for h in state.deferred if h.profile) if state is not None and state.deferred else 0
        if held:
            hot.holding[person.person_id] = held
        elif hot.holding:
            hot.holding.pop(person.person_id, None)
        if person.live:
            # The ended ones only (`wakes.py`): a look at each live instance was most of what an input cost a
            # person in hundreds of journeys once the input itself reached only the instances it moves.
            for instance in person.ended(self.journeys):
                if not instance.watching_goal(now):
                    del person.live[instance.id]  # its goal window has closed: nothing can reach it any more
                    person.dirty = True
        timers.keep_wake(batch, person, clock_offset=self.clock_offset)

    async def _dropped(self, batch: Batch, one: Input) -> None:
        """An input for a person a privacy deletion forgot (`privacy.py`): it changes nothing. An Enroll not
        answered yet is answered (not entered, "deleted"), so the API call does not wait in vain."""
        if one.kind == "enroll":
            key = f"{one.data['journey_id']}:{one.data['idempotency_key']}"
            if (ENROLLMENTS, key) not in batch.writes and await self.store.get(ENROLLMENTS, key) is None:
                answer = {"entered": False, "instance_id": "", "reason": "deleted", "at": one.at}
                batch.put(ENROLLMENTS, key, answer)
        log.debug("input for a forgotten person dropped", extra={"kind": one.kind})

    @staticmethod
    def _learn_ids(batch: Batch, person: Person, event: ResolvedInput) -> None:
        """Keep the identifiers the person's events come with: outcome events go back in under them. The
        first one a person gets also sends in the outcomes of what was sent to them before
        (`actions.attribute_sends`)."""
        ids = person.ids
        user_id, anonymous_id = event.user_id, event.anonymous_id
        if (not user_id or ids.get(USER_ID) == user_id) and (not anonymous_id or ids.get(ANONYMOUS_ID) == anonymous_id):
            return  # most events: the identifiers the person's last ones came with
        named = actions.named(person)
        for key, value in ((USER_ID, event.user_id), (ANONYMOUS_ID, event.anonymous_id)):
            if value and person.ids.get(key) != value:
                person.ids[key] = value
                person.dirty = True
        if not named and actions.named(person):
            actions.attribute_sends(batch, person)


def _waiting(person: Person) -> bool:
    """Whether anything of the person waits for the fields to catch up with their events: an entry parked
    (`_release_parked`) or an action held for the profile (`_release_held`); both do nothing otherwise."""
    state = person.state
    return bool(person.parked) or (state is not None and any(held.profile for held in state.deferred))


_QUICK = frozenset({"event", "profile"})  # the kinds `OrchestrationLogic._quick` may apply
# How far `_quick` got with an input (`_handle`'s `begun`).
_DONE, _SEEN, _RELEASED = "done", "seen", "released"


def _update_fields(fields: dict[str, Any], updates: dict[str, Any]) -> list[str]:
    """Apply a profile change's field updates (None: the field is gone) to a person's view; the keys whose
    value changed (the instances reading them decide again: `wakes.py`). Most profile changes move a field, but some move none orchestration keeps (only event
    ids or groups, or values it already holds), and rewriting the person record for them was most of what a
    profile change cost here. A value is the same only when it is of the same type and equal: `True == 1.0`
    in Python, but a boolean is not a number to the segment language; lists and maps count as changed."""
    changed: list[str] = []
    for key, value in updates.items():
        if value is None:
            if key in fields:
                del fields[key]
                changed.append(key)
            continue
        old = fields.get(key, _ABSENT)
        # Most values moved (a count, a score): the comparison alone answers for them.
        if old != value or type(old) is not type(value) or isinstance(value, (dict, list)):
            fields[key] = value
            changed.append(key)
    return changed


_ABSENT = object()
