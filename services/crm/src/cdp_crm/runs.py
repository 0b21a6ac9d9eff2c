"""Backfills and replays: syncing people on request, with progress in `crm_runs/<run id>`.

A backfill projects every person (people.py: every live profile of the profile service when it is
configured, else everyone the connector has seen change) through the mappings in scope with the
`backfill` trigger and writes what differs from what each record should hold - the same path as the
stream (engine.py), so a backfill after a complete sync makes no call. A person holding none of the
values a record mapping reads is skipped for it (counted as `skipped`): the stream never writes them
(`projection.held`), and a record holding only its match key is of no use to the CRM. A backfill already running for
the same scope is returned instead of starting a second one. With `bulk`, record mappings go through the
CRM's bulk path where it has one (Salesforce Bulk API 2.0: one ingest job per page of up to `BULK_PAGE`
people and partition, its state and rows processed in the run document as it runs; refused and
unprocessed rows dead-lettered); the others keep their batch endpoints. A replay sends dead-lettered
records again: record and list records re-projected from the person's current view, tasks and cases as
they were.

Resuming: the run document keeps `after`, the last listing key of the last page whose every partition's
share is written, a `heartbeat` (every page, every poll of a bulk job) and `scope`, a digest of the
mappings it writes. A backfill cancelled by a stop, or left `running` by a kill (no task here runs it and
its heartbeat is older than `STALE_AFTER`), goes on under the same run id from the page after `after` -
at the next start (`watch`) or when it is started again - with its counters; the page it was in is sent
again (upserts by the match key: nothing is duplicated, and what that page had written already counts as
unchanged or updated; the counters and `processed` move with `after`, a whole page at a time). Taking a
run over is a compare-and-set, so one replica does. A run whose mappings changed since is not resumed: a
new one starts from the beginning.

A page of people the profile service did not answer (people.py: `Unavailable`) is asked again after the
time it named, the listing read on from the last page read, up to `PAGE_TRIES` times, each logged at
WARNING (run, page of this reading, people processed) and named in the run's `error` meanwhile; past
that the run stops where it got, `cancelled` as a stopped one is, and is resumed from there (`watch`). A
failure asking again cannot mend (the profile service refusing) fails it as before.

Each page of people is read and projected (a pure function of the page, record keys hashed once) while
the page before it is being delivered; each partition's share of it is then planned, delivered and its
outcome written while that partition is settled (`CrmLogic.settled`), so it never interleaves with a
batch of the local engine; a record the stream wrote from a change committed after its page was read (its
`synced_stamp` past the person's stamp on the page) is left as it is, counted unchanged: the page's values
are older. Progress (total, processed, counters, API units) is stored after every page. A finished backfill's
figures add up: `processed + absent = total`, `absent` being the people counted at the start who were gone
when their page was read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from cdp_crm.domain import projection as proj
from cdp_crm.domain.coalesce import REMOVE, UPSERT, record_key
from cdp_crm.domain.isolation import DeadLetter
from cdp_crm.domain.mapping import BACKFILL, ObjectMapping
from cdp_crm.engine import COUNTERS, CrmLogic, Input, Outcomes, Planned, resolve_writes
from cdp_crm.inbound.refused import INBOUND
from cdp_crm.people import ConnectorView, People
from cdp_crm.state import DEAD_LETTERS, PENDING, RECORDS, RUNS, TOMBSTONES
from cdp_crm.writes import accepted
from cdp_kit.bus import partition_for
from cdp_kit.errors import InvalidArgument, NotFound, Unavailable
from cdp_kit.stopping import cancel_and_wait
from cdp_kit.storage import Delete, VersionConflict

log = logging.getLogger("cdp.crm.runs")

PAGE = 200
BULK_PAGE = 10_000  # people per page of a bulk backfill: a Bulk API job is worth its five extra requests
# A bulk backfill's page is hundreds of thousands of objects alive at once: with the interpreter's default
# generation-0 threshold (700) the collector rescans them over and over - about half the connector's time
# in a bulk backfill (measured with bench/bench_crm.py). The service collects young objects less often,
# as identity and segmentation do (`gc.set_threshold(*GC_THRESHOLD)` at start).
GC_THRESHOLD = (50_000, 20, 100)
YIELD_EVERY = 1000
# Shares of one partition delivered under one hold of its lock when they come one after the other (a
# connector with one partition): the second's delivery overlaps the first's store write.
HOLD_UNITS = 2  # persons projected between two turns of the event loop
# A running backfill whose progress (written after every page and every poll of a bulk job) is older than
# this has lost its connector (killed): a replica resumes it.
STALE_AFTER = 120.0
# Times a page of people the profile service did not answer (far behind, restarting) is asked again, each
# after the `retry_after` it named (5 s: a minute in all), before the run is left to resume (`watch`).
PAGE_TRIES = 12
# How often a backfill share whose commit met another write of its records is planned and sent again
# before the run fails (`Runs._write`): as many as the poller's relink tries (inbound/core.py).
SHARE_TRIES = 5


def new_run(kind: str, connection: str, mapping: str, now: float) -> dict[str, Any]:
    return {
        "kind": kind, "state": "running", "connection": connection, "mapping": mapping, "started_at": now,
        "finished_at": 0.0, "total": 0, "processed": 0, **dict.fromkeys(COUNTERS, 0), "error": "",
    }  # fmt: skip


@dataclass
class Held:
    """A partition's lock (`CrmLogic.settled`) held by a backfill, with the last write made under it."""

    stack: contextlib.AsyncExitStack
    write: asyncio.Task[Outcomes] | None = None
    keys: frozenset[str] = frozenset()  # the records that write holds
    units: int = 0  # shares delivered under this hold


@dataclass
class Unit:
    """One partition's share of a page of people: its persons and what they project to, each with its
    record key (hashed once)."""

    partition: int
    persons: list[str] = field(default_factory=list)
    projected: list[tuple[ObjectMapping, Any, str, Input, str | None]] = field(default_factory=list)


class PeopleUnanswered(Unavailable):
    """The listing of people still did not answer a page after `PAGE_TRIES` tries: the run stops where it
    got, to be resumed from there (`cancelled`, as a stopped one), not failed."""


def fingerprint(mappings: list[ObjectMapping]) -> str:
    """What a backfill writes, as a digest: a run is resumed only over the same mappings."""
    described = repr([(m.name, m.object, m.mode, m.segment, m.list, m.match, m.fields) for m in mappings])
    return hashlib.sha256(described.encode()).hexdigest()[:16]


class Runs:
    def __init__(
        self, logic: CrmLogic, *, partitions: int, clock=time.time, people: People | None = None,
        bulk_page: int = BULK_PAGE,
    ) -> None:  # fmt: skip
        self.logic = logic
        self.bulk_page = bulk_page
        self.people = people or ConnectorView(logic.store)
        self.store = logic.store
        self.partitions = partitions
        self.clock = clock
        self.tasks: dict[str, asyncio.Task] = {}
        self.releases: set[asyncio.Task] = set()  # partition locks released once their backfill write lands

    def _scope(self, connection_id: str, mapping_id: str) -> list[ObjectMapping]:
        connection = self.logic.connections.get(connection_id)
        if connection is None:
            raise NotFound(f"no connection {connection_id!r}; ListConnections names them")
        if mapping_id:
            try:
                mapping = connection.mapping(mapping_id)
            except KeyError:
                raise InvalidArgument("mapping_id", f"{connection_id} has no mapping {mapping_id!r}") from None
            if BACKFILL not in mapping.triggers or mapping.kind == "action":
                raise InvalidArgument("mapping_id", f"{mapping.name} does not list the backfill trigger")
            return [mapping]
        return [m for m in connection.mappings if BACKFILL in m.triggers and m.kind != "action"]

    async def start_backfill(
        self, connection_id: str, mapping_id: str = "", *, bulk: bool = False
    ) -> tuple[str, dict[str, Any]]:
        mappings = self._scope(connection_id, mapping_id)
        scope = fingerprint(mappings)
        resumable = None
        for record in await self.store.find(RUNS, "connection", connection_id, limit=1000):
            doc = record.doc
            if doc["kind"] != "backfill" or doc["mapping"] != mapping_id:
                continue
            if doc["state"] == "running" and not self._stale(record.key, doc):
                return record.key, doc  # running here, or on a replica that is still at it
            if self._resumable(doc, scope, bulk) and (
                resumable is None or doc["started_at"] > resumable.doc["started_at"]
            ):
                resumable = record
        if resumable is not None:
            resumed = await self._resume(resumable, mappings)
            if resumed is not None:
                return resumed
        run_id = f"backfill-{uuid.uuid4().hex[:16]}"
        doc = new_run("backfill", connection_id, mapping_id, self.clock())
        doc.update(bulk=bulk, scope=scope, after=None, heartbeat=self.clock())
        doc["people"] = self.people.name  # profiles: every person of the profile service; connector: its view
        doc["total"] = await self.people.count()
        await self.store.put(RUNS, run_id, doc)
        self._spawn(run_id, doc, mappings)
        return run_id, doc

    async def resume_interrupted(self) -> list[str]:
        """Resume the backfills a stopped or killed connector left unfinished (a `running` one whose
        progress stopped `STALE_AFTER` seconds ago, or one `cancelled` by a stop): each goes on from the
        page after the last it finished, under the same run id. Run at start and now and then after."""
        resumed = []
        async for record in self.store.scan_all(RUNS, prefix="backfill-"):
            doc = record.doc
            if record.key in self.tasks or doc["state"] not in ("running", "cancelled"):
                continue
            if doc["state"] == "running" and not self._stale(record.key, doc):
                continue
            connection = self.logic.connections.get(doc["connection"])
            try:
                mappings = self._scope(doc["connection"], doc["mapping"]) if connection is not None else []
            except InvalidArgument:
                continue  # the mapping no longer backfills
            if not mappings or not self._resumable(doc, fingerprint(mappings), doc.get("bulk", False)):
                continue
            if await self._resume(record, mappings) is not None:
                resumed.append(record.key)
        return resumed

    async def close(self, grace: float = 10.0) -> None:
        """Cancel the backfills running here (each is left `cancelled`, with its resume point), waiting up
        to `grace` seconds for them: one that does not end by then (its last writes or its release of a
        partition hanging) is named in the log and left `running`; `STALE_AFTER` later it is resumed."""
        await cancel_and_wait(list(self.tasks.values()), grace, log)

    async def watch(self, every: float = 30.0) -> None:
        """`resume_interrupted` now and every `every` seconds, until cancelled."""
        while True:
            try:
                await self.resume_interrupted()
            except Exception as exc:  # the store failing: next time
                log.warning("resuming crm backfills failed", extra={"error": type(exc).__name__})
            await asyncio.sleep(every)

    def _stale(self, run_id: str, doc: dict[str, Any]) -> bool:
        """A running backfill no task here runs and whose progress stopped: its connector is gone."""
        if run_id in self.tasks:
            return False
        return self.clock() - doc.get("heartbeat", doc["started_at"]) > STALE_AFTER

    @staticmethod
    def _resumable(doc: dict[str, Any], scope: str, bulk: bool) -> bool:
        """Interrupted (a stop, a crash), over the same mappings as now (a mapping changed since means
        everyone again), the same way (bulk or not)."""
        stopped = doc["state"] == "cancelled" or doc["state"] == "running"
        return stopped and doc.get("scope") == scope and bool(doc.get("bulk")) == bulk

    async def _resume(self, record, mappings: list[ObjectMapping]) -> tuple[str, dict[str, Any]] | None:
        """Take the run over (compare-and-set: one replica does) and go on from its resume point."""
        doc = {**record.doc, "state": "running", "error": "", "finished_at": 0.0, "heartbeat": self.clock(),
               "resumed": record.doc.get("resumed", 0) + 1}  # fmt: skip
        try:
            await self.store.put(RUNS, record.key, doc, expected_version=record.version)
        except VersionConflict:
            return None  # another replica took it
        log.info("crm backfill resumed", extra={"run": record.key, "processed": doc["processed"]})
        self._spawn(record.key, doc, mappings)
        return record.key, doc

    def _spawn(self, run_id: str, doc: dict[str, Any], mappings: list[ObjectMapping]) -> None:
        work = self._backfill(run_id, doc, mappings, doc.get("bulk", False))
        self.tasks[run_id] = asyncio.create_task(self._guard(run_id, work), name=f"crm backfill {run_id}")

    async def _guard(self, run_id: str, work) -> None:
        try:
            await work
        except asyncio.CancelledError:
            await self._finish(run_id, "cancelled", "the connector stopped; it resumes when the connector starts")
            raise
        except PeopleUnanswered as exc:
            log.warning("crm backfill stopped until its people can be read", extra={"run": run_id, "error": str(exc)})
            await self._finish(run_id, "cancelled", f"{exc}; it resumes from there")
        except Exception as exc:
            log.error("crm run failed", extra={"run": run_id, "error": type(exc).__name__})
            await self._finish(run_id, "failed", type(exc).__name__)
        finally:
            self.tasks.pop(run_id, None)

    async def _finish(self, run_id: str, state: str, error: str = "") -> None:
        record = await self.store.get(RUNS, run_id)
        if record is not None:
            await self.store.put(
                RUNS, run_id, {**record.doc, "state": state, "error": error, "finished_at": self.clock()}
            )

    async def _backfill(
        self, run_id: str, doc: dict[str, Any], mappings: list[ObjectMapping], bulk: bool = False
    ) -> None:
        run = {"doc": doc}

        async def progress(job: str, state: str, processed: int) -> None:
            run["doc"] = {**run["doc"], "bulk_job": job, "bulk_state": state, "bulk_rows_processed": processed,
                          "heartbeat": self.clock()}  # fmt: skip
            await self.store.put(RUNS, run_id, run["doc"])

        async def count_written(wait: bool) -> None:
            """Count the pages whose every share is written, in order: the resume point moves past them."""
            while unsettled and (wait or all(write.done() for write, _ in unsettled[0][0])):
                writes, after = unsettled[0]
                outcomes = [(await write, persons) for write, persons in writes]  # a failed write raises here
                unsettled.popleft()
                for out, persons in outcomes:
                    run["doc"] = self._count(run["doc"], out, persons)
                run["doc"] = {**run["doc"], "after": after}
                await self.store.put(RUNS, run_id, run["doc"])

        size = self.bulk_page if bulk else PAGE
        pages = self._projected(mappings, size, doc.get("after"))
        # The next page is read and projected (outside any partition's lock, as the page itself always was)
        # while this one is delivered: a bulk job mostly waits for the CRM meanwhile.
        following = asyncio.ensure_future(anext(pages, None))
        read = {"after": doc.get("after"), "pages": 0}  # the last page read, and how many this run has read

        async def next_page() -> tuple[list[Unit], str] | None:
            """The page `following` reads, and the read of the one after it begun. A page the profile service
            did not answer (Unavailable) is asked again after the time it named, up to `PAGE_TRIES` times,
            the listing read on from the last page read; then the run stops, resumable (PeopleUnanswered)."""
            nonlocal pages, following
            tries = 0
            while True:
                try:
                    page = await following
                except Unavailable as exc:
                    tries += 1
                    where = f"page {read['pages'] + 1}"  # of this run's reading: a place, no person's value
                    if tries >= PAGE_TRIES:
                        raise PeopleUnanswered(f"{where} not answered after {tries} tries ({exc})") from None
                    log.warning(
                        "crm backfill page not answered; asked again",
                        extra={"run": run_id, "page": read["pages"] + 1, "processed": run["doc"]["processed"],
                               "try": tries, "retry_after": exc.retry_after, "error": str(exc)},
                    )  # fmt: skip
                    error = f"{where} not answered ({exc}): asked again, try {tries + 1} of {PAGE_TRIES}"
                    run["doc"] = {**run["doc"], "heartbeat": self.clock(), "error": error}
                    await self.store.put(RUNS, run_id, run["doc"])
                    await pages.aclose()
                    await asyncio.sleep(exc.retry_after)
                    pages = self._projected(mappings, size, read["after"])
                    following = asyncio.ensure_future(anext(pages, None))
                    continue
                if page is None:
                    return None
                if run["doc"].get("error"):
                    run["doc"] = {**run["doc"], "error": ""}  # answered again
                read["after"], read["pages"] = page[1], read["pages"] + 1
                following = asyncio.ensure_future(anext(pages, None))
                return page

        held: dict[int, Held] = {}
        unsettled: deque[tuple[list[tuple[asyncio.Task[Outcomes], int]], str]] = deque()
        try:
            while (page := await next_page()) is not None:
                units, after = page
                writes = []
                for unit in units:
                    await count_written(wait=False)
                    # A partition's next share comes next only when there is one partition (a page holds
                    # one share per partition): then its lock is kept for it.
                    keep = self.partitions == 1
                    writes.append((await self._deliver_unit(unit, bulk, progress, held, keep), len(unit.persons)))
                    await count_written(wait=False)
                    run["doc"] = {**run["doc"], "heartbeat": self.clock()}
                    await self.store.put(RUNS, run_id, run["doc"])
                unsettled.append((writes, after))
            for partition in list(held):
                await self._release(held.pop(partition))
            await count_written(wait=True)
        finally:
            following.cancel()
            await pages.aclose()
            for partition in list(held):
                await self._release(held.pop(partition))
            # A run that failed or was cancelled: its writes still land, and the pages they completed count
            # (the resume point moves past them).
            for writes, _ in unsettled:
                await asyncio.gather(*(write for write, _ in writes), return_exceptions=True)
            with contextlib.suppress(Exception):
                await count_written(wait=True)
            await asyncio.gather(*self.releases)
        doc = dict(run["doc"])
        # Every page is read: whoever `total` counted and no page held was gone by then (merged away, which
        # the profile store's count includes, or deleted since the count) - absent, not lost. Someone who
        # appeared since the count was processed: the total grows to hold them.
        doc["absent"] = max(doc["total"] - doc["processed"], 0)
        doc["total"] = doc["processed"] + doc["absent"]
        doc["state"] = "succeeded_with_errors" if doc["dead_lettered"] or doc["pending_retry"] else "succeeded"
        doc["finished_at"] = self.clock()
        await self.store.put(RUNS, run_id, doc)

    async def _projected(
        self, mappings: list[ObjectMapping], size: int, after: str | None
    ) -> AsyncIterator[tuple[list[Unit], str]]:
        """Each page of people after `after`, projected through `mappings`, one `Unit` per partition, with
        the page's last listing key. Projecting reads only the page: no store, no lock."""
        async for people, last in self.people.pages(size, after):
            units: dict[int, Unit] = {}
            for n, person in enumerate(people, start=1):
                partition = partition_for(person.person_id, self.partitions)
                unit = units.get(partition)
                if unit is None:
                    unit = units[partition] = Unit(partition)
                unit.persons.append(person.person_id)
                source = proj.Source(person.person_id, person.fields, frozenset(person.segments))
                item = Input("backfill", person.person_id, person.stamp, None)
                held: frozenset[str] | None = None  # the keys the person holds a value for, once needed
                for mapping in mappings:
                    if mapping.kind == "list":
                        op = UPSERT if proj.in_scope(mapping, source) else REMOVE
                    elif not proj.in_scope(mapping, source):
                        continue
                    elif not proj.touches(mapping, held := held or proj.held(source)):
                        # What the stream would never write (no mapped value): counted as skipped.
                        unit.projected.append(
                            (mapping, proj.Skipped(mapping.name, "fields", proj.NO_MAPPED_VALUE), UPSERT, item, None)
                        )
                        continue
                    else:
                        op = UPSERT
                    projection = proj.project(mapping, source)
                    key = record_key(mapping.name, projection.key) if isinstance(projection, proj.Projection) else None
                    unit.projected.append((mapping, projection, op, item, key))
                if n % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # let the page being delivered go on (its answers, its polls)
            yield sorted(units.values(), key=lambda u: u.partition), last

    async def _gone(self, unit: Unit, planned: Planned) -> None:
        """Mark in `planned` the records the connector wrote that the CRM no longer holds (deleted there by
        one of its users), so the backfill writes them whole: what it compares with is the connector's
        record of what it wrote, which a delete in the CRM does not change. One lookup per mapping and
        hundred records, from the account's budget; a CRM that cannot say leaves the records as they are."""
        wanted: dict[str, dict[str, str]] = defaultdict(dict)  # mapping -> match value -> record key
        fields: dict[str, str] = {}
        for mapping, projection, op, _, key in unit.projected:
            if (
                key is None
                or op != UPSERT
                or mapping.kind != "record"
                or mapping.mode == "update_only"
                or len(projection.key) != 1
                or not accepted(planned.previous.get(key))
            ):
                continue
            fields[mapping.name] = projection.key[0][0]
            wanted[mapping.name][projection.key[0][1].lower()] = key
        deadline = self.clock() + self.logic.deliverer.retry_for
        for name, by_value in wanted.items():
            mapping = self.logic.mappings[name]
            found = await self.logic.deliverer.present(mapping, fields[name], list(by_value), deadline)
            if found is not None:
                planned.gone.update(key for value, key in by_value.items() if value not in found)

    async def _deliver_unit(
        self, unit: Unit, bulk: bool, progress, held: dict[int, Held], keep: bool
    ) -> asyncio.Task[Outcomes]:
        """One partition's share of a page, planned and delivered while the partition is settled; returns
        its write (the record states, dead letters and queued changes it produced), under way. The lock is
        released once that write lands - or, with `keep` (the partition's next share comes next), held for
        that share too (up to `HOLD_UNITS`), whose delivery then overlaps this write: the stream waits for
        both, and nothing of the local engine runs between a share and its write."""
        partition = unit.partition
        hold = held.get(partition)
        if hold is not None and hold.units >= HOLD_UNITS:
            await self._release(held.pop(partition))
            hold = None
        if hold is None:
            hold = Held(contextlib.AsyncExitStack())
            await hold.stack.enter_async_context(self.logic.settled(partition))
        keys = [key for _, _, _, _, key in unit.projected if key is not None]
        before = hold.write
        try:
            if before is not None and not hold.keys.isdisjoint(keys):
                await asyncio.wait([before])  # a record both shares write: plan on what the first wrote
            writes, out = await self._share(unit, keys, bulk, progress)
            if before is not None:
                await asyncio.wait([before])  # the shares' writes land in order
        except BaseException:
            held.pop(partition, None)
            await self._release(hold)
            raise
        hold.write = asyncio.create_task(self._write(writes, out, lambda: self._share(unit, keys, bulk, progress)))
        hold.keys = frozenset(keys)
        hold.units += 1
        if keep:
            held[partition] = hold
        else:
            held.pop(partition, None)
            release = asyncio.create_task(self._release(hold))
            self.releases.add(release)
            release.add_done_callback(self.releases.discard)
        return hold.write

    async def _share(self, unit: Unit, keys: list[str], bulk: bool, progress) -> tuple[list, Outcomes]:
        """One partition's share of a page planned from the records as the store holds them and delivered
        (the stream's path: the CRM's news read first, CRM-made records claimed, `CrmLogic.deliver_planned`);
        the store writes it makes, the records' puts expecting the versions read here, as a batch's do
        (`Outcomes.versions`). A person erased since the page was read (their tombstone: the stream drops
        their inputs the same way, `CrmLogic.apply`) is left out: written, their record would be made again.
        One store read a share."""
        out = Outcomes(self.clock())
        planned = Planned(self.store)
        erased = await self.store.get_many(TOMBSTONES, unit.persons)
        await planned.prefetch(keys)
        await self._gone(unit, planned)
        for mapping, projection, op, item, key in unit.projected:
            if item.person_id in erased:
                continue
            if key is not None and item.stamp and planned.previous[key].get("synced_stamp", 0) > item.stamp:
                # Written by the stream from a change of the person committed after the page was read: the
                # page's values are older than the record's, and written they would undo that change in the
                # CRM (and in the connector's record of it) until the person's next change.
                planned.unchanged[mapping.name] += 1
                continue
            await planned.add(mapping, projection, op, BACKFILL, item, key)
        out.versions = planned.versions
        # Which of the records to write have a dead letter or a queued change: a record written now
        # clears them, and only those need a delete (a backfill writes thousands of records that have
        # none). Both are only ever written with the record's state, so a record never written has none.
        known = [key for key in planned.records if planned.previous.get(key)]
        present = {
            collection: set(await self.store.get_many(collection, known)) for collection in (DEAD_LETTERS, PENDING)
        }
        await self.logic.deliver_planned(unit.partition, planned, out, bulk=bulk, progress=progress)
        writes = [
            op for op in out.writes.values()
            if not (isinstance(op, Delete) and op.collection in present and op.key not in present[op.collection])
        ]  # fmt: skip
        return writes, out

    async def _write(self, writes: list, out: Outcomes, again) -> Outcomes:
        """A share's writes, in one atomic bulk write whose record puts expect the versions the share read.
        A write that landed on one of its records meanwhile - the relink of a merge made in the CRM
        (inbound/news.py `_relink`, from a poller), an erasure - fails it whole instead of being overwritten
        with what the share computed from the record as it read it (a plain put made a relinked record,
        `merged` and written no more, read as before the merge: the person's next change made their contact
        again); the share is then planned and delivered again from what the store holds (`again`: upserts
        by the same keys; a merged record is left alone), up to `SHARE_TRIES` times, then the run fails
        (resumable from its last written page)."""
        tries = 1
        while True:
            try:
                await self.store.bulk_write(await resolve_writes(self.store, writes))
                return out
            except VersionConflict as conflict:
                if tries >= SHARE_TRIES:
                    raise
                log.info(
                    "crm backfill share met another write of its records; planned again",
                    extra={"collection": conflict.collection, "try": tries},
                )
                tries += 1
                writes, out = await again()

    @staticmethod
    async def _release(hold: Held) -> None:
        """The partition's lock, released once the last write made under it has landed (or failed: the
        run sees that where it counts the page)."""
        try:
            if hold.write is not None:
                await asyncio.wait([hold.write])
        finally:
            await hold.stack.aclose()

    def _count(self, doc: dict[str, Any], out: Outcomes, people: int) -> dict[str, Any]:
        doc = dict(doc)
        for counters in out.counters.values():
            for name, n in counters.items():
                doc[name] = doc.get(name, 0) + n
        doc["processed"] = doc.get("processed", 0) + people
        return doc

    # --- replay -------------------------------------------------------------------------------------

    async def replay(
        self, ids: list[str], connection: str = "", mapping: str = "", reason: str = ""
    ) -> tuple[str | None, dict[str, Any] | None, int]:
        """A replay run of the dead letters matching the filters: (run id, its document, how many it takes);
        with nothing to replay, no run is started: (None, None, 0). The run is kept under the connection
        its letters are of (the filter's, or the one connection they all belong to); a replay over several
        connections under none (`connection` empty), naming them in `connections`: ListRuns lists it
        under each of them, and once when not asked for one."""
        if ids:
            found = await self.store.get_many(DEAD_LETTERS, ids)
            letters = [r.doc for r in found.values()]
        else:
            letters = [r.doc async for r in self.store.scan_all(DEAD_LETTERS)]
        letters = [
            d for d in letters
            if d["change"]["trigger"] != INBOUND  # an event the collector refused: fixed at its source
            and (not connection or d["connection"] == connection)
            and (not mapping or d["mapping"] == f"{connection or d['connection']}/{mapping}")
            and (not reason or d["reason"] == reason)
        ]  # fmt: skip
        if not letters:
            return None, None, 0
        connections = sorted({d["connection"] for d in letters})
        run_id = f"replay-{uuid.uuid4().hex[:16]}"
        doc = new_run("replay", connection or (connections[0] if len(connections) == 1 else ""), mapping, self.clock())
        doc["connections"] = connections
        doc["total"] = len(letters)
        await self.store.put(RUNS, run_id, doc)
        self.tasks[run_id] = asyncio.create_task(self._guard(run_id, self._replay(run_id, doc, letters)))
        return run_id, doc, len(letters)

    async def _replay(self, run_id: str, doc: dict[str, Any], letters: list[dict[str, Any]]) -> None:
        by_partition: dict[int, list[DeadLetter]] = defaultdict(list)
        for state in letters:
            dead = DeadLetter.from_state(state)
            by_partition[partition_for(dead.change.person_id, self.partitions)].append(dead)
        for partition, deads in by_partition.items():
            async with self.logic.settled(partition):
                out = Outcomes(self.clock())
                planned = Planned(self.store)
                views = await self.logic._views({d.change.person_id for d in deads})
                for dead in deads:
                    mapping = self.logic.mappings.get(dead.mapping)
                    if mapping is None:
                        continue
                    change = dead.replay()
                    if mapping.kind == "record":
                        # Re-projected from the person's current view: the fix may be in the data.
                        source = views[change.person_id].source(change.person_id)
                        current = proj.project(mapping, source)
                        if isinstance(current, proj.Projection):
                            change.fields = {**change.fields, **current.fields}
                    planned.records[dead.record] = None
                    planned.coalescer.add(change)
                    stored = await self.store.get(RECORDS, dead.record)
                    planned.previous[dead.record] = stored.doc if stored is not None else {}
                await self.logic.deliver_planned(partition, planned, out)
                await self.store.bulk_write(await resolve_writes(self.store, out.writes.values()))
            doc = self._count(doc, out, len(deads))
            await self.store.put(RUNS, run_id, doc)
        doc["state"] = "succeeded_with_errors" if doc["dead_lettered"] or doc["pending_retry"] else "succeeded"
        doc["finished_at"] = self.clock()
        await self.store.put(RUNS, run_id, doc)
