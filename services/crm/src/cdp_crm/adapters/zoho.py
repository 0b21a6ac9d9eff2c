"""Zoho CRM v8: upsert with ``duplicate_check_fields`` (100 records a call), OAuth refresh tokens, credits.

Auth: ``POST <accounts_url>/oauth/v2/token`` with ``grant_type=refresh_token``, the client id and secret
and the refresh token; the answer's ``api_domain`` is where the API lives. Zoho refuses bad credentials
with HTTP 200 and ``{"error": ...}``. Calls carry ``Authorization: Zoho-oauthtoken <token>``; a 401
``INVALID_TOKEN`` gets one new token and one retry.

Writes: ``POST /crm/v8/<Module>/upsert`` with ``duplicate_check_fields`` = the mapping's match fields (each
record carries their values), so a retry after a lost answer updates the records the first attempt
created. Each record answers on its own (``SUCCESS`` with ``action`` insert/update, or its error code with
``details.api_name``) - also in a 400 when none was written, so a 400 with per-record answers is not a
batch-level refusal.

Campaign membership (a list mapping's `list` is the Campaign's id): the records' ids by a COQL query
(``POST /crm/v8/coql``: the match key's values, an email or a phone maybe, in the body), then the
Campaign's related list - ``PUT /crm/v8/Campaigns/<id>/<Module>`` relates the entries, ``DELETE ...?ids=``
delinks the exits (Zoho's documented way to make records campaign members; tags would carry no campaign).

Privacy deletes: the records' ids by the same COQL query (``where <field> in ('a', 'b')``; never the
Search API's ``criteria`` in a request line, which access logs keep), then
``DELETE /crm/v8/<Module>?ids=...``; a record already gone counts as deleted (Zoho answers INVALID_DATA
for an id it no longer has).

Credits: each call costs `credits_per_call` (the org's price list: an upsert call of up to 100 records is
1 credit by default); past the 24-hour allocation Zoho answers 429 ``LIMIT_REACHED``: THROTTLED, daily.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import aiohttp

from cdp_crm.adapters.http import (
    Answer,
    AnswerTooLarge,
    Reserve,
    exchange,
    listed,
    metered_read,
    read_json,
    transport_error,
    unexpected,
)
from cdp_crm.domain.coalesce import DELETE, REMOVE, UPSERT, Change
from cdp_crm.domain.isolation import (
    AUTH,
    DUPLICATE,
    INVALID_VALUE,
    NOT_FOUND,
    PERMISSION,
    REJECTED,
    THROTTLED,
    UNKNOWN_FIELD,
    BatchOutcome,
    CrmError,
    RecordResult,
)
from cdp_crm.domain.mapping import FieldSchema, ObjectMapping, ObjectSchema

if TYPE_CHECKING:
    from cdp_crm.budgets import SharedBudget

UPSERT_LIMIT = 100
PLACEHOLDER = "(deleted)"  # privacy.PLACEHOLDER: what an anonymised record holds in place of a text naming the person
COQL_IN_LIMIT = 50  # values in one COQL ``in``
COQL_PAGE = 200  # records a COQL page (1 credit up to 200)
COQL_PAGES = 10
COQL_CRITERIA = 25  # criteria in one COQL ``where``
ACCOUNTS = "https://accounts.zoho.com"


class ZohoAdapter:
    kind = "zoho"
    batch_limit = UPSERT_LIMIT

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        client_id: str,
        client_secret: str,
        refresh_token: str,
        accounts_url: str = ACCOUNTS,
        credits_per_call: int = 1,
        timeout: float = 30.0,
    ) -> None:
        self._session = session
        self._client_id = client_id
        self._client_secret = client_secret
        self._refresh_token = refresh_token
        self._accounts = accounts_url.rstrip("/")
        self._credits_per_call = credits_per_call
        self._timeout = timeout
        self._token: str | None = None
        self._api: str | None = None
        self._token_lock = asyncio.Lock()

    async def close(self) -> None:
        pass  # the session is the caller's

    def cost(self, mapping: ObjectMapping, n: int, op: str = UPSERT) -> int:
        if op == DELETE:
            return 2 * self._credits_per_call  # a search for the records' ids, then one delete
        if mapping.kind == "list":
            return 3 * self._credits_per_call  # the search, then relating and delinking
        return self._credits_per_call

    async def _authenticate(self, stale: str | None = None) -> CrmError | None:
        async with self._token_lock:
            if self._token is not None and self._token != stale:
                return None
            form = {
                "grant_type": "refresh_token",
                "client_id": self._client_id,
                "client_secret": self._client_secret,
                "refresh_token": self._refresh_token,
            }
            try:
                async with self._session.post(
                    self._accounts + "/oauth/v2/token",
                    data=form,
                    timeout=aiohttp.ClientTimeout(total=self._timeout),
                    allow_redirects=False,
                ) as response:
                    body = await read_json(response)
                    status = response.status
            except (TimeoutError, aiohttp.ClientError, ValueError, AnswerTooLarge):
                return CrmError(AUTH, "TOKEN_UNAVAILABLE", "the token endpoint did not answer")
            if not isinstance(body, dict) or "access_token" not in body:
                code = str(body.get("error", status)) if isinstance(body, dict) else str(status)
                return CrmError(AUTH, code, "Zoho refused the refresh token or client", status)
            self._token = body["access_token"]
            self._api = str(body.get("api_domain", "https://www.zohoapis.com")).rstrip("/")
            return None

    async def read(
        self,
        path: str,
        budget: SharedBudget,
        clock: Callable[[], float] = time.time,
        *,
        headers: dict[str, str] | None = None,
        what: str = "",
    ) -> Answer:
        """An authenticated GET under /crm/v8 (a listing, ``If-Modified-Since`` in `headers`) for the change
        readers: a unit of the account's shared budget per request, a new token and one retry on a 401,
        and the answer's ``error`` set by this adapter's error mapping (429 LIMIT_REACHED is the day's
        credits spent) - None when Zoho answered it, 204 and 304 (nothing there, nothing changed) included."""

        def failure(answer: Answer) -> CrmError | None:
            return None if answer.error is None and answer.status in (204, 304) else _failure(answer)

        return await metered_read(
            budget,
            clock,
            lambda reserve: self._call("GET", path, headers=headers, what=what, reserve=reserve),
            failure,
        )

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
        what: str = "",
        reserve: Reserve | None = None,
    ) -> Answer:
        for attempt in (0, 1):
            if self._token is None and (failed := await self._authenticate()) is not None:
                return Answer(0, {}, None, failed)
            token = self._token
            if reserve is not None:
                await reserve()
            answer = await exchange(
                self._session,
                method,
                f"{self._api}/crm/v8{path}",
                json=json,
                headers={"Authorization": f"Zoho-oauthtoken {token}", **(headers or {})},
                timeout=self._timeout,
                what=what,
            )
            if answer.status == 401 and attempt == 0:
                if (failed := await self._authenticate(stale=token)) is not None:
                    return Answer(0, {}, None, failed)
                continue
            return answer
        raise AssertionError("unreachable")

    async def describe(self, objects: list[str]) -> dict[str, ObjectSchema]:
        """``GET /crm/v8/settings/fields?module=<Module>``: api names, unique fields, read-only ones."""
        schema: dict[str, ObjectSchema] = {}
        for module in objects:
            answer = await self._call("GET", f"/settings/fields?module={module}", what=f"fields {module}")
            if answer.status == 400 and isinstance(answer.body, dict) and answer.body.get("code") == "INVALID_MODULE":
                continue
            if (error := _failure(answer)) is not None:
                raise ConnectionError(f"describing {module} failed: {error.reason} {error.code}")
            fields = {
                f["api_name"]: FieldSchema(
                    f["api_name"],
                    f.get("data_type", "text"),
                    bool(f.get("unique")),
                    not f.get("read_only", False),
                    bool(f.get("system_mandatory")),
                )
                for f in answer.body.get("fields", [])
            }
            schema[module] = ObjectSchema(module, fields)
        return schema

    async def send(self, mapping: ObjectMapping, changes: list[Change]) -> BatchOutcome:
        assert len(changes) <= UPSERT_LIMIT, "the engine batches by batch_limit"
        if mapping.kind == "list":
            return await self._membership(mapping, changes)
        if changes[0].op == DELETE:
            return await self._delete(mapping, changes)
        if mapping.mode == "update_only":
            raise NotImplementedError("Zoho update_only mappings are not supported yet")
        checks = [name for name, _ in changes[0].key]
        data = [{**c.fields, **dict(c.key)} for c in changes]
        answer = await self._call(
            "POST",
            f"/{mapping.object}/upsert",
            json={"data": data, "duplicate_check_fields": checks},
            what=mapping.object,
        )
        per_record = answer.body.get("data") if isinstance(answer.body, dict) else None
        if answer.status in (200, 207, 400) and isinstance(per_record, list) and len(per_record) == len(changes):
            results: dict[str, RecordResult] = {}
            for change, item in zip(changes, per_record, strict=True):
                if item.get("status") == "success":
                    details = item.get("details") or {}
                    created = item.get("action") == "insert"
                    results[change.record] = RecordResult(change.record, True, details.get("id"), created)
                else:
                    results[change.record] = RecordResult(
                        change.record, False, error=_record_error(item, answer.status)
                    )
            return BatchOutcome(results, None, answer.headers)
        error = _failure(answer) or CrmError(REJECTED, "UNEXPECTED_ANSWER", "", answer.status)
        return BatchOutcome.failed(error, answer.headers)

    async def probe(self, mapping: ObjectMapping) -> tuple[bool | None, dict]:
        """Whether Zoho answers (a held connection's probe): one record's id of `mapping`'s module (Get
        Records, ``fields=id&per_page=1``: one credit, the module scope the connector has already); True once
        it answered (204, an empty module, included), None on an error."""
        answer = await self._call("GET", f"/{mapping.object}?fields=id&per_page=1", what="probe")
        if answer.status != 204 and _failure(answer) is not None:
            return None, answer.headers
        return True, answer.headers

    async def find(
        self, mapping: ObjectMapping, field: str, values: list[str], read: list[str]
    ) -> tuple[dict[str, dict[str, Any]] | None, dict]:
        """The records of `mapping`'s module whose `field` holds one of `values`: Zoho id -> their `read`
        fields; None on an error. The query names personal data (an erasure's search by email or phone), so
        it goes in a request's body - the Query API (``POST /crm/v8/coql``, COQL ``where <field> in (...)``,
        50 values a query, 200 records a page) - never in a request line (the Search API's ``criteria`` or
        ``email`` parameters), which access logs keep."""
        names = ", ".join(sorted({field, *read} - {"id"}))
        found: dict[str, dict[str, Any]] = {}
        headers: dict = {}
        for start in range(0, len(values), COQL_IN_LIMIT):
            listed_values = ", ".join(_coql_text(v) for v in values[start : start + COQL_IN_LIMIT])
            for page in range(COQL_PAGES):  # at most 2,000 records name one person's identifiers
                query = (
                    f"select {names} from {mapping.object} where {field} in ({listed_values}) "
                    f"limit {COQL_PAGE} offset {page * COQL_PAGE}"
                )
                answer = await self._call("POST", "/coql", json={"select_query": query}, what="privacy search")
                headers = answer.headers
                if answer.status == 204:
                    break  # no (more) records match
                if _failure(answer) is not None or listed(answer, "data") is not None:
                    return None, headers
                for row in answer.body["data"]:
                    if row.get("id"):
                        found[str(row["id"])] = dict(row)
                if not (answer.body.get("info") or {}).get("more_records"):
                    break
        return found, headers

    async def erase(
        self, mapping: ObjectMapping, crm_ids: list[str], fields: dict[str, Any] | None
    ) -> tuple[bool | None, dict]:
        """Delete these records by id (``DELETE /crm/v8/<Module>?ids=``; `fields` None) or write `fields` to
        each (their personal data cleared; ``PUT /crm/v8/<Module>``, Update Records, which never creates
        one), 100 a call; True once done (a record gone already counts: Zoho answers INVALID_DATA for an id
        it no longer has), None on an error."""
        return await self.erase_in(mapping.object, crm_ids, fields)

    async def erase_in(self, obj: str, crm_ids: list[str], fields: dict[str, Any] | None) -> tuple[bool | None, dict]:
        """`erase` for records of any module (a Case a Zoho user opened)."""
        results, headers = await self._by_id(obj, crm_ids, fields)
        return (None if results is None or any(results.values()) else True), headers

    # --- records a Zoho user opened about an erased contact -----------------------------------------

    # Contacts -> the modules whose records name a contact that an erasure reads, by their lookup field, and
    # their text fields: Cases by Related_To.
    LINKED: ClassVar[dict[str, dict[str, tuple[str, ...]]]] = {"Contacts": {"Cases": ("Subject", "Description")}}
    _LINKED_BY: ClassVar[dict[str, str]] = {"Cases": "Related_To"}

    async def linked(
        self, contacts: list[tuple[str, str]], emails: list[str], meter: Callable[[Any], Awaitable[Any]]
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """The Cases related to these contacts ((module, id) each): ("Cases", id, their text fields) each, by
        the Query API (``where Related_To in (...)``, 50 ids a query, 200 records a page), each page through
        `meter` (the account's budget; it raises when Zoho did not answer). `emails`: not searched by."""
        ids = sorted({crm_id for obj, crm_id in contacts if obj == "Contacts"})
        found: list[tuple[str, str, dict[str, Any]]] = []
        for module, fields in self.LINKED["Contacts"].items():
            for start in range(0, len(ids), COQL_IN_LIMIT):
                listed_ids = ", ".join(_coql_text(i) for i in ids[start : start + COQL_IN_LIMIT])
                for page in range(COQL_PAGES):
                    query = (
                        f"select {', '.join(fields)} from {module} where {self._LINKED_BY[module]} in ({listed_ids}) "
                        f"limit {COQL_PAGE} offset {page * COQL_PAGE}"
                    )
                    rows = await meter(self._coql(query))
                    found.extend((module, str(r["id"]), {f: r.get(f) for f in fields}) for r in rows["data"])
                    if not rows["more"]:
                        break
        return found

    def linked_fields(self, obj: str, record: dict[str, Any], names: Callable[[Any], bool]) -> dict[str, Any]:
        """What anonymises a linked Case: each text field naming the person replaced by the placeholder (a
        Case's Subject is required); {} when none does."""
        return {f: PLACEHOLDER for f in self.LINKED["Contacts"].get(obj, ()) if names(record.get(f))}

    async def _coql(self, query: str) -> tuple[dict[str, Any] | None, dict]:
        """One page of a COQL query: its records (those with an id) and whether more match; None on an error."""
        answer = await self._call("POST", "/coql", json={"select_query": query}, what="privacy linked records")
        if answer.status == 204:
            return {"data": [], "more": False}, answer.headers
        if _failure(answer) is not None or listed(answer, "data") is not None:
            return None, answer.headers
        rows = [r for r in answer.body["data"] if r.get("id")]
        return {"data": rows, "more": bool((answer.body.get("info") or {}).get("more_records"))}, answer.headers

    async def update(
        self, mapping: ObjectMapping, crm_ids: list[str], fields: dict[str, Any]
    ) -> tuple[dict[str, CrmError | None] | None, dict]:
        """Write `fields` to these records by id (Update Records, ``PUT /crm/v8/<Module>``, 100 a call, which
        never creates one): per id None once written or gone already (INVALID_DATA naming the id), else
        Zoho's refusal of it; None when Zoho failed (a transient error: the caller tries again)."""
        return await self._by_id(mapping.object, crm_ids, fields)

    async def _by_id(
        self, obj: str, crm_ids: list[str], fields: dict[str, Any] | None
    ) -> tuple[dict[str, CrmError | None] | None, dict]:
        """`erase` and `update`: each record's answer (None: done, or gone already), None on a failure."""
        results: dict[str, CrmError | None] = {}
        headers: dict = {}
        for start in range(0, len(crm_ids), UPSERT_LIMIT):
            ids = crm_ids[start : start + UPSERT_LIMIT]
            if fields is None:
                answer = await self._call("DELETE", f"/{obj}?ids={','.join(ids)}", what="erase")
            else:
                body = {"data": [{**fields, "id": i} for i in ids]}
                answer = await self._call("PUT", f"/{obj}", json=body, what="anonymise")
            headers = answer.headers
            per_record = answer.body.get("data") if isinstance(answer.body, dict) else None
            if (_failure(answer) is not None and answer.status not in (207, 400)) or not isinstance(per_record, list):
                return None, headers
            if len(per_record) != len(ids) or not all(isinstance(item, dict) for item in per_record):
                return None, headers
            for crm_id, item in zip(ids, per_record, strict=True):  # Zoho answers in the order asked
                gone = item.get("code") == "INVALID_DATA" and (item.get("details") or {}).get("api_name") in (
                    None,
                    "id",
                )
                ok = item.get("status") == "success" or gone
                results[crm_id] = None if ok else _record_error(item, answer.status)
        return results, headers

    async def _find(self, mapping: ObjectMapping, changes: list[Change]) -> tuple[dict[str, str], Answer]:
        """Zoho's ids of the changes' records (by the first match field's value, lower-cased), through the Query
        API: ``POST /crm/v8/coql``, ``where (<field> in (<50 values>)) or (<field> in (...))`` - a match key
        may be an email or a phone, so the values go in the body, never in a request line (the Search API's
        ``criteria``), which access logs keep. One query for a batch's 100 values (two ``in`` criteria of the
        25 a query may hold), a page of 200 records each, as the search it replaces."""
        key_field = changes[0].key[0][0]
        values = [c.key[0][1] for c in changes]
        found: dict[str, str] = {}
        criteria = _coql_in(key_field, values)
        page = 0
        while True:
            query = (
                f"select {key_field} from {mapping.object} where {criteria} limit {COQL_PAGE} offset {page * COQL_PAGE}"
            )
            answer = await self._call("POST", "/coql", json={"select_query": query}, what=f"search {mapping.object}")
            if answer.status == 204 or _failure(answer) is not None:
                return found, answer  # 204: no record matches
            if (unreadable := listed(answer, "data")) is not None:
                # Not "no records": a delete would take the person's records for deleted already.
                return found, replace(answer, error=unreadable)
            for row in answer.body["data"]:
                found[str(row.get(key_field, "")).lower()] = str(row["id"])
            if not (answer.body.get("info") or {}).get("more_records"):
                return found, answer
            page += 1

    async def _membership(self, mapping: ObjectMapping, changes: list[Change]) -> BatchOutcome:
        """Campaign membership (the mapping's `list` is the Campaign's id) through the Campaign's related
        list: the records' ids by a COQL query (`_find`), then ``PUT /Campaigns/<id>/<Module>`` relating the entries and
        ``DELETE /Campaigns/<id>/<Module>?ids=`` delinking the exits. Relating again changes nothing."""
        ids, answer = await self._find(mapping, changes)
        if (error := _failure(answer)) is not None:
            return BatchOutcome.failed(error, answer.headers)
        results: dict[str, RecordResult] = {}
        add: dict[str, Change] = {}
        remove: dict[str, Change] = {}
        for change in changes:
            record_id = ids.get(change.key[0][1].lower())
            if record_id is None and change.op == REMOVE:
                results[change.record] = RecordResult(change.record, True, None, False)  # no record: no member
            elif record_id is None:
                missing = CrmError(NOT_FOUND, "NOT_FOUND", f"no {mapping.object} record with this key", 204)
                results[change.record] = RecordResult(change.record, False, error=missing)
            else:
                (remove if change.op == REMOVE else add)[record_id] = change
        headers = answer.headers
        path = f"/Campaigns/{mapping.list}/{mapping.object}"
        for ids_of, method in ((add, "PUT"), (remove, "DELETE")):
            if not ids_of:
                continue
            if method == "PUT":
                body = {"data": [{"id": i} for i in ids_of]}
                answer = await self._call("PUT", path, json=body, what="campaign members")
            else:
                answer = await self._call("DELETE", f"{path}?ids={','.join(ids_of)}", what="campaign members")
            headers = answer.headers
            per_record = answer.body.get("data") if isinstance(answer.body, dict) else None
            if not isinstance(per_record, list):
                error = _failure(answer) or CrmError(REJECTED, "UNEXPECTED_ANSWER", "", answer.status)
                return BatchOutcome.failed(error, headers)
            for item in per_record:
                record_id = str((item.get("details") or {}).get("id", ""))
                change = ids_of.get(record_id)
                if change is None:
                    continue
                if item.get("status") == "success":
                    results[change.record] = RecordResult(change.record, True, record_id, method == "PUT")
                else:
                    results[change.record] = RecordResult(
                        change.record, False, error=_record_error(item, answer.status)
                    )
        return BatchOutcome(results, None, headers)

    async def _delete(self, mapping: ObjectMapping, changes: list[Change]) -> BatchOutcome:
        """Privacy delete: the records' ids by a COQL query (`_find`), then ``DELETE /crm/v8/<Module>?ids=...`` (100 at
        most). A record Zoho does not have (never written, deleted already) counts as deleted."""
        ids, answer = await self._find(mapping, changes)
        if (error := _failure(answer)) is not None:
            return BatchOutcome.failed(error, answer.headers)
        results = {c.record: RecordResult(c.record, True, ids.get(c.key[0][1].lower()), False) for c in changes}
        by_id = {ids[c.key[0][1].lower()]: c for c in changes if c.key[0][1].lower() in ids}
        if not by_id:
            return BatchOutcome(results, None, answer.headers)
        deleted = await self._call(
            "DELETE", f"/{mapping.object}?ids={','.join(by_id)}", what=f"delete {mapping.object}"
        )
        if (error := _failure(deleted)) is not None and deleted.status != 400:
            return BatchOutcome.failed(error, deleted.headers)
        per_record = deleted.body.get("data") if isinstance(deleted.body, dict) else None
        if not isinstance(per_record, list):
            return BatchOutcome.failed(error or CrmError(REJECTED, "UNEXPECTED_ANSWER", "", deleted.status))
        for item in per_record:
            change = by_id.get(str((item.get("details") or {}).get("id", "")))
            if change is not None and item.get("status") != "success" and item.get("code") != "INVALID_DATA":
                results[change.record] = RecordResult(change.record, False, error=_record_error(item, deleted.status))
        return BatchOutcome(results, None, deleted.headers)


def _coql_text(value: str) -> str:
    """A COQL string literal: quoted, its backslashes and quotes escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _coql_in(field: str, values: list[str]) -> str:
    """COQL criteria matching `field` against `values`: an ``in`` of at most 50 values each, joined by ``or``
    (Zoho: 50 values an ``in``, 25 criteria a query, each bracketed when there are several)."""
    clauses = [
        f"{field} in ({', '.join(_coql_text(v) for v in values[start : start + COQL_IN_LIMIT])})"
        for start in range(0, len(values), COQL_IN_LIMIT)
    ]
    assert len(clauses) <= COQL_CRITERIA, "a batch's values fit one query"
    criteria = clauses[-1]
    for clause in reversed(clauses[:-1]):  # more than two nest: (A) or ((B) or (C))
        criteria = f"({clause}) or ({criteria})"
    return criteria


def _record_error(item: dict[str, Any], status: int) -> CrmError:
    code = str(item.get("code", ""))
    details = item.get("details") or {}
    reason = {"MANDATORY_NOT_FOUND": INVALID_VALUE, "DUPLICATE_DATA": DUPLICATE, "INVALID_DATA": INVALID_VALUE}.get(
        code, REJECTED
    )
    if code == "INVALID_DATA" and "expected_data_type" not in details and details.get("api_name") not in (None, "id"):
        reason = UNKNOWN_FIELD  # Zoho names a field it does not know without an expected type
    field = details.get("api_name")
    return CrmError(reason, code, str(item.get("message", "")), status, fields=(field,) if field else ())


def _failure(answer: Answer) -> CrmError | None:
    if answer.error is not None:
        return answer.error
    if answer.status < 300:
        return unexpected(answer)
    body = answer.body if isinstance(answer.body, dict) else {}
    code, message = str(body.get("code", answer.status)), str(body.get("message", ""))
    if answer.status == 429:
        return CrmError(THROTTLED, code, message, 429, daily=code == "LIMIT_REACHED")
    transient = transport_error(answer, code, message)
    if transient is not None:
        return transient
    if answer.status == 403:
        return CrmError(PERMISSION, code, message, 403, every_record=True)
    if code == "INVALID_MODULE":
        return CrmError(UNKNOWN_FIELD, code, message, answer.status, every_record=True)
    return CrmError(INVALID_VALUE, code, message, answer.status)
