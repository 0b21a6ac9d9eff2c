"""The segment language's parser: text to nodes by recursive descent, one method a rule of the grammar in
`text`'s docstring. The conditions on the profile, the boolean structure and arithmetic are here; what reads
events (aggregates, performed and their predicates) is `text_events.EventsParser`'s.
"""

from __future__ import annotations

from typing import Any

from cdp_lang.nodes import (
    AGGREGATES,
    COMPARISONS,
    EVENT_ROOTS,
    MAX_DEPTH,
    ORDERINGS,
    ROOTS,
    And,
    Arithmetic,
    Condition,
    Date,
    FieldRef,
    InSegment,
    Invalid,
    Node,
    Not,
    Now,
    Or,
    Percentile,
    Scalar,
    check_date,
    comparison,
    leaves,
    percent_of,
)
from cdp_lang.text_events import EventsParser
from cdp_lang.text_tokens import (
    ARITHMETIC_OPERATOR_EXPECTED,
    ARITHMETIC_OPERATORS,
    CONDITION_EXPECTED,
    DURATION_EXPECTED,
    EVENT_FIELDS_ONLY,
    EVENT_OPERAND_EXPECTED,
    KEYWORDS,
    NESTING_EXPECTED,
    OPERAND_EXPECTED,
    OPERATORS_EXPECTED,
    PREFIX_EXPECTED,
    SCALAR_EXPECTED,
    VALUE_EXPECTED,
    Lexer,
    SegmentSyntaxError,
    Token,
    operator_hint,
)


class Parser(EventsParser):
    def __init__(self, text: str, field: str, roots: tuple[str, ...] = ROOTS) -> None:
        self.tokens = Lexer(text, field)
        self.field = field
        self.roots = roots
        self.nesting = 0  # `not`s and parentheses open around the current position
        self.in_event = False  # inside an event predicate: arithmetic reads the event's fields
        # (line, column) of a "(" that starts a condition -> whether it opens arithmetic (see `opens_arithmetic`)
        self.groups: dict[tuple[int, int], bool] = {}

    def nest(self, token: Token) -> None:
        self.nesting += 1
        if self.nesting > MAX_DEPTH:
            raise self.error(
                token, NESTING_EXPECTED, "flatten it: 'not not x' is 'x'; 'a and (b and c)' is 'a and b and c'"
            )

    def error(self, token: Token, expected: str, hint: str = "") -> SegmentSyntaxError:
        return SegmentSyntaxError(self.field, token.line, token.column, expected, token.shown(), hint)

    def is_word(self, word: str, token: Token | None = None) -> bool:
        token = token or self.tokens.peek()
        return token.kind == "name" and token.value == (word,)

    def is_punct(self, char: str) -> bool:
        token = self.tokens.peek()
        return token.kind == "punct" and token.text == char

    def expect_punct(self, char: str, expected: str) -> Token:
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

    def opens_arithmetic(self, token: Token) -> bool:
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
                        self.groups[opened.pop()] = after.text in ARITHMETIC_OPERATORS or (
                            after.kind == "op" and after.text in COMPARISONS
                        )
                        if not opened:
                            break
            except SegmentSyntaxError:
                pass
            finally:
                lexer.position, lexer.line, lexer.line_start, lexer.ahead = saved
        return self.groups.get(key, False)

    def arithmetic(self, start: Token, first: Any = None) -> Node:
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

    def compared(self, start: Token, operator: Token, left: Any, right: Any) -> Node:
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
            taken = self.tokens.take()
            return FieldRef(self.event_path(taken) if self.in_event else taken.value), 0
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

    def arithmetic_depth(self, operator: Token, levels: int) -> None:
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
        if operator.kind == "punct" and operator.text in ARITHMETIC_OPERATORS:
            return self.arithmetic(start, FieldRef(path))
        if operator.kind == "op" and operator.text in COMPARISONS:
            self.tokens.take()
            value = self.value(times=True)
            if isinstance(value, Now) and operator.text not in ORDERINGS:
                raise self.error(operator, "<, <=, > or >= before now", "a moving time is compared by order")
            if isinstance(value, Percentile) and operator.text not in ORDERINGS:
                raise self.error(operator, "<, <=, > or >= before percentile", "a percentile is compared by order")
            after = self.tokens.peek()
            if after.kind == "punct" and after.text in ARITHMETIC_OPERATORS:
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
        raise self.error(operator, OPERATORS_EXPECTED, operator_hint(operator))

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
