"""In-memory adapter for unit tests: the whole contract, no I/O, no persistence.

Documents are kept as their JSON encoding and decoded on every read, which is the deep copy in and out:
a caller mutating what it stored or what it read changes nothing stored, exactly as with a real database.
Every method runs without awaiting anything, so each call is atomic with respect to other asyncio tasks;
bulk writes are all-or-nothing (a failure midway is undone from an undo log).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import orjson

from cdp_kit.storage.port import (
    BulkResult,
    Delete,
    DuplicateValue,
    IndexToken,
    KeyRange,
    Page,
    Put,
    Record,
    Scalar,
    Step,
    Store,
    WriteOp,
    bulk_result,
    check_indexed_fields,
    duplicates_block_unique_index,
    encode_document,
    index_mismatch,
    index_token,
    make_page,
    plan_bulk,
    undeclared_field,
)


@dataclass(slots=True)
class _Entry:
    version: int
    blob: bytes
    tokens: dict[str, IndexToken]  # indexed field -> its token, for fields that have one


@dataclass(slots=True)
class _Index:
    unique: bool
    keys_by_token: dict[IndexToken, set[str]] = field(default_factory=dict)

    def add(self, token: IndexToken, key: str) -> None:
        self.keys_by_token.setdefault(token, set()).add(key)

    def remove(self, token: IndexToken, key: str) -> None:
        holders = self.keys_by_token.get(token)
        if holders is not None:
            holders.discard(key)
            if not holders:
                del self.keys_by_token[token]


@dataclass(slots=True)
class _Collection:
    entries: dict[str, _Entry] = field(default_factory=dict)
    sorted_keys: list[str] = field(default_factory=list)
    indexes: dict[str, _Index] = field(default_factory=dict)

    def tokens_of(self, doc: dict) -> dict[str, IndexToken]:
        tokens = {}
        for name in self.indexes:
            token = index_token(doc.get(name))
            if token is not None:
                tokens[name] = token
        return tokens

    def set(self, key: str, entry: _Entry | None) -> None:
        """Replace the entry for `key` (None removes it), keeping key order and indexes in step."""
        old = self.entries.get(key)
        if old is not None:
            for name, token in old.tokens.items():
                self.indexes[name].remove(token, key)
        if entry is None:
            if old is not None:
                del self.entries[key]
                del self.sorted_keys[bisect.bisect_left(self.sorted_keys, key)]
            return
        if old is None:
            bisect.insort(self.sorted_keys, key)
        self.entries[key] = entry
        for name, token in entry.tokens.items():
            self.indexes[name].add(token, key)

    def taken_by(self, name: str, token: IndexToken, key: str) -> bool:
        holders = self.indexes[name].keys_by_token.get(token, ())
        return any(holder != key for holder in holders)


class MemoryStore(Store):
    backend = "memory"

    def __init__(self) -> None:
        self._collections: dict[str, _Collection] = {}

    def _record(self, key: str, entry: _Entry) -> Record:
        return Record(key, entry.version, orjson.loads(entry.blob))

    async def _get_many(self, collection: str, keys: list[str]) -> dict[str, Record]:
        entries = self._collections.get(collection, _Collection()).entries
        return {key: self._record(key, entries[key]) for key in keys if key in entries}

    async def _find(
        self, collection: str, field: str, value: Scalar, limit: int, after: str | None = None
    ) -> list[Record]:
        coll = self._collections.get(collection)
        if coll is None or field not in coll.indexes:
            raise undeclared_field(collection, field)
        token = index_token(value)
        keys = sorted(coll.indexes[field].keys_by_token.get(token, ()))  # type: ignore[arg-type]
        start = bisect.bisect_right(keys, after) if after is not None else 0
        return [self._record(key, coll.entries[key]) for key in keys[start : start + limit]]

    async def _scan(self, collection: str, keys: KeyRange, limit: int) -> Page:
        coll = self._collections.get(collection)
        if coll is None:
            return Page([], None)
        ordered = coll.sorted_keys
        if keys.after is not None:
            position = bisect.bisect_right(ordered, keys.after)
        elif keys.start is not None:
            position = bisect.bisect_left(ordered, keys.start)
        else:
            position = 0
        records = []
        for key in ordered[position : position + limit + 1]:
            if keys.end is not None and key >= keys.end:
                break
            records.append(self._record(key, coll.entries[key]))
        return make_page(records, limit)

    async def _count(self, collection: str) -> int:
        coll = self._collections.get(collection)
        return 0 if coll is None else len(coll.entries)

    async def _bulk_write(self, ops: list[WriteOp]) -> BulkResult:
        current: dict[str, dict[str, int]] = {}
        for op in ops:
            coll = self._collections.get(op.collection)
            entry = coll.entries.get(op.key) if coll is not None else None
            if entry is not None:
                current.setdefault(op.collection, {})[op.key] = entry.version
        steps = plan_bulk(ops, current)
        # Encode (and size-check) everything before touching state, so those errors need no undo.
        blobs = {}
        for step in steps:
            if isinstance(step.op, Put):
                blobs[step.index] = encode_document(step.op, step.index if len(ops) > 1 else None)
                coll = self._collections.get(step.op.collection)
                if coll is not None:
                    check_indexed_fields(step.op, coll.indexes, step.index if len(ops) > 1 else None)
        undo: list[tuple[_Collection, str, _Entry | None]] = []
        try:
            for step in steps:
                self._apply(step, blobs.get(step.index), undo, len(ops) > 1)
        except BaseException:
            for coll, key, previous in reversed(undo):
                coll.set(key, previous)
            raise
        return bulk_result(steps)

    def _apply(
        self, step: Step, blob: bytes | None, undo: list[tuple[_Collection, str, _Entry | None]], many: bool
    ) -> None:
        op = step.op
        if isinstance(op, Delete):
            coll = self._collections.get(op.collection)
            if coll is not None and op.key in coll.entries:
                undo.append((coll, op.key, coll.entries[op.key]))
                coll.set(op.key, None)
            return
        coll = self._collections.setdefault(op.collection, _Collection())
        tokens = coll.tokens_of(op.doc)
        for name, token in tokens.items():
            if coll.indexes[name].unique and coll.taken_by(name, token, op.key):
                raise DuplicateValue(op.collection, name, op.key, op.doc[name], op_index=step.index if many else None)
        undo.append((coll, op.key, coll.entries.get(op.key)))
        coll.set(op.key, _Entry(step.after, blob, tokens))  # type: ignore[arg-type]

    async def _bulk_is_atomic(self) -> bool:
        return True

    async def _ensure_index(self, collection: str, field: str, unique: bool) -> None:
        coll = self._collections.setdefault(collection, _Collection())
        existing = coll.indexes.get(field)
        if existing is not None:
            if existing.unique != unique:
                raise index_mismatch(collection, field, existing.unique)
            return
        index = _Index(unique)
        tokens = {}
        for key, entry in coll.entries.items():
            token = index_token(orjson.loads(entry.blob).get(field))
            if token is None:
                continue
            if unique and token in index.keys_by_token:
                raise duplicates_block_unique_index(collection, field)
            index.add(token, key)
            tokens[key] = token
        coll.indexes[field] = index
        for key, token in tokens.items():
            coll.entries[key].tokens[field] = token

    async def _drop_collection(self, collection: str) -> None:
        self._collections.pop(collection, None)

    async def _close(self) -> None:
        self._collections.clear()
