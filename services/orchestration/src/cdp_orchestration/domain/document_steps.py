"""Reading a journey document's steps (`nodes`): delays, waits, branches, splits, actions and exits, each
step's fields checked as `document_fields` checks them, an action's channel, consent purpose, template
parts and signals too."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cdp_kit.durations import parse_duration
from cdp_kit.profile_fields import ROOTS
from cdp_orchestration.domain import clock
from cdp_orchestration.domain.conditions import ProfileCondition
from cdp_orchestration.domain.document_fields import FieldReader
from cdp_orchestration.domain.journey import (
    CHANNELS,
    CRM,
    CRM_KINDS,
    NODE_TYPES,
    ON_CAP,
    Action,
    Branch,
    Delay,
    ExitNode,
    Node,
    Split,
    Variant,
    Wait,
)

MAX_NODES = 500
MAX_SIGNALS = 20  # fields a CRM task or case carries as context: enough for a person to read at a glance


class StepReader(FieldReader):
    """Reads the steps of a journey document, recording every problem (see `FieldReader`)."""

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
                    'a delay needs "duration" (like "1h") or "until" (like "09:00")'
                    + (", not both" if "duration" in item else "; it has neither"),
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
                self.problem(
                    node_id,
                    f"{at}.event",
                    'a wait needs "event" or "condition"' + (", not both" if "event" in item else "; it has neither"),
                )
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
                "every action names the consent purpose it is sent under (like 'Marketing'), one of an exempt "
                "category too (its consent is then not checked); "
                + ("none is given" if purpose is None else f"{purpose!r} is not one"),
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
