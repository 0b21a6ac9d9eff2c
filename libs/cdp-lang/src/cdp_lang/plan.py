"""The compiled form both evaluators read: a tree of a few primitive tests, literals already typed.

`compile_segment` lowers a node to this; `row` turns it into Python closures, `vector` into NumPy work over
`Columns`. Keeping the tests this small is what keeps the two evaluators' meanings the same.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "=": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


@dataclass(frozen=True, slots=True)
class OneOf:
    """The literals of `in [...]`, split by type (numbers as floats) so no 1 ever meets a True."""

    numbers: frozenset[float]
    strings: frozenset[str]
    bools: frozenset[bool]


@dataclass(frozen=True, slots=True)
class Test:
    """A field (and sub-path) against a literal: str, float (every number) or bool; OneOf for `in`."""

    field: str
    sub: tuple[str, ...]
    op: str  # = != < <= > >= in contains starts_with exists
    literal: str | float | bool | OneOf | None


@dataclass(frozen=True, slots=True)
class TimeTest:
    """The field as epoch seconds against `now + offset` (offset given) or the fixed instant `at`."""

    field: str
    sub: tuple[str, ...]
    op: str  # = != < <= > >= (= and != only with a fixed instant)
    offset: float | None
    at: float | None


@dataclass(frozen=True, slots=True)
class FieldTest:
    """A field (and sub-path) against another one's value. For = != < <= > >= and `contains` it holds when
    the other has a scalar value (a string, true or false, a finite number) and the first with that value
    as a literal holds. For `in` the other holds a list, and it holds when the first has a scalar value equal
    (as `in [...]` means it) to an element of that list. For `starts_with` both hold strings and the first
    starts with the other's (no string on either side: false)."""

    field: str
    sub: tuple[str, ...]
    op: str  # = != < <= > >= in contains starts_with
    other: str
    other_sub: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Const:
    """A number in arithmetic, as a float."""

    value: float


@dataclass(frozen=True, slots=True)
class FieldNumber:
    """A field (and sub-path) in arithmetic: its value as a number (`values.number`), else `default` (None:
    no value; 0.0 for a computed trait of kind count or sum, see `compiler`)."""

    field: str
    sub: tuple[str, ...]
    default: float | None = None


@dataclass(frozen=True, slots=True)
class PercentileNumber:
    """A population percentile in arithmetic; `key` as in `PercentileTest`."""

    key: str
    source: str
    source_sub: tuple[str, ...]
    percent: float


@dataclass(frozen=True, slots=True)
class Calculation:
    """`left op right`, one of + - * / (`values.calculate` says what it gives)."""

    op: str
    left: Expression
    right: Expression


Expression = Const | FieldNumber | PercentileNumber | Calculation


@dataclass(frozen=True, slots=True)
class ExpressionTest:
    """Two numbers compared: it holds when both sides have a value and `left op right`."""

    left: Expression
    op: str  # = != < <= > >=
    right: Expression


@dataclass(frozen=True, slots=True)
class PercentileTest:
    """A field (and sub-path) as a number against a percentile of the population's values of `source`;
    `key` names the percentile where an evaluator is given its value (see `cdp_lang.percentiles`)."""

    field: str
    sub: tuple[str, ...]
    op: str  # < <= > >=
    key: str
    source: str
    source_sub: tuple[str, ...]
    percent: float


@dataclass(frozen=True, slots=True)
class NumberTest:
    """An aggregate's computed trait against a number; `default` stands in for a missing value (or None)."""

    field: str
    op: str
    value: float
    default: float | None


@dataclass(frozen=True, slots=True)
class Member:
    segment: str


@dataclass(frozen=True, slots=True)
class AllOf:
    parts: tuple[Plan, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    parts: tuple[Plan, ...]


@dataclass(frozen=True, slots=True)
class Negate:
    part: Plan


Plan = Test | TimeTest | FieldTest | PercentileTest | ExpressionTest | NumberTest | Member | AllOf | AnyOf | Negate


def moving_tests(plan: Plan) -> list[TimeTest]:
    """The time tests against `now`: the ones whose outcome changes as time passes."""
    if isinstance(plan, TimeTest):
        return [plan] if plan.offset is not None else []
    if isinstance(plan, AllOf | AnyOf):
        return [test for part in plan.parts for test in moving_tests(part)]
    if isinstance(plan, Negate):
        return moving_tests(plan.part)
    return []


def percentile_tests(plan: Plan) -> list[PercentileTest]:
    """The tests of a field against a percentile of the population (not those with arithmetic: see
    `expression_tests`)."""
    if isinstance(plan, PercentileTest):
        return [plan]
    if isinstance(plan, AllOf | AnyOf):
        return [test for part in plan.parts for test in percentile_tests(part)]
    if isinstance(plan, Negate):
        return percentile_tests(plan.part)
    return []


def expression_tests(plan: Plan) -> list[ExpressionTest]:
    """The comparisons with arithmetic."""
    if isinstance(plan, ExpressionTest):
        return [plan]
    if isinstance(plan, AllOf | AnyOf):
        return [test for part in plan.parts for test in expression_tests(part)]
    if isinstance(plan, Negate):
        return expression_tests(plan.part)
    return []


def percentiles_of(expression: Expression) -> list[PercentileNumber]:
    """The percentiles an expression reads."""
    if isinstance(expression, PercentileNumber):
        return [expression]
    if isinstance(expression, Calculation):
        return [*percentiles_of(expression.left), *percentiles_of(expression.right)]
    return []
