"""One person's run through one journey version, as a state machine:

    step(instance, journey, stimulus, view, now) -> (instance', commands)

Stimuli: `Enter`, `EventArrived`, `ProfileChanged` (traits, scores, consent or segments changed: `view`
already shows it), `TimerFired`, `ActionOutcome` (an arbiter decision about this instance's action),
`ExitRequest`. Commands: `ScheduleTimer`, `CancelTimer`, `ProposeAction`, `WithdrawAction`, `Assigned`
(a split chose a variant), `RecordGoal`, `End`.

Invariants:
- Deterministic: the same instance, stimulus, view and time give the same result. Ids are derived, never
  random: the instance id from (journey, person, trigger), timer and action ids from (instance, node,
  visit), so a replay after a crash proposes the same action id and the arbiter and channels can drop the
  duplicate. Split variants come from a hash of (person, journey, node): the same person always goes the
  same way, in every replay and every instance.
- Exit rules act on the stimulus that meets them, wherever the instance is: every timer is cancelled,
  every pending action withdrawn, and `End` carries the reason: "completed" (an exit step or a step
  without next), "exit_rule:<id>", "goal" (a goal with exit), or an `ExitRequest`'s own ("archived",
  "api:<reason>"). `steps` keeps the trail (the last MAX_STEPS) for GetInstance. Condition exit rules are
  checked on every stimulus against the view it brings; event exit rules on every event.
- A goal conversion (the goal event within its window after entry) is recorded once, before exit rules
  act on the same event, and is still watched after the instance ends, until the window closes. "After
  entry" compares event times: a goal event counts from the entry event's own time (`trigger_at`), not
  from when the entry was applied (the stream's time, later than any event time in the same batch), so
  a purchase sent right after the cart event converts even when both arrive together.
- An action step waits for the arbiter's final decision about its action (sent, capped, suppressed, ...)
  before moving on; deferred, superseded (held for a later slot) and awaiting approval are not final.
- Conditions read the person's view and the instance's entry properties (`entry.<name>`: the entry
  event's properties or the Enroll call's, kept from entry on).
- Conditions that time alone can make true (`traits.trial_ends_at < now`, an event leaving its window) are
  rechecked by one timer per instance at `next_change`, so a wait or exit on them acts on time, not on
  the next unrelated stimulus.
- Nothing is decided on fields that lag behind the person's events (`PersonView.behind`: an identify sent
  in one batch with the event that led here has not reached them yet): a branch, a wait's condition and a
  delay until a time of day (in the person's zone) reached then wait for the profile's change, and so do
  the exit conditions of an instance that entered then (`exits_held`); each at most FIELDS_WAIT after the
  earliest lagging event, then decided on the fields held. Their timers' ids are derived like any other's.
- A timer or outcome the instance no longer expects (cancelled, already handled) changes nothing.
- An ended instance never schedules, proposes or ends again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from cdp_orchestration.domain import clock
from cdp_orchestration.domain.arbiter import FINAL, Kind, ProposedAction
from cdp_orchestration.domain.conditions import ProfileCondition
from cdp_orchestration.domain.journey import (
    Action,
    Branch,
    Delay,
    ExitNode,
    Journey,
    Split,
    Variant,
    Wait,
)
from cdp_orchestration.domain.lifecycle import MigrationPlan
from cdp_orchestration.domain.view import Event, PersonView

RECHECK = "recheck"  # the timer kind that re-evaluates time-dependent conditions
BRANCH = "branch"  # the timer kind that decides a branch held for fields lagging behind (`advance`)
FIELDS = "fields"  # the timer kind that ends a wait's or a delay's hold for fields lagging behind (`advance`)
#: The longest a step waits for the fields to catch up with the person's events (the arbiter's default
#: `profile_wait`): then it is decided on the fields held, so a profile that stays away holds no one for ever.
FIELDS_WAIT = 600.0
BRANCH_WAIT = FIELDS_WAIT


class Status(StrEnum):
    NEW = "new"
    RUNNING = "running"
    ENDED = "ended"


# --- stimuli ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Enter:
    event: Event | None = None  # the entry event, when an event let the person in
    # What templates read as `entry.<name>`: an Enroll call's properties; by default the entry event's.
    properties: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class EventArrived:
    event: Event


@dataclass(frozen=True, slots=True)
class ProfileChanged:
    pass


@dataclass(frozen=True, slots=True)
class TimerFired:
    timer_id: str


@dataclass(frozen=True, slots=True)
class ActionOutcome:
    action_id: str
    kind: Kind


@dataclass(frozen=True, slots=True)
class ExitRequest:
    reason: str = "exit requested"


Stimulus = Enter | EventArrived | ProfileChanged | TimerFired | ActionOutcome | ExitRequest


# --- commands ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScheduleTimer:
    timer_id: str
    instance_id: str
    at: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    timer_id: str


@dataclass(frozen=True, slots=True)
class ProposeAction:
    action: ProposedAction


@dataclass(frozen=True, slots=True)
class WithdrawAction:
    action_id: str
    person_id: str


@dataclass(frozen=True, slots=True)
class Assigned:
    instance_id: str
    journey_id: str
    version: int
    node_id: str
    variant: str
    control: bool


@dataclass(frozen=True, slots=True)
class RecordGoal:
    instance_id: str
    journey_id: str
    version: int
    variants: Mapping[str, str]  # split node id -> variant, for the experiment's counts
    at: float


@dataclass(frozen=True, slots=True)
class End:
    instance_id: str
    reason: str
    at: float


Command = ScheduleTimer | CancelTimer | ProposeAction | WithdrawAction | Assigned | RecordGoal | End


# --- the instance -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """One line of an instance's trail: at `node_id`, at time `at`, what happened."""

    node_id: str
    at: float
    outcome: str  # entered, branch:<n>|branch:else, variant:<name>, action:<id>, <decision kind>, met,
    # timeout, delay, goal, exit; the trail keeps the last MAX_STEPS


MAX_STEPS = 100


@dataclass(frozen=True, slots=True)
class Timer:
    id: str
    at: float
    node_id: str  # "" for a recheck
    kind: str  # "delay" | "timeout" | RECHECK | BRANCH | FIELDS


@dataclass(frozen=True, slots=True)
class Instance:
    id: str
    journey_id: str
    version: int
    person_id: str
    status: Status = Status.NEW
    node: str | None = None  # the step it is at
    entered_at: float | None = None
    # The entry event's own time (else `entered_at`): goal events count from here.
    trigger_at: float | None = None
    visits: Mapping[str, int] = field(default_factory=dict)  # node id -> times entered
    timers: tuple[Timer, ...] = ()
    pending: tuple[str, ...] = ()  # action ids proposed and not yet finally decided
    variants: Mapping[str, str] = field(default_factory=dict)  # split node id -> variant name
    goal_until: float | None = None  # the goal window's end
    converted_at: float | None = None
    entry: Mapping[str, Any] = field(default_factory=dict)  # entry properties (templates' `entry.<name>`)
    steps: tuple[Step, ...] = ()
    ended_at: float | None = None
    end_reason: str | None = None

    def watching_goal(self, now: float) -> bool:
        """Whether an event could still count as this instance's goal (after it ended, too)."""
        return self.converted_at is None and self.goal_until is not None and now <= self.goal_until


def _stable(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:32]


def instance_id(journey_id: str, person_id: str, trigger_id: str) -> str:
    """The id of the instance a trigger (an event's `<source id>:<messageId>`, an Enroll request id, a schedule
    slot) starts. Instances made before the event's source was part of it keep their ids (from the messageId
    alone): ids are stored, never derived again."""
    return "i" + _stable("instance", journey_id, person_id, trigger_id)


def action_id(instance: str, node_id: str, visit: int) -> str:
    return "a" + _stable("action", instance, node_id, visit)


def timer_id(instance: str, node_id: str, visit: int, kind: str) -> str:
    return "t" + _stable("timer", instance, node_id, visit, kind)


def reads_person(condition: ProfileCondition) -> bool:
    """Whether a condition reads anything of the person's that lags behind their events (fields, segments,
    event counts): one on the instance's entry properties alone (`entry.total > 100`) never waits for them."""
    return bool(
        condition.fields
        or condition.segments
        or condition.event_names
        or condition.computed_traits
        or condition.counted
    )


def split_point(person_id: str, journey_id: str, node_id: str) -> float:
    """A uniform number in [0, 1) fixed for (person, journey, node)."""
    digest = hashlib.sha256(f"split\x1f{journey_id}\x1f{node_id}\x1f{person_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_variant(person_id: str, journey_id: str, node_id: str, variants: Iterable[Variant]) -> Variant:
    """The variant a person gets at a split: weighted by the variants' weights, the same every time."""
    listed = tuple(variants)
    point = split_point(person_id, journey_id, node_id) * sum(v.weight for v in listed)
    for variant in listed:
        if point < variant.weight:
            return variant
        point -= variant.weight
    return listed[-1]  # rounding at the very top of the range


def new_instance(journey: Journey, person_id: str, trigger_id: str) -> Instance:
    """An instance that has not started; `step` it with `Enter`."""
    return Instance(instance_id(journey.id, person_id, trigger_id), journey.id, journey.version, person_id)


# --- the step function ------------------------------------------------------------------------------------------


def step(
    instance: Instance, journey: Journey, stimulus: Stimulus, view: PersonView, now: float
) -> tuple[Instance, list[Command]]:
    """The instance after `stimulus`, and what the service must do for it (in order)."""
    if (instance.journey_id, instance.version) != (journey.id, journey.version):
        raise ValueError(
            f"instance {instance.id} runs {instance.journey_id} v{instance.version}, not v{journey.version}"
        )
    run = _Run(instance, journey, view, now)
    run.handle(stimulus)
    return run.instance, run.commands


def migrate(instance: Instance, new: Journey, plan: MigrationPlan) -> Instance | None:
    """The instance moved to `new` by node id, or None when its step does not carry over (it stays)."""
    if (instance.journey_id, instance.version) != (
        plan.journey_id,
        plan.from_version,
    ) or new.version != plan.to_version:
        raise ValueError(f"plan {plan.from_version}->{plan.to_version} does not fit instance {instance.id}")
    if instance.status is not Status.RUNNING or instance.node not in plan.moves:
        return None
    # Timers and pending actions keep their ids (they are derived from node ids and visits, which carry over).
    return replace(instance, version=new.version)


class _Run:
    def __init__(self, instance: Instance, journey: Journey, view: PersonView, now: float) -> None:
        self.instance = instance
        self.journey = journey
        self.view = view
        self.now = now
        self.commands: list[Command] = []

    def set(self, **changes: object) -> None:
        self.instance = replace(self.instance, **changes)  # type: ignore[arg-type]

    def holds(self, condition: ProfileCondition) -> bool:
        """A condition answered for the person now, with this instance's entry fields."""
        return condition.holds(self.view, self.now, self.instance.entry)

    def handle(self, stimulus: Stimulus) -> None:
        self.react(stimulus)
        if self.instance.status is Status.RUNNING:
            self.rearm()

    def react(self, stimulus: Stimulus) -> None:
        status = self.instance.status
        if status is Status.ENDED:
            if isinstance(stimulus, EventArrived):
                self.goal(stimulus.event)
            return
        if status is Status.NEW:
            if not isinstance(stimulus, Enter):
                return  # nothing happens to an instance that has not entered
            self.enter(stimulus)
            return
        if isinstance(stimulus, Enter):
            return  # a redelivered entry
        if isinstance(stimulus, ExitRequest):
            self.end(stimulus.reason)
            return
        if isinstance(stimulus, EventArrived):
            event = stimulus.event
            if self.goal(event) and self.journey.goal is not None and self.journey.goal.exit:
                self.end("goal")
                return
            for rule in self.journey.exits:
                if rule.event is not None and rule.event.matches(event):
                    self.end(f"exit_rule:{rule.id}")
                    return
        fired = None
        if isinstance(stimulus, TimerFired):
            fired = next((t for t in self.instance.timers if t.id == stimulus.timer_id), None)
            if fired is None or (fired.kind != RECHECK and fired.node_id != self.instance.node):
                return  # cancelled or already handled
            self.set(timers=tuple(t for t in self.instance.timers if t.id != fired.id))
        if self.exit_by_condition():
            return
        node = self.journey.nodes.get(self.instance.node or "")
        if isinstance(stimulus, EventArrived):
            if isinstance(node, Wait) and node.event is not None and node.event.matches(stimulus.event):
                self.leave_wait(node, node.next)
        elif isinstance(stimulus, ProfileChanged):
            if self.held(node):
                if self.view.behind is None:
                    self.release(node)  # the fields it waited for
            elif isinstance(node, Wait) and node.condition is not None and self.holds(node.condition):
                self.leave_wait(node, node.next)
            elif isinstance(node, Branch) and self.view.behind is None:
                self.take_branch(node)  # the fields it waited for
        elif fired is not None:
            if fired.kind == BRANCH and isinstance(node, Branch):
                self.take_branch(node)  # waited BRANCH_WAIT: decided on the fields held
            elif fired.kind == FIELDS and isinstance(node, Wait | Delay):
                self.release(node)  # waited FIELDS_WAIT: decided on the fields held
            elif fired.kind == RECHECK:
                # Time alone may have made a condition true: exit rules were checked above, now the wait's
                # (one held for lagging fields only once they caught up).
                if self.held(node):
                    if self.view.behind is None:
                        self.release(node)
                elif isinstance(node, Wait) and node.condition is not None and self.holds(node.condition):
                    self.leave_wait(node, node.next)
            elif isinstance(node, Delay):
                self.record(node.id, "delay")
                self.advance(node.next)
            elif isinstance(node, Wait):
                self.record(node.id, "timeout")
                self.drop_timers(node.id, FIELDS)  # a hold for the fields ends with the wait
                self.advance(node.timeout_next)
        elif isinstance(stimulus, ActionOutcome):
            if stimulus.action_id not in self.instance.pending or stimulus.kind not in FINAL:
                return
            self.set(pending=tuple(a for a in self.instance.pending if a != stimulus.action_id))
            if isinstance(node, Action) and not self.instance.pending:
                self.record(node.id, stimulus.kind.value)
                self.advance(node.next)

    def enter(self, stimulus: Enter) -> None:
        goal = self.journey.goal
        properties = stimulus.properties
        if properties is None:
            properties = stimulus.event.properties if stimulus.event is not None else {}
        trigger_at = self.now
        if stimulus.event is not None and 0 < stimulus.event.at < self.now:
            trigger_at = stimulus.event.at
        self.set(
            status=Status.RUNNING,
            entered_at=self.now,
            trigger_at=trigger_at,
            goal_until=self.now + goal.within if goal is not None else None,
            entry=dict(properties),
        )
        # While the fields lag behind the person's events (the entering event's own profile change is on its
        # way, as after an SDK's identify and track sent in one batch), exit conditions wait (`exits_held`).
        if not self.exit_by_condition():
            self.advance(self.journey.start)

    def goal(self, event: Event) -> bool:
        """Record a conversion if this event is the goal, in its window. True when it was recorded now."""
        goal = self.journey.goal
        instance = self.instance
        if goal is None or not instance.watching_goal(event.at) or instance.entered_at is None:
            return False
        since = instance.trigger_at if instance.trigger_at is not None else instance.entered_at
        if event.at < since or not goal.event.matches(event):
            return False
        self.set(converted_at=event.at)
        self.record(instance.node or "", "goal", at=event.at)
        self.commands.append(
            RecordGoal(instance.id, instance.journey_id, instance.version, dict(instance.variants), event.at)
        )
        return True

    def exits_held(self) -> bool:
        """Whether the exit conditions wait for the fields: they lag behind an event applied at or before this
        instance's entry (the entering event's own change is on its way, as after an SDK's identify and track
        sent in one batch), for at most FIELDS_WAIT after it. Fields that lag so read the person as they were
        before: `not traits.email exists` ended the instance of everyone who gave their email in the identify,
        at entry or on the batch's next event. A change that brings every event up to the entry decides them
        (fields newer than the entry, though a later event's change is still on its way, show the person at
        some instant after it, as any running instance reads them)."""
        behind, entered = self.view.behind, self.instance.entered_at
        return behind is not None and entered is not None and behind <= entered and self.now < behind + FIELDS_WAIT

    def exit_by_condition(self) -> bool:
        held = self.exits_held()
        for rule in self.journey.exits:
            if rule.condition is None or (held and reads_person(rule.condition)):
                continue
            if self.holds(rule.condition):
                self.end(f"exit_rule:{rule.id}")
                return True
        return False

    def end(self, reason: str) -> None:
        instance = self.instance
        for timer in instance.timers:
            self.commands.append(CancelTimer(timer.id))
        for pending in instance.pending:
            self.commands.append(WithdrawAction(pending, instance.person_id))
        self.set(status=Status.ENDED, timers=(), pending=(), ended_at=self.now, end_reason=reason)
        self.commands.append(End(instance.id, reason, self.now))

    def rearm(self) -> None:
        """Keep one recheck timer at the earliest instant time alone may change an exit rule's condition or
        the condition being waited for (`now - 30d` comparisons, windows of events the view carries)."""
        conditions = [rule.condition for rule in self.journey.exits if rule.condition is not None]
        # Exit conditions held for lagging fields are decided at the hold's end if no change comes first.
        held = self.exits_held() and any(reads_person(c) for c in conditions)
        bound = self.view.behind + FIELDS_WAIT if held else None  # type: ignore[operator]
        node = self.journey.nodes.get(self.instance.node or "")
        if isinstance(node, Wait) and node.condition is not None:
            conditions.append(node.condition)
        at = min(
            (t for c in conditions if (t := c.next_change(self.view, self.now, self.instance.entry)) is not None),
            default=bound,
        )
        if bound is not None and at is not None:
            at = min(at, bound)
        current = next((t for t in self.instance.timers if t.kind == RECHECK), None)
        if current is not None and current.at == at:
            return
        if current is not None:
            self.commands.append(CancelTimer(current.id))
            self.set(timers=tuple(t for t in self.instance.timers if t.id != current.id))
        if at is not None:
            timer = Timer(timer_id(self.instance.id, "", repr(at), RECHECK), at, "", RECHECK)
            self.set(timers=(*self.instance.timers, timer))
            self.commands.append(ScheduleTimer(timer.id, self.instance.id, at))

    def record(self, node_id: str, outcome: str, *, at: float | None = None) -> None:
        steps = (*self.instance.steps, Step(node_id, self.now if at is None else at, outcome))
        self.set(steps=steps[-MAX_STEPS:])

    def leave_wait(self, node: Wait, target: str | None) -> None:
        self.record(node.id, "met")
        for timer in self.instance.timers:
            if timer.node_id == node.id:
                self.commands.append(CancelTimer(timer.id))
        self.set(timers=tuple(t for t in self.instance.timers if t.node_id != node.id))
        self.advance(target)

    def branch_target(self, node: Branch) -> str | None:
        taken = next((i for i, (c, _) in enumerate(node.branches) if self.holds(c)), None)
        self.record(node.id, "branch:else" if taken is None else f"branch:{taken}")
        return node.otherwise if taken is None else node.branches[taken][1]

    def take_branch(self, node: Branch) -> None:
        """Decide a branch that waited for the fields (`advance`), its timer cancelled, and walk on."""
        for timer in self.instance.timers:
            if timer.node_id == node.id and timer.kind == BRANCH:
                self.commands.append(CancelTimer(timer.id))
        self.set(timers=tuple(t for t in self.instance.timers if not (t.node_id == node.id and t.kind == BRANCH)))
        self.advance(self.branch_target(node))

    def held(self, node: object) -> bool:
        """Whether `node`, a wait or a delay reached while the fields lagged, still waits for them (`advance`)."""
        return isinstance(node, Wait | Delay) and any(
            t.node_id == node.id and t.kind == FIELDS for t in self.instance.timers
        )

    def drop_timers(self, node_id: str, kind: str) -> None:
        for timer in self.instance.timers:
            if timer.node_id == node_id and timer.kind == kind:
                self.commands.append(CancelTimer(timer.id))
        self.set(timers=tuple(t for t in self.instance.timers if not (t.node_id == node_id and t.kind == kind)))

    def release(self, node: Wait | Delay) -> None:
        """Decide a wait or delay held for lagging fields on the fields now (caught up, or held FIELDS_WAIT)."""
        self.drop_timers(node.id, FIELDS)
        if isinstance(node, Wait):
            if node.condition is not None and self.holds(node.condition):
                self.leave_wait(node, node.next)
            return  # else it waits on, for its timeout or a change, as any wait
        # The time of day counts from when the delay was reached (its trail's last "entered"): a change
        # arriving past 09:00 makes a delay reached before 09:00 due at once, not the next day.
        reached = next(
            (s.at for s in reversed(self.instance.steps) if s.node_id == node.id and s.outcome == "entered"), None
        )
        at = self.time_of_day(node, self.now if reached is None else reached)
        self.schedule(node.id, self.instance.visits.get(node.id, 1), "delay", max(self.now, at))

    def time_of_day(self, node: Delay, since: float) -> float:
        assert node.until is not None
        return clock.next_time_of_day(since, *node.until, clock.zone(self.view.timezone, self.journey.timezone))

    def schedule(self, node_id: str, visit: int, kind: str, at: float) -> None:
        timer = Timer(timer_id(self.instance.id, node_id, visit, kind), at, node_id, kind)
        self.set(timers=(*self.instance.timers, timer))
        self.commands.append(ScheduleTimer(timer.id, self.instance.id, at))

    def advance(self, target: str | None) -> None:
        """Walk from `target` through steps that do not wait, to one that does or to the end."""
        journey = self.journey
        # Validation forbids loops without a wait, so a walk visits each step at most once.
        for _ in range(len(journey.nodes) + 1):
            if target is None:
                self.end("completed")
                return
            node = journey.nodes[target]
            visit = self.instance.visits.get(target, 0) + 1
            self.set(node=target, visits={**self.instance.visits, target: visit})
            if isinstance(node, Delay | Wait):
                self.record(target, "entered")
            if isinstance(node, Delay):
                if node.seconds is not None:
                    self.schedule(target, visit, "delay", self.now + node.seconds)
                elif self.view.behind is not None:
                    # The person's zone (`traits.timezone`) may be what the lagging change sets (an identify
                    # sent with the event that led here): 09:00 in the journey's zone is 04:00 in New York.
                    # It waits for the change (`release`), at most FIELDS_WAIT.
                    self.schedule(target, visit, FIELDS, max(self.now, self.view.behind + FIELDS_WAIT))
                else:
                    self.schedule(target, visit, "delay", self.time_of_day(node, self.now))
                return
            if isinstance(node, Wait):
                if node.condition is not None and self.view.behind is not None and reads_person(node.condition):
                    # Its condition read on fields lagging behind the person's events: "met" at once on a
                    # plan the batch's identify has just changed. It waits, its timeout running, and the
                    # change decides it (`release`), at most FIELDS_WAIT.
                    self.schedule(target, visit, "timeout", self.now + node.timeout)
                    self.schedule(target, visit, FIELDS, max(self.now, self.view.behind + FIELDS_WAIT))
                    return
                if node.condition is not None and self.holds(node.condition):
                    self.record(target, "met")
                    target = node.next
                    continue
                self.schedule(target, visit, "timeout", self.now + node.timeout)
                return
            if isinstance(node, Branch):
                if self.view.behind is not None and any(reads_person(c) for c, _ in node.branches):
                    # The fields lag behind the person's events (an identify's traits, sent just before the
                    # event that entered them, are on their way): a branch on them went the wrong way for
                    # everyone who set them in the same batch. It waits for the profile change.
                    self.schedule(target, visit, BRANCH, max(self.now, self.view.behind + BRANCH_WAIT))
                    return
                target = self.branch_target(node)
                continue
            if isinstance(node, Split):
                variant = assign_variant(self.instance.person_id, journey.id, node.id, node.variants)
                if node.id not in self.instance.variants:
                    self.set(variants={**self.instance.variants, node.id: variant.name})
                    self.commands.append(
                        Assigned(self.instance.id, journey.id, journey.version, node.id, variant.name, variant.control)
                    )
                self.record(target, f"variant:{variant.name}")
                target = variant.next
                continue
            if isinstance(node, Action):
                self.propose(node, visit)
                return
            assert isinstance(node, ExitNode)
            self.record(target, "exit")
            self.end("completed")
            return
        raise AssertionError(f"journey {journey.id} v{journey.version} loops without waiting (validation missed it)")

    def propose(self, node: Action, visit: int) -> None:
        instance = self.instance
        proposed = ProposedAction(
            action_id=action_id(instance.id, node.id, visit),
            person_id=instance.person_id,
            journey_id=instance.journey_id,
            journey_version=instance.version,
            instance_id=instance.id,
            node_id=node.id,
            channel=node.channel,
            category=node.category,
            purpose=node.purpose,
            priority=self.journey.priority,
            proposed_at=self.now,
            value=node.value,
            approval=node.approval,
            rank_by=node.rank_by,
            on_cap=node.on_cap,
            expires_at=self.now + node.expires_after if node.expires_after is not None else None,
        )
        self.set(pending=(*instance.pending, proposed.action_id))
        self.record(node.id, f"action:{proposed.action_id}")
        self.commands.append(ProposeAction(proposed))
