"""CRM v3 objects: the record store with its unique-property indexes, the single and batch reads and writes,
search, and v4 associations.

Search reads an index that lags writes, as HubSpot's does (its search guide: changes "may take a few
moments" to show; integrators measure seconds): `index_late(seconds, n)` makes the next `n` writes reach the
index only `seconds` after they were made - until then a search finds the record as it was before the write
(a record just made: not at all), while reads by id see the write at once. Records written after it may be
found first: a reader whose cursor moved past the late one's stamp never sees it, unless it reads back.

A record merged away (`_merge`, `user_merge`) is retired: its id resolves to the survivor, as HubSpot's
"fetching any records using the original IDs will return the new merged record with the new ID"
(developer changelog, "Updated merge functionality for contacts and companies") - a GET by that id or a
batch read naming it answers the survivor, under the survivor's id; a write by it (PATCH) writes the
survivor. Search never finds it: it is gone from the index.

Property history: each write keeps, per property it sets, the value with its time and source (``CRM_UI``
for a user's edit, `user_create` / `user_update`; ``INTEGRATION`` for an API write), newest first, up to
`HISTORY_KEPT` a property. A batch read naming ``propertiesWithHistory`` answers them per record
(``propertiesWithHistory``: name -> ``[{value, timestamp, sourceType, sourceId}]``), for at most
`HISTORY_BATCH_LIMIT` inputs - HubSpot's 50, refused above it with its message ("The maximum number of
inputs supported in a batch request for property histories is 50"); search does not take it.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from aiohttp import web

from cdp_crm_emulators._server import iso_z, json_response
from cdp_crm_emulators.hubspot.answers import error_body, read_json, record_error_body
from cdp_crm_emulators.hubspot.pages import asked_properties
from cdp_crm_emulators.hubspot.schema import PROPERTIES, SINGULAR, UNIQUE
from cdp_crm_emulators.hubspot.search import matches_all, sortable

BATCH_LIMIT = 100
HISTORY_BATCH_LIMIT = 50  # inputs of a batch read asking for propertiesWithHistory (HubSpot's limit)
HISTORY_KEPT = 20  # values kept per property (newest first)
SEARCH_PAGE_LIMIT = 200
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class ObjectsMixin:
    """Records, their endpoints and their associations. The state it reads is `HubSpotEmulator`'s (set in its ``__init__``)."""

    def _store(self, obj: str, record: dict[str, Any]) -> None:
        old = self.objects[obj].get(record["id"])
        for prop in UNIQUE[obj]:
            index = self._index.setdefault((obj, prop), {})
            if old is not None and old["properties"].get(prop):
                index.pop(str(old["properties"][prop]).lower(), None)
            if record["properties"].get(prop):
                index[str(record["properties"][prop]).lower()] = record["id"]
        self.objects[obj][record["id"]] = record

    def _lookup(self, obj: str, prop: str, value: Any) -> str | None:
        if prop in ("hs_object_id", "id"):
            if str(value) in self.objects[obj]:
                return str(value)
            survivor = self.retired.get((obj, str(value)))  # merged away: the survivor answers for it
            return survivor if survivor in self.objects[obj] else None
        return self._index.get((obj, prop), {}).get(str(value).lower())

    def index_late(self, seconds: float, n: int = 1) -> None:
        """The next `n` writes (the API's or a user's) reach the search index `seconds` after they are made:
        until then a search finds the record as it was before each (a new record: not at all)."""
        self._index_lag.extend([seconds] * n)

    def _indexed(self, obj: str, record: dict[str, Any], now: float) -> dict[str, Any] | None:
        """The record as the search index holds it at `now` (None: not indexed yet)."""
        late = self._unindexed.get((obj, record["id"]))
        if late is None:
            return record
        if now >= late[0]:
            del self._unindexed[(obj, record["id"])]
            return record
        return late[1]

    def _write(
        self, obj: str, record_id: str | None, properties: dict[str, Any], source: str = "INTEGRATION"
    ) -> dict[str, Any]:
        """`source`: the history's ``sourceType`` of the values set (``CRM_UI``: a user's edit)."""
        now = iso_z(self.clock())
        if record_id is None:
            record_id = str(next(self._ids))
            record = {"id": record_id, "properties": {"hs_object_id": record_id, "createdate": now}, "createdAt": now}
        else:
            old = self.objects[obj][record_id]
            record = {**old, "properties": dict(old["properties"])}
        values = {k: (None if v is None else str(v)) for k, v in properties.items()}
        record["properties"].update(values)
        history = {name: list(entries) for name, entries in (record.get("history") or {}).items()}
        for name, value in values.items():
            entry = {"value": value or "", "timestamp": now, "sourceType": source, "sourceId": _SOURCE_IDS[source]}
            history[name] = [entry, *history.get(name, [])][:HISTORY_KEPT]
        record["history"] = history
        record["properties"]["hs_lastmodifieddate"] = now
        if obj == "contacts":
            record["properties"]["lastmodifieddate"] = now
        if obj == "deals" and "dealstage" in properties:
            # HubSpot derives these from the stage's probability; the default pipeline's closed stages.
            stage = str(properties["dealstage"] or "")
            record["properties"]["hs_is_closed"] = str(stage in ("closedwon", "closedlost")).lower()
            record["properties"]["hs_is_closed_won"] = str(stage == "closedwon").lower()
        record["updatedAt"] = now
        record["archived"] = False
        if self._index_lag:
            lag = self._index_lag.pop(0)
            # What the index held before: an earlier late write still unindexed keeps its own older version.
            held = self._unindexed.get((obj, record_id))
            before = held[1] if held is not None else self.objects[obj].get(record_id)
            self._unindexed[(obj, record_id)] = (self.clock() + lag, before)
        self._store(obj, record)
        return record

    def _public(self, obj: str, record: dict[str, Any], wanted: list[str] | None = None) -> dict[str, Any]:
        props = record["properties"]
        if wanted:
            props = {
                k: props.get(k) for k in dict.fromkeys([*wanted, "hs_object_id", "createdate", "hs_lastmodifieddate"])
            }
        return {
            "id": record["id"],
            "properties": dict(props),
            "createdAt": record["createdAt"],
            "updatedAt": record["updatedAt"],
            "archived": record.get("archived", False),
        }

    def _object(self, request: web.Request) -> str:
        obj = request.match_info["object"]
        if obj not in PROPERTIES:
            raise web.HTTPNotFound(  # text=, not body= (which aiohttp deprecates for its exceptions)
                text=orjson.dumps(error_body("OBJECT_NOT_FOUND", f"Unable to infer object type from: {obj}")).decode(),
                content_type="application/json",
            )
        return obj

    def _unknown_properties(self, obj: str, properties: dict[str, Any]) -> web.Response | None:
        unknown = [name for name in properties if name not in PROPERTIES[obj]]
        if not unknown:
            return None
        details = [
            {
                "isValid": False,
                "message": f'Property "{name}" does not exist',
                "error": "PROPERTY_DOESNT_EXIST",
                "name": name,
            }
            for name in unknown
        ]
        body = error_body("VALIDATION_ERROR", f"Property values were not valid: {orjson.dumps(details).decode()}")
        body["errors"] = [
            {"message": d["message"], "code": "PROPERTY_DOESNT_EXIST", "context": {"propertyName": [d["name"]]}}
            for d in details
        ]
        return json_response(body, status=400)

    def _held_elsewhere(self, obj: str, properties: dict[str, Any], record_id: str | None) -> str | None:
        """The id of another record holding one of these unique values (a second contact with one email,
        a second company with one domain), which HubSpot refuses; None when none does."""
        for prop in UNIQUE[obj]:
            value = properties.get(prop)
            if value in (None, ""):
                continue
            holder = self._lookup(obj, prop, value)
            if holder is not None and holder != record_id:
                return holder
        return None

    def _conflict(self, obj: str, existing: str) -> web.Response:
        """HubSpot's 409 for a write that would make a second record with one unique value."""
        body = error_body("CONFLICT", f"{SINGULAR[obj].capitalize()} already exists. Existing ID: {existing}")
        return json_response(body, status=409)

    def _record_error(self, obj: str, properties: dict[str, Any]) -> str | None:
        email = properties.get("email")
        if email and not _EMAIL.match(str(email)):
            return f"Property values were not valid: email {email!s} is invalid"
        return self.faults.rejection_for(obj, properties)

    async def _batch_upsert(self, request: web.Request) -> web.Response:
        obj = self._object(request)
        body = await read_json(request)
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            return json_response(error_body("VALIDATION_ERROR", "inputs must be a non-empty list"), status=400)
        if len(inputs) > BATCH_LIMIT:
            return json_response(
                error_body("VALIDATION_ERROR", f"Batch input limit of {BATCH_LIMIT} exceeded: {len(inputs)} inputs"),
                status=400,
            )
        keys = []
        for item in inputs:
            id_property = item.get("idProperty") or "hs_object_id"
            if id_property not in UNIQUE[obj] and id_property != "hs_object_id":
                return json_response(
                    error_body("VALIDATION_ERROR", f"{id_property} is not a unique property of {obj}"), status=400
                )
            if (rejected := self._unknown_properties(obj, item.get("properties") or {})) is not None:
                return rejected
            keys.append((id_property, str(item.get("id", "")).lower()))
        if len(set(keys)) != len(keys):
            return json_response(error_body("VALIDATION_ERROR", "Duplicate IDs found in batch input"), status=400)
        started = iso_z(self.clock())
        results, errors, writes = [], [], []
        claimed: dict[tuple[str, str], str] = {}  # unique (property, value) -> the input's record (this batch)
        for n, item in enumerate(inputs):
            id_property = item.get("idProperty") or "hs_object_id"
            properties = dict(item.get("properties") or {})
            if id_property != "hs_object_id":
                properties.setdefault(id_property, item["id"])
            if (message := self._record_error(obj, properties)) is not None:
                errors.append(record_error_body("VALIDATION_ERROR", message, [str(item.get("id"))]))
                continue
            existing = self._lookup(obj, id_property, item.get("id"))
            if existing is None and id_property == "hs_object_id":
                errors.append(record_error_body("OBJECT_NOT_FOUND", "Object not found", [str(item.get("id"))]))
                continue
            # A second record with one email (domain, ...) is refused - the whole batch, as HubSpot does -,
            # whether the other is held already or written by an earlier input of this batch.
            if (holder := self._held_elsewhere(obj, properties, existing)) is not None:
                return self._conflict(obj, holder)
            target = existing or f"new-{n}"
            for prop in UNIQUE[obj]:
                if properties.get(prop) not in (None, ""):
                    other = claimed.setdefault((prop, str(properties[prop]).lower()), target)
                    if other != target:
                        return self._conflict(obj, existing or other)
            writes.append((existing, properties))
        for existing, properties in writes:
            record = self._write(obj, existing, properties)
            results.append({**self._public(obj, record), "new": existing is None})
        answer: dict[str, Any] = {
            "status": "COMPLETE",
            "results": results,
            "startedAt": started,
            "completedAt": iso_z(self.clock()),
        }
        if errors:
            answer.update(numErrors=len(errors), errors=errors)
        return json_response(answer, status=207 if errors else 200)

    async def _batch_archive(self, request: web.Request) -> web.Response:
        """``batch/archive`` by HubSpot ids (at most 100): 204; an id no record has is ignored, as HubSpot does.
        The record leaves every list and association."""
        obj = self._object(request)
        inputs = (await read_json(request, {})).get("inputs") or []
        if len(inputs) > BATCH_LIMIT:
            return json_response(
                error_body("VALIDATION_ERROR", f"Batch input limit of {BATCH_LIMIT} exceeded"), status=400
            )
        for item in inputs:
            self._archive(obj, str(item.get("id", "")))
        return web.Response(status=204)

    async def _archive_one(self, request: web.Request) -> web.Response:
        """``DELETE /crm/v3/objects/<object>/<id>``: the record archived, 204 - also for an id no record has."""
        obj = self._object(request)
        self._archive(obj, request.match_info["id"])
        return web.Response(status=204)

    def _archive(self, obj: str, record_id: str) -> None:
        """The record gone from its object, every list and association (nothing for an unknown id)."""
        old = self.objects[obj].pop(record_id, None)
        if old is None:
            return
        for prop in UNIQUE[obj]:
            if old["properties"].get(prop):
                self._index.get((obj, prop), {}).pop(str(old["properties"][prop]).lower(), None)
        for members in self.memberships.values():
            members.pop(record_id, None)
        for other in self.links.pop((obj, record_id), {}):
            self.links.get(other, {}).pop((obj, record_id), None)

    async def _merge(self, request: web.Request) -> web.Response:
        """``POST /crm/v3/objects/<object>/merge`` {primaryObjectId, objectIdToMerge}: `merge_records`. 200 with
        the primary; 404 when either is not there; 400 for one record merged into itself."""
        obj = self._object(request)
        body = await read_json(request, {})
        primary, other = str(body.get("primaryObjectId", "")), str(body.get("objectIdToMerge", ""))
        if primary == other:
            return json_response(error_body("VALIDATION_ERROR", "Cannot merge a record into itself"), status=400)
        if primary not in self.objects[obj] or other not in self.objects[obj]:
            return json_response(error_body("OBJECT_NOT_FOUND", "resource not found"), status=404)
        return json_response(self._public(obj, self.merge_records(obj, primary, other)))

    def merge_records(self, obj: str, primary: str, other: str) -> dict[str, Any]:
        """`other` merged into `primary` (both there, distinct): the primary keeps its values and takes those it
        lacks from the other; the other's associations and list memberships move to it; the other is gone
        from the object and the index, its id retired - listed in the primary's ``hs_merged_object_ids`` and
        resolving to the primary (reads and writes by id). With `merge_new_ids` (HubSpot's behaviour for
        contacts and companies since its changelog "Updated merge functionality for contacts and
        companies"), both are merged into a new record with a new id, both ids retired and listed. Returns
        the surviving record."""
        if self.merge_new_ids and obj in ("contacts", "companies"):
            kept = self.objects[obj][primary]
            fresh = str(next(self._ids))
            self.objects[obj][fresh] = {
                "id": fresh, "properties": {**kept["properties"], "hs_object_id": fresh},
                "createdAt": kept["createdAt"], "updatedAt": kept["updatedAt"], "archived": False,
            }  # fmt: skip
            self._store(obj, self.objects[obj][fresh])  # its unique values now index the new record
            record = self.merge_records_into(obj, fresh, primary)
            return self.merge_records_into(obj, fresh, other) if other in self.objects[obj] else record
        return self.merge_records_into(obj, primary, other)

    def merge_records_into(self, obj: str, primary: str, other: str) -> dict[str, Any]:
        """`merge_records` keeping the primary's id."""
        table = self.objects[obj]
        absorbed = table.pop(other)
        self._unindexed.pop((obj, other), None)
        for prop in UNIQUE[obj]:
            index = self._index.get((obj, prop), {})
            value = str(absorbed["properties"].get(prop) or "").lower()
            if value and index.get(value) == other:  # (a new record made by the merge holds it now)
                del index[value]
        held = table[primary]["properties"]
        system = {"hs_object_id", "createdate", "hs_lastmodifieddate", "lastmodifieddate", "hs_merged_object_ids"}
        lacking = {
            k: v
            for k, v in absorbed["properties"].items()
            if k not in system and v not in (None, "") and not held.get(k)
        }
        merged_ids = [i for i in str(held.get("hs_merged_object_ids") or "").split(";") if i]
        absorbed_ids = [i for i in str(absorbed["properties"].get("hs_merged_object_ids") or "").split(";") if i]
        lacking["hs_merged_object_ids"] = ";".join(dict.fromkeys([*merged_ids, other, *absorbed_ids]))
        for (retired_obj, retired_id), survivor in list(self.retired.items()):
            if retired_obj == obj and survivor == other:  # merged into the other before: now into the primary
                self.retired[(obj, retired_id)] = primary
        self.retired[(obj, other)] = primary
        record = self._write(obj, primary, lacking)
        for members in self.memberships.values():
            joined = members.pop(other, None)
            if joined is not None:
                members.setdefault(primary, joined)
        for target, types in self.links.pop((obj, other), {}).items():
            self.links.get(target, {}).pop((obj, other), None)
            if target != (obj, primary):
                self._link(obj, primary, target[0], target[1], types)
        return record

    async def _batch_read(self, request: web.Request) -> web.Response:
        obj = self._object(request)
        body = await read_json(request)
        inputs = body.get("inputs") or []
        if len(inputs) > BATCH_LIMIT:
            return json_response(
                error_body("VALIDATION_ERROR", f"Batch input limit of {BATCH_LIMIT} exceeded"), status=400
            )
        with_history = body.get("propertiesWithHistory") or []
        if with_history and len(inputs) > HISTORY_BATCH_LIMIT:
            message = (
                "The maximum number of inputs supported in a batch request for property histories is "
                f"{HISTORY_BATCH_LIMIT}. Please reduce the number of items and try again."
            )
            return json_response(error_body("VALIDATION_ERROR", message), status=400)
        id_property = body.get("idProperty") or "hs_object_id"
        results, missing = [], []
        for item in inputs:
            record_id = self._lookup(obj, id_property, item.get("id"))
            if record_id is None:
                missing.append(str(item.get("id")))
            else:
                record = self.objects[obj][record_id]
                result = self._public(obj, record, body.get("properties"))
                if with_history:
                    history = record.get("history") or {}
                    result["propertiesWithHistory"] = {name: list(history.get(name, [])) for name in with_history}
                results.append(result)
        answer: dict[str, Any] = {
            "status": "COMPLETE",
            "results": results,
            "startedAt": iso_z(self.clock()),
            "completedAt": iso_z(self.clock()),
        }
        if missing:
            answer.update(
                numErrors=1,
                errors=[
                    record_error_body(
                        "OBJECT_NOT_FOUND", "Could not get some objects, they may be deleted or not exist.", missing
                    )
                ],
            )
        return json_response(answer, status=207 if missing else 200)

    async def _search(self, request: web.Request) -> web.Response:
        obj = self._object(request)
        body = await read_json(request)
        limit = int(body.get("limit", 10))
        if limit > SEARCH_PAGE_LIMIT:
            return json_response(
                error_body("VALIDATION_ERROR", f"limit must be at most {SEARCH_PAGE_LIMIT}"), status=400
            )
        groups = body.get("filterGroups") or []
        now = self.clock()
        indexed = [r for r in (self._indexed(obj, r, now) for r in list(self.objects[obj].values())) if r is not None]
        matched = [r for r in indexed if not groups or any(matches_all(r, g.get("filters", [])) for g in groups)]
        for sort in reversed(body.get("sorts") or []):
            name = sort if isinstance(sort, str) else sort.get("propertyName")
            descending = isinstance(sort, dict) and sort.get("direction") == "DESCENDING"
            matched.sort(key=lambda r, n=name: sortable(r["properties"].get(n)), reverse=descending)
        after = int(body.get("after") or 0)
        page = matched[after : after + limit]
        answer: dict[str, Any] = {
            "total": len(matched),
            "results": [self._public(obj, r, body.get("properties")) for r in page],
        }
        if after + limit < len(matched):
            answer["paging"] = {"next": {"after": str(after + limit)}}
        return json_response(answer)

    async def _create(self, request: web.Request) -> web.Response:
        obj = self._object(request)
        body = await read_json(request)
        properties = body.get("properties") or {}
        if (rejected := self._unknown_properties(obj, properties)) is not None:
            return rejected
        for prop in UNIQUE[obj]:
            if properties.get(prop) and (existing := self._lookup(obj, prop, properties[prop])) is not None:
                return self._conflict(obj, existing)
        if (message := self._record_error(obj, properties)) is not None:
            return json_response(error_body("VALIDATION_ERROR", message), status=400)
        targets = self._association_targets(body)
        if isinstance(targets, web.Response):
            return targets
        record = self._write(obj, None, properties)
        for target, target_id, types in targets:
            self._link(obj, record["id"], target, target_id, types)
        return json_response(self._public(obj, record), status=201)

    def _association_targets(self, body: dict[str, Any]) -> list[tuple[str, str, list]] | web.Response:
        """A create's ``associations`` as (object, id, types) each, or the 400 naming a target not there."""
        targets = []
        for association in body.get("associations") or []:
            target_id = str((association.get("to") or {}).get("id", ""))
            target = next((o for o, table in self.objects.items() if target_id in table), None)
            if target is None:
                return json_response(
                    error_body("VALIDATION_ERROR", f"Association target {target_id} does not exist"), status=400
                )
            targets.append((target, target_id, association.get("types") or []))
        return targets

    async def _read_one(self, request: web.Request) -> web.Response:
        obj = self._object(request)
        record_id = self._lookup(obj, request.query.get("idProperty", "hs_object_id"), request.match_info["id"])
        if record_id is None:
            return web.Response(status=404)
        return json_response(self._public(obj, self.objects[obj][record_id], asked_properties(request)))

    async def _update(self, request: web.Request) -> web.Response:
        obj = self._object(request)
        properties = (await read_json(request)).get("properties") or {}
        if (rejected := self._unknown_properties(obj, properties)) is not None:
            return rejected
        record_id = self._lookup(obj, request.query.get("idProperty", "hs_object_id"), request.match_info["id"])
        if record_id is None:
            return json_response(error_body("OBJECT_NOT_FOUND", "resource not found"), status=404)
        if (message := self._record_error(obj, properties)) is not None:
            return json_response(error_body("VALIDATION_ERROR", message), status=400)
        if (holder := self._held_elsewhere(obj, properties, record_id)) is not None:
            return self._conflict(obj, holder)
        return json_response(self._public(obj, self._write(obj, record_id, properties)))

    # --- associations ----------------------------------------------------------------------------

    def _link(self, obj: str, record_id: str, target: str, target_id: str, types: list[dict[str, Any]]) -> None:
        types = types or [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 0}]
        self.links.setdefault((obj, record_id), {})[(target, target_id)] = types
        self.links.setdefault((target, target_id), {})[(obj, record_id)] = types

    async def _associate_default(self, request: web.Request) -> web.Response:
        obj = self._object(request)
        to_obj = request.match_info["to_object"]
        record_id, to_id = request.match_info["id"], request.match_info["to_id"]
        if to_obj not in PROPERTIES or record_id not in self.objects[obj] or to_id not in self.objects[to_obj]:
            return json_response(
                error_body("OBJECT_NOT_FOUND", "One or both records of the association do not exist"), status=404
            )
        self._link(obj, record_id, to_obj, to_id, [])
        result = {
            "from": {"id": record_id},
            "to": {"id": to_id},
            "associationSpec": {"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 0},
        }
        now = iso_z(self.clock())
        return json_response({"status": "COMPLETE", "results": [result], "startedAt": now, "completedAt": now})

    async def _list_associations(self, request: web.Request) -> web.Response:
        obj = self._object(request)
        to_obj = request.match_info["to_object"]
        linked = self.links.get((obj, request.match_info["id"]), {})
        results = [
            {
                "toObjectId": int(target_id),
                "associationTypes": [
                    {"category": t.get("associationCategory"), "typeId": t.get("associationTypeId"), "label": None}
                    for t in types
                ],
            }
            for (target, target_id), types in linked.items()
            if target == to_obj
        ]
        return json_response({"results": results})


# What HubSpot's history names as the writer: a user (the UI) or the private app (an integration).
_SOURCE_IDS = {"CRM_UI": "userId:1", "INTEGRATION": "app:local"}
