"""HubSpot CRM v3: batch upsert by a unique property (100 inputs a call), lists, tickets and tasks.

Auth is a private-app token (``Authorization: Bearer``). Every object is written with
``POST /crm/v3/objects/<object>/batch/upsert`` and ``idProperty`` = the mapping's match field (contacts by
``cdp_id`` or ``email``; tasks and tickets by their idempotency field), so a retry after a lost answer
updates the same records. HubSpot takes property values as strings: None becomes "" (HubSpot's way of
clearing a property), booleans "true"/"false", a list ``;``-joined (a multiple checkbox's options), an object
JSON text (`_text`).

Answers: 200 (all written) or 207 with ``errors[].context.ids`` naming the rejected inputs; 400 refuses the
whole batch (an unknown property - every record, not worth splitting - or one invalid input); 429 carries
``policyName`` (TEN_SECONDLY_ROLLING or DAILY) and every answer the ``X-HubSpot-RateLimit-*`` headers the
budget observes.

update_only: the existing records are read first (``batch/read`` by the match field), only those are
upserted, the others come back NOT_FOUND: two requests. Lists: the mapping's ``list`` is the HubSpot list
id (a MANUAL list); members are found by the match field and added or removed with one
``memberships/add-and-remove`` call: two requests. Privacy deletes: ``batch/read`` by the match field, then
``batch/archive`` with HubSpot's ids: two requests.

Searches (``/crm/v3/objects/<object>/search``) have a limit of their own, apart from the burst budget: four
a second per authentication token (HubSpot's developer changelog, "CRM Search API Rate Limit Increase",
https://developers.hubspot.com/changelog/crm-search-api-rate-limit-increase, which set the search API's
"Limitations" and the usage guidelines' "Other limits" to it; the local HubSpot allows five). `SearchPace`
keeps a connection's searches to it - the inbound reader's polling and this adapter's erasure lookups share
one, and the inbound side never takes more than `INBOUND_SHARE` of it, so a read paging through the
connector's own writes leaves the rest to the lookups (and a 429 ``SECONDLY`` is not the way either finds
out). A search leaves in its slot or a little after it (`LATE`): one later than that - a stalled event
loop, the reader's wait for the account's budget - takes a new slot rather than bunch with the next, and
the slots are spaced for that tolerance (0.2625 s apart, not 0.25: `SearchPace`). Per process: an erasure
running in another replica than the connection's inbound reader has a pace of its own, and the two
together may go over the limit: HubSpot answers 429 ``SECONDLY``, a lookup so refused is unanswered (None:
the erasure asks again) and the reader sends its search again a second later (inbound/hubspot.py).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import aiohttp

from cdp_crm.adapters.http import Answer, exchange, listed, transport_error, unexpected
from cdp_crm.domain.coalesce import DELETE, REMOVE, UPSERT, Change
from cdp_crm.domain.isolation import (
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

BATCH_LIMIT = 100
SEARCHES_PER_SECOND = 4.0  # HubSpot's CRM search limit per token (the module docstring cites it)
INBOUND_SHARE = 0.5  # of it, at most, for the inbound reader's searches: 1.9 a second (0.525 s apart)
# How late after its slot a search may still leave (SearchPace.leave), and so what the spacing leaves room
# for: well above a loaded machine's delay between a slot and the send (a wake-up, the reader's budget
# write: at most 11 ms measured with two cores at a load average of 15-21), so a search on time is not sent
# back a whole spacing for a new slot; small enough that the room costs 5% of the limit (3.8 a second).
LATE = 0.05
PLACEHOLDER = "(deleted)"  # privacy.PLACEHOLDER: what an anonymised record holds in place of a text naming the person
API = "https://api.hubapi.com"


class SearchPace:
    """One token's CRM searches, spaced to HubSpot's search limit (`per_second`: a search at least `spacing`
    from any other), the inbound reader's (`inbound=True`) at most `inbound_share` of it (each at least
    `spacing` / `inbound_share` after the inbound one before). A search reserves the earliest free slot at
    once (nothing awaited between reading and reserving, so two never take one slot); an inbound search
    waiting for its share's slot does not hold the slots before it, so however long a read pages through
    the connector's own writes, the other searches (an erasure's lookups) keep the rest of the limit.

    A search leaves in its slot or at most `late` after it: about to be sent (`leave`; `take` does it as
    its wait ends), one later than that - its wait woke late (a stalled event loop), or the reader waited
    for the account's budget after taking the slot - gives the slot back and takes a new one, spaced from
    the searches that did leave. Else a late search bunches with the next ones on time: HubSpot counts
    the searches arriving within a second of one (a window opening at an arrival), and a stall of half a
    second put six of slots 0.25 s apart into one. The spacing leaves room for the tolerance: the slots of
    any `per_second` + 1 searches span at least `per_second` spacings, the first slot to the last; each
    arriving between its slot and `late` after it, the last to arrive comes at least that span less `late`
    after the first, `per_second` x `spacing` - `late`. With `spacing` = (1 + `late`) / `per_second` that is
    a second or more, so no window opening at an arrival holds more than `per_second` searches (four a
    second, `late` 0.05 s: 0.2625 s apart, 4 x 0.2625 - 0.05 = 1). What happens after `leave` - the
    request's way to HubSpot - the pace does not see.

    A search that is not sent gives its slot back: one cancelled while it waits for its slot (a stopping
    poller, an erasure's deadline), or whose caller `give_back`s it (cancelled or failed after taking it,
    before sending: the reader waits for the account's budget in between) - else the next search would
    wait out a slot nobody searched in (an inbound one a whole share's spacing more). Searches already
    waiting keep their slots. Per process: a connection's inbound reader runs in one replica (the
    partition's owner)."""

    def __init__(
        self,
        per_second: float = SEARCHES_PER_SECOND,
        inbound_share: float = INBOUND_SHARE,
        *,
        late: float = LATE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.late = late
        self.spacing = (1.0 + late) / per_second
        self.inbound_spacing = self.spacing / inbound_share
        self._slots: list[float] = []  # times (on `clock`) of the searches sent or reserved, ascending
        self._inbound: list[float] = []  # those of the inbound ones, ascending: the last spaces the next

    def reserve(self, *, inbound: bool) -> float:
        """The earliest free slot (on `clock`), reserved for this search: `take` waits for it."""
        now = self.clock()
        self._slots = [s for s in self._slots if s > now - self.spacing]
        self._inbound = [s for s in self._inbound if s > now - self.inbound_spacing]
        at = max(now, self._inbound[-1] + self.inbound_spacing) if inbound and self._inbound else now
        for slot in self._slots:  # ascending: `at` only moves on, past each slot too close to it
            # (a nanosecond's grace: a free slot between two a share's spacing apart is a spacing from each
            # but for float rounding - 100.21 - 100.105 < 0.105 -, and the lookup would go after both)
            if abs(slot - at) < self.spacing - 1e-9:
                at = slot + self.spacing
        bisect.insort(self._slots, at)
        if inbound:
            bisect.insort(self._inbound, at)
        return at

    async def take(self, *, inbound: bool) -> float:
        """Wait for this search's slot; the slot (on `clock`) it leaves in (`leave`: a new one when the wait
        ended more than `late` after it). Cancelled while waiting, the slot is free again."""
        slot = self.reserve(inbound=inbound)
        wait = slot - self.clock()
        if wait > 0:
            try:
                await asyncio.sleep(wait)
            except asyncio.CancelledError:
                self.give_back(slot, inbound=inbound)
                raise
        return await self.leave(slot, inbound=inbound)

    async def leave(self, slot: float, *, inbound: bool) -> float:
        """Just before the search is sent: `slot` (as `take` returned it) when it is at most `late` past,
        else it is given back and a new one taken (waited for). The slot the search leaves in."""
        if self.clock() - slot <= self.late:
            return slot
        self.give_back(slot, inbound=inbound)
        return await self.take(inbound=inbound)

    def give_back(self, slot: float, *, inbound: bool) -> None:
        """`slot` (as `take` returned it) was not searched in: the next search may take it."""
        for slots in (self._slots, self._inbound) if inbound else (self._slots,):
            i = bisect.bisect_left(slots, slot)
            if i < len(slots) and slots[i] == slot:
                del slots[i]


class HubSpotAdapter:
    kind = "hubspot"
    batch_limit = BATCH_LIMIT

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        token: str,
        base_url: str = API,
        timeout: float = 30.0,
        searches: SearchPace | None = None,
    ) -> None:
        self._session = session
        self._headers = {"Authorization": f"Bearer {token}"}
        self._base = base_url.rstrip("/")
        self._timeout = timeout
        # The token's searches, shared with the connection's inbound reader (`inbound.open_poller`).
        self.searches = searches or SearchPace()

    async def close(self) -> None:
        pass  # the session is the caller's

    def cost(self, mapping: ObjectMapping, n: int, op: str = UPSERT) -> int:
        if op == DELETE:
            return 2  # read the records' ids by the match key, then one batch archive
        if mapping.about is not None:
            return 2 + n  # upsert, read the linked records, one association each
        return 2 if mapping.kind == "list" or mapping.mode == "update_only" else 1

    async def _call(self, method: str, path: str, body: Any, what: str) -> Answer:
        if path.endswith("/search"):
            await self.searches.take(inbound=False)  # its slot, or a new one when the wait for it woke late
        return await exchange(
            self._session, method, self._base + path, json=body, headers=self._headers, timeout=self._timeout, what=what
        )

    async def register_webhooks(self, app_id: str, target_url: str, developer_key: str) -> CrmError | None:
        """Point the app's webhooks at the connector: ``PUT /webhooks/v3/<app id>/settings`` with the
        developer API key (``hapikey``); None when HubSpot took it. Not counted against the account's
        API budget (it is the developer platform's, not the account's)."""
        body = {"targetUrl": target_url, "throttling": {"maxConcurrentRequests": 10, "period": "SECONDLY"}}
        query = urllib.parse.urlencode({"hapikey": developer_key})
        answer = await exchange(
            self._session, "PUT", f"{self._base}/webhooks/v3/{urllib.parse.quote(app_id)}/settings?{query}",
            json=body, timeout=self._timeout, what="webhook settings",
        )  # fmt: skip
        return _failure(answer)

    # --- describe --------------------------------------------------------------------------------

    async def describe(self, objects: list[str]) -> dict[str, ObjectSchema]:
        """``GET /crm/v3/properties/<object>``: names, unique properties, read-only ones."""
        schema: dict[str, ObjectSchema] = {}
        for obj in objects:
            answer = await self._call("GET", f"/crm/v3/properties/{obj}", None, f"properties {obj}")
            if answer.status == 404:
                continue  # not an object of this account: the mapping's validation says so
            error = _failure(answer)
            if error is not None:
                raise ConnectionError(f"describing {obj} failed: {error.reason} {error.code}")
            fields = {}
            for prop in answer.body.get("results", []):
                read_only = bool((prop.get("modificationMetadata") or {}).get("readOnlyValue"))
                fields[prop["name"]] = FieldSchema(
                    prop["name"], prop.get("type", "string"), bool(prop.get("hasUniqueValue")), not read_only
                )
            # HubSpot's own id is a key whatever its description says (its hasUniqueValue is false there)
            fields["hs_object_id"] = FieldSchema("hs_object_id", "number", True, False)
            schema[obj] = ObjectSchema(obj, fields)
        return schema

    # --- writes ----------------------------------------------------------------------------------

    async def send(self, mapping: ObjectMapping, changes: list[Change]) -> BatchOutcome:
        assert len(changes) <= BATCH_LIMIT, "the engine batches by batch_limit"
        if mapping.kind == "list":
            return await self._membership(mapping, changes)
        if changes[0].op == DELETE:
            return await self._archive(mapping, changes)
        if mapping.mode == "update_only":
            return await self._update_only(mapping, changes)
        return await self._upsert(mapping, changes)

    async def _upsert(
        self, mapping: ObjectMapping, changes: list[Change], headers: dict[str, str] | None = None
    ) -> BatchOutcome:
        by_id = {_key_value(c): c for c in changes}
        inputs = [
            {"idProperty": _key_field(c), "id": _key_value(c), "properties": _properties(c.fields)} for c in changes
        ]
        answer = await self._call(
            "POST", f"/crm/v3/objects/{mapping.object}/batch/upsert", {"inputs": inputs}, mapping.object
        )
        observed = {**(headers or {}), **answer.headers}
        error = _failure(answer)
        if error is not None:
            return BatchOutcome.failed(error, observed)
        results: dict[str, RecordResult] = {}
        id_property = _key_field(changes[0])
        for item in answer.body.get("results", []):
            change = by_id.get(str((item.get("properties") or {}).get(id_property, "")).lower())
            if change is not None:
                results[change.record] = RecordResult(change.record, True, str(item["id"]), bool(item.get("new")))
        for failure in answer.body.get("errors", []):
            record_error = _record_error(failure, answer.status)
            for failed_id in (failure.get("context") or {}).get("ids", []):
                change = by_id.get(str(failed_id).lower())
                if change is not None:
                    results[change.record] = RecordResult(change.record, False, error=record_error)
        if mapping.about is not None:
            observed.update(await self._associate(mapping, changes, results))
        return BatchOutcome(results, None, observed)

    async def _associate(
        self, mapping: ObjectMapping, changes: list[Change], results: dict[str, RecordResult]
    ) -> dict[str, str]:
        """Associate each written task or ticket with the person's record (v4 default association; a PUT,
        so doing it again changes nothing). Updates `results` in place; returns the last limit headers."""
        linked = [c for c in changes if c.link is not None and results.get(c.record, RecordResult("", False)).ok]
        headers: dict[str, str] = {}
        if not linked:
            return headers
        link = linked[0].link
        assert link is not None
        id_property = link.key[0][0]
        body = {
            "idProperty": id_property,
            "inputs": [{"id": c.link.key[0][1]} for c in linked if c.link is not None],
            "properties": [id_property],
        }
        answer = await self._call("POST", f"/crm/v3/objects/{link.object}/batch/read", body, link.object)
        headers = answer.headers
        if (error := _failure(answer)) is not None:
            for change in linked:
                results[change.record] = RecordResult(change.record, False, error=error)
            return headers
        targets = {
            str((r.get("properties") or {}).get(id_property, "")).lower(): str(r["id"])
            for r in answer.body.get("results", [])
        }
        for change in linked:
            assert change.link is not None
            written = results[change.record]
            target = targets.get(change.link.key[0][1].lower())
            if target is None:
                # The person's record is not there (yet): the task stays written; replaying the dead
                # letter once the record exists links it.
                missing = CrmError(NOT_FOUND, "ASSOCIATION_TARGET_NOT_FOUND", "the linked record does not exist", 404)
                results[change.record] = RecordResult(change.record, False, written.crm_id, written.created, missing)
                continue
            path = f"/crm/v4/objects/{mapping.object}/{written.crm_id}/associations/default/{link.object}/{target}"
            associated = await self._call("PUT", path, None, "association")
            headers = associated.headers or headers
            if (error := _failure(associated)) is not None:
                results[change.record] = RecordResult(change.record, False, written.crm_id, written.created, error)
        return headers

    async def claim(self, mapping: ObjectMapping, crm_id: str, field: str, value: str) -> tuple[bool | None, dict]:
        """Stamp `field` = `value` (the match key) on the record `crm_id` of `mapping`'s object, one a CRM user
        made: True once it holds it, False when there is no such record or it holds another value (another
        person's), None on an error. Two requests: a read, then the update."""
        path = f"/crm/v3/objects/{mapping.object}/{urllib.parse.quote(crm_id, safe='')}"
        answer = await self._call("GET", f"{path}?properties={urllib.parse.quote(field)}", None, mapping.object)
        if answer.status == 404:
            return False, answer.headers
        if _failure(answer) is not None:
            return None, answer.headers
        held = str((answer.body.get("properties") or {}).get(field) or "")
        if held:
            return held.lower() == value.lower(), answer.headers
        updated = await self._call("PATCH", path, {"properties": {field: value}}, mapping.object)
        if updated.status == 404:
            return False, updated.headers
        return (None if _failure(updated) is not None else True), updated.headers

    async def merge(self, mapping: ObjectMapping, primary: str, other: str) -> tuple[bool | None, str | None, dict]:
        """Merge the record `other` into `primary` (``POST /crm/v3/objects/<object>/merge``): HubSpot keeps the
        primary's values, takes those it lacks from the other, with its associations and list memberships.
        (True, the merged record's id) once merged; (False, None) when either is not there (404); (None,
        None) on an error. One request."""
        body = {"primaryObjectId": primary, "objectIdToMerge": other}
        answer = await self._call("POST", f"/crm/v3/objects/{mapping.object}/merge", body, "merge")
        if answer.status == 404:
            return False, None, answer.headers
        if _failure(answer) is not None or not isinstance(answer.body, dict):
            return None, None, answer.headers
        return True, str(answer.body.get("id") or primary), answer.headers

    async def find(
        self, mapping: ObjectMapping, field: str, values: list[str], read: list[str]
    ) -> tuple[dict[str, dict[str, Any]] | None, dict]:
        """The records of `mapping`'s object whose `field` holds one of `values` (any case): HubSpot id ->
        their `read` properties, by search (``IN``, lower-cased values as HubSpot wants them); None on an
        error. A request per page of 100."""
        body: dict[str, Any] = {
            "filterGroups": [
                {"filters": [{"propertyName": field, "operator": "IN", "values": [v.lower() for v in values]}]}
            ],
            "properties": sorted({field, *read}),
            "limit": 100,
        }
        found: dict[str, dict[str, Any]] = {}
        headers: dict = {}
        for _ in range(10):  # at most a thousand records name one person's identifiers
            answer = await self._call("POST", f"/crm/v3/objects/{mapping.object}/search", body, "privacy search")
            headers = answer.headers
            if _failure(answer) is not None or listed(answer, "results") is not None:
                return None, headers
            for record in answer.body["results"]:
                found[str(record["id"])] = dict(record.get("properties") or {})
            after = ((answer.body.get("paging") or {}).get("next") or {}).get("after")
            if not after:
                break
            body["after"] = after
        return found, headers

    async def erase(
        self, mapping: ObjectMapping, crm_ids: list[str], fields: dict[str, Any] | None
    ) -> tuple[bool | None, dict]:
        """Delete these records by HubSpot id (``batch/archive``; `fields` None) or write `fields` to each
        (their personal data cleared); True once done (a record gone already counts), None on an error."""
        return await self.erase_in(mapping.object, crm_ids, fields)

    async def erase_in(self, obj: str, crm_ids: list[str], fields: dict[str, Any] | None) -> tuple[bool | None, dict]:
        """`erase` for records of any object (a ticket a HubSpot user made): at most `batch_limit` ids."""
        if fields is None:
            body = {"inputs": [{"id": i} for i in crm_ids]}
            answer = await self._call("POST", f"/crm/v3/objects/{obj}/batch/archive", body, "archive")
            return (None if _failure(answer) is not None else True), answer.headers
        results, headers = await self._update(obj, crm_ids, fields)
        return (None if results is None or any(results.values()) else True), headers

    # --- records a HubSpot user linked to an erased contact ---------------------------------------

    # The objects a user associates with a contact that an erasure reads, and their free-text properties
    # (a ticket opened from the contact's page, the customer's email in its subject).
    LINKED: ClassVar[dict[str, dict[str, tuple[str, ...]]]] = {"contacts": {"tickets": ("subject", "content")}}

    async def linked(
        self, contacts: list[tuple[str, str]], emails: list[str], meter: Callable[[Any], Awaitable[Any]]
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """The records associated with these contacts ((object, HubSpot id) each) in the `LINKED` objects:
        (object, id, their text properties) each. The associations are listed per contact
        (``GET /crm/v4/objects/contacts/<id>/associations/<to object>``, 500 a page), the records read by
        ``batch/read`` (100 a request); each request through `meter` (the account's budget; it raises when
        HubSpot did not answer). `emails` is not searched by: HubSpot's tickets name no contact by email."""
        found: list[tuple[str, str, dict[str, Any]]] = []
        for to_obj, properties in {t: p for o, _ in contacts for t, p in self.LINKED.get(o, {}).items()}.items():
            ids: dict[str, None] = {}  # in the order found, each once (a ticket of two of the person's contacts)
            for obj, crm_id in contacts:
                if to_obj not in self.LINKED.get(obj, {}):
                    continue
                after: str | None = None
                for _ in range(100):  # 50,000 associated records at most
                    listing = await meter(self._associated(obj, crm_id, to_obj, after))
                    ids.update(dict.fromkeys(listing["ids"]))
                    if not (after := listing["after"]):
                        break
            listed_ids = list(ids)
            for start in range(0, len(listed_ids), BATCH_LIMIT):
                chunk = listed_ids[start : start + BATCH_LIMIT]
                records = await meter(self._read_ids(to_obj, chunk, list(properties)))
                found.extend((to_obj, crm_id, props) for crm_id, props in records.items())
        return found

    def linked_fields(self, obj: str, properties: dict[str, Any], names: Callable[[Any], bool]) -> dict[str, Any]:
        """What anonymises a linked record: each text property naming the person replaced by the placeholder
        (a ticket's subject is required); {} when none does."""
        return {name: PLACEHOLDER for name in self.LINKED_TEXT.get(obj, ()) if names(properties.get(name))}

    LINKED_TEXT: ClassVar[dict[str, tuple[str, ...]]] = {
        obj: props for linked in LINKED.values() for obj, props in linked.items()
    }

    async def _associated(self, obj: str, crm_id: str, to_obj: str, after: str | None) -> tuple[dict | None, dict]:
        query = {"limit": "500", **({"after": after} if after else {})}
        path = f"/crm/v4/objects/{obj}/{urllib.parse.quote(crm_id, safe='')}/associations/{to_obj}"
        answer = await self._call("GET", f"{path}?{urllib.parse.urlencode(query)}", None, "associations")
        if answer.status == 404:  # the contact gone: nothing linked to it any more
            return {"ids": [], "after": None}, answer.headers
        if _failure(answer) is not None or listed(answer, "results") is not None:
            return None, answer.headers
        ids = [str(r["toObjectId"]) for r in answer.body["results"] if r.get("toObjectId") is not None]
        after = ((answer.body.get("paging") or {}).get("next") or {}).get("after")
        return {"ids": ids, "after": str(after) if after else None}, answer.headers

    async def _read_ids(self, obj: str, crm_ids: list[str], properties: list[str]) -> tuple[dict | None, dict]:
        body = {"inputs": [{"id": i} for i in crm_ids], "properties": properties}
        answer = await self._call("POST", f"/crm/v3/objects/{obj}/batch/read", body, obj)
        if _failure(answer) is not None or listed(answer, "results") is not None:
            return None, answer.headers
        return {str(r["id"]): dict(r.get("properties") or {}) for r in answer.body["results"]}, answer.headers

    async def update(
        self, mapping: ObjectMapping, crm_ids: list[str], fields: dict[str, Any]
    ) -> tuple[dict[str, CrmError | None] | None, dict]:
        """Write `fields` to these records by HubSpot id (``PATCH /crm/v3/objects/<object>/<id>``, a request
        each), which never creates one: per id None once written or gone already (404), else HubSpot's
        refusal of it; None when HubSpot failed (a transient error: the caller tries again)."""
        return await self._update(mapping.object, crm_ids, fields)

    async def _update(
        self, obj: str, crm_ids: list[str], fields: dict[str, Any]
    ) -> tuple[dict[str, CrmError | None] | None, dict]:
        results: dict[str, CrmError | None] = {}
        headers: dict = {}
        for crm_id in crm_ids:
            path = f"/crm/v3/objects/{obj}/{urllib.parse.quote(crm_id, safe='')}"
            answer = await self._call("PATCH", path, {"properties": fields}, "anonymise")
            headers = answer.headers
            error = None if answer.status == 404 else _failure(answer)
            if error is not None and error.transient:
                return None, headers
            results[crm_id] = error
        return results, headers

    async def present(self, mapping: ObjectMapping, field: str, values: list[str]) -> tuple[set[str] | None, dict]:
        """Which of these match-key values (lower case) a record of `mapping`'s object holds in HubSpot, by
        ``batch/read`` on the key; None when HubSpot did not say (an error). At most `batch_limit` values."""
        body = {"idProperty": field, "inputs": [{"id": v} for v in values], "properties": [field]}
        answer = await self._call("POST", f"/crm/v3/objects/{mapping.object}/batch/read", body, mapping.object)
        if _failure(answer) is not None or not isinstance(answer.body.get("results"), list):
            return None, answer.headers
        found = {str((r.get("properties") or {}).get(field, "")).lower() for r in answer.body["results"]}
        return found, answer.headers

    async def _update_only(self, mapping: ObjectMapping, changes: list[Change]) -> BatchOutcome:
        id_property = _key_field(changes[0])
        body = {
            "idProperty": id_property,
            "inputs": [{"id": _key_value(c)} for c in changes],
            "properties": [id_property],
        }
        answer = await self._call("POST", f"/crm/v3/objects/{mapping.object}/batch/read", body, mapping.object)
        error = _failure(answer)
        if error is not None:
            return BatchOutcome.failed(error, answer.headers)
        existing = {
            str((r.get("properties") or {}).get(id_property, "")).lower() for r in answer.body.get("results", [])
        }
        found = [c for c in changes if _key_value(c) in existing]
        missing = {
            c.record: RecordResult(
                c.record, False, error=CrmError(NOT_FOUND, "OBJECT_NOT_FOUND", "no such record", 207)
            )
            for c in changes
            if _key_value(c) not in existing
        }
        if not found:
            return BatchOutcome(missing, None, answer.headers)
        written = await self._upsert(mapping, found, answer.headers)
        if written.error is not None:
            return written
        return BatchOutcome({**missing, **written.results}, None, written.headers)

    async def _archive(self, mapping: ObjectMapping, changes: list[Change]) -> BatchOutcome:
        """Privacy delete: ``batch/read`` by the match key for HubSpot's ids, then ``batch/archive`` (204).
        A record HubSpot does not have (never written, or archived already) counts as deleted."""
        id_property = _key_field(changes[0])
        body = {
            "idProperty": id_property,
            "inputs": [{"id": _key_value(c)} for c in changes],
            "properties": [id_property],
        }
        answer = await self._call("POST", f"/crm/v3/objects/{mapping.object}/batch/read", body, mapping.object)
        if (error := _failure(answer) or listed(answer, "results")) is not None:
            return BatchOutcome.failed(error, answer.headers)
        hs_ids = {
            str((r.get("properties") or {}).get(id_property, "")).lower(): str(r["id"])
            for r in answer.body.get("results", [])
        }
        results = {c.record: RecordResult(c.record, True, hs_ids.get(_key_value(c)), False) for c in changes}
        found = [hs_ids[_key_value(c)] for c in changes if _key_value(c) in hs_ids]
        if not found:
            return BatchOutcome(results, None, answer.headers)
        archived = await self._call(
            "POST", f"/crm/v3/objects/{mapping.object}/batch/archive", {"inputs": [{"id": i} for i in found]}, "archive"
        )
        if (error := _failure(archived)) is not None:
            return BatchOutcome.failed(error, {**answer.headers, **archived.headers})
        return BatchOutcome(results, None, {**answer.headers, **archived.headers})

    async def _membership(self, mapping: ObjectMapping, changes: list[Change]) -> BatchOutcome:
        id_property = _key_field(changes[0])
        body = {
            "idProperty": id_property,
            "inputs": [{"id": _key_value(c)} for c in changes],
            "properties": [id_property],
        }
        answer = await self._call("POST", f"/crm/v3/objects/{mapping.object}/batch/read", body, mapping.object)
        error = _failure(answer)
        if error is not None:
            return BatchOutcome.failed(error, answer.headers)
        hs_ids = {
            str((r.get("properties") or {}).get(id_property, "")).lower(): str(r["id"])
            for r in answer.body.get("results", [])
        }
        results: dict[str, RecordResult] = {}
        add, remove = [], []
        for change in changes:
            hs_id = hs_ids.get(_key_value(change))
            if hs_id is None:
                missing = CrmError(NOT_FOUND, "OBJECT_NOT_FOUND", "the record to add to the list does not exist", 207)
                results[change.record] = RecordResult(change.record, False, error=missing)
            else:
                (remove if change.op == REMOVE else add).append((change, hs_id))
        if not add and not remove:
            return BatchOutcome(results, None, answer.headers)
        members = {"recordIdsToAdd": [h for _, h in add], "recordIdsToRemove": [h for _, h in remove]}
        changed = await self._call("PUT", f"/crm/v3/lists/{mapping.list}/memberships/add-and-remove", members, "list")
        observed = {**answer.headers, **changed.headers}
        error = _failure(changed)
        if error is not None:
            return BatchOutcome.failed(error, observed)
        for change, hs_id in [*add, *remove]:
            results[change.record] = RecordResult(change.record, True, hs_id, None)
        return BatchOutcome(results, None, observed)


def _key_field(change: Change) -> str:
    return change.key[0][0]


def _key_value(change: Change) -> str:
    return change.key[0][1].lower()


def _properties(fields: dict[str, Any]) -> dict[str, str]:
    return {name: _text(value) for name, value in fields.items()}


def _text(value: Any) -> str:
    """A mapped value as the HubSpot property text it is written as. A list the mapping left unjoined is
    written ``;``-joined, as HubSpot's multiple-checkbox properties take and give back their options (an
    item holding ``;`` becomes two there: the mapping's own ``join`` is the way to choose another
    separator); a list holding anything but text, numbers and booleans, and an object, as JSON text. Never
    Python's ``str()`` (``"['a', 'b']"``), which no HubSpot property reads. The inbound echo check
    (inbound/news.py ``_same``) reads these forms back as the values written."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list | tuple) and all(_scalar(item) for item in value):
        return ";".join(_text(item) for item in value)
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    return str(value)


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float)  # bool is an int


def _failure(answer: Answer) -> CrmError | None:
    if answer.status == 429:
        return _whole_error(answer)  # its body names the policy (burst or daily)
    return transport_error(answer) or _whole_error(answer) or unexpected(answer)


def _whole_error(answer: Answer) -> CrmError | None:
    """The error of a request the CRM refused as a whole (None for 200 / 207)."""
    if answer.status in (200, 201, 204, 207):
        return None
    body = answer.body if isinstance(answer.body, dict) else {}
    message = str(body.get("message", ""))
    category = str(body.get("category") or body.get("errorType") or answer.status)
    if answer.status == 429 or body.get("errorType") == "RATE_LIMIT":
        policy = str(body.get("policyName", ""))
        return CrmError(THROTTLED, policy or "RATE_LIMIT", message, answer.status, daily=policy == "DAILY")
    if "PROPERTY_DOESNT_EXIST" in message:
        return CrmError(UNKNOWN_FIELD, "PROPERTY_DOESNT_EXIST", message, answer.status, every_record=True)
    if answer.status == 403:
        return CrmError(PERMISSION, category, message, answer.status, every_record=True)
    if answer.status == 404:
        return CrmError(NOT_FOUND, category, message, answer.status, every_record=True)
    if answer.status == 409 or category == "CONFLICT":
        # A unique value (a contact's email) another record holds: HubSpot refuses the whole batch; the halves
        # that follow find the record, dead-lettered `duplicate` as a batch's per-record CONFLICT is.
        return CrmError(DUPLICATE, category, message, answer.status)
    return CrmError(INVALID_VALUE if category == "VALIDATION_ERROR" else REJECTED, category, message, answer.status)


def _record_error(failure: dict[str, Any], status: int) -> CrmError:
    category = str(failure.get("category", ""))
    message = str(failure.get("message", ""))
    reason = {
        "VALIDATION_ERROR": INVALID_VALUE,
        "OBJECT_NOT_FOUND": NOT_FOUND,
        "CONFLICT": DUPLICATE,
    }.get(category, REJECTED)
    if "PROPERTY_DOESNT_EXIST" in message:
        reason = UNKNOWN_FIELD
    return CrmError(reason, category, message, status)
