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
letters, digits, `_` and `:` (`consent.purpose:email`), or anything but a backtick or a line break between
backticks (`` traits.`first name` ``), dots included: `` consent.`purpose:ads.personalised` `` is the one
consent key `purpose:ads.personalised`, where `consent.purpose:ads.personalised` is the key `purpose:ads`
and a step `personalised` into its value. An EVENT_PATH's step holds no dot (`nodes.check_event_path`: the
profile service reads a dot in an event filter's path as a step into an object). STRING is double-quoted
with the escapes \\" \\\\ \\n \\t \\r \\uXXXX. NUMBER is an int or a float (1.5, 2e-3). DURATION is a
whole number of seconds written as 90s, 15m, 12h, 30d or 2w. `null` is not a value: `traits.x exists` and
`not traits.x exists` test for it.

`not` and parentheses nest at most MAX_DEPTH deep, and so do `and`, `or`, `not` and arithmetic in the tree
the text makes (see `nodes.MAX_DEPTH`): the parser never recurses deeper than that, whatever the text. A
comparison is arithmetic when its left side is not a plain field (`2 * traits.a > 1`, `(traits.a + 1) * 2 >
3`) or its right side has an operator; a `(` that starts a condition opens arithmetic when the token after
its `)` is an arithmetic or comparison operator, else a group of conditions.

Errors are `SegmentSyntaxError`: the caller's field name, then "line L, column C: expected X, found Y".

The parts: `text_tokens` (the lexer, `SegmentSyntaxError` and the texts errors use), `text_parser` and
`text_events` (the parser), `text_writer` (`to_text`); their public names are re-exported here.
"""

from __future__ import annotations

from cdp_kit.errors import InvalidArgument
from cdp_lang.nodes import MAX_DEPTH, ROOTS, Node, depth
from cdp_lang.text_parser import Parser
from cdp_lang.text_tokens import (
    ARITHMETIC_OPERATOR_EXPECTED,
    CONDITION_EXPECTED,
    DURATION_EXPECTED,
    EVENT_FIELDS_ONLY,
    EVENT_OPERAND_EXPECTED,
    EVENT_TERM_EXPECTED,
    EVENT_VALUE_EXPECTED,
    FIELD_ONLY_IN_ARITHMETIC,
    KEYWORDS,
    NESTING_EXPECTED,
    ONLY_AND,
    OPERAND_EXPECTED,
    OPERATORS_EXPECTED,
    PREFIX_EXPECTED,
    SCALAR_EXPECTED,
    VALUE_EXPECTED,
    SegmentSyntaxError,
)
from cdp_lang.text_writer import (
    EVERY_TRACK_EVENT,
    events_text,
    operand_text,
    path_text,
    quote,
    scalar_text,
    to_text,
    value_text,
)

__all__ = [
    "ARITHMETIC_OPERATOR_EXPECTED",
    "CONDITION_EXPECTED",
    "DURATION_EXPECTED",
    "EVENT_FIELDS_ONLY",
    "EVENT_OPERAND_EXPECTED",
    "EVENT_TERM_EXPECTED",
    "EVENT_VALUE_EXPECTED",
    "EVERY_TRACK_EVENT",
    "FIELD_ONLY_IN_ARITHMETIC",
    "KEYWORDS",
    "NESTING_EXPECTED",
    "ONLY_AND",
    "OPERAND_EXPECTED",
    "OPERATORS_EXPECTED",
    "PREFIX_EXPECTED",
    "SCALAR_EXPECTED",
    "VALUE_EXPECTED",
    "SegmentSyntaxError",
    "events_text",
    "operand_text",
    "parse",
    "path_text",
    "quote",
    "scalar_text",
    "to_text",
    "value_text",
]


def parse(text: str, field: str = "expression", *, roots: tuple[str, ...] = ROOTS) -> Node:
    """The node a segment's text describes; SegmentSyntaxError (an InvalidArgument on `field`) if none.
    A field path starts with one of `roots` (the profile's unless the caller has more to offer)."""
    if not isinstance(text, str):
        raise InvalidArgument(field, f'{text!r} is not text: write a segment like traits.plan = "pro"')
    node = Parser(text, field, roots).segment()
    if (levels := depth(node)) > MAX_DEPTH:
        raise InvalidArgument(
            field, f"and, or and not nest {levels} levels deep; at most {MAX_DEPTH}: flatten the definition"
        )
    return node
