"""What every CRM's inbound side shares: the collector, the changes readers yield, the polling loop.

A CRM's `Reader` turns its change mechanism (modified-since polling, change tracking) into pages of
`Change`s, each page with the cursor that follows it; the `Poller` posts a page's events to the collector
(`/v1/batch`, the CRM source's write key) and only then stores the cursor (`crm_cursors/<connection>:<object>`),
so a crash re-reads the page instead of skipping it. An event's `messageId` derives from the connection,
object, record id and modification stamp only, so a page read again is posted with the same ids and the
collector stores each change once. Together: a restart neither loses nor repeats a change.

What a change becomes and whether it is news (identity, traits and consent read back, the memo of what a
record was when last read, the connector's own writes) is news.py, the poller's other half (`News`). The
memos of a page are written after the post, in one write with the cursor, each with the stamp it was read
at and what that read compared with: a page read again compares with the same thing and posts the same
events under the same ids. Traits and consent posted with the CRM source's write key are recorded by the
profile with that source and the event id as provenance; `context.source` names the CRM and the
connection. The event's time is the CRM's modification stamp, so an older CRM value never overrides a
newer one.

Changes that become visible late - HubSpot's search index lags writes by seconds ("may take a few
moments": a contact edited at t can first be found at t+5 s, after records written after it moved the cursor
past t); a Salesforce transaction committed late carries a SystemModstamp earlier than records read
already (a transaction may last up to ten minutes) - are read back: once per `overlap` seconds (the
connection's `inbound.overlap_seconds`, by default its CRM's `INBOUND_OVERLAP`) the poller reads each
object's records modified between where the last read-back ended and `overlap` seconds ago (never past the
object's cursor: what lies beyond is the forward read's), a window read once, so every record is read
twice at most - once by the forward read, once settled. What the read-back finds that was posted already
(its memo holds that stamp, or a later one) is dropped before anything else: no event is posted twice, the
collector is not asked, and the connector's own writes read back stay no news. Where the read-back ended
is `crm_cursors/<connection>:<object>#settled`. A record visible later than its stamp plus the overlap
is still missed; Dataverse (delta links: the CRM's own change tracking) reads no overlap.

Log lines name the connection, object and counts; never record values or emails.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import orjson

from cdp_crm.adapters.http import Answer
from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.mapping import PERSON_ID, Connection
from cdp_crm.inbound.news import News, _before, backwards, instant, placeholders
from cdp_crm.inbound.refused import keep_refused
from cdp_crm.state import CURSORS, RUNS
from cdp_kit.storage import Put, Store, VersionConflict

log = logging.getLogger("cdp.crm.inbound")

EPOCH = "1970-01-01T00:00:00.000Z"
START_MARGIN = 300.0  # seconds before the first start `inbound.start: now` reads from (clocks apart)
POST_CHUNK = 100  # changes per cursor step, where the cursor allows steps within a CRM's page
BATCH_BYTES = 400_000  # a collector request stays under the Segment API's 500 KB
LOOKUPS_AT_ONCE = 100  # a page's store lookups of what the connector wrote, side by side


# Seconds of each object's changes read back once settled (the module docstring), per CRM, unless the
# connection sets `inbound.overlap_seconds`: HubSpot's search index lags writes by seconds and the reads are
# searches from its few a second, so a few minutes; Salesforce's SystemModstamp is set when the write is
# made and seen only once its transaction commits, which may take up to ten minutes (its transaction time
# limit); Zoho's listing by Modified_Time likewise sees a write only once it is committed (a workflow's or
# a blueprint's field update), so two minutes; a Dataverse delta link starts after the highest rowversion
# stamped when it was issued, which a write committed later may lie below (dynamics.py), and Dataverse ends
# a request (a plug-in's transaction with it) after two minutes, so three. The overlap costs no more
# requests however long it is (each record is read back once, one search or listing page a window at
# least): only how late a late change arrives.
INBOUND_OVERLAP = {"hubspot": 180.0, "salesforce": 600.0, "zoho": 120.0, "dynamics": 180.0}
# Pages a read-back reads a polling turn, per object (the rest of its window at the next turns).
READ_BACK_PAGES = 5
# Tries of a page's relink writes (`Poller._relinked`) that meet another write before the turn gives up.
RELINK_ATTEMPTS = 5
# Seconds a read of an object that reached its end spares `read_first` another (see there).
READ_FIRST_FRESH = 5.0
# Where signed webhooks announced every object the poller reads (`Poller.notified`), each polling turn that
# finds no news - nothing changed, or only the connector's own writes read back - doubles the wait to the
# next, up to this many polling intervals; news, or a webhook, brings the usual interval back. A CRM user's
# edit wakes the reader at once through its webhook; the polling turn is the net for a notification lost on
# the way, and each turn is a search per object from HubSpot's few a second. An object no webhook announced
# (HubSpot's legacy subscriptions have no tasks; its generic ones do) is seen by the polling turn alone: no
# stretch then.
QUIET_STRETCH = 4


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
    # Ids of records a CRM user merged into this one (HubSpot's retired ids, Salesforce's losers naming it in
    # MasterRecordId, Dataverse's subordinates naming it in masterid): news.py `_relink`.
    merged: tuple[str, ...] = ()


# A read-back's filter (`Poller._read_back`): of these (record id, stamp) pairs, those read and posted already.
Posted = Callable[[list[tuple[str, str]]], Awaitable[set[tuple[str, str]]]]


class Reader(Protocol):
    """One CRM connection's change mechanism."""

    kind: str
    objects: tuple[str, ...]

    def pages(self, obj: str, cursor: dict[str, Any] | None) -> AsyncIterator[tuple[list[Change], dict[str, Any]]]:
        """The changes since `cursor` (None: from the beginning), a page at a time, each with the cursor
        that follows it. A modified-since reader that can read a window back (`reads_back`) also takes
        `until` (only records whose stamp is before it) and `posted` (`Posted`: those it names left out
        before anything else is asked about them)."""
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


class Poller(News):
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
        # Seconds read back once settled (module docstring); 0: no read-back (a reader without a bounded read).
        overlap = connection.inbound_overlap
        if overlap is None:
            overlap = INBOUND_OVERLAP.get(connection.kind, 0.0)
        self.overlap = overlap if getattr(reader, "reads_back", False) else 0.0
        self.traits = backwards(connection)
        self.placeholders = placeholders(connection)
        self.woken = asyncio.Event()  # set by a signed webhook: read the changes now
        self._named: set[str] | None = set()  # the objects the webhooks since the last read named (None: all)
        self._ahead = False  # a webhook's read going ahead of a longer read is under way
        # One read at a time: the polling turn and a read the outbound engine asks for before it writes
        # (`read_first`) take turns, each from the cursor the other left.
        self._reading = asyncio.Lock()
        # When the last read of each object that reached its end began (monotonic): `read_first` skips a
        # read begun less than READ_FIRST_FRESH ago.
        self._read_began: dict[str, float] = {}
        self.read_first_fresh = READ_FIRST_FRESH
        # The objects signed webhooks named (`HubSpotWebhooks` adds them as it takes one). A CRM announces
        # only what the app subscribes to (HubSpot's legacy subscriptions have no tasks, its generic ones
        # do): quiet polling turns stretch (QUIET_STRETCH) only once every object read here was announced
        # (`notified`).
        self.announced: set[str] = set()

    @property
    def notified(self) -> bool:
        """Signed webhooks announced every object this poller reads: its quiet polling turns may stretch."""
        return set(self.objects) <= self.announced

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
        stretch = 1  # the polling interval's multiple: grows with quiet turns where webhooks are on
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
            began = time.monotonic()
            if woken:
                objects = named or None  # what the webhooks named (nothing named: everything)
                stretch = 1  # someone at work in the CRM: the usual interval again
                turn = min(turn, began + every)
            else:
                turn = began + every * stretch
                if not owned():
                    continue
                objects = None  # the polling turn: everything
            posted = -1  # failed
            try:
                posted = await self.poll(objects)
            except Exception as exc:  # the CRM or the collector failing: read again from the cursor next time
                extra = {"connection": self.connection.id, "error": type(exc).__name__}
                if isinstance(exc, CrmReadFailed | CollectorRefused):
                    extra["reason"] = str(exc)  # the CRM's status and code, never a record's values
                log.warning("reading crm changes failed", extra=extra)
            if not woken:
                stretch = min(stretch * 2, QUIET_STRETCH) if posted == 0 and self.notified else 1
                turn = began + every * stretch

    async def poll(self, objects: set[str] | None = None, *, read_back: bool = True) -> int:
        """Post every change since the cursors (of `objects` only, when given); returns how many events
        were posted. `read_back`: and a settled window read back where one is due (`_read_back`)."""
        async with self._reading:
            return await self._read(
                [obj for obj in self.objects if objects is None or obj in objects], read_back=read_back
            )

    def reads(self, obj: str) -> str | None:
        """This poller's name of the CRM object `obj` (any case), when it reads its changes."""
        return next((mine for mine in self.objects if mine.lower() == obj.lower()), None)

    async def read_first(self, obj: str) -> int:
        """Before the connector writes records of `obj`: post what CRM users changed there since the cursor
        (the outbound engine's guard against overwriting an edit it has not read: the CONFLICTS note in the
        service README), unless a read of it that reached its end began less than READ_FIRST_FRESH ago.
        Every batch reading first made the pipeline benchmark's CRM connector 20 times slower at 1,000
        events/s (a read a batch, most of it the connector's own writes read back, and the polling turn
        waiting on the same lock); so an edit made in the CRM within that many seconds before a write may
        still be overwritten. Raises as `poll` does when the CRM or the collector fails."""
        mine = self.reads(obj)
        if mine is None:
            return 0
        if time.monotonic() - self._read_began.get(mine, -math.inf) < self.read_first_fresh:
            return 0
        # Without a read-back: a batch's writes wait on this read (the polling turn reads back).
        return await self.poll({mine}, read_back=False)

    async def _read(self, objects: list[str], *, read_back: bool = False) -> int:
        posted = 0
        failed: Exception | None = None
        for obj in objects:
            try:
                posted += await self._poll_object(obj, read_back=read_back)
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

    async def _poll_object(self, obj: str, *, read_back: bool = False) -> int:
        began = time.monotonic()
        posted = await self._poll_pages(obj)
        if read_back:
            posted += await self._read_back(obj)
        self._read_began[obj] = began  # reached its end: what changed before `began` is read
        return posted

    async def _read_back(self, obj: str) -> int:
        """The object's settled window read back, when one is due (module docstring): the records modified
        from where the last read-back ended to `overlap` seconds ago (or to the cursor, when that is older),
        once `overlap` seconds have settled since that end; at most READ_BACK_PAGES pages a turn, the
        window's progress kept (`crm_cursors/<connection>:<object>#settled`), so a busy window never holds
        the forward read (or `read_first`, waiting on the same lock) for long. Returns the events posted
        (late changes only)."""
        if self.overlap <= 0:
            return 0
        cursor = await self.store.get(CURSORS, self._key(obj))
        if cursor is None or "after" not in cursor.doc:
            return 0  # nothing read forward yet (an import under way): nothing settled to read back
        ahead = instant(cursor.doc["after"])
        key = self._key(obj) + "#settled"
        found = await self.store.get(CURSORS, key)
        state = dict(found.doc) if found is not None else {}
        if not state:
            # First read-back of this object: from the overlap before what was read forward.
            state = {"settled": _stamp_text(ahead - dt.timedelta(seconds=self.overlap))}
            await self.store.put(CURSORS, key, state)
        if "until" not in state:  # no window under way: one is due once per overlap
            settled = instant(state["settled"])
            now_settled = dt.datetime.fromtimestamp(self.clock() - self.overlap, dt.UTC)
            if (now_settled - settled).total_seconds() < self.overlap:
                return 0
            until = min(now_settled, ahead)
            if until <= settled:
                return 0
            state = {"settled": state["settled"], "until": _stamp_text(until), "at": None}
        posted = pages = 0
        window = state["at"] or {"after": state["settled"], "seen": []}

        async def seen(pairs: list[tuple[str, str]]) -> set[tuple[str, str]]:
            memos = await self.store.get_many(CURSORS, [self._key(obj, record_id) for record_id, _ in pairs])
            return {(rid, stamp) for rid, stamp in pairs if _posted_already(memos.get(self._key(obj, rid)), stamp)}

        reading = self.reader.pages(obj, window, until=state["until"], posted=seen)  # type: ignore[call-arg]
        try:
            async for changes, following in reading:
                events, writes = await self._page(obj, changes, late=True) if changes else (0, [])
                state = {**state, "at": following}
                await self.store.bulk_write([*writes, Put(CURSORS, key, state)])
                posted += events
                pages += 1
                if pages >= READ_BACK_PAGES:
                    break
            else:
                state = {"settled": state["until"]}  # the window read to its end
                await self.store.put(CURSORS, key, state)
        finally:
            await reading.aclose()
        if posted:
            log.info("crm changes read back", extra={"connection": self.connection.id, "object": obj, "events": posted})
        return posted

    async def _poll_pages(self, obj: str) -> int:
        start, importing = await self._start(obj)
        posted = 0
        async for changes, cursor in self.reader.pages(obj, start):
            events, memo_writes = await self._page(obj, changes)
            # The memos, then the cursor, in one write: a page read again after a crash finds both or neither.
            await self.store.bulk_write([*memo_writes, Put(CURSORS, self._key(obj), cursor)])
            posted += events
            if importing:
                await self._imported(None, len(changes), events)
            if events:  # a quiet poll every few seconds per connection is not worth a line
                log.info(
                    "crm changes posted", extra={"connection": self.connection.id, "object": obj, "events": events}
                )
            await self._read_ahead(obj)
        if importing:
            if await self.store.get(CURSORS, self._key(obj)) is None:
                # Nothing there yet: the import of this object is done all the same (a keyset from the start).
                await self.store.put(CURSORS, self._key(obj), Keyset().doc())
            await self._imported(obj, 0, 0)
        return posted

    async def _page(self, obj: str, changes: list[Change], *, late: bool = False) -> tuple[int, list[Put]]:
        """Post a page's events; returns how many, and the memo writes to make with the cursor. `late`: a
        read-back's page - a change whose memo holds its stamp, or a later one, was posted already and is
        dropped first (`_posted_already`)."""
        memos = {}
        events: list[dict[str, Any]] = []
        sent: dict[str, str] = {}  # message id -> CRM record id
        # The page's memos and the tombstones of the persons it names, each in one read: most of a busy
        # poll is the connector's own writes read back, a hundred a page.
        stored = await self.store.get_many(CURSORS, [self._key(obj, change.record_id) for change in changes])
        if late:
            changes = [c for c in changes if not _posted_already(stored.get(self._key(obj, c.record_id)), c.stamp)]
            if not changes:
                return 0, []
        tombstoned = await self._tombstoned(changes)
        # What the connector wrote to each record, the lookups side by side (they only read), a hundred at
        # a time (a Salesforce or Dataverse page holds thousands).
        looked_up = []
        for start in range(0, len(changes), LOOKUPS_AT_ONCE):
            chunk = changes[start : start + LOOKUPS_AT_ONCE]
            looked_up += await asyncio.gather(*(self._written(change, tombstoned) for change in chunk))
        relinked: list[Put] = []
        merges: list[Change] = []
        for change, (written, erased) in zip(changes, looked_up, strict=True):
            memo_record = stored.get(self._key(obj, change.record_id))
            before = _before(memo_record.doc if memo_record is not None else None, change.stamp)
            memo = self._memo(change, written)
            memos[change.record_id] = {**memo, "stamp": change.stamp, "before": before}
            if not erased:
                made = self.events(change, before, memo, written)
                if change.merged:  # a CRM user merged records into this one: followed (news.py `_relink`)
                    claims, puts = await self._relink(change, self.clock())
                    made = [*made, *claims]
                    relinked.extend(puts)
                    merges.append(change)
                sent.update((e["messageId"], change.record_id) for e in made)
                events.extend(made)
        times_of = getattr(self.reader, "field_times", None)
        if times_of is not None:  # the CRM says when each field changed (HubSpot): traits stamped per field
            events = await self._timed(obj, events, {c.record_id: c for c in changes}, sent, times_of)
        for batch in _batches(events):
            rejected = await self.collector.post(batch)
            if rejected:
                await keep_refused(self.store, self.connection.id, obj, rejected, sent, self.clock())
        # The records relinked are written once the claims were posted, before the memos: a page read again
        # finds them relinked already (and its claims posted, under the same ids).
        if relinked:
            await self._relinked(merges, relinked)
        memo_writes = [Put(CURSORS, self._key(obj, record_id), memo) for record_id, memo in memos.items()]
        return len(events), memo_writes

    async def _relinked(self, merges: list[Change], puts: list[Put]) -> None:
        """Write a page's relinks (news.py `_relink`), each a compare-and-set on the version read: when
        another write came first - another replica following the same merge, the engine writing the
        person's record (a change, an erasure) - the documents are read again and relinked from what they
        hold now, up to RELINK_ATTEMPTS times; then the turn fails (`CrmReadFailed`) and the page, its
        cursor unmoved, is read again at the next turn."""
        for _attempt in range(RELINK_ATTEMPTS):
            try:
                await self.store.bulk_write(puts)
                return
            except VersionConflict:
                log.info(
                    "crm relink met another write; read again",
                    extra={"connection": self.connection.id, "object": merges[0].obj},
                )
            puts = [put for change in merges for put in (await self._relink(change, self.clock()))[1]]
            if not puts:
                return  # relinked already (another replica), or no longer to be (erased meanwhile)
        raise CrmReadFailed(f"{self.connection.kind} relink of a merge kept meeting other writes")


def _posted_already(memo: Any, stamp: str) -> bool:
    """A record's memo (its stored record, or None) shows this change, or a later one, read and posted."""
    if memo is None or not memo.doc.get("stamp"):
        return False
    try:
        return instant(memo.doc["stamp"]) >= instant(stamp)
    except ValueError:  # not a time (a version number): the same stamp only
        return memo.doc["stamp"] == stamp


def _stamp_text(when: dt.datetime) -> str:
    """A cursor's stamp: UTC, milliseconds, Z (what every modified-since reader takes)."""
    when = when.astimezone(dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


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
