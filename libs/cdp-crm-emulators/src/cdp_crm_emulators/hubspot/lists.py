"""Lists v3: MANUAL / SNAPSHOT lists of records and their memberships (a DYNAMIC list's cannot be edited), and
the lists search."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cdp_crm_emulators._server import iso_z, json_response
from cdp_crm_emulators.hubspot.answers import error_body, read_json
from cdp_crm_emulators.hubspot.schema import object_by_type

LIST_SEARCH_LIMIT = 500  # the most one lists search answers (its count)
LIST_SEARCH_DEFAULT = 20


class ListsMixin:
    """Lists and memberships. The state it reads is `HubSpotEmulator`'s (set in its ``__init__``)."""

    async def _create_list(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        for required in ("name", "objectTypeId", "processingType"):
            if not body.get(required):
                return json_response(error_body("VALIDATION_ERROR", f"{required} is required"), status=400)
        if any(existing["name"] == body["name"] for existing in self.lists.values()):
            return json_response(
                error_body("VALIDATION_ERROR", f"A list named {body['name']} already exists"), status=400
            )
        list_id = str(next(self._ids))
        now = iso_z(self.clock())
        created = {
            "listId": list_id,
            "name": body["name"],
            "objectTypeId": body["objectTypeId"],
            "processingType": body["processingType"],
            "processingStatus": "COMPLETE",
            "listVersion": 1,
            "createdAt": now,
            "updatedAt": now,
        }
        self.lists[list_id] = created
        self.memberships[list_id] = {}
        return json_response({"list": created})

    async def _get_list(self, request: web.Request) -> web.Response:
        found = self.lists.get(request.match_info["list_id"])
        if found is None:
            return json_response(error_body("OBJECT_NOT_FOUND", "List does not exist"), status=404)
        return json_response({"list": {**found, "size": len(self.memberships[found["listId"]])}})

    def _membership_list(self, list_id: str) -> tuple[dict[str, Any] | None, web.Response | None]:
        found = self.lists.get(list_id)
        if found is None:
            return None, json_response(error_body("OBJECT_NOT_FOUND", "List does not exist"), status=404)
        if found["processingType"] == "DYNAMIC":
            return None, json_response(
                error_body("VALIDATION_ERROR", "Memberships of a DYNAMIC list cannot be edited"), status=400
            )
        return found, None

    def _change_members(self, found: dict[str, Any], add: list[Any], remove: list[Any]) -> dict[str, Any]:
        table = self.objects[object_by_type(found["objectTypeId"])]
        members = self.memberships[found["listId"]]
        added, removed, missing = [], [], []
        now = iso_z(self.clock())
        for record_id in map(str, add):
            if record_id not in table:
                missing.append(record_id)
            elif record_id not in members:
                members[record_id] = now
                added.append(record_id)
        for record_id in map(str, remove):
            if record_id not in table:
                missing.append(record_id)
            elif members.pop(record_id, None) is not None:
                removed.append(record_id)
        return {"recordsIdsAdded": added, "recordIdsRemoved": removed, "recordIdsMissing": missing}

    async def _add_members(self, request: web.Request) -> web.Response:
        found, refused = self._membership_list(request.match_info["list_id"])
        if refused is not None:
            return refused
        return json_response(self._change_members(found, await read_json(request, []), []))  # type: ignore[arg-type]

    async def _remove_members(self, request: web.Request) -> web.Response:
        found, refused = self._membership_list(request.match_info["list_id"])
        if refused is not None:
            return refused
        return json_response(self._change_members(found, [], await read_json(request, [])))  # type: ignore[arg-type]

    async def _add_and_remove(self, request: web.Request) -> web.Response:
        found, refused = self._membership_list(request.match_info["list_id"])
        if refused is not None:
            return refused
        body = await read_json(request)
        return json_response(
            self._change_members(found, body.get("recordIdsToAdd") or [], body.get("recordIdsToRemove") or [])
        )  # type: ignore[arg-type]

    async def _get_members(self, request: web.Request) -> web.Response:
        list_id = request.match_info["list_id"]
        if list_id not in self.lists:
            return json_response(error_body("OBJECT_NOT_FOUND", "List does not exist"), status=404)
        members = self.memberships[list_id]
        results = [{"recordId": rid, "membershipTimestamp": at} for rid, at in members.items()]
        return json_response({"results": results, "total": len(results)})

    async def _search_lists(self, request: web.Request) -> web.Response:
        """``POST /crm/v3/lists/search`` {query, listIds, processingTypes, offset, count}: the lists whose
        name holds `query` (any case), in the order they were made, `count` (1-500, default 20) from
        `offset`; ``offset`` in the answer is where the next page starts, ``hasMore`` whether there is one.
        Each list carries ``additionalProperties.hs_list_size``. Counted like any request, not against the
        CRM objects search's per-second limit (a list search is not one)."""
        body = await read_json(request)
        try:
            count = int(body.get("count") or LIST_SEARCH_DEFAULT)
            offset = int(body.get("offset") or 0)
        except (TypeError, ValueError):
            return json_response(error_body("VALIDATION_ERROR", "count and offset must be integers"), status=400)
        if not 1 <= count <= LIST_SEARCH_LIMIT or offset < 0:
            return json_response(
                error_body("VALIDATION_ERROR", f"count must be between 1 and {LIST_SEARCH_LIMIT}: {count}"),
                status=400,
            )
        query = str(body.get("query") or "").lower()
        ids = {str(i) for i in body.get("listIds") or []}
        types = set(body.get("processingTypes") or [])
        matched = [
            found
            for list_id, found in sorted(self.lists.items(), key=lambda item: int(item[0]))
            if query in found["name"].lower()
            and (not ids or list_id in ids)
            and (not types or found["processingType"] in types)
        ]
        page = matched[offset : offset + count]
        lists = [
            {
                **found,
                "filtersUpdatedAt": found["updatedAt"],
                "additionalProperties": {"hs_list_size": str(len(self.memberships.get(found["listId"], {})))},
            }
            for found in page
        ]
        return json_response(
            {
                "lists": lists,
                "total": len(matched),
                "offset": offset + len(page),
                "hasMore": offset + len(page) < len(matched),
            }
        )
