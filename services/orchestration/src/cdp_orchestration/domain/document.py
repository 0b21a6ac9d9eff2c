"""The journey document: JSON or YAML in, a valid `Journey` out, or every problem with it.

    {"id": "abandoned-cart", "version": 1, "name": "Abandoned cart", "priority": 50, "category": "reminder",
     "timezone": "UTC",                               # for people whose profile has no traits.timezone
     "entry": {"event": "Cart Abandoned", "where": "properties.total > 0", "if": "traits.country = \"DE\""}
           |  {"segment": "vip", "on": "entered"}     # or "exited"
           |  {"api": true}                           # Enroll
           |  {"schedule": {"cron": "0 9 * * 1", "segment": "vip"}},   # each member's own 09:00 Monday
     "reentry": "never" | "always" | {"cooldown": "7d"},  "max_concurrent": 1,
     "exit": [{"id": "purchased", "event": "Order Completed"}, {"condition": "traits.unsubscribed = true"}],
     "goal": {"event": "Order Completed", "within": "3d"},
     "start": "wait",                                 # default: the first node
     "nodes": [
       {"id": "wait", "type": "delay", "duration": "1h", "next": "remind"},       # or "until": "09:00"
       {"id": "remind", "type": "action", "channel": "email", "purpose": "Marketing", "category": "reminder",
        "template": {"subject": "{{ traits.first_name }}, your cart", "body": "..."},
        "value": 20, "approval": false, "rank_by": "scores.conversion",
        "on_cap": "defer", "expires_after": "2d", "next": "check"},   # on_cap "drop": a full cap ends it
       {"id": "case", "type": "action", "channel": "crm", "purpose": "Service",
        "template": {"kind": "case", "subject": "...", "body": "..."},
        "signals": ["scores.churn_risk", "computed.tickets_30d", "traits.plan"]},  # none: the top 5 scores
       {"id": "check", "type": "wait", "event": "Order Completed", "timeout": "2d",
        "next": "done", "timeout_next": "split"},                               # or "condition": "..."
       {"id": "branch", "type": "branch", "branches": [{"if": "scores.churn_risk > 0.8", "next": "x"}],
        "else": "y"},
       {"id": "split", "type": "split", "variants": [{"name": "a", "weight": 50, "next": "remind"},
                                                    {"name": "control", "weight": 50, "control": true}]},
       {"id": "done", "type": "exit"}]}

A step without "next" ends the instance (completed). Conditions are the segment language (text or JSON
tree); event filters are `event` (a name or a list of names) plus an optional `where` on the event's
properties and context (see `conditions`). Branch, wait and exit conditions, and templates, may also read
the instance's entry fields as `entry.<name>` (`"if": "entry.total > 100"`): the entry event's properties
or the Enroll call's. A segment or schedule entry brings none, so reading one there is a problem. An event
entry's own `if` reads the event's properties the same way, beside the person's fields, so it can say
what its `where` cannot: `entry.product_id in computed.viewed_skus_30d`.

`parse_journey(document, catalogue)` returns a `Journey` or raises `JourneyInvalid` holding EVERY problem
found, each naming the node id ("" for the journey's own fields) and the field within it, e.g. node
"remind", field "purpose" (`Problem.path`: "nodes.remind.purpose"). It checks: unknown or missing next;
unreachable nodes; a cycle through which an instance could loop without waiting (no delay or wait on it);
durations, times of day, cron expressions, time zones; conditions and templates (syntax, and fields against
the catalogue when it lists them); event names (of the entry, waits, exits, the goal, and the events
conditions count) against the catalogue when it lists them; channels; entry fields against the entry; an
action's `on_cap` and `expires_after`; a crm action's `signals` (profile fields, against the catalogue);
and that every action names the consent purpose it is sent under.

Names are only as checked as the catalogue is full: without one (`Catalogue()`, or a catalogue without
events) a misspelt event name, field or segment is accepted and simply never matches. The service passes
the catalogue it has (its catalogue file and the profile service's computed traits), so an unknown event
is refused, naming the node and field that wrote it, only where a catalogue lists events. The document is kept as written
(`Journey.document`); a Journey is immutable: a change is a new version (see `lifecycle`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from croniter import croniter

from cdp_kit.durations import parse_duration
from cdp_kit.errors import InvalidArgument
from cdp_kit.profile_fields import ROOTS
from cdp_kit.yamltext import YAMLError, load_yaml
from cdp_orchestration.domain import clock
from cdp_orchestration.domain.conditions import EventFilter, ProfileCondition, event_filter, profile_condition
from cdp_orchestration.domain.journey import (
    CHANNELS,
    CRM,
    CRM_KINDS,
    NODE_TYPES,
    ON_CAP,
    Action,
    ApiEntry,
    Branch,
    Delay,
    Entry,
    EventEntry,
    ExitNode,
    ExitRule,
    Goal,
    Journey,
    Node,
    ScheduleEntry,
    SegmentEntry,
    Split,
    Variant,
    Wait,
)
from cdp_orchestration.domain.templates import RefusedTemplate, Template, compile_template

MAX_NODES = 500
MAX_SIGNALS = 20  # fields a CRM task or case carries as context: enough for a person to read at a glance

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Catalogue:
    """What the platform knows exists; None means "not checked". Field keys are flat ("traits.plan").

    `fields` is every field there is; `names` is the known names under some roots only ("computed" ->
    the computed traits the profile service defines), the other roots unchecked: traits are open-ended,
    while a computed trait or a score that nothing produces would silently read as missing for ever."""

    events: frozenset[str] | None = None
    fields: frozenset[str] | None = None
    segments: frozenset[str] | None = None
    purposes: frozenset[str] | None = None
    names: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def unknown_fields(self, fields: frozenset[str]) -> list[str]:
        """The flat field keys among `fields` this catalogue says do not exist, sorted."""
        unknown = []
        for key in sorted(fields):
            root, _, name = key.partition(".")
            if (self.fields is not None and key not in self.fields) or (
                root in self.names and name not in self.names[root]
            ):
                unknown.append(key)
        return unknown


@dataclass(frozen=True, slots=True)
class Problem:
    node: str  # the node id; "" for the journey's own fields
    field: str  # within the node ("timeout", "branches[0].if"), or the journey's ("entry.event")
    message: str

    @property
    def path(self) -> str:
        """The field's full path in the document: "nodes.remind.purpose", "entry.event"."""
        return f"nodes.{self.node}.{self.field}" if self.node else self.field

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class JourneyInvalid(InvalidArgument):
    """Every problem found in a journey; `field` is the first one's (the gRPC layer's single BadRequest
    field), the message and `problems` hold them all."""

    def __init__(self, problems: list[Problem]) -> None:
        assert problems
        super().__init__(
            problems[0].path,
            "; ".join(map(str, problems)) if len(problems) > 1 else problems[0].message,
        )
        self.problems = tuple(problems)


def load_journey(text: str | bytes, catalogue: Catalogue | None = None, *, form: str = "json") -> Journey:
    """A journey from JSON or YAML text (`form`), validated as `parse_journey` does."""
    try:
        document = load_yaml(text) if form == "yaml" else orjson.loads(text)
    except (orjson.JSONDecodeError, YAMLError) as error:
        raise JourneyInvalid([Problem("", "journey", f"is not valid {form.upper()}: {error}")]) from None
    return parse_journey(document, catalogue)


def parse_journey(document: Any, catalogue: Catalogue | None = None, *, as_stored: bool = False) -> Journey:
    """The journey `document` describes; JourneyInvalid listing every problem if it is not a valid one.

    `as_stored` reads a version an earlier release stored: a template the validation now refuses is kept as a
    `RefusedTemplate` (its every render fails) rather than a problem, so its running instances carry on."""
    reader = _Reader(catalogue or Catalogue())
    reader.as_stored = as_stored
    journey = reader.journey(document)
    if reader.problems or journey is None:
        raise JourneyInvalid(reader.problems)
    return journey


class _Reader:
    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue
        self.problems: list[Problem] = []
        self.category = "marketing"  # the journey's; an action without its own category takes it
        # Whether the entry brings entry fields (`entry.<name>`): an event's properties, an Enroll call's.
        self.entry_fields = True
        self.as_stored = False  # see parse_journey

    def template(self, node_id: str, source: Any, at: str) -> Template | None:
        try:
            return compile_template(source, at)
        except InvalidArgument as error:
            texts = isinstance(source, Mapping) and all(isinstance(text, str) for text in source.values())
            if self.as_stored and texts and source:
                return RefusedTemplate(source, error.field)
            self.problem(node_id, error.field, error.description)
            return None

    # Each helper records problems instead of raising, so one pass reports all of them.
    def problem(self, node: str | None, at: str, message: str) -> None:
        """Record a problem; `at` is the full path, kept relative to the node when there is one."""
        prefix = f"nodes.{node}."
        field = at[len(prefix) :] if node and at.startswith(prefix) else at
        self.problems.append(Problem(node or "", field, message))

    def attempt(self, node: str | None, build: Callable[[], T]) -> T | None:
        try:
            return build()
        except InvalidArgument as error:
            self.problem(node, error.field, error.description)
            return None

    def journey(self, document: Any) -> Journey | None:
        if not isinstance(document, Mapping):
            self.problem(None, "journey", "must be an object with id, entry and nodes")
            return None
        known = {"id", "version", "name", "priority", "category", "timezone", "entry", "reentry"}
        known |= {"max_concurrent", "exit", "goal", "start", "nodes"}
        for key in document:
            if key not in known:
                self.problem(None, _key_path(None, key), f"unknown key; known: {', '.join(sorted(known))}")
        journey_id = document.get("id")
        if not isinstance(journey_id, str) or not journey_id or len(journey_id) > 128:
            self.problem(None, "id", "must be a non-empty string of at most 128 characters")
        version = document.get("version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            self.problem(None, "version", f"{version!r} must be a whole number from 1")
        name = document.get("name", journey_id if isinstance(journey_id, str) else "")
        if not isinstance(name, str):
            self.problem(None, "name", "must be a string")
        priority = document.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 1000:
            self.problem(None, "priority", f"{priority!r} must be a whole number from 0 to 1000 (higher goes first)")
        category = document.get("category", "marketing")
        if not isinstance(category, str) or not category:
            self.problem(None, "category", "must be a non-empty string, like 'marketing' or 'transactional'")
        else:
            self.category = category
        timezone = document.get("timezone", "UTC")
        if (why := clock.zone_problem(timezone)) is not None:
            self.problem(None, "timezone", why)
        entry = self.entry(document.get("entry"))
        self.entry_fields = not isinstance(entry, SegmentEntry | ScheduleEntry)
        reentry, cooldown = self.reentry(document.get("reentry", "never"))
        max_concurrent = document.get("max_concurrent", 1)
        if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or max_concurrent < 1:
            self.problem(None, "max_concurrent", f"{max_concurrent!r} must be a whole number from 1")
        exits = self.exits(document.get("exit", []))
        goal = self.goal(document.get("goal"))
        nodes = self.nodes(document.get("nodes"))
        start = document.get("start", next(iter(nodes), None))
        if not isinstance(start, str) or start not in nodes:
            if nodes or "start" in document:
                self.problem(None, "start", f"{start!r} is not the id of a node")
            start = None
        if start is not None:
            self.graph(document["nodes"], nodes, start)
        if self.problems or entry is None or start is None:
            return None
        return Journey(
            id=journey_id,
            version=version,
            name=name,
            priority=priority,
            category=category,
            timezone=timezone,
            entry=entry,
            reentry=reentry,
            cooldown=cooldown,
            max_concurrent=max_concurrent,
            exits=tuple(exits),
            goal=goal,
            start=start,
            nodes=nodes,
            document=document,
        )

    # --- journey-level parts ---

    def event(self, tree: Mapping[str, Any], at: str, node: str | None) -> EventFilter | None:
        names = tree.get("event")
        if names is None:
            self.problem(node, f"{at}.event", "is required: the event name (or a list of names)")
            return None
        found = self.attempt(node, lambda: event_filter(names, tree.get("where"), at))
        if found is not None and self.catalogue.events is not None:
            for name in sorted(found.names - self.catalogue.events):
                self.problem(node, f"{at}.event", f"{name!r} is not a known event; check the name's spelling and case")
        return found

    def condition(self, source: Any, at: str, node: str | None) -> ProfileCondition | None:
        """A condition; it may read entry fields where the entry brings them (`entry_reads`)."""
        if source is None:
            self.problem(node, at, "is required: a condition like scores.churn_risk > 0.8")
            return None
        found = self.attempt(node, lambda: profile_condition(source, at, entry=True))
        if found is None:
            return None
        for name in self.catalogue.unknown_fields(found.fields):
            self.problem(node, at, f"reads {name}, which is not a known profile field")
        if self.catalogue.segments is not None:
            for name in sorted(found.segments - self.catalogue.segments):
                self.problem(node, at, f"reads membership of segment {name!r}, which does not exist")
        if self.catalogue.events is not None:
            for name in sorted(found.event_names - self.catalogue.events):
                self.problem(node, at, f"{name!r} is not a known event; check the name's spelling and case")
        self.entry_reads(found.entry_fields, at, node)
        return found

    def entry_reads(self, names: frozenset[str], at: str, node: str | None) -> None:
        if self.entry_fields:
            return
        for name in sorted(names):
            self.problem(
                node,
                at,
                f"reads {name}, but a segment or schedule entry brings no entry fields "
                "(only an entry event's properties or an Enroll call's do)",
            )

    def segment(self, value: Any, at: str) -> str | None:
        if not isinstance(value, str) or not value:
            self.problem(None, at, f"{value!r} must be a segment id")
            return None
        if self.catalogue.segments is not None and value not in self.catalogue.segments:
            self.problem(None, at, f"{value!r} is not a known segment")
        return value

    def entry(self, tree: Any) -> Entry | None:
        if not isinstance(tree, Mapping):
            self.problem(
                None,
                "entry",
                'is required: {"event": ...}, {"segment": ..., "on": ...}, {"api": true} or {"schedule": ...}',
            )
            return None
        kinds = [kind for kind in ("event", "segment", "api", "schedule") if kind in tree]
        if len(kinds) != 1:
            self.problem(None, "entry", "needs exactly one of event, segment, api, schedule")
            return None
        kind = kinds[0]
        if kind == "event":
            self.known_keys(tree, ("event", "where", "if"), "entry", None)
            event = self.event(tree, "entry", None)
            # The event's properties are its entry fields here too (`entry.enters_on_event` passes them).
            condition = self.condition(tree["if"], "entry.if", None) if "if" in tree else None
            return EventEntry(event, condition) if event is not None else None
        if kind == "segment":
            self.known_keys(tree, ("segment", "on"), "entry", None)
            on = tree.get("on", "entered")
            if on not in ("entered", "exited"):
                self.problem(None, "entry.on", f"{on!r} must be 'entered' or 'exited'")
            segment = self.segment(tree["segment"], "entry.segment")
            return SegmentEntry(segment, on) if segment is not None else None
        if kind == "api":
            if tree["api"] is not True:
                self.problem(None, "entry.api", "must be true")
            return ApiEntry()
        schedule = tree["schedule"]
        if not isinstance(schedule, Mapping):
            self.problem(None, "entry.schedule", 'must be an object like {"cron": "0 9 * * 1", "segment": "vip"}')
            return None
        self.known_keys(schedule, ("cron", "segment"), "entry.schedule", None)
        cron = schedule.get("cron")
        if not isinstance(cron, str) or not croniter.is_valid(cron):
            self.problem(
                None, "entry.schedule.cron", f"{cron!r} is not a cron expression: like '0 9 * * 1' (09:00 Mondays)"
            )
            cron = None
        segment = self.segment(schedule.get("segment"), "entry.schedule.segment")
        return ScheduleEntry(cron, segment) if cron and segment else None

    def reentry(self, value: Any) -> tuple[str, float | None]:
        if value in ("never", "always"):
            return value, None
        if isinstance(value, Mapping) and list(value) == ["cooldown"]:
            seconds = self.attempt(None, lambda: parse_duration(value["cooldown"], "reentry.cooldown"))
            return "cooldown", seconds
        self.problem(None, "reentry", f'{value!r} must be "never", "always" or {{"cooldown": "7d"}}')
        return "never", None

    def exits(self, rules: Any) -> list[ExitRule]:
        if not isinstance(rules, list):
            self.problem(None, "exit", "must be a list of exit rules")
            return []
        found: list[ExitRule] = []
        ids: set[str] = set()
        for i, rule in enumerate(rules):
            at = f"exit[{i}]"
            if not isinstance(rule, Mapping) or ("event" in rule) == ("condition" in rule):
                self.problem(None, at, 'must be {"event": ..., "where": ...} or {"condition": ...}')
                continue
            rule_id = rule.get("id", str(i))
            if not isinstance(rule_id, str) or not rule_id or rule_id in ids:
                self.problem(None, f"{at}.id", f"{rule_id!r} must be a name unique among the exit rules")
                continue
            ids.add(rule_id)
            if "event" in rule:
                self.known_keys(rule, ("id", "event", "where"), at, None)
                event = self.event(rule, at, None)
                if event is not None:
                    found.append(ExitRule(rule_id, event=event))
            else:
                self.known_keys(rule, ("id", "condition"), at, None)
                condition = self.condition(rule["condition"], f"{at}.condition", None)
                if condition is not None:
                    found.append(ExitRule(rule_id, condition=condition))
        return found

    def goal(self, tree: Any) -> Goal | None:
        if tree is None:
            return None
        if not isinstance(tree, Mapping):
            self.problem(None, "goal", 'must be an object like {"event": "Order Completed", "within": "3d"}')
            return None
        self.known_keys(tree, ("event", "where", "within", "exit"), "goal", None)
        event = self.event(tree, "goal", None)
        within = self.attempt(None, lambda: parse_duration(tree.get("within"), "goal.within"))
        stop = tree.get("exit", False)
        if not isinstance(stop, bool):
            self.problem(None, "goal.exit", "must be true or false")
        if event is None or within is None:
            return None
        return Goal(event, within, stop is True)

    def known_keys(self, tree: Mapping[str, Any], allowed: tuple[str, ...], at: str, node: str | None) -> None:
        for key in tree:
            if key not in allowed:
                self.problem(node, _key_path(at, key), f"unknown key here; known: {', '.join(allowed)}")

    # --- nodes ---

    def nodes(self, items: Any) -> dict[str, Node]:
        if not isinstance(items, list) or not items:
            self.problem(None, "nodes", "must be a non-empty list of steps")
            return {}
        if len(items) > MAX_NODES:
            self.problem(None, "nodes", f"has {len(items)} steps; at most {MAX_NODES}")
            return {}
        found: dict[str, Node] = {}
        for i, item in enumerate(items):
            if not isinstance(item, Mapping) or not isinstance(item.get("id"), str) or not item["id"]:
                self.problem(None, f"nodes[{i}].id", "every step needs an id (a non-empty string)")
                continue
            node_id = item["id"]
            if node_id in found:
                self.problem(node_id, f"nodes.{node_id}.id", "is used by another step; ids must be unique")
                continue
            node = self.node(node_id, item)
            if node is not None:
                found[node_id] = node
            else:
                found.setdefault(node_id, ExitNode(node_id))  # keeps the graph checks honest about its id
        return found

    def node(self, node_id: str, item: Mapping[str, Any]) -> Node | None:
        at = f"nodes.{node_id}"
        kind = item.get("type")
        if kind not in NODE_TYPES:
            self.problem(node_id, f"{at}.type", f"{kind!r} is not a step type; use one of {', '.join(NODE_TYPES)}")
            return None
        target = self.target(item, "next", at, node_id)
        if kind == "delay":
            self.known_keys(item, ("id", "type", "next", "duration", "until"), at, node_id)
            if ("duration" in item) == ("until" in item):
                self.problem(
                    node_id,
                    f"{at}.duration",
                    'a delay needs "duration" (like "1h") or "until" (like "09:00"), not both',
                )
                return None
            if "duration" in item:
                seconds = self.attempt(node_id, lambda: parse_duration(item["duration"], f"{at}.duration"))
                return Delay(node_id, target, seconds=seconds) if seconds is not None else None
            try:
                until = clock.time_of_day(item["until"])
            except ValueError as error:
                self.problem(node_id, f"{at}.until", str(error))
                return None
            return Delay(node_id, target, until=until)
        if kind == "wait":
            self.known_keys(
                item, ("id", "type", "next", "event", "where", "condition", "timeout", "timeout_next"), at, node_id
            )
            event = condition = None
            if ("event" in item) == ("condition" in item):
                self.problem(node_id, f"{at}.event", 'a wait needs "event" or "condition", not both')
            elif "event" in item:
                event = self.event(item, at, node_id)
            else:
                condition = self.condition(item["condition"], f"{at}.condition", node_id)
            timeout = self.attempt(node_id, lambda: parse_duration(item.get("timeout"), f"{at}.timeout"))
            timeout_next = self.target(item, "timeout_next", at, node_id)
            if timeout is None or (event is None and condition is None):
                return None
            return Wait(node_id, target, timeout, timeout_next, event=event, condition=condition)
        if kind == "branch":
            self.known_keys(item, ("id", "type", "branches", "else"), at, node_id)
            branches = item.get("branches")
            if not isinstance(branches, list) or not branches:
                self.problem(node_id, f"{at}.branches", 'must be a non-empty list of {"if": ..., "next": ...}')
                return None
            parsed: list[tuple[ProfileCondition, str | None]] = []
            for i, branch in enumerate(branches):
                branch_at = f"{at}.branches[{i}]"
                if not isinstance(branch, Mapping) or "if" not in branch:
                    self.problem(node_id, branch_at, 'must be {"if": <condition>, "next": <step id>}')
                    continue
                self.known_keys(branch, ("if", "next"), branch_at, node_id)
                condition = self.condition(branch["if"], f"{branch_at}.if", node_id)
                if condition is not None:
                    parsed.append((condition, self.target(branch, "next", branch_at, node_id)))
            otherwise = self.target(item, "else", at, node_id)
            return Branch(node_id, tuple(parsed), otherwise) if len(parsed) == len(branches) else None
        if kind == "split":
            return self.split(node_id, item, at)
        if kind == "action":
            return self.action(node_id, item, at, target)
        self.known_keys(item, ("id", "type"), at, node_id)
        return ExitNode(node_id)

    def target(self, item: Mapping[str, Any], key: str, at: str, node_id: str) -> str | None:
        value = item.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            self.problem(node_id, f"{at}.{key}", f"{value!r} must be a step id")
            return None
        return value

    def split(self, node_id: str, item: Mapping[str, Any], at: str) -> Split | None:
        self.known_keys(item, ("id", "type", "variants"), at, node_id)
        variants = item.get("variants")
        if not isinstance(variants, list) or len(variants) < 2:
            self.problem(node_id, f"{at}.variants", "must list at least two variants")
            return None
        parsed: list[Variant] = []
        names: set[str] = set()
        for i, variant in enumerate(variants):
            variant_at = f"{at}.variants[{i}]"
            if not isinstance(variant, Mapping):
                self.problem(node_id, variant_at, 'must be {"name": ..., "weight": ..., "next": ...}')
                continue
            self.known_keys(variant, ("name", "weight", "next", "control"), variant_at, node_id)
            name = variant.get("name")
            if not isinstance(name, str) or not name or name in names:
                self.problem(node_id, f"{variant_at}.name", f"{name!r} must be a name unique within the split")
                continue
            names.add(name)
            weight = variant.get("weight")
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight < 1e9:
                self.problem(node_id, f"{variant_at}.weight", f"{weight!r} must be a positive number")
                continue
            control = variant.get("control", False)
            if not isinstance(control, bool):
                self.problem(node_id, f"{variant_at}.control", "must be true or false")
                continue
            parsed.append(Variant(name, float(weight), self.target(variant, "next", variant_at, node_id), control))
        if sum(v.control for v in parsed) > 1:
            self.problem(node_id, f"{at}.variants", "at most one variant is the control group")
        return Split(node_id, tuple(parsed)) if len(parsed) == len(variants) else None

    def action(self, node_id: str, item: Mapping[str, Any], at: str, target: str | None) -> Action | None:
        keys = ("id", "type", "next", "channel", "template", "category", "purpose", "value", "approval", "rank_by")
        keys += ("on_cap", "expires_after", "signals")
        self.known_keys(item, keys, at, node_id)
        ok = True
        channel = item.get("channel")
        if channel not in CHANNELS:
            self.problem(node_id, f"{at}.channel", f"{channel!r} is not a channel; use one of {', '.join(CHANNELS)}")
            ok = False
        purpose = item.get("purpose")
        if not isinstance(purpose, str) or not purpose or ":" in purpose:
            self.problem(
                node_id,
                f"{at}.purpose",
                f"every action names the consent purpose it is sent under (like 'Marketing'); {purpose!r} is not one",
            )
            ok = False
        elif self.catalogue.purposes is not None and purpose not in self.catalogue.purposes:
            self.problem(node_id, f"{at}.purpose", f"{purpose!r} is not a known consent purpose")
        category = item.get("category", self.category)
        if not isinstance(category, str) or not category:
            self.problem(node_id, f"{at}.category", "must be a non-empty string, like 'offer' or 'reminder'")
            ok = False
        template = self.template(node_id, item.get("template"), f"{at}.template")
        if template is not None and not self.channel_parts(node_id, template.source, f"{at}.template", channel):
            template = None
        if template is not None:
            for name in self.catalogue.unknown_fields(template.fields):
                self.problem(node_id, f"{at}.template", f"reads {name}, which is not a known profile field")
            self.entry_reads(template.entry_fields, f"{at}.template", node_id)
        value = item.get("value")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
            self.problem(node_id, f"{at}.value", f"{value!r} must be a number from 0")
            ok = False
        approval = item.get("approval", False)
        if not isinstance(approval, bool):
            self.problem(node_id, f"{at}.approval", "must be true or false")
            ok = False
        rank_by = item.get("rank_by")
        if rank_by is not None and (not isinstance(rank_by, str) or rank_by.partition(".")[0] not in ROOTS):
            self.problem(node_id, f"{at}.rank_by", f"{rank_by!r} must be a profile field like 'scores.conversion'")
            ok = False
        elif rank_by is not None and self.catalogue.unknown_fields(frozenset([rank_by])):
            self.problem(node_id, f"{at}.rank_by", f"{rank_by} is not a known profile field")
        on_cap = item.get("on_cap", "defer")
        if on_cap not in ON_CAP:
            self.problem(
                node_id,
                f"{at}.on_cap",
                f"{on_cap!r} must be 'defer' (a full frequency cap holds it to the cap's next period) "
                "or 'drop' (a full cap ends it)",
            )
            ok = False
        expires_after = None
        if "expires_after" in item:
            expires_after = self.attempt(node_id, lambda: parse_duration(item["expires_after"], f"{at}.expires_after"))
            ok = ok and expires_after is not None
        signals = self.signals(node_id, item, at, channel)
        ok = ok and signals is not None
        if not ok or template is None or signals is None:
            return None
        return Action(
            node_id,
            target,
            channel,
            template,
            category,
            purpose,
            value=float(value) if value is not None else None,
            approval=approval,
            rank_by=rank_by,
            on_cap=on_cap,
            expires_after=expires_after,
            signals=signals,
        )

    def channel_parts(self, node_id: str, parts: Mapping[str, str], at: str, channel: Any) -> bool:
        """Whether the template has the parts `channel` cannot send without (a problem naming each missing
        one): an SMS's `body`; a CRM task's or case's `subject` (or `title`) and a `kind` of task or case."""

        def has(part: str) -> bool:
            return bool(parts.get(part, "").strip())

        ok = True
        if channel == "sms" and not has("body"):
            self.problem(node_id, f"{at}.body", "an sms action sends its template's body: add a body part")
            ok = False
        if channel == CRM:
            if not (has("subject") or has("title")):
                self.problem(
                    node_id, f"{at}.subject", "a crm task or case needs a subject: add a subject (or title) part"
                )
                ok = False
            kind = parts.get("kind", "task")
            if kind not in CRM_KINDS:
                self.problem(
                    node_id, f"{at}.kind", f"a crm action's kind is one of {', '.join(CRM_KINDS)}, written as is"
                )
                ok = False
        return ok

    def signals(self, node_id: str, item: Mapping[str, Any], at: str, channel: Any) -> tuple[str, ...] | None:
        """The profile fields a CRM task or case carries (`signals`); None when they are not valid."""
        if "signals" not in item:
            return ()
        listed = item["signals"]
        if channel != CRM:
            self.problem(
                node_id,
                f"{at}.signals",
                "only a crm action carries signals (the context of its task or case); "
                "other channels send what their template renders",
            )
            return None
        if not isinstance(listed, list) or len(listed) > MAX_SIGNALS:
            self.problem(
                node_id,
                f"{at}.signals",
                f"must be a list of at most {MAX_SIGNALS} profile fields, like ['scores.churn_risk', 'traits.plan']",
            )
            return None
        found: list[str] = []
        for i, name in enumerate(listed):
            field_at = f"{at}.signals[{i}]"
            if not isinstance(name, str) or name.partition(".")[0] not in ROOTS or not name.partition(".")[2]:
                self.problem(
                    node_id,
                    field_at,
                    f"{name!r} must be a profile field: {', '.join(r + '.<name>' for r in ROOTS)}",
                )
            elif name in found:
                self.problem(node_id, field_at, f"{name} is listed twice")
            elif self.catalogue.unknown_fields(frozenset([name])):
                self.problem(node_id, field_at, f"{name} is not a known profile field")
            else:
                found.append(name)
        return tuple(found) if len(found) == len(listed) else None

    # --- the graph as a whole ---

    def graph(self, items: list[Any], nodes: Mapping[str, Node], start: str) -> None:
        # Edges come from the document itself, so a step that failed to parse still has its targets checked
        # and still makes the steps after it reachable (one mistake, one problem).
        edges: dict[str, list[tuple[str, str]]] = {}
        waits: set[str] = set()
        for item in items:
            node_id = item.get("id") if isinstance(item, Mapping) else None
            if isinstance(node_id, str) and node_id in nodes and node_id not in edges:
                edges[node_id] = _raw_targets(item)
                if item.get("type") in ("delay", "wait"):
                    waits.add(node_id)
        for node_id, targets in edges.items():
            for name, target in targets:
                if target not in nodes:
                    self.problem(node_id, f"nodes.{node_id}.{name}", f"{target!r} is not the id of a step")
        successors = {n: [t for _, t in targets if t in nodes] for n, targets in edges.items()}
        reachable = {start}
        frontier = [start]
        while frontier:
            for target in successors.get(frontier.pop(), ()):
                if target not in reachable:
                    reachable.add(target)
                    frontier.append(target)
        for node_id in nodes:
            if node_id not in reachable:
                self.problem(node_id, f"nodes.{node_id}.id", f"cannot be reached from the start step {start!r}")
        for cycle in _cycles_without_waiting(successors, waits):
            self.problem(
                cycle[0],
                f"nodes.{cycle[0]}.next",
                f"loops back through {' -> '.join([*cycle, cycle[0]])} without a delay or wait: "
                "an instance would run it forever; put a delay or a wait on the loop",
            )


def _key_path(at: str | None, key: object) -> str:
    """The field path of a key as written: `entry.colour`, or `entry["odd key"]` when it is no plain name."""
    if isinstance(key, str) and key.isidentifier():
        return key if at is None else f"{at}.{key}"
    return f"{at or 'journey'}[{key!r}]"


def _raw_targets(item: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, target) for each edge a step's document names, the field as written."""
    pairs: list[tuple[str, Any]] = [(key, item.get(key)) for key in ("next", "timeout_next", "else")]
    for key in ("branches", "variants"):
        listed = item.get(key)
        if isinstance(listed, list):
            pairs += [(f"{key}[{i}].next", x.get("next")) for i, x in enumerate(listed) if isinstance(x, Mapping)]
    return [(name, target) for name, target in pairs if isinstance(target, str) and target]


def _cycles_without_waiting(successors: Mapping[str, list[str]], waits: set[str]) -> list[list[str]]:
    """Cycles among steps that never wait (delay and wait steps cut loops), at least one per loop."""
    moving = {node_id for node_id in successors if node_id not in waits}
    edges = {n: [t for t in successors[n] if t in moving] for n in moving}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(moving):
        if root in state:
            continue
        path: list[str] = []
        stack: list[tuple[str, int]] = [(root, 0)]
        while stack:
            node_id, i = stack.pop()
            if i == 0:
                state[node_id] = 1
                path.append(node_id)
            if i < len(edges[node_id]):
                stack.append((node_id, i + 1))
                target = edges[node_id][i]
                if state.get(target) == 1:
                    cycles.append(path[path.index(target) :])
                elif target not in state:
                    stack.append((target, 0))
            else:
                state[node_id] = 2
                path.pop()
    return cycles
