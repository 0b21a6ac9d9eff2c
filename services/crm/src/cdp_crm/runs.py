"""Backfills and replays: syncing people on request, with progress in `crm_runs/<run id>`.

A backfill projects every person (people.py: every live profile of the profile service when it is
configured, else everyone the connector has seen change) through the mappings in scope with the
`backfill` trigger and writes what differs from what each record should hold - the same path as the
stream (engine.py), so a backfill after a complete sync makes no call, and one interrupted by a crash is
simply started again. A backfill already running for the same scope is returned instead of starting a
second one. With `bulk`, record mappings go through the CRM's bulk path where it has one (Salesforce
Bulk API 2.0: one ingest job per page of up to `BULK_PAGE` people and partition, its state and rows
processed in the run document as it runs; refused and unprocessed rows dead-lettered); the others keep
their batch endpoints. A replay sends dead-lettered records again: record and list records re-projected
from the person's current view, tasks and cases as they were.

Each page of people is handled while its partition is settled (`CrmLogic.settled`), so it never
interleaves with a batch of the local engine; progress (total, processed, counters, API units) is stored
after every page.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from typing import Any

from cdp_crm.domain import projection as proj
from cdp_crm.domain.coalesce import REMOVE, UPSERT, record_key
from cdp_crm.domain.isolation import DeadLetter
from cdp_crm.domain.mapping import BACKFILL, ObjectMapping
from cdp_crm.engine import COUNTERS, CrmLogic, Input, Outcomes, Planned, View, resolve_writes
from cdp_crm.people import ConnectorView, People
from cdp_crm.state import DEAD_LETTERS, RECORDS, RUNS
from cdp_kit.bus import partition_for
from cdp_kit.errors import InvalidArgument, NotFound

log = logging.getLogger("cdp.crm.runs")

PAGE = 200
BULK_PAGE = 10_000  # people per page of a bulk backfill: a Bulk API job is worth its five extra requests


def new_run(kind: str, connection: str, mapping: str, now: float) -> dict[str, Any]:
    return {
        "kind": kind, "state": "running", "connection": connection, "mapping": mapping, "started_at": now,
        "finished_at": 0.0, "total": 0, "processed": 0, **dict.fromkeys(COUNTERS, 0), "error": "",
    }  # fmt: skip


class Runs:
    def __init__(self, logic: CrmLogic, *, partitions: int, clock=time.time, people: People | None = None) -> None:
        self.logic = logic
        self.people = people or ConnectorView(logic.store)
        self.store = logic.store
        self.partitions = partitions
        self.clock = clock
        self.tasks: dict[str, asyncio.Task] = {}

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
        for record in await self.store.find(RUNS, "connection", connection_id, limit=1000):
            doc = record.doc
            if doc["kind"] == "backfill" and doc["state"] == "running" and doc["mapping"] == mapping_id:
                return record.key, doc
        run_id = f"backfill-{uuid.uuid4().hex[:16]}"
        doc = new_run("backfill", connection_id, mapping_id, self.clock())
        doc["bulk"] = bulk
        doc["people"] = self.people.name  # profiles: every person of the profile service; connector: its view
        doc["total"] = await self.people.count()
        await self.store.put(RUNS, run_id, doc)
        work = self._backfill(run_id, doc, mappings, bulk)
        self.tasks[run_id] = asyncio.create_task(self._guard(run_id, work))
        return run_id, doc

    async def _guard(self, run_id: str, work) -> None:
        try:
            await work
        except asyncio.CancelledError:
            await self._finish(run_id, "cancelled", "the connector stopped; start the backfill again")
            raise
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
            run["doc"] = {**run["doc"], "bulk_job": job, "bulk_state": state, "bulk_rows_processed": processed}
            await self.store.put(RUNS, run_id, run["doc"])

        async for people in self.people.pages(BULK_PAGE if bulk else PAGE):
            by_partition: dict[int, list[Any]] = defaultdict(list)
            for person in people:
                by_partition[partition_for(person.person_id, self.partitions)].append(person)
            for partition, persons in by_partition.items():
                async with self.logic.settled(partition):
                    out = Outcomes(self.clock())
                    planned = Planned(self.store)
                    projected = []
                    for person in persons:
                        source = View(person.fields, person.segments).source(person.person_id)
                        item = Input("backfill", person.person_id, person.stamp, None)
                        for mapping in mappings:
                            if mapping.kind == "list":
                                op = UPSERT if proj.in_scope(mapping, source) else REMOVE
                                projected.append((mapping, proj.project(mapping, source), op, item))
                            elif proj.in_scope(mapping, source):
                                projected.append((mapping, proj.project(mapping, source), UPSERT, item))
                    await planned.prefetch(
                        record_key(m.name, p.key) for m, p, _, _ in projected if isinstance(p, proj.Projection)
                    )
                    for mapping, projection, op, item in projected:
                        await planned.add(mapping, projection, op, BACKFILL, item)
                    await self.logic.deliver_planned(partition, planned, out, bulk=bulk, progress=progress)
                    await self.store.bulk_write(await resolve_writes(self.store, out.writes.values()))
                run["doc"] = self._count(run["doc"], out, len(persons))
                await self.store.put(RUNS, run_id, run["doc"])
        doc = run["doc"]
        doc["state"] = "succeeded_with_errors" if doc["dead_lettered"] or doc["pending_retry"] else "succeeded"
        doc["finished_at"] = self.clock()
        await self.store.put(RUNS, run_id, doc)

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
    ) -> tuple[str, dict[str, Any], int]:
        if ids:
            found = await self.store.get_many(DEAD_LETTERS, ids)
            letters = [r.doc for r in found.values()]
        else:
            letters = [r.doc async for r in self.store.scan_all(DEAD_LETTERS)]
        letters = [
            d for d in letters
            if (not connection or d["connection"] == connection)
            and (not mapping or d["mapping"] == f"{connection or d['connection']}/{mapping}")
            and (not reason or d["reason"] == reason)
        ]  # fmt: skip
        run_id = f"replay-{uuid.uuid4().hex[:16]}"
        doc = new_run("replay", connection, mapping, self.clock())
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
