"""The Dataverse data model and OData vocabulary: entity sets, keys, ETags, ``$select`` and ``$filter``.

``$filter`` takes comparisons (eq ne gt ge lt le) joined by ``and`` / ``or`` (``and`` binds tighter), with
quoted strings, numbers and null; text compares case-insensitively, as Dataverse's collation does.
"""

from __future__ import annotations

import re
from typing import Any

# Columns Dataverse keeps itself: never written through the Web API.
SYSTEM_COLUMNS = ("createdon", "modifiedon", "versionnumber")
# Each column's AttributeType where it is not String (metadata.py describes them).
ATTRIBUTE_TYPES = {
    "createdon": "DateTime",
    "modifiedon": "DateTime",
    "scheduledend": "DateTime",
    "actualclosedate": "DateTime",
    "versionnumber": "BigInt",
    "statecode": "State",
    "statuscode": "Status",
    "donotbulkemail": "Boolean",
    "type": "Boolean",
    "prioritycode": "Picklist",
    "caseorigincode": "Picklist",
    "industrycode": "Picklist",
    "salesstage": "Picklist",
    "createdfromcode": "Picklist",
    "membertype": "Integer",
    "estimatedvalue": "Money",
    "actualvalue": "Money",
    "cdp_churnrisk": "Decimal",
    "cdp_fraudscore": "Decimal",
    "cdp_lifetimevalue": "Decimal",
    "description": "Memo",
    "cdp_segments": "Memo",
}


class EntitySet:
    """One table: its entity set and logical names, primary id and name columns, columns, alternate keys
    (one column each), lookups (navigation property -> the entity set it binds to) and requirement levels.

    `required` are the columns a new row must have a value in (its primary name column), refused with
    0x80040200 when missing: ApplicationRequired, as Dataverse describes them. `application_required`
    are further ApplicationRequired columns (contact's lastname) that, as in Dataverse, only forms
    enforce: the Web API takes a row without them. SystemRequired columns (the primary id, statecode)
    are kept by the platform and can never be cleared."""

    def __init__(
        self,
        name: str,
        logical: str,
        primary: str,
        attributes: set[str],
        keys: tuple[str, ...],
        lookups: dict[str, str],
        required: tuple[str, ...] = (),
        *,
        primary_name: str | None = None,
        application_required: tuple[str, ...] = (),
        read_only: tuple[str, ...] = (),
    ):
        self.name, self.logical, self.primary = name, logical, primary
        self.attributes = attributes | {primary, *SYSTEM_COLUMNS, "statecode", "statuscode"}
        if name in ("accounts", "contacts", "incidents"):  # the Merge action's tables: `merged`, read only
            self.attributes |= {"merged"}
        self.keys, self.lookups, self.required = keys, lookups, required
        self.primary_name = primary_name or (required[0] if required else primary)
        self.application_required = application_required
        self.read_only = read_only  # computed by Dataverse (contact's fullname): neither created nor updated

    def required_level(self, column: str) -> str:
        """The column's RequiredLevel as Dataverse names it."""
        if column in (self.primary, "statecode"):
            return "SystemRequired"
        if column in self.required or column in self.application_required:
            return "ApplicationRequired"
        return "None"

    def attribute_type(self, column: str) -> str:
        return "Uniqueidentifier" if column == self.primary else ATTRIBUTE_TYPES.get(column, "String")

    def valid_for_create(self, column: str) -> bool:
        return column not in (*SYSTEM_COLUMNS, *self.read_only)

    def valid_for_update(self, column: str) -> bool:
        return column not in (*SYSTEM_COLUMNS, self.primary, "ticketnumber", *self.read_only)


def default_entity_sets() -> dict[str, EntitySet]:
    return {
        "contacts": EntitySet(
            "contacts",
            "contact",
            "contactid",
            {
                "firstname",
                "lastname",
                "fullname",
                "emailaddress1",
                "telephone1",
                "mobilephone",
                "jobtitle",
                "donotbulkemail",
                "cdp_id",
            }
            | {"cdp_churnrisk", "cdp_fraudscore", "cdp_lifetimevalue", "cdp_segments"},
            ("emailaddress1", "cdp_id"),
            {"parentcustomerid_account": "accounts"},
            primary_name="fullname",
            application_required=("lastname",),
            read_only=("fullname",),
        ),
        "accounts": EntitySet(
            "accounts",
            "account",
            "accountid",
            {"name", "websiteurl", "industrycode", "cdp_id"},
            ("cdp_id",),
            {},
            ("name",),
        ),
        "incidents": EntitySet(
            "incidents",
            "incident",
            "incidentid",
            {"title", "description", "prioritycode", "caseorigincode", "ticketnumber", "cdp_idempotencykey"},
            ("cdp_idempotencykey",),
            {"customerid_contact": "contacts", "customerid_account": "accounts"},
            ("title",),
        ),
        "opportunities": EntitySet(
            "opportunities",
            "opportunity",
            "opportunityid",
            {
                "name",
                "stepname",
                "salesstage",
                "estimatedvalue",
                "actualvalue",
                "actualclosedate",
                "cdp_idempotencykey",
            },
            ("cdp_idempotencykey",),
            {"parentcontactid": "contacts", "customerid_contact": "contacts", "parentaccountid": "accounts"},
            ("name",),
        ),
        "lists": EntitySet(
            "lists",
            "list",
            "listid",
            {"listname", "type", "membertype", "createdfromcode", "description"},
            (),
            {},
            ("listname",),
        ),
        "tasks": EntitySet(
            "tasks",
            "task",
            "activityid",
            {"subject", "description", "prioritycode", "scheduledend", "cdp_idempotencykey"},
            ("cdp_idempotencykey",),
            {"regardingobjectid_contact": "contacts", "regardingobjectid_account": "accounts"},
            ("subject",),
        ),
    }


class DataverseError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


NAMESPACE = "Microsoft.Dynamics.CRM"


def etag(record: dict[str, Any]) -> str:
    return f'W/"{record.get("versionnumber")}"'


def select_of(query: dict[str, list[str]]) -> list[str] | None:
    return [s.strip() for s in query["$select"][0].split(",")] if "$select" in query else None


def split_key(key: str) -> list[str]:
    return [p for p in re.split(r",(?=(?:[^']*'[^']*')*[^']*$)", key) if p]


def parse_filter(text: str, entity: EntitySet) -> Any:
    """``a eq 'x' and b gt 5 or c ne null``: left-to-right, ``and`` binding tighter than ``or``."""
    if not text.strip():
        return lambda r: True
    alternatives = []
    for group in re.split(r"\s+or\s+", text.strip(), flags=re.I):
        tests = []
        for clause in re.split(r"\s+and\s+", group, flags=re.I):
            m = re.fullmatch(r"\s*(\w+)\s+(eq|ne|gt|ge|lt|le)\s+(.+?)\s*", clause, flags=re.I)
            if m is None:
                raise DataverseError(400, "0x80060888", f"Syntax error in $filter near '{clause.strip()}'.")
            name, op, raw = m.group(1), m.group(2).lower(), m.group(3)
            if name not in entity.attributes and not (name.startswith("_") and name.endswith("_value")):
                raise DataverseError(
                    400,
                    "0x80060888",
                    f"Could not find a property named '{name}' on type '{NAMESPACE}.{entity.logical}'.",
                )
            value: Any = None if raw == "null" else raw.strip("'").replace("''", "'") if raw.startswith("'") else raw
            if isinstance(value, str) and re.fullmatch(r"-?\d+(\.\d+)?", value) and not raw.startswith("'"):
                value = float(value)
            tests.append((name, op, value))
        alternatives.append(tests)

    def compare(actual: Any, op: str, expected: Any) -> bool:
        if isinstance(expected, float) and actual is not None:
            actual = float(actual)
        if isinstance(actual, str) and isinstance(expected, str):
            actual, expected = actual.lower(), expected.lower()
        if op == "eq":
            return bool(actual == expected)
        if op == "ne":
            return bool(actual != expected)
        if actual is None or expected is None:
            return False
        return {"gt": actual > expected, "ge": actual >= expected, "lt": actual < expected, "le": actual <= expected}[
            op
        ]

    return lambda r: any(all(compare(r.get(n), o, v) for n, o, v in tests) for tests in alternatives)
