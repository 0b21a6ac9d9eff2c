"""CRM search filters: EQ, NEQ, LT(E), GT(E), BETWEEN, IN, NOT_IN, HAS_PROPERTY, NOT_HAS_PROPERTY, CONTAINS_TOKEN.

Values compare as numbers when both sides parse as numbers, else as case-insensitive text; a filter group
matches when all its filters do, and a search when any group does.
"""

from __future__ import annotations

from typing import Any


def sortable(value: Any) -> tuple[int, Any]:
    if value is None:
        return (1, "")
    try:
        return (0, float(value))
    except (TypeError, ValueError):
        return (0, str(value))


def matches_all(record: dict[str, Any], filters: list[dict[str, Any]]) -> bool:
    return all(matches(record["properties"], f) for f in filters)


def matches(properties: dict[str, Any], flt: dict[str, Any]) -> bool:
    name, operator = flt.get("propertyName"), flt.get("operator", "EQ")
    actual = properties.get(name) if name != "id" else properties.get("hs_object_id")
    if operator == "HAS_PROPERTY":
        return actual not in (None, "")
    if operator == "NOT_HAS_PROPERTY":
        return actual in (None, "")
    if actual is None:
        return operator == "NEQ"
    if operator == "IN":
        return str(actual).lower() in {str(v).lower() for v in flt.get("values", [])}
    if operator == "NOT_IN":
        return str(actual).lower() not in {str(v).lower() for v in flt.get("values", [])}
    if operator == "CONTAINS_TOKEN":
        return str(flt.get("value", "")).strip("*").lower() in str(actual).lower()
    expected = flt.get("value")
    if operator in ("EQ", "NEQ"):
        equal = str(actual).lower() == str(expected).lower()
        return equal if operator == "EQ" else not equal
    left, right = sortable(actual), sortable(expected)
    if operator == "BETWEEN":
        return sortable(expected) <= left <= sortable(flt.get("highValue"))
    return {"LT": left < right, "LTE": left <= right, "GT": left > right, "GTE": left >= right}.get(operator, False)
