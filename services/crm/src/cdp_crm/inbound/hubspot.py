"""HubSpot's changes: contacts, deals, tickets and tasks read with the CRM search API by their modification
date (modified-since polling: `lastmodifieddate` for contacts, `hs_lastmodifieddate` for the rest), and at
once when a signed HubSpot webhook (v3: contact.propertyChange, deal.propertyChange, ticket.creation, ...)
says something changed (`HubSpotWebhooks`: then only the objects the notification names are read). Every
request is reserved from the account's shared budget first; HubSpot's search limit (four a second per
token) is kept apart from it, by the token's `SearchPace` (adapters/hubspot.py), which this reader shares
with the outbound adapter's erasure lookups and of which it takes at most half: 1.9 searches a second
(0.525 s apart).

Most of what a busy read pages through is the connector's own writes read back (their modification date
moved; news.py tells them from a CRM user's edits by value and posts nothing for them): HubSpot's search
offers no documented filter for "changed by someone else", so they are read, in pages of 200 (HubSpot's
most) - at 300 contact writes a second, about 1.5 of the two searches. Once signed webhooks have named
every object the poller reads, quiet polling turns stretch (core.QUIET_STRETCH): HubSpot's legacy webhook
subscriptions have no tasks, its generic ones (``object.*``, by object type id) do (`OBJECT_TYPE_IDS`).

The pace is per process: an erasure running in another replica paces its lookups on its own, and the two
together can go over the token's limit. A search HubSpot refuses for it (429 ``SECONDLY``) is sent again a
second later - the limit's window -, five attempts in all within a read; then the read fails (`CrmReadFailed`)
and the next turn reads from the cursor, which moved only past what was posted: nothing is lost.

The search starts AT the cursor's stamp (ids read at that stamp are skipped, `core.Keyset`) and is asked
again from the new cursor after each page; a full page of records all read already (more than a page
changed in one instant) goes on with the search's own `after` paging instead. A record linked to a contact
(tickets, tasks, deals: the v4 associations) carries that contact's email and CDP id.

The search index lags writes by seconds, so a record can be found only after records written after it moved
the cursor past it: the poller reads each settled window back (core.Poller._read_back: `until` bounds the
search, LT; what was posted already is left out before its contact is looked up). Each record is read with
its `hs_merged_object_ids`: one a HubSpot user merged others into is followed (news.py `_relink`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import heapq
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from cdp_crm.adapters.http import exchange, transport_error
from cdp_crm.adapters.hubspot import SearchPace
from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.mapping import Connection
from cdp_crm.inbound.core import EPOCH, Change, Collector, CrmReadFailed, Keyset, Person, Poller, Posted
from cdp_crm.inbound.news import backwards, instant
from cdp_crm.inbound.refusals import RefusalLog
from cdp_crm.state import WEBHOOKS
from cdp_kit.storage import Store, VersionConflict
from cdp_kit.storage.expiry import ExpirySweeper

log = logging.getLogger("cdp.crm.inbound")

# Records a search page: HubSpot's most (200; the local HubSpot's SEARCH_PAGE_LIMIT too). Most of a busy read
# is the connector's own writes read back, and each page is a search from the token's few a second.
PAGE = 200
# Records a batch read asking for property history (`HubSpotReader.field_times`): HubSpot's most with
# ``propertiesWithHistory`` ("The maximum number of inputs supported in a batch request for property
# histories is 50"), against 100 without.
HISTORY_BATCH = 50
# What is read of each object (the event's properties), its modification stamp, and what it is.
HUBSPOT_OBJECTS: dict[str, tuple[str, ...]] = {
    "tickets": (
        "subject",
        "hs_pipeline",
        "hs_pipeline_stage",
        "hs_ticket_priority",
        "hs_ticket_category",
        "cdp_id",
        "cdp_idempotency_key",
    ),
    "tasks": ("hs_task_subject", "hs_task_status", "hs_task_priority", "hs_task_type", "cdp_idempotency_key"),
    "contacts": ("email", "firstname", "lastname", "phone", "company", "lifecyclestage", "city", "country", "cdp_id"),
    "deals": (
        "dealname",
        "dealstage",
        "pipeline",
        "amount",
        "closedate",
        "hs_is_closed",
        "hs_is_closed_won",
        "cdp_idempotency_key",
    ),
}
STAMP = {"contacts": "lastmodifieddate"}  # the others: hs_lastmodifieddate
# The ids of the records a HubSpot user merged into this one (``;``-joined): each retired, HubSpot answering
# for it with this record (developer changelog, "Updated merge functionality for contacts and companies").
MERGED_IDS = "hs_merged_object_ids"
KIND = {"tickets": "ticket", "tasks": "task", "contacts": "contact", "deals": "deal"}
PLURAL = {singular: obj for obj, singular in KIND.items()}
# A webhook names its object in its subscription type: the legacy ones by name (``contact.propertyChange``;
# contacts, companies, deals, tickets, products, line items and conversations - no tasks: HubSpot's webhooks
# API guide and ``POST /webhooks/v3/<app id>/subscriptions``), the generic ones (``object.propertyChange``,
# ``object.creation``, ...: developer changelog "Public Beta: Generic Webhook Subscriptions", August 2024,
# which cover tasks) by the payload's ``objectTypeId`` (the object APIs guide's object type ids).
OBJECT_TYPE_IDS = {"0-1": "contacts", "0-3": "deals", "0-5": "tickets", "0-27": "tasks"}
CLOSED_TICKET_STAGES = ("4", "closed")


class HubSpotReader:
    kind = "hubspot"
    objects = tuple(HUBSPOT_OBJECTS)
    reads_back = True  # `pages(..., until=)`: the poller reads the overlap back (core.INBOUND_OVERLAP)

    def __init__(
        self,
        connection: Connection,
        session: aiohttp.ClientSession,
        token: str,
        budget: SharedBudget,
        *,
        clock: Callable[[], float] = time.time,
        timeout: float = 30.0,
        searches: SearchPace | None = None,
    ) -> None:
        self.connection = connection
        self.session = session
        self.headers = {"Authorization": f"Bearer {token}"}
        self.base = (connection.url or "https://api.hubapi.com").rstrip("/")
        self.budget = budget
        self.clock = clock
        self.timeout = timeout
        # The token's searches, shared with the outbound adapter's (`open_poller`): this reader's at most
        # INBOUND_SHARE of HubSpot's limit.
        self.searches = searches or SearchPace()
        self.mapped = backwards(connection)

    async def pages(
        self, obj: str, cursor: dict[str, Any] | None, until: str | None = None, posted: Posted | None = None
    ) -> AsyncIterator[tuple[list[Change], dict[str, Any]]]:
        """`until`, `posted`: a read-back's window (core.Poller._read_back) - records stamped before `until`,
        those `posted` names (read and posted already) left out before their contacts are looked up."""
        keyset = Keyset.of(cursor)
        after: str | None = None  # the search's own paging, only within a run of already-read records
        while True:
            page, following = await self._search(obj, keyset.after, after, until)
            pairs = [(str(r["id"]), _stamp(obj, r)) for r in page]
            fresh = [page[i] for i in keyset.fresh(pairs)]
            if not fresh:
                if len(page) < PAGE or following is None:
                    return
                after = following  # a full page read already: more than a page changed in one instant
                continue
            after = None
            if posted is not None:
                read = [(str(r["id"]), _stamp(obj, r)) for r in fresh]
                keyset = keyset.advance(read)
                known = await posted(read)
                fresh = [r for r, pair in zip(fresh, read, strict=True) if pair not in known]
                if not fresh:
                    yield [], keyset.doc()
                    if len(page) < PAGE:
                        return
                    continue
            # A task or ticket the connector itself just created is not news (`Change.own`): the contact it
            # is about is not looked up (a request per record, from the budget the writes share). A contact
            # is its own person, read from the page.
            linked = fresh if obj == "contacts" else [r for r in fresh if not _own_creation(obj, r)]
            contacts = await self._contacts(obj, linked)
            changes = [self._change(obj, r, contacts.get(str(r["id"]))) for r in fresh]
            if posted is None:
                keyset = keyset.advance([(str(r["id"]), _stamp(obj, r)) for r in fresh])
            yield changes, keyset.doc()
            if len(page) < PAGE:
                return

    # --- requests -------------------------------------------------------------------------------

    async def _call(self, method: str, path: str, body: Any, what: str) -> Any:
        search = path.endswith("/search")
        for _ in range(5):
            slot = None
            if search:
                # HubSpot's search limit, apart from the burst budget: the slot first, so no unit of the
                # budget is held while it comes.
                slot = await self.searches.take(inbound=True)
            try:
                reservation = await self.budget.acquire(1, self.clock)
            except BaseException:  # cancelled (a stop) or the store failing: not searched, the slot is free
                if slot is not None:
                    self.searches.give_back(slot, inbound=True)
                raise
            if slot is not None:
                # The budget's wait (a Retry-After, a full window; a store write at least) may have outlasted
                # the slot: later than the pace allows, the search takes a new one, the budget's unit held
                # meanwhile (a spacing or two) - asked for again, it could be late again.
                try:
                    await self.searches.leave(slot, inbound=True)
                except BaseException:  # cancelled waiting for the new slot (given back): not searched
                    await self.budget.refund(reservation, self.clock())
                    raise
            answer = await exchange(
                self.session, method, self.base + path, json=body, headers=self.headers, timeout=self.timeout, what=what
            )
            # Held until the answer is in (the CRM counts it on arrival), then aged from there.
            lost = answer.error is not None and answer.error.code == "TIMEOUT"  # the CRM may take it later still
            await self.budget.settle(reservation, self.clock(), answer.headers, answered=not lost)
            policy = answer.body.get("policyName") if isinstance(answer.body, dict) else None
            if answer.status == 429 and policy == "SECONDLY":  # over the search limit: its window is a second
                await asyncio.sleep(1.0)
                continue
            error = transport_error(answer)
            if error is not None:
                if answer.status == 429:
                    await self.budget.throttled(self.clock(), retry_after=error.retry_after, daily=policy == "DAILY")
                raise CrmReadFailed(f"hubspot {what} failed: {error.reason} {policy or error.code}")
            if answer.status >= 400:
                raise CrmReadFailed(f"hubspot {what} answered {answer.status}")
            return answer.body
        raise CrmReadFailed(f"hubspot {what} stayed over the search rate")

    async def _search(
        self, obj: str, since: str, after: str | None, until: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        stamp = STAMP.get(obj, "hs_lastmodifieddate")
        wanted = [*HUBSPOT_OBJECTS[obj], *self.mapped.get(obj, {}), stamp, "createdate", MERGED_IDS]
        filters = [{"propertyName": stamp, "operator": "GTE", "value": since}]
        if until is not None:  # a read-back's window (core.Poller._read_back): before `until` only
            filters.append({"propertyName": stamp, "operator": "LT", "value": until})
        body: dict[str, Any] = {
            "filterGroups": [{"filters": filters}],
            "sorts": [{"propertyName": stamp, "direction": "ASCENDING"}],
            "properties": list(dict.fromkeys(wanted)),
            "limit": PAGE,
        }
        if after is not None:
            body["after"] = after
        answer = await self._call("POST", f"/crm/v3/objects/{obj}/search", body, f"search {obj}")
        following = ((answer.get("paging") or {}).get("next") or {}).get("after")
        return list(answer.get("results", [])), following

    async def _contacts(self, obj: str, records: list[dict[str, Any]]) -> dict[str, Person]:
        """The contact each record is (contacts) or is associated with (its id, email, cdp_id), by record id."""
        if obj == "contacts":
            return {str(r["id"]): _person(str(r["id"]), r.get("properties") or {}) for r in records}
        linked: dict[str, str] = {}
        for r in records:
            answer = await self._call(
                "GET", f"/crm/v4/objects/{obj}/{r['id']}/associations/contacts", None, "associations"
            )
            results = answer.get("results", []) if isinstance(answer, dict) else []
            if results:
                linked[str(r["id"])] = str(results[0].get("toObjectId"))
        if not linked:
            return {}
        body = {"inputs": [{"id": c} for c in dict.fromkeys(linked.values())], "properties": ["email", "cdp_id"]}
        answer = await self._call("POST", "/crm/v3/objects/contacts/batch/read", body, "contacts")
        contacts = {str(c["id"]): _person(str(c["id"]), c.get("properties") or {}) for c in answer.get("results", [])}
        return {rid: contacts[cid] for rid, cid in linked.items() if cid in contacts}

    async def field_times(self, obj: str, record_ids: list[str]) -> dict[str, dict[str, str]]:
        """When each field read back as a trait took its value, per record (record id -> CRM field -> time):
        HubSpot's property history, a batch read with ``propertiesWithHistory`` per `HISTORY_BATCH` records
        (HubSpot refuses more with history), each from the account's budget; the search the changes are
        read by gives no history. Asked by the poller only for records whose change carries traits - a CRM
        user's edits (news.py `_timed`). A field's time is its newest value's. Raises as any read does: the
        page is read again at the next turn, its cursor unmoved."""
        fields = sorted(self.mapped.get(obj, {}))
        times: dict[str, dict[str, str]] = {}
        if not fields:
            return times
        for start in range(0, len(record_ids), HISTORY_BATCH):
            body = {
                "inputs": [{"id": r} for r in record_ids[start : start + HISTORY_BATCH]],
                "properties": [],
                "propertiesWithHistory": fields,
            }
            answer = await self._call("POST", f"/crm/v3/objects/{obj}/batch/read", body, f"{obj} property history")
            for result in answer.get("results", []) if isinstance(answer, dict) else []:
                history = result.get("propertiesWithHistory") or {}
                times[str(result.get("id"))] = {
                    name: newest for name, entries in history.items() if (newest := _newest(entries)) is not None
                }
        return times

    def _change(self, obj: str, record: dict[str, Any], person: Person | None) -> Change:
        props = record.get("properties") or {}
        stamp = _stamp(obj, record)
        created = _created(obj, record)
        kind = KIND[obj]
        watched: Any = None
        closed = won = None
        if obj == "tickets":
            watched = props.get("hs_pipeline_stage")
            closed = str(watched) in CLOSED_TICKET_STAGES
        elif obj == "tasks":
            watched = props.get("hs_task_status")
            closed = str(watched or "").upper() == "COMPLETED"
        elif obj == "deals":
            watched = props.get("dealstage")
            closed = str(props.get("hs_is_closed", "")).lower() == "true"
            won = str(props.get("hs_is_closed_won", "")).lower() == "true"
        return Change(
            obj=obj,
            record_id=str(record["id"]),
            stamp=stamp,
            kind=kind,
            properties={k: props.get(k) for k in HUBSPOT_OBJECTS[obj]},
            created=created,
            watched=watched,
            closed=closed,
            won=won,
            # A task or case this connector created comes back as a change: its creation is the CDP's own
            # action, not news (its later outcome is).
            own=_own_creation(obj, record),
            person=person,
            record=dict(props),
            merged=tuple(
                i for i in str(props.get(MERGED_IDS) or "").split(";") if i.strip() and i != str(record["id"])
            ),
        )


class HubSpotPoller(Poller):
    """One HubSpot connection's changed records, since the cursors, to the collector."""

    def __init__(
        self,
        store: Store,
        connection: Connection,
        session: aiohttp.ClientSession,
        token: str,
        budget: SharedBudget,
        collector: Collector,
        *,
        objects: tuple[str, ...] = tuple(HUBSPOT_OBJECTS),
        clock: Callable[[], float] = time.time,
        timeout: float = 30.0,
        searches: SearchPace | None = None,
    ) -> None:
        reader = HubSpotReader(connection, session, token, budget, clock=clock, timeout=timeout, searches=searches)
        super().__init__(store, connection, reader, collector, objects=objects, clock=clock)


def _newest(entries: Any) -> str | None:
    """The time of a property's newest value in its history (HubSpot lists them newest first; not relied on)."""
    stamps = [e["timestamp"] for e in entries or () if isinstance(e, dict) and isinstance(e.get("timestamp"), str)]
    try:
        return max(stamps, key=instant) if stamps else None
    except ValueError:
        return None


def _stamp(obj: str, record: dict[str, Any]) -> str:
    props = record.get("properties") or {}
    return str(
        props.get(STAMP.get(obj, "hs_lastmodifieddate"))
        or props.get("hs_lastmodifieddate")
        or record.get("updatedAt")
        or EPOCH
    )


def _created(obj: str, record: dict[str, Any]) -> bool:
    """This read of the record is its creation (its modification stamp is its creation date)."""
    return (record.get("properties") or {}).get("createdate") == _stamp(obj, record)


def _own_creation(obj: str, record: dict[str, Any]) -> bool:
    """The creation of a record the connector created (a task or ticket holding its idempotency key)."""
    return bool((record.get("properties") or {}).get("cdp_idempotency_key")) and _created(obj, record)


def _person(record_id: str, props: dict[str, Any]) -> Person:
    return Person(record_id, props.get("email") or None, props.get("cdp_id") or None)


class HubSpotWebhooks:
    """`POST /webhooks/hubspot/<connection>`: HubSpot's change notifications, checked against the app's
    secret (signature v3: base64 HMAC-SHA256 over method, URL, body and timestamp; older than five
    minutes is refused, and one already taken is answered without waking anything, so a captured request
    cannot be replayed - neither later nor thousands of times within the five minutes, each making the
    poller read the CRM on the account's budget), wake that connection's poller. The
    notification's content is not trusted beyond "something changed": the poller reads the records.

    "Taken already" is the store's (`store`: `crm_webhooks/<connection>:<digest of the signature>`, created
    only if absent - a versioned put expecting no document -, its `at` the request's timestamp, swept once
    the timestamp is too old to be taken anyway, `WebhookSweeper`): every replica behind a load balancer
    sees what another took, where a memory per process took a replay sent to another replica again. A
    process's own memory stays in front of it (a flood of one replayed request to one replica costs no
    store write). The store not answering: 503 and nothing woken (HubSpot retries; polling is the net).
    Without a store (tests of one process), the process's memory alone.

    `public_url`: the base URL HubSpot calls (behind a proxy the request's own URL differs from the one
    HubSpot signed); empty: the request's URL."""

    MAX_AGE_MS = 300_000

    def __init__(
        self,
        pollers: dict[str, tuple[Poller, str]],
        *,
        public_url: str = "",
        clock: Callable[[], float] = time.time,
        meter: Any = None,
        store: Store | None = None,
    ) -> None:
        self.pollers = pollers  # connection id -> (poller, the app's client secret)
        self.store = store
        self.public_url = public_url.rstrip("/")
        self.clock = clock
        self.refusals = RefusalLog(log, meter=meter)  # a flood of forged requests: one line a minute
        self.app = web.Application()
        self.app.router.add_post("/webhooks/hubspot/{connection}", self.handle)
        self.app.on_cleanup.append(self._cleanup)
        # Signatures taken, until their timestamp is too old to be taken anyway (a heap by that time).
        self._taken: set[str] = set()
        self._expiries: list[tuple[int, str]] = []

    async def _cleanup(self, app: web.Application) -> None:
        self.refusals.close()

    async def handle(self, request: web.Request) -> web.Response:
        entry = self.pollers.get(request.match_info["connection"])
        if entry is None:
            return web.json_response({"message": "no such connection"}, status=404)
        poller, secret = entry
        timestamp = request.headers.get("X-HubSpot-Request-Timestamp", "")
        signature = request.headers.get("X-HubSpot-Signature-v3", "")
        # Milliseconds, ASCII digits (int() would take others, and raise past 4,300 of them): checked
        # before the body is read, so a request without a recent time costs nothing more.
        fresh = timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 15
        if not fresh or abs(self.clock() * 1000 - int(timestamp)) > self.MAX_AGE_MS:
            self.refusals(poller.connection.id, "stale")
            return web.json_response({"message": "missing or stale X-HubSpot-Request-Timestamp"}, status=401)
        body = await request.read()
        url = self.public_url + request.path_qs if self.public_url else str(request.url)
        message = request.method.encode() + url.encode() + body + timestamp.encode()
        expected = base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest()).decode()
        if not hmac.compare_digest(expected, signature):
            self.refusals(poller.connection.id, "signature")
            return web.json_response({"message": "the X-HubSpot-Signature-v3 does not match"}, status=401)
        now_ms = self.clock() * 1000
        while self._expiries and self._expiries[0][0] < now_ms:
            self._taken.discard(heapq.heappop(self._expiries)[1])
        if signature in self._taken:
            self.refusals(poller.connection.id, "replayed")
            return web.Response(status=204)  # taken already: nothing to do again
        if self.store is not None:
            key = f"{poller.connection.id}:{hashlib.sha256(signature.encode()).hexdigest()[:32]}"
            try:
                await self.store.put(WEBHOOKS, key, {"at": int(timestamp) / 1000}, expected_version=0)
            except VersionConflict:  # another replica (or this one, before a restart) took it
                self._remember(signature, timestamp)
                self.refusals(poller.connection.id, "replayed")
                return web.Response(status=204)
            except Exception as exc:  # the store down: neither taken nor refused for good
                log.warning(
                    "crm webhook not checked against the store",
                    extra={"connection": poller.connection.id, "error": type(exc).__name__},
                )
                return web.json_response({"message": "try again"}, status=503)
        self._remember(signature, timestamp)
        named = _objects_named(body)
        poller.announced |= named or set()  # announced: once every object is, quiet polling turns stretch
        poller.wake(named)
        return web.Response(status=204)

    def _remember(self, signature: str, timestamp: str) -> None:
        self._taken.add(signature)
        heapq.heappush(self._expiries, (int(timestamp) + self.MAX_AGE_MS, signature))


class WebhookSweeper(ExpirySweeper):
    """Deletes the webhook signatures taken (`crm_webhooks`) once their request's timestamp is older than a
    request is taken at (`HubSpotWebhooks.MAX_AGE_MS`), plus a minute for the replicas' clocks: by then a
    replay is refused as stale before the store is asked. Every replica sweeps; each record goes once."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(store, WEBHOOKS, max_age=HubSpotWebhooks.MAX_AGE_MS / 1000 + 60, interval=60, clock=clock)


def _objects_named(body: bytes) -> set[str] | None:
    """The objects a notification's subscription types name (contact.propertyChange -> contacts;
    object.propertyChange with objectTypeId 0-27 -> tasks); None when one is not read here or the body is
    not HubSpot's list: then everything is read."""
    try:
        events = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(events, list):
        return None
    named = set()
    for event in events:
        singular = str(event.get("subscriptionType", "")).split(".", 1)[0] if isinstance(event, dict) else ""
        if singular == "object":  # a generic subscription (object.<change>): the object by its type id
            singular = KIND.get(OBJECT_TYPE_IDS.get(str(event.get("objectTypeId", ""))) or "", "")
        obj = PLURAL.get(singular)
        if obj is None:
            return None
        named.add(obj)
    return named or None
