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

from collections.abc import Mapping
from typing import Any

import orjson
from croniter import croniter

from cdp_kit.durations import parse_duration
from cdp_kit.yamltext import YAMLError, load_yaml
from cdp_orchestration.domain import clock
from cdp_orchestration.domain.document_fields import Catalogue, JourneyInvalid, Problem, key_path
from cdp_orchestration.domain.document_graph import check_graph
from cdp_orchestration.domain.document_steps import MAX_NODES, MAX_SIGNALS, StepReader
from cdp_orchestration.domain.journey import (
    ApiEntry,
    Entry,
    EventEntry,
    ExitRule,
    Goal,
    Journey,
    ScheduleEntry,
    SegmentEntry,
)

# Where the reading is done: the problems and the shared field checks (`document_fields`), the steps
# (`document_steps`), the graph of steps (`document_graph`). Importable from here as before the split.
__all__ = [
    "MAX_NODES",
    "MAX_SIGNALS",
    "Catalogue",
    "JourneyInvalid",
    "Problem",
    "load_journey",
    "load_yaml",
    "parse_journey",
]


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


class _Reader(StepReader):
    """Reads a whole journey document: its own fields here, its steps in `StepReader`."""

    def journey(self, document: Any) -> Journey | None:
        if not isinstance(document, Mapping):
            self.problem(None, "journey", "must be an object with id, entry and nodes")
            return None
        known = {"id", "version", "name", "priority", "category", "timezone", "entry", "reentry"}
        known |= {"max_concurrent", "exit", "goal", "start", "nodes"}
        for key in document:
            if key not in known:
                self.problem(None, key_path(None, key), f"unknown key; known: {', '.join(sorted(known))}")
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
            check_graph(self.problem, document["nodes"], nodes, start)
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
