"""A local Zoho CRM (API v8): OAuth refresh tokens, upsert with duplicate check fields, search, credits.

Token: ``POST /oauth/v2/token`` with ``grant_type=refresh_token``, client id and secret and a known refresh
token (query string or form) answers ``{access_token, api_domain, token_type, expires_in}``; a bad client or
refresh token is ``{"error": "invalid_client"}`` / ``{"error": "invalid_code"}`` with HTTP 200, as Zoho
answers. API calls carry ``Authorization: Zoho-oauthtoken <token>``; anything else is 401 ``INVALID_TOKEN``.

Modules: Leads, Contacts, Accounts, Cases, Deals, Tasks, Campaigns (members through the related-list
API: see `related`). ``POST /crm/v8/<Module>/upsert`` takes at most 100
records; each is matched on the first of ``duplicate_check_fields`` (default: the module's system unique
fields) that it carries and answers its own ``{code, details, message, status}`` (``SUCCESS`` with
``action`` insert/update, ``MANDATORY_NOT_FOUND``, ``INVALID_DATA`` naming ``api_name`` and ``json_path``).
HTTP status: 200 all written, 207 some written, 400 none written.

Credits: every call costs `credit_costs[operation]` (default 1) against `daily_credits` over a rolling
24 hours, deducted when it arrives - before the fault injector, so a call that then meets an injected fault
(a 429, a 5xx, a timeout, an answer lost after the write) was paid for, as in Zoho; past the credits the call
is refused with 429 ``LIMIT_REACHED``, changes nothing and costs nothing.

Inbound: ``GET /crm/v8/<Module>?fields=...`` with ``If-Modified-Since`` lists what changed since (304 when
nothing did), ``sort_by`` (id, Created_Time, Modified_Time) and ``sort_order`` (desc by default), ``ids``
(at most 100) and ``page`` / ``per_page``; ``info.next_page_token`` continues the same listing with
``page_token`` (a snapshot taken at the first page, as Zoho requires past 2,000 records); search takes
``(Modified_Time:greater_than:<iso>)``. `user_update` / `user_create` act
as a Zoho user; with `commit_after` seconds the write's ``Modified_Time`` is when it was made, but listings
and searches find it only that much later (as it was before until then; a new record: not at all) - a
write committed late, behind records a poller's cursor passed.

Also: Update Records (``PUT /crm/v8/<Module>``: by id, never creating one; an unknown id answers
``INVALID_DATA``), and the Query API (``POST /crm/v8/coql``: ``select ... from ... where`` with ``=``,
``in``, ``is [not] null``, ``limit`` / ``offset``; see `coql`).

Merge Records (``POST /crm/v8/<Module>/<master id>/actions/merge``, body ``{"merge": [{"data": [{"id":
<child>, "_fields": [{"api_name": ...}]}]}]}``: Leads, Contacts, Accounts, Deals): up to two child records are
merged into the master - it keeps its id and values, takes each child's fields named in ``_fields``, and its
``Modified_Time`` moves; the lookups naming a child (a Case's ``Related_To``, a Deal's ``Contact_Name``, a
Task's ``Who_Id``) are moved to the master; each child is deleted permanently (not to the recycle bin, as
Zoho's merge does: the merge shows in the master's timeline and the audit log), listed by ``GET
/crm/v8/<Module>/deleted`` with ``type`` permanent (``type`` all, recycle or permanent;
``If-Modified-Since``: ``id``, ``display_name``, ``type``, ``deleted_by``, ``deleted_time`` - nothing naming
the master it was merged into); a record deleted otherwise goes to the recycle bin (``type`` recycle). A
read by a deleted record's id answers 204 as for any record no longer there. `user_merge` is the same merge
made in the UI.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
from collections import deque
from typing import Any

import orjson
from aiohttp import web

from cdp_crm_emulators._server import Emulator, Records, json_response, new_id
from cdp_crm_emulators.zoho import coql, related
from cdp_crm_emulators.zoho.criteria import parse_time, search_predicate
from cdp_crm_emulators.zoho.modules import SYSTEM, Module, default_modules

UPSERT_LIMIT = 100
MERGEABLE = ("Leads", "Contacts", "Accounts", "Deals")  # the modules Merge Records takes (and custom ones)
PAGE_LIMIT = 200
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_USER = {"name": "Local Admin", "id": "5725767000000411001", "email": "admin@example.com"}


class ZohoEmulator(Emulator):
    name = "zoho"

    def __init__(
        self,
        *,
        client_id: str = "1000.LOCALZOHOCLIENT",
        client_secret: str = "local-zoho-secret",
        refresh_tokens: set[str] | None = None,
        daily_credits: int = 50_000,
        credit_costs: dict[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.client_id = client_id
        self.client_secret = client_secret
        self.refresh_tokens = refresh_tokens if refresh_tokens is not None else {"1000.local-refresh-token"}
        self.daily_credits = daily_credits
        self.credit_costs = {"upsert": 1, "search": 1, "get": 1, "token": 0, **(credit_costs or {})}
        self.modules = default_modules()
        self.store = Records({name: m.unique for name, m in self.modules.items()})
        self.tokens: set[str] = set()
        self._ids = itertools.count(5725767000000500001)
        self._credits: deque[tuple[float, int]] = deque()
        self._used = 0
        self._refused = 0
        self._listings: dict[str, list[dict[str, Any]]] = {}  # page_token -> the listing's remaining rows
        # A write committed late (`commit_after`): (module, id) -> (commit time, the record as listings see it
        # until then, None for a record not there before).
        self._in_flight: dict[tuple[str, str], tuple[float, dict[str, Any] | None]] = {}
        # The recycle bin: module -> id -> what the deleted records listing shows of it.
        self.recycled: dict[str, dict[str, dict[str, Any]]] = {}
        r = self.app.router
        r.add_post("/oauth/v2/token", self._token)
        r.add_get("/crm/v8/users", self._users)
        r.add_get("/crm/v8/org", self._org)
        r.add_get("/crm/v8/settings/modules", self._settings_modules)
        r.add_get("/crm/v8/settings/fields", self._settings_fields)
        r.add_post("/crm/v8/coql", self._coql)
        r.add_post("/crm/v8/{module}/upsert", self._upsert)
        r.add_put("/crm/v8/{module}", self._update)
        r.add_delete("/crm/v8/{module}", self._delete)
        r.add_get("/crm/v8/{module}/search", self._search)
        r.add_get("/crm/v8/{module}/deleted", self._deleted)
        r.add_post("/crm/v8/{module}/{id}/actions/merge", self._merge)
        r.add_get("/crm/v8/{module}", self._list)
        r.add_get("/crm/v8/{module}/{id}", self._get)
        r.add_put("/crm/v8/{module}/{id}/{related}", self._relate)
        r.add_delete("/crm/v8/{module}/{id}/{related}", self._delink)
        r.add_get("/crm/v8/{module}/{id}/{related}", self._related)

    # --- inspection ------------------------------------------------------------------------------

    def records(self, obj: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self.store.objects.get(obj, {}).values()]

    def find(self, module: str, fld: str, value: Any) -> dict[str, Any] | None:
        record_id = self.store.find(module, fld, value)
        return None if record_id is None else dict(self.store.objects[module][record_id])

    def budget(self) -> dict[str, Any]:
        self._roll()
        return {"daily_credits": self.daily_credits, "credits_used": self._used, "refused": self._refused}

    def state(self) -> dict[str, Any]:
        return {"objects": self.store.objects, "recycled": self.recycled, "next_id": next(self._ids)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.store.restore(state.get("objects", {}))
        self.recycled = state.get("recycled", {})
        self._ids = itertools.count(state.get("next_id", 5725767000000500001))

    # --- the CRM user's side (inbound) -----------------------------------------------------------

    def user_create(self, module: str, values: dict[str, Any], *, commit_after: float = 0.0) -> dict[str, Any]:
        record_id = self._write(module, None, values)
        if commit_after > 0:
            self._in_flight[(module, record_id)] = (self.clock() + commit_after, None)
        return dict(self.store.objects[module][record_id])

    def user_update(
        self, module: str, record_id: str, values: dict[str, Any], *, commit_after: float = 0.0
    ) -> dict[str, Any]:
        held = self.store.objects.get(module, {}).get(record_id)
        before = dict(held) if held is not None else None
        self._write(module, record_id, values)
        if commit_after > 0:
            flight = self._in_flight.get((module, record_id))
            self._in_flight[(module, record_id)] = (self.clock() + commit_after, flight[1] if flight else before)
        return dict(self.store.objects[module][record_id])

    def _committed(self, module: str) -> list[dict[str, Any]]:
        """The module's records as listings and searches see them now: a write not committed yet
        (`commit_after`) shows the record as it was before it (a new record: not at all)."""
        now = self.clock()
        seen = []
        for record_id, record in self.store.objects.get(module, {}).items():
            flight = self._in_flight.get((module, record_id))
            if flight is not None:
                if now < flight[0]:
                    if flight[1] is not None:
                        seen.append(flight[1])
                    continue
                del self._in_flight[(module, record_id)]
            seen.append(record)
        return seen

    def user_delete(self, module: str, record_id: str) -> None:
        self._recycle(module, record_id)

    def user_merge(
        self, module: str, master: str, children: str | list[str], take: dict[str, list[str]] | None = None
    ) -> dict[str, Any]:
        """A user merges `children` (one or two) into `master` (module docstring), taking the fields `take`
        names per child from that child; the master as it is after."""
        children = [children] if isinstance(children, str) else list(children)
        problem = self._merge_records(module, master, children, take or {})
        if problem is not None:
            raise ValueError(problem["message"])
        return dict(self.store.objects[module][master])

    def _merge_records(
        self, module: str, master: str, children: list[str], take: dict[str, list[str]]
    ) -> dict[str, Any] | None:
        """The merge, or the error it meets (nothing changed then)."""
        table = self.store.objects.get(module, {})
        if module not in MERGEABLE:
            return _record_error("INVALID_MODULE", "the module name given seems to be invalid", {})
        if master not in table:
            return _record_error("INVALID_DATA", "Specified master record ID is invalid", {"id": master})
        if not 1 <= len(children) <= 2 or master in children or any(c not in table for c in children):
            return _record_error("INVALID_DATA", "the child record ids given are invalid", {"api_name": "id"})
        values: dict[str, Any] = {}
        for child in children:
            values.update({name: table[child].get(name) for name in take.get(child, [])})
        for other, rows in self.store.objects.items():  # the children's related records follow the master
            for record_id, record in list(rows.items()):
                moved = {
                    k: {**v, "id": master} for k, v in record.items() if isinstance(v, dict) and v.get("id") in children
                }
                if moved:
                    self.store.put(other, record_id, {**record, **moved})
        for child in children:
            self._recycle(module, child, kind="permanent")
        self._write(module, master, values)
        return None

    def _recycle(self, module: str, record_id: str, kind: str = "recycle") -> None:
        """Delete a record: to the recycle bin (`kind` recycle) or for good (permanent, a merge's children)."""
        record = self.store.delete(module, record_id)
        if record is not None:
            when = dt.datetime.fromtimestamp(self.clock(), dt.UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")
            name = (
                record.get("Full_Name") or record.get("Last_Name") or record.get("Deal_Name") or record.get("Subject")
            )
            self.recycled.setdefault(module, {})[record_id] = {
                "id": record_id, "display_name": name, "type": kind, "deleted_by": _USER, "deleted_time": when,
            }  # fmt: skip

    # --- auth and credits ------------------------------------------------------------------------

    def is_api(self, request: web.Request) -> bool:
        return request.path.startswith("/crm/")

    def error_response(self, status: int, request: web.Request) -> web.Response:
        if status == 429:
            return _error(429, "TOO_MANY_REQUESTS", "Maximum concurrency limit reached", {})
        return _error(status, "INTERNAL_ERROR" if status >= 500 else "INVALID_REQUEST", "injected fault", {})

    def _roll(self) -> None:
        horizon = self.clock() - 86400
        while self._credits and self._credits[0][0] <= horizon:
            self._used -= self._credits.popleft()[1]

    async def _token(self, request: web.Request) -> web.Response:
        params = {**request.query, **(await request.post())}
        if params.get("grant_type") != "refresh_token":
            return json_response({"error": "unsupported_grant_type"})
        if params.get("client_id") != self.client_id or params.get("client_secret") != self.client_secret:
            return json_response({"error": "invalid_client"})
        if params.get("refresh_token") not in self.refresh_tokens:
            return json_response({"error": "invalid_code"})
        token = f"1000.{new_id()}.{new_id()[:16]}"
        self.tokens.add(token)
        return json_response(
            {
                "access_token": token,
                "scope": "ZohoCRM.modules.ALL",
                "api_domain": self.base_url,
                "token_type": "Bearer",
                "expires_in": 3600,
            }
        )

    def admit(self, request: web.Request) -> web.Response | None:
        """The OAuth token, then the call's credits (before the fault injector: Zoho deducts a call's credits
        when it arrives, so one that meets a 429, a 5xx, a timeout or a lost answer was paid for; one refused
        here costs nothing)."""
        operation = _operation(request)
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Zoho-oauthtoken "):
            return _error(401, "AUTHENTICATION_FAILURE", "Authentication failed", {})
        if auth.split(" ", 1)[1] not in self.tokens:
            return _error(401, "INVALID_TOKEN", "invalid oauth token", {})
        self._roll()
        cost = self.credit_costs.get(operation, 1)
        if self._used + cost > self.daily_credits:
            self._refused += 1
            return _error(
                429, "LIMIT_REACHED", "API credits exhausted for the 24 hour window", {"limit": self.daily_credits}
            )
        self._credits.append((self.clock(), cost))
        self._used += cost
        return None

    def _module(self, request: web.Request) -> Module:
        module = self.modules.get(request.match_info["module"])
        if module is None:
            raise web.HTTPBadRequest(
                text=orjson.dumps(
                    {
                        "code": "INVALID_MODULE",
                        "details": {"resource_path_index": 0},
                        "message": "the module name given seems to be invalid",
                        "status": "error",
                    }
                ).decode(),
                content_type="application/json",
            )
        return module

    # --- writes ----------------------------------------------------------------------------------

    def _duplicate(self, module, record: dict, index: int, own_id: str | None) -> dict | None:
        """Zoho's DUPLICATE_DATA for the first unique field another record already holds."""
        for name in module.unique:
            value = record.get(name)
            holder = self.store.find(module.name, name, value) if value not in (None, "") else None
            if holder is not None and holder != own_id:
                return _record_error(
                    "DUPLICATE_DATA",
                    "duplicate data",
                    {"api_name": name, "json_path": f"$.data[{index}].{name}", "duplicate_record": {"id": holder}},
                )
        return None

    def _problem(self, module: Module, record: dict[str, Any], index: int, creating: bool) -> dict[str, Any] | None:
        for name, value in record.items():
            if name in SYSTEM:
                continue
            if name not in module.fields:
                return _record_error(
                    "INVALID_DATA", "invalid data", {"api_name": name, "json_path": f"$.data[{index}].{name}"}
                )
            if module.fields[name] == "email" and value not in (None, "") and not _EMAIL.match(str(value)):
                return _record_error(
                    "INVALID_DATA",
                    "invalid data",
                    {"expected_data_type": "email", "api_name": name, "json_path": f"$.data[{index}].{name}"},
                )
            if module.fields[name] == "double" and value is not None:
                try:
                    float(value)
                except (TypeError, ValueError):
                    return _record_error(
                        "INVALID_DATA",
                        "invalid data",
                        {"expected_data_type": "double", "api_name": name, "json_path": f"$.data[{index}].{name}"},
                    )
        if creating:
            for name in module.required:
                if record.get(name) in (None, ""):
                    return _record_error(
                        "MANDATORY_NOT_FOUND",
                        "required field not found",
                        {"api_name": name, "json_path": f"$.data[{index}].{name}"},
                    )
        if (message := self.faults.rejection_for(module.name, record)) is not None:
            return _record_error("INVALID_DATA", message, {"api_name": "id", "json_path": f"$.data[{index}]"})
        return None

    def _write(self, module_name: str, record_id: str | None, values: dict[str, Any]) -> str:
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")
        if record_id is None:
            record_id = str(next(self._ids))
            record: dict[str, Any] = {"id": record_id, "Created_Time": now, "Created_By": _USER, "Owner": _USER}
        else:
            record = dict(self.store.objects[module_name][record_id])
        record.update({k: v for k, v in values.items() if k not in SYSTEM})
        record.update(Modified_Time=now, Modified_By=_USER)
        self.store.put(module_name, record_id, record)
        return record_id

    async def _upsert(self, request: web.Request) -> web.Response:
        module = self._module(request)
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "INVALID_DATA", "body is not valid JSON", {})
        data = body.get("data")
        if not isinstance(data, list) or not data:
            return _error(
                400, "MANDATORY_NOT_FOUND", "required field not found", {"api_name": "data", "json_path": "$.data"}
            )
        if len(data) > UPSERT_LIMIT:
            return _error(
                400,
                "LIMIT_EXCEEDED",
                f"Maximum of {UPSERT_LIMIT} records can be upserted in a single call",
                {"limit": UPSERT_LIMIT},
            )
        checks = body.get("duplicate_check_fields") or list(module.default_duplicate_check)
        for name in checks:
            if name not in module.unique:
                return _error(
                    400,
                    "INVALID_DATA",
                    "invalid data",
                    {"api_name": "duplicate_check_fields", "json_path": "$.duplicate_check_fields"},
                )
        results = []
        for index, record in enumerate(data):
            match_field, existing = (
                None,
                record.get("id") if record.get("id") in self.store.objects.get(module.name, {}) else None,
            )
            for name in checks:
                if existing is None and record.get(name) not in (None, ""):
                    found = self.store.find(module.name, name, record[name])
                    if found is not None:
                        match_field, existing = name, found
            problem = self._problem(module, record, index, creating=existing is None)
            if problem is None:
                problem = self._duplicate(module, record, index, existing)
            if problem is not None:
                results.append(problem)
                continue
            record_id = self._write(module.name, existing, record)
            stored = self.store.objects[module.name][record_id]
            results.append(
                {
                    "code": "SUCCESS",
                    "duplicate_field": match_field,
                    "action": "insert" if existing is None else "update",
                    "details": {
                        k: stored[k] for k in ("Modified_Time", "Modified_By", "Created_Time", "id", "Created_By")
                    },
                    "message": "record added" if existing is None else "record updated",
                    "status": "success",
                }
            )
        written = sum(1 for r in results if r["status"] == "success")
        status = 200 if written == len(results) else 207 if written else 400
        return json_response({"data": results}, status=status)

    async def _update(self, request: web.Request) -> web.Response:
        """Update Records: ``PUT /crm/v8/<Module>`` with ``{"data": [{"id", ...}]}`` (100 at most) changes the
        records these ids name and never creates one: an id no record has answers ``INVALID_DATA`` (api_name
        id), a mandatory field emptied ``MANDATORY_NOT_FOUND``; each record answers on its own, as in upsert."""
        module = self._module(request)
        try:
            data = orjson.loads(await request.read()).get("data")
        except (orjson.JSONDecodeError, AttributeError):
            return _error(400, "INVALID_DATA", "body is not valid JSON", {})
        if not isinstance(data, list) or not data:
            return _error(
                400, "MANDATORY_NOT_FOUND", "required field not found", {"api_name": "data", "json_path": "$.data"}
            )
        if len(data) > UPSERT_LIMIT:
            return _error(400, "LIMIT_EXCEEDED", "the data exceeds the limit", {"limit": UPSERT_LIMIT})
        results = []
        for index, record in enumerate(data):
            record_id = str(record.get("id", "")) if isinstance(record, dict) else ""
            if self.store.get(module.name, record_id) is None:
                results.append(
                    _record_error(
                        "INVALID_DATA",
                        "the id given seems to be invalid",
                        {"api_name": "id", "json_path": f"$.data[{index}].id"},
                    )
                )
                continue
            problem = self._problem(module, record, index, creating=False)
            emptied = [n for n in module.required if n in record and record[n] in (None, "")]
            if problem is None and emptied:
                problem = _record_error(
                    "MANDATORY_NOT_FOUND",
                    "required field not found",
                    {"api_name": emptied[0], "json_path": f"$.data[{index}].{emptied[0]}"},
                )
            if problem is None:
                problem = self._duplicate(module, record, index, record_id)
            if problem is not None:
                results.append(problem)
                continue
            self._write(module.name, record_id, record)
            stored = self.store.objects[module.name][record_id]
            details = {k: stored[k] for k in ("Modified_Time", "Modified_By", "Created_Time", "id", "Created_By")}
            results.append({"code": "SUCCESS", "details": details, "message": "record updated", "status": "success"})
        written = sum(1 for r in results if r["status"] == "success")
        return json_response({"data": results}, status=200 if written == len(results) else 207 if written else 400)

    async def _coql(self, request: web.Request) -> web.Response:
        """The Query API: see `coql`."""
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "INVALID_DATA", "body is not valid JSON", {})
        query = body.get("select_query") if isinstance(body, dict) else None
        if not isinstance(query, str) or not query.strip():
            return _error(
                400, "REQUIRED_PARAM_MISSING", "One of the expected parameter is missing", {"param": "select_query"}
            )
        try:
            rows, more = coql.run(query, self.modules, lambda name: self.store.objects.get(name, {}).values())
        except coql.QueryError as exc:
            return _error(400, exc.code, exc.message, exc.details)
        except ValueError:
            return _error(400, "SYNTAX_ERROR", "error occured while parsing the query", {})
        if not rows:
            return web.Response(status=204)
        return json_response({"data": rows, "info": {"count": len(rows), "more_records": more}})

    # --- metadata (what the Zoho SDK reads before it writes) --------------------------------------

    async def _users(self, request: web.Request) -> web.Response:
        user = {
            **_USER,
            "full_name": _USER["name"],
            "status": "active",
            "role": {"name": "CEO", "id": "1"},
            "profile": {"name": "Administrator", "id": "1"},
        }
        return json_response({"users": [user], "info": {"per_page": 200, "count": 1, "page": 1, "more_records": False}})

    async def _org(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "org": [
                    {
                        "id": "5725767000000021001",
                        "zgid": "700000001",
                        "company_name": "Local CRM",
                        "primary_email": _USER["email"],
                    }
                ]
            }
        )

    async def _settings_modules(self, request: web.Request) -> web.Response:
        modules = [
            {
                "api_name": m.name,
                "module_name": m.name,
                "plural_label": m.name,
                "singular_label": m.name.rstrip("s"),
                "api_supported": True,
                "id": str(5725767000000002000 + n),
                "generated_type": "default",
            }
            for n, m in enumerate(self.modules.values())
        ]
        return json_response({"modules": modules})

    async def _settings_fields(self, request: web.Request) -> web.Response:
        module = self.modules.get(request.query.get("module", ""))
        if module is None:
            return _error(400, "INVALID_MODULE", "the module name given seems to be invalid", {"param_name": "module"})
        lookups = {"Account_Name": "Accounts", "Related_To": "Contacts", "Who_Id": "Contacts"}
        fields = []
        for n, (name, kind) in enumerate(module.fields.items()):
            described: dict[str, Any] = {
                "api_name": name,
                "field_label": name.replace("_", " "),
                "data_type": kind,
                "json_type": {"boolean": "boolean", "double": "double", "lookup": "jsonobject"}.get(kind, "string"),
                "id": str(5725767000000003000 + n),
                "system_mandatory": name in module.required,
                "custom_field": name.startswith("CDP_") or name in ("Churn_Risk", "Fraud_Score", "Lifetime_Value"),
                "read_only": False,
                "length": 255,
            }
            if name in module.unique:
                described["unique"] = {"casesensitive": "false"}
            if kind == "lookup":
                described["lookup"] = {
                    "module": {"api_name": lookups.get(name, "Contacts"), "id": "5725767000000002001"}
                }
            fields.append(described)
        return json_response({"fields": fields})

    # --- reads -----------------------------------------------------------------------------------

    async def _search(self, request: web.Request) -> web.Response:
        module = self._module(request)
        query = request.query
        try:
            predicate = search_predicate(query, module)
        except ValueError as exc:
            return _error(400, "INVALID_QUERY", str(exc), {"api_name": "criteria"})
        if predicate is None:
            return _error(
                400, "REQUIRED_PARAM_MISSING", "One of the expected parameter is missing", {"param": "criteria"}
            )
        rows = [r for r in self.store.objects.get(module.name, {}).values() if predicate(r)]
        return _page(rows, query)

    async def _list(self, request: web.Request) -> web.Response:
        module = self._module(request)
        if "fields" not in request.query:
            return _error(
                400, "REQUIRED_PARAM_MISSING", "One of the expected parameter is missing", {"param": "fields"}
            )
        fields = request.query["fields"].split(",")
        unknown = [f for f in fields if f not in module.fields and f not in SYSTEM]
        if unknown:
            return _error(400, "INVALID_DATA", "invalid data", {"api_name": unknown[0]})
        token = request.query.get("page_token")
        if token is not None:
            if token not in self._listings:
                return _error(400, "INVALID_DATA", "invalid data", {"api_name": "page_token"})
            return self._listing_page(self._listings.pop(token), request.query)
        rows = self._committed(module.name)
        if "ids" in request.query:
            ids = request.query["ids"].split(",")
            if len(ids) > 100:
                return _error(400, "LIMIT_EXCEEDED", "the ids exceed the limit", {"limit": 100})
            rows = [r for r in rows if r["id"] in ids]
        since = request.headers.get("If-Modified-Since")
        if since:
            threshold = parse_time(since)
            rows = [r for r in rows if parse_time(r["Modified_Time"]) > threshold]
            if not rows:
                return web.Response(status=304)
        sort_by = request.query.get("sort_by", "id")
        if sort_by in ("Modified_Time", "Created_Time", "id"):
            descending = request.query.get("sort_order", "desc") == "desc"
            if sort_by == "id":
                rows.sort(key=lambda r: int(r["id"]), reverse=descending)
            else:
                rows.sort(key=lambda r: (parse_time(r[sort_by]), int(r["id"])), reverse=descending)
        rows = [{k: r.get(k) for k in ["id", *fields]} for r in rows]
        if request.query.get("page", "1") != "1":
            return _page(rows, request.query)
        return self._listing_page(rows, request.query)

    def _listing_page(self, rows: list[dict[str, Any]], query: Any) -> web.Response:
        """The first page of a listing, or the one a page_token continues; the rest stays behind a token."""
        per_page = min(int(query.get("per_page", PAGE_LIMIT)), PAGE_LIMIT)
        chunk, rest = rows[:per_page], rows[per_page:]
        if not chunk:
            return web.Response(status=204)
        info: dict[str, Any] = {"per_page": per_page, "count": len(chunk), "more_records": bool(rest)}
        info["page"] = int(query.get("page", 1)) if "page_token" not in query else None
        if rest:
            token = new_id()
            self._listings[token] = rest
            info["next_page_token"] = token
            info["page_token_expiry"] = dt.datetime.fromtimestamp(self.clock() + 86_400, dt.UTC).isoformat()
        return json_response({"data": chunk, "info": info})

    def campaign_members(self, campaign_id: str, module: str = "Contacts") -> list[str]:
        """The ids of the records a campaign's related list holds."""
        return related.members(self.store, campaign_id, module)

    def _related_list(self, request: web.Request) -> tuple[str, str, web.Response | None]:
        """(campaign id, related module) of a related-list request, or the answer refusing it."""
        module = self._module(request)
        campaign_id, related_module = request.match_info["id"], request.match_info["related"]
        if not related.supported(module.name, related_module):
            return "", "", _error(400, "INVALID_DATA", "the related list given seems to be invalid", {})
        if self.store.get(module.name, campaign_id) is None:
            return "", "", _error(400, "INVALID_DATA", "the id given seems to be invalid", {"id": campaign_id})
        return campaign_id, related_module, None

    async def _relate(self, request: web.Request) -> web.Response:
        campaign_id, related_module, refused = self._related_list(request)
        if refused is not None:
            return refused
        data = (orjson.loads(await request.read() or b"{}")).get("data") or []
        if len(data) > related.LIMIT:
            return _error(400, "LIMIT_EXCEEDED", "the data exceeds the limit", {"limit": related.LIMIT})
        answers = related.relate(self.store, campaign_id, related_module, data)
        ok = sum(a["status"] == "success" for a in answers)
        return json_response({"data": answers}, status=200 if ok == len(answers) else 207 if ok else 400)

    async def _delink(self, request: web.Request) -> web.Response:
        campaign_id, related_module, refused = self._related_list(request)
        if refused is not None:
            return refused
        ids = [i for i in request.query.get("ids", "").split(",") if i]
        if not ids or len(ids) > related.LIMIT:
            return _error(400, "INVALID_DATA", "ids: 1 to 100 ids", {"param": "ids"})
        answers = related.delink(self.store, campaign_id, related_module, ids)
        ok = sum(a["status"] == "success" for a in answers)
        return json_response({"data": answers}, status=200 if ok == len(answers) else 207 if ok else 400)

    async def _related(self, request: web.Request) -> web.Response:
        campaign_id, related_module, refused = self._related_list(request)
        if refused is not None:
            return refused
        rows = [self.store.get(related_module, i) for i in related.members(self.store, campaign_id, related_module)]
        return _page([dict(r) for r in rows if r is not None], request.query)

    async def _merge(self, request: web.Request) -> web.Response:
        module = self._module(request)
        try:
            body = orjson.loads(await request.read())
            (merge,) = body["merge"]
            data = list(merge["data"])
            children = [str(d["id"]) for d in data]
            take = {str(d["id"]): [f["api_name"] for f in d.get("_fields", [])] for d in data}
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return _error(400, "INVALID_DATA", "invalid data", {"api_name": "merge"})
        master = request.match_info["id"]
        problem = self._merge_records(module.name, master, children, take)
        if problem is not None:
            return json_response(problem, status=400)
        done = {"code": "SUCCESS", "details": {"id": master}, "message": "records merged", "status": "success"}
        return json_response({"merge": [done]})

    async def _deleted(self, request: web.Request) -> web.Response:
        module = self._module(request)
        kind = request.query.get("type", "all")
        rows = [r for r in self.recycled.get(module.name, {}).values() if kind in ("all", r["type"])]
        since = request.headers.get("If-Modified-Since")
        if since:
            rows = [r for r in rows if parse_time(r["deleted_time"]) > parse_time(since)]
        return _page(rows, request.query)

    async def _get(self, request: web.Request) -> web.Response:
        module = self._module(request)
        record = self.store.get(module.name, request.match_info["id"])
        if record is None:
            return web.Response(status=204)
        return json_response({"data": [record]})

    async def _delete(self, request: web.Request) -> web.Response:
        """``DELETE /crm/v8/<Module>?ids=a,b`` (at most 100): each id answers ``SUCCESS`` or, when no record
        has it (never there, or deleted already), ``INVALID_DATA``."""
        module = self._module(request)
        ids = [i for i in request.query.get("ids", "").split(",") if i]
        if not ids:
            return _error(400, "REQUIRED_PARAM_MISSING", "One of the expected parameter is missing", {"param": "ids"})
        if len(ids) > UPSERT_LIMIT:
            return _error(400, "LIMIT_EXCEEDED", "the ids exceed the limit", {"limit": UPSERT_LIMIT})
        data = []
        for record_id in ids:
            if record_id not in self.store.objects.get(module.name, {}):
                data.append(
                    _record_error("INVALID_DATA", "the related id given seems to be invalid", {"id": record_id})
                )
            else:
                self._recycle(module.name, record_id)
                data.append(
                    {"code": "SUCCESS", "details": {"id": record_id}, "message": "record deleted", "status": "success"}
                )
        ok = sum(item["status"] == "success" for item in data)
        return json_response({"data": data}, status=200 if ok == len(data) else 207 if ok else 400)


def _operation(request: web.Request) -> str:
    """What a call is for `credit_costs`: writes (upsert, relating a record) are ``upsert``, deletions (records,
    related-list links) ``delete``, ``<Module>/search`` and the Query API (``coql``) ``search``, every other read
    ``get``."""
    if request.method == "DELETE":
        return "delete"
    if request.method in ("POST", "PUT", "PATCH") and not request.path.endswith("/coql"):
        return "upsert"
    return "search" if request.path.endswith(("/search", "/coql")) else "get"


def _page(rows: list[dict[str, Any]], query: Any) -> web.Response:
    per_page = min(int(query.get("per_page", PAGE_LIMIT)), PAGE_LIMIT)
    page = max(1, int(query.get("page", 1)))
    chunk = rows[(page - 1) * per_page : page * per_page]
    if not chunk:
        return web.Response(status=204)
    info = {"per_page": per_page, "count": len(chunk), "page": page, "more_records": page * per_page < len(rows)}
    return json_response({"data": chunk, "info": info})


def _record_error(code: str, message: str, details: dict[str, Any]) -> dict[str, Any]:
    return {"code": code, "details": details, "message": message, "status": "error"}


def _error(status: int, code: str, message: str, details: dict[str, Any]) -> web.Response:
    return json_response(_record_error(code, message, details), status=status)
