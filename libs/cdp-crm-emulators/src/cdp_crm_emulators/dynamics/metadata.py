"""Dataverse table definitions (``EntityDefinitions``), read-only, derived from the local Dataverse's own
entity sets (odata.py) so what it describes is what it enforces.

- ``GET EntityDefinitions`` (``$filter`` on a definition's properties: ``EntitySetName eq 'contacts'``,
  ``LogicalName eq 'contact'``, joined by ``and``), ``GET EntityDefinitions(LogicalName='contact')`` or
  ``EntityDefinitions(<MetadataId>)``; an unknown table is 404 with Dataverse's error body. No paging: every
  match comes in the one answer.
- ``$select`` on the definition and ``$expand`` of its ``Attributes``, ``Keys`` and
  ``ManyToOneRelationships``, each with its own ``$select`` (``Attributes($select=LogicalName;...)``).
- ``GET EntityDefinitions(LogicalName='contact')/Attributes`` (and ``/Keys``, ``/ManyToOneRelationships``),
  with ``$select`` and a ``$filter`` such as ``RequiredLevel/Value eq
  Microsoft.Dynamics.CRM.AttributeRequiredLevel'ApplicationRequired'``.

An attribute carries ``AttributeType``, ``RequiredLevel`` as the managed property Dataverse returns
(``{"Value": "None" | "SystemRequired" | "ApplicationRequired" | "Recommended", "CanBeChanged",
"ManagedPropertyLogicalName"}``), ``IsValidForCreate`` / ``IsValidForUpdate`` and its derived ``@odata.type``;
a key (EntityKeyMetadata) its ``KeyAttributes``; a lookup is an attribute of type Lookup or Customer whose
navigation property names the many-to-one relationship (``ReferencingEntityNavigationPropertyName``).
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from cdp_crm_emulators.dynamics.odata import NAMESPACE, DataverseError, EntitySet

SEGMENTS = ("Attributes", "Keys", "ManyToOneRelationships")
_IDS = uuid.UUID("6f1d5a52-6c1b-4bb4-9f3a-2f4f3c1d7e10")  # MetadataIds are stable: uuid5 under this


def handle(
    sets: dict[str, EntitySet], context: str, method: str, path: str, query: dict[str, list[str]]
) -> tuple[int, dict[str, str], Any]:
    """A Web API request whose path starts with EntityDefinitions; `context` is the ``$metadata`` URL."""
    if method != "GET":
        raise DataverseError(405, "0x80060888", f"The HTTP method '{method}' is not allowed on EntityDefinitions.")
    match = re.fullmatch(r"EntityDefinitions(?:\(([^)]*)\))?(?:/(\w+))?", path.strip("/"))
    if match is None or (match.group(2) is not None and match.group(2) not in SEGMENTS):
        raise DataverseError(404, "0x80060888", f"Resource not found for the segment '{path.split('/')[-1]}'.")
    key, segment = match.group(1), match.group(2)
    definitions = [definition(s) for s in sets.values()]
    if key is None:
        if segment is not None:
            raise DataverseError(400, "0x80060888", "Bad Request - Error in query syntax: a table's key is needed.")
        chosen = [d for d in definitions if _matches(d, query)]
        expand = _expand(query)
        value = [_shaped(d, _select(query, d), expand) for d in chosen]
        return 200, {}, {"@odata.context": f"{context}#EntityDefinitions", "value": value}
    found = next((d for d in definitions if _is(d, key)), None)
    if found is None:
        name = key.partition("=")[2].strip("'") or key
        raise DataverseError(404, "0x80040217", f"Could not find entity with logical name '{name}'.")
    if segment is None:
        body = _shaped(found, _select(query, found), _expand(query))
        return 200, {}, {"@odata.context": f"{context}#EntityDefinitions/$entity", **body}
    rows = [r for r in found[segment] if _matches(r, query)]
    select = _select(query, found[segment][0] if found[segment] else {})
    value = [_pick(r, select) for r in rows]
    return (
        200,
        {},
        {"@odata.context": f"{context}#EntityDefinitions('{found['LogicalName']}')/{segment}", "value": value},
    )


def definition(entity: EntitySet) -> dict[str, Any]:
    """The whole EntityMetadata of one table, its collections included."""
    logical = entity.logical
    attributes = [_attribute(entity, name) for name in sorted(entity.attributes)]
    lookups: dict[str, list[tuple[str, str]]] = {}  # attribute -> (navigation property, target set)
    for nav, target in entity.lookups.items():
        lookups.setdefault(lookup_attribute(nav, target), []).append((nav, target))
    for column, navs in sorted(lookups.items()):
        kind = "Customer" if column in ("customerid", "parentcustomerid") else "Lookup"
        attributes.append(
            {
                **_attribute(entity, column, kind),
                "Targets": sorted(_logical_of(target) for _, target in navs),
            }
        )
    keys = [
        {
            "@odata.type": f"#{NAMESPACE}.EntityKeyMetadata",
            "MetadataId": _id(logical, "key", column),
            "LogicalName": f"cdp_{logical}_{column}",
            "SchemaName": f"cdp_{logical}_{column}",
            "EntityLogicalName": logical,
            "KeyAttributes": [column],
            "EntityKeyIndexStatus": "Active",
        }
        for column in entity.keys
    ]
    relationships = [
        {
            "@odata.type": f"#{NAMESPACE}.OneToManyRelationshipMetadata",
            "MetadataId": _id(logical, "relationship", nav),
            "SchemaName": f"{_logical_of(target)}_{logical}_{nav}",
            "RelationshipType": "OneToManyRelationship",
            "ReferencedEntity": _logical_of(target),
            "ReferencedAttribute": f"{_logical_of(target)}id",
            "ReferencingEntity": logical,
            "ReferencingAttribute": lookup_attribute(nav, target),
            "ReferencingEntityNavigationPropertyName": nav,
        }
        for nav, target in sorted(entity.lookups.items())
    ]
    return {
        "MetadataId": _id(logical),
        "LogicalName": logical,
        "SchemaName": logical.capitalize(),
        "EntitySetName": entity.name,
        "LogicalCollectionName": entity.name,
        "PrimaryIdAttribute": entity.primary,
        "PrimaryNameAttribute": entity.primary_name,
        "IsCustomEntity": False,
        "Attributes": attributes,
        "Keys": keys,
        "ManyToOneRelationships": relationships,
    }


def lookup_attribute(nav: str, target: str) -> str:
    """The lookup column a navigation property writes: a polymorphic one (customerid, regardingobjectid)
    has one navigation property per target table, named ``<column>_<target>``."""
    suffix = f"_{_logical_of(target)}"
    return nav.removesuffix(suffix) if nav.endswith(suffix) else nav


def _logical_of(entity_set: str) -> str:
    return {"opportunities": "opportunity"}.get(entity_set, entity_set.removesuffix("s"))


def _attribute(entity: EntitySet, column: str, kind: str | None = None) -> dict[str, Any]:
    kind = kind or entity.attribute_type(column)
    metadata_type = {"Customer": "Lookup", "Uniqueidentifier": "UniqueIdentifier"}.get(kind, kind)
    return {
        "@odata.type": f"#{NAMESPACE}.{metadata_type}AttributeMetadata",
        "MetadataId": _id(entity.logical, "attribute", column),
        "LogicalName": column,
        "SchemaName": column,
        "EntityLogicalName": entity.logical,
        "AttributeType": kind,
        "AttributeTypeName": {"Value": f"{kind}Type"},
        "RequiredLevel": {
            "Value": entity.required_level(column),
            "CanBeChanged": column not in (entity.primary, "statecode"),
            "ManagedPropertyLogicalName": "canmodifyrequirementlevelsettings",
        },
        "IsValidForCreate": entity.valid_for_create(column),
        "IsValidForUpdate": entity.valid_for_update(column),
        "IsValidForRead": True,
        "IsPrimaryId": column == entity.primary,
        "IsPrimaryName": column == entity.primary_name,
        "IsCustomAttribute": column.startswith("cdp_"),
    }


def _id(*parts: str) -> str:
    return str(uuid.uuid5(_IDS, "/".join(parts)))


def _is(found: dict[str, Any], key: str) -> bool:
    name, _, value = key.partition("=")
    if not value:
        return found["MetadataId"] == name.strip()
    return name.strip() == "LogicalName" and found["LogicalName"] == value.strip().strip("'")


def _options(text: str) -> list[str]:
    """``a,b($select=c,d;$filter=e)``'s top-level items: commas inside parentheses stay."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _select(query: dict[str, list[str]], sample: dict[str, Any]) -> list[str] | None:
    if "$select" not in query:
        return None
    names = _options(query["$select"][0])
    for name in names:
        if sample and name not in sample:
            raise DataverseError(400, "0x80060888", f"Could not find a property named '{name}' on the type.")
    return names


def _expand(query: dict[str, list[str]]) -> dict[str, list[str] | None]:
    """The collections to expand, each with its $select (None: every property)."""
    expanded: dict[str, list[str] | None] = {}
    for item in _options(query["$expand"][0]) if "$expand" in query else []:
        m = re.fullmatch(r"(\w+)(?:\((.*)\))?", item, flags=re.S)
        if m is None or m.group(1) not in SEGMENTS:
            raise DataverseError(400, "0x80060888", f"Could not find a property named '{item}' on EntityMetadata.")
        select = None
        for option in (m.group(2) or "").split(";"):
            name, _, value = option.partition("=")
            if name.strip() == "$select":
                select = _options(value)
            elif name.strip():
                raise DataverseError(
                    400, "0x80060888", f"The query option '{name.strip()}' is not supported by the local Dataverse."
                )
        expanded[m.group(1)] = select
    return expanded


def _pick(row: dict[str, Any], select: list[str] | None) -> dict[str, Any]:
    if select is None:
        return dict(row)
    kept = {k: row[k] for k in ("@odata.type", "MetadataId") if k in row}
    for name in select:
        if name not in row:
            raise DataverseError(400, "0x80060888", f"Could not find a property named '{name}' on the type.")
        kept[name] = row[name]
    return kept


def _shaped(found: dict[str, Any], select: list[str] | None, expand: dict[str, list[str] | None]) -> dict[str, Any]:
    """A definition as answered: its properties (the collections only when expanded)."""
    plain = {k: v for k, v in found.items() if k not in SEGMENTS}
    body = _pick(plain, select)
    for segment, inner in expand.items():
        body[segment] = [_pick(row, inner) for row in found[segment]]
    return body


def _matches(row: dict[str, Any], query: dict[str, list[str]]) -> bool:
    """``$filter``: ``<property>[/<property>] eq <value>`` clauses joined by ``and``; a value is a quoted
    string, true / false, or an enum member (``Microsoft.Dynamics.CRM.<Enum>'<Member>'``)."""
    text = query.get("$filter", [""])[0].strip()
    if not text:
        return True
    for clause in re.split(r"\s+and\s+", text, flags=re.I):
        m = re.fullmatch(r"\s*([\w/]+)\s+eq\s+(.+?)\s*", clause, flags=re.I)
        if m is None:
            raise DataverseError(400, "0x80060888", f"Syntax error in $filter near '{clause.strip()}'.")
        actual: Any = row
        for part in m.group(1).split("/"):
            actual = actual.get(part) if isinstance(actual, dict) else None
        raw = m.group(2)
        enum = re.fullmatch(rf"{re.escape(NAMESPACE)}\.\w+'(.*)'", raw)
        if enum is not None:
            expected: Any = enum.group(1)
        elif raw in ("true", "false"):
            expected = raw == "true"
        else:
            expected = raw.strip("'").replace("''", "'")
        if isinstance(actual, str) and isinstance(expected, str):
            actual, expected = actual.lower(), expected.lower()
        if actual != expected:
            return False
    return True
