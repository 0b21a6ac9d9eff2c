"""`privacy.deleted`: the person's records anonymised or deleted in every connected CRM, and a record of it.

Each connection's policy (`on_delete` in the connections document, else CDP_CRM_PRIVACY_POLICY) decides:

- `anonymise`: every record the connector wrote for the person (and for the persons merged into them) is
  sent again with each mapped field cleared, tasks and cases lose their mapped text; the records stay in
  the CRM under their opaque CDP id, carrying no personal data the CDP put there. A field the CRM's
  described schema marks required (Salesforce's Contact.LastName) gets `PLACEHOLDER` instead of nothing,
  which the CRM would refuse. A record the CRM gave an id is written by that id (the adapter's `update`),
  which never creates one: a record a rep deleted meanwhile answers 404 and is done (an upsert by the match
  key made it again, holding only placeholders and the deleted person's id). One without an id (an
  adapter that gave none) is upserted by its match key as before.
- `delete`: the records, tasks and cases are deleted through the CRM's own delete (Salesforce sObject
  Collections DELETE, HubSpot batch archive, Dataverse DELETE by alternate key, Zoho DELETE records); a
  record already gone counts as deleted.

Records naming the person that the connector did not write (a rep's own contact of them) are searched for
by the person's email, phone and stamped match key in every CRM (HubSpot search, Salesforce SOQL in a
Composite body, Dataverse ``$filter`` in a ``$batch`` body, Zoho COQL; the values never in a request
line) and erased the same way (`Privacy._sweep`). Before a contact of the person is erased, the records CRM
users linked to it (HubSpot tickets by association, Salesforce Cases by ContactId or SuppliedEmail, Dataverse
incidents by customer, Zoho Cases by Related_To) that hold
their email or phone in a text field are deleted or have those fields replaced (`Privacy._linked`).

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

A store restored from a copy taken before a deletion no longer shows it, and this consumer is past its
notice: `notices.py` applies it again at start (`erase(restored=True)`: read first, nothing created).
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from opentelemetry import metrics

from cdp.privacy.v1 import privacy_pb2
from cdp_crm.delivery import Deliverer
from cdp_crm.domain.coalesce import DELETE, REMOVE, UPSERT, Change, record_key
from cdp_crm.domain.mapping import PERSON_ID, ObjectMapping
from cdp_crm.inbound.refused import letter_keys
from cdp_crm.state import (
    ANONYMISED,
    CURSORS,
    DEAD_LETTERED,
    DEAD_LETTERS,
    DELETED,
    ERASED,
    MERGED,
    PENDING,
    PERSONS,
    PRIVACY,
    RECORDS,
    TOMBSTONES,
)
from cdp_crm.writes import accepted
from cdp_kit.bus import ConsumerSpec, Delivery, partition_for, subjects
from cdp_kit.storage import Delete, Put, Store
from cdp_kit.storage.expiry import ExpirySweeper

log = logging.getLogger("cdp.crm.privacy")

SERVICE = "crm"
DONE_STAMP = 2**62  # newer than any stream position: the erasure wins over a change coalesced with it
PLACEHOLDER = "(deleted)"  # what an anonymised record holds in a field its CRM requires
SWEEP_INTERVAL = 3600.0  # seconds between two sweeps of the aged-out tombstones
DAY = 86_400.0
# The profile fields whose values name a person in a CRM record: searched for at an erasure.
IDENTIFYING = ("traits.email", "traits.phone")
SWEPT = "swept"  # in an erasure's kept identifiers: the connections searched through already
# In an erasure's kept identifiers: the connections whose linked records (tickets, cases) are done; and the
# `mapping` of a linked record's erasure record.
LINKED = "linked"


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

    async def erase(self, request: privacy_pb2.PrivacyDeleted, *, restored: bool = False) -> bool:
        """Anonymise and forget the request's persons; True once recorded as done. `restored`: the request
        was done before, and a store restored from before it brought the persons back (notices.py): what
        the CRMs hold is read first and only what still holds the persons' data is written - a record
        erased already is not written again, and no record is ever created."""
        if self.settled is None:
            return await self._erase(request, restored)
        async with self.settled(partition_for(request.person_id, self.partitions)):
            return await self._erase(request, restored)

    def policy(self, connection: str) -> str:
        return self.policies.get(connection, self.default_policy)

    async def _erase(self, request: privacy_pb2.PrivacyDeleted, restored: bool = False) -> bool:
        key = request.request_id or f"person-{request.person_id}"
        if not restored and await self.store.get(PRIVACY, key) is not None:
            return True
        persons = [request.person_id, *request.merged_person_ids]
        records = [r for pid in persons for r in await self.store.find(RECORDS, "person_id", pid, limit=10_000)]
        # What names the persons in a CRM record (their email and phone, as the connector knows them), read
        # before anything is erased: records no one synced (a rep's own contact of them) are searched by it.
        identifiers = await self.identifiers(key, persons, records)
        # Erased already by another request: nothing the connector writes has named them since (the
        # tombstones), so their match key is not searched for again.
        earlier = await self.store.get_many(TOMBSTONES, persons)
        again = len(earlier) == len(persons) and all(t.doc.get("request") != key for t in earlier.values())
        now = self.clock()
        done: dict[str, dict[str, int]] = defaultdict(dict)
        # The tombstones first, with whatever this attempt writes: from then on the engine drops the persons'
        # inputs, so nothing writes them to a CRM again while the erasure is retried.
        ops: list = [Put(TOMBSTONES, pid, {"at": now, "request": key}) for pid in persons]
        by_mapping: dict[str, list[Change]] = defaultdict(list)
        docs: dict[str, dict] = {}
        written: set[tuple[str, str, str]] = set()  # (connection, object, CRM id) this attempt erased
        # The tickets and cases CRM users made about the persons' contacts, first: deleting a contact drops its
        # associations. A connection whose linked records are not done keeps its contacts for the retry.
        blocked = await self._linked_first(request.person_id, records, identifiers, key, now, ops, done, written)
        unreached = bool(blocked)
        for record in records:
            doc = record.doc
            connection = doc["connection"]
            if doc.get("state") in ERASED:  # done by an earlier attempt of this request (or another one)
                _count(done, connection, self.policy(connection), doc)
                continue
            if connection in blocked:
                continue
            if doc.get("state") == MERGED and doc.get("merged_in_crm") and request.person_id == doc.get("person_id"):
                # A CRM user merged this person's record into another person's (inbound/news.py `_relink`): the
                # surviving record is theirs - erased with them, or as this person's once identity merged the
                # two (the survivor's record then reads as this one's). Nothing of it is erased here.
                ops.append(Put(RECORDS, record.key, erased(doc, self.policy(connection), key, now)))
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
            changes = by_mapping[name]
            adapter = self.deliverer.adapters.get(mapping.connection)
            # Anonymising a record the CRM gave an id: an update by that id, which never creates a record (an
            # upsert by the match key made one again, holding only placeholders, where a rep had deleted it).
            by_id = [c for c in changes if c.op == UPSERT and docs[c.record].get("crm_id")]
            if by_id and hasattr(adapter, "update"):
                changes = [c for c in changes if c not in by_id]
                if restored:
                    # Erased before the store was restored: the records still holding a value only.
                    left = await self._still_held(mapping, by_id, docs)
                    if left is None:
                        complete = False
                        by_id = []
                    else:
                        for change in (c for c in by_id if c not in left):
                            tombstone = erased(docs[change.record], policy, key, now)
                            _count(done, mapping.connection, policy, tombstone)
                            ops.append(Put(RECORDS, change.record, tombstone))
                        by_id = left
                if by_id and not await self._anonymise(mapping, by_id, docs, policy, key, now, ops, done, written):
                    complete = False
            if restored:
                # An upsert by the match key may create a record: a repeat never sends one (an anonymising
                # write of a record the CRM gave no id). The erasure before the restore wrote it.
                for change in (c for c in changes if c.op == UPSERT):
                    tombstone = erased(docs[change.record], policy, key, now)
                    _count(done, mapping.connection, policy, tombstone)
                    ops.append(Put(RECORDS, change.record, tombstone))
                changes = [c for c in changes if c.op != UPSERT]
            if not changes:
                continue
            delivered = await self.deliverer.deliver(mapping, changes, retry_for=self.retry_for)
            if delivered.pending:
                log.warning(
                    "crm erasure waits for the crm",
                    extra={"connection": mapping.connection, "pending": len(delivered.pending)},
                )
                complete = False
            for change, result in delivered.synced:
                doc = {**docs[change.record], "crm_id": result.crm_id or docs[change.record].get("crm_id")}
                if doc["crm_id"]:
                    written.add((mapping.connection, mapping.object.lower(), str(doc["crm_id"])))
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
        # Every other record naming them: found by their email, phone or the match key stamped with their id.
        if not await self._sweep(
            request.person_id, persons, records, identifiers, key, now, ops, done, not again, written, blocked
        ):
            complete = False
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
            # What is done stays done: the retry calls only what is left - with the identifiers to search by,
            # kept until then (the view and the records' values that held them are gone).
            ops.append(Put(PRIVACY, f"{key}:identifiers", identifiers))
            await self.store.bulk_write(ops)
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
        ops.append(Delete(PRIVACY, f"{key}:identifiers"))
        await self.store.bulk_write(ops)
        await self.store.erase()  # the deletions are durable: leave no bytes of them in the store's files
        log.info("crm erasure done", extra={"records": len(records), "connections": len(done)})
        return True

    async def _anonymise(
        self, mapping: ObjectMapping, changes: list[Change], docs: dict[str, dict], policy: str, request: str,
        now: float, ops: list, done: dict[str, dict[str, int]], written: set[tuple[str, str, str]],
    ) -> bool:  # fmt: skip
        """Clear the personal data of these records by their CRM ids (the adapter's `update`: HubSpot and
        Salesforce PATCH by id, Dataverse PATCH with ``If-Match: *``, Zoho Update Records), which never
        creates a record: a record gone already (404) is done - a rep deleted it, nothing of the person is
        left there. One refused keeps its document, marked with the CRM's reason and code, as a refused
        upsert's is. A request per record from the account's budget (per 100 for Dataverse and Zoho). False
        when the CRM failed or refused one: the request comes again."""
        adapter = self.deliverer.adapters[mapping.connection]
        ids = list(dict.fromkeys(str(docs[c.record]["crm_id"]) for c in changes))
        try:
            results = await self._metered(
                self.deliverer.budgets[mapping.connection],
                adapter.update(mapping, ids, dict(changes[0].fields)),
                units=len(ids),
            )
        except _Unanswered as why:
            log.warning(
                "crm erasure waits for the crm: %s; tried again",
                why,
                extra={"connection": mapping.connection, "pending": len(changes)},
            )
            return False
        complete = True
        for change in changes:
            doc = docs[change.record]
            crm_id = str(doc["crm_id"])
            if crm_id not in results:
                complete = False  # not answered for: the request comes again
                continue
            if (error := results[crm_id]) is not None:
                log.warning("crm erasure refused for a record", extra={"connection": mapping.connection,
                            "mapping": mapping.name, "reason": error.reason, "crm_code": error.code})  # fmt: skip
                complete = False
                ops.append(Put(RECORDS, change.record, {**doc, "state": DEAD_LETTERED, "reason": error.reason,
                                                        "crm_code": error.code}))  # fmt: skip
                continue
            written.add((mapping.connection, mapping.object.lower(), crm_id))
            tombstone = erased(doc, policy, request, now)
            _count(done, mapping.connection, policy, tombstone)
            ops.append(Put(RECORDS, change.record, tombstone))
        return complete

    async def _still_held(
        self, mapping: ObjectMapping, changes: list[Change], docs: dict[str, dict]
    ) -> list[Change] | None:
        """Of these anonymising changes (records with a CRM id), those whose record the CRM still holds with a
        value in a mapped field: read by the records' match keys (the adapter's `find`, a request per page,
        from the account's budget). A record gone (a rep deleted it) or holding cleared fields only (the
        erasure before the restore) is left alone. None when the CRM did not answer: the repeat comes again.
        An adapter that cannot search, or a match key of several fields: every change, as an erasure sends."""
        adapter = self.deliverer.adapters[mapping.connection]
        by_field: dict[str, list[str]] = defaultdict(list)
        for change in changes:
            key = docs[change.record].get("key") or []
            if len(key) != 1 or not hasattr(adapter, "find"):
                return changes
            field, value = key[0]
            by_field[field].append(str(value))
        cleared = _cleared(mapping)
        found: dict[str, dict] = {}
        try:
            for field, values in by_field.items():
                answer = await self._metered(
                    self.deliverer.budgets[mapping.connection], adapter.find(mapping, field, values, sorted(cleared))
                )
                found.update(answer)
        except _Unanswered as why:
            log.warning(
                "crm erasure check waits for the crm: %s; tried again", why, extra={"connection": mapping.connection}
            )
            return None
        return [
            c
            for c in changes
            if (props := found.get(str(docs[c.record]["crm_id"]))) is not None
            and any(props.get(f) not in (None, "", PLACEHOLDER) for f in cleared)
        ]

    async def identifiers(self, key: str, persons: list[str], records: list) -> dict[str, list[str]]:
        """The persons' values of `IDENTIFYING` fields the connector holds: in their views and in what it
        wrote to their records (a mapping's field filled from one), plus those an earlier attempt kept."""
        found: dict[str, set[str]] = {path: set() for path in IDENTIFYING}
        found[SWEPT] = set()  # the connections an earlier attempt searched through already
        kept = await self.store.get(PRIVACY, f"{key}:identifiers")
        for path, values in (kept.doc if kept is not None else {}).items():
            found.setdefault(path, set()).update(values)
        for view in (await self.store.get_many(PERSONS, persons)).values():
            for path in IDENTIFYING:
                value = (view.doc.get("fields") or {}).get(path)
                if isinstance(value, str) and value.strip():
                    found[path].add(value.strip())
        for record in records:
            mapping = self.mappings.get(f"{record.doc['connection']}/{record.doc['mapping']}")
            for fm in mapping.fields if mapping is not None else ():
                value = (record.doc.get("fields") or {}).get(fm.crm_field)
                if fm.source in IDENTIFYING and isinstance(value, str) and value.strip():
                    found[fm.source].add(value.strip())
        return {path: sorted(values) for path, values in found.items()}

    async def _sweep(
        self, person_id: str, persons: list[str], records: list, identifiers: dict[str, list[str]], request: str,
        now: float, ops: list, done: dict[str, dict[str, int]], by_key: bool = True,
        written: set[tuple[str, str, str]] = frozenset(), blocked: frozenset[str] | set[str] = frozenset(),
    ) -> bool:  # fmt: skip
        """Erase, by the connection's policy, every record of a record mapping's object that names the persons
        and that the connector did not write for them: found by a field the mapping fills from their email or
        phone, or by its match key holding their id (HubSpot search, Salesforce SOQL; a request per lookup
        from the account's budget; Dataverse and Zoho as the adapters' `find` say). A record holding another
        person's match key is theirs and left alone.
        Each one erased gets an erasure record (`crm_records`, keyed by mapping and CRM id) like those the
        connector wrote: the inbound side then drops what a CRM user does to it (no new person of the deleted
        one). `by_key`: search the match key too (not for persons another request erased already). `written`:
        the records this attempt erased already, each counted once. `blocked`: connections whose linked
        records are not done (left for the retry). Before a contact found is erased, the tickets and cases
        linked to it that name the person are (`_linked`). False
        when a CRM failed: the request comes again, and searches only the connections left."""
        known = {
            (r.doc["connection"], str(r.doc.get("object", "")).lower(), str(r.doc["crm_id"]))
            for r in records
            if r.doc.get("crm_id")
        } | set(written)
        swept: set[tuple[str, str]] = set()  # (connection, object): one search of each
        before = set(identifiers.get(SWEPT, ()))
        failed: set[str] = set()
        for mapping in self.mappings.values():
            connection = mapping.connection
            place = (connection, mapping.object.lower())
            adapter = self.deliverer.adapters.get(connection)
            if mapping.kind != "record" or place in swept or connection in self.unstarted or adapter is None:
                continue
            if connection in before:
                continue  # an earlier attempt of this request searched it: the retry calls only what is left
            if connection in blocked:
                failed.add(connection)
                continue
            if not hasattr(adapter, "find") or not hasattr(adapter, "erase"):
                continue  # an adapter that cannot search: the records the connector wrote only
            swept.add(place)
            holder = next((fm.crm_field for fm in mapping.match if fm.source == PERSON_ID), None)
            lookups = [
                (fm.crm_field, identifiers.get(fm.source, [])) for fm in mapping.fields if fm.source in IDENTIFYING
            ]
            if holder is not None and by_key:
                lookups.append((holder, persons))
            policy = self.policy(connection)
            budget = self.deliverer.budgets[connection]
            targets: list[str] = []
            try:
                for field, values in lookups:
                    if not values:
                        continue
                    found = await self._metered(
                        budget, adapter.find(mapping, field, values, [holder] if holder else [])
                    )
                    for crm_id, props in found.items():
                        held = str(props.get(holder) or "") if holder else ""
                        if (connection, place[1], crm_id) in known or (held and held not in persons):
                            continue
                        if crm_id not in targets:
                            targets.append(crm_id)
                if targets:
                    if hasattr(adapter, "linked"):
                        contacts = [(mapping.object, t) for t in targets]
                        await self._linked(
                            connection, adapter, contacts, [], identifiers, known, person_id, request, now, ops,
                            done, written,
                        )  # fmt: skip
                    fields = None if policy == "delete" else _cleared(mapping)
                    await self._metered(budget, adapter.erase(mapping, targets, fields))
            except _Unanswered as why:
                log.warning(
                    "crm erasure search waits for the crm: %s; tried again", why, extra={"connection": connection}
                )
                failed.add(connection)
                continue
            for crm_id in targets:
                doc = {"connection": connection, "mapping": mapping.id, "object": mapping.object,
                       "person_id": person_id, "crm_id": crm_id}  # fmt: skip
                tombstone = {**erased(doc, policy, request, now), "found": "search"}
                _count(done, connection, policy, tombstone)
                ops.append(Put(RECORDS, record_key(mapping.name, (("crm_id", crm_id),)), tombstone))
            if targets:
                log.info("crm records naming an erased person erased", extra={"connection": connection,
                         "records": len(targets)})  # fmt: skip
        identifiers[SWEPT] = sorted(before | ({c for c, _ in swept} - failed))
        return not failed

    async def _linked_first(
        self, person_id: str, records: list, identifiers: dict[str, list[str]], request: str, now: float, ops: list,
        done: dict[str, dict[str, int]], written: set[tuple[str, str, str]],
    ) -> set[str]:  # fmt: skip
        """`_linked` in every connection whose adapter reads linked records, for the contacts the connector
        knows of the persons (the records it wrote, those an earlier attempt's search found) and by their
        emails. The connections where it failed: their contacts are left for the retry (deleting one drops
        its associations). A connection done by an earlier attempt of this request is not read again."""
        before = set(identifiers.get(LINKED, ()))
        if not any(identifiers.get(path) for path in IDENTIFYING):
            return set()  # nothing to know them by in a text (erased by an earlier request): nothing to read
        known = {
            (r.doc["connection"], str(r.doc.get("object", "")).lower(), str(r.doc["crm_id"]))
            for r in records
            if r.doc.get("crm_id")
        }
        blocked: set[str] = set()
        for connection, adapter in self.deliverer.adapters.items():
            if connection in before or connection in self.unstarted or not hasattr(adapter, "linked"):
                continue
            sources = {obj.lower(): obj for obj in adapter.LINKED}
            contacts = [
                (sources[str(r.doc.get("object", "")).lower()], str(r.doc["crm_id"]))
                for r in records
                if r.doc["connection"] == connection and r.doc.get("crm_id") and r.doc.get("mapping") != LINKED
                and str(r.doc.get("object", "")).lower() in sources
            ]  # fmt: skip
            try:
                await self._linked(
                    connection, adapter, list(dict.fromkeys(contacts)), identifiers.get("traits.email", []),
                    identifiers, known, person_id, request, now, ops, done, written,
                )  # fmt: skip
            except _Unanswered as why:
                log.warning(
                    "crm erasure of linked records waits for the crm: %s; tried again",
                    why,
                    extra={"connection": connection},
                )
                blocked.add(connection)
                continue
            before.add(connection)
        identifiers[LINKED] = sorted(before)
        return blocked

    async def _linked(
        self, connection: str, adapter, contacts: list[tuple[str, str]], emails: list[str],
        identifiers: dict[str, list[str]], known: set[tuple[str, str, str]], person_id: str, request: str,
        now: float, ops: list, done: dict[str, dict[str, int]], written: set[tuple[str, str, str]],
    ) -> None:  # fmt: skip
        """Erase, by the connection's policy, the records CRM users made about these contacts ((object, CRM
        id) each) - HubSpot tickets associated with them, Salesforce Cases of them or raised from one of
        `emails`, Dataverse incidents and Zoho Cases of them (the adapter's `linked`) - that hold the person's email or phone in a text field: deleted, or
        those fields replaced (the adapter's `linked_fields`), by CRM id, so nothing is created. A record
        naming them nowhere is left alone; one the connector wrote (`known`) is erased as its mapping says.
        Each erased gets an erasure record (`crm_records`, found `linked`), counted. Raises `_Unanswered`
        when the CRM failed or refused one: the request comes again."""
        if not any(identifiers.get(path) for path in IDENTIFYING):
            return
        budget = self.deliverer.budgets[connection]
        found = await adapter.linked(contacts, emails, lambda call: self._metered(budget, call))
        names = _naming(identifiers)
        policy = self.policy(connection)
        targets: list[tuple[str, str, dict]] = []
        for obj, crm_id, properties in found:
            place = (connection, obj.lower(), crm_id)
            if place in known or place in written:
                continue
            fields = adapter.linked_fields(obj, properties, names)
            if fields:
                targets.append((obj, crm_id, fields))

        def erased_one(obj: str, crm_id: str) -> None:
            doc = {"connection": connection, "mapping": LINKED, "object": obj, "person_id": person_id,
                   "crm_id": crm_id}  # fmt: skip
            tombstone = {**erased(doc, policy, request, now), "found": LINKED}
            _count(done, connection, policy, tombstone)
            written.add((connection, obj.lower(), crm_id))
            ops.append(Put(RECORDS, record_key(f"{connection}/{LINKED}:{obj}", (("crm_id", crm_id),)), tombstone))

        if policy == "delete":
            by_object: dict[str, list[str]] = defaultdict(list)
            for obj, crm_id, _ in targets:
                by_object[obj].append(crm_id)
            for obj, ids in by_object.items():
                for start in range(0, len(ids), adapter.batch_limit):
                    chunk = ids[start : start + adapter.batch_limit]
                    await self._metered(budget, adapter.erase_in(obj, chunk, None))
                    for crm_id in chunk:
                        erased_one(obj, crm_id)
        else:
            for obj, crm_id, fields in targets:
                await self._metered(budget, adapter.erase_in(obj, [crm_id], fields))
                erased_one(obj, crm_id)
        if targets:
            log.info("crm records linked to an erased person erased", extra={"connection": connection,
                     "records": len(targets)})  # fmt: skip

    async def _metered(self, budget, call, units: int = 1):
        """`units` requests from the account's budget: its answer, or `_Unanswered` (no budget in time, an
        error)."""
        reservation = await budget.acquire(units, self.deliverer.clock, self.deliverer.clock() + self.retry_for)
        if reservation is None:
            call.close()
            raise _Unanswered("the connection's API budget had no room in time (its rate limit)")
        answer, headers = await call
        await budget.settle(reservation, self.deliverer.clock(), headers, answered=answer is not None)
        if answer is None:
            raise _Unanswered("the CRM refused or failed the call (a 429 rate limit, a 5xx, a timeout)")
        return answer


class _Unanswered(Exception):
    """A CRM lookup or erasure that did not happen (an error, or no budget in time)."""


def _naming(identifiers: Mapping[str, Sequence[str]]) -> Callable[[Any], bool]:
    """Whether a CRM text names the person: holds one of their emails (any case), or one of their phone
    numbers written with or without spaces, dashes, dots, brackets or a leading +."""
    emails = [e.lower() for e in identifiers.get("traits.email", ()) if e]
    phones = [d for p in identifiers.get("traits.phone", ()) if len(d := re.sub(r"\D", "", p)) >= 6]

    def names(value: Any) -> bool:
        if not isinstance(value, str) or not value:
            return False
        text = value.lower()
        if any(email in text for email in emails):
            return True
        squeezed = re.sub(r"[\s\-.()+/]", "", text)
        return any(phone in squeezed for phone in phones)

    return names


def _cleared(mapping: ObjectMapping) -> dict:
    """The mapping's fields as an anonymised record holds them (`erasure`)."""
    return {
        fm.crm_field: PLACEHOLDER if fm.crm_field in mapping.required else None
        for fm in mapping.fields
        if fm.source is not None
    }


ORDER = {"list": 0, "action": 1, "record": 2}


def _count(done: dict[str, dict[str, int]], connection: str, policy: str, tombstone: dict) -> None:
    counters = done[connection]
    if not counters:
        counters.update({"deleted": 0} if policy == "delete" else {"anonymised": 0})
        counters["removed"] = 0
    name = "removed" if tombstone.get("removed") else tombstone["state"]
    counters[name] = counters.get(name, 0) + 1
    if tombstone.get("found") == LINKED:  # a ticket or case a CRM user made about the person: counted apart too
        counters[LINKED] = counters.get(LINKED, 0) + 1


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
    if not accepted(doc):
        # Never taken by the CRM (refused, or not sent yet): nothing there to anonymise, and an upsert by
        # the match key would create a record holding the deleted person's id.
        return None
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
