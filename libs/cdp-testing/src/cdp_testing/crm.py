"""The CRM connector's usual test connection, as a connections document (`CDP_CRM_CONNECTIONS_FILE`).

One HubSpot connection `hs` at `base_url` (the local HubSpot, `cdp_crm_emulators.hubspot`; its token read
from `HUBSPOT_TOKEN`): contacts matched on `cdp_id` = the person id, with email, first name and the churn
risk rounded to two places, and a `success-task` action writing HubSpot tasks about that contact under
an idempotency key. `limits` (burst, window_seconds) tighten the account's rate limit when given.
"""

from __future__ import annotations

from typing import Any


def hubspot_document(base_url: str, **limits: Any) -> dict[str, Any]:
    connection: dict[str, Any] = {
        "id": "hs",
        "kind": "hubspot",
        "account": "62515",
        "url": base_url,
        "credentials": {"token": "HUBSPOT_TOKEN"},
        "mappings": [
            {
                "id": "contacts",
                "object": "contacts",
                "match": {"cdp_id": "person.id"},
                "fields": {
                    "email": "traits.email",
                    "firstname": "traits.first_name",
                    "cdp_churn_risk": {"source": "scores.churn_risk", "transform": "round:2"},
                },
            },
            {
                "id": "success-task",
                "object": "tasks",
                "action": "task",
                "idempotency_field": "cdp_idempotency_key",
                "about": {"mapping": "contacts"},
                "fields": {"hs_task_subject": "action.subject", "hs_task_body": "action.signals"},
            },
        ],
    }
    if limits:
        connection["limits"] = limits
    return {"connections": [connection]}
