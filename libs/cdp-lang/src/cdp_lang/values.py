"""What a record's values mean to the language: one set of rules both evaluators apply.

The per-profile evaluator calls these on single values; `Columns` calls the same functions once per row (or
once per distinct string) while it builds its columns, so the two can only disagree if a vector operation
disagrees with a Python comparison, which the agreement test guards.

- Missing: no value, a null, a sub-path that runs into something other than an object, and numbers that are
  not finite (or too large for a float) are all missing. Every comparison on a missing value is false.
- Numbers: int and float, never bool, compared as IEEE doubles (1 = 1.0; ints beyond 2**53 round).
- Arithmetic (`2 * traits.avg_order`): on numbers as IEEE doubles (`calculate`); an operand with no number
  (missing, not a number, a string), a division by zero and a result that is not finite (an overflow) are
  no value, so the comparison is false, as with a missing field. NaN never comes out.
- Times: numbers are epoch seconds, or epoch milliseconds when their magnitude exceeds 1e11; strings are
  ISO-8601 (a trailing Z is UTC, no zone is UTC); anything else is no time.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

# Above this magnitude a number is taken as epoch milliseconds (1e11 s is the year 5138; 1e11 ms is 1973).
MILLISECONDS_ABOVE = 1e11


def number(value: Any) -> float | None:
    """The value as a finite float, None when it is not a number (bools are not numbers)."""
    kind = type(value)
    if kind is float:
        return value if math.isfinite(value) else None
    if kind is int:
        try:
            return float(value)
        except OverflowError:
            return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        as_float = float(value)
    except OverflowError:
        return None
    return as_float if math.isfinite(as_float) else None


def present(value: Any) -> bool:
    """Whether the value counts as there: not null and not a non-finite number."""
    if value is None:
        return False
    kind = type(value)
    if kind is str or kind is bool or kind is dict or kind is list:
        return True
    if isinstance(value, int | float) and not isinstance(value, bool):
        return number(value) is not None
    return True


def is_list(value: Any) -> bool:
    return isinstance(value, list | tuple)


def scalar(value: Any) -> str | float | bool | None:
    """The value as a literal would be: a string, a bool, a finite number as a float; None for anything else
    (missing, null, non-finite, a list or an object). What the other side of a field-to-field comparison is."""
    if isinstance(value, str | bool):
        return value
    return number(value)


def calculate(op: str, left: float | None, right: float | None) -> float | None:
    """`left op right` (+ - * /) on two numbers; None when either is None, for a division by zero, and when
    the result is not finite. The vectorised evaluator does the same per row with NumPy's IEEE arithmetic."""
    if left is None or right is None:
        return None
    if op == "+":
        result = left + right
    elif op == "-":
        result = left - right
    elif op == "*":
        result = left * right
    else:
        if right == 0.0:
            return None
        result = left / right
    return result if result - result == 0.0 else None  # x - x is NaN for infinities and NaN


def element_equals(element: Any, literal: Any) -> bool:
    """Equality of one value with a literal (str, float or bool) under the language's typing rules."""
    if isinstance(literal, bool):
        return isinstance(element, bool) and element is literal
    if isinstance(literal, str):
        return isinstance(element, str) and element == literal
    as_number = number(element)
    return as_number is not None and as_number == literal


def epoch_of_number(value: float) -> float:
    return value / 1000.0 if abs(value) > MILLISECONDS_ABOVE else value


@lru_cache(maxsize=65536)
def epoch_of_text(text: str) -> float | None:
    """Epoch seconds of an ISO-8601 time, None if the text is not one."""
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)  # no zone is UTC, as event sources send them
    try:
        seconds = parsed.timestamp()
    except (OverflowError, ValueError):
        return None
    return seconds if math.isfinite(seconds) else None


def epoch(value: Any) -> float | None:
    """The value as epoch seconds (see the module docstring), None when it is no time."""
    if value.__class__ is float and value - value == 0.0:  # a finite float: the common case, no calls
        return value / 1000.0 if abs(value) > MILLISECONDS_ABOVE else value
    if isinstance(value, str):
        return epoch_of_text(value)
    as_number = number(value)
    return None if as_number is None else epoch_of_number(as_number)
