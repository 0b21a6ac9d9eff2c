"""Coalescing a batch's changes per CRM record, and the stable keys that make every write idempotent.

Invariants:
- Two changes to one record (same mapping, same match key) within a batch become ONE write carrying each
  field's latest value: a newer change's field always wins, an older change only fills fields the newer
  one does not carry, whatever order they arrive in (`stamp` orders them: the profile's version or the
  stream sequence). The latest operation wins too: entered then exited a list is one removal.
- Keys derive from their inputs only (no clock, no randomness), so every replica and every restart
  computes the same key for the same record or action: a task created, then retried after its answer was
  lost, is upserted by the same idempotency key and stays one task.
- Keys are hashes: they name a record in logs, metrics and dead letters without carrying the email or
  person id it was matched by.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

UPSERT = "upsert"
REMOVE = "remove"  # a list member who left the segment, a mirrored record's scope lost
DELETE = "delete"  # the record itself deleted from the CRM (a privacy erasure under the `delete` policy)


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\x00")  # separator no part can contain as text, so ("a", "bc") != ("ab", "c")
    return h.hexdigest()


def task_key(connection: str, mapping: str, action_id: str) -> str:
    """The idempotency key of the task or case an action creates: `cdp-` and 32 hex characters (fits
    every CRM's external id / unique text field)."""
    return "cdp-" + _digest("task", connection, mapping, action_id)[:32]


def record_key(mapping: str, key: Iterable[tuple[str, str]]) -> str:
    """The id of a CRM record as this connector knows it: its mapping ("<connection>/<mapping>") and match
    key, hashed. Used for coalescing, record status and dead letters."""
    parts = [f"{name}={value.lower()}" for name, value in sorted(key)]  # CRMs match keys case-insensitively
    return _digest("record", mapping, *parts)[:32]


@dataclass(frozen=True)
class Link:
    """The record a task or case is about: its object, match key, and the field holding the link."""

    object: str
    key: tuple[tuple[str, str], ...]
    field: str | None = None


@dataclass
class Change:
    """One write to one CRM record: what a trigger produced for a mapping."""

    mapping: str  # "<connection>/<mapping>"
    key: tuple[tuple[str, str], ...]  # the match key (CRM field -> value)
    fields: dict[str, Any] = field(default_factory=dict)
    stamp: int = 0  # orders changes to the same record: later stamps are newer
    op: str = UPSERT
    person_id: str = ""
    trigger: str = ""
    link: Link | None = None
    # The record key, hashed once: a change is looked up by it several times on its way (coalescing,
    # delivery, the CRM's per-record results, the outcome), and a backfill makes a million of them.
    _record: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def record(self) -> str:
        if self._record is None:
            self._record = record_key(self.mapping, self.key)
        return self._record


def _with(change: Change, fields: dict[str, Any], link: Link | None) -> Change:
    """`change` with these fields and link (`dataclasses.replace`, without its per-call introspection)."""
    return Change(change.mapping, change.key, fields, change.stamp, change.op, change.person_id, change.trigger, link)


class Coalescer:
    """The changes of one batch, one per record, in the order records were first seen."""

    def __init__(self) -> None:
        self._changes: dict[str, Change] = {}

    def __len__(self) -> int:
        return len(self._changes)

    def add(self, change: Change, record: str | None = None) -> None:
        """`record`: the change's record key when the caller computed it already (the same hash)."""
        if record is not None and change._record is None:
            change._record = record
        record = change.record
        held = self._changes.get(record)
        if held is None:
            kept = _with(change, dict(change.fields), change.link)
        else:
            newer, older = (change, held) if change.stamp >= held.stamp else (held, change)
            merged = {**older.fields, **newer.fields}
            if newer.op == REMOVE:
                merged = dict(newer.fields)
            kept = _with(newer, merged, newer.link or older.link)
        kept._record = record  # same mapping and match key: the same record
        self._changes[record] = kept

    def extend(self, changes: Iterable[Change]) -> None:
        for change in changes:
            self.add(change)

    def take(self, limit: int | None = None, *, mapping: str | None = None) -> list[Change]:
        """Up to `limit` changes (of `mapping` only, if given), removed from the batch, oldest first."""
        taken: list[Change] = []
        for record, change in list(self._changes.items()):
            if limit is not None and len(taken) >= limit:
                break
            if mapping is None or change.mapping == mapping:
                taken.append(self._changes.pop(record))
        return taken

    def mappings(self) -> list[str]:
        return list(dict.fromkeys(c.mapping for c in self._changes.values()))
