"""`privacy.deleted`: the person's records anonymised in every connected CRM, and a record that it was done.

Policy `anonymise` (the only one so far): every record the connector wrote for the person (and for the
persons merged into them) is sent again with each mapped field cleared, list memberships are removed and
tasks or cases lose their mapped text; the records stay in the CRM under their opaque CDP id, carrying no
personal data the CDP put there. Then the connector forgets the person: its view, record states, queued
changes and dead letters are deleted, and `crm_privacy/<request id>` records what was done per
connection (counts and when - never an identifier value).

One durable consumer (`crm-privacy`) shared by the replicas, so each request is handled once. A CRM that
cannot take the changes yet makes the request come again later (redelivered with back-off) rather than
being recorded as done; a request already recorded is acknowledged without calling any CRM again.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager

from cdp.privacy.v1 import privacy_pb2
from cdp_crm.delivery import Deliverer
from cdp_crm.domain.coalesce import REMOVE, UPSERT, Change
from cdp_crm.domain.mapping import ObjectMapping
from cdp_crm.state import DEAD_LETTERS, PENDING, PERSONS, PRIVACY, RECORDS
from cdp_kit.bus import ConsumerSpec, Delivery, partition_for, subjects
from cdp_kit.storage import Delete, Put, Store

log = logging.getLogger("cdp.crm.privacy")

SERVICE = "crm"
DONE_STAMP = 2**62  # newer than any stream position: the erasure wins over a change coalesced with it


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
    ) -> None:
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
                delivery.retry("crm_unavailable")

    async def erase(self, request: privacy_pb2.PrivacyDeleted) -> bool:
        """Anonymise and forget the request's persons; True once recorded as done."""
        if self.settled is None:
            return await self._erase(request)
        async with self.settled(partition_for(request.person_id, self.partitions)):
            return await self._erase(request)

    async def _erase(self, request: privacy_pb2.PrivacyDeleted) -> bool:
        key = request.request_id or f"person-{request.person_id}"
        if await self.store.get(PRIVACY, key) is not None:
            return True
        persons = [request.person_id, *request.merged_person_ids]
        records = [r for pid in persons for r in await self.store.find(RECORDS, "person_id", pid, limit=10_000)]
        by_mapping: dict[str, list[Change]] = defaultdict(list)
        for record in records:
            doc = record.doc
            mapping = self.mappings.get(f"{doc['connection']}/{doc['mapping']}")
            if mapping is None:
                continue  # a mapping no longer configured: nothing to address it by
            change = erasure(mapping, record.key, doc)
            if change is not None:
                by_mapping[mapping.name].append(change)
        done: dict[str, dict[str, int]] = defaultdict(lambda: {"anonymised": 0, "removed": 0})
        for name, changes in by_mapping.items():
            mapping = self.mappings[name]
            delivered = await self.deliverer.deliver(mapping, changes, retry_for=self.retry_for)
            if delivered.pending:
                log.warning(
                    "crm erasure waits for the crm",
                    extra={"connection": mapping.connection, "pending": len(delivered.pending)},
                )
                return False
            for change, _ in delivered.synced:
                done[mapping.connection]["removed" if change.op == REMOVE else "anonymised"] += 1
            for dead in delivered.dead:
                log.warning("crm erasure refused for a record", extra=dead.log_fields())
                done[mapping.connection]["refused"] = done[mapping.connection].get("refused", 0) + 1
        ops = [Delete(RECORDS, r.key) for r in records]
        ops += [Delete(PENDING, r.key) for r in records] + [Delete(DEAD_LETTERS, r.key) for r in records]
        ops += [Delete(PERSONS, pid) for pid in persons]
        ops.append(Put(PRIVACY, key, {"policy": "anonymise", "at": self.clock(), "connections": dict(done)}))
        await self.store.bulk_write(ops)
        log.info("crm erasure done", extra={"records": len(records), "connections": len(done)})
        return True


def erasure(mapping: ObjectMapping, record: str, doc: dict) -> Change | None:
    key = tuple((k, v) for k, v in doc["key"])
    if mapping.kind == "list":
        if not doc.get("member"):
            return None
        return Change(mapping.name, key, {}, DONE_STAMP, REMOVE, doc.get("person_id", ""), "privacy")
    fields = {fm.crm_field: None for fm in mapping.fields if fm.source is not None}
    if not fields:
        return None
    return Change(mapping.name, key, fields, DONE_STAMP, UPSERT, doc.get("person_id", ""), "privacy")
