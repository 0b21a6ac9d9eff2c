"""The Query API (``POST /crm/v8/coql``, body ``{"select_query": "..."}``) as far as a CRM client reads records with it:
``select <fields> from <Module> where <criteria> [limit N] [offset M]``. Criteria: ``<field> = 'x'``,
``<field> in ('x', 'y')`` (50 values at most), ``is null`` / ``is not null``, joined by ``and`` / ``or`` in
brackets (a lookup field compares the id of the record it names); strings in single quotes with ``\\'`` and ``\\\\`` escaped; text compares case-insensitively.
LIMIT is 200 by default and 2,000 at most. Answers ``{"data": [...], "info": {"count", "more_records"}}``
(each record its selected fields and ``id``), 204 when nothing matches; a query it cannot read is 400
``SYNTAX_ERROR``, an unknown module or field 400 ``INVALID_QUERY`` naming it.
"""

from __future__ import annotations

import re
from typing import Any

from cdp_crm_emulators.zoho.modules import SYSTEM, Module

IN_LIMIT = 50
MAX_LIMIT = 2000

_TOKEN = re.compile(r"\s*(?:(?P<string>'(?:\\.|[^'\\])*')|(?P<punct>[(),=])|(?P<word>[A-Za-z0-9_.]+))")


class QueryError(Exception):
    def __init__(self, code: str, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.code, self.message, self.details = code, message, details


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text.rstrip()):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise QueryError("SYNTAX_ERROR", "error occured while parsing the query", {"near": text[pos : pos + 10]})
        kind = m.lastgroup or "word"
        value = m.group(kind)
        if kind == "string":
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        out.append((kind, value))
        pos = m.end()
    return out


def _value(value: Any) -> Any:
    """What a criterion compares: a lookup (``{"id": ..., "name": ...}``) by the id of the record it names."""
    return value.get("id") if isinstance(value, dict) else value


def run(query: str, modules: dict[str, Module], rows_of: Any) -> tuple[list[dict[str, Any]], bool]:
    """The query's page of records (selected fields and id) and whether more records match after it."""
    tokens = _tokens(query)
    pos = 0

    def peek(word: str | None = None) -> bool:
        return pos < len(tokens) and (word is None or tokens[pos][1].lower() == word)

    def take(word: str | None = None, kind: str | None = None) -> str:
        nonlocal pos
        if (
            pos >= len(tokens)
            or (word is not None and tokens[pos][1].lower() != word)
            or (kind is not None and tokens[pos][0] != kind)
        ):
            raise QueryError("SYNTAX_ERROR", "error occured while parsing the query", {"expected": word or kind})
        pos += 1
        return tokens[pos - 1][1]

    take("select")
    fields = [take(kind="word")]
    while peek(","):
        take(",")
        fields.append(take(kind="word"))
    take("from")
    module_name = take(kind="word")
    module = modules.get(module_name)
    if module is None:
        raise QueryError("INVALID_QUERY", "invalid query formed", {"reason": "invalid module", "module": module_name})
    for name in fields:
        if name not in module.fields and name not in SYSTEM:
            raise QueryError("INVALID_QUERY", "invalid query formed", {"column_name": name, "reason": "invalid column"})

    def field() -> str:
        name = take(kind="word")
        if name not in module.fields and name not in SYSTEM:
            raise QueryError("INVALID_QUERY", "invalid query formed", {"column_name": name, "reason": "invalid column"})
        return name

    def condition() -> Any:
        name = field()
        if peek("="):
            take("=")
            wanted = {take(kind="string").lower()}
            return lambda r: str(_value(r.get(name)) or "").lower() in wanted
        if peek("in"):
            take("in")
            take("(")
            values = [take(kind="string").lower()]
            while peek(","):
                take(",")
                values.append(take(kind="string").lower())
            take(")")
            if len(values) > IN_LIMIT:
                raise QueryError("LIMIT_EXCEEDED", "the in clause exceeds the limit", {"limit": IN_LIMIT})
            wanted = set(values)
            return lambda r: _value(r.get(name)) not in (None, "") and str(_value(r.get(name))).lower() in wanted
        take("is")
        negated = peek("not")
        if negated:
            take("not")
        take("null")
        return lambda r: (r.get(name) in (None, "")) != negated

    def term() -> Any:
        if peek("("):
            take("(")
            inner = expression()
            take(")")
            return inner
        return condition()

    def expression() -> Any:
        left = term()
        while peek("and") or peek("or"):
            op = take()
            right, prev = term(), left
            left = (
                (lambda r, a=prev, b=right: a(r) and b(r))
                if op.lower() == "and"
                else (lambda r, a=prev, b=right: a(r) or b(r))
            )
        return left

    take("where")
    predicate = expression()
    limit, offset = 200, 0
    if peek("limit"):
        take("limit")
        limit = int(take(kind="word"))
    if peek("offset"):
        take("offset")
        offset = int(take(kind="word"))
    if pos != len(tokens):
        raise QueryError("SYNTAX_ERROR", "error occured while parsing the query", {"near": tokens[pos][1]})
    if not 0 < limit <= MAX_LIMIT:
        raise QueryError("LIMIT_EXCEEDED", "the limit exceeds the maximum", {"limit": MAX_LIMIT})
    matched = sorted((r for r in rows_of(module.name) if predicate(r)), key=lambda r: int(r["id"]))
    page = matched[offset : offset + limit]
    return [{**{name: r.get(name) for name in fields}, "id": r["id"]} for r in page], len(matched) > offset + limit
