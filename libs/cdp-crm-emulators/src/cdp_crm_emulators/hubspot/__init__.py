"""A local HubSpot: private-app tokens, CRM v3 objects, lists v3, the burst and daily limits, signed webhooks.

Objects: contacts (unique ``email``), companies (unique ``domain``), deals, tickets and tasks; every object also has
the unique properties ``cdp_id`` and ``cdp_idempotency_key`` so a sync can upsert any of them by its own key.
A property outside an object's schema fails the request with ``VALIDATION_ERROR`` / ``PROPERTY_DOESNT_EXIST``,
as HubSpot does; records rejected one by one (an invalid email, a fault-injected rejection) come back in the
``errors`` of a 207 while the rest of the batch is written.

Limits - every authenticated API request that is let in counts, stamped when it arrives, whatever it
then gets: an answer, a 5xx, a timeout, a dropped connection (injected faults happen inside HubSpot, after
it counted the request, as they would there); a request refused for a limit changes nothing and is not
counted again:
- `burst_limit` requests per rolling `burst_window` seconds (190 / 10 s): 429 ``TEN_SECONDLY_ROLLING``;
- `daily_limit` requests per UTC day: 429 ``DAILY``.
- `search_per_second` search requests per second (5): 429 ``SECONDLY``.
Every answer carries the ``X-HubSpot-RateLimit-*`` headers. ``over_budget`` (`budget()`) counts the
requests that arrived over a limit: a client that keeps to the limits never has one.

Associations: a single create may carry ``associations`` (``to.id`` + ``types``), and
``PUT /crm/v4/objects/<from>/<id>/associations/default/<to>/<id>`` links two records; a task or ticket is
tied to its contact this way. ``GET /crm/v4/objects/<from>/<id>/associations/<to>`` lists them.

Inbound: `user_update` / `user_create` edit records as a HubSpot user would and, with `webhook_url` set (at
start, or by the developer API's ``PUT /webhooks/v3/<app id>/settings?hapikey=`` as an app's settings are),
POST the change events there signed with ``X-HubSpot-Signature-v3`` (base64 HMAC-SHA256 over method, URL,
body and ``X-HubSpot-Request-Timestamp`` with the app's `client_secret`).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections import deque
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from cdp_crm_emulators._server import Emulator, LoggedRequest, iso_z, json_response, new_id
from cdp_crm_emulators.hubspot.schema import PROPERTIES, SINGULAR, UNIQUE, object_by_type
from cdp_crm_emulators.hubspot.search import matches_all, sortable
from cdp_crm_emulators.hubspot.webhooks import webhook_signature_v3

BATCH_LIMIT = 100
SEARCH_PAGE_LIMIT = 200
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class HubSpotEmulator(Emulator):
    name = "hubspot"

    def __init__(
        self,
        *,
        tokens: set[str] | None = None,
        portal_id: int = 62515,
        burst_limit: int = 190,
        burst_window: float = 10.0,
        daily_limit: int = 1_000_000,
        search_per_second: int = 5,
        webhook_url: str | None = None,
        client_secret: str = "hubspot-app-secret",
        developer_api_key: str = "local-developer-key",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.tokens = tokens if tokens is not None else {"pat-local-hubspot"}
        self.portal_id = portal_id
        self.burst_limit = burst_limit
        self.burst_window = burst_window
        self.daily_limit = daily_limit
        self.search_per_second = search_per_second
        self.webhook_url = webhook_url
        self.client_secret = client_secret
        self.developer_api_key = developer_api_key
        self.objects: dict[str, dict[str, dict[str, Any]]] = {obj: {} for obj in PROPERTIES}
        self._index: dict[tuple[str, str], dict[str, str]] = {}
        self.lists: dict[str, dict[str, Any]] = {}
        self.memberships: dict[str, dict[str, str]] = {}
        self.webhook_deliveries = 0
        self.webhook_settings: dict[str, Any] = {}
        self.webhook_statuses: list[int] = []  # what the target answered each delivery attempt
        self._ids = itertools.count(1001)
        self._burst: deque[float] = deque()
        self._searches: deque[float] = deque()
        self.links: dict[tuple[str, str], dict[tuple[str, str], list[dict[str, Any]]]] = {}
        self._day = -1
        self._daily_used = 0
        self._over_budget = 0
        self._event_ids = itertools.count(1)
        self._webhook_tasks: set[asyncio.Task[None]] = set()
        r = self.app.router
        r.add_post("/crm/v3/objects/{object}/batch/upsert", self._batch_upsert)
        r.add_post("/crm/v3/objects/{object}/batch/read", self._batch_read)
        r.add_post("/crm/v3/objects/{object}/batch/archive", self._batch_archive)
        r.add_post("/crm/v3/objects/{object}/search", self._search)
        r.add_post("/crm/v3/objects/{object}", self._create)
        r.add_get("/crm/v3/objects/{object}/{id}", self._read_one)
        r.add_patch("/crm/v3/objects/{object}/{id}", self._update)
        r.add_put("/crm/v4/objects/{object}/{id}/associations/default/{to_object}/{to_id}", self._associate_default)
        r.add_get("/crm/v4/objects/{object}/{id}/associations/{to_object}", self._list_associations)
        r.add_post("/crm/v3/lists", self._create_list)
        r.add_post("/crm/v3/lists/", self._create_list)
        r.add_get("/crm/v3/lists/{list_id}", self._get_list)
        r.add_put("/crm/v3/lists/{list_id}/memberships/add", self._add_members)
        r.add_put("/crm/v3/lists/{list_id}/memberships/remove", self._remove_members)
        r.add_put("/crm/v3/lists/{list_id}/memberships/add-and-remove", self._add_and_remove)
        r.add_get("/crm/v3/lists/{list_id}/memberships", self._get_members)
        r.add_put("/webhooks/v3/{app_id}/settings", self._webhook_settings)
        r.add_post("/_emulator/user/{object}", self._inspect_user_create)
        r.add_get("/_emulator/webhooks", self._inspect_webhooks)
        r.add_get("/webhooks/v3/{app_id}/settings", self._webhook_settings)
        # Outermost: the limits see every request before an injected fault does (`_limits`).
        self.app.middlewares.insert(0, self._limits)

    # --- inspection ------------------------------------------------------------------------------

    def records(self, obj: str) -> list[dict[str, Any]]:
        return [self._public(obj, record) for record in self.objects.get(obj, {}).values()]

    def find(self, obj: str, prop: str, value: str) -> dict[str, Any] | None:
        record_id = self._lookup(obj, prop, value)
        return None if record_id is None else self._public(obj, self.objects[obj][record_id])

    def associations(self, obj: str, record_id: str) -> list[tuple[str, str]]:
        """(object, id) of every record linked to this one."""
        return list(self.links.get((obj, record_id), {}))

    def members(self, list_id: str) -> list[str]:
        return list(self.memberships.get(list_id, {}))

    def budget(self) -> dict[str, Any]:
        now = self.clock()
        self._roll(now)
        return {
            "burst_limit": self.burst_limit,
            "burst_window_seconds": self.burst_window,
            "burst_used": len(self._burst),
            "daily_limit": self.daily_limit,
            "daily_used": self._daily_used,
            "over_budget": self._over_budget,
        }

    def state(self) -> dict[str, Any]:
        return {
            "objects": self.objects,
            "lists": self.lists,
            "memberships": self.memberships,
            "next_id": next(self._ids),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.lists = state.get("lists", {})
        self.memberships = state.get("memberships", {})
        self._ids = itertools.count(state.get("next_id", 1001))
        for obj, rid, target, tid, types in state.get("links", []):
            self.links.setdefault((obj, rid), {})[(target, tid)] = types
        for obj, table in state.get("objects", {}).items():
            for record in table.values():
                self._store(obj, record)

    # --- the CRM user's side (inbound) -----------------------------------------------------------

    def user_create(self, obj: str, properties: dict[str, Any]) -> dict[str, Any]:
        record = self._write(obj, None, properties)
        self._emit(obj, record, "creation", properties)
        return self._public(obj, record)

    def user_update(self, obj: str, record_id: str, properties: dict[str, Any]) -> dict[str, Any]:
        record = self._write(obj, record_id, properties)
        self._emit(obj, record, "propertyChange", properties)
        return self._public(obj, record)

    async def drain_webhooks(self) -> None:
        while self._webhook_tasks:
            await asyncio.gather(*list(self._webhook_tasks), return_exceptions=True)

    def _emit(self, obj: str, record: dict[str, Any], change: str, properties: dict[str, Any]) -> None:
        if self.webhook_url is None:
            return
        now_ms = int(self.clock() * 1000)
        base = {
            "subscriptionId": 1,
            "portalId": self.portal_id,
            "appId": 1,
            "occurredAt": now_ms,
            "attemptNumber": 0,
            "objectId": int(record["id"]),
            "changeSource": "CRM_UI",
        }
        subscription = f"{SINGULAR[obj]}.{change}"
        if change == "creation":
            events = [{**base, "eventId": next(self._event_ids), "subscriptionType": subscription}]
        else:
            events = [
                {
                    **base,
                    "eventId": next(self._event_ids),
                    "subscriptionType": subscription,
                    "propertyName": k,
                    "propertyValue": v,
                }
                for k, v in properties.items()
            ]
        task = asyncio.get_running_loop().create_task(self._deliver(events))
        self._webhook_tasks.add(task)
        task.add_done_callback(self._webhook_tasks.discard)

    async def _deliver(self, events: list[dict[str, Any]]) -> None:
        assert self.webhook_url is not None
        body = orjson.dumps(events)
        timestamp = str(int(time.time() * 1000))
        headers = {
            "Content-Type": "application/json",
            "X-HubSpot-Request-Timestamp": timestamp,
            "X-HubSpot-Signature-v3": webhook_signature_v3(
                self.client_secret, "POST", self.webhook_url, body, timestamp
            ),
            "X-HubSpot-Signature-Version": "v3",
        }
        async with aiohttp.ClientSession() as session:
            for attempt in range(3):
                try:
                    async with session.post(self.webhook_url, data=body, headers=headers) as response:
                        self.webhook_statuses.append(response.status)
                        if response.status < 500:
                            self.webhook_deliveries += 1
                            return
                except aiohttp.ClientError:
                    pass  # HubSpot retries deliveries; so do we, briefly
                await asyncio.sleep(0.2 * (attempt + 1))

    # --- auth and limits -------------------------------------------------------------------------

    def is_api(self, request: web.Request) -> bool:
        # The developer platform's webhook settings take the developer API key, outside the account's limits.
        return super().is_api(request) and not request.path.startswith("/webhooks/")

    async def _inspect_user_create(self, request: web.Request) -> web.Response:
        """``POST /_emulator/user/<object>`` ``{"properties": {...}}``: `user_create` from another process (a
        support agent opening a ticket in HubSpot's UI), webhooks included."""
        obj = self._object(request)
        properties = (await _json(request)).get("properties") or {}
        if (rejected := self._unknown_properties(obj, properties)) is not None:
            return rejected
        return json_response(self.user_create(obj, properties), status=201)

    async def _inspect_webhooks(self, request: web.Request) -> web.Response:
        return json_response({"target_url": self.webhook_url, "statuses": self.webhook_statuses})

    async def _webhook_settings(self, request: web.Request) -> web.Response:
        """``PUT /webhooks/v3/<app id>/settings?hapikey=<developer API key>`` with ``{"targetUrl",
        "throttling"}`` points the app's webhooks at `targetUrl` (what `webhook_url` does at start); GET
        reads them (404 before any)."""
        if request.query.get("hapikey") != self.developer_api_key:
            return json_response(_error("INVALID_AUTHENTICATION", "The developer API key is not valid."), status=401)
        now = iso_z(self.clock())
        if request.method == "PUT":
            body = await _json(request)
            target = body.get("targetUrl")
            if not isinstance(target, str) or not target.startswith(("http://", "https://")):
                return json_response(_error("VALIDATION_ERROR", "targetUrl must be an http(s) URL"), status=400)
            self.webhook_url = target
            self.webhook_settings = {"targetUrl": target, "throttling": body.get("throttling") or {},
                                     "createdAt": self.webhook_settings.get("createdAt", now), "updatedAt": now}  # fmt: skip
        if not self.webhook_settings:
            return json_response(_error("NOT_FOUND", "No webhook settings for this app."), status=404)
        return json_response(self.webhook_settings)

    def error_response(self, status: int, request: web.Request) -> web.Response:
        if status == 429:
            return self._throttled("TEN_SECONDLY_ROLLING")
        return json_response(
            _error("INTERNAL_ERROR" if status >= 500 else "VALIDATION_ERROR", "injected fault"), status=status
        )

    def _roll(self, now: float) -> None:
        while self._burst and self._burst[0] <= now - self.burst_window:
            self._burst.popleft()
        day = int(now // 86400)
        if day != self._day:
            self._day, self._daily_used = day, 0

    def _limit_headers(self) -> dict[str, str]:
        return {
            "X-HubSpot-RateLimit-Interval-Milliseconds": str(int(self.burst_window * 1000)),
            "X-HubSpot-RateLimit-Max": str(self.burst_limit),
            "X-HubSpot-RateLimit-Remaining": str(max(0, self.burst_limit - len(self._burst))),
            "X-HubSpot-RateLimit-Daily": str(self.daily_limit),
            "X-HubSpot-RateLimit-Daily-Remaining": str(max(0, self.daily_limit - self._daily_used)),
        }

    def _throttled(self, policy: str) -> web.Response:
        message = (
            "You have reached your daily limit."
            if policy == "DAILY"
            else "You have reached your ten_secondly_rolling limit."
        )
        body = {
            "status": "error",
            "message": message,
            "errorType": "RATE_LIMIT",
            "correlationId": new_id(),
            "policyName": policy,
            "groupName": f"publicapi:private-app:{self.portal_id}",
        }
        return json_response(body, status=429, headers=self._limit_headers())

    @web.middleware
    async def _limits(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Authentication and the limits, before anything else (the request log and the fault injector run
        inside): a request is counted the moment it arrives, so a fault injected into it - a 503, a 429,
        a timeout, a dropped connection - has been counted, as HubSpot would have."""
        if not self.is_api(request):
            return await handler(request)
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
            body = _error("INVALID_AUTHENTICATION", "Authentication credentials not found.")
            return self._refused(request, json_response(body, status=401))
        now = self.clock()
        self._roll(now)
        if self._daily_used >= self.daily_limit:
            self._over_budget += 1
            return self._refused(request, self._throttled("DAILY"))
        if len(self._burst) >= self.burst_limit:
            self._over_budget += 1
            return self._refused(request, self._throttled("TEN_SECONDLY_ROLLING"))
        if request.path.endswith("/search"):
            while self._searches and self._searches[0] <= now - 1.0:
                self._searches.popleft()
            if len(self._searches) >= self.search_per_second:
                self._over_budget += 1
                return self._refused(request, self._throttled("SECONDLY"))
            self._searches.append(now)
        self._burst.append(now)
        self._daily_used += 1
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(self._limit_headers())
            raise
        response.headers.update(self._limit_headers())
        return response

    def _refused(self, request: web.Request, response: web.Response) -> web.Response:
        # Refused before the request log's middleware saw it: logged here, so the log holds every request.
        self.requests.append(LoggedRequest(request.method, request.path_qs, response.status, self.clock()))
        return response

    # --- records ---------------------------------------------------------------------------------

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
            return str(value) if str(value) in self.objects[obj] else None
        return self._index.get((obj, prop), {}).get(str(value).lower())

    def _write(self, obj: str, record_id: str | None, properties: dict[str, Any]) -> dict[str, Any]:
        now = iso_z(self.clock())
        if record_id is None:
            record_id = str(next(self._ids))
            record = {"id": record_id, "properties": {"hs_object_id": record_id, "createdate": now}, "createdAt": now}
        else:
            old = self.objects[obj][record_id]
            record = {**old, "properties": dict(old["properties"])}
        record["properties"].update({k: (None if v is None else str(v)) for k, v in properties.items()})
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
            raise web.HTTPNotFound(
                body=orjson.dumps(_error("OBJECT_NOT_FOUND", f"Unable to infer object type from: {obj}")),
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
        body = _error("VALIDATION_ERROR", f"Property values were not valid: {orjson.dumps(details).decode()}")
        body["errors"] = [
            {"message": d["message"], "code": "PROPERTY_DOESNT_EXIST", "context": {"propertyName": [d["name"]]}}
            for d in details
        ]
        return json_response(body, status=400)

    def _record_error(self, obj: str, properties: dict[str, Any]) -> str | None:
        email = properties.get("email")
        if email and not _EMAIL.match(str(email)):
            return f"Property values were not valid: email {email!s} is invalid"
        return self.faults.rejection_for(obj, properties)

    async def _batch_upsert(self, request: web.Request) -> web.Response:
        obj = self._object(request)
        body = await _json(request)
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            return json_response(_error("VALIDATION_ERROR", "inputs must be a non-empty list"), status=400)
        if len(inputs) > BATCH_LIMIT:
            return json_response(
                _error("VALIDATION_ERROR", f"Batch input limit of {BATCH_LIMIT} exceeded: {len(inputs)} inputs"),
                status=400,
            )
        keys = []
        for item in inputs:
            id_property = item.get("idProperty") or "hs_object_id"
            if id_property not in UNIQUE[obj] and id_property != "hs_object_id":
                return json_response(
                    _error("VALIDATION_ERROR", f"{id_property} is not a unique property of {obj}"), status=400
                )
            if (rejected := self._unknown_properties(obj, item.get("properties") or {})) is not None:
                return rejected
            keys.append((id_property, str(item.get("id", "")).lower()))
        if len(set(keys)) != len(keys):
            return json_response(_error("VALIDATION_ERROR", "Duplicate IDs found in batch input"), status=400)
        started = iso_z(self.clock())
        results, errors = [], []
        for item in inputs:
            id_property = item.get("idProperty") or "hs_object_id"
            properties = dict(item.get("properties") or {})
            if id_property != "hs_object_id":
                properties.setdefault(id_property, item["id"])
            if (message := self._record_error(obj, properties)) is not None:
                errors.append(_record_error("VALIDATION_ERROR", message, [str(item.get("id"))]))
                continue
            existing = self._lookup(obj, id_property, item.get("id"))
            if existing is None and id_property == "hs_object_id":
                errors.append(_record_error("OBJECT_NOT_FOUND", "Object not found", [str(item.get("id"))]))
                continue
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
        inputs = (await _json(request, {})).get("inputs") or []
        if len(inputs) > BATCH_LIMIT:
            return json_response(_error("VALIDATION_ERROR", f"Batch input limit of {BATCH_LIMIT} exceeded"), status=400)
        for item in inputs:
            record_id = str(item.get("id", ""))
            old = self.objects[obj].pop(record_id, None)
            if old is None:
                continue
            for prop in UNIQUE[obj]:
                if old["properties"].get(prop):
                    self._index.get((obj, prop), {}).pop(str(old["properties"][prop]).lower(), None)
            for members in self.memberships.values():
                members.pop(record_id, None)
            for other in self.links.pop((obj, record_id), {}):
                self.links.get(other, {}).pop((obj, record_id), None)
        return web.Response(status=204)

    async def _batch_read(self, request: web.Request) -> web.Response:
        obj = self._object(request)
        body = await _json(request)
        inputs = body.get("inputs") or []
        if len(inputs) > BATCH_LIMIT:
            return json_response(_error("VALIDATION_ERROR", f"Batch input limit of {BATCH_LIMIT} exceeded"), status=400)
        id_property = body.get("idProperty") or "hs_object_id"
        results, missing = [], []
        for item in inputs:
            record_id = self._lookup(obj, id_property, item.get("id"))
            if record_id is None:
                missing.append(str(item.get("id")))
            else:
                results.append(self._public(obj, self.objects[obj][record_id], body.get("properties")))
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
                    _record_error(
                        "OBJECT_NOT_FOUND", "Could not get some objects, they may be deleted or not exist.", missing
                    )
                ],
            )
        return json_response(answer, status=207 if missing else 200)

    async def _search(self, request: web.Request) -> web.Response:
        obj = self._object(request)
        body = await _json(request)
        limit = int(body.get("limit", 10))
        if limit > SEARCH_PAGE_LIMIT:
            return json_response(_error("VALIDATION_ERROR", f"limit must be at most {SEARCH_PAGE_LIMIT}"), status=400)
        groups = body.get("filterGroups") or []
        matched = [
            r
            for r in self.objects[obj].values()
            if not groups or any(matches_all(r, g.get("filters", [])) for g in groups)
        ]
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
        body = await _json(request)
        properties = body.get("properties") or {}
        if (rejected := self._unknown_properties(obj, properties)) is not None:
            return rejected
        for prop in UNIQUE[obj]:
            if properties.get(prop) and (existing := self._lookup(obj, prop, properties[prop])) is not None:
                body = _error("CONFLICT", f"{SINGULAR[obj].capitalize()} already exists. Existing ID: {existing}")
                return json_response(body, status=409)
        if (message := self._record_error(obj, properties)) is not None:
            return json_response(_error("VALIDATION_ERROR", message), status=400)
        targets = []
        for association in body.get("associations") or []:
            target_id = str((association.get("to") or {}).get("id", ""))
            target = next((o for o, table in self.objects.items() if target_id in table), None)
            if target is None:
                return json_response(
                    _error("VALIDATION_ERROR", f"Association target {target_id} does not exist"), status=400
                )
            targets.append((target, target_id, association.get("types") or []))
        record = self._write(obj, None, properties)
        for target, target_id, types in targets:
            self._link(obj, record["id"], target, target_id, types)
        return json_response(self._public(obj, record), status=201)

    async def _read_one(self, request: web.Request) -> web.Response:
        obj = self._object(request)
        record_id = self._lookup(obj, request.query.get("idProperty", "hs_object_id"), request.match_info["id"])
        if record_id is None:
            return web.Response(status=404)
        wanted = request.query.get("properties")
        return json_response(self._public(obj, self.objects[obj][record_id], wanted.split(",") if wanted else None))

    async def _update(self, request: web.Request) -> web.Response:
        obj = self._object(request)
        properties = (await _json(request)).get("properties") or {}
        if (rejected := self._unknown_properties(obj, properties)) is not None:
            return rejected
        record_id = self._lookup(obj, request.query.get("idProperty", "hs_object_id"), request.match_info["id"])
        if record_id is None:
            return json_response(_error("OBJECT_NOT_FOUND", "resource not found"), status=404)
        if (message := self._record_error(obj, properties)) is not None:
            return json_response(_error("VALIDATION_ERROR", message), status=400)
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
                _error("OBJECT_NOT_FOUND", "One or both records of the association do not exist"), status=404
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

    # --- lists -----------------------------------------------------------------------------------

    async def _create_list(self, request: web.Request) -> web.Response:
        body = await _json(request)
        for required in ("name", "objectTypeId", "processingType"):
            if not body.get(required):
                return json_response(_error("VALIDATION_ERROR", f"{required} is required"), status=400)
        if any(existing["name"] == body["name"] for existing in self.lists.values()):
            return json_response(_error("VALIDATION_ERROR", f"A list named {body['name']} already exists"), status=400)
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
            return json_response(_error("OBJECT_NOT_FOUND", "List does not exist"), status=404)
        return json_response({"list": {**found, "size": len(self.memberships[found["listId"]])}})

    def _membership_list(self, list_id: str) -> tuple[dict[str, Any] | None, web.Response | None]:
        found = self.lists.get(list_id)
        if found is None:
            return None, json_response(_error("OBJECT_NOT_FOUND", "List does not exist"), status=404)
        if found["processingType"] == "DYNAMIC":
            return None, json_response(
                _error("VALIDATION_ERROR", "Memberships of a DYNAMIC list cannot be edited"), status=400
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
        return json_response(self._change_members(found, await _json(request, []), []))  # type: ignore[arg-type]

    async def _remove_members(self, request: web.Request) -> web.Response:
        found, refused = self._membership_list(request.match_info["list_id"])
        if refused is not None:
            return refused
        return json_response(self._change_members(found, [], await _json(request, [])))  # type: ignore[arg-type]

    async def _add_and_remove(self, request: web.Request) -> web.Response:
        found, refused = self._membership_list(request.match_info["list_id"])
        if refused is not None:
            return refused
        body = await _json(request)
        return json_response(
            self._change_members(found, body.get("recordIdsToAdd") or [], body.get("recordIdsToRemove") or [])
        )  # type: ignore[arg-type]

    async def _get_members(self, request: web.Request) -> web.Response:
        list_id = request.match_info["list_id"]
        if list_id not in self.lists:
            return json_response(_error("OBJECT_NOT_FOUND", "List does not exist"), status=404)
        members = self.memberships[list_id]
        results = [{"recordId": rid, "membershipTimestamp": at} for rid, at in members.items()]
        return json_response({"results": results, "total": len(results)})


def _error(category: str, message: str) -> dict[str, Any]:
    return {"status": "error", "message": message, "correlationId": new_id(), "category": category}


def _record_error(category: str, message: str, ids: list[str]) -> dict[str, Any]:
    return {
        "status": "error",
        "category": category,
        "message": message,
        "context": {"ids": ids},
        "links": {},
        "errors": [],
    }


async def _json(request: web.Request, default: Any = None) -> Any:
    raw = await request.read()
    if not raw:
        return {} if default is None else default
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise web.HTTPBadRequest(
            body=orjson.dumps(_error("VALIDATION_ERROR", "Invalid input JSON")), content_type="application/json"
        ) from None
