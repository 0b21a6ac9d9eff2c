"""`privacy.deleted`: the person's records anonymised or deleted in every connected CRM, and a record of it.

Each connection's policy (`on_delete` in the connections document, else CDP_CRM_PRIVACY_POLICY) decides:

- `anonymise`: every record the connector wrote for the person (and for the persons merged into them) is
  sent again with each mapped field cleared, tasks and cases lose their mapped text; the records stay in
  the CRM under their opaque CDP id, carrying no personal data the CDP put there. A field the CRM's
  described schema marks required (Salesforce's Contact.LastName) gets `PLACEHOLDER` instead of nothing,
  which the CRM would refuse.
- `delete`: the records, tasks and cases are deleted through the CRM's own delete (Salesforce sObject
  Collections DELETE, HubSpot batch archive, Dataverse DELETE by alternate key, Zoho DELETE records); a
  record already gone counts as deleted.

Under both, list memberships are removed first. Each record's document in `crm_records` then becomes its
erasure record - state `anonymised` or `deleted`, the CRM id kept, the match key and values dropped - so
`GetRecordStatus` (`cdpctl crm record`) shows what was done; the person's view, queued changes and dead
letters (those of events the collector refused from their records too) are deleted, `crm_privacy/<request id>` records the policy and counts per connection (never
an identifier value), and the store is erased (`Store.erase`: no bytes of the deleted values left in its
files, the write-ahead log included). A tombstone per person (`crm_tombstones`, written with the first
attempt) makes the engine drop whatever reaches it for them afterwards: segmentation's exits follow the
deletion, and a profile change published before it may be sourced after it. Tombstones age out
(`TombstoneSweeper`): after CDP_CRM_TOMBSTONE_DAYS (35 by default, refused at start below the longest a
message for the person can still arrive - the dead-letter stream's 30 days, a dead letter being
replayable, or the CRM stream's CDP_CRM_RETENTION_DAYS) nothing for the person is left to drop, and every
replica deletes the older ones, a bounded page at a time, every `SWEEP_INTERVAL` seconds (metric
``cdp.crm.tombstones.swept``).

One durable consumer (`crm-privacy`) shared by the replicas, so each request is handled once. A CRM that
cannot take the changes yet, or refuses one (the record reads `dead_lettered` with the CRM's reason and
code until a later attempt is taken), makes the request come again later (redelivered with back-off,
then dead-lettered after `max_deliver` attempts) rather than being recorded as done; what other CRMs
already did is kept (their records are marked erased), so the retry only calls the CRM that is left. A
request already recorded is acknowledged without calling any CRM.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager

from opentelemetry import metrics

from cdp.privacy.v1 import privacy_pb2
from cdp_crm.delivery import Deliverer
from cdp_crm.domain.coalesce import DELETE, REMOVE, UPSERT, Change
from cdp_crm.domain.mapping import ObjectMapping
from cdp_crm.inbound.refused import letter_keys
from cdp_crm.state import (
    ANONYMISED,
    CURSORS,
    DEAD_LETTERED,
    DEAD_LETTERS,
    DELETED,
    ERASED,
    PENDING,
    PERSONS,
    PRIVACY,
    RECORDS,
    TOMBSTONES,
)
from cdp_kit.bus import ConsumerSpec, Delivery, partition_for, subjects
from cdp_kit.storage import Delete, Put, Store
from cdp_kit.storage.expiry import ExpirySweeper

log = logging.getLogger("cdp.crm.privacy")

SERVICE = "crm"
DONE_STAMP = 2**62  # newer than any stream position: the erasure wins over a change coalesced with it
PLACEHOLDER = "(deleted)"  # what an anonymised record holds in a field its CRM requires
SWEEP_INTERVAL = 3600.0  # seconds between two sweeps of the aged-out tombstones
DAY = 86_400.0


def consumer_spec() -> ConsumerSpec:
    return ConsumerSpec(
        stream=subjects.PRIVACY,
        durable=subjects.shared_durable(SERVICE, "privacy"),
        filter_subjects=(subjects.PRIVACY_DELETED,),
        batch_size=16,
        ack_wait=300.0,
        max_deliver=100,  # a CRM down for an hour must not turn an erasure into a dead letter
        backoff=(1.0, 5.0, 15.0, 60.0),
        description="crm: anonymise deleted persons in every connected CRM",
    )


class Privacy:
    def __init__(
        self,
        store: Store,
        mappings: dict[str, ObjectMapping],
        deliverer: Deliverer,
        *,
        retry_for: float = 30.0,
        clock: Callable[[], float] = time.time,
        settled: Callable[[int], AbstractAsyncContextManager] | None = None,
        partitions: int = 1,
        policies: Mapping[str, str] | None = None,
        default_policy: str = "anonymise",
        unstarted: Iterable[str] = (),
    ) -> None:
        self.policies = dict(policies or {})  # connection -> anonymise | delete
        # Connections not started (a credential variable unset): their records wait, as a CRM that is down.
        self.unstarted = frozenset(unstarted)
        self.default_policy = default_policy
        self.settled = settled  # CrmLogic.settled: an erasure never interleaves with a batch
        self.partitions = partitions
        self.store = store
        self.mappings = mappings
        self.deliverer = deliverer
        self.retry_for = retry_for
        self.clock = clock

    async def handle(self, batch: Sequence[Delivery]) -> None:
        for delivery in batch:
            try:
                request = privacy_pb2.PrivacyDeleted.FromString(delivery.data)
            except Exception:
                delivery.reject("invalid_payload", "not a PrivacyDeleted message")
                continue
            if not request.person_id:
                delivery.reject("invalid_request", "person_id: empty")
                continue
            if not await self.erase(request):
                delivery.retry("crm_erasure_not_done")

    async def erase(self, request: privacy_pb2.PrivacyDeleted) -> bool:
        """Anonymise and forget the request's persons; True once recorded as done."""
        if self.settled is None:
            return await self._erase(request)
        async with self.settled(partition_for(request.person_id, self.partitions)):
            return await self._erase(request)

    def policy(self, connection: str) -> str:
        return self.policies.get(connection, self.default_policy)

    async def _erase(self, request: privacy_pb2.PrivacyDeleted) -> bool:
        key = request.request_id or f"person-{request.person_id}"
        if await self.store.get(PRIVACY, key) is not None:
            return True
        persons = [request.person_id, *request.merged_person_ids]
        records = [r for pid in persons for r in await self.store.find(RECORDS, "person_id", pid, limit=10_000)]
        now = self.clock()
        done: dict[str, dict[str, int]] = defaultdict(dict)
        # The tombstones first, with whatever this attempt writes: from then on the engine drops the persons'
        # inputs, so nothing writes them to a CRM again while the erasure is retried.
        ops: list = [Put(TOMBSTONES, pid, {"at": now, "request": key}) for pid in persons]
        by_mapping: dict[str, list[Change]] = defaultdict(list)
        docs: dict[str, dict] = {}
        unreached = False
        for record in records:
            doc = record.doc
            connection = doc["connection"]
            if doc.get("state") in ERASED:  # done by an earlier attempt of this request (or another one)
                _count(done, connection, self.policy(connection), doc)
                continue
            if connection in self.unstarted:
                # Not started (its credentials are not set): the request is not done; it comes again.
                log.warning("crm erasure waits for a connection not started", extra={"connection": connection})
                unreached = True
                continue
            mapping = self.mappings.get(f"{connection}/{doc['mapping']}")
            if mapping is None:
                continue  # a mapping no longer configured: nothing to address it by
            docs[record.key] = doc
            change = erasure(mapping, record.key, doc, self.policy(connection))
            if change is None:  # nothing the CRM holds for it (a list it is not a member of)
                ops.append(Put(RECORDS, record.key, erased(doc, self.policy(connection), key, now)))
                continue
            by_mapping[mapping.name].append(change)
        complete = not unreached
        # Memberships go first (a list member must still exist to be removed), then tasks and cases, then
        # the records they are about.
        for name in sorted(by_mapping, key=lambda n: ORDER[self.mappings[n].kind]):
            mapping = self.mappings[name]
            policy = self.policy(mapping.connection)
            delivered = await self.deliverer.deliver(mapping, by_mapping[name], retry_for=self.retry_for)
            if delivered.pending:
                log.warning(
                    "crm erasure waits for the crm",
                    extra={"connection": mapping.connection, "pending": len(delivered.pending)},
                )
                complete = False
            for change, result in delivered.synced:
                doc = {**docs[change.record], "crm_id": result.crm_id or docs[change.record].get("crm_id")}
                tombstone = erased(doc, policy, key, now, removed=change.op == REMOVE)
                _count(done, mapping.connection, policy, tombstone)
                ops.append(Put(RECORDS, change.record, tombstone))
            for dead in delivered.dead:
                # Refused: the record keeps its document, marked with the CRM's reason and code, and the
                # request is not done: it comes again (after a fix, the next attempt is taken).
                log.warning("crm erasure refused for a record", extra=dead.log_fields())
                complete = False
                ops.append(Put(RECORDS, dead.record, {**docs[dead.record], "state": DEAD_LETTERED,
                                                       "reason": dead.reason, "crm_code": dead.crm_code}))  # fmt: skip
        # The view, queued changes and dead letters carry the person's values: a backfill, a retry or a replay
        # must not send them while the erasure waits for a CRM.
        ops += [Delete(PENDING, r.key) for r in records] + [Delete(DEAD_LETTERS, r.key) for r in records]
        # The letters of events the collector refused, read from these records: they name the CRM record.
        ops += [Delete(DEAD_LETTERS, k) for k in letter_keys((r.key, r.doc) for r in records).values()]
        ops += [Delete(PERSONS, pid) for pid in persons]
        # What the inbound side kept of each record (`crm_cursors/<connection>:<object>:<crm id>`: a digest
        # of the fields it reports, now and the time before): the record read again after the erasure is
        # no news (the poller skips erased records), so nothing of the values before it need stay.
        ops += [
            Delete(CURSORS, f"{r.doc['connection']}:{r.doc['object']}:{r.doc['crm_id']}")
            for r in records
            if r.doc.get("crm_id")
        ]
        if not complete:
            await self.store.bulk_write(ops)  # what is done stays done: the retry calls only what is left
            await self.store.erase()  # no bytes left of the values already erased
            return False
        policies = {c: self.policy(c) for c in done}
        ops.append(
            Put(
                PRIVACY,
                key,
                {
                    "policy": ",".join(sorted(set(policies.values()))) or self.default_policy,
                    "policies": policies,
                    "at": now,
                    "connections": dict(done),
                },
            )
        )
        await self.store.bulk_write(ops)
        await self.store.erase()  # the deletions are durable: leave no bytes of them in the store's files
        log.info("crm erasure done", extra={"records": len(records), "connections": len(done)})
        return True


ORDER = {"list": 0, "action": 1, "record": 2}


def _count(done: dict[str, dict[str, int]], connection: str, policy: str, tombstone: dict) -> None:
    counters = done[connection]
    if not counters:
        counters.update({"deleted": 0} if policy == "delete" else {"anonymised": 0})
        counters["removed"] = 0
    name = "removed" if tombstone.get("removed") else tombstone["state"]
    counters[name] = counters.get(name, 0) + 1


def erased(doc: dict, policy: str, request: str, now: float, *, removed: bool = False) -> dict:
    """A record's document once erased: what was done and when, the CRM id; no match key, no value."""
    return {
        "connection": doc["connection"], "mapping": doc["mapping"], "object": doc["object"],
        "person_id": doc.get("person_id", ""), "key": [], "fields": {}, "member": None,
        "state": DELETED if policy == "delete" else ANONYMISED, "removed": removed,
        "crm_id": doc.get("crm_id"), "synced_at": doc.get("synced_at", 0.0), "synced_stamp": 0,
        "erased_at": now, "request": request, "updated_at": now,
    }  # fmt: skip


def erasure(mapping: ObjectMapping, record: str, doc: dict, policy: str = "anonymise") -> Change | None:
    key = tuple((k, v) for k, v in doc["key"])
    if not key:
        return None
    if mapping.kind == "list":
        if not doc.get("member"):
            return None
        return Change(mapping.name, key, {}, DONE_STAMP, REMOVE, doc.get("person_id", ""), "privacy")
    if policy == "delete":
        return Change(mapping.name, key, {}, DONE_STAMP, DELETE, doc.get("person_id", ""), "privacy")
    fields = {
        fm.crm_field: PLACEHOLDER if fm.crm_field in mapping.required else None
        for fm in mapping.fields
        if fm.source is not None
    }
    if not fields:
        return None
    return Change(mapping.name, key, fields, DONE_STAMP, UPSERT, doc.get("person_id", ""), "privacy")


class TombstoneSweeper(ExpirySweeper):
    """Deletes the tombstones older than `days` (see the module docstring): by then nothing that still
    reaches the connector can be for the person. Only `crm_tombstones`: the erasure records and
    `crm_privacy/<request>` are what was done, and what makes a redelivered request find it done."""

    def __init__(
        self,
        store: Store,
        *,
        days: float,
        meter: metrics.Meter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        swept = (meter or metrics.get_meter("cdp.crm")).create_counter(
            "cdp.crm.tombstones.swept",
            unit="{tombstone}",
            description="privacy tombstones deleted once older than CDP_CRM_TOMBSTONE_DAYS",
        )
        super().__init__(store, TOMBSTONES, max_age=days * DAY, interval=SWEEP_INTERVAL, swept=swept, clock=clock)
