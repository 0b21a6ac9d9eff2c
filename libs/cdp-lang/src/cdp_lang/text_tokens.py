"""Segment text as tokens, and the words a syntax error uses: `Lexer` reads `Token`s on demand and raises
`SegmentSyntaxError` at the first character it cannot read; the `*_EXPECTED` texts name what the parser
wanted where the text went wrong. The grammar is in `text`'s docstring.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from cdp_kit.errors import InvalidArgument
from cdp_lang.nodes import ARITHMETIC, MAX_DEPTH, Invalid, duration

KEYWORDS = frozenset(
    (
        *("and", "or", "not", "in", "contains", "starts_with", "exists", "now", "date", "within"),
        *("true", "false", "null", "count", "performed", "sum", "avg", "min", "max", "in_segment"),
        *("event", "type", "properties", "context", "percentile"),
    )
)

OPERATORS_EXPECTED = "a comparison operator (=, !=, <, <=, >, >=, in, contains, starts_with, exists)"
CONDITION_EXPECTED = (
    "a condition (a field like traits.plan, not, (, in_segment, performed, count, sum, avg, min or max)"
)
VALUE_EXPECTED = 'a value (a string, a number, true, false, now, date("..."), a field or percentile(...))'
OPERAND_EXPECTED = "a number, a field, percentile(...) or '(' (arithmetic works on numbers)"
ARITHMETIC_OPERATOR_EXPECTED = "a comparison operator (=, !=, <, <=, >, >=) after arithmetic"
SCALAR_EXPECTED = "a value (a string, a number, true or false)"
PREFIX_EXPECTED = "a string (the prefix) or a field"
DURATION_EXPECTED = "a duration like 30d (a whole number, then s, m, h, d or w)"
EVENT_TERM_EXPECTED = (
    'an event condition (event = "...", event in [...], type = "...", properties.<path> ... or context.<path> ...)'
)
NESTING_EXPECTED = f"at most {MAX_DEPTH} levels of nesting (not, parentheses and arithmetic)"
ONLY_AND = "only 'and' combines conditions inside an event predicate, because the profile service evaluates it"
EVENT_OPERAND_EXPECTED = "a number, an event field (properties.<path> or context.<path>), or '('"
EVENT_VALUE_EXPECTED = "a value (a string, a number, true or false) or arithmetic"
EVENT_FIELDS_ONLY = (
    "an event condition reads the event's own fields, because the profile service counts the events: "
    "compare profile fields outside count(...) / performed(...)"
)
FIELD_ONLY_IN_ARITHMETIC = (
    "an event field is compared with another only in arithmetic (properties.total > properties.shipping * 2)"
)

_FIRST_STEP = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
STEP = re.compile(r"[A-Za-z0-9_:]+")
_DURATION = re.compile(r"\d+(?:\.\d+)?[smhdw](?![A-Za-z0-9_])")
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_NAME_CHAR = re.compile(r"[A-Za-z0-9_.]")
_OPERATORS = ("<=", ">=", "!=", "==", "=", "<", ">", "!")
_PUNCTUATION = "()[],+-*/"
ARITHMETIC_OPERATORS = frozenset(ARITHMETIC)
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r"}


class SegmentSyntaxError(InvalidArgument):
    """A definition's text does not parse: where (line, column), what was expected, what was found."""

    def __init__(self, field: str, line: int, column: int, expected: str, found: str, hint: str = "") -> None:
        message = f"line {line}, column {column}: expected {expected}, found {found}"
        super().__init__(field, f"{message}; {hint}" if hint else message)
        self.line = line
        self.column = column
        self.expected = expected
        self.found = found
        self.hint = hint


@dataclass(slots=True)
class Token:
    kind: str  # "name", "string", "number", "duration", "op", "punct" or "end"
    text: str  # as written
    value: Any  # name: its steps; string: the text; number: int or float; duration: seconds
    line: int
    column: int

    def shown(self) -> str:
        if self.kind == "end":
            return "end of input"
        text = self.text if len(self.text) <= 40 else self.text[:37] + "..."
        return repr(text)


class Lexer:
    """Tokens on demand, so the first error in reading order is the one reported."""

    def __init__(self, text: str, field: str) -> None:
        self.text = text
        self.field = field
        self.position = 0
        self.line = 1
        self.line_start = 0
        self.ahead: Token | None = None

    def peek(self) -> Token:
        if self.ahead is None:
            self.ahead = self._scan()
        return self.ahead

    def take(self) -> Token:
        token = self.peek()
        self.ahead = None
        return token

    def _error(self, position: int, expected: str, found: str, hint: str = "") -> SegmentSyntaxError:
        line = self.text.count("\n", 0, position) + 1
        column = position - (self.text.rfind("\n", 0, position) + 1) + 1
        return SegmentSyntaxError(self.field, line, column, expected, found, hint)

    def _token(self, kind: str, start: int, end: int, value: Any = None) -> Token:
        self.position = end
        return Token(kind, self.text[start:end], value, self.line, start - self.line_start + 1)

    def _scan(self) -> Token:
        text = self.text
        position = self.position
        while position < len(text) and text[position] in " \t\r\n":
            if text[position] == "\n":
                self.line += 1
                self.line_start = position + 1
            position += 1
        self.position = position
        if position >= len(text):
            return Token("end", "", None, self.line, position - self.line_start + 1)
        char = text[position]
        if char == '"':
            return self._string(position)
        if char.isdigit():
            return self._number(position)
        if _FIRST_STEP.match(char):
            return self._name(position)
        for operator in _OPERATORS:
            if text.startswith(operator, position):
                return self._token("op", position, position + len(operator))
        if char in _PUNCTUATION:
            return self._token("punct", position, position + 1)
        raise self._error(position, "a field, a value, an operator or a parenthesis", repr(char))

    def _string(self, start: int) -> Token:
        text = self.text
        position = start + 1
        parts: list[str] = []
        while True:
            if position >= len(text) or text[position] == "\n":
                found = "end of input" if position >= len(text) else "end of line"
                raise self._error(start, "a closing '\"' for the string that starts here", found)
            char = text[position]
            if char == '"':
                return self._token("string", start, position + 1, "".join(parts))
            if char != "\\":
                parts.append(char)
                position += 1
                continue
            escape = text[position + 1 : position + 2]
            if escape in _ESCAPES:
                parts.append(_ESCAPES[escape])
                position += 2
            elif escape == "u" and re.fullmatch(r"[0-9A-Fa-f]{4}", text[position + 2 : position + 6]):
                parts.append(chr(int(text[position + 2 : position + 6], 16)))
                position += 6
            else:
                raise self._error(
                    position, 'an escape (\\" \\\\ \\n \\t \\r or \\uXXXX)', repr(text[position : position + 2])
                )

    def _number(self, start: int) -> Token:
        text = self.text
        if match := _DURATION.match(text, start):
            try:
                seconds = duration(match.group())
            except Invalid as error:
                raise self._error(start, DURATION_EXPECTED, repr(match.group()), str(error)) from None
            return self._token("duration", start, match.end(), seconds)
        match = _NUMBER.match(text, start)
        assert match is not None
        end = match.end()
        if end < len(text) and _NAME_CHAR.match(text[end]):
            word_end = end
            while word_end < len(text) and _NAME_CHAR.match(text[word_end]):
                word_end += 1
            raise self._error(start, f"a number or {DURATION_EXPECTED}", repr(text[start:word_end]))
        written = match.group()
        value: int | float
        if any(c in written for c in ".eE"):
            value = float(written)
            if not math.isfinite(value):
                raise self._error(start, "a number a float can hold", repr(written))
        else:
            value = int(written)
            try:
                float(value)
            except OverflowError:
                raise self._error(start, "a number a float can hold", repr(written)) from None
        return self._token("number", start, end, value)

    def _name(self, start: int) -> Token:
        text = self.text
        match = _FIRST_STEP.match(text, start)
        assert match is not None
        steps = [match.group()]
        position = match.end()
        while position < len(text) and text[position] == ".":
            position += 1
            if text.startswith("`", position):
                close = text.find("`", position + 1)
                newline = text.find("\n", position + 1)
                if close < 0 or 0 <= newline < close:
                    raise self._error(position, "a closing '`' for the field name that starts here", "end of line")
                step = text[position + 1 : close]
                if not step:
                    raise self._error(position, "a field name between backticks", "'``'")
                position = close + 1  # dots included: consent.`purpose:ads.personalised` is one step
            elif step_match := STEP.match(text, position):
                step = step_match.group()
                position = step_match.end()
            else:
                found = repr(text[position]) if position < len(text) else "end of input"
                raise self._error(position, "a field name after '.'", found)
            steps.append(step)
        return self._token("name", start, position, tuple(steps))


def operator_hint(token: Token) -> str:
    if token.text == "==":
        return "equality is a single '='"
    if token.kind == "name" and token.value[0] in ("ends_with", "like", "matches", "startswith", "is"):
        return f"{token.value[0]!r} is not an operator of the segment language"
    return ""
