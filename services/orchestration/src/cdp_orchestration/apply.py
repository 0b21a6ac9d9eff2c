"""The per-person apply: what one stimulus does to one person's instances, and the domain's commands carried out.

`Applier` is what the engine (`engine.py`), merges (`merges.py`) and privacy deletions (`privacy.py`)
use to change a person held in the partition's hot state (`state.Person`) within one batch
(`state.Batch`). Every method changes only that person and the batch: the writes and messages it adds
become durable with the batch's commit, and are published after it (the engine's outbox).

Its public interface:
- `step`: one stimulus to one instance (`domain.instance.step`); the instance is kept in `person.live`
  while it can still react, and what it asks for is carried out (`carry`): timers scheduled or
  cancelled (`timers`), actions proposed to or withdrawn from the arbiter and the ruling recorded
  (`rule`, `actions.record_ruling`), experiment and end counts kept (`count`);
- `enter`: one trigger of one journey for the person, through its re-entry rules (`entry.admit`);
- `not_entered`: why a trigger did not enter the person (a re-entry rule, `max_concurrent`, the entry's
  `if`, the journey paused), recorded as a NOT_ENTERED decision: one per journey per person, the latest
  (`state.not_entered_key`), so a busy segment or event cannot fill the store; the same refusal again is
  written at most once per `REFUSAL_REFRESH` while the person is held in memory (most events write
  nothing more than before);
- `profile_changed`: every running instance re-reads the person's view;
- `enroll` / `migrate`: the API's Enroll and a version migration of one instance;
- `rule`: record an arbiter ruling (decisions, approvals, sent actions);
- `count`: change a journey version's counters of this partition;
- `version`: a published journey version, read from the store when this replica has not seen it yet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from opentelemetry import metrics

from cdp_kit.storage import Store
from cdp_orchestration import actions, streams, timers
from cdp_orchestration.domain import arbiter, entry
from cdp_orchestration.domain.arbiter import ProposedAction, Ruling
from cdp_orchestration.domain.instance import (
    Assigned,
    CancelTimer,
    Command,
    End,
    Enter,
    ExitRequest,
    Instance,
    ProfileChanged,
    ProposeAction,
    RecordGoal,
    ScheduleTimer,
    Status,
    Stimulus,
    WithdrawAction,
    instance_id,
    migrate,
    new_instance,
    step,
)
from cdp_orchestration.domain.journey import Journey
from cdp_orchestration.domain.lifecycle import MigrationPlan, State
from cdp_orchestration.domain.rules import Rules
from cdp_orchestration.journeys import Journeys
from cdp_orchestration.state import (
    DECISIONS,
    ENROLLMENTS,
    INSTANCES,
    Batch,
    Partition,
    Person,
    not_entered_key,
    stats_doc,
    stats_key,
)

log = logging.getLogger("cdp.orchestration")

NOT_ENTERED = "not_entered"  # the decision kind of a refused entry (DECISION_KIND_NOT_ENTERED)
# The rules a refused entry names (the decision's `rule`).
REFUSED_BY = {"reentry_never": "reentry", "cooldown": "cooldown", "concurrency_cap": "max_concurrent"}
ENTRY_IF = "entry_if"
PAUSED = "paused"
# The same refusal (journey and rule) of a person held in memory is written again only after this long: a
# journey entering on a busy event would otherwise rewrite it on every one of the person's events.
REFUSAL_REFRESH = 3600.0


def when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def span(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds:g} seconds"


def refusal_reason(journey: Journey, admission: str, last_entered_at: float | None, running: int) -> str:
    """Why `entry.admit` refused, in words: the rule and what it was measured against."""
    last = f", last entered {when(last_entered_at)}" if last_entered_at is not None else ""
    if admission == "reentry_never":
        return f"not entered: re-entry is never allowed{last}"
    if admission == "cooldown":
        return f"not entered: re-entry allowed once every {span(journey.cooldown or 0.0)}{last}"
    return (
        f"not entered: already in the journey {running} time{'s' if running != 1 else ''} at once, its "
        f"max_concurrent is {journey.max_concurrent}"
    )


class Applier:
    """Changes one person within one batch (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        journeys: Journeys,
        rules: Rules,
        *,
        clock_offset: float = 0.0,
        meter: metrics.Meter | None = None,
    ) -> None:
        self.store = store
        self.journeys = journeys
        self.rules = rules
        self.clock_offset = clock_offset
        # Whether some score is not kept here (`reads.Reads.scores_partial`): a CRM task naming no signals
        # is then marked for the CRM connector to read the person's top scores (`actions`).
        self.scores_partial: Callable[[], bool] = _never
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
        self.m_not_entered = meter.create_counter(
            "cdp.orchestration.not_entered",
            unit="{decision}",
            description="refused entries recorded (NOT_ENTERED decisions written), by rule",
        )
        self.m_held_expired = meter.create_counter(
            "cdp.orchestration.held.expired",
            unit="{decision}",
            description="actions decided on fields lagging behind the person's events because their "
            "profile_wait ran out (reason profile_unavailable), by kind",
        )

    # --- instances -----------------------------------------------------------------------------------------

    async def step(
        self, hot: Partition, batch: Batch, person: Person, instance: Instance, stimulus: Stimulus, now: float
    ) -> None:
        """One stimulus to one of the person's instances, and what it asks for carried out."""
        journey = await self.version(instance.journey_id, instance.version)
        if journey is None:
            if (instance.journey_id, instance.version) in self.journeys.invalid:
                return  # out of service, logged once when it was read: the instance holds where it is
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
        await self.carry(hot, batch, person, after, commands, now)

    async def enter(
        self,
        hot: Partition,
        batch: Batch,
        person: Person,
        journey,
        trigger: str,
        stimulus: Enter,
        now: float,
        *,
        before: str = "",
    ) -> tuple[bool, str, str]:
        """(entered, instance id, reason) for one trigger of one journey. `before`: the id the same trigger had
        in a build before this one (an event's messageId alone, now `<source id>:<messageId>`)."""
        instance = new_instance(journey, person.person_id, trigger)
        if instance.id in person.live or (
            # Only a person who entered this journey before can have started it with this trigger (an entry is
            # recorded with its instance, in one commit), unless they were merged away: their entries went.
            (journey.id in person.entered or person.merged_into)
            and await self.store.get(INSTANCES, instance.id) is not None
        ):
            return True, instance.id, "admitted"  # this trigger started it already
        if before and (person.merged_into or person.entered.get(journey.id, -1.0) >= now):
            # Applied again (a batch not acknowledged before a stop): the person entered this journey at this
            # input's time or later, maybe under the id an earlier build gave the trigger. Instances keep the
            # ids they were made with; live, no input reads the store here.
            earlier = instance_id(journey.id, person.person_id, before)
            if earlier in person.live or await self.store.get(INSTANCES, earlier) is not None:
                return True, earlier, "admitted"
        running = person.live.running(journey.id)  # counted as instances are set and removed (`wakes.Live`)
        history = entry.EntryHistory(running=running, last_entered_at=person.entered.get(journey.id))
        admission = entry.admit(journey, history, now)
        if not admission.admitted:
            reason = refusal_reason(journey, admission.reason, history.last_entered_at, running)
            self.not_entered(batch, person, journey.id, REFUSED_BY[admission.reason], reason, now)
            return False, "", admission.reason
        person.refusals.pop(journey.id, None)
        person.entered[journey.id] = now
        person.dirty = True
        self.m_entries.add(1, {"journey": journey.id})
        self.count(hot, batch, journey.id, journey.version, lambda s: s.__setitem__("entered", s["entered"] + 1))
        await self.step(hot, batch, person, instance, stimulus, now)
        return True, instance.id, "admitted"

    def not_entered(self, batch: Batch, person: Person, journey_id: str, rule: str, reason: str, now: float) -> None:
        """Record that a trigger of `journey_id` did not enter the person, and why (see the module docstring).
        The reason names the journey's rule, never the person's values."""
        last = person.refusals.get(journey_id)
        if last is not None and last[0] == rule and now - last[1] < REFUSAL_REFRESH:
            return
        person.refusals[journey_id] = (rule, now)
        batch.put(
            DECISIONS,
            not_entered_key(person.person_id, journey_id),
            {
                "action_id": "",
                "journey_id": journey_id,
                "instance_id": "",
                "person_id": person.person_id,
                "node_id": "",
                "channel": "",
                "category": "",
                "kind": NOT_ENTERED,
                "reason": reason,
                "rule": rule,
                "until": None,
                "at": now,
            },
        )
        self.m_not_entered.add(1, {"rule": rule})

    def paused(self, batch: Batch, person: Person, journey_id: str, now: float) -> None:
        """A trigger of a paused journey reached the person."""
        self.not_entered(batch, person, journey_id, PAUSED, "not entered: journey paused", now)

    async def profile_changed(
        self,
        hot: Partition,
        batch: Batch,
        person: Person,
        now: float,
        *,
        fields: Iterable[str] | None = None,
        segments: Iterable[str] = (),
    ) -> None:
        """The person's view changed: their running instances decide again what reads it. `fields` / `segments`:
        what moved (the field keys, the segment ids), to offer the change only to the instances it can move
        (`wakes.py`); neither: every running instance (a merge, a split)."""
        if fields is None and not segments:
            offered = list(person.live.values())
        else:
            offered = person.offered(self.journeys, now, fields=fields or (), segments=segments)
        for instance in offered:
            if instance.status is Status.RUNNING:
                await self.step(hot, batch, person, instance, ProfileChanged(), now)

    async def enroll(self, hot: Partition, batch: Batch, person: Person, body: dict, now: float) -> None:
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
            if record.state is State.PAUSED:
                self.paused(batch, person, journey.id, now)
        elif not entry.enters_on_api(journey):
            answer = (False, "", "not_api_entry")
        else:
            answer = await self.enter(
                hot,
                batch,
                person,
                journey,
                f"enroll:{body['idempotency_key']}",
                Enter(properties=body.get("properties") or {}),
                now,
            )
        entered, instance_id, reason = answer
        # The person id lets a deletion find the answer (`privacy.forget`): its key is the caller's. The journey
        # id tells the key's two parts apart in the person's export (a journey id may hold ':').
        answer_doc = {"entered": entered, "instance_id": instance_id, "reason": reason, "at": now}
        batch.put(ENROLLMENTS, key, {**answer_doc, "person_id": person.person_id, "journey_id": body["journey_id"]})

    async def migrate(self, person: Person, body: dict) -> None:
        instance = person.live.get(body["instance_id"])
        new = await self.version(body["journey_id"], body["to_version"])
        if instance is None or new is None or instance.version != body["from_version"]:
            return
        plan = MigrationPlan(
            body["journey_id"], body["from_version"], body["to_version"], frozenset(body["moves"]), frozenset()
        )
        moved = migrate(instance, new, plan)
        if moved is not None:
            person.live[moved.id] = moved
            person.changed[moved.id] = moved

    # --- the domain's commands -------------------------------------------------------------------------------

    async def carry(
        self, hot: Partition, batch: Batch, person: Person, instance: Instance, commands: list[Command], now: float
    ) -> None:
        for command in commands:
            if isinstance(command, ScheduleTimer):
                timers.schedule_instance_timer(
                    batch,
                    person.person_id,
                    command.instance_id,
                    command.timer_id,
                    command.at,
                    clock_offset=self.clock_offset,
                )
            elif isinstance(command, CancelTimer):
                batch.messages.append(streams.cancel(batch.partition, command.timer_id))
            elif isinstance(command, ProposeAction):
                ruling = arbiter.decide(person.state, command.action, person.view(), self.rules, now)  # type: ignore[arg-type]
                await self.rule(hot, batch, person, ruling, now, proposed=command.action)
            elif isinstance(command, WithdrawAction):
                await self.rule(hot, batch, person, arbiter.withdraw(person.state, command.action_id, now), now)  # type: ignore[arg-type]
            elif isinstance(command, Assigned):

                def assigned(stats: dict, c: Assigned = command) -> None:
                    cell = stats["variants"].setdefault(c.node_id, {}).setdefault(c.variant, [0, 0])
                    cell[0] += 1

                self.count(hot, batch, command.journey_id, command.version, assigned)
            elif isinstance(command, RecordGoal):

                def converted(stats: dict, c: RecordGoal = command) -> None:
                    stats["converted"] += 1
                    for node_id, variant in c.variants.items():
                        stats["variants"].setdefault(node_id, {}).setdefault(variant, [0, 0])[1] += 1

                self.count(hot, batch, command.journey_id, command.version, converted)
            elif isinstance(command, End):

                def ended(stats: dict, c: End = command) -> None:
                    stats["ended"][c.reason] = stats["ended"].get(c.reason, 0) + 1

                self.count(hot, batch, instance.journey_id, instance.version, ended)

    async def rule(
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
        """Carry out an arbiter ruling for the person (`actions.record_ruling`)."""
        await actions.record_ruling(self, hot, batch, person, ruling, now, answer=answer, proposed=proposed)

    def count(
        self, hot: Partition, batch: Batch, journey_id: str, version: int, change: Callable[[dict], None]
    ) -> None:
        """Change this partition's counters of one journey version; written with the batch."""
        key = stats_key(journey_id, version, batch.partition)
        stats = hot.stats.get(key)
        if stats is None:
            stats = hot.stats[key] = stats_doc()
        change(stats)
        batch.stats.add(key)

    async def version(self, journey_id: str, version: int) -> Journey | None:
        """A published version; read from the store when this replica has not seen it yet (it was published
        through another replica and the announcement is still on its way)."""
        journey = self.journeys.version(journey_id, version)
        if journey is None and (journey_id, version) not in self.journeys.invalid:
            await self.journeys.reload(journey_id)
            journey = self.journeys.version(journey_id, version)
        return journey


def _never() -> bool:
    return False
