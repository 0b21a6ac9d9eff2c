"""The vectorised evaluator: a plan becomes NumPy work over `Columns` (whole populations, audience estimates).

Every test returns a fresh bool array (never a column's own view), so combining them in place is safe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from cdp_lang.columns import Column, Columns
from cdp_lang.percentiles import PercentileSpec
from cdp_lang.plan import (
    COMPARE,
    AllOf,
    AnyOf,
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
from cdp_lang.values import element_equals

VectorPredicate = Callable[[Columns, Mapping[str, np.ndarray], float], np.ndarray]


def vector_predicate(plan: Plan) -> VectorPredicate:
    if isinstance(plan, Test):
        return _test(plan)
    if isinstance(plan, TimeTest):
        return _time_test(plan)
    if isinstance(plan, FieldTest):
        return _field_test(plan)
    if isinstance(plan, PercentileTest):
        return _percentile_test(plan)
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


def _string_ranks(left: Column, right: Column) -> tuple[np.ndarray, np.ndarray]:
    """Each row's string as its rank among both columns' strings (-1: not a string), so that comparing ranks
    compares the strings (Python orders str by code point, as `sorted` does)."""
    both = sorted(set(left.vocabulary) | set(right.vocabulary))
    rank = {text: i for i, text in enumerate(both)}
    ranks = []
    for column in (left, right):
        by_code = np.array([rank[text] for text in column.vocabulary] + [-1], dtype=np.int64)
        ranks.append(by_code[column.codes])
    return ranks[0], ranks[1]


def _field_test(test: FieldTest) -> VectorPredicate:
    field, sub, op, other, other_sub = test.field, test.sub, test.op, test.other, test.other_sub

    def field_vs_field(columns: Columns, members: Mapping[str, np.ndarray], now: float) -> np.ndarray:
        left, right = columns.column(field, sub), columns.column(other, other_sub)
        left_rank, right_rank = _string_ranks(left, right)
        strings = (left_rank >= 0) & (right_rank >= 0)
        if op in ("=", "!="):
            equal = left.number == right.number  # NaN (no number) equals nothing
            equal |= strings & (left_rank == right_rank)
            equal |= (left.bools >= 0) & (left.bools == right.bools)
            if op == "=":
                return equal
            right_scalar = ~right.missing_number | (right_rank >= 0) | (right.bools >= 0)
            return left.present & right_scalar & ~equal
        compare = COMPARE[op]
        result = compare(left.number, right.number)
        result |= strings & compare(left_rank, right_rank)
        return result

    return field_vs_field


def _percentile_test(test: PercentileTest) -> VectorPredicate:
    field, sub, compare = test.field, test.sub, COMPARE[test.op]
    spec = PercentileSpec(test.key, test.source, test.source_sub, test.percent)

    def against_percentile(columns: Columns, members: Mapping[str, np.ndarray], now: float) -> np.ndarray:
        threshold = columns.percentile(spec)
        if threshold is None:
            return np.zeros(columns.size, dtype=bool)
        return compare(columns.column(field, sub).number, threshold)

    return against_percentile


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
