"""A journey: one immutable version of a graph of steps, as the rest of the domain reads it.

`Journey` holds the entry, re-entry rule and concurrency cap, exit rules, goal and the steps by id: `Delay`,
`Wait`, `Branch`, `Split` (weighted `Variant`s, one may be the control group), `Action` and `ExitNode`.
A step's `next` of None ends the instance (completed). Conditions are compiled `ProfileCondition`s, event
filters `EventFilter`s (see `conditions`), templates compiled `Template`s, so a Journey is only ever built
valid: `document.parse_journey` reads and validates the written form. A change is a new version
(see `lifecycle`); `document` keeps the version as written, which is what the service stores.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cdp_orchestration.domain.conditions import EventFilter, ProfileCondition
from cdp_orchestration.domain.templates import Template

# The channel names of actions.<channel> (the channel adapters answer to the same names).
CHANNELS = ("email", "sms", "push", "webpush", "webhook", "inapp", "crm")
CRM = "crm"  # the channel whose actions become CRM tasks and cases (and carry signals)
CRM_KINDS = ("task", "case")  # what a crm action's template `kind` may be (task when it has none)
REENTRY = ("never", "cooldown", "always")
NODE_TYPES = ("delay", "wait", "branch", "split", "action", "exit")
# What an action does when a frequency cap turns it away: wait for the cap's next period, or end ("capped").
DROP = "drop"
ON_CAP = ("defer", DROP)


@dataclass(frozen=True, slots=True)
class EventEntry:
    event: EventFilter
    condition: ProfileCondition | None = None


@dataclass(frozen=True, slots=True)
class SegmentEntry:
    segment: str
    on: str  # "entered" | "exited"


@dataclass(frozen=True, slots=True)
class ApiEntry:
    pass


@dataclass(frozen=True, slots=True)
class ScheduleEntry:
    cron: str
    segment: str


Entry = EventEntry | SegmentEntry | ApiEntry | ScheduleEntry


@dataclass(frozen=True, slots=True)
class ExitRule:
    id: str  # as written, or the rule's position ("0", "1", ...): end reasons cite it as exit_rule:<id>
    event: EventFilter | None = None
    condition: ProfileCondition | None = None


@dataclass(frozen=True, slots=True)
class Goal:
    event: EventFilter
    within: float
    exit: bool = False  # end the instance when the goal is reached


@dataclass(frozen=True, slots=True)
class Delay:
    id: str
    next: str | None
    seconds: float | None = None
    until: tuple[int, int] | None = None  # (hour, minute) in the person's zone


@dataclass(frozen=True, slots=True)
class Wait:
    id: str
    next: str | None
    timeout: float
    timeout_next: str | None
    event: EventFilter | None = None
    condition: ProfileCondition | None = None


@dataclass(frozen=True, slots=True)
class Branch:
    id: str
    branches: tuple[tuple[ProfileCondition, str | None], ...]
    otherwise: str | None


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    weight: float
    next: str | None
    control: bool = False


@dataclass(frozen=True, slots=True)
class Split:
    id: str
    variants: tuple[Variant, ...]


@dataclass(frozen=True, slots=True)
class Action:
    id: str
    next: str | None
    channel: str
    template: Template
    category: str
    purpose: str
    value: float | None = None  # what the action is worth or gives away (a discount); approval gates read it
    approval: bool = False  # always needs approval, whatever the value
    rank_by: str | None = None  # a score field ranking this action among equal-priority ones
    on_cap: str = "defer"  # one of ON_CAP
    expires_after: float | None = None  # how long after it is proposed the action is still worth sending
    # crm only: the profile fields (flat keys) its task or case carries as context; none: the top scores
    signals: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ExitNode:
    id: str


Node = Delay | Wait | Branch | Split | Action | ExitNode


@dataclass(frozen=True, eq=False)
class Journey:
    id: str
    version: int
    name: str
    priority: int
    category: str
    timezone: str
    entry: Entry
    reentry: str
    cooldown: float | None
    max_concurrent: int
    exits: tuple[ExitRule, ...]
    goal: Goal | None
    start: str
    nodes: Mapping[str, Node]
    document: Mapping[str, Any] = field(repr=False)  # as written; what the service stores

    def successors(self, node_id: str) -> tuple[str, ...]:
        return _successors(self.nodes[node_id])

    @property
    def computed_traits(self) -> tuple[dict[str, Any], ...]:
        """Profile computed-trait definitions the journey's conditions read (register them with profile)."""
        seen: dict[str, dict[str, Any]] = {}
        for condition in _conditions(self):
            for definition in condition.computed_traits:
                seen.setdefault(definition["name"], definition)
        return tuple(seen.values())

    @property
    def counted(self) -> frozenset[str]:
        """The computed traits of kind count or sum its conditions read as 0 where a person has none (field
        keys); stored with the version, so it is compiled the same way again (`document_fields.Catalogue`)."""
        found: set[str] = set()
        for condition in _conditions(self):
            found |= condition.counted
        return frozenset(found)

    @property
    def segments(self) -> frozenset[str]:
        """The segments it enters on (or is scheduled over) and whose membership its conditions read."""
        found: set[str] = set()
        if isinstance(self.entry, SegmentEntry | ScheduleEntry):
            found.add(self.entry.segment)
        for condition in _conditions(self):
            found |= condition.segments
        return frozenset(found)

    @property
    def fields_read(self) -> frozenset[str]:
        """The profile fields (flat keys) its conditions, templates, rankings and signals read."""
        found: set[str] = set()
        for condition in _conditions(self):
            found |= condition.fields
        for node in self.nodes.values():
            if isinstance(node, Action):
                found |= node.template.fields
                found.update(node.signals)
                if node.rank_by:
                    found.add(node.rank_by)
        return frozenset(found)


def _successors(node: Node) -> tuple[str, ...]:
    if isinstance(node, Delay | Action):
        targets: Iterable[str | None] = (node.next,)
    elif isinstance(node, Wait):
        targets = (node.next, node.timeout_next)
    elif isinstance(node, Branch):
        targets = (*(target for _, target in node.branches), node.otherwise)
    elif isinstance(node, Split):
        targets = (variant.next for variant in node.variants)
    else:
        targets = ()
    return tuple(dict.fromkeys(t for t in targets if t is not None))


def _conditions(journey: Journey) -> Iterable[ProfileCondition]:
    if isinstance(journey.entry, EventEntry) and journey.entry.condition is not None:
        yield journey.entry.condition
    for rule in journey.exits:
        if rule.condition is not None:
            yield rule.condition
    for node in journey.nodes.values():
        if isinstance(node, Wait) and node.condition is not None:
            yield node.condition
        elif isinstance(node, Branch):
            yield from (condition for condition, _ in node.branches)
