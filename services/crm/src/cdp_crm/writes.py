"""What a batch writes: the changes it plans per record (`Planned`), the record states, dead letters and
pending changes a delivery produced (`Outcomes`, `record_doc`, `change_doc`) and the stream run counters
(`RunIncrement`, resolved by `resolve_writes`). Re-exported by `cdp_crm.engine`."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cdp_crm.domain import projection as proj
from cdp_crm.domain.coalesce import REMOVE, Change, Coalescer, Link, record_key
from cdp_crm.domain.mapping import ObjectMapping
from cdp_crm.inputs import Input
from cdp_crm.state import MERGED, PENDING_STATE, RECORDS, RUNS
from cdp_kit.storage import Delete, Put, Store, WriteOp

COUNTERS = ("created", "updated", "unchanged", "skipped", "dead_lettered", "pending_retry", "api_units")


class Outcomes:
    """The record states, dead letters and pending changes a delivery produced, as store writes.

    `versions` (record key -> the version of its `crm_records` document the batch read, 0: none): a record
    put is then a compare-and-set on it. A write landing between the batch's read and its commit - the
    relink of a merge made in the CRM (inbound/news.py `_relink`, from the poller, maybe another
    replica's), an erasure - makes the commit fail whole (a bulk write is atomic) instead of being
    overwritten with what the batch computed from the record as it read it; the engine applies the batch
    again from what the store holds then (its writes to the CRM are upserts by the same keys)."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.writes: dict[tuple[str, str], WriteOp] = {}
        self.counters: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNTERS, 0))
        self.versions: Mapping[str, int] = {}

    def put(self, collection: str, key: str, doc: dict[str, Any]) -> None:
        expected = self.versions.get(key) if collection == RECORDS else None
        self.writes[(collection, key)] = Put(collection, key, doc, expected_version=expected)

    def delete(self, collection: str, key: str) -> None:
        self.writes[(collection, key)] = Delete(collection, key)

    def count(self, connection: str, name: str, n: int = 1) -> None:
        self.counters[connection][name] += n


def record_doc(
    mapping: ObjectMapping, change: Change, intended: Mapping[str, Any], member: bool | None, state: str, now: float,
    previous: Mapping[str, Any] | None = None, **extra: Any,
) -> dict[str, Any]:  # fmt: skip
    previous = previous or {}
    return {
        "connection": mapping.connection,
        "mapping": mapping.id,
        "object": mapping.object,
        "person_id": change.person_id,
        "key": [list(k) for k in change.key],
        "fields": dict(intended),
        "member": member,
        "state": state,
        "crm_id": extra.pop("crm_id", None) or previous.get("crm_id"),
        "synced_at": extra.pop("synced_at", previous.get("synced_at", 0.0)),
        "synced_stamp": extra.pop("synced_stamp", previous.get("synced_stamp", 0)),
        "updated_at": now,
        **extra,
    }


def accepted(doc: Mapping[str, Any] | None) -> bool:
    """Whether the CRM ever took a write of this record (a record document's `fields` are what it took
    last): a record only ever refused or still queued does not exist in the CRM."""
    return bool(doc) and bool(doc.get("crm_id") or doc.get("synced_at") or doc.get("synced_stamp"))


def held_member(doc: Mapping[str, Any]) -> bool | None:
    """The list membership the CRM holds for a record: a queued change's record keeps the queued one as
    `member` (a later change coalesces with it) and what the CRM holds as `held_member`."""
    if doc.get("state") == PENDING_STATE:
        return doc.get("held_member", doc.get("member"))
    return doc.get("member")


# How many values per field a record keeps of those sent and not confirmed yet (most recent kept).
SENT_KEPT = 4


def unconfirmed(earlier: Mapping[str, Any], sending: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`sent` for a record document whose write was not confirmed (queued or refused): per CRM field, the
    values the connector sent since the CRM last confirmed a write of the record - `earlier`'s, with the
    ones `sending` carried. A write whose answer was lost (a timeout, a connection dropped after the CRM
    committed it) may well have landed: the inbound side counts a CRM value among them as the CDP's own
    write, not a CRM user's edit (`inbound/news.py`). A confirmed write's document drops them. Empty:
    nothing to keep (as keyword arguments of `record_doc`)."""
    sent = {name: list(values) for name, values in (earlier.get("sent") or {}).items()}
    for name, value in (sending or {}).items():
        values = [v for v in sent.get(name, []) if v != value]
        sent[name] = [*values, value][-SENT_KEPT:]
    return {"sent": sent} if sent else {}


def change_from_doc(doc: Mapping[str, Any]) -> Change:
    link = doc.get("link")
    return Change(
        doc["mapping"], tuple((k, v) for k, v in doc["key"]), dict(doc["fields"]), doc["stamp"], doc["op"],
        doc["person_id"], doc["trigger"],
        None if link is None else Link(link["object"], tuple((k, v) for k, v in link["key"]), link["field"]),
    )  # fmt: skip


def change_doc(change: Change, partition: int, attempts: int = 1) -> dict[str, Any]:
    link = change.link
    return {
        "mapping": change.mapping,
        "key": [list(k) for k in change.key],
        "fields": change.fields,
        "stamp": change.stamp,
        "op": change.op,
        "person_id": change.person_id,
        "trigger": change.trigger,
        "link": None
        if link is None
        else {"object": link.object, "key": [list(k) for k in link.key], "field": link.field},
        "partition": partition,
        # Indexed: the stream run's pending figure counts what is queued for a connection now (api.py).
        "connection": change.mapping.partition("/")[0],
        "attempts": attempts,
    }


class Planned:
    """The changes a batch plans, coalesced per record, with what each record should hold afterwards."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.coalescer = Coalescer()
        self.previous: dict[str, dict[str, Any]] = {}  # record key -> stored crm_records doc
        self.versions: dict[str, int] = {}  # record key -> the stored doc's version (0: none), `Outcomes.versions`
        self.intended: dict[str, tuple[dict[str, Any], bool | None]] = {}  # record key -> (fields, member)
        self.records: dict[str, None] = {}
        self.skipped: dict[str, int] = defaultdict(int)
        self.unchanged: dict[str, int] = defaultdict(int)
        # Records the connector wrote that the CRM no longer holds (a CRM user deleted them): sent whole.
        self.gone: set[str] = set()

    async def prefetch(self, keys: Iterable[str]) -> None:
        """Read the stored states of these records in one query (a backfill page plans thousands)."""
        missing = [k for k in dict.fromkeys(keys) if k not in self.intended]
        found = await self.store.get_many(RECORDS, missing) if missing else {}
        for key in missing:
            record = found.get(key)
            doc = record.doc if record is not None else {}
            self.previous[key] = doc
            self.versions[key] = record.version if record is not None else 0
            self.intended[key] = (dict(doc.get("fields", {})), doc.get("member") if doc else None)

    async def add(
        self, mapping: ObjectMapping, projection, op: str, trigger: str, item: Input, key: str | None = None
    ) -> None:
        """`key`: the projection's record key when the caller computed it already (a backfill page does)."""
        if isinstance(projection, proj.Skipped):
            self.skipped[mapping.name] += 1
            return
        if key is None:
            key = record_key(mapping.name, projection.key)
        if key not in self.intended:
            stored = await self.store.get(RECORDS, key)
            self.previous[key] = stored.doc if stored is not None else {}
            self.versions[key] = stored.version if stored is not None else 0
            doc = self.previous[key]
            self.intended[key] = (dict(doc.get("fields", {})), doc.get("member") if doc else None)
        fields_before, member_before = self.intended[key]
        if self.previous[key].get("state") == MERGED:
            # Merged into another record (identity's merge, or a CRM user's: inbound/news.py `_relink`): written
            # no more - upserted by its own key it would make the record again.
            self.unchanged[mapping.name] += 1
            return
        if mapping.kind == "list":
            member = op != REMOVE
            # A membership never written (None) is not one: removing it would be a call for nothing (a
            # backfill plans a REMOVE for everyone out of the segment).
            if member_before is member or (member_before is None and not member):
                self.unchanged[mapping.name] += 1
                return
            self.intended[key] = ({}, member)
            fields: dict[str, Any] = {}
        else:
            # Compared with what the CRM took (`fields` never holds a refused or queued value): what a refused
            # write carried is sent again with the next change, and a record the CRM never created is sent
            # whole, with the mapping's defaults.
            written = (accepted(self.previous[key]) and key not in self.gone) or key in self.records
            last = proj.Projection(mapping.name, projection.key, fields_before) if written else None
            if last is None and not projection.holds:
                # A record never written for a person holding no value the mapping reads (a mapped field
                # cleared): it would hold only its match key, of no use to the CRM. A backfill skips them too.
                self.skipped[mapping.name] += 1
                return
            fields = proj.changed_fields(last, projection)
            if not fields and self.previous[key]:
                self.unchanged[mapping.name] += 1
                return
            self.intended[key] = ({**fields_before, **projection.fields}, True)
        self.records[key] = None
        self.coalescer.add(
            Change(mapping.name, projection.key, fields, item.stamp, op, item.person_id, trigger, projection.link), key
        )


@dataclass(frozen=True)
class RunIncrement:
    """Counters to add to a stream run document: resolved into a Put by `resolve_writes`."""

    key: str
    connection: str
    counters: Mapping[str, int]
    now: float


def stream_run_key(connection: str, partition: int) -> str:
    return f"stream-{connection}-p{partition}"


async def resolve_writes(store: Store, writes: Iterable[Any]) -> list[WriteOp]:
    ops: list[WriteOp] = []
    for op in writes:
        if isinstance(op, RunIncrement):
            record = await store.get(RUNS, op.key)
            doc = record.doc if record is not None else new_stream_run(op.connection, op.now)
            for name, n in op.counters.items():
                doc[name] = doc.get(name, 0) + n
            doc["processed"] = doc.get("processed", 0) + sum(
                op.counters[k] for k in ("created", "updated", "unchanged", "skipped", "dead_lettered")
            )
            doc["updated_at"] = op.now
            ops.append(Put(RUNS, op.key, doc))
        else:
            ops.append(op)
    return ops


def new_stream_run(connection: str, now: float) -> dict[str, Any]:
    return {"kind": "stream", "state": "running", "connection": connection, "mapping": "", "started_at": now,
            **dict.fromkeys(COUNTERS, 0), "processed": 0, "total": 0}  # fmt: skip
