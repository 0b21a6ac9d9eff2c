"""Campaign membership through Zoho's related-list API: a Campaign's Contacts (or Leads) related list.

- ``PUT /crm/v8/Campaigns/<campaign id>/Contacts`` with ``{"data": [{"id": "<contact id>", "Member_Status":
  ...}]}`` (at most 100) relates each record to the campaign (again: updates the relation, never twice);
- ``DELETE /crm/v8/Campaigns/<campaign id>/Contacts?ids=a,b`` delinks them;
- ``GET /crm/v8/Campaigns/<campaign id>/Contacts`` lists the related records (204 when none).

Each record answers on its own: ``SUCCESS`` (``relation updated`` / ``relation removed``), or
``INVALID_DATA`` when no record has that id. Relations are ``CampaignMembers`` rows in the emulator's
records, so a snapshot keeps them.
"""

from __future__ import annotations

from typing import Any

MEMBERS = "CampaignMembers"
RELATED = {"Campaigns": ("Contacts", "Leads")}
LIMIT = 100


def supported(module: str, related: str) -> bool:
    return related in RELATED.get(module, ())


def members(records: Any, campaign_id: str, related: str) -> list[str]:
    return [
        m["id"]
        for m in records.objects.get(MEMBERS, {}).values()
        if m["campaign"] == campaign_id and m["module"] == related
    ]


def _answer(code: str, record_id: str, message: str) -> dict[str, Any]:
    status = "success" if code == "SUCCESS" else "error"
    return {"code": code, "details": {"id": record_id}, "message": message, "status": status}


def relate(records: Any, campaign_id: str, related: str, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for item in data:
        record_id = str(item.get("id", ""))
        if records.get(related, record_id) is None:
            out.append(_answer("INVALID_DATA", record_id, "the related id given seems to be invalid"))
            continue
        key = f"{campaign_id}|{related}|{record_id}"
        status = item.get("Member_Status") or (records.get(MEMBERS, key) or {}).get("Member_Status")
        row = {"campaign": campaign_id, "module": related, "id": record_id, "Member_Status": status}
        records.put(MEMBERS, key, row)
        out.append(_answer("SUCCESS", record_id, "relation updated"))
    return out


def delink(records: Any, campaign_id: str, related: str, ids: list[str]) -> list[dict[str, Any]]:
    out = []
    for record_id in ids:
        if records.get(related, record_id) is None:
            out.append(_answer("INVALID_DATA", record_id, "the related id given seems to be invalid"))
            continue
        records.delete(MEMBERS, f"{campaign_id}|{related}|{record_id}")
        out.append(_answer("SUCCESS", record_id, "relation removed"))
    return out
