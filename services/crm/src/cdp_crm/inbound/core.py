"""What every CRM's inbound side shares: the collector, event ids, the change -> event rule, the polling loop.

A CRM's `Reader` turns its change mechanism (modified-since polling, change tracking) into pages of
`Change`s, each page with the cursor that follows it; the `Poller` posts a page's events to the collector
(`/v1/batch`, the CRM source's write key) and only then stores the cursor (`crm_cursors/<connection>:<object>`),
so a crash re-reads the page instead of skipping it. An event's `messageId` derives from the connection,
object, record id and modification stamp only, so a page read again is posted with the same ids and the
collector stores each change once. Together: a restart neither loses nor repeats a change.

Identity: every event carries the CRM ids and, when the record is linked to a contact (or is one), the
contact's email in `context.traits` (an identifier identity resolves) under the anonymous id
`<kind>:<account>:<contact id>`; the CDP person id the connector wrote rides along as
`properties.cdp_person_id`, never as a userId (identity would take it for a second user).

Traits and consent written in the CRM: a contact's change also becomes an `identify` whose traits and
`context.consent` are the contact's fields that a record mapping of the connection fills from `traits.*` or
`consent.*` (the mapping read backwards; fields whose transform is not value-preserving are left out).
Posted with the CRM source's write key, the profile records them with that source and the event id as
provenance; `context.source` names the CRM and the connection. The event's time is the CRM's modification
stamp, so an older CRM value never overrides a newer one.

What a record was when last read (`crm_cursors/<connection>:<object>:<id>`: the watched field - a deal's
stage, a case's or task's status - and a digest of the reported fields) tells a stage change from any other
edit and keeps an edit of fields nobody reads (a score the connector wrote) from becoming an event; a
contact's field holding what the connector last wrote there (`crm_records`) counts as unchanged, so the
CDP's own writes do not come back as news, nor do the contacts the connector created (holding the CDP id). It is
written after the post and before the cursor, with the stamp it was read at and what that read compared
with: a page read again compares with the same thing and posts the same events under the same ids.

Log lines name the connection, object and counts; never record values or emails.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import orjson

from cdp_crm.adapters.http import Answer
from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.mapping import PERSON_ID, Connection
from cdp_crm.inbound.refused import keep_refused
from cdp_crm.inbound.sizes import fit
from cdp_crm.state import CURSORS, ERASED, RECORDS, RUNS, TOMBSTONES
from cdp_kit.storage import Store

log = logging.getLogger("cdp.crm.inbound")

EPOCH = "1970-01-01T00:00:00.000Z"
START_MARGIN = 300.0  # seconds before the first start `inbound.start: now` reads from (clocks apart)
POST_CHUNK = 100  # changes per cursor step, where the cursor allows steps within a CRM's page
BATCH_BYTES = 400_000  # a collector request stays under the Segment API's 500 KB
# Transforms that keep a value as it is (up to case and spaces): a field mapped through one of them can be
# read back as the trait; a rounded score or a joined list cannot.
REVERSIBLE = frozenset({"string", "trim", "lower", "upper", "boolean"})


class CollectorRefused(Exception):
    """The collector did not store the events (429, 5xx, unreachable): the page is read again later."""


class CrmReadFailed(Exception):
    """The CRM did not answer a read (throttled, down, refused): the poller tries again from its cursor."""


class Collector:
    """The collector's Segment HTTP API, as one source with its write key."""

    def __init__(self, session: aiohttp.ClientSession, url: str, write_key: str, *, timeout: float = 30.0) -> None:
        self._session = session
        self._url = url.rstrip("/") + "/v1/batch"
        self._auth = "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()
        self._timeout = timeout

    async def post(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Post `events`; returns those the collector refused as invalid (`messageId`, `code`, `field`):
        the others are stored. Raises `CollectorRefused` when none was stored."""
        if not events:
            return []
        try:
            async with self._session.post(
                self._url,
                json={"batch": events},
                headers={"Authorization": self._auth},
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            ) as response:
                status = response.status
                try:
                    body = await response.json(content_type=None)
                except ValueError:  # not JSON: a proxy's or the web server's own error page
                    body = None
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise CollectorRefused(type(exc).__name__) from None
        if status == 200:
            return []
        if status == 400 and isinstance(body, dict) and body.get("code") == "invalid_events":
            # The valid events were stored; an invalid one would be refused again: the poller dead-letters it.
            rejected = [r for r in body.get("rejected") or [] if isinstance(r, dict)]
            fields = sorted({str(r.get("field") or "") for r in rejected})
            log.error("collector refused crm events", extra={"rejected": len(rejected), "fields": fields})
            return rejected
        raise CollectorRefused(f"collector answered {status}")


def event_id(connection: str, obj: str, record_id: str, stamp: str, part: str = "") -> str:
    """Stable for one change of one record: the same on every replica and after any restart. `part` tells
    the two events of one contact change apart (the track and the identify)."""
    fields = ("crm", connection, obj, record_id, stamp, *((part,) if part else ()))
    return "crm-" + hashlib.sha256("\x00".join(fields).encode()).hexdigest()[:32]


def instant(stamp: str) -> dt.datetime:
    """A CRM's modification stamp as an aware datetime (ISO 8601 with Z, +00:00 or Salesforce's +0000)."""
    text = stamp.strip().replace("Z", "+00:00")
    if len(text) > 5 and text[-5] in "+-" and text[-4:].isdigit():
        text = text[:-2] + ":" + text[-2:]
    parsed = dt.datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


# --- changes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Person:
    """The CRM contact (or lead) a change is about."""

    id: str
    email: str | None = None
    cdp_id: str | None = None


@dataclass
class Change:
    """One change of one CRM record, as a reader saw it."""

    obj: str  # the CRM object as the connection names it (Contact, incidents, Deals, tickets, ...)
    record_id: str
    stamp: str  # its modification stamp (versionnumber for Dataverse)
    kind: str  # contact | lead | case | ticket | task | deal | campaign_member
    properties: dict[str, Any]  # the fields the event reports
    created: bool = False  # this stamp is the record's creation
    watched: Any = None  # the field whose change names the event (status, stage)
    closed: bool | None = None  # a case/ticket closed, a task completed, a deal closed
    won: bool | None = None  # a closed deal won
    own: bool = False  # created by the connector (an idempotency key, created at this stamp): not news
    deleted: bool = False
    person: Person | None = None
    record: dict[str, Any] = field(default_factory=dict)  # every field read (for traits read backwards)
    at: str | None = None  # when it changed, where the stamp is not a time (a Dataverse version number)


class Reader(Protocol):
    """One CRM connection's change mechanism."""

    kind: str
    objects: tuple[str, ...]

    def pages(self, obj: str, cursor: dict[str, Any] | None) -> AsyncIterator[tuple[list[Change], dict[str, Any]]]:
        """The changes since `cursor` (None: from the beginning), a page at a time, each with the cursor
        that follows it."""
        ...


# --- keyset cursors (modified-since polling) ------------------------------------------------------


@dataclass
class Keyset:
    """How far a modified-since reader has read: the last stamp, and the ids read at exactly that stamp
    (the next read starts AT that stamp: a record changed in the same instant is not skipped)."""

    after: str = EPOCH
    seen: tuple[str, ...] = ()

    @classmethod
    def of(cls, cursor: dict[str, Any] | None) -> Keyset:
        return cls(cursor["after"], tuple(cursor["seen"])) if cursor else cls()

    def doc(self) -> dict[str, Any]:
        return {"after": self.after, "seen": list(self.seen)}

    def fresh(self, records: list[tuple[str, str]]) -> list[int]:
        """The positions of (id, stamp) pairs not read yet."""
        at = instant(self.after)
        keep = []
        for i, (record_id, stamp) in enumerate(records):
            when = instant(stamp)
            if when > at or (when == at and record_id not in self.seen):
                keep.append(i)
        return keep

    def advance(self, records: list[tuple[str, str]]) -> Keyset:
        """The cursor after these (id, stamp) pairs, read in ascending stamp order."""
        cursor = self
        for record_id, stamp in records:
            if instant(stamp) == instant(cursor.after):
                cursor = Keyset(cursor.after, (*cursor.seen, record_id))
            else:
                cursor = Keyset(stamp, (record_id,))
        return cursor


# --- readers through the outbound adapter ---------------------------------------------------------


class AdapterReader:
    """What the Salesforce, Dynamics and Zoho readers share: they call their CRM through the connection's
    outbound adapter (its `read`: the adapter's token, renewed once when it expires, and a unit of the
    account's shared budget per request), and a failed or non-JSON answer is a `CrmReadFailed` naming the
    CRM's status and code, never a record's values."""

    kind: str

    def __init__(
        self, connection: Connection, adapter: Any, budget: SharedBudget, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.connection = connection
        self.adapter = adapter
        self.budget = budget
        self.clock = clock
        self.mapped = backwards(connection)

    def _json(self, answer: Answer, what: str) -> dict[str, Any]:
        if answer.error is not None:
            raise CrmReadFailed(f"{self.kind} {what} failed: {answer.error.reason} {answer.error.code}")
        if not isinstance(answer.body, dict):
            raise CrmReadFailed(f"{self.kind} {what} answered {answer.status} without a JSON object")
        return answer.body


def person_id_field(connection: Connection, obj: str) -> str | None:
    """The field of the CRM object `obj` (any case) holding the CDP person id: the first field a record
    mapping of that object matches on `person.id` (None when none does)."""
    return next(
        (
            fm.crm_field
            for m in connection.mappings
            if m.object.lower() == obj.lower() and m.kind == "record"
            for fm in m.match
            if fm.source == PERSON_ID
        ),
        None,
    )


# --- the loop -------------------------------------------------------------------------------------


class Poller:
    """One connection's changes, since each object's cursor, to the collector."""

    def __init__(
        self,
        store: Store,
        connection: Connection,
        reader: Reader,
        collector: Collector,
        *,
        objects: tuple[str, ...] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.connection = connection
        self.reader = reader
        self.collector = collector
        self.clock = clock
        self.objects = objects or reader.objects
        self.traits = backwards(connection)
        self.placeholders = placeholders(connection)
        self.woken = asyncio.Event()  # set by a signed webhook: read the changes now
        self._named: set[str] | None = set()  # the objects the webhooks since the last read named (None: all)
        self._ahead = False  # a webhook's read going ahead of a longer read is under way

    def wake(self, objects: set[str] | None = None) -> None:
        """Read now - only `objects` if every wake since the last read named its objects."""
        if self._named is not None:
            self._named = None if objects is None else self._named | objects
        self.woken.set()

    async def run(self, every: float, owned: Callable[[], bool] = lambda: True) -> None:
        """Read the changes every `every` seconds while `owned()` (one reader per connection), and at once
        whenever a signed webhook says something changed (whichever replica it reached: the cursor and the
        event ids make a second reader harmless)."""
        turn = time.monotonic() + every  # the next polling turn, kept however often webhooks wake it
        while True:
            try:
                # Not wait_for: on Python 3.11 it swallows a stop that lands with a webhook's wake-up.
                async with asyncio.timeout(max(0.0, turn - time.monotonic())):
                    await self.woken.wait()
                woken = True
            except TimeoutError:
                woken = False
            named, self._named = self._named, set()
            self.woken.clear()
            if woken:
                objects = named or None  # what the webhooks named (nothing named: everything)
            else:
                turn = time.monotonic() + every
                if not owned():
                    continue
                objects = None  # the polling turn: everything
            try:
                await self.poll(objects)
            except Exception as exc:  # the CRM or the collector failing: read again from the cursor next time
                extra = {"connection": self.connection.id, "error": type(exc).__name__}
                if isinstance(exc, CrmReadFailed | CollectorRefused):
                    extra["reason"] = str(exc)  # the CRM's status and code, never a record's values
                log.warning("reading crm changes failed", extra=extra)

    async def poll(self, objects: set[str] | None = None) -> int:
        """Post every change since the cursors (of `objects` only, when given); returns how many events
        were posted."""
        return await self._read([obj for obj in self.objects if objects is None or obj in objects])

    async def _read(self, objects: list[str]) -> int:
        posted = 0
        failed: Exception | None = None
        for obj in objects:
            try:
                posted += await self._poll_object(obj)
            except CollectorRefused:
                raise  # the collector is every object's: the others would fail the same way
            except Exception as exc:
                # One object the CRM will not let us read (a missing scope, an answer we cannot use)
                # must not stop the others: they are read, and this one again from its cursor next turn.
                extra = {"connection": self.connection.id, "object": obj, "error": type(exc).__name__}
                if isinstance(exc, CrmReadFailed):
                    extra["reason"] = str(exc)
                log.warning("reading crm changes of an object failed", extra=extra)
                failed = failed or exc
        if failed is not None:
            raise failed
        return posted

    async def _read_ahead(self, current: str) -> None:
        """Between two pages of `current`: the objects webhooks named since (all, for a wake naming none)
        are read now, each to its end, rather than after the rest of `current` - a page-through of
        thousands of contacts held a ticket back for half a minute. `current` itself is left to this read
        (what changed in it comes at its end) and stays named when it was: the loop reads it again after.
        Every request still takes from the account's budget; a read ahead does not nest."""
        if self._ahead or not self.woken.is_set():
            return
        wanted = set(self.objects) if self._named is None else self._named
        ahead = [obj for obj in self.objects if obj in wanted and obj != current]
        if not ahead:
            return
        self._named = {current} if current in wanted else set()
        if not self._named:
            self.woken.clear()
        self._ahead = True
        try:
            await self._read(ahead)
        except CollectorRefused:
            raise
        except Exception:  # named in the log by `_read`; read again from its cursor at the next turn
            pass
        finally:
            self._ahead = False

    def _key(self, obj: str, record_id: str | None = None) -> str:
        return f"{self.connection.id}:{obj}" + (f":{record_id}" if record_id is not None else "")

    async def _start(self, obj: str) -> tuple[dict[str, Any] | None, bool]:
        """The object's cursor, and whether this read is (part of) the connection's initial import.

        Without a cursor, `inbound.start: now` starts at the first start's clock, less `START_MARGIN` (a CRM
        clock a little behind loses nothing; a record changed in that margin is an event once) - stored at
        once, so "now" stays the first start's while nothing changes; `all` reads every existing record
        (the `import-<connection>` run counts them)."""
        record = await self.store.get(CURSORS, self._key(obj))
        if record is not None and record.doc:
            if self.connection.inbound_start != "all":
                return record.doc, False
            run = await self.store.get(RUNS, self.import_run)  # an import interrupted: it goes on from its cursor
            return record.doc, run is not None and run.doc["state"] == "running" and obj not in run.doc["done"]
        if self.connection.inbound_start == "now":
            since = dt.datetime.fromtimestamp(self.clock() - START_MARGIN, dt.UTC)
            cursor = {"after": since.strftime("%Y-%m-%dT%H:%M:%S.") + f"{since.microsecond // 1000:03d}Z", "seen": []}
            await self.store.put(CURSORS, self._key(obj), cursor)
            return cursor, False
        run = await self.store.get(RUNS, self.import_run)
        if run is None:
            doc = {
                "kind": "import", "state": "running", "connection": self.connection.id, "mapping": "",
                "started_at": self.clock(), "finished_at": 0.0, "total": 0, "processed": 0, "created": 0,
                "done": [], "error": "",
            }  # fmt: skip
            await self.store.put(RUNS, self.import_run, doc)
        return None, True

    @property
    def import_run(self) -> str:
        return f"import-{self.connection.id}"

    async def _imported(self, obj: str | None, records: int, events: int) -> None:
        """The import run's progress: records read and events posted, and the objects read to their end."""
        run = await self.store.get(RUNS, self.import_run)
        if run is None or run.doc["state"] != "running":
            return
        doc = {**run.doc, "processed": run.doc["processed"] + records, "created": run.doc["created"] + events}
        if obj is not None:
            doc["done"] = sorted({*doc["done"], obj})
            if set(doc["done"]) >= set(self.objects):
                doc.update(state="succeeded", finished_at=self.clock())
        await self.store.put(RUNS, self.import_run, doc)

    async def _poll_object(self, obj: str) -> int:
        start, importing = await self._start(obj)
        posted = 0
        async for changes, cursor in self.reader.pages(obj, start):
            memos = {}
            events: list[dict[str, Any]] = []
            sent: dict[str, str] = {}  # message id -> CRM record id
            for change in changes:
                stored = await self.store.get(CURSORS, self._key(obj, change.record_id))
                before = _before(stored.doc if stored is not None else None, change.stamp)
                written, erased = await self._written(change)
                memo = self._memo(change, written)
                memos[change.record_id] = {**memo, "stamp": change.stamp, "before": before}
                if not erased:
                    made = self.events(change, before, memo, written)
                    sent.update((e["messageId"], change.record_id) for e in made)
                    events.extend(made)
            for batch in _batches(events):
                rejected = await self.collector.post(batch)
                if rejected:
                    await keep_refused(self.store, self.connection.id, obj, rejected, sent, self.clock())
            for record_id, memo in memos.items():
                await self.store.put(CURSORS, self._key(obj, record_id), memo)
            await self.store.put(CURSORS, self._key(obj), cursor)
            posted += len(events)
            if importing:
                await self._imported(None, len(changes), len(events))
            if events:  # a quiet poll every few seconds per connection is not worth a line
                log.info(
                    "crm changes posted", extra={"connection": self.connection.id, "object": obj, "events": len(events)}
                )
            await self._read_ahead(obj)
        if importing:
            if await self.store.get(CURSORS, self._key(obj)) is None:
                # Nothing there yet: the import of this object is done all the same (a keyset from the start).
                await self.store.put(CURSORS, self._key(obj), Keyset().doc())
            await self._imported(obj, 0, 0)
        return posted

    async def _written(self, change: Change) -> tuple[dict[str, Any], bool]:
        """What the connector last wrote to this contact (its `crm_records` document's fields), if it did,
        and whether the change is about a person the connector erased: the record itself erased (its
        anonymisation or deletion is the connector's own write), or - a ticket, task, case or deal - the
        contact it is linked to erased, or the CDP id it carries a deleted person's (tombstone). Such a
        change is never news: its events would bring the deleted person back into the CDP (keyed by the
        contact's anonymous id, carrying their CDP id)."""
        written: dict[str, Any] = {}
        erased = False
        for record in await self.store.find(RECORDS, "crm_id", change.record_id, limit=20):
            doc = record.doc
            if doc.get("connection") == self.connection.id and str(doc.get("object", "")).lower() == change.obj.lower():
                if change.kind in ("contact", "lead") and not change.deleted:
                    written.update(doc.get("fields") or {})
                erased = erased or doc.get("state") in ERASED
        person = change.person
        if not erased and person is not None and change.kind not in ("contact", "lead"):
            for record in await self.store.find(RECORDS, "crm_id", person.id, limit=20):
                if record.doc.get("connection") == self.connection.id and record.doc.get("state") in ERASED:
                    erased = True
        if not erased and person is not None and person.cdp_id:
            erased = await self.store.get(TOMBSTONES, person.cdp_id) is not None
        return written, erased

    def _reported(self, change: Change) -> dict[str, Any]:
        """The fields the events report of a record: its reported properties and those read back as traits."""
        return {**change.properties, **{f: change.record.get(f) for f in self.traits.get(change.obj.lower(), {})}}

    def _only_written(self, change: Change, written: dict[str, Any]) -> bool:
        """Every field the events would report holds what the connector itself wrote there, the CDP person
        id it matches on, or nothing."""
        fields = self._reported(change)
        cdp_id = change.person.cdp_id if change.person is not None else None
        return all(
            value in (None, "") or (name in written and _same(value, written[name])) or (cdp_id and value == cdp_id)
            for name, value in fields.items()
        )

    def _memo(self, change: Change, written: dict[str, Any]) -> dict[str, Any]:
        """What the events report of a record: the watched field, and a digest of the reported fields and
        of the fields read back as traits or consent. A field holding what the connector itself wrote
        there counts as the connector's, whatever its value: the CDP's own write coming back is no news."""
        fields = self._reported(change)
        for name, value in fields.items():
            if name in written and _same(value, written[name]):
                fields[name] = "<written by the connector>"
        reported = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS, default=str)
        return {"watched": change.watched, "digest": hashlib.sha256(reported).hexdigest()[:24]}

    # --- a change as events ---------------------------------------------------------------------

    def events(
        self,
        change: Change,
        before: dict[str, Any] | None,
        memo: dict[str, Any],
        written: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        if change.own or _connector_created_person(change):
            return []  # the CDP's own action coming back is not news (its later outcome is)
        if written and self._only_written(change, written):
            # All it holds is what the connector wrote: its own record coming back, not news. First seen
            # (created and written again before this read, so no longer "created"), or seen before the
            # connector's record of its write was committed (the memo then held the raw values, so it
            # differs from this one, which counts them as the connector's).
            return []
        if before is not None and before == memo and not change.deleted:
            return []  # nothing the events report changed (an edit of fields nobody reads, a repeat)
        name = event_name(change, before)
        kind, conn = self.connection.kind, self.connection.id
        properties = {k: v for k, v in change.properties.items() if v not in (None, "")}
        properties.update(crm=kind, connection=conn, object=change.obj, crm_id=change.record_id)
        previous = before.get("watched") if before is not None else None
        if previous is not None and change.watched is not None and previous != change.watched:
            properties["previous_" + ("stage" if change.kind == "deal" else "status")] = before["watched"]
        context: dict[str, Any] = {"source": {"crm": kind, "connection": conn}}
        person = change.person
        if person is not None:
            properties["crm_contact_id"] = person.id
            if person.email:
                # Identity links the event to the person through the email (an identifier it resolves);
                # the CDP person id is a reference, never a userId (identity would take it for a new user).
                context["traits"] = {"email": person.email}
            if person.cdp_id:
                properties["cdp_person_id"] = person.cdp_id
        anonymous = f"{kind}:{self.connection.account}:{person.id if person else change.record_id}"
        timestamp = _iso(change.at or change.stamp) if not change.deleted else None
        track: dict[str, Any] = {
            "type": "track",
            "event": name,
            "messageId": event_id(conn, change.obj, change.record_id, change.stamp),
            "properties": properties,
            "context": context,
            "anonymousId": anonymous,
        }
        if timestamp:
            track["timestamp"] = timestamp
        events = [track]
        if change.kind in ("contact", "lead") and not change.deleted:
            identify = self._identify(change, context, anonymous, timestamp, written or {})
            if identify is not None:
                events.append(identify)
        fitting = [f for e in events if (f := fit(e)) is not None]
        if len(fitting) < len(events):
            log.warning(
                "crm change too large for an event",
                extra={"connection": conn, "object": change.obj, "crm_id": change.record_id},
            )
        return fitting

    def _identify(
        self, change: Change, context: dict[str, Any], anonymous: str, timestamp: str | None, written: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The contact's traits and consent as a CRM user wrote them: a field holding what the connector
        wrote there, or the placeholder a mapping's `default` puts in, is the CDP's own value, not news.
        None when nothing is left (the track event links the contact by its email anyway)."""
        traits: dict[str, Any] = {}
        purposes: dict[str, bool] = {}
        channels: dict[str, bool] = {}
        placeholders = self.placeholders.get(change.obj.lower(), {})
        for crm_field, target in self.traits.get(change.obj.lower(), {}).items():
            if crm_field not in change.record:
                continue
            value = change.record[crm_field]
            if crm_field in written and _same(value, written[crm_field]):
                continue
            if crm_field in placeholders and _same(value, placeholders[crm_field]):
                continue
            if target.startswith("traits."):
                if value not in (None, ""):
                    traits[target.removeprefix("traits.")] = value
            elif (granted := _bool(value)) is not None:
                key = target.removeprefix("consent.")
                if key.startswith("purpose:"):
                    purposes[key.removeprefix("purpose:")] = granted
                elif key.startswith("channel:"):
                    channels[key.removeprefix("channel:")] = granted
        if not (traits or purposes or channels):
            return None
        if change.person is not None and change.person.email:
            traits.setdefault("email", change.person.email)  # what identity links the contact to the person by
        ctx = {"source": context["source"]}
        if purposes or channels:
            ctx["consent"] = {
                **({"categoryPreferences": purposes} if purposes else {}),
                **({"channelPreferences": channels} if channels else {}),
            }
        identify: dict[str, Any] = {
            "type": "identify",
            "messageId": event_id(self.connection.id, change.obj, change.record_id, change.stamp, "identify"),
            "anonymousId": anonymous,
            "traits": traits,
            "context": ctx,
        }
        if timestamp:
            identify["timestamp"] = timestamp
        return identify


def backwards(connection: Connection) -> dict[str, dict[str, str]]:
    """Per CRM object (lower case): CRM field -> `traits.<name>` or `consent.<key>`, from the connection's
    record mappings whose transforms keep the value as it is."""
    out: dict[str, dict[str, str]] = {}
    for mapping in connection.mappings:
        if mapping.kind != "record":
            continue
        for fm in (*mapping.match, *mapping.fields):
            source = fm.source or ""
            if not source.startswith(("traits.", "consent.")) or fm.translate:
                continue
            if any(t.name not in REVERSIBLE for t in fm.transforms):
                continue
            out.setdefault(mapping.object.lower(), {})[fm.crm_field] = source
    return out


def placeholders(connection: Connection) -> dict[str, dict[str, Any]]:
    """Per CRM object (lower case): CRM field -> the `default` its record mapping writes when the CDP has
    no value (Salesforce's required LastName: "(unknown)")."""
    out: dict[str, dict[str, Any]] = {}
    for mapping in connection.mappings:
        if mapping.kind != "record":
            continue
        for fm in mapping.fields:
            if fm.default is not None:
                out.setdefault(mapping.object.lower(), {})[fm.crm_field] = fm.default
    return out


def event_name(change: Change, before: dict[str, Any] | None) -> str:
    """The event a change becomes (the table in the service README)."""
    kind = change.kind
    noun = {
        "contact": "Contact",
        "lead": "Lead",
        "case": "Case",
        "ticket": "Ticket",
        "task": "Task",
        "deal": "Deal",
        "campaign_member": "Campaign Member",
    }[kind]
    if change.deleted:
        return f"CRM {noun} Deleted"
    moved = before is None or before.get("watched") != change.watched
    if kind in ("contact", "lead"):
        return f"CRM {noun} Created" if change.created else f"CRM {noun} Updated"
    if kind in ("case", "ticket"):
        if change.created:
            return f"CRM {noun} Opened"
        return f"CRM {noun} Closed" if change.closed and moved else f"CRM {noun} Updated"
    if kind == "task":
        if change.closed and (moved or change.created):
            return "CRM Task Completed"
        return "CRM Task Created" if change.created else "CRM Task Updated"
    if kind == "deal":
        if change.created and not change.closed:
            return "CRM Deal Created"
        if change.closed and (moved or change.created):
            return "CRM Deal Won" if change.won else "CRM Deal Lost"
        return "CRM Deal Stage Changed" if moved and before is not None else "CRM Deal Updated"
    # campaign members: added to the campaign, then their engagement (the member status) changing
    if change.created:
        return "CRM Campaign Member Added"
    return "CRM Campaign Engagement" if moved else "CRM Campaign Member Updated"


def _connector_created_person(change: Change) -> bool:
    """A contact or lead created already holding the CDP person id: the connector's upsert made it."""
    person = change.person
    return change.kind in ("contact", "lead") and change.created and person is not None and bool(person.cdp_id)


def _batches(events: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """A page's events in as few collector requests as the request size allows (one, normally)."""
    batches: list[list[dict[str, Any]]] = [[]]
    size = 0
    for event in events:
        length = len(orjson.dumps(event, default=str))
        if batches[-1] and size + length > BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(event)
        size += length
    return [b for b in batches if b]


def _before(stored: dict[str, Any] | None, stamp: str) -> dict[str, Any] | None:
    """What the record was before this change: the stored memo, or - when this very change was read
    before (a page read again) - what that read compared with, so the same events come out again."""
    if stored is None:
        return None
    if stored.get("stamp") == stamp:
        return stored.get("before")
    return {"watched": stored.get("watched"), "digest": stored.get("digest")}


def _iso(stamp: str) -> str | None:
    try:
        return instant(stamp).isoformat().replace("+00:00", "Z")
    except ValueError:
        return None  # a version number (Dataverse): the collector stamps the time it received it


def _same(crm: Any, written: Any) -> bool:
    """A CRM's value and the one the connector wrote, as the CRM may give it back (HubSpot: text)."""
    if crm == written:
        return True
    if isinstance(written, bool) or isinstance(crm, bool):
        return _bool(crm) is not None and _bool(crm) == _bool(written)
    if isinstance(written, int | float) and not isinstance(written, bool):
        try:
            return float(crm) == float(written)
        except (TypeError, ValueError):
            return False
    return crm is not None and written is not None and str(crm) == str(written)


def _bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return None
