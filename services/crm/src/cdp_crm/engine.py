"""The outbound sync on the kit's partitioned engine: what reaches `crm.in.<p>` becomes CRM writes.

Per batch of one person partition (`CrmLogic.apply`):

1. decode: a sourced profile change batch, segment event batch or `ActionMessage` (streams.py) becomes
   one `Input` per person, stamped with its stream position (later positions are newer); the inputs of a
   person a privacy erasure tombstoned (`crm_tombstones`, privacy.py) are dropped: what follows a
   deletion (segmentation's exits, a profile change sourced late) must not write them to a CRM again.
   With a profile service to read persons from (`refresh`), a profile change that names no field any
   mapping reads is dropped here, before any value is decoded or anything is read (`MappedPaths`): most
   changes (an event moving computed traits, a score no mapping reads) concern no CRM;
2. the persons' views (`crm_persons`: the flat fields the mappings read, their segments) are read and
   updated in stream order - without a profile service a view keeps every field, so a mapping added
   later is backfilled from the views; with one, only the mapped fields, and a view written under other
   mappings (`reads`: their fingerprint) is read again from the profile service before it is used; each input yields, per mapping listening to its trigger, the record the
   person now projects to (`domain.projection`) - a profile change only for mappings that read a field it
   touched, a segment exit in mirror mode as the record cleared or the list membership removed, an
   action as a task or case keyed by its idempotency key;
3. a projection is compared with what the CRM took last for that record (`crm_records`; a refused or
   queued write leaves it as it was, and a record the CRM never created is written whole):
   only changed fields are written, nothing changed means no call; a record never written is not created
   for a person holding no value its mapping reads (`projection.held`, as a backfill skips them: it would
   hold only its match key), nor a list membership never added removed; the changes coalesce per record
   (`domain.coalesce`), with any change of those records still queued from earlier (`crm_pending`);
4. each mapping's changes are delivered (delivery.py) within the account's budget: written, refused
   (dead letters, reason-coded, replayable) or still failing after `retry_for` seconds (pending);
5. the effects - views, record states, dead letters, pending changes, this partition's run counters -
   are committed with the stream checkpoint, and only then is the batch acknowledged.

A crash anywhere before the commit redelivers the batch: it is projected again against the state of the
last commit and sent again - upserts by the same keys, so the CRM converges to the latest values and no
record or task is created twice. `in_flight` must be 1: a batch reads the records the batch before it
wrote.

Pending changes are retried by the partition's owner (`retry_pending`), under the partition's lock and
only while every applied batch is durable, so a retry can never send values older than a batch that is
being written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from cdp.orchestration.v1 import orchestration_pb2
from cdp_crm import streams
from cdp_crm.delivery import STOPPED, Delivered, Deliverer
from cdp_crm.domain import projection as proj
from cdp_crm.domain.coalesce import DELETE, REMOVE, UPSERT, Change, record_key
from cdp_crm.domain.isolation import DUPLICATE, NOT_FOUND, DeadLetter
from cdp_crm.domain.mapping import (
    ACTIONS,
    PERSON_ID,
    PROFILES_CHANGED,
    SEGMENT_ENTERED,
    SEGMENT_EXITED,
    Connection,
    ObjectMapping,
)
from cdp_crm.domain.mapping_model import SEGMENTS
from cdp_crm.inbound.core import CollectorRefused
from cdp_crm.inbound.news import field_digest
from cdp_crm.inbound.salesforce import OBJECTS as SALESFORCE_OBJECTS
from cdp_crm.inputs import Input, MappedPaths, View, action_source, decode, reads_fingerprint
from cdp_crm.people import Fetch, Identifiers, unanswered
from cdp_crm.state import (
    CURSORS,
    DEAD_LETTERED,
    DEAD_LETTERS,
    ERASED,
    MERGED,
    MERGES,
    OUT_OF_SCOPE,
    PENDING,
    PENDING_STATE,
    PERSONS,
    RECORDS,
    RUNS,
    SYNCED,
    TOMBSTONES,
)
from cdp_crm.writes import (
    COUNTERS,
    Outcomes,
    Planned,
    RunIncrement,
    accepted,
    change_doc,
    change_from_doc,
    held_member,
    new_stream_run,
    record_doc,
    resolve_writes,
    stream_run_key,
    unconfirmed,
)
from cdp_kit.bus import Delivery, subjects
from cdp_kit.engine import Effects
from cdp_kit.signals import top_scores
from cdp_kit.storage import Store

log = logging.getLogger("cdp.crm.engine")

SERVICE = "crm"
WRITE_ORDER = {"record": 0, "list": 1, "action": 2}
# How often a list membership whose record is not in the CRM yet is tried before it is dead-lettered.
LIST_WAITS = 20
# Seconds between looks at a partition this process queued changes for, until its pipeline is idle to retry.
BACKLOG_POLL = 0.2
# Seconds a batch waits for the top scores of its tasks naming no signals (`_sign`): past it they go with
# the scores orchestration held. Short: a partition's batches go one at a time, and a busy profile service
# answers late (at 1,000 events/s a 1 s bound doubled the tasks' p50 in the pipeline benchmark).
SIGN_WAIT = 0.1
MERGE = subjects.IDENTITY_MERGED  # the trigger of a survivor's records written whole before a merge


class CrmLogic:
    """The engine's logic for `crm.in.<p>` (the flow and its crash guarantees: this module)."""

    def __init__(
        self,
        store: Store,
        connections: Iterable[Connection],
        deliverer: Deliverer,
        *,
        clock=time.time,
        meter=None,
        refresh: Fetch | None = None,
        identifiers: Identifiers | None = None,
    ) -> None:
        self.store = store
        # The profile service's identifiers of persons (BatchGetProfiles): a person a CRM user made (their
        # contact came in as news) is written to that contact, never to a new one (`claim`).
        self.identifiers = identifiers
        self.connections = {c.id: c for c in connections}
        self.mappings: dict[str, ObjectMapping] = {m.name: m for c in self.connections.values() for m in c.mappings}
        self.deliverer = deliverer
        self.clock = clock
        # Per connection, its inbound poller (set by the process when it reads the CRMs' changes): before a
        # record is written, what CRM users changed in that object since the last read is read and posted
        # first (`read_first`), so a newer edit there is never overwritten unread.
        self.inbound: dict[str, Any] = {}
        self.locks: dict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.backlog: set[int] = set()  # partitions a batch queued changes for, not retried since
        self.queued = asyncio.Event()  # set when a batch adds to the backlog: wakes `retry_forever`
        self.engine = None  # the PartitionedEngine running this logic, once started (settled)
        self.reads: frozenset[str] = frozenset(
            k for m in self.mappings.values() for k in proj.reads(m) if not k.startswith(SEGMENTS)
        )
        # With the profile service to read a person from (`refresh`: its BatchGetProfiles), the views keep
        # only what the mappings read, and a change of nothing mapped is dropped as it is decoded. Without
        # it they keep every field: a mapping added later is backfilled from them (runs.py).
        self.refresh = refresh
        self.mapped = MappedPaths(self.reads) if refresh is not None else None
        self.reads_id = reads_fingerprint(self.reads) if refresh is not None else None
        self.m_records = self.m_errors = None
        if meter is not None:
            self.m_records = meter.create_counter(
                "cdp.crm.records", unit="{record}", description="CRM records written, by connection and outcome"
            )
            self.m_errors = meter.create_counter(
                "cdp.crm.errors", unit="{record}", description="records a CRM refused, by connection and reason"
            )

    @contextlib.asynccontextmanager
    async def settled(self, partition: int):
        """The partition's lock, taken at a moment every batch the local engine applied is durable: work
        outside the stream (backfills, replays, erasures) then reads the records as the last batch left them
        and never interleaves with a batch. (The lock alone is not enough: a batch's commit lands after its
        apply released the lock.) A partition another replica owns has nothing to wait for here."""
        lock = self.locks[partition]
        while True:
            await lock.acquire()
            pipeline = self.engine.pipelines.get(partition) if self.engine is not None else None
            if pipeline is None or pipeline.idle.is_set():
                break
            lock.release()  # a batch is between apply and acknowledgement: let it finish
            await asyncio.sleep(0.02)
        try:
            yield
        finally:
            lock.release()

    # --- the engine's contract ---------------------------------------------------------------------

    def decode(self, delivery: Delivery) -> list[Input]:
        stream, _ = streams.source_of(delivery.headers)
        return decode(stream, delivery.data, delivery.stream_seq, self.mapped, delivery.reject_part)

    async def recover(self, partition: int) -> None:
        pass  # nothing is held between batches: every batch reads what it needs from the store

    async def apply(self, partition: int, items: list[list[Input]]) -> Effects:
        async with self.locks[partition]:
            inputs = [i for item in items for i in item if i.person_id]
            # The tasks' top scores are read beside the batch's own reads, not after them (`_sign`).
            unsigned = self._unsigned(inputs)
            signing = asyncio.create_task(self._sign(unsigned)) if unsigned else None
            try:
                return await self._apply(partition, inputs, signing)
            finally:
                if signing is not None and not signing.done():
                    signing.cancel()

    async def _apply(self, partition: int, inputs: list[Input], signing: asyncio.Task | None) -> Effects:
        erased = await self.store.get_many(TOMBSTONES, list({i.person_id for i in inputs}))
        if erased:
            inputs = [i for i in inputs if i.person_id not in erased]
            log.info("crm inputs of erased persons dropped", extra={"persons": len(erased)})
        if not inputs:
            return Effects()
        now = self.clock()
        out = Outcomes(now)
        views = await self._views({i.person_id for i in inputs})
        if signing is not None:
            await signing
        planned = Planned(self.store)
        projected = []
        for item in inputs:
            view = views[item.person_id]
            view.stamp = max(view.stamp, item.stamp)
            for mapping, projection, op, trigger in self._project(item, view):
                key = None if isinstance(projection, proj.Skipped) else record_key(mapping.name, projection.key)
                projected.append((item, mapping, projection, op, trigger, key))
        # The stored states of every record the batch touches in one query, not one read per record (a
        # batch of profile changes holds thousands): the CRM's budget waits while a batch is planned.
        await planned.prefetch(key for *_, key in projected if key is not None)
        for item, mapping, projection, op, trigger, key in projected:
            await planned.add(mapping, projection, op, trigger, item, key)
        # The records' puts at the commit expect the versions read here (writes.Outcomes.versions): a
        # relink landing while the batch is at the CRM is not overwritten; the batch is applied again.
        out.versions = planned.versions
        for pid, view in views.items():
            if view.dirty:
                out.put(PERSONS, pid, view.to_doc())
        for item in inputs:
            if item.kind == "merge":
                for loser in item.data:
                    # Where both persons' records are in the CRM, merged there first: the survivor's write
                    # may carry a value only the loser's record may hold (HubSpot refuses a second contact
                    # with one email: 409). The rest (a survivor's record this batch creates, a CRM
                    # failing) is done by the retrier once this batch is committed.
                    if await self._merge_now(partition, item.person_id, loser, out):
                        continue
                    doc = {"survivor": item.person_id, "loser": loser, "partition": partition, "at": now}
                    out.put(MERGES, f"{item.person_id}:{loser}", doc)
                    self.backlog.add(partition)
                    self.queued.set()
        await self.deliver_planned(partition, planned, out)
        if any(counters["pending_retry"] for counters in out.counters.values()):
            self.backlog.add(partition)  # what the budget did not allow in time: retried once committed
            self.queued.set()
        self._run_writes(partition, out)
        # in_flight is 1: the run documents read here hold every earlier batch's counts.
        return Effects(writes=await resolve_writes(self.store, out.writes.values()))

    # --- projecting ---------------------------------------------------------------------------------

    async def _views(self, persons: set[str]) -> dict[str, View]:
        found = await self.store.get_many(PERSONS, persons)
        views = {}
        stale = []
        for pid in persons:
            record = found.get(pid)
            doc = record.doc if record is not None else {}
            view = views[pid] = View(
                dict(doc.get("fields", {})), set(doc.get("segments", [])), doc.get("stamp", 0), reads=doc.get("reads")
            )
            if self.reads_id is not None and view.reads != self.reads_id:
                if record is None:
                    view.reads = self.reads_id  # new: it will hold what the changes bring
                elif view.reads is None:
                    # Kept every field until now: complete; from now on only the mapped ones are kept up
                    # to date, so the others go (a later mapping of one reads it from the profile again).
                    view.fields = {k: v for k, v in view.fields.items() if k in self.reads}
                    view.reads, view.dirty = self.reads_id, True
                else:
                    stale.append(pid)  # kept under other mappings: a newly mapped field is missing
        if stale:
            fetched = await self.refresh(stale)
            for pid in stale:
                fields = fetched.get(pid)
                view = views[pid]
                if fields is not None:  # else gone from the profile service: its erasure follows
                    view.fields = {k: v for k, v in fields.items() if k in self.reads}
                view.reads, view.dirty = self.reads_id, True
        return views

    def _unsigned(self, inputs: list[Input]) -> list[Input]:
        """The batch's tasks marked `signals_from_profile` (none without a profile service to read)."""
        if self.refresh is None:
            return []
        return [i for i in inputs if i.kind == "action" and i.data.signals_from_profile]

    async def _sign(self, unsigned: list[Input]) -> None:
        """Tasks and cases whose journey node named no signals, from an orchestration that does not keep
        every score (`signals_from_profile`): the person's top scores as the profile service holds them
        (`cdp_kit.signals.top_scores`, orchestration's ranking), one read for the batch's persons, in place
        of those orchestration held. Read here, not there: there every action of its batch waited for it.
        Bounded (`SIGN_WAIT`): should the profile service not answer, the task goes with the scores it
        came with (context helps a task, it never holds it back)."""
        try:
            async with asyncio.timeout(SIGN_WAIT):
                found = await self.refresh(sorted({i.person_id for i in unsigned}))
        except Exception as exc:
            # INFO: under load a batch a second may meet it; the task still goes (with the scores it came with).
            log.info(
                "crm tasks' top scores not read from the profile service; the scores they came with are kept",
                extra={"error": type(exc).__name__, "tasks": len(unsigned)},
            )
            return
        for item in unsigned:
            fields = found.get(item.person_id)
            if fields is None:
                continue  # gone from the profile service: its erasure follows
            action: orchestration_pb2.ActionMessage = item.data
            del action.signals[:]
            for name, value in top_scores(fields):
                action.signals.add(name=name, value=value)

    def _project(self, item: Input, view: View):
        """(mapping, Projection or Skipped, op, trigger) for each mapping the input concerns."""
        if item.kind == "profile":
            updates, removed = item.data
            if removed:
                return
            changed = set()
            for key, value in updates.items():
                # Without a profile service every field is kept, read by a mapping or not: a mapping
                # added later is backfilled from the view (runs.py). With one, `decode` kept only these.
                if view.fields.get(key) != value:
                    view.dirty = True
                    if value is None:
                        view.fields.pop(key, None)
                    else:
                        view.fields[key] = value
                if key in self.reads:
                    changed.add(key)
            if not changed:
                return  # nothing any mapping reads
            for mapping in self.mappings.values():
                if mapping.kind != "record" or PROFILES_CHANGED not in mapping.triggers:
                    continue
                if not proj.touches(mapping, changed):
                    continue
                source = view.source(item.person_id)
                if proj.in_scope(mapping, source):
                    yield mapping, proj.marked(mapping, source, proj.project(mapping, source)), UPSERT, PROFILES_CHANGED
        elif item.kind == "segment":
            segment, entered = item.data
            (view.segments.add if entered else view.segments.discard)(segment)
            view.dirty = True
            trigger = SEGMENT_ENTERED if entered else SEGMENT_EXITED
            source = view.source(item.person_id)
            for mapping in self.mappings.values():
                if mapping.kind == "action":
                    continue
                if mapping.segment == segment and trigger in mapping.triggers:
                    if entered:
                        yield mapping, proj.marked(mapping, source, proj.project(mapping, source)), UPSERT, trigger
                    elif mapping.mode == "mirror":
                        op = REMOVE if mapping.kind == "list" else UPSERT
                        yield mapping, proj.marked(mapping, source, proj.cleared(mapping, source)), op, trigger
                elif (
                    mapping.kind == "record"
                    and PROFILES_CHANGED in mapping.triggers
                    and proj.touches(mapping, {f"{SEGMENTS}.{segment}"})
                    and proj.in_scope(mapping, source)
                ):
                    yield mapping, proj.marked(mapping, source, proj.project(mapping, source)), UPSERT, trigger
        elif item.kind == "merge":
            # The survivor's records, whole where the CRM has none yet: the loser's are merged into them.
            source = view.source(item.person_id)
            for mapping in self.mappings.values():
                if mapping.kind == "record" and proj.in_scope(mapping, source):
                    yield mapping, proj.marked(mapping, source, proj.project(mapping, source)), UPSERT, MERGE
        elif item.kind == "action":
            action: orchestration_pb2.ActionMessage = item.data
            source = view.source(item.person_id, action_source(action))
            for mapping in self.mappings.values():
                if mapping.kind == "action" and mapping.action == action.crm_kind and ACTIONS in mapping.triggers:
                    about = None
                    if mapping.about is not None:
                        about = self.connections[mapping.connection].mapping(mapping.about.mapping)
                    yield mapping, proj.project(mapping, source, about), UPSERT, ACTIONS

    # --- delivering ---------------------------------------------------------------------------------

    async def deliver_planned(
        self, partition: int, planned: Planned, out: Outcomes, *, bulk: bool = False, progress=None
    ) -> None:
        """Send what `planned` holds, records first; `bulk` (a backfill asking for it) sends record mappings
        through the CRM's bulk path where it has one (`Deliverer.deliver_bulk`)."""
        for name, skipped in planned.skipped.items():
            out.count(self.mappings[name].connection, "skipped", skipped)
        for name, unchanged in planned.unchanged.items():
            out.count(self.mappings[name].connection, "unchanged", unchanged)
        pending = await self.store.get_many(PENDING, list(planned.records))
        attempts = {}
        for key, record in pending.items():
            # A change still queued from an earlier batch: older, so the new one's fields win.
            planned.coalescer.add(change_from_doc(record.doc))
            attempts[key] = record.doc.get("attempts", 1)
            out.delete(PENDING, key)
        # One deadline for the whole batch, however many mappings it writes: the batch must be settled
        # (written, refused or queued) well within the stream's acknowledgement wait.
        deadline = self.clock() + self.deliverer.retry_for
        # Each connection on its own, side by side: a CRM that hangs, fails or makes its account's budget
        # wait delays only its own writes, never the other CRMs' writes of the same batch. Within a
        # connection, records first (`_side_by_side`). The batch is committed (by the caller) only once every
        # connection has written, refused or queued its share: a crash meanwhile sends the whole batch again
        # (upserts by the same keys).
        names = planned.coalescer.mappings()
        changes = {name: planned.coalescer.take(mapping=name) for name in names}

        async def connection(mine: list[str]) -> None:
            for name in mine:
                await self._deliver_mapping(
                    partition, self.mappings[name], changes[name], planned, out, attempts, deadline, bulk, progress
                )

        await self._side_by_side(connection, names)

    async def _side_by_side(self, work, names: Iterable[str]) -> list[Any]:
        """`work(mapping names)` once per connection, in its own task (an asyncio.TaskGroup), each given its
        mappings records first (a list membership or a task may need the person's record to exist); their
        answers. A failure fails the whole (the others cancelled), raised as itself, not wrapped."""
        by_connection: dict[str, list[str]] = defaultdict(list)
        for name in sorted(names, key=lambda n: WRITE_ORDER[self.mappings[n].kind]):
            by_connection[self.mappings[name].connection].append(name)
        if len(by_connection) <= 1:
            return [await work(mine) for mine in by_connection.values()]
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(work(mine)) for mine in by_connection.values()]
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        return [task.result() for task in tasks]

    async def _deliver_mapping(
        self, partition: int, mapping: ObjectMapping, changes: list[Change], planned: Planned, out: Outcomes,
        attempts: Mapping[str, int], deadline: float, bulk: bool, progress,
    ) -> None:  # fmt: skip
        """One mapping's share of a batch: the CRM's news read first, then written (or queued), the outcome
        recorded in `out`."""
        if not await self.read_first(mapping, changes, deadline):
            # The CRM's news could not be read (it or the collector failing): writing now could
            # overwrite an edit no one has read. Queued, as for a CRM that is down.
            delivered = Delivered(pending=list(changes))
            self.record_outcome(partition, mapping, delivered, planned.intended, planned.previous, out, attempts)
            return
        if mapping.kind == "record" and self.identifiers is not None:
            changes = await self._claimed(
                partition, mapping, changes, planned.intended, planned.previous, out, attempts, deadline
            )
            if not changes:
                return
        if bulk:
            delivered = await self.deliverer.deliver_bulk(mapping, changes, deadline=deadline, progress=progress)
        else:
            delivered = await self.deliverer.deliver(mapping, changes, deadline=deadline)
        self.record_outcome(partition, mapping, delivered, planned.intended, planned.previous, out, attempts)

    async def read_first(self, mapping: ObjectMapping, changes: list[Change], deadline: float) -> bool:
        """Before a record mapping's upserts: read and post what CRM users changed in its object since the
        connection's inbound cursor (its poller's `read_first`), so a CRM user's edit newer than the value
        about to be written reaches the profile (which keeps the newest by the CRM's modification time) and
        comes back to every CRM, instead of being overwritten unread. False when that read failed (the CRM
        or the collector down, or it did not end before `deadline`, or the service is stopping): the changes
        must wait."""
        if self.deliverer.resting(mapping.connection) or self.deliverer.stopping.is_set():
            # held, its CRM failing (delivery.py): queued, without a read that would wait on it; stopping:
            # queued for the partition's next owner, as the delivery would (`Deliverer.stop`)
            return False
        poller = self.inbound.get(mapping.connection)
        if poller is None or mapping.kind != "record" or poller.reads(mapping.object) is None:
            return True
        if not any(c.op == UPSERT for c in changes):
            return True
        try:
            async with asyncio.timeout(max(0.5, deadline - self.clock())):
                # A stop cuts the read short as its timeout would (the cursor moves only past what the
                # collector took): a CRM holding it unanswered must not hold the stop past its grace.
                if await self.deliverer.unless_stopped(poller.read_first(mapping.object)) is STOPPED:
                    return False
        except Exception as exc:
            log.warning(
                "reading crm changes before writing failed; the writes wait",
                extra={"mapping": mapping.name, "error": type(exc).__name__},
            )
            if not isinstance(exc, CollectorRefused):  # the CRM failing: held, not waited on again (delivery.py)
                self.deliverer.read_failed(mapping, type(exc).__name__)
            return False
        return True

    async def _claimed(
        self, partition: int, mapping: ObjectMapping, changes: list[Change],
        intended: Mapping[str, tuple[dict[str, Any], bool | None]], previous: Mapping[str, Mapping[str, Any]],
        out: Outcomes, attempts: Mapping[str, int], deadline: float,
    ) -> list[Change]:  # fmt: skip
        """`changes` once `claim` has stamped what it could: those that may be written now. The ones whose
        CRM-made record profile could not name (it did not answer) are queued in `out` instead, as for a CRM
        that is down: the retrier claims and writes them once it answers."""
        waiting, first = await self.claim(mapping, changes, previous, deadline)
        changes = [first.get(id(c), c) for c in changes]
        if not waiting:
            return changes
        self.record_outcome(partition, mapping, Delivered(pending=waiting), intended, previous, out, attempts)
        held = {id(c) for c in waiting}
        return [c for c in changes if id(c) not in held]

    async def claim(
        self, mapping: ObjectMapping, changes: list[Change], previous: Mapping[str, Mapping[str, Any]], deadline: float
    ) -> tuple[list[Change], dict[int, Change]]:
        """Before a record the connector never wrote is upserted by its match key: when the person came from
        a record of this CRM a CRM user made (their identifiers hold its id: `anonymous_id:<kind>:<account>:
        <id>` as the inbound side posts it, or `<kind>_id:<id>`), stamp the match key on that record, so the
        upsert writes to it instead of creating a second one, and write it field by field from then on
        (`_first_write`). Returns the changes that must not be written now - those of records never written
        when the profile service did not answer (UNAVAILABLE, DEADLINE_EXCEEDED, unreachable): upserted by
        the match key, a CRM-made record of theirs would get a second - and, by `id()` of the change it
        replaces, each claimed record's first write. A refusal (any other code) writes them as before, by
        the match key; a person profile does not know has no CRM-made record to find."""
        new = [
            c for c in changes
            if c.op == UPSERT and c.person_id and len(c.key) == 1 and not accepted(previous.get(c.record))
        ]  # fmt: skip
        first: dict[int, Change] = {}
        if not new or self.identifiers is None:
            return [], first
        try:
            found = await self.identifiers(sorted({c.person_id for c in new}))
        except Exception as exc:
            if unanswered(exc):
                log.warning(
                    "reading persons' crm ids failed; their new records wait for the profile service",
                    extra={"mapping": mapping.name, "error": type(exc).__name__, "records": len(new)},
                )
                return new, first
            log.warning("reading persons' crm ids failed", extra={"mapping": mapping.name, "error": type(exc).__name__})
            return [], first
        connection = self.connections[mapping.connection]
        prefixes = (f"anonymous_id:{connection.kind}:{connection.account}:".lower(), f"{connection.kind}_id:")
        for change in new:
            crm_ids = [
                ident[len(prefix) :]
                for ident in found.get(change.person_id, ())
                for prefix in prefixes
                if ident.lower().startswith(prefix) and len(ident) > len(prefix)
            ]
            field, value = change.key[0]
            for crm_id in dict.fromkeys(crm_ids):
                if await self.deliverer.claim(mapping, crm_id, field, value, deadline):
                    log.info("crm record made in the crm claimed", extra={"mapping": mapping.name})
                    first[id(change)] = await self._first_write(mapping, change, crm_id)
                    break
        return [], first

    async def _first_write(self, mapping: ObjectMapping, change: Change, crm_id: str) -> Change:
        """The first write to a record a CRM user made, claimed just now: only the fields whose value differs
        from what the inbound side's last read of the record found (its memo's digest per field,
        `crm_cursors/<connection>:<object>:<crm id>` `fields`; news.py `field_digest`) - the CDP's changes,
        not the values it took from that record. Sent whole, a field a CRM user edited after that read (the
        read before the write included) was overwritten with the value the CDP read before it, and the edit
        lost: read back it is the connector's own value, no news. This is the three-way comparison the later
        writes make against what the CRM took last (`Planned.add`), with the last read as the base; the
        record's `fields` still take every projected value (both sides agreed on them at that read).
        Without a memo holding digests (no inbound reading of the object, or one kept before them) it is
        sent whole as before. Costs one store read per claimed record (claims are rare: once per person)."""
        poller = self.inbound.get(mapping.connection)
        obj = poller.reads(mapping.object) if poller is not None else None
        if obj is None:
            return change
        memo = await self.store.get(CURSORS, f"{mapping.connection}:{obj}:{crm_id}")  # inbound/core.py `_key`
        read = (memo.doc.get("fields") if memo is not None else None) or {}
        if not read:
            return change
        keys = {name for name, _ in change.key}
        fields = {
            name: value
            for name, value in change.fields.items()
            if name in keys or read.get(name) != field_digest(mapping.connection, obj, crm_id, name, value)
        }
        return Change(
            change.mapping, change.key, fields, change.stamp, change.op, change.person_id, change.trigger, change.link
        )

    def record_outcome(
        self,
        partition: int,
        mapping: ObjectMapping,
        delivered: Delivered,
        intended: Mapping[str, tuple[dict[str, Any], bool | None]],
        previous: Mapping[str, Mapping[str, Any]],
        out: Outcomes,
        attempts: Mapping[str, int] | None = None,
    ) -> None:
        """The store writes for what a delivery did. `attempts`: how often each record was tried before."""
        now, connection = out.now, mapping.connection
        attempts = attempts or {}
        if delivered.noted and out.versions:
            # The delivery wrote these records itself (values sent, their answer lost): the commit expects
            # its write - where it was made on the version the batch read; else another write came between,
            # and the commit must fail.
            versions = dict(out.versions)
            for key, (read, left) in delivered.noted.items():
                if versions.get(key) == read:
                    versions[key] = left
            out.versions = versions
        out.count(connection, "api_units", delivered.units)
        pending = list(delivered.pending)
        dead_letters = []
        for dead in delivered.dead:
            if mapping.kind == "list" and dead.reason == NOT_FOUND and attempts.get(dead.record, 0) < LIST_WAITS:
                # The person's record is not in the CRM yet: a record mapping's write of it may still be
                # on its way (segment and profile changes come from different streams). Wait for it.
                pending.append(dead.change)
            else:
                dead_letters.append(dead)
        for change, result in delivered.synced:
            key = result.record or change.record  # the record key, computed once (a hash)
            fields, member = intended.get(key, (change.fields, change.op != REMOVE))
            # What the CRM holds now: what it held, with what this write carried (a replay or a queued
            # change sends fields the planned ones may not name).
            held = (previous.get(key) or {}).get("fields") or {}
            fields = {**held, **fields, **change.fields}
            left = change.op == REMOVE or (mapping.segment is not None and change.trigger == SEGMENT_EXITED)
            state = OUT_OF_SCOPE if left else SYNCED
            if result.created and mapping.kind == "record" and accepted(previous.get(key)) and not left:
                missing = {k: v for k, v in fields.items() if k not in change.fields and v is not None}
                if missing:
                    # The CRM made a new record for a write of only the changed fields: the one it held was
                    # deleted there (a CRM user's delete). It holds only what this write carried; the whole
                    # record goes again at once (queued: the retrier takes it as soon as this is committed).
                    whole = Change(
                        change.mapping, change.key, {**change.fields, **missing}, change.stamp, change.op,
                        change.person_id, change.trigger, change.link,
                    )  # fmt: skip
                    doc = record_doc(
                        mapping, change, dict(change.fields), member, PENDING_STATE, now, previous.get(key),
                        crm_id=result.crm_id, synced_at=now, synced_stamp=change.stamp, held_member=member,
                        **unconfirmed({}, missing),
                    )  # fmt: skip
                    out.put(RECORDS, key, doc)
                    out.delete(DEAD_LETTERS, key)
                    out.put(PENDING, key, change_doc(whole, partition, 1))
                    out.count(connection, "created")
                    out.count(connection, "pending_retry")
                    log.info("crm record recreated by the crm; writing it whole", extra={"mapping": mapping.name})
                    continue
            doc = record_doc(
                mapping, change, fields, member, state, now, previous.get(key),
                crm_id=result.crm_id, synced_at=now, synced_stamp=change.stamp,
            )  # fmt: skip
            out.put(RECORDS, key, doc)
            out.delete(DEAD_LETTERS, key)
            out.delete(PENDING, key)
            out.count(connection, "created" if result.created else "updated")
        if self.m_records is not None and delivered.synced:  # once per delivery, not per record
            self.m_records.add(len(delivered.synced), {"connection": connection, "outcome": "synced"})
        for dead in dead_letters:
            # Refused: the record of what the CRM holds stays as it was, so the next write of the person
            # carries the refused fields again (for a record never created, all of them).
            earlier = previous.get(dead.record) or {}
            fields, member = earlier.get("fields") or {}, held_member(earlier)
            doc = record_doc(
                mapping, dead.change, fields, member, DEAD_LETTERED, now, earlier, reason=dead.reason,
                crm_code=dead.crm_code, **unconfirmed(earlier),
            )  # fmt: skip
            out.put(RECORDS, dead.record, doc)
            out.put(DEAD_LETTERS, dead.record, {**dead.to_state(), "person_id": dead.change.person_id})
            out.delete(PENDING, dead.record)
            out.count(connection, "dead_lettered")
            log.warning("crm record dead-lettered", extra=dead.log_fields())
            if self.m_errors is not None:
                self.m_errors.add(1, {"connection": connection, "reason": dead.reason})
        for change in pending:
            # Not taken yet: the record keeps what the CRM holds, and what was sent (it may have landed); a
            # list membership keeps the one queued (a later change of it coalesces with the queued one).
            earlier = previous.get(change.record) or {}
            fields = earlier.get("fields") or {}
            member = intended.get(change.record, ({}, change.op != REMOVE))[1]
            doc = record_doc(
                mapping, change, fields, member, PENDING_STATE, now, earlier, held_member=held_member(earlier),
                **unconfirmed(earlier, change.fields),
            )  # fmt: skip
            out.put(RECORDS, change.record, doc)
            out.put(PENDING, change.record, change_doc(change, partition, attempts.get(change.record, 0) + 1))
            out.count(connection, "pending_retry")

    def _run_writes(self, partition: int, out: Outcomes) -> None:
        """This partition's share of each connection's stream run (summed by the API): one document per
        partition, so partitions never contend for one."""
        for connection, counters in out.counters.items():
            key = stream_run_key(connection, partition)
            out.writes[(RUNS, key)] = RunIncrement(key, connection, counters, out.now)  # type: ignore[assignment]

    # --- merges -------------------------------------------------------------------------------------

    async def merge_pending(self, partition: int, limit: int = 100) -> int:
        """The merges of persons this partition's batches recorded (`crm_merges`): each loser's record merged
        into the survivor's in every CRM. How many were done; one waiting (the survivor's record not in the
        CRM yet, the CRM failing) is tried again next round. Under the partition's lock (`retry_pending`)."""
        found = await self.store.find(MERGES, "partition", partition, limit=limit)
        done = 0
        for record in found:
            out = Outcomes(self.clock())
            survivor, loser = record.doc["survivor"], record.doc["loser"]
            try:
                complete = await self._merge(partition, survivor, loser, out)
            except Exception as exc:  # the store or a CRM failing: next round
                log.warning("merging crm records failed", extra={"partition": partition, "error": type(exc).__name__})
                complete = False
            if complete:
                out.delete(MERGES, record.key)
                done += 1
            self._run_writes(partition, out)
            await self.store.bulk_write(await resolve_writes(self.store, out.writes.values()))
        return done

    async def _merge_now(self, partition: int, survivor: str, loser: str, out: Outcomes) -> bool:
        """A merge's CRM work done in the batch that brings it, before the survivor's writes (`_merge`, only
        where the survivor's record is in the CRM already); True once every CRM is done."""
        try:
            return await self._merge(partition, survivor, loser, out, in_batch=True)
        except Exception as exc:  # the store or a CRM failing: the retrier's turn
            log.warning("merging crm records failed", extra={"partition": partition, "error": type(exc).__name__})
            return False

    async def _merge(self, partition: int, survivor: str, loser: str, out: Outcomes, *, in_batch: bool = False) -> bool:
        """Merge `loser`'s record of each record mapping (matched on the person id) into `survivor`'s; True
        once every CRM is done. `in_batch`: before the batch that brings the merge writes the survivor's
        records - a CRM where the survivor has no record yet waits (the batch may create it)."""
        complete = True
        for mapping in self.mappings.values():
            if mapping.kind != "record" or len(mapping.match) != 1 or mapping.match[0].source != PERSON_ID:
                continue
            field = mapping.match[0].crm_field
            lkey = record_key(mapping.name, ((field, loser),))
            lrec = await self.store.get(RECORDS, lkey)
            if lrec is None or lrec.doc.get("state") in (*ERASED, MERGED):
                continue
            ldoc = lrec.doc
            skey = record_key(mapping.name, ((field, survivor),))
            srec = await self.store.get(RECORDS, skey)
            sdoc = srec.doc if srec is not None else {}
            if in_batch and not sdoc.get("crm_id"):
                complete = False  # this batch may create the survivor's record: merged once it is committed
                continue
            if not ldoc.get("crm_id"):
                # Never in the CRM (refused, or its creation still queued): nothing there to merge.
                self._merged(out, lkey, ldoc, skey, kept=False)
                continue
            if not sdoc.get("crm_id"):
                if sdoc.get("state") == DEAD_LETTERED and await self.store.get(PENDING, skey) is None:
                    # Refused, so never on its way: waiting for it would never end (every round, for ever).
                    if not await self._adopt(partition, mapping, survivor, skey, sdoc, lkey, ldoc, out):
                        complete = False
                    continue
                if sdoc or await self.store.get(PENDING, skey) is not None:
                    complete = False  # the survivor's record is on its way to the CRM: merge after
                    continue
                # The survivor has no record there (out of the mapping's scope): the loser's stays, unsynced.
                self._merged(out, lkey, ldoc, skey, kept=True)
                continue
            if sdoc["crm_id"] == ldoc["crm_id"]:
                # A CRM user merged the survivor's record into the loser's first (inbound/news.py `_relink`): the
                # survivor takes the one record over, its match key written there.
                if sdoc.get("state") == MERGED and not await self._take_over(mapping, survivor, skey, sdoc, ldoc, out):
                    complete = False
                    continue
                self._merged(out, lkey, ldoc, skey, kept=False)
                continue
            if not await self._merge_records(partition, mapping, survivor, skey, sdoc, lkey, ldoc, out):
                complete = False
        return complete

    async def _merge_records(
        self, partition: int, mapping: ObjectMapping, survivor: str, skey: str, sdoc: dict[str, Any], lkey: str,
        ldoc: dict[str, Any], out: Outcomes,
    ) -> bool:  # fmt: skip
        """One CRM's two records of one person made one: HubSpot's merge; elsewhere what the survivor's record
        lacks is copied from the loser's, then the loser's is deleted (`on_merge: delete`) or left (`keep`)."""
        connection = self.connections[mapping.connection]
        adapter = self.deliverer.adapters[mapping.connection]
        budget = self.deliverer.budgets[mapping.connection]
        merge = getattr(adapter, "merge", None)
        if merge is not None:
            reservation = await budget.acquire(1, self.clock, self.clock() + 5.0)
            if reservation is None:
                return False
            merged, crm_id, headers = await merge(mapping, sdoc["crm_id"], ldoc["crm_id"])
            await budget.settle(reservation, self.clock(), headers, answered=merged is not None)
            if merged is None:
                return False
            if merged and crm_id and crm_id != sdoc["crm_id"]:
                out.put(RECORDS, skey, {**sdoc, "crm_id": crm_id})
            self._merged(out, lkey, ldoc, skey, kept=False)
            log.info("crm records of merged persons merged", extra={"mapping": mapping.name})
            return True
        lacking = await self._lacking(mapping, sdoc, ldoc)
        if lacking is None:
            return False  # the CRM could not be read: next round
        keep = connection.on_merge == "keep"
        if lacking:
            carry = Change(mapping.name, tuple((k, v) for k, v in sdoc["key"]), lacking, 0, UPSERT, survivor, MERGE)
            delivered = await self.deliverer.deliver(mapping, [carry], retry_for=min(5.0, self.deliverer.retry_for))
            self.record_outcome(partition, mapping, delivered, {}, {skey: sdoc}, out)
            if delivered.pending:
                return False
            if delivered.dead:
                keep = True  # what it holds could not be carried over: the loser's record stays
        if not keep:
            gone = Change(mapping.name, tuple((k, v) for k, v in ldoc["key"]), {}, 0, DELETE, ldoc["person_id"], MERGE)
            delivered = await self.deliverer.deliver(mapping, [gone], retry_for=min(5.0, self.deliverer.retry_for))
            if delivered.pending:
                return False
            keep = bool(delivered.dead)
        self._merged(out, lkey, ldoc, skey, kept=keep)
        log.info("crm records of merged persons merged", extra={"mapping": mapping.name, "kept": keep})
        return True

    async def _adopt(
        self, partition: int, mapping: ObjectMapping, survivor: str, skey: str, sdoc: dict[str, Any], lkey: str,
        ldoc: dict[str, Any], out: Outcomes,
    ) -> bool:  # fmt: skip
        """A merge whose survivor has no record in the CRM because the CRM refused its first write as a
        duplicate of the loser's record (HubSpot: 409, a contact holds its email, "Existing ID: <id>"): the
        loser's record becomes the survivor's - its match key stamped with the survivor's id (an update by CRM
        id, which never creates one), then the survivor's refused write sent again, landing on it. Refused
        for another reason or a record other than the loser's, the merge ends with the loser's record kept
        (logged once): no merge waits on a record that will not come. True once settled; False when the CRM
        failed (next round)."""
        letter = await self.store.get(DEAD_LETTERS, skey)
        dead = DeadLetter.from_state(letter.doc) if letter is not None else None
        field = mapping.match[0].crm_field
        if dead is None or dead.reason != DUPLICATE or not _duplicate_of(dead, ldoc, field):
            log.warning(
                "crm merge ends with the loser's record kept: the survivor's record was refused",
                extra={"mapping": mapping.name, "reason": sdoc.get("reason") or "", "crm_code": sdoc.get("crm_code")},
            )
            self._merged(out, lkey, ldoc, skey, kept=True)
            return True
        adapter = self.deliverer.adapters[mapping.connection]
        update = getattr(adapter, "erase", None)  # with fields: written to the records by CRM id, none created
        budget = self.deliverer.budgets[mapping.connection]
        if update is None or self.deliverer.resting(mapping.connection):
            return False
        reservation = await budget.acquire(1, self.clock, self.clock() + 5.0)
        if reservation is None:
            return False
        done, headers = await update(mapping, [str(ldoc["crm_id"])], {field: survivor})
        await budget.settle(reservation, self.clock(), headers, answered=done is not None)
        if not done:
            return False
        change = dead.replay()
        view = (await self._views({survivor}))[survivor]
        current = proj.project(mapping, view.source(survivor))
        if isinstance(current, proj.Projection):  # re-projected, as a replay: the view may be newer
            change.fields = {**change.fields, **current.fields}
        delivered = await self.deliverer.deliver(mapping, [change], retry_for=min(5.0, self.deliverer.retry_for))
        self.record_outcome(partition, mapping, delivered, {}, {skey: sdoc}, out)
        self._merged(out, lkey, ldoc, skey, kept=False)
        log.info("crm record of a merged person adopted by the survivor", extra={"mapping": mapping.name})
        return True

    async def _lacking(self, mapping: ObjectMapping, sdoc: dict[str, Any], ldoc: dict[str, Any]) -> dict | None:
        """What the loser's record holds that the survivor's lacks: the mapped fields as the connector wrote
        them, and - Salesforce, read from both records - the fields a CRM user fills in that the inbound side
        reports (a phone, a title). None when the CRM could not be read."""
        keys = {k for k, _ in ldoc["key"]}
        held, theirs = dict(sdoc.get("fields") or {}), dict(ldoc.get("fields") or {})
        connection = self.connections[mapping.connection]
        adapter = self.deliverer.adapters[mapping.connection]
        if connection.kind == "salesforce" and hasattr(adapter, "read"):
            names = sorted(
                {*(SALESFORCE_OBJECTS.get(mapping.object, ("", ()))[1]), *(fm.crm_field for fm in mapping.fields)}
                - keys
            )
            ids = (sdoc["crm_id"], ldoc["crm_id"])
            soql = f"SELECT Id, {', '.join(names)} FROM {mapping.object} WHERE Id IN ('{ids[0]}', '{ids[1]}')"
            answer = await adapter.read(
                "/query?q=" + urllib.parse.quote(soql), self.deliverer.budgets[mapping.connection], what="merge"
            )
            if answer.error is not None or not isinstance(answer.body, dict):
                return None
            rows = {str(r.get("Id")): r for r in answer.body.get("records") or [] if isinstance(r, dict)}
            for name in names:
                if ids[0] in rows:
                    held[name] = rows[ids[0]].get(name)
                if ids[1] in rows:
                    theirs[name] = rows[ids[1]].get(name)
        return {
            name: value
            for name, value in theirs.items()
            if name not in keys and value not in (None, "", False) and held.get(name) in (None, "", False)
        }

    async def _take_over(
        self, mapping: ObjectMapping, survivor: str, skey: str, sdoc: dict[str, Any], ldoc: dict[str, Any],
        out: Outcomes,
    ) -> bool:  # fmt: skip
        """Identity merged `survivor` and the loser after a CRM user merged their records into the loser's (the
        survivor's record reads `merged` into it): the survivor's match key is written on that record, by CRM
        id (an update never creating one), and the survivor's record is synced to it again, holding what the
        loser's held. False when the CRM did not answer (next round). A refusal leaves the survivor's record
        merged (written no more), logged."""
        adapter = self.deliverer.adapters[mapping.connection]
        budget = self.deliverer.budgets[mapping.connection]
        update = getattr(adapter, "update", None)
        field = mapping.match[0].crm_field
        if update is None:
            return True
        reservation = await budget.acquire(1, self.clock, self.clock() + 5.0)
        if reservation is None:
            return False
        results, headers = await update(mapping, [sdoc["crm_id"]], {field: survivor})
        await budget.settle(reservation, self.clock(), headers, answered=results is not None)
        if results is None:
            return False
        if results.get(sdoc["crm_id"]) is not None:
            log.warning("crm record merged in the crm not taken over", extra={"mapping": mapping.name})
            return True
        doc = {**sdoc, "state": SYNCED, "fields": dict(ldoc.get("fields") or {}), "updated_at": out.now}
        for name in ("merged_into", "merged_in_crm", "kept"):
            doc.pop(name, None)
        out.put(RECORDS, skey, doc)
        log.info("crm record merged in the crm taken over by the survivor", extra={"mapping": mapping.name})
        return True

    def _merged(self, out: Outcomes, lkey: str, ldoc: dict[str, Any], skey: str, *, kept: bool) -> None:
        """The loser's record document once merged: state `merged`, into the survivor's record; one kept in
        the CRM keeps its match key (an erasure of the person still reaches it), the others keep nothing."""
        doc = {**ldoc, "state": MERGED, "merged_into": skey, "kept": kept, "updated_at": out.now}
        doc.pop("sent", None)
        if not kept:
            doc.update(key=[], fields={})
        out.put(RECORDS, lkey, doc)
        out.delete(PENDING, lkey)
        out.delete(DEAD_LETTERS, lkey)

    # --- pending ------------------------------------------------------------------------------------

    async def retry_forever(self, engine, every: float) -> None:
        """Retry the queued changes of every partition `engine` owns until cancelled, the partitions side by
        side (each sends one request at a time; together they keep the account's budget busy): again at
        once while a round takes some (a backlog drains at the pace the budget allows); as soon as a batch
        of this process queued some is committed (`backlog`: the budget would idle meanwhile); else every
        `every` seconds."""

        async def retry(partition: int, idle: asyncio.Event) -> int:
            try:
                return await self.retry_pending(partition, idle=idle)
            except Exception as exc:  # the store or a CRM failing: the changes stay queued for next time
                log.warning(
                    "retrying queued crm changes failed", extra={"partition": partition, "error": type(exc).__name__}
                )
                return 0

        while True:
            pipelines = {p: engine.pipelines.get(p) for p in sorted(engine.owned())}
            rounds = [retry(p, pipeline.idle) for p, pipeline in pipelines.items() if pipeline is not None]
            taken = sum(await asyncio.gather(*rounds))
            if taken:
                continue
            if self.backlog & set(pipelines):
                await asyncio.sleep(min(every, BACKLOG_POLL))  # its batch is still being committed
            else:
                self.queued.clear()
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns a wake-up that lands in the
                # loop turn of a cancellation and swallows the cancellation (a stop then waited for ever).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(every):
                        await self.queued.wait()

    async def retry_pending(self, partition: int, *, idle: asyncio.Event | None = None, limit: int = 1000) -> int:
        """Send this partition's queued changes again; returns how many were taken (written or refused)."""
        async with self.locks[partition]:
            if idle is not None and not idle.is_set():
                return 0  # a batch is being written: its changes supersede what is queued; next time
            self.backlog.discard(partition)
            merged = await self.merge_pending(partition)
            records = await self.store.find(PENDING, "partition", partition, limit=limit)
            if not records:
                return merged
            out = Outcomes(self.clock())
            previous = await self.store.get_many(RECORDS, [r.key for r in records])
            # As a batch's: the records' puts expect the versions read here (a relink landing while a queued
            # change is at the CRM fails the round's write; the changes stay queued, and the next round
            # reads the record merged and drops them).
            out.versions = {r.key: previous[r.key].version if r.key in previous else 0 for r in records}
            by_mapping: dict[str, list[Change]] = defaultdict(list)
            attempts = {r.key: r.doc.get("attempts", 1) for r in records}
            dropped = 0
            for record in records:
                change = change_from_doc(record.doc)
                stored = previous.get(record.key)
                if stored is not None and stored.doc.get("state") == MERGED:
                    # Queued before its record was merged into another (identity's merge, or a CRM user's:
                    # inbound/news.py `_relink`): sent by its own key it would make the record again.
                    out.delete(PENDING, record.key)
                    dropped += 1
                    continue
                if change.mapping in self.mappings:
                    by_mapping[change.mapping].append(change)
            if dropped:
                log.info(
                    "queued crm changes of merged records dropped", extra={"partition": partition, "records": dropped}
                )
            intended = {k: (p.doc.get("fields", {}), p.doc.get("member")) for k, p in previous.items() if p is not None}
            prev = {k: p.doc for k, p in previous.items()}

            async def retry(names: list[str]) -> int:
                taken = 0
                for name in names:
                    mapping, changes = self.mappings[name], by_mapping[name]
                    deadline = self.clock() + min(5.0, self.deliverer.retry_for)
                    if not await self.read_first(mapping, changes, deadline):
                        continue  # still queued: the CRM's news first
                    if mapping.kind == "record" and self.identifiers is not None:
                        # A queued record never written may be one a CRM user made (its person's identifiers
                        # name it): claimed first, as in a batch; still queued while profile does not answer.
                        changes = await self._claimed(
                            partition, mapping, changes, intended, prev, out, attempts, deadline
                        )
                        if not changes:
                            continue
                    # A few seconds for the budget: a backlog waits its turn in the account's window rather
                    # than failing the round at once (the pipeline is idle; a new batch waits at most this long).
                    retry_for = min(5.0, self.deliverer.retry_for)
                    delivered = await self.deliverer.deliver(mapping, changes, retry_for=retry_for)
                    self.record_outcome(partition, mapping, delivered, intended, prev, out, attempts)
                    taken += len(delivered.synced) + len(delivered.dead)
                return taken

            # Each connection on its own, as a batch's (`deliver_planned`): a CRM that hangs does not hold up
            # the other CRMs' queued changes.
            taken = sum(await self._side_by_side(retry, by_mapping))
            self._run_writes(partition, out)
            await self.store.bulk_write(await resolve_writes(self.store, out.writes.values()))
            return taken


def _duplicate_of(dead: DeadLetter, ldoc: dict[str, Any], key_field: str) -> bool:
    """Whether the CRM refused `dead` as a duplicate of the loser's record `ldoc`: the record its message
    names ("Existing ID: <id>", HubSpot; "with id: <id>", Salesforce) is the loser's; naming none, a value
    the refused write carries (not the match key) is one the loser's record holds."""
    named = re.search(r"(?:existing id|with id)\s*:\s*([\w-]+)", dead.crm_message or "", re.IGNORECASE)
    if named is not None:
        return named.group(1) == str(ldoc.get("crm_id"))
    held = {k: str(v).lower() for k, v in (ldoc.get("fields") or {}).items() if v not in (None, "")}
    return any(
        k != key_field and v not in (None, "") and held.get(k) == str(v).lower() for k, v in dead.change.fields.items()
    )


__all__ = [
    "COUNTERS",
    "SERVICE",
    "CrmLogic",
    "Input",
    "MappedPaths",
    "Outcomes",
    "Planned",
    "RunIncrement",
    "View",
    "action_source",
    "change_doc",
    "change_from_doc",
    "decode",
    "new_stream_run",
    "reads_fingerprint",
    "record_doc",
    "resolve_writes",
    "stream_run_key",
]
