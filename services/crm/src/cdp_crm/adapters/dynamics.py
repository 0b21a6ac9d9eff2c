"""Dynamics 365 / Dataverse Web API: upsert by alternate key in ``$batch`` change sets, Entra ID tokens.

Auth: ``POST <authority>/<tenant>/oauth2/v2.0/token`` (client credentials, scope ``<org url>/.default``);
a 401 gets one new token and one retry.

Writes: one ``POST /api/data/v9.2/$batch`` per call (service protection counts it as one request), each
record in its own change set holding ``PATCH <set>(<key>='<value>')`` - an upsert by the alternate key,
so a retry after a lost answer updates the same row. A change set is all or nothing, so one change set per
record keeps one record's refusal from rolling back the others; its ``Content-ID`` maps the answer back.
Marketing lists (a list mapping's `list` is the list's id): members' rows read by alternate key (a GET
inside a ``$batch`` body, so the key's values are in no request line), then ``AddMemberList`` / the
``list<type>_association`` disassociated in one ``$batch``.
update_only adds ``If-Match: *`` (404 when the row does not exist). Privacy deletes are
``DELETE <set>(<key>='<value>')`` in the same change sets; a 404 means the row is already gone. ``Prefer: return=representation``
tells a created row (201) from an updated one (200).

Schema: `describe` reads each entity set's table definition (``EntityDefinitions``: attributes, alternate
keys, lookups' navigation properties), one request per object, so mappings are checked at start.

Limits: service protection answers 429 with ``Retry-After`` (error 0x80072322); answers may carry
``x-ms-ratelimit-burst-remaining-xrm-requests``, which the budget observes.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import aiohttp
import orjson

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
    AUTH,
    DUPLICATE,
    INVALID_VALUE,
    NOT_FOUND,
    PERMISSION,
    REJECTED,
    UNAVAILABLE,
    UNKNOWN_FIELD,
    BatchOutcome,
    CrmError,
    RecordResult,
)
from cdp_crm.domain.mapping import FieldSchema, ObjectMapping, ObjectSchema

if TYPE_CHECKING:
    from cdp_crm.budgets import SharedBudget

API = "/api/data/v9.2"
NAMESPACE = "Microsoft.Dynamics.CRM"  # of the Web API's actions (AddMemberList)
AUTHORITY = "https://login.microsoftonline.com"
BATCH_LIMIT = 1000
# Records per $batch: well under the 1000-operation limit, so a batch stays a short request.
RECORDS_PER_BATCH = 100
PLACEHOLDER = "(deleted)"  # privacy.PLACEHOLDER: what an anonymised row holds in place of a text naming the person
_GUID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)  # in a $filter unquoted


class DynamicsAdapter:
    kind = "dynamics"
    batch_limit = RECORDS_PER_BATCH

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        url: str,
        tenant_id: str,
        client_id: str,
        client_secret: str,
        authority: str = AUTHORITY,
        timeout: float = 30.0,
    ) -> None:
        self._session = session
        self._url = url.rstrip("/")
        self._tenant = tenant_id
        self._client_id = client_id
        self._client_secret = client_secret
        self._authority = authority.rstrip("/")
        self._timeout = timeout
        self._token: str | None = None
        self._token_lock = asyncio.Lock()

    async def close(self) -> None:
        pass  # the session is the caller's

    def cost(self, mapping: ObjectMapping, n: int, op: str = UPSERT) -> int:
        return 2 if mapping.kind == "list" else 1  # a list: the members' rows read first

    async def describe(self, objects: list[str]) -> dict[str, ObjectSchema]:
        """Each entity set's table definition, one ``GET EntityDefinitions?$filter=EntitySetName eq '<set>'``
        per object (a mapping names the set; the definition says its logical name) with its attributes,
        alternate keys and many-to-one relationships expanded.

        A column is a field of its type, writable when IsValidForUpdate, required when its RequiredLevel is
        SystemRequired or ApplicationRequired (anonymising then writes a placeholder, so the row stays one
        a user can save in the app), a match key when an active alternate key names it. Lookup columns are written
        through their navigation properties (``<nav>@odata.bind``), so those are the fields: each
        relationship's ReferencingEntityNavigationPropertyName and, for an activity's polymorphic
        ``regardingobjectid_contact_task``, the ``regardingobjectid_contact`` it inherits. A set that is
        not a table here is left out (the mapping check names it)."""
        schema: dict[str, ObjectSchema] = {}
        for entity_set in objects:
            query = urllib.parse.urlencode(
                {"$filter": f"EntitySetName eq '{_quote(entity_set)}'", **DEFINITION_QUERY},
                safe="$(),;='/",
                quote_via=urllib.parse.quote,
            )
            answer = await self._request(
                "GET", f"EntityDefinitions?{query}", data=None, headers={}, what=f"describe {entity_set}"
            )
            if (error := _failure(answer)) is not None:
                raise ConnectionError(f"describing {entity_set} failed: {error.reason} {error.code}")
            body = answer.body if isinstance(answer.body, dict) else {}
            found = body.get("value", [body] if "LogicalName" in body else [])
            if found:
                schema[entity_set] = _object_schema(entity_set, found[0])
        return schema

    async def _authenticate(self, stale: str | None = None) -> CrmError | None:
        async with self._token_lock:
            if self._token is not None and self._token != stale:
                return None
            form = {
                "grant_type": "client_credentials",
                "client_id": self._client_id,
                "client_secret": self._client_secret,
                "scope": f"{self._url}/.default",
            }
            try:
                async with self._session.post(
                    f"{self._authority}/{self._tenant}/oauth2/v2.0/token",
                    data=form,
                    timeout=aiohttp.ClientTimeout(total=self._timeout),
                    allow_redirects=False,
                ) as response:
                    body = await read_json(response)
                    status = response.status
            except (TimeoutError, aiohttp.ClientError, ValueError, AnswerTooLarge):
                return CrmError(AUTH, "TOKEN_UNAVAILABLE", "the token endpoint did not answer")
            if status != 200 or not isinstance(body, dict) or "access_token" not in body:
                code = str(body.get("error", status)) if isinstance(body, dict) else str(status)
                # error_codes holds the AADSTS number, which says which part of the credentials is wrong.
                codes = body.get("error_codes") if isinstance(body, dict) else None
                if codes:
                    code = f"{code} AADSTS{codes[0]}"
                return CrmError(AUTH, code, "Entra ID refused the credentials", status)
            self._token = body["access_token"]
            return None

    async def send(self, mapping: ObjectMapping, changes: list[Change]) -> BatchOutcome:
        assert len(changes) <= RECORDS_PER_BATCH, "the engine batches by batch_limit"
        if mapping.kind == "list":
            return await self._membership(mapping, changes)
        boundary = f"batch_{uuid.uuid4().hex}"
        answer = await self._batch(_batch_body(self._url, mapping, changes, boundary), boundary, mapping.object)
        error = _failure(answer)
        if error is not None:
            return BatchOutcome.failed(error, answer.headers)
        content_type = next((v for k, v in answer.headers.items() if k.lower() == "content-type"), "")
        results: dict[str, RecordResult] = {}
        for content_id, status, headers, payload in _responses(answer.raw, content_type):
            if not content_id.isdigit() or not 0 < int(content_id) <= len(changes):
                continue
            change = changes[int(content_id) - 1]
            if change.op == DELETE and (status < 300 or status == 404):
                results[change.record] = RecordResult(change.record, True, None, False)  # 404: already gone
            elif status < 300:
                entity = headers.get("odata-entityid", "")
                crm_id = entity.rsplit("(", 1)[-1].rstrip(")") if "(" in entity else None
                results[change.record] = RecordResult(change.record, True, crm_id, status == 201)
            else:
                results[change.record] = RecordResult(change.record, False, error=_op_error(status, payload))
        return BatchOutcome(results, None, answer.headers)

    async def read(
        self,
        path: str,
        budget: SharedBudget,
        clock: Callable[[], float] = time.time,
        *,
        headers: dict[str, str] | None = None,
        what: str = "",
    ) -> Answer:
        """An authenticated GET of the Web API for the change readers: `path` under /api/data/v9.2, or a link
        Dataverse gave (``@odata.nextLink``, ``@odata.deltaLink``) - only one of this environment's, so the
        token never goes to another host. A unit of the account's shared budget per request, a new token
        and one retry on a 401, and the answer's ``error`` set by this adapter's error mapping (429 is
        service protection, with its Retry-After; the Web API's own code, such as 0x80044352 for an
        expired change-tracking token) - None when Dataverse answered it."""
        prefix = f"{self._url}{API}/"
        if "://" in path:
            if not path.startswith(prefix):
                refused = CrmError(REJECTED, "FOREIGN_LINK", "a link outside this Dataverse environment")
                return Answer(0, {}, None, refused)
            path = path.removeprefix(prefix)
        return await metered_read(
            budget,
            clock,
            lambda reserve: self._request(
                "GET", path, data=None, headers=headers or {}, what=what or path.partition("?")[0], reserve=reserve
            ),
            _failure,
        )

    async def _request(
        self,
        method: str,
        path: str,
        *,
        data: bytes | None,
        headers: dict[str, str],
        what: str,
        reserve: Reserve | None = None,
    ) -> Answer:
        """One Web API request with the token; one new token and one retry on a 401."""
        for attempt in (0, 1):
            if self._token is None and (failed := await self._authenticate()) is not None:
                return Answer(0, {}, None, failed)
            token = self._token
            if reserve is not None:
                await reserve()
            answer = await exchange(
                self._session,
                method,
                f"{self._url}{API}/{path}",
                data=data,
                headers={
                    "Authorization": f"Bearer {token}",
                    "OData-Version": "4.0",
                    "OData-MaxVersion": "4.0",
                    "Accept": "application/json",
                    **headers,
                },
                timeout=self._timeout,
                what=what,
            )
            if answer.status == 401 and attempt == 0:
                if (failed := await self._authenticate(stale=token)) is not None:
                    return Answer(0, {}, None, failed)
                continue
            return answer
        raise AssertionError("unreachable")

    async def _batch(self, body: bytes, boundary: str, what: str) -> Answer:
        return await self._request(
            "POST", "$batch", data=body, headers={"Content-Type": f"multipart/mixed; boundary={boundary}"}, what=what
        )

    async def probe(self, mapping: ObjectMapping) -> tuple[bool | None, dict]:
        """Whether Dataverse answers (a held connection's probe): ``GET WhoAmI``, the Web API's cheapest
        authenticated read (a new token first when needed); True once it answered, None on an error."""
        answer = await self._request("GET", "WhoAmI", data=None, headers={}, what="probe")
        if _failure(answer) is not None or not isinstance(answer.body, dict) or "UserId" not in answer.body:
            return None, answer.headers
        return True, answer.headers

    async def find(
        self, mapping: ObjectMapping, field: str, values: list[str], read: list[str]
    ) -> tuple[dict[str, dict[str, Any]] | None, dict]:
        """The rows of `mapping`'s entity set whose `field` holds one of `values` (Dataverse compares text
        without case): row id -> their `read` columns; None on an error. The query names personal data (an
        erasure's search by email or phone), so it is a GET inside a ``$batch`` body - never a request line,
        which proxies and access logs keep; the next pages (``@odata.nextLink``, which repeats the filter)
        are read the same way. A request per page of 5,000."""
        primary = _primary(mapping)
        clauses = " or ".join(f"{field} eq '{_quote(v)}'" for v in values)
        names = ",".join(sorted({primary, field, *read}))
        path = f"{mapping.object}?" + urllib.parse.urlencode(
            {"$select": names, "$filter": clauses}, safe="$(),'=@", quote_via=urllib.parse.quote
        )
        found: dict[str, dict[str, Any]] = {}
        headers: dict = {}
        for _ in range(10):  # at most 50,000 rows name one person's identifiers
            answer = await self._read_in_batch(path, "privacy search")
            headers = answer.headers
            if _failure(answer) is not None or listed(answer, "value") is not None:
                return None, headers
            for row in answer.body["value"]:
                if row.get(primary):
                    found[str(row[primary])] = {k: v for k, v in row.items() if not k.startswith("@")}
            following = answer.body.get("@odata.nextLink")
            if not isinstance(following, str) or not following:
                break
            if not following.startswith(f"{self._url}{API}/"):
                return None, headers  # a link outside this environment: never followed with the token
            path = following.removeprefix(f"{self._url}{API}/")
        return found, headers

    async def erase(
        self, mapping: ObjectMapping, crm_ids: list[str], fields: dict[str, Any] | None
    ) -> tuple[bool | None, dict]:
        """Delete these rows by id (``DELETE <set>(<id>)``; `fields` None) or write `fields` to each (their
        personal data cleared; ``If-Match: *``, so a row gone is not created again by the upsert) - one
        ``$batch``, a change set per row; True once done (a row gone already counts), None on an error."""
        return await self.erase_in(mapping.object, crm_ids, fields)

    async def erase_in(self, obj: str, crm_ids: list[str], fields: dict[str, Any] | None) -> tuple[bool | None, dict]:
        """`erase` for rows of any entity set (an incident a Dynamics user opened)."""
        results, headers = await self._by_id(obj, crm_ids, fields)
        return (None if results is None or any(results.values()) else True), headers

    # --- rows a Dynamics user opened about an erased contact ----------------------------------------

    # contacts -> the entity sets whose rows name a contact that an erasure reads, by their lookup column,
    # and their text columns: incidents (cases) by their customer.
    LINKED: ClassVar[dict[str, dict[str, tuple[str, ...]]]] = {"contacts": {"incidents": ("title", "description")}}
    _LINKED_BY: ClassVar[dict[str, str]] = {"incidents": "_customerid_value"}

    async def linked(
        self, contacts: list[tuple[str, str]], emails: list[str], meter: Callable[[Any], Awaitable[Any]]
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """The incidents whose customer is one of these contacts ((entity set, contactid) each): ("incidents",
        id, their text columns) each, by ``$filter=_customerid_value eq <id> or ...`` (50 ids a query; a GET
        inside a ``$batch`` body, as the erasure's search), each page through `meter` (the account's budget;
        it raises when Dataverse did not answer). `emails`: an incident holds no email column to search."""
        ids = sorted({crm_id for obj, crm_id in contacts if obj == "contacts" and _GUID.fullmatch(crm_id)})
        found: list[tuple[str, str, dict[str, Any]]] = []
        for to_set, columns in self.LINKED["contacts"].items():
            primary = f"{to_set.removesuffix('s')}id"
            for start in range(0, len(ids), 50):
                clauses = " or ".join(f"{self._LINKED_BY[to_set]} eq {i}" for i in ids[start : start + 50])
                path: str | None = f"{to_set}?" + urllib.parse.urlencode(
                    {"$select": ",".join([primary, *columns]), "$filter": clauses},
                    safe="$(),'=@", quote_via=urllib.parse.quote,
                )  # fmt: skip
                for _ in range(10):
                    if path is None:
                        break
                    page = await meter(self._page(path))
                    found.extend((to_set, str(r[primary]), {c: r.get(c) for c in columns}) for r in page["rows"])
                    path = page["next"]
        return found

    def linked_fields(self, obj: str, row: dict[str, Any], names: Callable[[Any], bool]) -> dict[str, Any]:
        """What anonymises a linked incident: each text column naming the person replaced by the placeholder
        (an incident's title is required); {} when none does."""
        return {c: PLACEHOLDER for c in self.LINKED["contacts"].get(obj, ()) if names(row.get(c))}

    async def _page(self, path: str) -> tuple[dict[str, Any] | None, dict]:
        """One page of rows (read in a ``$batch`` body) and the path of the next, if any."""
        answer = await self._read_in_batch(path, "privacy linked rows")
        if _failure(answer) is not None or listed(answer, "value") is not None:
            return None, answer.headers
        following = answer.body.get("@odata.nextLink")
        following = following if isinstance(following, str) and following else None
        if following is not None and not following.startswith(f"{self._url}{API}/"):
            return None, answer.headers  # a link outside this environment: never followed with the token
        next_path = following.removeprefix(f"{self._url}{API}/") if following else None
        return {"rows": answer.body["value"], "next": next_path}, answer.headers

    async def update(
        self, mapping: ObjectMapping, crm_ids: list[str], fields: dict[str, Any]
    ) -> tuple[dict[str, CrmError | None] | None, dict]:
        """Write `fields` to these rows by id (``PATCH <set>(<id>)`` with ``If-Match: *``, which never creates
        one; a ``$batch`` of 100, a change set each): per id None once written or gone already (404), else
        Dataverse's refusal of it; None when Dataverse failed (a transient error: the caller tries again)."""
        return await self._by_id(mapping.object, crm_ids, fields)

    async def _by_id(
        self, obj: str, crm_ids: list[str], fields: dict[str, Any] | None
    ) -> tuple[dict[str, CrmError | None] | None, dict]:
        """`erase` and `update`: each row's answer (None: done, or gone already), None on a failure."""
        results: dict[str, CrmError | None] = {}
        headers: dict = {}
        for start in range(0, len(crm_ids), RECORDS_PER_BATCH):
            chunk = crm_ids[start : start + RECORDS_PER_BATCH]
            operations: list[tuple[str, str, list[str], str]] = []
            for crm_id in chunk:
                path = f"{obj}({urllib.parse.quote(crm_id, safe='')})"
                if fields is None:
                    operations.append(("DELETE", path, [], ""))
                else:
                    body = orjson.dumps(fields).decode()
                    operations.append(("PATCH", path, ["Content-Type: application/json", "If-Match: *"], body))
            boundary = f"batch_{uuid.uuid4().hex}"
            answer = await self._batch(_requests_body(self._url, operations, boundary), boundary, "erase")
            headers = answer.headers
            if _failure(answer) is not None:
                return None, headers
            content_type = next((v for k, v in answer.headers.items() if k.lower() == "content-type"), "")
            answered = {cid: (status, payload) for cid, status, _, payload in _responses(answer.raw, content_type)}
            for n, crm_id in enumerate(chunk, start=1):
                status, payload = answered.get(str(n), (0, None))
                if status == 0 or status == 429 or status >= 500:
                    return None, headers  # unanswered or transient: the caller tries again
                results[crm_id] = None if status < 300 or status == 404 else _op_error(status, payload)
        return results, headers

    async def _read_in_batch(self, path: str, what: str) -> Answer:
        """GET `path` (under /api/data/v9.2) as the one request of a ``$batch``, outside any change set: its
        answer as if asked directly, the ``$batch``'s headers (service protection's) kept."""
        boundary = f"batch_{uuid.uuid4().hex}"
        request = "\r\n".join(
            [
                f"--{boundary}",
                "Content-Type: application/http",
                "Content-Transfer-Encoding: binary",
                "",
                f"GET {self._url}{API}/{path} HTTP/1.1",
                "Accept: application/json",
                "",
                "",
                f"--{boundary}--",
                "",
            ]
        )
        answer = await self._batch(request.encode(), boundary, what)
        if _failure(answer) is not None:
            return answer
        content_type = next((v for k, v in answer.headers.items() if k.lower() == "content-type"), "")
        answered = _responses(answer.raw, content_type)
        if len(answered) != 1:
            error = CrmError(UNAVAILABLE, "UNEXPECTED_ANSWER", "the $batch answer holds no response", answer.status)
            return replace(answer, error=error)
        _, status, _, payload = answered[0]
        inner = replace(answer, status=status, body=payload)
        return inner if (error := _failure(inner)) is None else replace(inner, error=error)

    async def _membership(self, mapping: ObjectMapping, changes: list[Change]) -> BatchOutcome:
        """Marketing list membership (the mapping's `list` is the list's id): the people's rows found by
        their alternate key in one query (a GET inside a ``$batch`` body, as `find`: the key's values, an
        email maybe, never in a request line), then one ``$batch`` with a change set per member - the
        ``AddMemberList`` action for an entry (adding a member again adds nothing), the
        ``list<type>_association`` disassociated for an exit (404: not a member, so already removed)."""
        primary = _primary(mapping)
        names = [name for name, _ in changes[0].key]
        clauses = [" and ".join(f"{n} eq '{_quote(v)}'" for n, v in c.key) for c in changes]
        query = urllib.parse.urlencode(
            {"$select": ",".join([primary, *names]), "$filter": " or ".join(clauses)},
            safe="$(),'=@",
            quote_via=urllib.parse.quote,
        )
        # The match key may be an email or a phone: the read goes in a $batch body, not in a request line.
        found = await self._read_in_batch(f"{mapping.object}?{query}", mapping.object)
        if (error := _failure(found)) is not None:
            return BatchOutcome.failed(error, found.headers)
        rows = found.body.get("value", []) if isinstance(found.body, dict) else []
        ids = {tuple(str(r.get(n, "")).lower() for n in names): r[primary] for r in rows}
        results: dict[str, RecordResult] = {}
        operations: list[tuple[Change, str, str, str]] = []  # change, method, path, body
        association = f"list{mapping.object.removesuffix('s')}_association"
        for change in changes:
            row = ids.get(tuple(v.lower() for _, v in change.key))
            if row is None and change.op == REMOVE:
                results[change.record] = RecordResult(change.record, True, None, False)  # no row: not a member
            elif row is None:
                missing = CrmError(NOT_FOUND, "0x80040217", f"no {mapping.object} row with this key", 404)
                results[change.record] = RecordResult(change.record, False, error=missing)
            elif change.op == REMOVE:
                operations.append((change, "DELETE", f"lists({mapping.list})/{association}({row})/$ref", ""))
            else:
                body = orjson.dumps({"EntityId": row}).decode()
                operations.append((change, "POST", f"lists({mapping.list})/{NAMESPACE}.AddMemberList", body))
        if not operations:
            return BatchOutcome(results, None, found.headers)
        boundary = f"batch_{uuid.uuid4().hex}"
        answer = await self._batch(_operations_body(self._url, operations, boundary), boundary, "list members")
        if (error := _failure(answer)) is not None:
            return BatchOutcome.failed(error, {**found.headers, **answer.headers})
        content_type = next((v for k, v in answer.headers.items() if k.lower() == "content-type"), "")
        for content_id, status, _, payload in _responses(answer.raw, content_type):
            if not content_id.isdigit() or not 0 < int(content_id) <= len(operations):
                continue
            change, method, _, _ = operations[int(content_id) - 1]
            if status < 300 or (method == "DELETE" and status == 404):
                crm_id = payload.get("id") if isinstance(payload, dict) else None
                results[change.record] = RecordResult(change.record, True, crm_id, method == "POST")
            else:
                results[change.record] = RecordResult(change.record, False, error=_op_error(status, payload))
        return BatchOutcome(results, None, {**found.headers, **answer.headers})


def _primary(mapping: ObjectMapping) -> str:
    """The entity set's primary id column: contacts -> contactid, leads -> leadid."""
    return f"{mapping.object.removesuffix('s')}id"


def _quote(value: str) -> str:
    return value.replace("'", "''")


# What describe reads of a table definition (one request: the collections expanded, each narrowed).
DEFINITION_QUERY = {
    "$select": "LogicalName,EntitySetName,PrimaryIdAttribute",
    "$expand": (
        "Attributes($select=LogicalName,AttributeType,RequiredLevel,IsValidForCreate,IsValidForUpdate),"
        "Keys($select=LogicalName,KeyAttributes,EntityKeyIndexStatus),"
        "ManyToOneRelationships($select=ReferencingAttribute,ReferencedEntity,ReferencingEntityNavigationPropertyName)"
    ),
}
REQUIRED_LEVELS = ("SystemRequired", "ApplicationRequired")
LOOKUP_TYPES = ("Lookup", "Customer", "Owner")


def _object_schema(entity_set: str, definition: dict[str, Any]) -> ObjectSchema:
    # An alternate key is usable once Dataverse has built its index (Active); until then an upsert by it fails.
    keyed = {
        name
        for key in definition.get("Keys") or []
        if key.get("EntityKeyIndexStatus", "Active") == "Active"
        for name in key.get("KeyAttributes") or []
    }
    fields: dict[str, FieldSchema] = {}
    for attribute in definition.get("Attributes") or []:
        name, kind = attribute.get("LogicalName"), attribute.get("AttributeType", "String")
        if not name or kind in LOOKUP_TYPES:
            continue  # a lookup is written through its navigation property, below
        level = (attribute.get("RequiredLevel") or {}).get("Value")
        fields[name] = FieldSchema(
            name, kind, name in keyed, bool(attribute.get("IsValidForUpdate")), level in REQUIRED_LEVELS
        )
    logical = definition.get("LogicalName", "")
    for relationship in definition.get("ManyToOneRelationships") or []:
        nav = relationship.get("ReferencingEntityNavigationPropertyName")
        if not nav:
            continue
        fields[nav] = FieldSchema(nav, "Lookup")
        # An activity's relationship to its regarding table (regardingobjectid_contact_task) is also bound
        # through the navigation property the activity inherits (regardingobjectid_contact).
        inherited = f"{relationship.get('ReferencingAttribute')}_{relationship.get('ReferencedEntity')}"
        if nav == f"{inherited}_{logical}":
            fields[inherited] = FieldSchema(inherited, "Lookup")
    return ObjectSchema(entity_set, fields)


def _operations_body(url: str, operations: list[tuple[Change, str, str, str]], boundary: str) -> bytes:
    """A $batch of one change set per operation (so one refusal does not roll back the others)."""
    requests = [
        (method, path, ["Content-Type: application/json"] if body else [], body) for _, method, path, body in operations
    ]
    return _requests_body(url, requests, boundary)


def _requests_body(url: str, requests: list[tuple[str, str, list[str], str]], boundary: str) -> bytes:
    """A $batch of one change set per request (method, path under the API, header lines, body); each
    request's ``Content-ID`` is its place, from 1."""
    out: list[str] = []
    for n, (method, path, headers, body) in enumerate(requests, start=1):
        changeset = f"changeset_{uuid.uuid4().hex}"
        operation = "\r\n".join(
            [
                f"--{changeset}",
                "Content-Type: application/http",
                "Content-Transfer-Encoding: binary",
                f"Content-ID: {n}",
                "",
                f"{method} {url}{API}/{path} HTTP/1.1",
                *headers,
                "",
                body,
                f"--{changeset}--",
            ]
        )
        out.append(f"--{boundary}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n{operation}\r\n")
    out.append(f"--{boundary}--\r\n")
    return "".join(out).encode()


def _key_text(key: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f"{name}='{value.replace(chr(39), chr(39) * 2)}'" for name, value in key)


def _key_segment(key: tuple[tuple[str, str], ...]) -> str:
    """The key as it goes in a request URL (percent-encoded)."""
    return urllib.parse.quote(_key_text(key), safe="=,'")


def _link(change: Change) -> dict[str, str]:
    """The person's row a task or case is about, bound by its alternate key:
    ``regardingobjectid_contact@odata.bind: /contacts(cdp_id='...')``."""
    link = change.link
    if link is None or link.field is None:
        return {}
    return {f"{link.field}@odata.bind": f"/{link.object}({_key_text(link.key)})"}


def _batch_body(url: str, mapping: ObjectMapping, changes: list[Change], boundary: str) -> bytes:
    out: list[str] = []
    for n, change in enumerate(changes, start=1):
        changeset = f"changeset_{uuid.uuid4().hex}"
        headers = ["Content-Type: application/json", "Prefer: return=representation"]
        method, payload = "PATCH", orjson.dumps({**change.fields, **_link(change)}).decode()
        if change.op == DELETE:
            headers, method, payload = [], "DELETE", ""
        elif mapping.mode == "update_only":
            headers.append("If-Match: *")
        operation = "\r\n".join(
            [
                f"--{changeset}",
                "Content-Type: application/http",
                "Content-Transfer-Encoding: binary",
                f"Content-ID: {n}",
                "",
                f"{method} {url}{API}/{mapping.object}({_key_segment(change.key)}) HTTP/1.1",
                *headers,
                "",
                payload,
                f"--{changeset}--",
            ]
        )
        out.append(f"--{boundary}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n{operation}\r\n")
    out.append(f"--{boundary}--\r\n")
    return "".join(out).encode()


def _boundary(content_type: str) -> str | None:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    return m.group(1) if m else None


def _parts(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    parts = []
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, content = chunk.lstrip(b"\r\n").replace(b"\r\n", b"\n").partition(b"\n\n")
        headers = {}
        for line in head.decode(errors="replace").split("\n"):
            name, _, value = line.partition(":")
            if name.strip():
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, content.rstrip(b"\n")))
    return parts


def _responses(body: bytes, content_type: str) -> list[tuple[str, int, dict[str, str], Any]]:
    """(Content-ID, status, headers, JSON body) of every operation answered in a $batch response."""
    boundary = _boundary(content_type)
    if boundary is None:
        return []
    found = []
    for headers, content in _parts(body, boundary):
        inner = _boundary(headers.get("content-type", "")) if "multipart" in headers.get("content-type", "") else None
        operations = _parts(content, inner) if inner else [(headers, content)]
        for op_headers, op_content in operations:
            status_head, _, payload = op_content.partition(b"\n\n")
            lines = status_head.decode(errors="replace").split("\n")
            status_line = lines[0].split()
            if len(status_line) < 2 or not status_line[1].isdigit():
                continue
            http_headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                http_headers[name.strip().lower()] = value.strip()
            try:
                parsed = orjson.loads(payload) if payload.strip() else None
            except orjson.JSONDecodeError:
                parsed = None
            found.append((op_headers.get("content-id", ""), int(status_line[1]), http_headers, parsed))
    return found


def _op_error(status: int, payload: Any) -> CrmError:
    error = (payload or {}).get("error", {}) if isinstance(payload, dict) else {}
    code, message = str(error.get("code", status)), str(error.get("message", ""))
    if status == 404 or code == "0x80040217":
        reason = NOT_FOUND
    elif code == "0x80040237":
        reason = DUPLICATE
    elif code == "0x80060888" and "does not exist on type" in message:
        reason = UNKNOWN_FIELD
    elif status == 403:
        reason = PERMISSION
    elif code == "0x80040265":
        reason = REJECTED  # a plug-in or business rule refused it
    else:
        reason = INVALID_VALUE if status == 400 else REJECTED
    return CrmError(reason, code, message, status)


def _failure(answer: Answer) -> CrmError | None:
    if answer.error is not None:
        return answer.error
    if answer.status < 300:
        return None
    error = answer.body.get("error", {}) if isinstance(answer.body, dict) else {}
    code, message = str(error.get("code", answer.status)), str(error.get("message", ""))
    transient = transport_error(answer, code, message)
    if transient is not None:
        return transient
    return _op_error(answer.status, answer.body)
