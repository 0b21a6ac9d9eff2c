"""The per-profile evaluator: a plan becomes nested Python closures over one record (the real-time path)."""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Mapping
from typing import Any

from cdp_lang.plan import (
    COMPARE,
    AllOf,
    AnyOf,
    Calculation,
    Const,
    Expression,
    ExpressionTest,
    FieldNumber,
    FieldTest,
    Member,
    Negate,
    NumberTest,
    OneOf,
    PercentileTest,
    Plan,
    Test,
    TimeTest,
)
from cdp_lang.values import calculate, element_equals, epoch, is_list, number, present, scalar

RowPredicate = Callable[[Mapping[str, Any], Container[str], float], bool]
NO_PERCENTILES: Mapping[str, float | None] = {}


def _never(record: Mapping[str, Any], members: Container[str], now: float) -> bool:
    return False


def _getter(field: str, sub: tuple[str, ...]) -> Callable[[Mapping[str, Any]], Any]:
    if not sub:
        return lambda record: record.get(field)

    def get(record: Mapping[str, Any]) -> Any:
        value = record.get(field)
        for key in sub:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value

    return get


def row_predicate(plan: Plan, percentiles: Mapping[str, float | None] = NO_PERCENTILES) -> RowPredicate:
    """The plan as a closure over one record. `percentiles` holds the population percentiles the plan compares
    with (`PercentileTest.key` -> value), read at every evaluation: its owner keeps it current."""
    if isinstance(plan, Test):
        return _test(plan)
    if isinstance(plan, TimeTest):
        return _time_test(plan)
    if isinstance(plan, FieldTest):
        return _field_test(plan)
    if isinstance(plan, PercentileTest):
        return _percentile_test(plan, percentiles)
    if isinstance(plan, ExpressionTest):
        return _expression_test(plan, percentiles)
    if isinstance(plan, NumberTest):
        return _number_test(plan)
    if isinstance(plan, Member):
        segment = plan.segment
        return lambda record, members, now: segment in members
    if isinstance(plan, Negate):
        inner = row_predicate(plan.part, percentiles)
        return lambda record, members, now: not inner(record, members, now)
    parts = tuple(row_predicate(part, percentiles) for part in plan.parts)
    # Two or three parts (the common case) without a generator: this runs per person and segment.
    if isinstance(plan, AllOf):
        if len(parts) == 2:
            a, b = parts
            return lambda record, members, now: a(record, members, now) and b(record, members, now)
        if len(parts) == 3:
            a, b, c = parts
            return lambda r, m, n: a(r, m, n) and b(r, m, n) and c(r, m, n)
        return lambda record, members, now: all(part(record, members, now) for part in parts)
    assert isinstance(plan, AnyOf)
    if len(parts) == 2:
        a, b = parts
        return lambda record, members, now: a(record, members, now) or b(record, members, now)
    return lambda record, members, now: any(part(record, members, now) for part in parts)


def _test(test: Test) -> RowPredicate:
    get = _getter(test.field, test.sub)
    op, literal = test.op, test.literal
    if op == "exists":
        return lambda record, members, now: present(get(record))
    if op == "in":
        assert isinstance(literal, OneOf)
        return _one_of(get, literal)
    if op == "contains":

        def contains(record: Mapping[str, Any], members: Container[str], now: float) -> bool:
            value = get(record)
            if isinstance(value, str):
                return isinstance(literal, str) and literal in value
            return is_list(value) and any(element_equals(element, literal) for element in value)

        return contains
    if op == "starts_with":
        assert isinstance(literal, str)

        def starts_with(record: Mapping[str, Any], members: Container[str], now: float) -> bool:
            value = get(record)
            return isinstance(value, str) and value.startswith(literal)

        return starts_with
    if op == "!=":
        # Present and not equal: a value of another type differs.
        return lambda record, members, now: present(value := get(record)) and not element_equals(value, literal)
    compare = COMPARE[op]
    if isinstance(literal, bool):
        if op != "=":
            return _never  # bools have no order
        return lambda record, members, now: isinstance(value := get(record), bool) and value == literal
    if isinstance(literal, str):
        return lambda record, members, now: isinstance(value := get(record), str) and compare(value, literal)

    if not test.sub:
        field = test.field

        def numeric_field(record: Mapping[str, Any], members: Container[str], now: float) -> bool:
            value = record.get(field)
            if value.__class__ is float:
                # A finite float (x - x is NaN for infinities and NaN): the common case, without a call.
                return value - value == 0.0 and compare(value, literal)
            if value is None:
                return False
            value = number(value)
            return value is not None and compare(value, literal)

        return numeric_field

    def numeric(record: Mapping[str, Any], members: Container[str], now: float) -> bool:
        value = number(get(record))
        return value is not None and compare(value, literal)

    return numeric


def _one_of(get: Callable[[Mapping[str, Any]], Any], literal: OneOf) -> RowPredicate:
    numbers, strings, bools = literal.numbers, literal.strings, literal.bools

    def one_of(record: Mapping[str, Any], members: Container[str], now: float) -> bool:
        value = get(record)
        if isinstance(value, str):
            return value in strings
        if isinstance(value, bool):
            return value in bools
        as_number = number(value)
        return as_number is not None and as_number in numbers

    return one_of


def compare_scalar(value: Any, op: str, literal: str | float | bool) -> bool:
    """`value op literal` for a comparison operator, as a literal test with that literal means it."""
    if op == "=":
        return element_equals(value, literal)
    if op == "!=":
        return present(value) and not element_equals(value, literal)
    if isinstance(literal, bool):
        return False  # bools have no order
    if isinstance(literal, str):
        return isinstance(value, str) and COMPARE[op](value, literal)
    as_number = number(value)
    return as_number is not None and COMPARE[op](as_number, literal)


def _field_test(test: FieldTest) -> RowPredicate:
    get, get_other, op = _getter(test.field, test.sub), _getter(test.other, test.other_sub), test.op
    if op == "in":

        def in_field(record: Mapping[str, Any], members: Container[str], now: float) -> bool:
            items = get_other(record)
            if not is_list(items):
                return False
            value = scalar(get(record))
            return value is not None and any(element_equals(item, value) for item in items)

        return in_field
    if op == "contains":

        def contains_field(record: Mapping[str, Any], members: Container[str], now: float) -> bool:
            other = scalar(get_other(record))
            if other is None:
                return False
            value = get(record)
            if isinstance(value, str):
                return isinstance(other, str) and other in value
            return is_list(value) and any(element_equals(element, other) for element in value)

        return contains_field
    if op == "starts_with":

        def starts_with_field(record: Mapping[str, Any], members: Container[str], now: float) -> bool:
            value, prefix = get(record), get_other(record)
            return isinstance(value, str) and isinstance(prefix, str) and value.startswith(prefix)

        return starts_with_field

    def field_vs_field(record: Mapping[str, Any], members: Container[str], now: float) -> bool:
        other = scalar(get_other(record))
        return other is not None and compare_scalar(get(record), op, other)

    return field_vs_field


def _percentile_test(test: PercentileTest, percentiles: Mapping[str, float | None]) -> RowPredicate:
    get, compare, key = _getter(test.field, test.sub), COMPARE[test.op], test.key

    def against_percentile(record: Mapping[str, Any], members: Container[str], now: float) -> bool:
        threshold = percentiles.get(key)
        if threshold is None:
            return False
        value = number(get(record))
        return value is not None and compare(value, threshold)

    return against_percentile


def _expression(expression: Expression, percentiles: Mapping[str, float | None]) -> Callable[[Mapping[str, Any]], Any]:
    """A side of a comparison with arithmetic as a function of the record: a float, or None for no value."""
    if isinstance(expression, Const):
        constant = expression.value
        return lambda record: constant
    if isinstance(expression, FieldNumber):
        get = _getter(expression.field, expression.sub)
        default = expression.default
        if default is not None:
            return lambda record: default if (found := number(get(record))) is None else found
        return lambda record: number(get(record))
    if isinstance(expression, Calculation):
        op, left, right = (
            expression.op,
            _expression(expression.left, percentiles),
            _expression(expression.right, percentiles),
        )
        return lambda record: calculate(op, left(record), right(record))
    key = expression.key
    return lambda record: number(percentiles.get(key))


def _expression_test(test: ExpressionTest, percentiles: Mapping[str, float | None]) -> RowPredicate:
    left, right, compare = _expression(test.left, percentiles), _expression(test.right, percentiles), COMPARE[test.op]

    def compared(record: Mapping[str, Any], members: Container[str], now: float) -> bool:
        a = left(record)
        if a is None:
            return False
        b = right(record)
        return b is not None and compare(a, b)

    return compared


def _time_test(test: TimeTest) -> RowPredicate:
    get = _getter(test.field, test.sub)
    compare = COMPARE[test.op]
    offset, at = test.offset, test.at

    def timed(record: Mapping[str, Any], members: Container[str], now: float) -> bool:
        seconds = epoch(get(record))
        return seconds is not None and compare(seconds, now + offset if offset is not None else at)

    return timed


def _number_test(test: NumberTest) -> RowPredicate:
    field, compare, value, default = test.field, COMPARE[test.op], test.value, test.default

    def aggregate(record: Mapping[str, Any], members: Container[str], now: float) -> bool:
        found = record.get(field)
        if found.__class__ is float and found - found == 0.0:
            return compare(found, value)
        found = number(found)
        if found is None:
            found = default
        return found is not None and compare(found, value)

    return aggregate


def flip_time(test: TimeTest, record: Mapping[str, Any], now: float) -> float | None:
    """The earliest instant t > now at which `test` holds differently for this record than at `now`.

    `field op now + offset` is monotone in now (true from some instant on for < and <=, false from some
    instant on for > and >=), so there is at most one such instant. It is found in the same float arithmetic
    the evaluators use, so evaluating at the returned instant does give the other outcome.
    """
    assert test.offset is not None
    seconds = epoch(record.get(test.field) if not test.sub else _getter(test.field, test.sub)(record))
    if seconds is None:
        return None
    compare, offset = COMPARE[test.op], test.offset

    def holds(instant: float) -> bool:
        return compare(seconds, instant + offset)

    start = holds(now)
    if start == (test.op in ("<", "<=")):
        return None  # already in the state it ends in
    guess = seconds - offset
    if guess > now and holds(guess) != start:
        before = math.nextafter(guess, -math.inf)
        if before <= now or holds(before) == start:
            return guess
    # Rounding put the switch a few ulps from the guess: bracket it, then halve down to adjacent floats.
    low, high = now, max(guess, math.nextafter(now, math.inf))
    step = max(abs(high) * 2.0**-52, 5e-324)
    while holds(high) == start:
        low, high = high, high + step
        step *= 2.0
    while True:
        middle = low + (high - low) / 2.0
        if middle <= low or middle >= high:
            return high
        if holds(middle) == start:
            low = middle
        else:
            high = middle
