"""A local Dynamics 365 / Dataverse: Entra ID client-credentials tokens and the Web API ``/api/data/v9.2/``.

Token: ``POST /{tenant}/oauth2/v2.0/token`` (grant_type=client_credentials, scope ``<resource>/.default``)
in Microsoft Entra ID's shape (AADSTS error codes), with OpenID discovery at
``/{tenant}/v2.0/.well-known/openid-configuration`` so msal's ConfidentialClientApplication works against it
(over TLS, with instance discovery off since this host is not a Microsoft cloud).

Entity sets: contacts (alternate keys ``emailaddress1`` and ``cdp_id``), accounts (``cdp_id``), incidents,
opportunities and tasks (``cdp_idempotencykey``), marketing lists (``lists``: members added with
``AddMemberList``, removed through ``listcontact_association``; see `lists`); ``statecode`` as Dataverse uses it (0 open/active; 1
resolved, won, completed; 2 cancelled, lost). ``PATCH <set>(<key>)`` upserts: 204 with ``OData-EntityId``; ``If-Match: *``
makes it update-only (404 when missing), ``If-None-Match: *`` create-only (412 when present), ``If-Match:
W/"<version>"`` updates only that version (412 otherwise). Lookups bind with ``<nav>@odata.bind`` to
``/<set>(<id or key>)``. Unknown properties fail with 0x80060888; errors are ``{"error": {"code", "message"}}``.
Table definitions (``EntityDefinitions``: attributes with their RequiredLevel, alternate keys, many-to-one
relationships) are derived from the same entity sets, so what it describes is what it holds rows to; see
`metadata`.

``$batch`` (multipart/mixed): requests outside change sets run one by one; a change set is all or nothing -
on the first failure it is rolled back and answered by that failure alone. ``Content-ID`` references
(``$1``) point at an entity created earlier in the same change set.

Service protection: `window_limit` requests per sliding `window_seconds` (6000 / 300 s) per caller; past it
429 with error 0x80072322 and ``Retry-After`` (seconds until a slot frees), changing nothing and counting
nothing more. A ``$batch`` counts as one request. A request is counted when it arrives, before the fault
injector, so one that meets an injected fault (a 5xx, a 429, a timeout, an answer lost after the write) took
its place in the window, as in Dataverse.

Inbound: ``Prefer: odata.track-changes`` on a collection GET returns ``@odata.deltaLink``; following it
returns what changed since (``$deletedEntity`` entries for deletions), each record once at its latest
version; with ``odata.maxpagesize`` the changes come in pages (``@odata.nextLink``) and only the last page
carries the next ``@odata.deltaLink``, taken when the delta was read (a change made while paging is in
the next delta, never lost). A delta token is ``<version>!<issue>``; `expire_change_tracking` makes every
token issued so far expired, as when the organisation's ExpireChangeTrackingInDays passed: following one
answers 400 with ExpiredVersionStamp (0x80044352), and a new change-tracking read gives a fresh link.
`user_update` / `user_create` / `user_delete` act as a Dynamics user. With `commit_after` seconds a user's
write belongs to a transaction that commits that much later (a plug-in's or a bulk job's): its
``versionnumber`` and ``modifiedon`` are stamped when it is made - ``versionnumber`` is SQL Server's
rowversion, a database-wide counter taken at each write, not at commit - but until the commit deltas and
queries read the row as it was (a new row: not at all). A delta link is the highest ``versionnumber``
stamped when it is issued, so one issued meanwhile has passed the late write: the next delta from it never
lists that row (unless it changes again); a ``modifiedon`` query after the commit finds it.

Merge: the unbound action ``POST Merge`` (``Target`` and ``Subordinate`` as entity references with their
``@odata.type``, ``UpdateContent``, ``PerformParentingChecks``) merges two contacts, accounts or incidents as
Dataverse does: the target is updated with ``UpdateContent``, the lookups naming the subordinate in other
rows are moved to the target, and the subordinate is deactivated (``statecode`` 1, ``statuscode`` 2), its
``merged`` set and its ``masterid`` lookup (``_masterid_value``) naming the target - it is not deleted: a read
by its id or alternate key still finds it, and a delta lists it as changed. `user_merge` is the same merge
made by a user in the UI. ``GET WhoAmI`` answers the calling
user's ``UserId``, ``BusinessUnitId`` and ``OrganizationId`` (a cheap authenticated read: the connector's
probe of a held connection).
"""

from __future__ import annotations

import itertools
import re
import time
import urllib.parse
import uuid
from collections import deque
from typing import Any

import orjson
from aiohttp import web

from cdp_crm_emulators._server import Emulator, Records, iso_z, json_response, new_id
from cdp_crm_emulators.dynamics import lists, metadata
from cdp_crm_emulators.dynamics.batch import boundary_of, http_part, split_multipart
from cdp_crm_emulators.dynamics.odata import (
    NAMESPACE,
    DataverseError,
    EntitySet,
    default_entity_sets,
    etag,
    parse_filter,
    select_of,
    split_key,
)

# Tables the Merge action takes (Dataverse's: account, contact, lead, incident; no leads here).
MERGEABLE = ("accounts", "contacts", "incidents")
API = "/api/data/v9.2"
BATCH_LIMIT = 1000


class DynamicsEmulator(Emulator):
    name = "dynamics"

    def __init__(
        self,
        *,
        tenant: str = "00000000-0000-0000-0000-0000000000aa",
        client_id: str = "local-dynamics-client",
        client_secret: str = "local-dynamics-secret",
        window_limit: int = 6000,
        window_seconds: float = 300.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.tenant = tenant
        self.client_id = client_id
        self.client_secret = client_secret
        self.window_limit = window_limit
        self.window_seconds = window_seconds
        self.sets = default_entity_sets()
        self.store = Records({name: s.keys for name, s in self.sets.items()})
        self.tokens: set[str] = set()
        self.changes: list[tuple[int, str, str, bool]] = []  # (version, set, id, deleted)
        self._versions = itertools.count(1000)
        self._tickets = itertools.count(1)
        self._window: deque[float] = deque()
        self._throttled = 0
        self._pages: dict[str, tuple[str, list[str], list[dict[str, Any]]]] = {}
        self._delta_pages: dict[str, dict[str, Any]] = {}
        self._issued = itertools.count(1)  # delta tokens issued: each names its issue
        self._expired_through = 0  # tokens issued up to this one are expired
        # A write whose transaction commits later (`commit_after`): (set, id) -> (commit time, the row as
        # others read it until then, None for a row not there before).
        self._in_flight: dict[tuple[str, str], tuple[float, dict[str, Any] | None]] = {}
        r = self.app.router
        r.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self._openid)
        r.add_post("/{tenant}/oauth2/v2.0/token", self._token)
        r.add_post(f"{API}/$batch", self._batch)
        r.add_route("*", API + "/{rest:.*}", self._web_api)

    # --- inspection ------------------------------------------------------------------------------

    def records(self, obj: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self.store.objects.get(obj, {}).values()]

    def find(self, entity_set: str, attribute: str, value: Any) -> dict[str, Any] | None:
        record_id = self.store.find(entity_set, attribute, value)
        return None if record_id is None else dict(self.store.objects[entity_set][record_id])

    def list_members(self, list_id: str) -> list[str]:
        """The row ids of a marketing list's members."""
        return lists.members(self.store, list_id)

    def budget(self) -> dict[str, Any]:
        self._roll()
        return {
            "window_limit": self.window_limit,
            "window_seconds": self.window_seconds,
            "window_used": len(self._window),
            "throttled": self._throttled,
        }

    def state(self) -> dict[str, Any]:
        return {"objects": self.store.objects, "changes": self.changes, "version": next(self._versions)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.store.restore(state.get("objects", {}))
        self.changes = [tuple(c) for c in state.get("changes", [])]  # type: ignore[misc]
        self._versions = itertools.count(state.get("version", 1000))

    def expire_change_tracking(self) -> None:
        """Every delta link issued so far expires (ExpireChangeTrackingInDays passed, or tracking reset)."""
        self._expired_through = next(self._issued)

    # --- the CRM user's side (inbound) -----------------------------------------------------------

    def user_create(self, entity_set: str, values: dict[str, Any], *, commit_after: float = 0.0) -> dict[str, Any]:
        record_id = self._write(entity_set, None, values)
        if commit_after > 0:
            self._in_flight[(entity_set, record_id)] = (self.clock() + commit_after, None)
        return dict(self.store.objects[entity_set][record_id])

    def user_update(
        self, entity_set: str, record_id: str, values: dict[str, Any], *, commit_after: float = 0.0
    ) -> dict[str, Any]:
        before = dict(self.store.objects[entity_set][record_id])
        self._write(entity_set, record_id, values)
        if commit_after > 0:
            held = self._in_flight.get((entity_set, record_id))
            self._in_flight[(entity_set, record_id)] = (self.clock() + commit_after, held[1] if held else before)
        return dict(self.store.objects[entity_set][record_id])

    def _pending(self, entity_set: str, record_id: str) -> tuple[bool, dict[str, Any] | None]:
        """Whether the row's last write has not committed yet (`commit_after`), and the row as others read it
        until then (None: a row not there before)."""
        flight = self._in_flight.get((entity_set, record_id))
        if flight is None:
            return False, None
        if self.clock() < flight[0]:
            return True, flight[1]
        del self._in_flight[(entity_set, record_id)]
        return False, None

    def _visible(self, entity_set: str) -> list[dict[str, Any]]:
        """The table's rows as a query reads them now: a row whose write has not committed shows as it was."""
        rows = []
        for record_id, record in self.store.objects.get(entity_set, {}).items():
            pending, before = self._pending(entity_set, record_id)
            if not pending:
                rows.append(record)
            elif before is not None:
                rows.append(before)
        return rows

    def user_delete(self, entity_set: str, record_id: str) -> None:
        if self.store.delete(entity_set, record_id) is not None:
            self.changes.append((next(self._versions), entity_set, record_id, True))

    def user_merge(
        self, entity_set: str, target: str, subordinate: str, update: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A user merges `subordinate` into `target` (the Merge action); the target as it is after."""
        self._merge(entity_set, target, subordinate, dict(update or {}))
        return dict(self.store.objects[entity_set][target])

    def _merge(self, entity_set: str, target: str, subordinate: str, update: dict[str, Any]) -> None:
        entity = self.sets[entity_set]
        for record_id in (target, subordinate):
            if self.store.get(entity_set, record_id) is None:
                raise DataverseError(404, "0x80040217", f"{entity.logical} With Ids = {record_id} Does Not Exist")
        if target == subordinate or self.store.objects[entity_set][subordinate].get("merged"):
            raise DataverseError(
                400, "0x8004022b", "The subordinate record cannot be merged: it is the target or merged already."
            )
        now = iso_z(self.clock())
        # The subordinate's related rows are parented to the target (each a change of its own).
        for other, table in self.store.objects.items():
            for record_id, record in list(table.items()):
                moved = {k: target for k, v in record.items() if k.endswith("_value") and v == subordinate}
                if moved and not (other == entity_set and record_id == subordinate):
                    version = next(self._versions)
                    self.store.put(other, record_id, {**record, **moved, "modifiedon": now, "versionnumber": version})
                    self.changes.append((version, other, record_id, False))
        version = next(self._versions)
        gone = {**self.store.objects[entity_set][subordinate], "statecode": 1, "statuscode": 2, "merged": True,
                "_masterid_value": target, "modifiedon": now, "versionnumber": version}  # fmt: skip
        self.store.put(entity_set, subordinate, gone)
        self.changes.append((version, entity_set, subordinate, False))
        self._write(entity_set, target, update)

    def _merge_action(self, payload: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        target, subordinate = payload.get("Target") or {}, payload.get("Subordinate") or {}
        logical = str(target.get("@odata.type", "")).removeprefix("#").removeprefix(f"{NAMESPACE}.")
        entity = next((e for e in self.sets.values() if e.logical == logical and e.name in MERGEABLE), None)
        if entity is None or str(subordinate.get("@odata.type", "")).removeprefix("#") != f"{NAMESPACE}.{logical}":
            raise DataverseError(
                400, "0x80040203", "Merge takes a Target and Subordinate of one table: account, contact or incident."
            )
        update = {k: v for k, v in (payload.get("UpdateContent") or {}).items() if not k.startswith("@odata")}
        self._merge(entity.name, str(target.get(entity.primary)), str(subordinate.get(entity.primary)), update)
        return 204, {}, None

    # --- token -----------------------------------------------------------------------------------

    def is_api(self, request: web.Request) -> bool:
        return request.path.startswith(API)

    def error_response(self, status: int, request: web.Request) -> web.Response:
        if status == 429:
            return self._throttle_response(retry_after=1)
        return _error_response(
            DataverseError(status, "0x80040216" if status >= 500 else "0x80040203", "injected fault")
        )

    async def _openid(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        base = f"{self.base_url}/{tenant}"
        return json_response(
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "issuer": f"{base}/v2.0",
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "tenant_region_scope": "EU",
            }
        )

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        tenant = request.match_info["tenant"]
        if tenant not in (self.tenant, "organizations"):
            return _aad_error(400, "invalid_request", 90002, f"Tenant '{tenant}' not found.")
        if form.get("grant_type") != "client_credentials":
            return _aad_error(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        if form.get("client_id") != self.client_id:
            return _aad_error(400, "unauthorized_client", 700016, "Application was not found in the directory.")
        if form.get("client_secret") != self.client_secret:
            return _aad_error(401, "invalid_client", 7000215, "Invalid client secret provided.")
        scopes = str(form.get("scope", "")).split()
        if not any(s.endswith("/.default") for s in scopes):
            return _aad_error(
                400,
                "invalid_scope",
                1002012,
                "The provided value for scope is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier.",
            )
        token = f"eyJ0eXAiOiJKV1QiLCJhbGciOiJub25lIn0.{new_id()}."
        self.tokens.add(token)
        return json_response(
            {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": token}
        )

    # --- limits ----------------------------------------------------------------------------------

    def _roll(self) -> None:
        horizon = self.clock() - self.window_seconds
        while self._window and self._window[0] <= horizon:
            self._window.popleft()

    def _throttle_response(self, retry_after: int) -> web.Response:
        message = f"Number of requests exceeded the limit of {self.window_limit} over time window of {int(self.window_seconds)} seconds."
        body = {"error": {"code": "0x80072322", "message": message}}
        return json_response(body, status=429, headers={"Retry-After": str(retry_after)})

    def admit(self, request: web.Request) -> web.Response | None:
        """The bearer token, then the caller's service protection window (before the fault injector: Dataverse
        counts a request when it arrives, so one that meets a 5xx, a 429, a timeout or a lost answer took its
        place in the window; one refused here is not counted)."""
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
            challenge = (
                f"Bearer authorization_uri={self.base_url}/{self.tenant}/oauth2/authorize, resource_id={self.base_url}/"
            )
            return web.Response(status=401, headers={"WWW-Authenticate": challenge})
        self._roll()
        if len(self._window) >= self.window_limit:
            self._throttled += 1
            wait = self._window[0] + self.window_seconds - self.clock()
            return self._throttle_response(max(1, int(wait + 0.999)))
        self._window.append(self.clock())
        return None

    # --- Web API ---------------------------------------------------------------------------------

    async def _web_api(self, request: web.Request) -> web.StreamResponse:
        # `admit` has checked the token and counted the request.
        body = await request.read()
        status, headers, answer = self._execute(
            request.method, request.match_info["rest"], request.query_string, dict(request.headers), body, {}
        )
        return _make_response(status, headers, answer)

    def _execute(
        self,
        method: str,
        path: str,
        query_string: str,
        headers: dict[str, str],
        body: bytes,
        content_ids: dict[str, str],
    ) -> tuple[int, dict[str, str], Any]:
        try:
            return self._route(method, path, urllib.parse.parse_qs(query_string), headers, body, content_ids)
        except DataverseError as exc:
            return exc.status, {}, {"error": {"code": exc.code, "message": exc.message}}

    def _route(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        headers: dict[str, str],
        body: bytes,
        content_ids: dict[str, str],
    ) -> tuple[int, dict[str, str], Any]:
        path = urllib.parse.unquote(path)
        if path.startswith("$") and "(" not in path.split("/")[0]:
            ref = path.split("/")[0]
            if ref[1:] in content_ids:
                path = content_ids[ref[1:]] + path[len(ref) :]
        if path.strip("/") == "WhoAmI":
            if method != "GET":
                raise DataverseError(405, "0x80060888", f"The HTTP method '{method}' is not allowed.")
            return 200, {}, self._who_am_i()
        if path.strip("/") == "Merge":
            if method != "POST":
                raise DataverseError(405, "0x80060888", f"The HTTP method '{method}' is not allowed.")
            return self._merge_action(orjson.loads(body) if body.strip() else {})
        if path.strip("/").startswith("EntityDefinitions"):
            return metadata.handle(self.sets, f"{self.base_url}{API}/$metadata", method, path, query)
        if (listed := re.fullmatch(r"lists\(([^)/]+)\)/(.+)", path.strip("/"))) is not None:
            payload = orjson.loads(body) if body.strip() else {}
            return lists.handle(self.store, listed.group(1).strip(), method, listed.group(2), payload)
        match = re.fullmatch(r"(\w+)(?:\((.*)\))?", path.strip("/"))
        if match is None or match.group(1) not in self.sets:
            raise DataverseError(404, "0x80060888", f"Resource not found for the segment '{path.split('(')[0]}'.")
        entity = self.sets[match.group(1)]
        key = match.group(2)
        payload = orjson.loads(body) if body.strip() else {}
        prefer = headers.get("Prefer", "")
        if key is None and method == "GET":
            return self._list(entity, query, prefer)
        if key is None and method == "POST":
            record_id = self._write(entity.name, None, payload)
            return self._written(entity, record_id, prefer, created=True)
        if key is None:
            raise DataverseError(405, "0x80060888", f"The HTTP method '{method}' is not allowed on a collection.")
        record_id = self._resolve_key(entity, key)
        current = self.store.get(entity.name, record_id) if record_id else None
        if method == "GET":
            if current is None:
                raise DataverseError(404, "0x80040217", f"{entity.logical} With Ids = {key} Does Not Exist")
            return 200, {"ETag": etag(current)}, self._public(entity, current, select_of(query))
        if method == "DELETE":
            if current is None:
                raise DataverseError(404, "0x80040217", f"{entity.logical} With Ids = {key} Does Not Exist")
            self.user_delete(entity.name, current[entity.primary])
            return 204, {}, None
        if method == "PATCH":
            if_match, if_none_match = headers.get("If-Match"), headers.get("If-None-Match")
            if current is None and if_match is not None:
                raise DataverseError(404, "0x80040217", f"{entity.logical} With Ids = {key} Does Not Exist")
            if current is not None and if_none_match == "*":
                raise DataverseError(412, "0x80040237", "A record with matching key values already exists.")
            if current is not None and if_match not in (None, "*") and if_match != etag(current):
                raise DataverseError(
                    412,
                    "0x80060882",
                    "The version of the existing record doesn't match the RowVersion property provided.",
                )
            if current is None:
                payload = {**payload, **self._key_values(entity, key)}
                # An upsert by GUID creates the record with that GUID; by alternate key, with a new one.
                written = self._write(entity.name, None, payload, new_record_id=None if "=" in key else record_id)
            else:
                written = self._write(entity.name, current[entity.primary], payload)
            return self._written(entity, written, prefer, created=current is None)
        raise DataverseError(405, "0x80060888", f"The HTTP method '{method}' is not allowed.")

    def _who_am_i(self) -> dict[str, Any]:
        """The WhoAmI function's answer: the calling (application) user, its business unit and organisation."""
        return {
            "@odata.context": f"{self.base_url}{API}/$metadata#{NAMESPACE}.WhoAmIResponse",
            "BusinessUnitId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.tenant}/businessunit")),
            "UserId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.tenant}/{self.client_id}")),
            "OrganizationId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.tenant}/organization")),
        }

    def _written(
        self, entity: EntitySet, record_id: str, prefer: str, *, created: bool
    ) -> tuple[int, dict[str, str], Any]:
        headers = {"OData-EntityId": f"{self.base_url}{API}/{entity.name}({record_id})"}
        record = self.store.objects[entity.name][record_id]
        headers["ETag"] = etag(record)
        if "return=representation" in prefer:
            return (201 if created else 200), headers, self._public(entity, record, None)
        return 204, headers, None

    def _key_values(self, entity: EntitySet, key: str) -> dict[str, Any]:
        if "=" not in key:
            return {}
        values = {}
        for part in split_key(key):
            name, _, raw = part.partition("=")
            values[name.strip()] = raw.strip().strip("'").replace("''", "'")
        return values

    def _resolve_key(self, entity: EntitySet, key: str) -> str | None:
        if "=" not in key:
            try:
                return str(uuid.UUID(key.strip()))
            except ValueError:
                raise DataverseError(
                    400, "0x80060888", f"Bad Request - Error in query syntax: invalid key {entity.primary}."
                ) from None
        values = self._key_values(entity, key)
        if len(values) != 1 or next(iter(values)) not in entity.keys:
            raise DataverseError(
                400,
                "0x80060888",
                f"The key used in the request is not an alternate key defined for {entity.logical}: {', '.join(values)}",
            )
        name, value = next(iter(values.items()))
        return self.store.find(entity.name, name, value)

    def _write(
        self, entity_set: str, record_id: str | None, payload: dict[str, Any], new_record_id: str | None = None
    ) -> str:
        entity = self.sets[entity_set]
        values: dict[str, Any] = {}
        for name, value in payload.items():
            if name.startswith("@odata") or name.endswith("@odata.type"):
                continue
            if name.endswith("@odata.bind"):
                nav = name[: -len("@odata.bind")]
                if nav not in entity.lookups:
                    raise DataverseError(
                        400,
                        "0x80060888",
                        f"An undeclared property '{nav}' which only has property annotations in the payload but no property value was found in the payload.",
                    )
                values[f"_{nav}_value"] = self._bind(entity.lookups[nav], value)
                column = metadata.lookup_attribute(nav, entity.lookups[nav])
                if column != nav:
                    # A polymorphic lookup (customerid): Dataverse names its value after the column, as a
                    # $filter reads it (`_customerid_value eq <id>`); the navigation's name is kept beside it.
                    values[f"_{column}_value"] = values[f"_{nav}_value"]
                continue
            if name not in entity.attributes or name in (
                entity.primary, "createdon", "modifiedon", "versionnumber", "merged",
            ):  # fmt: skip
                raise DataverseError(
                    400,
                    "0x80060888",
                    f"The property '{name}' does not exist on type '{NAMESPACE}.{entity.logical}'. Make sure to only use property names that are defined by the type.",
                )
            values[name] = value
        if record_id is None:
            missing = [n for n in entity.required if values.get(n) in (None, "")]
        else:  # the platform's own required columns cannot be cleared (forms alone guard the others)
            missing = [n for n, v in values.items() if v in (None, "") and entity.required_level(n) == "SystemRequired"]
        if missing:
            raise DataverseError(400, "0x80040200", f"Required field '{missing[0]}' is missing a value.")
        if (message := self.faults.rejection_for(entity_set, values)) is not None:
            raise DataverseError(400, "0x80040265", message)
        for key in entity.keys:
            holder = self.store.find(entity_set, key, values.get(key)) if values.get(key) not in (None, "") else None
            if holder is not None and holder != record_id:
                raise DataverseError(412, "0x80040237", "A record with matching key values already exists.")
        now = iso_z(self.clock())
        if record_id is None:
            record_id = new_record_id or str(uuid.uuid4())
            record: dict[str, Any] = {entity.primary: record_id, "createdon": now, "statecode": 0, "statuscode": 1}
            if entity_set == "incidents":
                record["ticketnumber"] = f"CAS-{next(self._tickets):05d}-LOCAL"
            if entity_set in MERGEABLE:
                record["merged"] = False
        else:
            record = dict(self.store.objects[entity_set][record_id])
        record.update(values)
        if entity_set == "contacts":
            record["fullname"] = " ".join(p for p in (record.get("firstname"), record.get("lastname")) if p)
        version = next(self._versions)
        record.update(modifiedon=now, versionnumber=version)
        self.store.put(entity_set, record_id, record)
        self.changes.append((version, entity_set, record_id, False))
        return record_id

    def _bind(self, target_set: str, reference: str) -> str:
        match = re.fullmatch(r"/?(?:.*/)?(\w+)\((.*)\)", str(reference))
        if match is None or match.group(1) != target_set:
            raise DataverseError(
                400, "0x80060888", f"The @odata.bind value must reference /{target_set}(<id or alternate key>)."
            )
        target = self.sets[target_set]
        record_id = self._resolve_key(target, match.group(2))
        if record_id is None or self.store.get(target_set, record_id) is None:
            raise DataverseError(404, "0x80040217", f"{target.logical} With Ids = {match.group(2)} Does Not Exist")
        return record_id

    def _public(self, entity: EntitySet, record: dict[str, Any], select: list[str] | None) -> dict[str, Any]:
        shown = {k: record.get(k) for k in [*select, entity.primary]} if select else dict(record)
        return {"@odata.etag": etag(record), **shown}

    def _list(self, entity: EntitySet, query: dict[str, list[str]], prefer: str) -> tuple[int, dict[str, str], Any]:
        select = select_of(query)
        for name in select or []:
            if name not in entity.attributes and not (name.startswith("_") and name.endswith("_value")):
                raise DataverseError(
                    400,
                    "0x80060888",
                    f"Could not find a property named '{name}' on type '{NAMESPACE}.{entity.logical}'.",
                )
        context = f"{self.base_url}{API}/$metadata#{entity.name}"
        page_size = 5000
        if (m := re.search(r"odata\.maxpagesize=(\d+)", prefer)) is not None:
            page_size = int(m.group(1))
        if "$deltatoken" in query:
            version, _, issue = query["$deltatoken"][0].partition("!")
            if not version.isdigit() or (issue.isdigit() and int(issue) <= self._expired_through):
                raise DataverseError(
                    400,
                    "0x80044352",
                    "Version stamp associated with the client has expired. Please perform a full sync.",
                )
            since = int(version)
            return 200, {}, self._delta_page(entity, self._delta(entity, since, select, context), page_size)
        if "$skiptoken" in query and query["$skiptoken"][0] in self._delta_pages:
            return 200, {}, self._delta_page(entity, self._delta_pages.pop(query["$skiptoken"][0]), page_size)
        if "$skiptoken" in query:
            token = query["$skiptoken"][0]
            if token not in self._pages:
                raise DataverseError(400, "0x80060888", "The $skiptoken is invalid or has expired.")
            _, select, rows = self._pages.pop(token)
        else:
            predicate = parse_filter(query.get("$filter", [""])[0], entity)
            rows = [r for r in self._visible(entity.name) if predicate(r)]
            if "$orderby" in query:  # `a asc,b desc`: sorted by the last column first, each stable
                for order in reversed(query["$orderby"][0].split(",")):
                    column, _, direction = order.strip().partition(" ")
                    rows.sort(
                        key=lambda r, c=column: (r.get(c) is None, r.get(c) or ""),
                        reverse=direction.strip().lower() == "desc",
                    )
            if "$top" in query:
                rows = rows[: int(query["$top"][0])]
        applied = {"Preference-Applied": prefer} if prefer else {}
        if "odata.track-changes" in prefer and "$skiptoken" not in query:
            # The initial read of a change-tracked collection: its pages are a snapshot, and the deltaLink
            # (on the last page) starts where that snapshot was taken.
            snapshot = {
                "@odata.context": context,
                "value": [self._public(entity, r, select) for r in rows],
                "@odata.deltaLink": self._delta_link(entity, select),
            }
            return 200, applied, self._delta_page(entity, snapshot, page_size)
        page, rest = rows[:page_size], rows[page_size:]
        answer: dict[str, Any] = {"@odata.context": context, "value": [self._public(entity, r, select) for r in page]}
        if rest:
            token = new_id()
            self._pages[token] = (entity.name, select or [], rest)
            answer["@odata.nextLink"] = f"{self.base_url}{API}/{entity.name}?$skiptoken={token}"
        return 200, applied, answer

    def _delta_link(self, entity: EntitySet, select: list[str] | None) -> str:
        latest = self.changes[-1][0] if self.changes else 0
        selected = f"$select={','.join(select)}&" if select else ""
        return f"{self.base_url}{API}/{entity.name}?{selected}$deltatoken={latest}!{next(self._issued)}"

    def _delta(self, entity: EntitySet, since: int, select: list[str] | None, context: str) -> dict[str, Any]:
        latest: dict[str, tuple[int, bool]] = {}
        for version, entity_set, record_id, deleted in self.changes:
            if entity_set == entity.name and version > since and not self._pending(entity_set, record_id)[0]:
                latest[record_id] = (version, deleted)
        value = []
        for record_id, (_, deleted) in sorted(latest.items(), key=lambda item: item[1][0]):
            record = self.store.get(entity.name, record_id)
            if deleted or record is None:
                value.append({"@odata.context": f"{context}/$deletedEntity", "id": record_id, "reason": "deleted"})
            else:
                value.append(self._public(entity, record, select))
        return {
            "@odata.context": f"{context}/$delta",
            "value": value,
            "@odata.deltaLink": self._delta_link(entity, select),
        }

    def _delta_page(self, entity: EntitySet, delta: dict[str, Any], page_size: int) -> dict[str, Any]:
        """One page of a delta: the rest is kept behind a nextLink, the deltaLink goes on the last page."""
        value, rest = delta["value"][:page_size], delta["value"][page_size:]
        if not rest:
            return delta
        token = new_id()
        self._delta_pages[token] = {**delta, "value": rest}
        following = {k: v for k, v in delta.items() if k != "@odata.deltaLink"}
        return {
            **following,
            "value": value,
            "@odata.nextLink": f"{self.base_url}{API}/{entity.name}?$skiptoken={token}",
        }

    # --- $batch ----------------------------------------------------------------------------------

    async def _batch(self, request: web.Request) -> web.StreamResponse:
        # `admit` has checked the token and counted the request.
        boundary = boundary_of(request.headers.get("Content-Type", ""))
        if boundary is None:
            return _error_response(
                DataverseError(400, "0x80060888", "The $batch request must be multipart/mixed with a boundary.")
            )
        parts = split_multipart(await request.read(), boundary)
        if (
            sum(
                len(split_multipart(body, b)) if (b := boundary_of(h.get("content-type", ""))) else 1
                for h, body in parts
            )
            > BATCH_LIMIT
        ):
            return _error_response(
                DataverseError(
                    400, "0x8004800d", f"The number of requests in the batch exceeds the limit of {BATCH_LIMIT}."
                )
            )
        out_boundary = f"batchresponse_{uuid.uuid4()}"
        chunks: list[bytes] = []
        for part_headers, part_body in parts:
            inner = boundary_of(part_headers.get("content-type", ""))
            if inner is None:
                status, headers, answer = self._batch_operation(part_body, {})
                chunks.append(http_part(status, headers, answer, None))
                continue
            chunks.append(self._changeset(split_multipart(part_body, inner)))
        body = (
            b"".join(b"--" + out_boundary.encode() + b"\r\n" + chunk for chunk in chunks)
            + b"--"
            + out_boundary.encode()
            + b"--\r\n"
        )
        return web.Response(
            status=200,
            body=body,
            headers={"Content-Type": f"multipart/mixed; boundary={out_boundary}", "OData-Version": "4.0"},
        )

    def _changeset(self, operations: list[tuple[dict[str, str], bytes]]) -> bytes:
        before = self.store.copy_state()
        changes_before = len(self.changes)
        content_ids: dict[str, str] = {}
        answers: list[bytes] = []
        for op_headers, op_body in operations:
            status, headers, answer = self._batch_operation(op_body, content_ids)
            content_id = op_headers.get("content-id")
            if status >= 400:
                # All or nothing: undo what this change set wrote and answer with the failure alone.
                self.store.restore(before)
                del self.changes[changes_before:]
                return http_part(status, headers, answer, content_id)
            if content_id and "OData-EntityId" in headers:
                entity_path = headers["OData-EntityId"].split(API + "/", 1)[1]
                content_ids[content_id] = entity_path
            answers.append(http_part(status, headers, answer, content_id))
        boundary = f"changesetresponse_{uuid.uuid4()}"
        inner = (
            b"".join(b"--" + boundary.encode() + b"\r\n" + a for a in answers) + b"--" + boundary.encode() + b"--\r\n"
        )
        return f"Content-Type: multipart/mixed; boundary={boundary}\r\n\r\n".encode() + inner + b"\r\n"

    def _batch_operation(self, raw: bytes, content_ids: dict[str, str]) -> tuple[int, dict[str, str], Any]:
        head, _, body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
        lines = head.decode().split("\n")
        request_line = lines[0].split()
        if len(request_line) < 2:
            return 400, {}, {"error": {"code": "0x80060888", "message": "Malformed request line in $batch"}}
        method, url = request_line[0], request_line[1]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().title()] = value.strip()
        path = url.split(API + "/", 1)[1] if API + "/" in url else url.lstrip("/")
        path, _, query_string = path.partition("?")
        for ref, target in content_ids.items():
            body = body.replace(f'"${ref}"'.encode(), f'"/{target}"'.encode())
        return self._execute(method, path, query_string, headers, body.strip(), content_ids)


def _make_response(status: int, headers: dict[str, str], answer: Any) -> web.Response:
    headers = {**headers, "OData-Version": "4.0"}
    if answer is None:
        return web.Response(status=status, headers=headers)
    return json_response(answer, status=status, headers=headers)


def _error_response(exc: DataverseError) -> web.Response:
    return json_response({"error": {"code": exc.code, "message": exc.message}}, status=exc.status)


def _aad_error(status: int, error: str, code: int, description: str) -> web.Response:
    trace = str(uuid.uuid4())
    return json_response(
        {
            "error": error,
            "error_description": f"AADSTS{code}: {description} Trace ID: {trace}",
            "error_codes": [code],
            "timestamp": iso_z(time.time()).replace("T", " ").rstrip("Z"),
            "trace_id": trace,
            "correlation_id": str(uuid.uuid4()),
        },
        status=status,
    )
