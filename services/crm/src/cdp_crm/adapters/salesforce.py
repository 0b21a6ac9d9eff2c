"""Salesforce: sObject Collections upsert by external id, Bulk API 2.0 for backfills, OAuth 2.0.

Auth: ``POST <login_url>/services/oauth2/token`` with the client credentials flow (consumer key and secret)
or the JWT bearer flow (an RS256 assertion signed with the connected app's key: ``iss`` the consumer key,
``sub`` the integration user, ``aud`` the login URL); the answer's ``instance_url`` is where the REST API
lives. A 401 ``INVALID_SESSION_ID`` gets one new token and one retry.

Writes: ``PATCH /services/data/vXX.X/composite/sobjects/<Object>/<ExternalIdField>`` with at most 200
records and ``allOrNone=false``, so each record succeeds or fails on its own (results come back in request
order, ``created`` telling insert from update). Values are JSON: None clears a field. A backfill goes
through Bulk API 2.0 instead (`bulk_upsert`: one ingest job, CSV with ``#N/A`` to clear, per-row
results matched back by the external id column).

Privacy deletes: the records' Ids read by SOQL on the match key, then one sObject Collections
``DELETE /composite/sobjects?ids=...&allOrNone=false`` (at most 200 Ids). A SOQL query naming match-key
values (this one, campaign membership's, the presence check's) is a Composite subrequest: the values, an
email maybe, travel in a body, never in a request line.

Limits: every answer carries ``Sforce-Limit-Info: api-usage=n/limit`` (observed by the budget); past the
daily allocation Salesforce answers 403 ``REQUEST_LIMIT_EXCEEDED`` and changes nothing: THROTTLED, daily.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import aiohttp
import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cdp_crm.adapters.http import (
    Answer,
    AnswerTooLarge,
    Reserve,
    exchange,
    listed,
    metered_read,
    read_json,
    transport_error,
)
from cdp_crm.domain.coalesce import DELETE, REMOVE, UPSERT, Change
from cdp_crm.domain.isolation import (
    ANSWER_LOST,
    AUTH,
    DUPLICATE,
    INVALID_VALUE,
    NOT_FOUND,
    PERMISSION,
    REJECTED,
    THROTTLED,
    UNAVAILABLE,
    UNKNOWN_FIELD,
    BatchOutcome,
    CrmError,
    RecordResult,
)
from cdp_crm.domain.mapping import FieldSchema, ObjectMapping, ObjectSchema

if TYPE_CHECKING:
    from cdp_crm.budgets import SharedBudget

API_VERSION = "62.0"
PLACEHOLDER = "(deleted)"  # privacy.PLACEHOLDER: what an anonymised record holds in place of a text naming the person
COLLECTION_LIMIT = 200
COMPOSITE_LIMIT = 25
LOGIN = "https://login.salesforce.com"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_REASONS = {
    "INVALID_EMAIL_ADDRESS": INVALID_VALUE,
    "STRING_TOO_LONG": INVALID_VALUE,
    "REQUIRED_FIELD_MISSING": INVALID_VALUE,
    "INVALID_TYPE_ON_FIELD_IN_RECORD": INVALID_VALUE,
    "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST": INVALID_VALUE,
    "FIELD_CUSTOM_VALIDATION_EXCEPTION": INVALID_VALUE,
    "INVALID_CROSS_REFERENCE_KEY": INVALID_VALUE,
    "INVALID_FIELD": UNKNOWN_FIELD,
    "INVALID_FIELD_FOR_INSERT_UPDATE": PERMISSION,
    "INSUFFICIENT_ACCESS_OR_READONLY": PERMISSION,
    "INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY": PERMISSION,
    "DUPLICATE_EXTERNAL_ID": DUPLICATE,
    "DUPLICATE_VALUE": DUPLICATE,
    "DUPLICATES_DETECTED": DUPLICATE,
    "NOT_FOUND": NOT_FOUND,
    "ENTITY_IS_DELETED": NOT_FOUND,
}


class SalesforceAdapter:
    kind = "salesforce"
    batch_limit = COLLECTION_LIMIT

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        client_id: str,
        client_secret: str | None = None,
        username: str | None = None,
        private_key: str | bytes | None = None,
        login_url: str = LOGIN,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if client_secret is None and (username is None or private_key is None):
            raise ValueError("Salesforce needs a client secret, or a username and a private key (JWT bearer)")
        self._session = session
        self._client_id = client_id
        self._client_secret = client_secret
        self._username = username
        self._key = (
            serialization.load_pem_private_key(
                private_key.encode() if isinstance(private_key, str) else private_key, None
            )
            if private_key is not None
            else None
        )
        self._login = login_url.rstrip("/")
        self._timeout = timeout
        self._clock = clock
        self._token: str | None = None
        self._instance: str | None = None
        self._token_lock = asyncio.Lock()

    async def close(self) -> None:
        pass  # the session is the caller's

    def cost(self, mapping: ObjectMapping, n: int, op: str = UPSERT) -> int:
        if op == DELETE:
            return 2  # the records' Ids by SOQL, then one sObject Collections DELETE
        if mapping.kind == "list":
            # Two queries (the people's records, their memberships), then Composite writes.
            return 2 + -(-n // COMPOSITE_LIMIT)
        return 1

    # --- auth ------------------------------------------------------------------------------------

    async def _authenticate(self, stale: str | None = None) -> CrmError | None:
        async with self._token_lock:
            if self._token is not None and self._token != stale:
                return None  # another request already renewed it
            if self._key is not None and self._username is not None:
                form = {"grant_type": JWT_BEARER, "assertion": self._assertion()}
            else:
                form = {
                    "grant_type": "client_credentials",
                    "client_id": self._client_id,
                    "client_secret": self._client_secret or "",
                }
            try:
                async with self._session.post(
                    self._login + "/services/oauth2/token",
                    data=form,
                    timeout=aiohttp.ClientTimeout(total=self._timeout),
                    allow_redirects=False,
                ) as response:
                    body = await read_json(response)
                    status = response.status
            except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError, ValueError, AnswerTooLarge):
                return CrmError(AUTH, "TOKEN_UNAVAILABLE", "the token endpoint did not answer")
            if status != 200 or not isinstance(body, dict) or "access_token" not in body:
                code = str(body.get("error", status)) if isinstance(body, dict) else str(status)
                return CrmError(AUTH, code, "Salesforce refused the credentials", status)
            self._token, self._instance = body["access_token"], body["instance_url"].rstrip("/")
            return None

    def _assertion(self) -> str:
        assert isinstance(self._key, rsa.RSAPrivateKey), "the JWT bearer flow signs with an RSA key"

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        header = b64(orjson.dumps({"alg": "RS256"}))
        claims = {"iss": self._client_id, "sub": self._username, "aud": self._login, "exp": int(self._clock()) + 180}
        payload = b64(orjson.dumps(claims))
        signature = self._key.sign(f"{header}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{header}.{payload}.{b64(signature)}"

    async def read(
        self, path: str, budget: SharedBudget, clock: Callable[[], float] = time.time, *, what: str = ""
    ) -> Answer:
        """An authenticated GET under /services/data/vXX.X (a query, its ``nextRecordsUrl``) for the change
        readers: a unit of the account's shared budget per request, a new token and one retry on an expired
        session, and the answer's ``error`` set by this adapter's error mapping (REQUEST_LIMIT_EXCEEDED is
        THROTTLED, daily when the day's TotalRequests are spent) - None when Salesforce answered it."""
        return await metered_read(
            budget, clock, lambda reserve: self._call("GET", path, what=what, reserve=reserve), _failure
        )

    async def _call(
        self, method: str, path: str, *, json: Any = None, data: str | None = None, content_type: str | None = None,
        what: str = "", reserve: Reserve | None = None,
    ) -> Answer:  # fmt: skip
        """A REST call under /services/data/vXX.X; one new token and one retry on an expired session."""
        for attempt in (0, 1):
            if self._token is None:
                failed = await self._authenticate()
                if failed is not None:
                    return Answer(0, {}, None, failed)
            token = self._token
            if reserve is not None:
                await reserve()
            headers = {"Authorization": f"Bearer {token}"}
            if content_type is not None:
                headers["Content-Type"] = content_type
            answer = await exchange(
                self._session,
                method,
                f"{self._instance}/services/data/v{API_VERSION}{path}",
                json=json,
                data=data,
                headers=headers,
                timeout=self._timeout,
                what=what,
            )
            if answer.status == 401 and attempt == 0:
                failed = await self._authenticate(stale=token)
                if failed is not None:
                    return Answer(0, {}, None, failed)
                continue
            return answer
        raise AssertionError("unreachable")

    # --- describe --------------------------------------------------------------------------------

    async def describe(self, objects: list[str]) -> dict[str, ObjectSchema]:
        schema: dict[str, ObjectSchema] = {}
        for obj in objects:
            answer = await self._call("GET", f"/sobjects/{obj}/describe", what=f"describe {obj}")
            if answer.status == 404:
                continue
            error = _failure(answer)
            if error is not None:
                raise ConnectionError(f"describing {obj} failed: {error.reason} {error.code}")
            fields = {
                f["name"]: FieldSchema(
                    f["name"],
                    f.get("type", "string"),
                    bool(f.get("externalId")) or f["name"] == "Id",
                    bool(f.get("updateable")),
                    # What Salesforce itself calls required: no null, set on create, and no default then.
                    not f.get("nillable", True) and bool(f.get("createable")) and not f.get("defaultedOnCreate"),
                )
                for f in answer.body.get("fields", [])
            }
            schema[obj] = ObjectSchema(obj, fields)
        return schema

    # --- writes ----------------------------------------------------------------------------------

    async def send(self, mapping: ObjectMapping, changes: list[Change]) -> BatchOutcome:
        """sObject Collections upsert by the match key's external id field, allOrNone=false."""
        assert len(changes) <= COLLECTION_LIMIT, "the engine batches by batch_limit"
        if mapping.kind == "list":
            return await self._membership(mapping, changes)
        if changes[0].op == DELETE:
            return await self._delete(mapping, changes)
        external_id = changes[0].key[0][0]
        records = [
            {"attributes": {"type": mapping.object}, **c.fields, **_link(c), external_id: c.key[0][1]} for c in changes
        ]
        answer = await self._call(
            "PATCH",
            f"/composite/sobjects/{mapping.object}/{external_id}",
            json={"allOrNone": False, "records": records},
            what=mapping.object,
        )
        error = _failure(answer)
        if error is not None:
            return BatchOutcome.failed(error, answer.headers)
        results: dict[str, RecordResult] = {}
        if not isinstance(answer.body, list) or len(answer.body) != len(changes):
            return BatchOutcome({}, None, answer.headers)  # nothing matched: every record is asked again
        for change, item in zip(changes, answer.body, strict=True):
            if item.get("success"):
                results[change.record] = RecordResult(change.record, True, item.get("id"), bool(item.get("created")))
            else:
                problem = (item.get("errors") or [{}])[0]
                code = str(problem.get("statusCode", ""))
                crm_error = CrmError(
                    _REASONS.get(code, REJECTED), code, str(problem.get("message", "")), answer.status,
                    fields=tuple(problem.get("fields") or ()),
                )  # fmt: skip
                results[change.record] = RecordResult(change.record, False, error=crm_error)
        return BatchOutcome(results, None, answer.headers)

    async def claim(self, mapping: ObjectMapping, crm_id: str, field: str, value: str) -> tuple[bool | None, dict]:
        """Stamp `field` = `value` (the external id) on the record `crm_id` of `mapping`'s object, one a CRM
        user made: True once it holds it, False when there is no such record (or it is of another object)
        or it holds another value (another person's), None on an error. Two requests: a read, the update."""
        path = f"/sobjects/{mapping.object}/{urllib.parse.quote(crm_id, safe='')}"
        answer = await self._call("GET", f"{path}?fields={urllib.parse.quote(field)}", what="claim")
        if answer.status in (400, 404):
            return False, answer.headers
        if _failure(answer) is not None or not isinstance(answer.body, dict):
            return None, answer.headers
        held = str(answer.body.get(field) or "")
        if held:
            return held.lower() == value.lower(), answer.headers
        updated = await self._call("PATCH", path, json={field: value}, what="claim")
        if updated.status in (400, 404):
            return False, updated.headers
        return (None if _failure(updated) is not None else True), updated.headers

    async def find(
        self, mapping: ObjectMapping, field: str, values: list[str], read: list[str]
    ) -> tuple[dict[str, dict[str, Any]] | None, dict]:
        """The records of `mapping`'s object whose `field` holds one of `values`: Salesforce Id -> their
        `read` fields, by SOQL; None on an error."""
        listed_values = ", ".join(_soql_text(v) for v in values)
        names = ", ".join(sorted({"Id", field, *read}))
        found, answer = await self._query(
            f"SELECT {names} FROM {mapping.object} WHERE {field} IN ({listed_values})", "privacy lookup", private=True
        )
        if _failure(answer) is not None:
            return None, answer.headers
        return {str(r["Id"]): r for r in found}, answer.headers

    async def erase(
        self, mapping: ObjectMapping, crm_ids: list[str], fields: dict[str, Any] | None
    ) -> tuple[bool | None, dict]:
        """Delete these records by Id (sObject Collections DELETE; `fields` None) or write `fields` to each
        (their personal data cleared); True once done (a record gone already counts), None on an error."""
        return await self.erase_in(mapping.object, crm_ids, fields)

    async def erase_in(self, obj: str, crm_ids: list[str], fields: dict[str, Any] | None) -> tuple[bool | None, dict]:
        """`erase` for records of any object (a Case a Salesforce user opened): at most `batch_limit` Ids."""
        if fields is None:
            query = urllib.parse.urlencode({"ids": ",".join(crm_ids), "allOrNone": "false"})
            answer = await self._call("DELETE", f"/composite/sobjects?{query}", what=f"delete {obj}")
            if _failure(answer) is not None:
                return None, answer.headers
            for item in answer.body if isinstance(answer.body, list) else []:
                code = str(((item.get("errors") or [{}])[0]).get("statusCode", ""))
                if not item.get("success") and code not in ("ENTITY_IS_DELETED", "INVALID_CROSS_REFERENCE_KEY"):
                    return None, answer.headers
            return True, answer.headers
        results, headers = await self._update(obj, crm_ids, fields)
        return (None if results is None or any(results.values()) else True), headers

    # --- records a Salesforce user opened about an erased contact ----------------------------------

    # Contact -> the objects naming it that an erasure reads: Cases by ContactId, and by SuppliedEmail (web-
    # and email-to-case: raised from the person's email, maybe with no contact).
    LINKED: ClassVar[dict[str, dict[str, tuple[str, ...]]]] = {
        "Contact": {"Case": ("Subject", "Description", "SuppliedEmail", "SuppliedPhone", "SuppliedName")}
    }

    async def linked(
        self, contacts: list[tuple[str, str]], emails: list[str], meter: Callable[[Any], Awaitable[Any]]
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """The Cases of these contacts ((object, Id) each: Contacts only) or raised from one of `emails`:
        ("Case", Id, their text fields) each. One SOQL query (``ContactId IN (...) OR SuppliedEmail IN
        (...)``) as a Composite subrequest - the emails in a body, never a request line -, through `meter`
        (the account's budget; it raises when Salesforce did not answer)."""
        ids = sorted({crm_id for obj, crm_id in contacts if obj == "Contact"})
        if not ids and not emails:
            return []
        fields = self.LINKED["Contact"]["Case"]
        where = []
        if ids:
            where.append(f"ContactId IN ({', '.join(_soql_text(i) for i in ids)})")
        if emails:
            where.append(f"SuppliedEmail IN ({', '.join(_soql_text(e) for e in emails)})")
        soql = f"SELECT Id, {', '.join(fields)} FROM Case WHERE {' OR '.join(where)}"
        records = await meter(self._private_query(soql, "privacy cases"))
        return [("Case", str(r["Id"]), {f: r.get(f) for f in fields}) for r in records]

    def linked_fields(self, obj: str, record: dict[str, Any], names: Callable[[Any], bool]) -> dict[str, Any]:
        """What anonymises a linked Case: a subject or description naming the person replaced by the
        placeholder; the email or phone they supplied cleared, with the name they supplied beside it (an
        email field takes no placeholder); {} when no field names them."""
        if obj != "Case":
            return {}
        fields: dict[str, Any] = {f: PLACEHOLDER for f in ("Subject", "Description") if names(record.get(f))}
        supplied = {f: None for f in ("SuppliedEmail", "SuppliedPhone") if names(record.get(f))}
        if supplied and record.get("SuppliedName"):
            supplied["SuppliedName"] = None
        return {**fields, **supplied}

    async def _private_query(self, soql: str, what: str) -> tuple[list[dict[str, Any]] | None, dict]:
        found, answer = await self._query(soql, what, private=True)
        return (None if _failure(answer) is not None else found), answer.headers

    async def update(
        self, mapping: ObjectMapping, crm_ids: list[str], fields: dict[str, Any]
    ) -> tuple[dict[str, CrmError | None] | None, dict]:
        """Write `fields` to these records by Id (``PATCH /sobjects/<object>/<Id>``, a request each), which
        never creates one: per Id None once written or gone already (404), else Salesforce's refusal of it
        (REQUIRED_FIELD_MISSING); None when Salesforce failed (a transient error: the caller tries again)."""
        return await self._update(mapping.object, crm_ids, fields)

    async def _update(
        self, obj: str, crm_ids: list[str], fields: dict[str, Any]
    ) -> tuple[dict[str, CrmError | None] | None, dict]:
        results: dict[str, CrmError | None] = {}
        headers: dict = {}
        for crm_id in crm_ids:
            path = f"/sobjects/{obj}/{urllib.parse.quote(crm_id, safe='')}"
            answer = await self._call("PATCH", path, json=fields, what="anonymise")
            headers = answer.headers
            error = None if answer.status == 404 else _failure(answer)
            if error is not None and error.transient:
                return None, headers
            results[crm_id] = error
        return results, headers

    async def present(self, mapping: ObjectMapping, field: str, values: list[str]) -> tuple[set[str] | None, dict]:
        """Which of these external id values (lower case) a record of `mapping`'s object holds in Salesforce,
        by SOQL in a Composite body (a match key may hold an email: never in a request line); None when
        Salesforce did not say (an error). At most `batch_limit` values."""
        listed_values = ", ".join(_soql_text(v) for v in values)
        found, answer = await self._query(
            f"SELECT {field} FROM {mapping.object} WHERE {field} IN ({listed_values})", "presence lookup", private=True
        )
        if _failure(answer) is not None:
            return None, answer.headers
        return {str(r.get(field, "")).lower() for r in found}, answer.headers

    async def _delete(self, mapping: ObjectMapping, changes: list[Change]) -> BatchOutcome:
        """sObject Collections DELETE (``/composite/sobjects?ids=...&allOrNone=false``) of the records the
        match key finds by SOQL (in a Composite body: the key's values in no request line). A record not found,
        or already deleted, counts as deleted."""
        key_field = changes[0].key[0][0]
        values = ", ".join(_soql_text(c.key[0][1]) for c in changes)
        found, answer = await self._query(
            f"SELECT Id, {key_field} FROM {mapping.object} WHERE {key_field} IN ({values})",
            "delete lookup",
            private=True,
        )
        if (error := _failure(answer)) is not None:
            return BatchOutcome.failed(error, answer.headers)
        ids = {str(r.get(key_field, "")).lower(): r["Id"] for r in found}
        results: dict[str, RecordResult] = {}
        targets: dict[str, Change] = {}
        for change in changes:
            record_id = ids.get(change.key[0][1].lower())
            if record_id is None:
                results[change.record] = RecordResult(change.record, True, None, False)  # already gone
            else:
                targets[record_id] = change
        if not targets:
            return BatchOutcome(results, None, answer.headers)
        query = urllib.parse.urlencode({"ids": ",".join(targets), "allOrNone": "false"})
        deleted = await self._call("DELETE", f"/composite/sobjects?{query}", what=f"delete {mapping.object}")
        if (error := _failure(deleted)) is not None:
            return BatchOutcome.failed(error, deleted.headers)
        for item in deleted.body if isinstance(deleted.body, list) else []:
            change = targets.get(str(item.get("id", "")))
            if change is None:
                continue
            problem = (item.get("errors") or [{}])[0]
            code = str(problem.get("statusCode", ""))
            if item.get("success") or code in ("ENTITY_IS_DELETED", "INVALID_CROSS_REFERENCE_KEY"):
                results[change.record] = RecordResult(change.record, True, item.get("id"), False)
            else:
                error = CrmError(_REASONS.get(code, REJECTED), code, str(problem.get("message", "")), deleted.status)
                results[change.record] = RecordResult(change.record, False, error=error)
        return BatchOutcome(results, None, deleted.headers)

    async def _query(self, soql: str, what: str, *, private: bool = False) -> tuple[list[dict[str, Any]], Answer]:
        """Every record a SOQL query returns (following nextRecordsUrl), and the last answer. `private`: the
        query names personal data (an erasure's search by email or phone), so it travels in a request's
        body (a Composite subrequest), never in a request line, which Salesforce's access logs keep; the
        next pages' URLs hold only a query locator."""
        if private:
            answer = await self._in_body("/query?" + urllib.parse.urlencode({"q": soql}), what)
        else:
            answer = await self._call("GET", "/query?" + urllib.parse.urlencode({"q": soql}), what=what)
        records: list[dict[str, Any]] = []
        while _failure(answer) is None:
            if (unreadable := listed(answer, "records")) is not None:
                # Not "no records": a delete would take the person's records for deleted already.
                return records, replace(answer, error=unreadable)
            records.extend(answer.body["records"])
            following = answer.body.get("nextRecordsUrl")
            if answer.body.get("done", True) or not isinstance(following, str) or not following:
                break
            answer = await self._call("GET", following.split(f"/v{API_VERSION}", 1)[-1], what=what)
        return records, answer

    async def _in_body(self, path: str, what: str) -> Answer:
        """GET `path` as the one subrequest of a Composite request: its answer as if asked directly."""
        request = {"method": "GET", "url": f"/services/data/v{API_VERSION}{path}", "referenceId": "read"}
        answer = await self._call("POST", "/composite", json={"compositeRequest": [request]}, what=what)
        if _failure(answer) is not None:
            return answer
        answers = answer.body.get("compositeResponse") if isinstance(answer.body, dict) else None
        if not isinstance(answers, list) or len(answers) != 1 or not isinstance(answers[0], dict):
            error = CrmError(
                UNAVAILABLE, "UNEXPECTED_ANSWER", "the composite answer holds no subrequest", answer.status
            )
            return replace(answer, error=error)
        inner = answers[0]
        return replace(answer, status=int(inner.get("httpStatusCode", 500)), body=inner.get("body"))

    async def _membership(self, mapping: ObjectMapping, changes: list[Change]) -> BatchOutcome:
        """Campaign membership (the mapping's `list` is the Campaign Id): the people's records found by
        the match key, their memberships read, then only what differs written through Composite -
        CampaignMember created for an entry, deleted for an exit. Reading first is what makes a retry
        after a lost answer change nothing: CampaignId cannot be updated, so members are not upserted."""
        key_field = changes[0].key[0][0]
        values = ", ".join(_soql_text(c.key[0][1]) for c in changes)
        people, answer = await self._query(
            f"SELECT Id, {key_field} FROM {mapping.object} WHERE {key_field} IN ({values})",
            "campaign people",
            private=True,
        )
        if (error := _failure(answer)) is not None:
            return BatchOutcome.failed(error, answer.headers)
        record_ids = {str(p.get(key_field, "")).lower(): p["Id"] for p in people}
        member_field = f"{mapping.object}Id"  # ContactId or LeadId
        members: dict[str, str] = {}
        if record_ids:
            ids = ", ".join(_soql_text(i) for i in record_ids.values())
            rows, answer = await self._query(
                f"SELECT Id, {member_field} FROM CampaignMember WHERE CampaignId = {_soql_text(str(mapping.list))} "
                f"AND {member_field} IN ({ids})",
                "campaign members",
            )
            if (error := _failure(answer)) is not None:
                return BatchOutcome.failed(error, answer.headers)
            members = {row[member_field]: row["Id"] for row in rows}
        results: dict[str, RecordResult] = {}
        writes: list[tuple[Change, dict[str, Any]]] = []
        for change in changes:
            record_id = record_ids.get(change.key[0][1].lower())
            if record_id is None:
                missing = CrmError(NOT_FOUND, "NOT_FOUND", f"no {mapping.object} with this {key_field}", 200)
                results[change.record] = RecordResult(change.record, False, error=missing)
            elif change.op == REMOVE and record_id in members:
                url = f"/services/data/v{API_VERSION}/sobjects/CampaignMember/{members[record_id]}"
                writes.append((change, {"method": "DELETE", "url": url}))
            elif change.op != REMOVE and record_id not in members:
                body = {"CampaignId": mapping.list, member_field: record_id}
                url = f"/services/data/v{API_VERSION}/sobjects/CampaignMember"
                writes.append((change, {"method": "POST", "url": url, "body": body}))
            else:
                results[change.record] = RecordResult(change.record, True, members.get(record_id), False)
        headers = answer.headers
        for start in range(0, len(writes), COMPOSITE_LIMIT):
            chunk = writes[start : start + COMPOSITE_LIMIT]
            requests = [{**request, "referenceId": f"m{n}"} for n, (_, request) in enumerate(chunk)]
            answer = await self._call(
                "POST", "/composite", json={"allOrNone": False, "compositeRequest": requests}, what="campaign members"
            )
            headers = answer.headers
            if (error := _failure(answer)) is not None:
                for change, _ in chunk:
                    results[change.record] = RecordResult(change.record, False, error=error)
                continue
            answers = {a.get("referenceId"): a for a in answer.body.get("compositeResponse", [])}
            for n, (change, request) in enumerate(chunk):
                sub = answers.get(f"m{n}")
                if sub is None:
                    continue  # unanswered: asked again
                status = int(sub.get("httpStatusCode", 0))
                if status < 300:
                    created = request["method"] == "POST"
                    crm_id = (sub.get("body") or {}).get("id") if created else None
                    results[change.record] = RecordResult(change.record, True, crm_id, created)
                elif status == 404 and request["method"] == "DELETE":
                    results[change.record] = RecordResult(change.record, True, None, False)  # already gone
                else:
                    problem = (sub.get("body") or [{}])[0] if isinstance(sub.get("body"), list) else {}
                    code = str(problem.get("errorCode", status))
                    reason = _REASONS.get(code, REJECTED)
                    results[change.record] = RecordResult(
                        change.record, False, error=CrmError(reason, code, str(problem.get("message", "")), status)
                    )
        return BatchOutcome(results, None, headers)

    async def bulk_upsert(
        self,
        mapping: ObjectMapping,
        changes: list[Change],
        *,
        poll: Callable[[float], Awaitable[None]] = asyncio.sleep,
        poll_seconds: float = 1.0,
        max_polls: int = 3600,
        progress: Callable[[str, str, int], Awaitable[None]] | None = None,
    ) -> BatchOutcome:
        """A backfill's records through Bulk API 2.0: one ingest job (create, upload the CSV, close, poll
        the state, read the successful, failed and unprocessed rows).

        Returns per-record results like `send`: a failed row carries Salesforce's ``sf__Error``, an
        unprocessed one (the job was aborted) ``BULK_UNPROCESSED``. A job that fails as a whole is one
        error. Each poll is a request too: `poll` is awaited before each (reserve budget there), and
        `progress(job id, state, rows processed)` after it. A job still running after `max_polls` is
        ANSWER_LOST: its rows may yet be written, and sending them again upserts the same records."""
        external_id = changes[0].key[0][0]
        # The external id first, then every field any change carries (an empty cell leaves it unchanged).
        columns = list(dict.fromkeys([external_id, *(f for c in changes for f in c.fields)]))
        rest = columns[1:]
        by_key: dict[str, Change] = {}
        rows = []
        for change in changes:
            value = change.key[0][1]
            by_key[value.lower()] = change
            fields = change.fields
            rows.append([value, *[_cell(fields[c]) if c in fields else "" for c in rest]])
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        del rows
        spec = {"object": mapping.object, "externalIdFieldName": external_id, "contentType": "CSV",
                "operation": "upsert", "lineEnding": "LF"}  # fmt: skip
        created = await self._call("POST", "/jobs/ingest", json=spec, what="bulk job")
        if (error := _failure(created)) is not None:
            return BatchOutcome.failed(error, created.headers)
        job = created.body["id"]
        uploaded = await self._call(
            "PUT", f"/jobs/ingest/{job}/batches", data=out.getvalue(), content_type="text/csv", what="bulk upload"
        )
        if (error := _failure(uploaded)) is not None:
            return BatchOutcome.failed(error, uploaded.headers)
        closed = await self._call("PATCH", f"/jobs/ingest/{job}", json={"state": "UploadComplete"}, what="bulk close")
        if (error := _failure(closed)) is not None:
            return BatchOutcome.failed(error, closed.headers)
        state, headers = closed.body.get("state"), closed.headers
        polls = 0
        while state not in ("JobComplete", "Failed", "Aborted"):
            if polls >= max_polls:
                still = CrmError(ANSWER_LOST, "BULK_JOB_RUNNING", f"job still {state} after {polls} polls")
                return BatchOutcome.failed(still, headers)
            polls += 1
            await poll(poll_seconds)
            info = await self._call("GET", f"/jobs/ingest/{job}", what="bulk poll")
            if (error := _failure(info)) is not None:
                return BatchOutcome.failed(error, info.headers)
            state, headers = info.body.get("state"), info.headers
            if progress is not None:
                await progress(job, str(state), int(info.body.get("numberRecordsProcessed", 0)))
            if state == "Failed":
                message = str(info.body.get("errorMessage", ""))
                return BatchOutcome.failed(CrmError(REJECTED, "BULK_JOB_FAILED", message, 200), headers)
        results: dict[str, RecordResult] = {}
        for kind in ("successfulResults", "failedResults", "unprocessedrecords"):
            answer = await self._call("GET", f"/jobs/ingest/{job}/{kind}", what="bulk results")
            if (error := _failure(answer)) is not None:
                return BatchOutcome(results, None, answer.headers)  # the rest is asked again
            headers = answer.headers
            rows = csv.reader(io.StringIO(str(answer.body or "")))
            header = next(rows, [])
            column = {name: n for n, name in enumerate(header)}
            if external_id not in column:
                continue  # no rows (or not a result file): what it should have held is asked again
            at = column[external_id]
            unprocessed = CrmError(REJECTED, "BULK_UNPROCESSED", f"the job ended {state} before this row", 200)
            for row in rows:
                change = by_key.get(row[at].lower()) if at < len(row) else None
                if change is None:
                    continue
                record = change.record
                if kind == "successfulResults":
                    results[record] = RecordResult(record, True, _column(row, column, "sf__Id") or None,
                                                   _column(row, column, "sf__Created") == "true")  # fmt: skip
                elif kind == "failedResults":
                    code, _, message = _column(row, column, "sf__Error").partition(":")
                    error = CrmError(_REASONS.get(code, REJECTED), code, message, 200)
                    results[record] = RecordResult(record, False, error=error)
                else:
                    results[record] = RecordResult(record, False, error=unprocessed)
        return BatchOutcome(results, None, headers)

    def bulk_cost(self) -> int:
        """Budget units a bulk job takes besides its polls: create, upload, close, three result reads."""
        return 6


def _soql_text(value: str) -> str:
    """A SOQL string literal: backslashes and quotes escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _link(change: Change) -> dict[str, Any]:
    """The person's record a task or case is about, as a relationship by external id: `WhoId` ->
    ``"Who": {"attributes": {"type": "Contact"}, "CDP_Id__c": "..."}`` (the type makes polymorphic
    lookups like Who unambiguous)."""
    link = change.link
    if link is None or link.field is None:
        return {}
    field = link.field
    relationship = field[:-3] + "__r" if field.endswith("__c") else field.removesuffix("Id")
    return {relationship: {"attributes": {"type": link.object}, **dict(link.key)}}


def _column(row: list[str], column: dict[str, int], name: str) -> str:
    """A result row's cell by its column's name ("" when the file has no such column)."""
    n = column.get(name)
    return row[n] if n is not None and n < len(row) else ""


def _cell(value: Any) -> str:
    if type(value) is str:
        return value  # most values: no conversion
    if value is None:
        return "#N/A"  # Bulk API 2.0's "clear this field"; an empty cell leaves it unchanged
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _failure(answer: Answer) -> CrmError | None:
    """The error of a request Salesforce refused as a whole (None when it answered per record or OK)."""
    if answer.error is not None:
        return answer.error
    if answer.status < 300:
        return None
    problem = answer.body[0] if isinstance(answer.body, list) and answer.body else {}
    code = str(problem.get("errorCode", answer.status)) if isinstance(problem, dict) else str(answer.status)
    message = str(problem.get("message", "")) if isinstance(problem, dict) else ""
    if code == "REQUEST_LIMIT_EXCEEDED":
        # TotalRequests is the daily allocation; other limits (concurrency) clear within the window.
        return CrmError(THROTTLED, code, message, answer.status, daily="TotalRequests" in message)
    transient = transport_error(answer, code, message)
    if transient is not None:
        return transient
    if answer.status == 404 or code in ("INVALID_FIELD", "NOT_FOUND"):
        return CrmError(UNKNOWN_FIELD, code, message, answer.status, every_record=True)
    if answer.status == 403:
        return CrmError(PERMISSION, code, message, answer.status, every_record=True)
    return CrmError(_REASONS.get(code, REJECTED), code, message, answer.status)
