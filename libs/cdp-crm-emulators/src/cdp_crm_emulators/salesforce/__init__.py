"""A local Salesforce org: OAuth 2.0, REST ``/services/data/vXX.X/``, sObject Collections, Composite, Bulk API 2.0.

Writes: sObject upsert by external id (PATCH ``sobjects/<Object>/<ExtField>/<value>``: 201 created, 200
updated), create/update/delete by Id, sObject Collections upsert (PATCH ``composite/sobjects/<Object>/
<ExtField>``, at most 200 records, per-record ``{success, errors: [{statusCode, message, fields}]}``;
``allOrNone`` rolls the whole request back), Composite (25 subrequests, ``@{ref.id}`` references) and Bulk
API 2.0 ingest jobs (see `bulk`). Reads: describe, sObject by Id, SOQL with ``nextRecordsUrl`` pagination
(``Sforce-Query-Options: batchSize=N``, 200..2000).

Limits: every authenticated REST call counts against `daily_limit` over a rolling 24 hours (a Composite
request is one call), counted when it arrives - before the fault injector, so a call that then meets an
injected fault (a throttle, a 5xx, a timeout, an answer lost after the write) used one of the day's calls, as
it would have in Salesforce; answers carry ``Sforce-Limit-Info: api-usage=n/limit`` and past the limit
Salesforce answers 403 ``REQUEST_LIMIT_EXCEEDED``, changes nothing and counts nothing more. An injected 429
gets that same answer, since Salesforce throttles with it rather than with 429. A missing or unknown token
is 401 ``INVALID_SESSION_ID``.

Inbound: `user_update` / `user_create` write as a Salesforce user would; every write moves the record's
``SystemModstamp``, so ``SELECT ... WHERE SystemModstamp > <last seen>`` polling sees it. With
`commit_after` seconds the write belongs to a transaction that commits that much later (a long Apex job, a
data load): its ``SystemModstamp`` is when it was made, but until the commit SOQL finds the record as it was
before (a new one: not at all) - records written and committed meanwhile are found first, with later stamps,
and a poller whose high-water mark passed them never sees this one unless it reads back.

Merges: `user_merge(object, master, losers)` is a user's merge of up to three Leads, Contacts or Accounts (the
UI's, or the SOAP API's merge() - the REST API has none): the master keeps its Id and its values, takes the
values named in `take` (the fields the user picked from a losing record), its related records' lookups
are moved to it (Cases, Tasks, Opportunities, CampaignMembers naming a loser) and its ``SystemModstamp``
moves; each loser is deleted with ``MasterRecordId`` set to the master's Id. A deleted loser stays in the
recycle bin: ``/queryAll`` finds it (``IsDeleted`` true, ``MasterRecordId``, its ``SystemModstamp`` the
deletion), ``/query`` and upserts by external id do not (a write by its external id value creates a new
record), and a read or update by its Id answers 404 ``ENTITY_IS_DELETED`` (Salesforce's "entity is deleted").
Other deletions here are permanent (not in the recycle bin).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import re
import urllib.parse
from collections import deque
from typing import Any

import orjson
from aiohttp import web

from cdp_crm_emulators._server import Emulator, json_response, new_id
from cdp_crm_emulators.salesforce import bulk, soql
from cdp_crm_emulators.salesforce.auth import JWT_BEARER, GrantError, load_public_key, verify_assertion
from cdp_crm_emulators.salesforce.org import API_VERSION, Org, sf_datetime
from cdp_crm_emulators.salesforce.schema import DEFAULT_OWNER, MERGEABLE, SObject, default_objects, error

COLLECTION_LIMIT = 200
COMPOSITE_LIMIT = 25
_VERSION = re.compile(r"^v(\d+\.\d)$")
_ORG_ID = "00DDp0000000001AAA"


class SalesforceEmulator(Emulator):
    name = "salesforce"

    def __init__(
        self,
        *,
        client_id: str = "local-consumer-key",
        client_secret: str = "local-consumer-secret",
        jwt_public_key: bytes | str | None = None,
        usernames: set[str] | None = None,
        session_ids: set[str] | None = None,
        daily_limit: int = 100_000,
        extra_fields: dict[str, dict[str, str]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.client_id = client_id
        self.client_secret = client_secret
        self.jwt_key = load_public_key(jwt_public_key) if jwt_public_key is not None else None
        self.usernames = usernames
        self.sessions = set(session_ids) if session_ids is not None else {"00DDp0000000001!local-session"}
        self.daily_limit = daily_limit
        objects = default_objects()
        for obj, fields in (extra_fields or {}).items():
            objects[obj].fields.update(fields)
        self.org = Org(objects, self.clock, self.faults)
        self.jobs: dict[str, bulk.IngestJob] = {}
        self._calls: deque[float] = deque()
        self._over_budget = 0
        self._cursors: dict[str, tuple[str, list[dict[str, Any]], list[str], int]] = {}
        # A write whose transaction commits later (`commit_after`): (object, id) -> (commit time, the record as
        # queries see it until then, None for a record not there before).
        self._in_flight: dict[tuple[str, str], tuple[float, dict[str, Any] | None]] = {}
        self._job_tasks: set[asyncio.Task[None]] = set()
        self.app.router.add_post("/services/oauth2/token", self._token)
        self.app.router.add_get("/services/data", self._versions)
        self.app.router.add_get("/services/data/", self._versions)
        self.app.router.add_route("*", "/services/data/{version}/{rest:.*}", self._rest)

    # --- inspection ------------------------------------------------------------------------------

    def records(self, obj: str) -> list[dict[str, Any]]:
        return [dict(record) for record in self.org.store.objects.get(obj, {}).values()]

    def find(self, obj: str, fld: str, value: Any) -> dict[str, Any] | None:
        record_id = self.org.store.find(obj, fld, value)
        return None if record_id is None else dict(self.org.store.objects[obj][record_id])

    def budget(self) -> dict[str, Any]:
        self._roll()
        return {"daily_limit": self.daily_limit, "daily_used": len(self._calls), "over_budget": self._over_budget}

    def state(self) -> dict[str, Any]:
        return {
            "objects": self.org.store.objects,
            "recycled": self.org.recycled,
            "counter": next(self.org.counter),
            "case_number": next(self.org.case_numbers),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.org.store.restore(state.get("objects", {}))
        self.org.recycled = state.get("recycled", {})
        self.org.counter = itertools.count(state.get("counter", 1))
        self.org.case_numbers = itertools.count(state.get("case_number", 1001))

    async def drain_jobs(self) -> None:
        while self._job_tasks:
            await asyncio.gather(*list(self._job_tasks))

    # --- the CRM user's side (inbound) -----------------------------------------------------------

    def user_create(self, obj: str, values: dict[str, Any], *, commit_after: float = 0.0) -> dict[str, Any]:
        record_id, outcome = self.org.write(obj, None, dict(values))
        if record_id is None:
            raise ValueError(outcome)
        if commit_after > 0:
            self._in_flight[(obj, record_id)] = (self.clock() + commit_after, None)
        return dict(self.org.store.objects[obj][record_id])

    def user_update(
        self, obj: str, record_id: str, values: dict[str, Any], *, commit_after: float = 0.0
    ) -> dict[str, Any]:
        before = dict(self.org.store.objects[obj][record_id]) if record_id in self.org.store.objects[obj] else None
        written, outcome = self.org.write(obj, record_id, dict(values))
        if written is None:
            raise ValueError(outcome)
        if commit_after > 0:
            held = self._in_flight.get((obj, record_id))
            self._in_flight[(obj, record_id)] = (self.clock() + commit_after, held[1] if held else before)
        return dict(self.org.store.objects[obj][record_id])

    def user_merge(
        self, obj: str, master: str, losers: str | list[str], take: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A user merges `losers` (one or two) into `master` (module docstring); the master as it is after."""
        losers = [losers] if isinstance(losers, str) else list(losers)
        if obj not in MERGEABLE or not 1 <= len(losers) <= 2 or master in losers:
            raise ValueError("merge takes a Lead, Contact or Account and one or two other records of it")
        table = self.org.store.objects.get(obj, {})
        if master not in table or any(loser not in table for loser in losers):
            raise ValueError("ENTITY_IS_DELETED: a record to merge is not there")
        now = sf_datetime(self.clock())
        gone = [self.org.store.delete(obj, loser) for loser in losers]
        for loser, record in zip(losers, gone, strict=True):
            assert record is not None
            self.org.recycled.setdefault(obj, {})[loser] = {
                **record, "IsDeleted": True, "MasterRecordId": master, "LastModifiedDate": now, "SystemModstamp": now,
            }  # fmt: skip
        for child, sobject in self.org.objects.items():  # related records follow the master
            links = [name for name, target in sobject.references.items() if target == obj or name == "WhoId"]
            for record in self.org.store.objects.get(child, {}).values():
                for name in links:
                    if record.get(name) in losers:
                        record[name] = master
        written, outcome = self.org.write(obj, master, dict(take or {}))
        if written is None:
            raise ValueError(outcome)
        return dict(self.org.store.objects[obj][master])

    def _committed(self, obj: str, *, deleted: bool = False) -> list[dict[str, Any]]:
        """The object's records as a query sees them now: a write whose transaction has not committed yet
        (`commit_after`) shows the record as it was before it (a new record: not at all)."""
        now = self.clock()
        seen = []
        for record_id, record in self.org.store.objects.get(obj, {}).items():
            flight = self._in_flight.get((obj, record_id))
            if flight is not None:
                if now < flight[0]:
                    if flight[1] is not None:
                        seen.append(flight[1])
                    continue
                del self._in_flight[(obj, record_id)]
            seen.append(record)
        if deleted:  # queryAll: the recycle bin too
            seen.extend(self.org.recycled.get(obj, {}).values())
        return seen

    # --- auth and limits -------------------------------------------------------------------------

    def is_api(self, request: web.Request) -> bool:
        return request.path.startswith("/services/data/v")

    def error_response(self, status: int, request: web.Request) -> web.Response:
        if status == 429:
            return _errors(403, "REQUEST_LIMIT_EXCEEDED", "ConcurrentPerOrgLongTxn Limit exceeded.")
        if status >= 500:
            return _errors(status, "SERVER_UNAVAILABLE" if status == 503 else "UNKNOWN_EXCEPTION", "injected fault")
        return _errors(status, "BAD_REQUEST", "injected fault")

    def admit(self, request: web.Request) -> web.Response | None:
        """The session, then the daily API requests (before the fault injector: Salesforce counts a call when it
        arrives, so a throttle, a 5xx or an answer lost after the write used one of the day's calls)."""
        auth = request.headers.get("Authorization", "")
        token = auth.split(" ", 1)[1] if " " in auth else ""
        if token not in self.sessions:
            return _errors(401, "INVALID_SESSION_ID", "Session expired or invalid")
        self._roll()
        if len(self._calls) >= self.daily_limit:
            self._over_budget += 1
            response = _errors(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")
            response.headers["Sforce-Limit-Info"] = self._usage()
            return response
        self._calls.append(self.clock())
        return None

    def _usage(self) -> str:
        return f"api-usage={len(self._calls)}/{self.daily_limit}"

    def _roll(self) -> None:
        horizon = self.clock() - 86400
        while self._calls and self._calls[0] <= horizon:
            self._calls.popleft()

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        grant = form.get("grant_type")
        try:
            if grant == "client_credentials":
                if form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret:
                    raise GrantError("invalid_client", "invalid client credentials")
            elif grant == JWT_BEARER:
                audiences = {"https://login.salesforce.com", "https://test.salesforce.com", self.base_url}
                verify_assertion(
                    str(form.get("assertion", "")),
                    key=self.jwt_key,
                    consumer_key=self.client_id,
                    usernames=self.usernames,
                    audiences=audiences,
                    now=self.clock(),
                )
            else:
                raise GrantError("unsupported_grant_type", "grant type not supported")
        except GrantError as exc:
            return json_response({"error": exc.error, "error_description": exc.description}, status=400)
        token = f"{_ORG_ID[:15]}!{new_id()}"
        self.sessions.add(token)
        issued = str(int(self.clock() * 1000))
        signature = base64.b64encode(
            hmac.new(self.client_secret.encode(), (self.base_url + issued).encode(), hashlib.sha256).digest()
        )
        return json_response(
            {
                "access_token": token,
                "instance_url": self.base_url,
                "id": f"{self.base_url}/id/{_ORG_ID}/{DEFAULT_OWNER}",
                "token_type": "Bearer",
                "issued_at": issued,
                "signature": signature.decode(),
                "scope": "api",
            }
        )

    async def _versions(self, request: web.Request) -> web.Response:
        return json_response([{"label": "Winter '25", "url": f"/services/data/v{API_VERSION}", "version": API_VERSION}])

    async def _rest(self, request: web.Request) -> web.Response:
        # `admit` has checked the session and counted the call.
        version = _VERSION.match(request.match_info["version"])
        if version is None:
            response = _errors(404, "NOT_FOUND", "The requested resource does not exist")
        else:
            body = await request.read()
            status, answer, headers = await self._dispatch(
                request.method,
                request.match_info["rest"],
                dict(request.query),
                body,
                request.headers,
                version.group(1),
            )
            response = _respond(status, answer, headers)
        response.headers["Sforce-Limit-Info"] = self._usage()
        return response

    # --- routing ---------------------------------------------------------------------------------

    async def _dispatch(
        self, method: str, path: str, query: dict[str, str], body: bytes, headers: Any, version: str
    ) -> tuple[int, Any, dict[str, str]]:
        """(status, body, headers) for one REST call; Composite subrequests come through here too."""
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
        try:
            payload = orjson.loads(body) if body and parts[:2] != ["jobs", "ingest"] else None
        except orjson.JSONDecodeError:
            return 400, _error_list("JSON_PARSER_ERROR", "Unexpected character in the request body"), {}
        if not parts:
            return (
                200,
                {"sobjects": f"/services/data/v{version}/sobjects", "query": f"/services/data/v{version}/query"},
                {},
            )
        head = parts[0]
        if head == "limits" and method == "GET":
            self._roll()
            return (
                200,
                {"DailyApiRequests": {"Max": self.daily_limit, "Remaining": self.daily_limit - len(self._calls)}},
                {},
            )
        if head == "sobjects":
            return self._sobjects(method, parts[1:], payload)
        if head in ("query", "queryAll") and method == "GET":
            return self._query(parts[1:], query, headers, version, deleted=head == "queryAll")
        if head == "composite" and len(parts) == 1 and method == "POST":
            return await self._composite(payload or {}, version)
        if head == "composite" and parts[1:] == ["sobjects"] and method == "DELETE":
            return self._collection_delete(query)
        if head == "composite" and len(parts) >= 2 and parts[1] == "sobjects":
            return self._collections(method, parts[2:], payload or {})
        if parts[:2] == ["jobs", "ingest"]:
            return self._ingest(method, parts[2:], body, version)
        return 404, _error_list("NOT_FOUND", "The requested resource does not exist"), {}

    def _sobject(self, name: str) -> SObject | None:
        return self.org.objects.get(name)

    def _sobjects(self, method: str, parts: list[str], payload: Any) -> tuple[int, Any, dict[str, str]]:
        if not parts:
            return (
                200,
                {
                    "encoding": "UTF-8",
                    "maxBatchSize": COLLECTION_LIMIT,
                    "sobjects": [s.summary() for s in self.org.objects.values()],
                },
                {},
            )
        sobject = self._sobject(parts[0])
        if sobject is None:
            return (
                404,
                _error_list(
                    "NOT_FOUND", f"The requested resource does not exist: sObject type '{parts[0]}' is not supported."
                ),
                {},
            )
        obj = sobject.name
        if len(parts) == 1 and method == "GET":
            return 200, {"objectDescribe": sobject.summary(), "recentItems": []}, {}
        if len(parts) == 1 and method == "POST":
            record_id, outcome = self.org.write(obj, None, _fields(payload))
            if record_id is None:
                return 400, [_as_rest_error(outcome)], {}
            return 201, {"id": record_id, "success": True, "errors": []}, {}
        if parts[1:] == ["describe"] and method == "GET":
            return 200, sobject.describe(), {}
        if len(parts) == 2:
            record_id = parts[1]
            if record_id in self.org.recycled.get(obj, {}):
                return 404, _error_list("ENTITY_IS_DELETED", "entity is deleted"), {}
            if self.org.store.get(obj, record_id) is None:
                return 404, _error_list("NOT_FOUND", "The requested resource does not exist"), {}
            if method == "GET":
                return 200, self.org.public(obj, self.org.store.objects[obj][record_id]), {}
            if method == "PATCH":
                written, outcome = self.org.write(obj, record_id, _fields(payload))
                return (204, None, {}) if written else (400, [_as_rest_error(outcome)], {})
            if method == "DELETE":
                self.org.store.delete(obj, record_id)
                return 204, None, {}
        if len(parts) == 3 and method == "PATCH":
            return self._upsert_one(sobject, parts[1], parts[2], _fields(payload))
        if len(parts) == 3 and method == "GET":
            if parts[1] not in sobject.external_ids:
                return (
                    404,
                    _error_list(
                        "NOT_FOUND", f"Provided external ID field does not exist or is not accessible: {parts[1]}"
                    ),
                    {},
                )
            record_id = self.org.store.find(obj, parts[1], parts[2])
            if record_id is None:
                return 404, _error_list("NOT_FOUND", "The requested resource does not exist"), {}
            return 200, self.org.public(obj, self.org.store.objects[obj][record_id]), {}
        return 405, _error_list("METHOD_NOT_ALLOWED", f"HTTP Method '{method}' not allowed."), {}

    def _upsert_one(
        self, sobject: SObject, ext_field: str, value: str, values: dict[str, Any]
    ) -> tuple[int, Any, dict[str, str]]:
        if ext_field not in sobject.external_ids and ext_field != "Id":
            return (
                404,
                _error_list(
                    "NOT_FOUND", f"Provided external ID field does not exist or is not accessible: {ext_field}"
                ),
                {},
            )
        if ext_field in values and str(values[ext_field]).lower() != value.lower():
            return (
                400,
                _error_list(
                    "INVALID_FIELD",
                    f"The value of the external ID field in the request body doesn't match: {ext_field}",
                ),
                {},
            )
        record_id, outcome = self.org.upsert(sobject.name, ext_field, value, values)
        if record_id is None:
            return 400, [_as_rest_error(outcome)], {}
        return (
            (201 if outcome is True else 200),
            {"id": record_id, "success": True, "errors": [], "created": outcome is True},
            {},
        )

    # --- sObject Collections and Composite -------------------------------------------------------

    def _collections(self, method: str, parts: list[str], payload: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        records = payload.get("records")
        if not isinstance(records, list):
            return 400, _error_list("INVALID_FIELD", "records is required"), {}
        if len(records) > COLLECTION_LIMIT:
            return (
                400,
                _error_list(
                    "EXCEEDED_ID_LIMIT",
                    f"record limit reached. cannot submit more than {COLLECTION_LIMIT} records into this call",
                ),
                {},
            )
        all_or_none = bool(payload.get("allOrNone", False))
        if method == "PATCH" and len(parts) == 2:
            sobject = self._sobject(parts[0])
            if sobject is None or (parts[1] not in sobject.external_ids and parts[1] != "Id"):
                return 404, _error_list("NOT_FOUND", "The requested resource does not exist"), {}
            return 200, self._collection_upsert(sobject, parts[1], records, all_or_none), {}
        if method == "POST" and not parts:
            return 200, self._collection_create(records, all_or_none), {}
        return 405, _error_list("METHOD_NOT_ALLOWED", f"HTTP Method '{method}' not allowed."), {}

    def _collection_upsert(
        self, sobject: SObject, ext_field: str, records: list[dict[str, Any]], all_or_none: bool
    ) -> list[dict[str, Any]]:
        keys = [str(r.get(ext_field, "")).lower() for r in records]
        repeated = {k for k in keys if k and keys.count(k) > 1}
        before = self.org.store.copy_state() if all_or_none else None
        results: list[dict[str, Any]] = []
        for record, key in zip(records, keys, strict=True):
            record_type = (record.get("attributes") or {}).get("type")
            if record_type not in (None, sobject.name):
                results.append(
                    _failure(error("INVALID_TYPE", f"Record type {record_type} does not match {sobject.name}"))
                )
            elif key in repeated:
                results.append(
                    _failure(
                        error("DUPLICATE_EXTERNAL_ID", f"Duplicate external id specified: {ext_field}", [ext_field])
                    )
                )
            else:
                values = _fields(record)
                record_id, outcome = self.org.upsert(sobject.name, ext_field, values.pop(ext_field, None), values)
                results.append(
                    {"id": record_id, "success": True, "errors": [], "created": outcome is True}
                    if record_id
                    else _failure(outcome)
                )
        if before is not None and not all(r["success"] for r in results):
            self.org.store.restore(before)
            return [r if not r["success"] else _rolled_back() for r in results]
        return results

    def _collection_delete(self, query: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        """``DELETE composite/sobjects?ids=<Id>,<Id>&allOrNone=false``: per Id ``{id, success, errors}``; an Id
        no record has is ``ENTITY_IS_DELETED`` (Salesforce answers so for a deleted record as well)."""
        ids = [i for i in query.get("ids", "").split(",") if i]
        if not ids:
            return 400, _error_list("MISSING_ARGUMENT", "ids: must be a comma-separated list of Ids"), {}
        if len(ids) > COLLECTION_LIMIT:
            return 400, _error_list("EXCEEDED_ID_LIMIT", f"cannot delete more than {COLLECTION_LIMIT} records"), {}
        all_or_none = query.get("allOrNone", "false").lower() == "true"
        before = self.org.store.copy_state() if all_or_none else None
        results: list[dict[str, Any]] = []
        for record_id in ids:
            obj = next((o for o, table in self.org.store.objects.items() if record_id in table), None)
            if obj is None:
                results.append({"id": record_id, **_failure(error("ENTITY_IS_DELETED", "entity is deleted"))})
                continue
            self.org.store.delete(obj, record_id)
            results.append({"id": record_id, "success": True, "errors": []})
        if before is not None and not all(r["success"] for r in results):
            self.org.store.restore(before)
            return 200, [r if not r["success"] else {"id": r["id"], **_rolled_back()} for r in results], {}
        return 200, results, {}

    def _collection_create(self, records: list[dict[str, Any]], all_or_none: bool) -> list[dict[str, Any]]:
        before = self.org.store.copy_state() if all_or_none else None
        results = []
        for record in records:
            obj = (record.get("attributes") or {}).get("type")
            if obj not in self.org.objects:
                results.append(
                    _failure(error("INVALID_TYPE", "Each record needs attributes.type naming a supported sObject"))
                )
                continue
            record_id, outcome = self.org.write(obj, None, _fields(record))
            results.append({"id": record_id, "success": True, "errors": []} if record_id else _failure(outcome))
        if before is not None and not all(r["success"] for r in results):
            self.org.store.restore(before)
            return [r if not r["success"] else _rolled_back() for r in results]
        return results

    async def _composite(self, payload: dict[str, Any], version: str) -> tuple[int, Any, dict[str, str]]:
        subrequests = payload.get("compositeRequest") or []
        if len(subrequests) > COMPOSITE_LIMIT:
            return (
                400,
                _error_list("INVALID_FIELD", f"Composite requests cannot have more than {COMPOSITE_LIMIT} subrequests"),
                {},
            )
        all_or_none = bool(payload.get("allOrNone", False))
        before = self.org.store.copy_state() if all_or_none else None
        answers: list[dict[str, Any]] = []
        references: dict[str, Any] = {}
        failed = False
        for sub in subrequests:
            ref = sub.get("referenceId", "")
            if failed and all_or_none:
                answers.append(
                    _composite_answer(
                        400,
                        _error_list(
                            "PROCESSING_HALTED",
                            "The transaction was rolled back since another operation in the same transaction failed.",
                        ),
                        ref,
                    )
                )
                continue
            url = _substitute(sub.get("url", ""), references)
            body = (
                orjson.loads(_substitute(orjson.dumps(sub.get("body")).decode(), references))
                if sub.get("body") is not None
                else None
            )
            match = re.match(r"^/services/data/v(\d+\.\d)/(.*)$", url.split("?")[0])
            if match is None:
                status, answer = (
                    400,
                    _error_list("INVALID_URL", "Composite subrequest url must start with /services/data/vXX.X/"),
                )
            else:
                query = dict(urllib.parse.parse_qsl(url.split("?", 1)[1])) if "?" in url else {}
                raw = orjson.dumps(body) if body is not None else b""
                status, answer, _ = await self._dispatch(
                    sub.get("method", "GET"), match.group(2), query, raw, {}, match.group(1)
                )
            if status >= 400:
                failed = True
            elif isinstance(answer, dict):
                references[ref] = answer
            answers.append(_composite_answer(status, answer, ref))
        if before is not None and failed:
            self.org.store.restore(before)
            answers = [
                a
                if a["httpStatusCode"] >= 400
                else _composite_answer(
                    400,
                    _error_list(
                        "PROCESSING_HALTED",
                        "The transaction was rolled back since another operation in the same transaction failed.",
                    ),
                    a["referenceId"],
                )
                for a in answers
            ]
        return 200, {"compositeResponse": answers}, {}

    # --- SOQL ------------------------------------------------------------------------------------

    def _query(
        self, parts: list[str], query: dict[str, str], headers: Any, version: str, *, deleted: bool = False
    ) -> tuple[int, Any, dict[str, str]]:
        if parts:
            locator = parts[0]
            if locator not in self._cursors:
                return 400, _error_list("INVALID_QUERY_LOCATOR", "invalid query locator"), {}
            obj, rest, fields, total = self._cursors.pop(locator)
        else:
            text = query.get("q")
            if not text:
                return 400, _error_list("MALFORMED_QUERY", "q is required"), {}
            types = {name: s.all_fields() for name, s in self.org.objects.items()}
            try:
                parsed = soql.parse(text, types)
            except soql.QueryError as exc:
                return 400, _error_list(exc.code, str(exc)), {}
            matched = [r for r in self._committed(parsed.obj, deleted=deleted) if parsed.where(r)]
            for column, descending in reversed(parsed.order_by):
                kind = types[parsed.obj][column]
                matched.sort(key=lambda r, c=column, k=kind: soql.sort_key(r.get(c), k), reverse=descending)
            if parsed.limit is not None:
                matched = matched[: parsed.limit]
            if parsed.count:
                return 200, {"totalSize": len(matched), "done": True, "records": []}, {}
            obj, rest, fields, total = parsed.obj, matched, parsed.fields, len(matched)
        batch = 2000
        options = headers.get("Sforce-Query-Options", "") if headers else ""
        if (m := re.search(r"batchSize=(\d+)", options)) is not None:
            batch = max(200, min(2000, int(m.group(1))))
        page, remaining = rest[:batch], rest[batch:]
        answer: dict[str, Any] = {
            "done": not remaining,
            "records": [self.org.public(obj, r, fields, version) for r in page],
        }
        answer["totalSize"] = total
        if remaining:
            locator = f"01gDp{new_id()[:10]}-{batch}"
            self._cursors[locator] = (obj, remaining, fields, total)
            answer["nextRecordsUrl"] = f"/services/data/v{version}/query/{locator}"
        return 200, answer, {}

    # --- Bulk API 2.0 ----------------------------------------------------------------------------

    def _ingest(self, method: str, parts: list[str], body: bytes, version: str) -> tuple[int, Any, dict[str, str]]:
        if not parts and method == "POST":
            return self._create_job(orjson.loads(body or b"{}"), version)
        if not parts and method == "GET":
            return (
                200,
                {"done": True, "records": [job.info() for job in self.jobs.values()], "nextRecordsUrl": None},
                {},
            )
        job = self.jobs.get(parts[0]) if parts else None
        if job is None:
            return 404, _error_list("NOT_FOUND", "The requested resource does not exist"), {}
        tail = parts[1:]
        if not tail and method == "GET":
            return 200, job.info(), {}
        if not tail and method == "DELETE":
            if job.state not in ("UploadComplete", "JobComplete", "Aborted", "Failed"):
                return 400, _error_list("API_ERROR", "Job must be closed or aborted before deletion"), {}
            del self.jobs[job.id]
            return 204, None, {}
        if not tail and method == "PATCH":
            wanted = orjson.loads(body or b"{}").get("state")
            if wanted == "UploadComplete" and job.state == "Open":
                job.state = "UploadComplete"
                task = asyncio.get_running_loop().create_task(
                    bulk.process(job, self.org.bulk_row, lambda: sf_datetime(self.clock()))
                )
                self._job_tasks.add(task)
                task.add_done_callback(self._job_tasks.discard)
                return 200, job.info(), {}
            if wanted == "Aborted" and job.state in ("Open", "UploadComplete", "InProgress"):
                job.state = "Aborted"
                return 200, job.info(), {}
            return 400, _error_list("INVALIDJOBSTATE", f"Job state {job.state} cannot change to {wanted}"), {}
        if tail == ["batches"] and method == "PUT":
            if job.state != "Open":
                return 400, _error_list("INVALIDJOBSTATE", f"Job is not Open (state {job.state})"), {}
            job.data.append(body)
            return 201, None, {}
        if (
            len(tail) == 1
            and tail[0] in ("successfulResults", "failedResults", "unprocessedrecords")
            and method == "GET"
        ):
            if job.state not in ("JobComplete", "Aborted", "Failed"):
                return 400, _error_list("INVALIDJOBSTATE", "Results are available once the job is complete"), {}
            return 200, job.results_csv(tail[0]), {"Content-Type": "text/csv"}
        return 405, _error_list("METHOD_NOT_ALLOWED", f"HTTP Method '{method}' not allowed."), {}

    def _create_job(self, spec: dict[str, Any], version: str) -> tuple[int, Any, dict[str, str]]:
        sobject = self._sobject(spec.get("object", ""))
        operation = spec.get("operation")
        if sobject is None:
            return 400, _error_list("INVALIDJOB", f"InvalidJob : Unable to find object: {spec.get('object')}"), {}
        if operation not in bulk.OPERATIONS:
            return 400, _error_list("INVALIDJOB", f"InvalidJob : Invalid operation: {operation}"), {}
        ext = spec.get("externalIdFieldName")
        if operation == "upsert" and ext not in (*sobject.external_ids, "Id"):
            return (
                400,
                _error_list(
                    "INVALIDJOB",
                    f"InvalidJob : Field name provided, {ext} is not an External ID or indexed field for {sobject.name}",
                ),
                {},
            )
        delimiter = bulk.DELIMITERS.get(spec.get("columnDelimiter", "COMMA"))
        if delimiter is None or spec.get("contentType", "CSV") != "CSV":
            return (
                400,
                _error_list("INVALIDJOB", "InvalidJob : contentType must be CSV with a supported columnDelimiter"),
                {},
            )
        job = bulk.IngestJob(
            id=f"750Dp{next(self.org.counter):010d}AAA",
            object=sobject.name,
            operation=operation,
            external_id_field=ext if operation == "upsert" else None,
            delimiter=delimiter,
            line_ending=spec.get("lineEnding", "LF"),
            created=sf_datetime(self.clock()),
            api_version=version,
        )
        self.jobs[job.id] = job
        return 200, job.info(), {}


def _fields(payload: Any) -> dict[str, Any]:
    return {k: v for k, v in (payload or {}).items() if k != "attributes"}


def _error_list(code: str, message: str, fields: list[str] | None = None) -> list[dict[str, Any]]:
    item: dict[str, Any] = {"message": message, "errorCode": code}
    if fields is not None:
        item["fields"] = fields
    return [item]


def _as_rest_error(problem: dict[str, Any]) -> dict[str, Any]:
    return {"message": problem["message"], "errorCode": problem["statusCode"], "fields": problem["fields"]}


def _errors(status: int, code: str, message: str) -> web.Response:
    return json_response(_error_list(code, message), status=status)


def _failure(problem: dict[str, Any]) -> dict[str, Any]:
    return {"success": False, "errors": [problem]}


def _rolled_back() -> dict[str, Any]:
    return _failure(
        error(
            "ALL_OR_NONE_OPERATION_ROLLED_BACK",
            "Record rolled back because not all records were valid and the request was using AllOrNone header",
        )
    )


def _composite_answer(status: int, body: Any, reference: str) -> dict[str, Any]:
    return {"body": body, "httpHeaders": {}, "httpStatusCode": status, "referenceId": reference}


def _substitute(text: str, references: dict[str, Any]) -> str:
    def value(match: re.Match[str]) -> str:
        ref, _, path = match.group(1).partition(".")
        found: Any = references.get(ref, {})
        for key in path.split(".") if path else []:
            found = found.get(key) if isinstance(found, dict) else None
        return str(found) if found is not None else match.group(0)

    return re.sub(r"@\{([\w.]+)\}", value, text)


def _respond(status: int, body: Any, headers: dict[str, str]) -> web.Response:
    if body is None:
        return web.Response(status=status)
    if isinstance(body, str):
        return web.Response(status=status, text=body, content_type=headers.get("Content-Type", "text/plain"))
    return json_response(body, status=status)
