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


Plan = Test | TimeTest | NumberTest | Member | AllOf | AnyOf | Negate


def moving_tests(plan: Plan) -> list[TimeTest]:
    """The time tests against `now`: the ones whose outcome changes as time passes."""
    if isinstance(plan, TimeTest):
        return [plan] if plan.offset is not None else []
    if isinstance(plan, AllOf | AnyOf):
        return [test for part in plan.parts for test in moving_tests(part)]
    if isinstance(plan, Negate):
        return moving_tests(plan.part)
    return []
