"""Writing nodes as canonical segment text: `to_text(node)`, which `text.parse` reads back to the same node."""

from __future__ import annotations

from typing import Any

from cdp_lang.nodes import (
    PRECEDENCE,
    Aggregate,
    And,
    Arithmetic,
    Comparison,
    Condition,
    Date,
    EventPredicate,
    FieldRef,
    InSegment,
    Node,
    Not,
    Now,
    Or,
    Percentile,
    Performed,
    Scalar,
    duration_text,
    percent_text,
)
from cdp_lang.text_tokens import STEP


def quote(text: str) -> str:
    out = ['"']
    for char in text:
        if char == '"' or char == "\\":
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif char == "\r":
            out.append("\\r")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def path_text(path: tuple[str, ...]) -> str:
    steps = [path[0]]
    for step in path[1:]:
        steps.append(step if STEP.fullmatch(step) else f"`{step}`")
    return ".".join(steps)


def scalar_text(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return quote(value)
    return repr(value)


def value_text(value: Any) -> str:
    if isinstance(value, Now):
        if value.offset == 0:
            return "now"
        sign = "-" if value.offset < 0 else "+"
        return f"now {sign} {duration_text(abs(value.offset))}"
    if isinstance(value, Date):
        return f"date({quote(value.text)})"
    if isinstance(value, FieldRef):
        return path_text(value.path)
    if isinstance(value, Percentile):
        return f"percentile({path_text(value.path)}, {percent_text(value.percent)})"
    if isinstance(value, Arithmetic):
        return operand_text(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(scalar_text(item) for item in value) + "]"
    return scalar_text(value)


def operand_text(operand: Any) -> str:
    """A side of a comparison, with the parentheses its tree needs and no others."""
    if not isinstance(operand, Arithmetic):
        return value_text(operand)
    precedence = PRECEDENCE[operand.op]
    left, right = operand_text(operand.left), operand_text(operand.right)
    if isinstance(operand.left, Arithmetic) and PRECEDENCE[operand.left.op] < precedence:
        left = f"({left})"
    if isinstance(operand.right, Arithmetic) and PRECEDENCE[operand.right.op] <= precedence:
        right = f"({right})"  # a - (b - c) and a + (b + c) are trees of their own
    return f"{left} {operand.op} {right}"


def _condition_text(path: tuple[str, ...], op: str, value: Any) -> str:
    if op == "exists":
        return f"{path_text(path)} exists"
    return f"{path_text(path)} {op} {value_text(value)}"


EVERY_TRACK_EVENT = 'type = "track"'  # the empty event predicate, where one must be written


def events_text(event: EventPredicate, shorthand: bool) -> str:
    """The predicate's text; "" for the empty predicate when `shorthand` allows leaving it out."""
    if shorthand and len(event.names) == 1 and event.type == "track" and not event.where:
        return quote(event.names[0])
    terms = []
    if len(event.names) == 1:
        terms.append(f"event = {quote(event.names[0])}")
    elif event.names:
        terms.append(f"event in {value_text(event.names)}")
    if event.type != "track":
        terms.append(f"type = {quote(event.type)}")
    terms.extend(
        to_text(c) if isinstance(c, Comparison) else _condition_text(c.path, c.op, c.value) for c in event.where
    )
    return " and ".join(terms)


def _within_text(within: float | None) -> str:
    return "" if within is None else f", within {duration_text(within)}"


def to_text(node: Node) -> str:
    """Canonical text: parse(to_text(node)) == node."""
    if isinstance(node, Condition):
        return _condition_text(node.path, node.op, node.value)
    if isinstance(node, Comparison):
        return f"{operand_text(node.left)} {node.op} {operand_text(node.right)}"
    if isinstance(node, InSegment):
        return f"in_segment({quote(node.segment)})"
    if isinstance(node, Performed):
        return f"performed({events_text(node.event, True) or EVERY_TRACK_EVENT}{_within_text(node.within)})"
    if isinstance(node, Aggregate):
        if node.property is None:
            inside = events_text(node.event, True) or EVERY_TRACK_EVENT
        else:
            events = events_text(node.event, True)
            inside = path_text(node.property) + (f", {events}" if events else "")
        return f"{node.op}({inside}{_within_text(node.within)}) {node.comparison} {scalar_text(node.value)}"
    if isinstance(node, Not):
        inner = to_text(node.operand)
        return f"not ({inner})" if isinstance(node.operand, And | Or) else f"not {inner}"
    if isinstance(node, And):
        # Any nested and/or keeps its parentheses, so the text parses back to the same tree.
        return " and ".join(f"({to_text(o)})" if isinstance(o, And | Or) else to_text(o) for o in node.operands)
    if isinstance(node, Or):
        return " or ".join(f"({to_text(o)})" if isinstance(o, Or) else to_text(o) for o in node.operands)
    raise TypeError(f"not a segment node: {node!r}")
