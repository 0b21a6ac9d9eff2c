"""Dataverse marketing lists (static lists): the ``lists`` entity set is an ordinary one (odata.py); its
members are added with the ``AddMemberList`` action and removed by disassociating ``list<type>_association``.

- ``POST lists(<listid>)/Microsoft.Dynamics.CRM.AddMemberList`` with ``{"EntityId": "<guid>"}``: the row
  (of the list's ``membertype``: 1 account, 2 contact, 4 lead) becomes a member and the answer carries the
  ``listmember`` id; adding a member again adds nothing and answers the same id;
- ``DELETE lists(<listid>)/listcontact_association(<guid>)/$ref``: removes the member (404 when the row is
  not one);
- ``GET lists(<listid>)/listcontact_association``: the members, as rows of their entity set.

Members are ``listmembers`` rows (listid, entityid) in the emulator's records, so a snapshot keeps them.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from cdp_crm_emulators.dynamics.odata import NAMESPACE, DataverseError

MEMBERS = "listmembers"
ASSOCIATIONS = {"listaccount_association": 1, "listcontact_association": 2, "listlead_association": 4}
MEMBER_SETS = {1: "accounts", 2: "contacts", 4: "leads"}


def members(records: Any, list_id: str) -> list[str]:
    """The entity ids of a list's members."""
    return [m["entityid"] for m in records.objects.get(MEMBERS, {}).values() if m["listid"] == list_id]


def handle(records: Any, list_id: str, method: str, rest: str, payload: Any) -> tuple[int, dict[str, str], Any]:
    marketing_list = records.get("lists", list_id)
    if marketing_list is None:
        raise DataverseError(404, "0x80040217", f"list With Ids = {list_id} Does Not Exist")
    member_type = int(marketing_list.get("membertype") or 2)
    if rest == f"{NAMESPACE}.AddMemberList" and method == "POST":
        entity_id = str((payload or {}).get("EntityId", "")).strip()
        target = MEMBER_SETS.get(member_type, "contacts")
        if not entity_id or records.get(target, entity_id) is None:
            raise DataverseError(404, "0x80040217", f"{target[:-1]} With Ids = {entity_id} Does Not Exist")
        member_key = f"{list_id}|{entity_id}"
        existing = records.get(MEMBERS, member_key)
        if existing is None:
            existing = {"listmemberid": str(uuid.uuid4()), "listid": list_id, "entityid": entity_id}
            records.put(MEMBERS, member_key, existing)
        context = f"$metadata#{NAMESPACE}.AddMemberListResponse"
        return 200, {}, {"@odata.context": context, "id": existing["listmemberid"]}
    match = re.fullmatch(r"(\w+)(?:\(([^)]*)\))?(/\$ref)?", rest)
    if match is None or match.group(1) not in ASSOCIATIONS:
        raise DataverseError(404, "0x80060888", f"Resource not found for the segment '{rest.split('(')[0]}'.")
    if ASSOCIATIONS[match.group(1)] != member_type:
        raise DataverseError(400, "0x80060888", f"the list's members are not {match.group(1)} rows")
    if method == "GET" and match.group(2) is None:
        target = MEMBER_SETS[member_type]
        rows = [records.get(target, entity_id) for entity_id in members(records, list_id)]
        return 200, {}, {"value": [dict(r) for r in rows if r is not None]}
    if method == "DELETE" and match.group(2) is not None and match.group(3):
        entity_id = match.group(2).strip()
        if records.delete(MEMBERS, f"{list_id}|{entity_id}") is None:
            raise DataverseError(404, "0x80040217", f"listmember for {entity_id} Does Not Exist")
        return 204, {}, None
    raise DataverseError(405, "0x80060888", f"The HTTP method '{method}' is not allowed.")
