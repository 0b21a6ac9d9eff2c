"""Parsing what reads events: `count(...)`, `sum/avg/min/max(...)` and `performed(...)`, their event
predicate (`event = ...`, `type = ...`, conditions on `properties.*` / `context.*`, arithmetic) and their
`within` window. A part of `text_parser.Parser`, whose tokens, errors, values and arithmetic it uses.
"""

from __future__ import annotations

from typing import Any

from cdp_lang.nodes import (
    COMPARISONS,
    EVENT_ROOTS,
    VALUE_AGGREGATES,
    Aggregate,
    Comparison,
    Condition,
    EventCondition,
    EventPredicate,
    FieldRef,
    Invalid,
    Node,
    Performed,
    check_event_path,
    check_event_type,
    where_document,
)
from cdp_lang.text_tokens import (
    ARITHMETIC_OPERATOR_EXPECTED,
    ARITHMETIC_OPERATORS,
    DURATION_EXPECTED,
    EVENT_FIELDS_ONLY,
    EVENT_TERM_EXPECTED,
    EVENT_VALUE_EXPECTED,
    FIELD_ONLY_IN_ARITHMETIC,
    ONLY_AND,
    OPERATORS_EXPECTED,
    Token,
    operator_hint,
)


class EventsParser:
    """The event-reading half of the parser; mixed into `Parser` (the attributes it reads are that class's)."""

    def within(self) -> float | None:
        """`, within 30d` after an event predicate, or nothing."""
        if not self.is_punct(","):
            return None
        self.tokens.take()
        return self.window()

    def window(self) -> float:
        """`within 30d`."""
        if not self.is_word("within"):
            raise self.error(self.tokens.peek(), "within")
        self.tokens.take()
        token = self.tokens.peek()
        if token.kind != "duration":
            raise self.error(token, DURATION_EXPECTED)
        return self.tokens.take().value

    def close(self, expected: str) -> None:
        token = self.tokens.peek()
        if self.is_word("or") or self.is_word("not"):
            raise self.error(token, expected, ONLY_AND)
        self.expect_punct(")", expected)

    def comparison(self) -> tuple[str, int | float]:
        operator = self.tokens.peek()
        if operator.kind != "op" or operator.text not in COMPARISONS:
            raise self.error(operator, "a comparison operator (=, !=, <, <=, >, >=)")
        self.tokens.take()
        return operator.text, self.number("a number")

    def aggregate(self) -> Node:
        op = self.tokens.take().value[0]
        self.expect_punct("(", "'('")
        property_path = None
        if op in VALUE_AGGREGATES:
            token = self.tokens.peek()
            if token.kind != "name" or token.value[0] != "properties" or len(token.value) < 2:
                raise self.error(token, f"the property to {op}, like properties.total")
            property_path = self.event_path(self.tokens.take())
            if self.is_punct(","):
                self.tokens.take()
                if self.is_word("within"):
                    event, within = EventPredicate(), self.window()
                else:
                    event = self.events()
                    within = self.within()
            else:
                event, within = EventPredicate(), None
        else:
            event = self.events()
            within = self.within()
        self.close("',', 'and' or ')'" if within is None else "')'")
        comparison, value = self.comparison()
        return Aggregate(op, event, property_path, within, comparison, value)

    def performed(self) -> Node:
        self.tokens.take()
        self.expect_punct("(", "'('")
        event = self.events()
        within = self.within()
        self.close("',', 'and' or ')'" if within is None else "')'")
        return Performed(event, within)

    def events(self) -> EventPredicate:
        self.in_event = True
        try:
            return self.event_terms()
        finally:
            self.in_event = False

    def event_terms(self) -> EventPredicate:
        names: tuple[str, ...] | None = None
        event_type: str | None = None
        where: list[EventCondition | Comparison] = []
        token = self.tokens.peek()
        if token.kind == "string":  # "Name" is short for event = "Name"
            self.tokens.take()
            if not token.value:
                raise self.error(token, "an event name")
            names = (token.value,)
            if not self.is_word("and"):
                return EventPredicate(names=names)
            self.tokens.take()
        while True:
            token = self.tokens.peek()
            if self.is_word("event"):
                if names is not None:
                    raise self.error(token, "at most one 'event' condition in an event predicate")
                names = self.event_names()
            elif self.is_word("type"):
                if event_type is not None:
                    raise self.error(token, "at most one 'type' condition in an event predicate")
                event_type = self.event_type()
            elif (token.kind == "name" and token.value[0] in EVENT_ROOTS and len(token.value) >= 2) or (
                token.kind == "number" or self.is_punct("-") or (self.is_punct("(") and self.opens_arithmetic(token))
            ):
                where.append(self.event_condition() if token.kind == "name" else self.event_arithmetic(token))
                try:
                    where_document(tuple(where))
                except Invalid as error:
                    raise self.error(token, "conditions that can hold together", str(error)) from None
            elif self.is_word("not") or self.is_punct("("):
                raise self.error(token, EVENT_TERM_EXPECTED, ONLY_AND)
            else:
                raise self.error(token, EVENT_TERM_EXPECTED)
            if not self.is_word("and"):
                break
            self.tokens.take()
        return EventPredicate(tuple(sorted(set(names or ()))), event_type or "track", tuple(where))

    def event_names(self) -> tuple[str, ...]:
        self.tokens.take()
        if self.is_word("in"):
            self.tokens.take()
            start = self.tokens.peek()
            names = self.scalars(strings_only=True)
        else:
            operator = self.tokens.peek()
            if operator.kind != "op" or operator.text != "=":
                raise self.error(operator, "'=' or 'in' after event")
            self.tokens.take()
            start = self.tokens.peek()
            names = (self.string('an event name in quotes, like "Order Completed"'),)
        if not all(names):
            raise self.error(start, "non-empty event names")
        return names

    def event_type(self) -> str:
        self.tokens.take()
        operator = self.tokens.peek()
        if operator.kind != "op" or operator.text != "=":
            raise self.error(operator, "'=' after type")
        self.tokens.take()
        token = self.tokens.peek()
        name = self.string('an event type in quotes, like "page"')
        try:
            return check_event_type(name)
        except Invalid as error:
            raise self.error(token, "an event type", str(error)) from None

    def event_arithmetic(self, start: Token, first: FieldRef | None = None) -> EventCondition | Comparison:
        """A comparison of numbers inside an event predicate whose left side is arithmetic (or not a plain
        event field); `first`: the event field already read at its start."""
        left = self.sum(first)
        operator = self.tokens.peek()
        if operator.kind != "op" or operator.text not in COMPARISONS:
            hint = "in, contains, starts_with and exists test a plain field" if operator.kind == "name" else ""
            raise self.error(operator, ARITHMETIC_OPERATOR_EXPECTED, hint)
        self.tokens.take()
        right_token = self.tokens.peek()
        return self.event_compared(start, operator, right_token, left, self.sum())

    def event_compared(
        self, start: Token, operator: Token, right_token: Token, left: Any, right: Any
    ) -> EventCondition | Comparison:
        """`left op right` in an event predicate: an `EventCondition` when it is a plain event field against a
        number, else a `Comparison` with arithmetic. Two event fields with no arithmetic are refused: the
        profile service compares an event field with values, and with another field only in arithmetic."""
        node = self.compared(start, operator, left, right)
        if isinstance(node, Comparison):
            return node
        assert isinstance(node, Condition)
        if isinstance(node.value, FieldRef):
            raise self.error(right_token, EVENT_VALUE_EXPECTED, FIELD_ONLY_IN_ARITHMETIC)
        return EventCondition(node.path, node.op, node.value)

    def event_path(self, token: Token) -> tuple[str, ...]:
        """The event field `token` names (`properties.<path>`, `context.<path>`), none of its steps holding a
        dot (`nodes.check_event_path`)."""
        try:
            check_event_path(token.value)
        except Invalid as error:
            raise self.error(token, "an event field whose names hold no dot", str(error)) from None
        return token.value

    def event_condition(self) -> EventCondition | Comparison:
        start = self.tokens.take()
        path = self.event_path(start)
        operator = self.tokens.peek()
        if operator.kind == "punct" and operator.text in ARITHMETIC_OPERATORS:
            return self.event_arithmetic(start, FieldRef(path))
        if operator.kind == "op" and operator.text in COMPARISONS:
            self.tokens.take()
            right_token = self.tokens.peek()
            if self.starts_operand():  # a number, or arithmetic
                return self.event_compared(start, operator, right_token, FieldRef(path), self.sum())
            if right_token.kind == "name" and (right_token.value[0] in self.roots or self.is_word("percentile")):
                raise self.error(right_token, EVENT_VALUE_EXPECTED, EVENT_FIELDS_ONLY)
            value = self.scalar()
            after = self.tokens.peek()
            if after.kind == "punct" and after.text in ARITHMETIC_OPERATORS:
                raise self.error(after, "'and' or ')'", "arithmetic works on numbers, not on this value")
            return EventCondition(path, operator.text, value)
        if self.is_word("in"):
            self.tokens.take()
            return EventCondition(path, "in", self.scalars())
        if self.is_word("contains"):
            self.tokens.take()
            return EventCondition(path, "contains", self.scalar())
        if self.is_word("starts_with"):
            self.tokens.take()
            return EventCondition(path, "starts_with", self.string("a string (the prefix)"))
        if self.is_word("exists"):
            self.tokens.take()
            return EventCondition(path, "exists")
        raise self.error(operator, OPERATORS_EXPECTED, operator_hint(operator))
