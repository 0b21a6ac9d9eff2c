"""The feedback loop: CRM changes become CDP events, posted to the collector's HTTP API.

Per connection a `Poller` reads the CRM's changed records since its cursor and posts one Segment `track`
event per change to the collector (`/v1/batch`, the CRM source's write key), carrying the CRM's ids and,
for a record linked to a contact, the contact's email and CDP id, so identity links the event to the
person. Implemented for HubSpot: tickets (opened, updated, closed) and tasks (their outcome), read with
the CRM search API by `hs_lastmodifieddate` (modified-since polling), at once when a signed HubSpot
webhook says something changed (`HubSpotWebhooks`). Every CRM request is reserved from the account's
shared budget first.

Neither lost nor repeated across a restart:
- the cursor (`crm_cursors/<connection>:<object>`: the last modification stamp read and the ids read at
  exactly that stamp) is written only after the collector accepted the page, so a crash re-reads the
  page rather than skipping it;
- an event's `messageId` derives from the connection, object, record id and modification stamp only,
  so a page read again is posted with the same ids and the collector stores each change once (it answers
  them as duplicates); the ids at the cursor's stamp are skipped, as the search starts at that stamp.

Log lines name the connection, object and counts; never record values or emails.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from cdp_crm.adapters.http import exchange, transport_error
from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.mapping import Connection
from cdp_crm.state import CURSORS
from cdp_kit.storage import Store

log = logging.getLogger("cdp.crm.inbound")

PAGE = 100
SEARCH_SPACING = 0.25  # seconds between two searches: HubSpot's search limit is per second
EPOCH = "1970-01-01T00:00:00.000Z"
# What is read of each object, and the event a change of it becomes.
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
}


class CollectorRefused(Exception):
    """The collector did not store the events (429, 5xx, unreachable): the page is read again later."""


class Collector:
    """The collector's Segment HTTP API, as one source with its write key."""

    def __init__(self, session: aiohttp.ClientSession, url: str, write_key: str, *, timeout: float = 30.0) -> None:
        self._session = session
        self._url = url.rstrip("/") + "/v1/batch"
        self._auth = "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()
        self._timeout = timeout

    async def post(self, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        try:
            async with self._session.post(
                self._url,
                json={"batch": events},
                headers={"Authorization": self._auth},
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            ) as response:
                body = await response.json(content_type=None)
                status = response.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise CollectorRefused(type(exc).__name__) from None
        if status == 200:
            return
        if status == 400 and isinstance(body, dict) and body.get("code") == "invalid_events":
            # The valid events were stored; an invalid one would be refused again: say so and go on.
            log.error("collector refused crm events", extra={"rejected": len(body.get("rejected", []))})
            return
        raise CollectorRefused(f"collector answered {status}")


def event_id(connection: str, obj: str, record_id: str, stamp: str) -> str:
    """Stable for one change of one record: the same on every replica and after any restart."""
    digest = hashlib.sha256("\x00".join(("crm", connection, obj, record_id, stamp)).encode()).hexdigest()
    return "crm-" + digest[:32]


@dataclass
class Cursor:
    after: str = EPOCH
    seen: tuple[str, ...] = ()


class HubSpotPoller:
    """One HubSpot connection's changed tickets and tasks, since the cursor, to the collector."""

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
    ) -> None:
        self.store = store
        self.connection = connection
        self.session = session
        self.headers = {"Authorization": f"Bearer {token}"}
        self.base = (connection.url or "https://api.hubapi.com").rstrip("/")
        self.budget = budget
        self.collector = collector
        self.objects = objects
        self.clock = clock
        self.timeout = timeout
        self._last_search = 0.0
        self.woken = asyncio.Event()  # set by a signed webhook: read the changes now

    async def run(self, every: float, owned: Callable[[], bool] = lambda: True) -> None:
        """Read the changes every `every` seconds while `owned()` (one reader per connection), and at once
        whenever a signed webhook says something changed (whichever replica it reached: the cursor and the
        event ids make a second reader harmless)."""
        while True:
            try:
                await asyncio.wait_for(self.woken.wait(), every)
            except TimeoutError:
                pass
            woken = self.woken.is_set()
            self.woken.clear()
            if not (woken or owned()):
                continue
            try:
                await self.poll()
            except Exception as exc:  # the CRM or the collector failing: read again from the cursor next time
                log.warning(
                    "reading crm changes failed", extra={"connection": self.connection.id, "error": type(exc).__name__}
                )

    async def poll(self) -> int:
        """Post every change since the cursors; returns how many events were posted."""
        posted = 0
        for obj in self.objects:
            posted += await self._poll_object(obj)
        return posted

    # --- one object -----------------------------------------------------------------------------------

    def _cursor_key(self, obj: str) -> str:
        return f"{self.connection.id}:{obj}"

    async def _poll_object(self, obj: str) -> int:
        record = await self.store.get(CURSORS, self._cursor_key(obj))
        cursor = Cursor(record.doc["after"], tuple(record.doc["seen"])) if record is not None else Cursor()
        posted = 0
        while True:
            page = await self._search(obj, cursor.after)
            fresh = [r for r in page if not (_stamp(r) == cursor.after and str(r["id"]) in cursor.seen)]
            if not fresh:
                return posted
            # A task or case this connector created comes back as a change: its creation is the CDP's own
            # action, not news (its later outcome is).
            report = [r for r in fresh if not _own_creation(r)]
            contacts = await self._contacts(obj, report) if report else {}
            await self.collector.post([self._event(obj, r, contacts.get(str(r["id"]))) for r in report])
            posted += len(report)
            last = _stamp(fresh[-1])
            at_last = [str(r["id"]) for r in fresh if _stamp(r) == last]
            seen = (*cursor.seen, *at_last) if last == cursor.after else tuple(at_last)
            cursor = Cursor(last, seen)
            await self.store.put(CURSORS, self._cursor_key(obj), {"after": cursor.after, "seen": list(cursor.seen)})
            log.info(
                "crm changes posted", extra={"connection": self.connection.id, "object": obj, "events": len(report)}
            )
            if len(page) < PAGE:
                return posted

    async def _call(self, method: str, path: str, body: Any, what: str) -> Any:
        search = path.endswith("/search")
        for _ in range(5):
            await self.budget.acquire(1, self.clock)
            if search:
                # HubSpot allows a few searches a second per account, apart from the burst budget.
                await asyncio.sleep(max(0.0, self._last_search + SEARCH_SPACING - time.monotonic()))
                self._last_search = time.monotonic()
            answer = await exchange(
                self.session, method, self.base + path, json=body, headers=self.headers, timeout=self.timeout, what=what
            )
            await self.budget.observe(answer.headers, self.clock())
            policy = answer.body.get("policyName") if isinstance(answer.body, dict) else None
            if answer.status == 429 and policy == "SECONDLY":
                await asyncio.sleep(1.0)
                continue
            error = transport_error(answer)
            if error is not None:
                if answer.status == 429:
                    await self.budget.throttled(self.clock(), retry_after=error.retry_after, daily=policy == "DAILY")
                raise ConnectionError(f"hubspot {what} failed: {error.reason} {policy or error.code}")
            if answer.status >= 400:
                raise ConnectionError(f"hubspot {what} answered {answer.status}")
            return answer.body
        raise ConnectionError(f"hubspot {what} stayed over the search rate")

    async def _search(self, obj: str, after: str) -> list[dict[str, Any]]:
        body = {
            "filterGroups": [{"filters": [{"propertyName": "hs_lastmodifieddate", "operator": "GTE", "value": after}]}],
            "sorts": [{"propertyName": "hs_lastmodifieddate", "direction": "ASCENDING"}],
            "properties": [*HUBSPOT_OBJECTS[obj], "hs_lastmodifieddate", "createdate"],
            "limit": PAGE,
        }
        answer = await self._call("POST", f"/crm/v3/objects/{obj}/search", body, f"search {obj}")
        return list(answer.get("results", []))

    async def _contacts(self, obj: str, records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The contact each record is associated with (its id, email, cdp_id), by record id."""
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
        contacts = {
            str(c["id"]): {"id": str(c["id"]), **(c.get("properties") or {})} for c in answer.get("results", [])
        }
        return {rid: contacts[cid] for rid, cid in linked.items() if cid in contacts}

    def _event(self, obj: str, record: dict[str, Any], contact: dict[str, Any] | None) -> dict[str, Any]:
        props = record.get("properties") or {}
        stamp = _stamp(record)
        record_id = str(record["id"])
        name = _event_name(obj, props, stamp)
        properties = {k: v for k, v in props.items() if k in HUBSPOT_OBJECTS[obj] and v not in (None, "")}
        properties.update(crm="hubspot", connection=self.connection.id, object=obj, crm_id=record_id)
        event: dict[str, Any] = {
            "type": "track",
            "event": name,
            "messageId": event_id(self.connection.id, obj, record_id, stamp),
            "timestamp": stamp,
            "properties": properties,
            "context": {"source": {"crm": "hubspot", "connection": self.connection.id}},
        }
        if contact is not None:
            properties["crm_contact_id"] = contact["id"]
            if contact.get("email"):
                # Identity links the event to the person through the email (an identifier it resolves);
                # the CDP person id is a reference, never a userId (identity would take it for a new user).
                event["context"]["traits"] = {"email": contact["email"]}
            if contact.get("cdp_id"):
                properties["cdp_person_id"] = contact["cdp_id"]
        event["anonymousId"] = f"hubspot:{self.connection.account}:{contact['id'] if contact else record_id}"
        return event


def _stamp(record: dict[str, Any]) -> str:
    props = record.get("properties") or {}
    return str(props.get("hs_lastmodifieddate") or record.get("updatedAt") or EPOCH)


def _own_creation(record: dict[str, Any]) -> bool:
    props = record.get("properties") or {}
    return bool(props.get("cdp_idempotency_key")) and props.get("createdate") == _stamp(record)


def _event_name(obj: str, props: dict[str, Any], stamp: str) -> str:
    created = props.get("createdate") == stamp
    if obj == "tickets":
        if created:
            return "CRM Ticket Opened"
        return "CRM Ticket Closed" if str(props.get("hs_pipeline_stage")) in ("4", "closed") else "CRM Ticket Updated"
    if obj == "tasks":
        if str(props.get("hs_task_status", "")).upper() == "COMPLETED":
            return "CRM Task Completed"
        return "CRM Task Created" if created else "CRM Task Updated"
    return "CRM Record Updated"


class HubSpotWebhooks:
    """`POST /webhooks/hubspot/<connection>`: HubSpot's change notifications, checked against the app's
    secret (signature v3: base64 HMAC-SHA256 over method, URL, body and timestamp; older than five
    minutes is refused, so a captured request cannot be replayed), wake that connection's poller. The
    notification's content is not trusted beyond "something changed": the poller reads the records.

    `public_url`: the base URL HubSpot calls (behind a proxy the request's own URL differs from the one
    HubSpot signed); empty: the request's URL."""

    MAX_AGE_MS = 300_000

    def __init__(
        self,
        pollers: dict[str, tuple[HubSpotPoller, str]],
        *,
        public_url: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pollers = pollers  # connection id -> (poller, the app's client secret)
        self.public_url = public_url.rstrip("/")
        self.clock = clock
        self.app = web.Application()
        self.app.router.add_post("/webhooks/hubspot/{connection}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        entry = self.pollers.get(request.match_info["connection"])
        if entry is None:
            return web.json_response({"message": "no such connection"}, status=404)
        poller, secret = entry
        body = await request.read()
        timestamp = request.headers.get("X-HubSpot-Request-Timestamp", "")
        signature = request.headers.get("X-HubSpot-Signature-v3", "")
        if not timestamp.isdigit() or abs(self.clock() * 1000 - int(timestamp)) > self.MAX_AGE_MS:
            log.warning("crm webhook refused", extra={"connection": poller.connection.id, "reason": "stale"})
            return web.json_response({"message": "missing or stale X-HubSpot-Request-Timestamp"}, status=401)
        url = self.public_url + request.path_qs if self.public_url else str(request.url)
        message = request.method.encode() + url.encode() + body + timestamp.encode()
        expected = base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest()).decode()
        if not hmac.compare_digest(expected, signature):
            log.warning("crm webhook refused", extra={"connection": poller.connection.id, "reason": "signature"})
            return web.json_response({"message": "the X-HubSpot-Signature-v3 does not match"}, status=401)
        poller.woken.set()
        return web.Response(status=204)
