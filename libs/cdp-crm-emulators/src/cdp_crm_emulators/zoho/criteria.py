"""Search criteria: ``((A:equals:x)and(B:starts_with:y))or(C:greater_than:<iso time>)`` and the email / phone /
word shortcuts. Comparators: equals, not_equal, starts_with, in, between, greater_than, greater_equal,
less_than, less_equal; text compares case-insensitively, Created_Time / Modified_Time as times.
"""

from __future__ import annotations

import datetime as dt
import re
import urllib.parse
from typing import Any

from cdp_crm_emulators.zoho.modules import SYSTEM, Module


def search_predicate(query: Any, module: Module) -> Any:
    """criteria, else email, phone or word - the first one given, as Zoho reads them."""
    if "criteria" in query:
        return parse_criteria(query["criteria"], module)
    typed = {"email": "email", "phone": "phone"}
    for param, kind in typed.items():
        if param in query:
            wanted = query[param].lower()
            names = [f for f, t in module.fields.items() if t == kind]

            def by_type(record: dict[str, Any], wanted: str = wanted, names: list[str] = names) -> bool:
                return any(str(record.get(name) or "").lower() == wanted for name in names)

            return by_type
    if "word" in query:
        word = query["word"].lower()

        def by_word(record: dict[str, Any]) -> bool:
            return any(word in str(value).lower() for value in record.values())

        return by_word
    return None


def parse_time(text: str) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def parse_criteria(text: str, module: Module) -> Any:
    """``((A:equals:x)and(B:starts_with:y))or(C:greater_than:2024-01-01T00:00:00+00:00)``, left to right."""
    text = urllib.parse.unquote(text).strip()
    tokens = re.findall(r"\(|\)|\band\b|\bor\b|[^()]+?(?=\)|$)", text, flags=re.I)
    pos = 0

    def condition(raw: str) -> Any:
        field_name, op, value = [*raw.split(":", 2), "", ""][:3]
        if field_name not in module.fields and field_name not in SYSTEM:
            raise ValueError(f"invalid query formed: unknown field {field_name}")
        values = [v.replace("\\,", ",") for v in re.split(r"(?<!\\),", value)]

        timed = field_name in ("Modified_Time", "Created_Time")
        norm = parse_time if timed else (lambda x: str(x).lower())
        wanted = [norm(v) for v in values]

        def test(record: dict[str, Any]) -> bool:
            raw_value = record.get(field_name)
            if op == "not_equal":
                return raw_value is None or norm(raw_value) not in wanted
            if raw_value is None:
                return False
            actual = norm(raw_value)
            if op in ("equals", "in"):
                return actual in wanted
            if op == "starts_with":
                return str(actual).startswith(str(wanted[0]))
            if op == "between":
                return len(wanted) == 2 and wanted[0] <= actual <= wanted[1]
            if op == "greater_than":
                return actual > wanted[0]
            if op == "greater_equal":
                return actual >= wanted[0]
            if op == "less_than":
                return actual < wanted[0]
            return actual <= wanted[0]

        if op not in (
            "equals",
            "not_equal",
            "starts_with",
            "in",
            "between",
            "greater_than",
            "greater_equal",
            "less_than",
            "less_equal",
        ):
            raise ValueError(f"invalid query formed: unknown comparator {op}")
        return test

    def expression() -> Any:
        nonlocal pos
        left = term()
        while pos < len(tokens) and tokens[pos].lower() in ("and", "or"):
            op = tokens[pos].lower()
            pos += 1
            right, prev = term(), left
            left = (
                (lambda r, a=prev, b=right: a(r) and b(r)) if op == "and" else (lambda r, a=prev, b=right: a(r) or b(r))
            )
        return left

    def term() -> Any:
        nonlocal pos
        if pos >= len(tokens) or tokens[pos] != "(":
            raise ValueError("invalid query formed")
        pos += 1
        if tokens[pos] == "(":
            inner = expression()
        else:
            inner = condition(tokens[pos].strip())
            pos += 1
        if pos >= len(tokens) or tokens[pos] != ")":
            raise ValueError("invalid query formed")
        pos += 1
        return inner

    result = expression()
    if pos != len(tokens):
        raise ValueError("invalid query formed")
    return result
