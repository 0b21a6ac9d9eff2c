"""The segment language as people write it: `parse(text)` builds nodes, `to_text(node)` writes canonical text.

Grammar (keywords are lowercase; `or` binds loosest, then `and`, then `not`):

    segment     := either
    either      := both ("or" both)*
    both        := negation ("and" negation)*
    negation    := "not" negation | primary
    primary     := "(" either ")" | condition | arithmetic | aggregate | performed
                 | "in_segment" "(" STRING ")"
    condition   := PATH ("=" | "!=" | "<" | "<=" | ">" | ">=") value
                 | PATH "in" ("[" scalar ("," scalar)* "]" | PATH)
                 | PATH "contains" (scalar | PATH) | PATH "starts_with" (STRING | PATH) | PATH "exists"
    value       := scalar | time | sum
                   (a PATH: another field; percentile: of the population, ordering operators only)
    arithmetic  := sum ("=" | "!=" | "<" | "<=" | ">" | ">=") sum     (numbers only; a field or a percentile
                                                                    on one side or the other)
    sum         := product (("+" | "-") product)*
    product     := operand (("*" | "/") operand)*
    operand     := ["-"] NUMBER | PATH | "percentile" "(" PATH "," NUMBER ")" | "(" sum ")"
    scalar      := STRING | ["-"] NUMBER | "true" | "false"
    time        := "now" [("+" | "-") DURATION] | "date" "(" STRING ")"     (ordering operators with now)
    aggregate   := "count" "(" events ["," "within" DURATION] ")" comparison ["-"] NUMBER
                 | ("sum" | "avg" | "min" | "max") "(" EVENT_PATH ["," events] ["," "within" DURATION] ")"
                   comparison ["-"] NUMBER
    performed   := "performed" "(" events ["," "within" DURATION] ")"
    events      := (STRING | event_term) ("and" event_term)*     (only `and`: the profile service evaluates
                                                                 these; a STRING is short for event = STRING)
    event_term  := "event" "=" STRING | "event" "in" "[" STRING, ... "]"
                 | "type" "=" ("track" | "page" | "screen" | "identify" | "group" | "any")   (default track)
                 | EVENT_PATH <any condition operator> scalar (no time values)
                 | sum ("=" | "!=" | "<" | "<=" | ">" | ">=") sum   (arithmetic as above, its fields EVENT_PATHs:
                                                                 no profile field, no percentile; another
                                                                 EVENT_PATH is compared only in arithmetic)

PATH is `traits.<name>`, `computed.<name>`, `consent.<key>` or `scores.<name>` (or a root the caller adds
with `parse(..., roots=...)`, like a journey's `entry.<name>`), then optionally more `.<key>` steps into an
object value. EVENT_PATH is `properties.<path>` or `context.<path>`. A step is
letters, digits, `_` and `:` (`consent.purpose:email`), or anything but a backtick or a dot between
backticks (`` traits.`first name` ``). STRING is double-quoted with the escapes \\" \\\\ \\n \\t \\r \\uXXXX.
NUMBER is an int or a float (1.5, 2e-3). DURATION is a whole number of seconds written as 90s, 15m, 12h,
30d or 2w. `null` is not a value: `traits.x exists` and `not traits.x exists` test for it.

`not` and parentheses nest at most MAX_DEPTH deep, and so do `and`, `or`, `not` and arithmetic in the tree
the text makes (see `nodes.MAX_DEPTH`): the parser never recurses deeper than that, whatever the text. A
comparison is arithmetic when its left side is not a plain field (`2 * traits.a > 1`, `(traits.a + 1) * 2 >
3`) or its right side has an operator; a `(` that starts a condition opens arithmetic when the token after
its `)` is an arithmetic or comparison operator, else a group of conditions.

Errors are `SegmentSyntaxError`: the caller's field name, then "line L, column C: expected X, found Y".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from cdp_kit.errors import InvalidArgument
from cdp_lang.nodes import (
    AGGREGATES,
    ARITHMETIC,
    COMPARISONS,
    EVENT_ROOTS,
    MAX_DEPTH,
    ORDERINGS,
    PRECEDENCE,
    ROOTS,
    VALUE_AGGREGATES,
    Aggregate,
    And,
    Arithmetic,
    Comparison,
    Condition,
    Date,
    EventCondition,
    EventPredicate,
    FieldRef,
    InSegment,
    Invalid,
    Node,
    Not,
    Now,
    Or,
    Percentile,
    Performed,
    Scalar,
    check_date,
    check_event_type,
    comparison,
    depth,
    duration,
    duration_text,
    leaves,
    percent_of,
    percent_text,
    where_document,
)

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
_STEP = re.compile(r"[A-Za-z0-9_:]+")
_DURATION = re.compile(r"\d+(?:\.\d+)?[smhdw](?![A-Za-z0-9_])")
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_NAME_CHAR = re.compile(r"[A-Za-z0-9_.]")
_OPERATORS = ("<=", ">=", "!=", "==", "=", "<", ">", "!")
_PUNCTUATION = "()[],+-*/"
_ARITHMETIC = frozenset(ARITHMETIC)
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
class _Token:
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


class _Lexer:
    """Tokens on demand, so the first error in reading order is the one reported."""

    def __init__(self, text: str, field: str) -> None:
        self.text = text
        self.field = field
        self.position = 0
        self.line = 1
        self.line_start = 0
        self.ahead: _Token | None = None

    def peek(self) -> _Token:
        if self.ahead is None:
            self.ahead = self._scan()
        return self.ahead

    def take(self) -> _Token:
        token = self.peek()
        self.ahead = None
        return token

    def _error(self, position: int, expected: str, found: str, hint: str = "") -> SegmentSyntaxError:
        line = self.text.count("\n", 0, position) + 1
        column = position - (self.text.rfind("\n", 0, position) + 1) + 1
        return SegmentSyntaxError(self.field, line, column, expected, found, hint)

    def _token(self, kind: str, start: int, end: int, value: Any = None) -> _Token:
        self.position = end
        return _Token(kind, self.text[start:end], value, self.line, start - self.line_start + 1)

    def _scan(self) -> _Token:
        text = self.text
        position = self.position
        while position < len(text) and text[position] in " \t\r\n":
            if text[position] == "\n":
                self.line += 1
                self.line_start = position + 1
            position += 1
        self.position = position
        if position >= len(text):
            return _Token("end", "", None, self.line, position - self.line_start + 1)
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

    def _string(self, start: int) -> _Token:
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

    def _number(self, start: int) -> _Token:
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

    def _name(self, start: int) -> _Token:
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
                if not step or "." in step:
                    raise self._error(position, "a field name without dots between backticks", repr(f"`{step}`"))
                position = close + 1
            elif step_match := _STEP.match(text, position):
                step = step_match.group()
                position = step_match.end()
            else:
                found = repr(text[position]) if position < len(text) else "end of input"
                raise self._error(position, "a field name after '.'", found)
            steps.append(step)
        return self._token("name", start, position, tuple(steps))


class _Parser:
    def __init__(self, text: str, field: str, roots: tuple[str, ...] = ROOTS) -> None:
        self.tokens = _Lexer(text, field)
        self.field = field
        self.roots = roots
        self.nesting = 0  # `not`s and parentheses open around the current position
        self.in_event = False  # inside an event predicate: arithmetic reads the event's fields
        # (line, column) of a "(" that starts a condition -> whether it opens arithmetic (see `opens_arithmetic`)
        self.groups: dict[tuple[int, int], bool] = {}

    def nest(self, token: _Token) -> None:
        self.nesting += 1
        if self.nesting > MAX_DEPTH:
            raise self.error(
                token, NESTING_EXPECTED, "flatten it: 'not not x' is 'x'; 'a and (b and c)' is 'a and b and c'"
            )

    def error(self, token: _Token, expected: str, hint: str = "") -> SegmentSyntaxError:
        return SegmentSyntaxError(self.field, token.line, token.column, expected, token.shown(), hint)

    def is_word(self, word: str, token: _Token | None = None) -> bool:
        token = token or self.tokens.peek()
        return token.kind == "name" and token.value == (word,)

    def is_punct(self, char: str) -> bool:
        token = self.tokens.peek()
        return token.kind == "punct" and token.text == char

    def expect_punct(self, char: str, expected: str) -> _Token:
        if not self.is_punct(char):
            raise self.error(self.tokens.peek(), expected)
        return self.tokens.take()

    def segment(self) -> Node:
        if self.tokens.peek().kind == "end":
            raise self.error(self.tokens.peek(), CONDITION_EXPECTED)
        node = self.either()
        token = self.tokens.peek()
        if token.kind != "end":
            raise self.error(token, "'and', 'or' or end of input")
        return node

    def either(self) -> Node:
        operands = [self.both()]
        while self.is_word("or"):
            self.tokens.take()
            operands.append(self.both())
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def both(self) -> Node:
        operands = [self.negation()]
        while self.is_word("and"):
            self.tokens.take()
            operands.append(self.negation())
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def negation(self) -> Node:
        if self.is_word("not"):
            self.nest(self.tokens.take())
            node = Not(self.negation())
            self.nesting -= 1
            return node
        return self.primary()

    def primary(self) -> Node:
        token = self.tokens.peek()
        if self.is_punct("(") and self.opens_arithmetic(token):
            return self.arithmetic(token)
        if token.kind == "number" or self.is_punct("-") or self.is_word("percentile"):
            return self.arithmetic(token)
        if self.is_punct("("):
            self.nest(self.tokens.take())
            node = self.either()
            self.expect_punct(")", "'and', 'or' or ')'")
            self.nesting -= 1
            return node
        if token.kind != "name":
            raise self.error(token, CONDITION_EXPECTED)
        if len(token.value) == 1:
            word = token.value[0]
            if word == "in_segment":
                return self.in_segment()
            if word in AGGREGATES:
                return self.aggregate()
            if word == "performed":
                return self.performed()
            if word in self.roots:
                raise self.error(token, f"a field after '{word}.' (like {word}.plan)")
            hint = "" if word in KEYWORDS else f"a field is written with its root, like traits.{word}"
            raise self.error(token, CONDITION_EXPECTED, hint)
        if token.value[0] not in self.roots:
            hint = ""
            if token.value[0] in EVENT_ROOTS:
                hint = f"{token.value[0]}.* are event fields: use them inside count(...), performed(...) or sum(...)"
            named = f"{', '.join(self.roots[:-1])} or {self.roots[-1]}"
            raise self.error(token, f"a field of {named} (like traits.plan)", hint)
        return self.condition()

    def in_segment(self) -> Node:
        self.tokens.take()
        self.expect_punct("(", "'('")
        token = self.tokens.peek()
        if token.kind != "string" or not token.value:
            raise self.error(token, 'a segment id in quotes, like in_segment("vip")')
        self.tokens.take()
        self.expect_punct(")", "')'")
        return InSegment(token.value)

    def opens_arithmetic(self, token: _Token) -> bool:
        """Whether the "(" ahead, where a condition starts, opens arithmetic (`(traits.a + 1) * 2 > 3`) rather
        than a group of conditions: the token after its ")" is an arithmetic or a comparison operator.

        Found by reading ahead once: one pass records the answer for every "(" inside too, so the text is
        read ahead at most once whatever its nesting. A text that does not lex or close is a group: parsing
        it reports the error where it is."""
        key = (token.line, token.column)
        if key not in self.groups:
            lexer = self.tokens
            saved = (lexer.position, lexer.line, lexer.line_start, lexer.ahead)
            opened: list[tuple[int, int]] = []
            try:
                while len(opened) <= MAX_DEPTH:  # deeper is refused whichever it is
                    ahead = lexer.take()
                    if ahead.kind == "end":
                        break
                    if ahead.kind == "punct" and ahead.text == "(":
                        opened.append((ahead.line, ahead.column))
                    elif ahead.kind == "punct" and ahead.text == ")" and opened:
                        after = lexer.peek()
                        self.groups[opened.pop()] = after.text in _ARITHMETIC or (
                            after.kind == "op" and after.text in COMPARISONS
                        )
                        if not opened:
                            break
            except SegmentSyntaxError:
                pass
            finally:
                lexer.position, lexer.line, lexer.line_start, lexer.ahead = saved
        return self.groups.get(key, False)

    def arithmetic(self, start: _Token, first: Any = None) -> Node:
        """A comparison of numbers whose left side is arithmetic (or not a plain field); `first`: the
        field already read at its start."""
        left = self.sum(first)
        operator = self.tokens.peek()
        if operator.kind != "op" or operator.text not in COMPARISONS:
            hint = "in, contains, starts_with and exists test a plain field" if operator.kind == "name" else ""
            raise self.error(operator, ARITHMETIC_OPERATOR_EXPECTED, hint)
        self.tokens.take()
        right = self.sum()
        return self.compared(start, operator, left, right)

    def compared(self, start: _Token, operator: _Token, left: Any, right: Any) -> Node:
        found = (*leaves(left), *leaves(right))
        if operator.text not in ORDERINGS and any(isinstance(leaf, Percentile) for leaf in found):
            raise self.error(operator, "<, <=, > or >= before percentile", "a percentile is compared by order")
        try:
            return comparison(left, operator.text, right)
        except Invalid as error:
            raise self.error(start, "a field on one side of the comparison", str(error)) from None

    def sum(self, first: Any = None) -> Any:
        """`a + b - c`: products joined by + and -, left to right."""
        return self.sum_levels(first)[0]

    def sum_levels(self, first: Any = None) -> tuple[Any, int]:
        """The sum and its levels of arithmetic."""
        left, levels = self.product(first)
        while self.tokens.peek().text in ("+", "-") and self.tokens.peek().kind == "punct":
            operator = self.tokens.take()
            right, right_levels = self.product()
            left, levels = Arithmetic(operator.text, left, right), 1 + max(levels, right_levels)
            self.arithmetic_depth(operator, levels)
        return left, levels

    def product(self, first: Any = None) -> tuple[Any, int]:
        """`a * b / c`: operands joined by * and /, left to right; (the operand, its levels of arithmetic)."""
        left, levels = (first, 0) if first is not None else self.operand()
        while self.tokens.peek().text in ("*", "/") and self.tokens.peek().kind == "punct":
            operator = self.tokens.take()
            right, right_levels = self.operand()
            left, levels = Arithmetic(operator.text, left, right), 1 + max(levels, right_levels)
            self.arithmetic_depth(operator, levels)
        return left, levels

    def operand(self) -> tuple[Any, int]:
        token = self.tokens.peek()
        if self.is_punct("("):
            self.nest(self.tokens.take())
            inner, levels = self.sum_levels()
            self.expect_punct(")", "an arithmetic operator (+, -, *, /) or ')'")
            self.nesting -= 1
            return inner, levels
        expected = EVENT_OPERAND_EXPECTED if self.in_event else OPERAND_EXPECTED
        if token.kind == "number" or self.is_punct("-"):
            return self.number(expected), 0
        if self.is_word("percentile") and not self.in_event:
            return self.percentile(), 0
        if token.kind == "name" and len(token.value) >= 2 and token.value[0] in self.operand_roots():
            return FieldRef(self.tokens.take().value), 0
        hint = ""
        if self.in_event and token.kind == "name" and (token.value[0] in self.roots or self.is_word("percentile")):
            hint = EVENT_FIELDS_ONLY
        elif token.kind == "string" or self.is_word("true") or self.is_word("false"):
            hint = "strings and true/false have no arithmetic"
        elif token.kind == "duration" or self.is_word("now") or self.is_word("date"):
            hint = "times have no arithmetic: compare with now - 30d or date(...)"
        raise self.error(token, expected, hint)

    def operand_roots(self) -> tuple[str, ...]:
        """The roots of the fields arithmetic reads here: the event's inside an event predicate."""
        return EVENT_ROOTS if self.in_event else self.roots

    def arithmetic_depth(self, operator: _Token, levels: int) -> None:
        if self.nesting + levels > MAX_DEPTH:
            raise self.error(
                operator,
                NESTING_EXPECTED,
                "arithmetic nests a level per operator: a sum of many terms is a computed trait",
            )

    def starts_operand(self) -> bool:
        token = self.tokens.peek()
        if token.kind == "number" or self.is_punct("-") or self.is_punct("("):
            return True
        if self.is_word("percentile"):
            return not self.in_event
        return token.kind == "name" and len(token.value) >= 2 and token.value[0] in self.operand_roots()

    def field_ref(self) -> FieldRef | None:
        """Another field as the right side of `in`, `contains` or `starts_with`, if one is next."""
        token = self.tokens.peek()
        if token.kind == "name" and len(token.value) >= 2 and token.value[0] in self.roots:
            return FieldRef(self.tokens.take().value)
        return None

    def condition(self) -> Node:
        start = self.tokens.take()
        path = start.value
        operator = self.tokens.peek()
        if operator.kind == "punct" and operator.text in _ARITHMETIC:
            return self.arithmetic(start, FieldRef(path))
        if operator.kind == "op" and operator.text in COMPARISONS:
            self.tokens.take()
            value = self.value(times=True)
            if isinstance(value, Now) and operator.text not in ORDERINGS:
                raise self.error(operator, "<, <=, > or >= before now", "a moving time is compared by order")
            if isinstance(value, Percentile) and operator.text not in ORDERINGS:
                raise self.error(operator, "<, <=, > or >= before percentile", "a percentile is compared by order")
            after = self.tokens.peek()
            if after.kind == "punct" and after.text in _ARITHMETIC:
                raise self.error(after, "'and', 'or' or end of input", "arithmetic works on numbers, not on this value")
            return self.compared(start, operator, FieldRef(path), value)
        if self.is_word("in"):
            self.tokens.take()
            return Condition(path, "in", self.field_ref() or self.scalars())
        if self.is_word("contains"):
            self.tokens.take()
            return Condition(path, "contains", self.field_ref() or self.scalar())
        if self.is_word("starts_with"):
            self.tokens.take()
            return Condition(path, "starts_with", self.field_ref() or self.string(PREFIX_EXPECTED))
        if self.is_word("exists"):
            self.tokens.take()
            return Condition(path, "exists")
        raise self.error(operator, OPERATORS_EXPECTED, _operator_hint(operator))

    def value(self, times: bool) -> Any:
        if times and self.starts_operand():
            return self.sum()  # a number, a field, a percentile or arithmetic
        if times and self.is_word("now"):
            self.tokens.take()
            if self.is_punct("+") or self.is_punct("-"):
                sign = -1.0 if self.tokens.take().text == "-" else 1.0
                length = self.tokens.peek()
                if length.kind != "duration":
                    raise self.error(length, DURATION_EXPECTED)
                self.tokens.take()
                return Now(sign * length.value)
            return Now()
        if times and self.is_word("date"):
            self.tokens.take()
            self.expect_punct("(", "'('")
            text = self.tokens.peek()
            if text.kind != "string":
                raise self.error(text, 'an ISO-8601 date in quotes, like date("2026-01-01")')
            try:
                check_date(text.value)
            except Invalid as error:
                raise self.error(text, "an ISO-8601 date or time", str(error)) from None
            self.tokens.take()
            self.expect_punct(")", "')'")
            return Date(text.value)
        return self.scalar(VALUE_EXPECTED if times else SCALAR_EXPECTED)

    def percentile(self) -> Percentile:
        """`percentile(scores.clv, 90)`."""
        self.tokens.take()
        self.expect_punct("(", "'('")
        token = self.tokens.peek()
        if token.kind != "name" or len(token.value) < 2 or token.value[0] not in self.roots:
            raise self.error(token, "the field to take the percentile of, like scores.clv_value_365d")
        path = self.tokens.take().value
        self.expect_punct(",", "',' and the percent (0 to 100)")
        token = self.tokens.peek()
        percent = self.number("the percent, a number from 0 to 100")
        try:
            percent = percent_of(percent)
        except Invalid as error:
            raise self.error(token, "a percent from 0 to 100", str(error)) from None
        self.expect_punct(")", "')'")
        return Percentile(path, percent)

    def scalar(self, expected: str = SCALAR_EXPECTED) -> Scalar:
        token = self.tokens.peek()
        if token.kind == "string":
            return self.tokens.take().value
        if token.kind == "number" or (token.kind == "punct" and token.text == "-"):
            return self.number(expected)
        if self.is_word("true") or self.is_word("false"):
            return self.tokens.take().value == ("true",)
        if self.is_word("null"):
            raise self.error(token, expected, "null is not a value: test for a missing value with 'exists'")
        if self.is_word("now") or self.is_word("date"):
            raise self.error(token, expected, "times compare profile fields only")
        raise self.error(token, expected)

    def number(self, expected: str) -> int | float:
        negative = self.is_punct("-")
        if negative:
            self.tokens.take()
        token = self.tokens.peek()
        if token.kind != "number":
            raise self.error(token, expected if not negative else "a number after '-'")
        self.tokens.take()
        value = -token.value if negative else token.value
        return 0.0 if value == 0 and isinstance(value, float) else value  # -0.0 is 0.0

    def string(self, expected: str) -> str:
        token = self.tokens.peek()
        if token.kind != "string":
            raise self.error(token, expected)
        return self.tokens.take().value

    def scalars(self, strings_only: bool = False) -> tuple[Scalar, ...]:
        self.expect_punct("[", "'[' (a list of values)")
        values = [self.string("a string") if strings_only else self.scalar()]
        while self.is_punct(","):
            self.tokens.take()
            values.append(self.string("a string") if strings_only else self.scalar())
        self.expect_punct("]", "',' or ']'")
        return tuple(values)

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
            property_path = self.tokens.take().value
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

    def event_arithmetic(self, start: _Token, first: FieldRef | None = None) -> EventCondition | Comparison:
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
        self, start: _Token, operator: _Token, right_token: _Token, left: Any, right: Any
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

    def event_condition(self) -> EventCondition | Comparison:
        start = self.tokens.take()
        path = start.value
        operator = self.tokens.peek()
        if operator.kind == "punct" and operator.text in _ARITHMETIC:
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
            if after.kind == "punct" and after.text in _ARITHMETIC:
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
        raise self.error(operator, OPERATORS_EXPECTED, _operator_hint(operator))


def _operator_hint(token: _Token) -> str:
    if token.text == "==":
        return "equality is a single '='"
    if token.kind == "name" and token.value[0] in ("ends_with", "like", "matches", "startswith", "is"):
        return f"{token.value[0]!r} is not an operator of the segment language"
    return ""


def parse(text: str, field: str = "expression", *, roots: tuple[str, ...] = ROOTS) -> Node:
    """The node a segment's text describes; SegmentSyntaxError (an InvalidArgument on `field`) if none.
    A field path starts with one of `roots` (the profile's unless the caller has more to offer)."""
    if not isinstance(text, str):
        raise InvalidArgument(field, f'{text!r} is not text: write a segment like traits.plan = "pro"')
    node = _Parser(text, field, roots).segment()
    if (levels := depth(node)) > MAX_DEPTH:
        raise InvalidArgument(
            field, f"and, or and not nest {levels} levels deep; at most {MAX_DEPTH}: flatten the definition"
        )
    return node


# --- writing ---------------------------------------------------------------------------------------------------


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
        steps.append(step if _STEP.fullmatch(step) else f"`{step}`")
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
