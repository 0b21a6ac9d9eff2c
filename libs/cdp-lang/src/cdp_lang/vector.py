"""The vectorised evaluator: a plan becomes NumPy work over `Columns` (whole populations, audience estimates).

Every test returns a fresh bool array (never a column's own view), so combining them in place is safe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from cdp_lang.columns import Column, Columns
from cdp_lang.plan import (
    COMPARE,
    AllOf,
    AnyOf,
    Member,
    Negate,
    NumberTest,
    OneOf,
    Plan,
    Test,
    TimeTest,
)
from cdp_lang.values import element_equals

VectorPredicate = Callable[[Columns, Mapping[str, np.ndarray], float], np.ndarray]


def vector_predicate(plan: Plan) -> VectorPredicate:
    if isinstance(plan, Test):
        return _test(plan)
    if isinstance(plan, TimeTest):
        return _time_test(plan)
    if isinstance(plan, NumberTest):
        return _number_test(plan)
    if isinstance(plan, Member):
        return _member(plan.segment)
    if isinstance(plan, Negate):
        inner = vector_predicate(plan.part)

        def negate(columns: Columns, members: Mapping[str, np.ndarray], now: float) -> np.ndarray:
            result = inner(columns, members, now)
            return np.logical_not(result, out=result)

        return negate
    parts = tuple(vector_predicate(part) for part in plan.parts)
    combine = np.logical_and if isinstance(plan, AllOf) else np.logical_or
    assert isinstance(plan, AllOf | AnyOf)

    def combined(columns: Columns, members: Mapping[str, np.ndarray], now: float) -> np.ndarray:
        result = parts[0](columns, members, now)
        for part in parts[1:]:
            combine(result, part(columns, members, now), out=result)
        return result

    return combined


def _member(segment: str) -> VectorPredicate:
    def member(columns: Columns, members: Mapping[str, np.ndarray], now: float) -> np.ndarray:
        mask = members.get(segment)
        if mask is None:
            return np.zeros(columns.size, dtype=bool)
        result = np.array(mask, dtype=bool)  # a copy: results are combined in place
        if result.shape != (columns.size,):
            raise ValueError(f"members[{segment!r}] has shape {result.shape}, expected ({columns.size},)")
        return result

    return member


def _test(test: Test) -> VectorPredicate:
    field, sub, op, literal = test.field, test.sub, test.op, test.literal

    def run(columns: Columns, members: Mapping[str, np.ndarray], now: float) -> np.ndarray:
        return _apply(columns.column(field, sub), op, literal)

    return run


def _apply(column: Column, op: str, literal: object) -> np.ndarray:
    if op == "exists":
        return column.present.copy()
    if op == "in":
        assert isinstance(literal, OneOf)
        return _one_of(column, literal)
    if op == "contains":
        if isinstance(literal, str):
            result = column.string_mask(("contains", literal), lambda text: literal in text)
        else:
            result = np.zeros(column.size, dtype=bool)
        rows, lists = column.lists
        if len(rows):
            result[rows] = [any(element_equals(element, literal) for element in items) for items in lists]
        return result
    if op == "starts_with":
        assert isinstance(literal, str)
        return column.string_mask(("starts_with", literal), lambda text: text.startswith(literal))
    if isinstance(literal, bool):
        if op == "=":
            return column.bools == int(literal)
        if op == "!=":
            return column.present & (column.bools != int(literal))
        return np.zeros(column.size, dtype=bool)  # bools have no order
    if isinstance(literal, str):
        if op in ("=", "!="):
            code = column.index.get(literal, -2) if column.vocabulary else -2
            if op == "=":
                return column.codes == code if code >= 0 else np.zeros(column.size, dtype=bool)
            return column.present & (column.codes != code) if code >= 0 else column.present.copy()
        compare = COMPARE[op]
        return column.string_mask((op, literal), lambda text: compare(text, literal))
    if op == "!=":
        return column.present & (column.number != literal)
    return COMPARE[op](column.number, literal)


def _one_of(column: Column, literal: OneOf) -> np.ndarray:
    if literal.numbers:
        result = np.isin(column.number, np.fromiter(literal.numbers, dtype=np.float64))
    else:
        result = np.zeros(column.size, dtype=bool)
    if literal.strings:
        strings = literal.strings
        result |= column.string_mask(("in", strings), lambda text: text in strings)
    if literal.bools:
        if len(literal.bools) == 2:
            result |= column.bools >= 0
        else:
            result |= column.bools == int(next(iter(literal.bools)))
    return result


def _time_test(test: TimeTest) -> VectorPredicate:
    field, sub, compare, offset, at = test.field, test.sub, COMPARE[test.op], test.offset, test.at
    not_equal = test.op == "!="

    def timed(columns: Columns, members: Mapping[str, np.ndarray], now: float) -> np.ndarray:
        seconds = columns.column(field, sub).time
        result = compare(seconds, now + offset if offset is not None else at)
        if not_equal:
            result &= ~np.isnan(seconds)
        return result

    return timed


def _number_test(test: NumberTest) -> VectorPredicate:
    field, compare, value, default = test.field, COMPARE[test.op], test.value, test.default
    not_equal = test.op == "!="
    default_holds = default is not None and compare(default, value)

    def aggregate(columns: Columns, members: Mapping[str, np.ndarray], now: float) -> np.ndarray:
        column = columns.column(field)
        result = compare(column.number, value)
        if not_equal:
            result &= ~column.missing_number
        if default_holds:
            result |= column.missing_number
        return result

    return aggregate
