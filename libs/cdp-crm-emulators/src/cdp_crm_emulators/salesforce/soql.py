"""The slice of SOQL a sync needs: SELECT fields | COUNT() FROM object [WHERE ...] [ORDER BY ...] [LIMIT n].

WHERE takes AND / OR / NOT with parentheses, comparisons (= != <> < <= > >=), LIKE with % and _, IN and
NOT IN lists, and literals: 'strings' (backslash escapes), numbers, true/false/null, date and datetime
literals (2024-01-31, 2024-01-31T10:00:00Z or +01:00) - enough for modified-since polling on
SystemModstamp. Anything else is MALFORMED_QUERY; an unknown column is INVALID_FIELD, as in Salesforce.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_TOKEN = re.compile(
    r"\s*(?:(?P<string>'(?:[^'\\]|\\.)*')|(?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2}))"
    r"|(?P<date>\d{4}-\d{2}-\d{2})|(?P<number>-?\d+(?:\.\d+)?)|(?P<op><=|>=|!=|<>|=|<|>|\(|\)|,)|(?P<word>[A-Za-z_][\w.]*))"
)


class QueryError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Query:
    obj: str
    fields: list[str]
    count: bool
    where: Callable[[dict[str, Any]], bool]
    order_by: list[tuple[str, bool]]  # (field, descending)
    limit: int | None


def parse_datetime(text: str) -> dt.datetime:
    text = text.replace("Z", "+00:00")
    if re.search(r"[+-]\d{4}$", text):
        text = text[:-2] + ":" + text[-2:]
    parsed = dt.datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    text = text.strip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise QueryError("MALFORMED_QUERY", f"unexpected character at {pos}")
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]], field_types: dict[str, str], obj: str) -> None:
        self.tokens, self.pos, self.types, self.obj = tokens, 0, field_types, obj

    def peek(self, upper: bool = True) -> str | None:
        if self.pos >= len(self.tokens):
            return None
        value = self.tokens[self.pos][1]
        return value.upper() if upper else value

    def take(self, expected: str | None = None) -> tuple[str, str]:
        if self.pos >= len(self.tokens):
            raise QueryError("MALFORMED_QUERY", "unexpected end of query")
        token = self.tokens[self.pos]
        if expected is not None and token[1].upper() != expected:
            raise QueryError("MALFORMED_QUERY", f"expecting '{expected}', found '{token[1]}'")
        self.pos += 1
        return token

    def column(self, name: str) -> str:
        for known in self.types:
            if known.lower() == name.lower():
                return known
        raise QueryError(
            "INVALID_FIELD",
            f"No such column '{name}' on entity '{self.obj}'. If you are attempting to use a custom field, be sure to "
            "append the '__c' after the custom field name.",
        )

    def expression(self) -> Callable[[dict[str, Any]], bool]:
        left = self.term()
        while self.peek() == "OR":
            self.take()
            right, prev = self.term(), left
            left = lambda r, a=prev, b=right: a(r) or b(r)  # noqa: E731
        return left

    def term(self) -> Callable[[dict[str, Any]], bool]:
        left = self.factor()
        while self.peek() == "AND":
            self.take()
            right, prev = self.factor(), left
            left = lambda r, a=prev, b=right: a(r) and b(r)  # noqa: E731
        return left

    def factor(self) -> Callable[[dict[str, Any]], bool]:
        if self.peek() == "NOT":
            self.take()
            inner = self.factor()
            return lambda r: not inner(r)
        if self.peek() == "(":
            self.take("(")
            inner = self.expression()
            self.take(")")
            return inner
        kind, name = self.take()
        if kind != "word":
            raise QueryError("MALFORMED_QUERY", f"unexpected token '{name}'")
        column = self.column(name)
        kind_of = self.types[column]
        op = self.take()[1].upper()
        if op == "NOT":
            self.take("IN")
            values = self.values(kind_of)
            return lambda r: _norm(r.get(column), kind_of) not in values
        if op == "IN":
            values = self.values(kind_of)
            return lambda r: _norm(r.get(column), kind_of) in values
        value = self.literal(kind_of)
        if op == "LIKE":
            pattern = re.compile("^" + re.escape(str(value)).replace("%", ".*").replace("_", ".") + "$", re.I | re.S)
            return lambda r: r.get(column) is not None and bool(pattern.match(str(r.get(column))))
        compare = _COMPARE.get(op)
        if compare is None:
            raise QueryError("MALFORMED_QUERY", f"unknown operator '{op}'")
        return lambda r: compare(_norm(r.get(column), kind_of), value)

    def values(self, kind_of: str) -> set[Any]:
        self.take("(")
        values = {self.literal(kind_of)}
        while self.peek() == ",":
            self.take()
            values.add(self.literal(kind_of))
        self.take(")")
        return values

    def literal(self, kind_of: str) -> Any:
        kind, text = self.take()
        if kind == "string":
            return _norm(re.sub(r"\\(.)", r"\1", text[1:-1]), kind_of)
        if kind == "datetime":
            return parse_datetime(text)
        if kind == "date":
            return dt.date.fromisoformat(text)
        if kind == "number":
            return float(text)
        if kind == "word" and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if kind == "word" and text.lower() == "null":
            return None
        raise QueryError("MALFORMED_QUERY", f"unexpected value '{text}'")


def _norm(value: Any, kind: str) -> Any:
    """Stored values to comparable ones: datetimes parsed, numbers as floats, text case-insensitive."""
    if value is None:
        return None
    if kind == "datetime":
        return parse_datetime(value) if isinstance(value, str) else value
    if kind == "date":
        return dt.date.fromisoformat(value[:10]) if isinstance(value, str) else value
    if kind == "double":
        return float(value)
    if kind == "boolean":
        return bool(value)
    return str(value).lower() if isinstance(value, str) else value


def _safe(op: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def compare(a: Any, b: Any) -> bool:
        if a is None or b is None:
            return False
        try:
            return op(a, b)
        except TypeError:
            return False

    return compare


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<>": lambda a, b: a != b,
    "<": _safe(lambda a, b: a < b),
    "<=": _safe(lambda a, b: a <= b),
    ">": _safe(lambda a, b: a > b),
    ">=": _safe(lambda a, b: a >= b),
}


def parse(text: str, objects: dict[str, dict[str, str]]) -> Query:
    """`objects` maps each object name to its field types."""
    tokens = _tokens(text)
    if not tokens or tokens[0][1].upper() != "SELECT":
        raise QueryError("MALFORMED_QUERY", "a query starts with SELECT")
    pos, selected = 1, []
    while pos < len(tokens) and tokens[pos][1].upper() != "FROM":
        if tokens[pos][1] != ",":
            selected.append(tokens[pos][1])
        pos += 1
    if pos >= len(tokens) - 1:
        raise QueryError("MALFORMED_QUERY", "expecting FROM <object>")
    obj_name = tokens[pos + 1][1]
    obj = next((name for name in objects if name.lower() == obj_name.lower()), None)
    if obj is None:
        raise QueryError("INVALID_TYPE", f"sObject type '{obj_name}' is not supported.")
    parser = _Parser(tokens[pos + 2 :], objects[obj], obj)
    count = [s.upper() for s in selected] == ["COUNT", "(", ")"]
    fields = [] if count else [parser.column(name) for name in selected]
    if not count and not fields:
        raise QueryError("MALFORMED_QUERY", "expecting a field list")
    where: Callable[[dict[str, Any]], bool] = lambda r: True  # noqa: E731
    order_by: list[tuple[str, bool]] = []
    limit = None
    if parser.peek() == "WHERE":
        parser.take()
        where = parser.expression()
    if parser.peek() == "ORDER":
        parser.take()
        parser.take("BY")
        while True:
            column = parser.column(parser.take()[1])
            descending = False
            if parser.peek() in ("ASC", "DESC"):
                descending = parser.take()[1].upper() == "DESC"
            order_by.append((column, descending))
            if parser.peek() != ",":
                break
            parser.take()
    if parser.peek() == "LIMIT":
        parser.take()
        limit = int(float(parser.take()[1]))
    if parser.peek() is not None:
        raise QueryError("MALFORMED_QUERY", f"unexpected token: '{parser.peek(upper=False)}'")
    return Query(obj, fields, count, where, order_by, limit)


def sort_key(value: Any, kind: str) -> tuple[int, Any]:
    norm = _norm(value, kind)
    return (1, "") if norm is None else (0, norm)
