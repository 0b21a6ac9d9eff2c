"""The emulated HubSpot portal's objects: their type ids, properties and unique (idProperty-capable) properties."""

from __future__ import annotations

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
