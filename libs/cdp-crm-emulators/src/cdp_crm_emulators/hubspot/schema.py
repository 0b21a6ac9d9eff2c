"""The emulated HubSpot portal's objects: their type ids, properties and unique (idProperty-capable) properties."""

from __future__ import annotations

from typing import Any

OBJECT_TYPE_IDS = {"contacts": "0-1", "companies": "0-2", "deals": "0-3", "tickets": "0-5", "tasks": "0-27"}
SINGULAR = {"contacts": "contact", "companies": "company", "deals": "deal", "tickets": "ticket", "tasks": "task"}
_COMMON = {"hs_object_id", "createdate", "hs_lastmodifieddate", "hubspot_owner_id", "cdp_id", "cdp_idempotency_key"}
PROPERTIES: dict[str, set[str]] = {
    "contacts": _COMMON
    | {"email", "firstname", "lastname", "phone", "company", "lifecyclestage", "lastmodifieddate", "city", "country"}
    | {"cdp_churn_risk", "cdp_fraud_score", "cdp_segments", "cdp_consent_email", "cdp_email_channel"}
    | {"cdp_lifetime_value"},
    "companies": _COMMON | {"domain", "name", "industry", "city", "country"},
    "deals": _COMMON | {"dealname", "dealstage", "pipeline", "amount", "closedate", "hs_is_closed", "hs_is_closed_won"},
    "tickets": _COMMON
    | {"subject", "content", "hs_pipeline", "hs_pipeline_stage", "hs_ticket_priority", "hs_ticket_category"},
    "tasks": _COMMON
    | {"hs_task_subject", "hs_task_body", "hs_task_status", "hs_task_priority", "hs_timestamp", "hs_task_type"},
}


UNIQUE: dict[str, tuple[str, ...]] = {
    "contacts": ("email", "cdp_id", "cdp_idempotency_key"),
    "companies": ("domain", "cdp_id", "cdp_idempotency_key"),
    "deals": ("cdp_id", "cdp_idempotency_key"),
    "tickets": ("cdp_id", "cdp_idempotency_key"),
    "tasks": ("cdp_id", "cdp_idempotency_key"),
}


def object_by_type(object_type_id: str) -> str:
    for obj, type_id in OBJECT_TYPE_IDS.items():
        if type_id == object_type_id:
            return obj
    return "contacts"


# What a list page (``GET /crm/v3/objects/<object>`` without ``properties``) returns, as HubSpot's default
# properties for each object; the rest only when asked for.
DEFAULT_PROPERTIES: dict[str, tuple[str, ...]] = {
    "contacts": ("email", "firstname", "lastname", "createdate", "lastmodifieddate", "hs_object_id"),
    "companies": ("domain", "name", "createdate", "hs_lastmodifieddate", "hs_object_id"),
    "deals": ("dealname", "amount", "dealstage", "pipeline", "closedate", "createdate", "hs_lastmodifieddate"),
    "tickets": ("subject", "content", "hs_pipeline", "hs_pipeline_stage", "hs_ticket_priority", "createdate"),
    "tasks": ("hs_task_subject", "hs_task_status", "hs_task_priority", "hs_timestamp", "createdate"),
}

# (type, fieldType) of the properties that are not single-line text; ``cdp_segments`` is a multiple checkbox,
# whose values HubSpot reads and returns as ``;``-joined text.
_KINDS: dict[str, tuple[str, str]] = {
    "hs_object_id": ("number", "number"),
    "createdate": ("datetime", "date"),
    "hs_lastmodifieddate": ("datetime", "date"),
    "lastmodifieddate": ("datetime", "date"),
    "closedate": ("datetime", "date"),
    "hs_timestamp": ("datetime", "date"),
    "amount": ("number", "number"),
    "cdp_churn_risk": ("number", "number"),
    "cdp_fraud_score": ("number", "number"),
    "cdp_lifetime_value": ("number", "number"),
    "hs_is_closed": ("bool", "booleancheckbox"),
    "hs_is_closed_won": ("bool", "booleancheckbox"),
    "cdp_consent_email": ("bool", "booleancheckbox"),
    "cdp_segments": ("enumeration", "checkbox"),
    "lifecyclestage": ("enumeration", "radio"),
    "dealstage": ("enumeration", "radio"),
    "pipeline": ("enumeration", "select"),
    "hs_pipeline": ("enumeration", "select"),
    "hs_pipeline_stage": ("enumeration", "select"),
    "hs_ticket_priority": ("enumeration", "select"),
    "hs_ticket_category": ("enumeration", "checkbox"),
    "hs_task_status": ("enumeration", "select"),
    "hs_task_priority": ("enumeration", "select"),
    "hs_task_type": ("enumeration", "select"),
    "hubspot_owner_id": ("enumeration", "select"),
    "content": ("string", "textarea"),
    "hs_task_body": ("string", "html"),
}
_READ_ONLY = {"hs_object_id", "createdate", "hs_lastmodifieddate", "lastmodifieddate", "hs_is_closed"}
_READ_ONLY |= {"hs_is_closed_won"}


def object_named(name: str) -> str | None:
    """The object a path names, by its name (``contacts``) or type id (``0-1``); None for one the portal lacks."""
    if name in PROPERTIES:
        return name
    return next((obj for obj, type_id in OBJECT_TYPE_IDS.items() if type_id == name), None)


def definitions(obj: str, stamp: str) -> list[dict[str, Any]]:
    """The object's properties as ``GET /crm/v3/properties/<object>`` answers them, by name. Every field the
    client's ``Property`` model requires is there (``description`` and ``options`` too, empty): an answer
    without one fails its deserialisation. Enumerations have no options here (the portal does not check
    values against options)."""
    answer = []
    for order, name in enumerate(sorted(PROPERTIES[obj])):
        kind, field = _KINDS.get(name, ("string", "text"))
        answer.append(
            {
                "name": name,
                "label": name.replace("_", " ").capitalize(),
                "type": kind,
                "fieldType": field,
                "description": "",
                "groupName": "cdp" if name.startswith("cdp_") else f"{SINGULAR[obj]}information",
                "options": [],
                "displayOrder": order,
                "calculated": False,
                "externalOptions": False,
                "hasUniqueValue": name in UNIQUE[obj],
                "hidden": False,
                "formField": name not in _READ_ONLY,
                "createdAt": stamp,
                "updatedAt": stamp,
                "archived": False,
                "modificationMetadata": {
                    "archivable": name.startswith("cdp_"),
                    "readOnlyDefinition": not name.startswith("cdp_"),
                    "readOnlyValue": name in _READ_ONLY,
                },
            }
        )
    return answer
