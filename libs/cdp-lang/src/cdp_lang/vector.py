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
    PercentileNumber,
    PercentileTest,
    Plan,
    Test,
    TimeTest,
)
from cdp_lang.values import element_equals, number

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
    if isinstance(plan, ExpressionTest):
        return _expression_test(plan)
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


def _scalar_at(column: Column, row: int) -> str | float | bool | None:
    """The row's value as `values.scalar` gives it, read from the column's views."""
    code = column.codes[row]
    if code >= 0:
        return column.vocabulary[code]
    flag = column.bools[row]
    if flag >= 0:
        return bool(flag)
    found = column.number[row]
    return None if np.isnan(found) else float(found)


def _string_pairs(left: Column, right: Column, test: Callable[[str, str], bool]) -> np.ndarray:
    """`test(left's string, right's string)` per row where both hold a string (else false), run once per
    distinct pair of strings."""
    result = np.zeros(left.size, dtype=bool)
    both = np.flatnonzero((left.codes >= 0) & (right.codes >= 0))
    if len(both):
        width = len(right.vocabulary)
        pairs = left.codes[both].astype(np.int64) * width + right.codes[both]
        distinct, inverse = np.unique(pairs, return_inverse=True)
        found = [test(left.vocabulary[pair // width], right.vocabulary[pair % width]) for pair in distinct.tolist()]
        result[both] = np.array(found, dtype=bool)[inverse.reshape(-1)]
    return result


def _starts_with_field(left: Column, right: Column) -> np.ndarray:
    """`left starts_with right` per row: both strings, left's starting with right's."""
    return _string_pairs(left, right, str.startswith)


def _contains_field(left: Column, right: Column) -> np.ndarray:
    """`left contains right` per row: right's scalar inside left's string (strings only) or among left's
    list elements. String pairs run once per distinct pair, lists in Python (as for a literal)."""
    result = _string_pairs(left, right, lambda text, part: part in text)
    rows, lists = left.lists
    for row, items in zip(rows.tolist(), lists, strict=True):
        other = _scalar_at(right, row)
        result[row] = other is not None and any(element_equals(element, other) for element in items)
    return result


def _in_field(left: Column, right: Column) -> np.ndarray:
    """`left in right` per row: left's scalar equal to an element of right's list (in Python, per list)."""
    result = np.zeros(left.size, dtype=bool)
    rows, lists = right.lists
    for row, items in zip(rows.tolist(), lists, strict=True):
        value = _scalar_at(left, row)
        result[row] = value is not None and any(element_equals(item, value) for item in items)
    return result


def _field_test(test: FieldTest) -> VectorPredicate:
    field, sub, op, other, other_sub = test.field, test.sub, test.op, test.other, test.other_sub
    if op in ("in", "contains", "starts_with"):
        membership = {"in": _in_field, "contains": _contains_field, "starts_with": _starts_with_field}[op]

        def in_or_contains(columns: Columns, members: Mapping[str, np.ndarray], now: float) -> np.ndarray:
            return membership(columns.column(field, sub), columns.column(other, other_sub))

        return in_or_contains

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


def _expression(expression: Expression, columns: Columns) -> np.ndarray:
    """A side of a comparison with arithmetic for every row: float64, NaN where there is no value (as
    `values.calculate` says, per row). Always a new array."""
    if isinstance(expression, Const):
        return np.full(columns.size, expression.value)
    if isinstance(expression, FieldNumber):
        found = columns.column(expression.field, expression.sub).number.copy()
        if expression.default is not None:
            found[np.isnan(found)] = expression.default
        return found
    if isinstance(expression, PercentileNumber):
        spec = PercentileSpec(expression.key, expression.source, expression.source_sub, expression.percent)
        threshold = number(columns.percentile(spec))
        return np.full(columns.size, np.nan if threshold is None else threshold, dtype=np.float64)
    assert isinstance(expression, Calculation)
    left, right = _expression(expression.left, columns), _expression(expression.right, columns)
    with np.errstate(all="ignore"):  # overflow, 0/0 and x/0 become NaN below, not warnings
        if expression.op == "+":
            result = np.add(left, right, out=left)
        elif expression.op == "-":
            result = np.subtract(left, right, out=left)
        elif expression.op == "*":
            result = np.multiply(left, right, out=left)
        else:
            result = np.divide(left, right, out=left)
            result[right == 0.0] = np.nan
    result[~np.isfinite(result)] = np.nan
    return result


def _expression_test(test: ExpressionTest) -> VectorPredicate:
    left, right, compare = test.left, test.right, COMPARE[test.op]
    not_equal = test.op == "!="

    def compared(columns: Columns, members: Mapping[str, np.ndarray], now: float) -> np.ndarray:
        a, b = _expression(left, columns), _expression(right, columns)
        result = compare(a, b)  # NaN compares false, except with !=
        if not_equal:
            result &= ~(np.isnan(a) | np.isnan(b))
        return result

    return compared


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
