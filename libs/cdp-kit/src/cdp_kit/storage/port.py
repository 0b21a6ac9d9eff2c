"""The storage port: the one narrow async repository every service keeps its durable state behind.

A document is a JSON-like dict stored in a named collection under a string key. Each carries an integer
version: 1 on first write, +1 on every write; a deleted key starts again at 1 (there are no tombstones).
The version is the optimistic-concurrency token: `expected_version=n` means "only if it is still at n",
`expected_version=0` means "only if it does not exist", and a lost race raises `VersionConflict` (a
`Conflict`, gRPC ABORTED): re-read and retry.

Every adapter (memory, sqlite, mongo) honours one contract, proven by one test suite
(libs/cdp-kit/tests/storage). What is portable is what *all* backends store faithfully, so this module
checks it up front and every adapter rejects the same input with the same error:

- collection: 1-100 of ``A-Z a-z 0-9 _ . -``, not starting with ``.``/``-``/``system.``;
- key: a non-empty string of at most 1024 characters, no NUL, valid Unicode;
- document: a dict; values None, bool, int (signed 64-bit), finite float, str, list, dict; dict keys are
  strings without NUL that do not start with ``$``; at most 64 levels deep. Datetimes, bytes, tuples
  are refused - store ISO-8601 strings or epoch numbers;
- an *indexed* field (see `Store.ensure_index`) holds a string, number, boolean or null (or is absent).
  Null and absent values are not findable and never collide in a unique index. Numbers compare by value
  (1 == 1.0); booleans are not numbers.

Keys sort by code point (= UTF-8 byte order, which SQLite and MongoDB use too), so `scan` pages come in the
same order on every backend.

`Store` is here; the values it reads and writes and the errors are `model`'s, the checks `checks`'s, scans
`scans`'s and bulk planning `bulk`'s. Every public name of those is re-exported here.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import Self

from cdp_kit.errors import FailedPrecondition, InvalidArgument
from cdp_kit.storage.bulk import Step, bulk_result, keys_by_collection, plan_bulk
from cdp_kit.storage.checks import (
    IndexToken,
    check_collection,
    check_document,
    check_expected_version,
    check_field,
    check_find_value,
    check_indexed_fields,
    check_key,
    check_limit,
    check_op,
    encode_document,
    index_token,
)
from cdp_kit.storage.checks import _BadValue as _BadValue  # the exact walk, for the tests that drive it
from cdp_kit.storage.checks import _check_dict as _check_dict
from cdp_kit.storage.model import (
    INT64_MAX,
    INT64_MIN,
    MAX_DEPTH,
    MAX_DOCUMENT_BYTES,
    MAX_FIND_LIMIT,
    MAX_KEY_CHARS,
    MAX_SCAN_LIMIT,
    BulkResult,
    Delete,
    Document,
    DuplicateValue,
    Page,
    Put,
    Record,
    Scalar,
    VersionConflict,
    WriteOp,
    duplicates_block_unique_index,
    index_mismatch,
    undeclared_field,
)
from cdp_kit.storage.scans import KeyRange, decode_cursor, encode_cursor, make_page, prefix_end, scan_range

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "MAX_DEPTH",
    "MAX_DOCUMENT_BYTES",
    "MAX_FIND_LIMIT",
    "MAX_KEY_CHARS",
    "MAX_SCAN_LIMIT",
    "BulkResult",
    "Delete",
    "Document",
    "DuplicateValue",
    "IndexToken",
    "KeyRange",
    "Page",
    "Put",
    "Record",
    "Scalar",
    "Step",
    "Store",
    "VersionConflict",
    "WriteOp",
    "bulk_result",
    "check_collection",
    "check_document",
    "check_expected_version",
    "check_field",
    "check_find_value",
    "check_indexed_fields",
    "check_key",
    "check_limit",
    "check_op",
    "decode_cursor",
    "duplicates_block_unique_index",
    "encode_cursor",
    "encode_document",
    "index_mismatch",
    "index_token",
    "keys_by_collection",
    "make_page",
    "plan_bulk",
    "prefix_end",
    "scan_range",
    "undeclared_field",
]


class Store(abc.ABC):
    """The repository port. Public methods check their arguments (identically for every adapter) and
    delegate to the adapter's ``_``-prefixed hooks.

    Use it as an async context manager, or call `close()`; a closed store raises FailedPrecondition.
    """

    #: short backend name for logs and metrics
    backend: str = "abstract"

    _closed: bool = False

    # reads

    async def get(self, collection: str, key: str) -> Record | None:
        self._check_open()
        check_collection(collection)
        check_key(collection, key)
        return await self._get(collection, key)

    async def get_many(self, collection: str, keys: Iterable[str]) -> dict[str, Record]:
        """The stored records among `keys`, by key (missing keys are simply absent from the result)."""
        self._check_open()
        check_collection(collection)
        if isinstance(keys, str):
            raise InvalidArgument("keys", "pass a list of keys, not a single string")
        unique_keys = list(dict.fromkeys(keys))
        for key in unique_keys:
            check_key(collection, key, field="keys")
        if not unique_keys:
            return {}
        return await self._get_many(collection, unique_keys)

    async def find(
        self, collection: str, field: str, value: Scalar, *, limit: int = 100, after: str | None = None
    ) -> list[Record]:
        """Documents whose top-level `field` equals `value`, ordered by key, at most `limit`; with `after`, only
        those whose key sorts after it (the next page: pass the last key of the previous one).

        The field must have been declared with `ensure_index` (a lookup, never a scan): otherwise this
        raises InvalidArgument naming the field."""
        self._check_open()
        check_collection(collection)
        check_field(field)
        check_find_value(field, value)
        check_limit(limit, MAX_FIND_LIMIT)
        if after is not None:
            check_key(collection, after, field="after")
        return await self._find(collection, field, value, limit, after)

    async def scan(
        self, collection: str, *, cursor: str | None = None, limit: int = 500, prefix: str | None = None
    ) -> Page:
        """One page of the collection in key order, optionally only keys starting with `prefix`.

        Resume with the returned `next_cursor` (and the same prefix). A scan is not a snapshot: keys
        written behind the cursor are not revisited, keys ahead of it are seen."""
        self._check_open()
        check_collection(collection)
        check_limit(limit, MAX_SCAN_LIMIT)
        if prefix is not None:
            if not isinstance(prefix, str):
                raise InvalidArgument("prefix", f"must be a string, got {type(prefix).__name__}")
            if prefix:
                check_key(collection, prefix, field="prefix")
        return await self._scan(collection, scan_range(cursor, prefix), limit)

    async def scan_all(
        self, collection: str, *, prefix: str | None = None, page_size: int = 1000
    ) -> AsyncIterator[Record]:
        """Every record of the collection (or under `prefix`) in key order, page by page."""
        cursor = None
        while True:
            page = await self.scan(collection, cursor=cursor, limit=page_size, prefix=prefix)
            for record in page.records:
                yield record
            cursor = page.next_cursor
            if cursor is None:
                return

    async def count(self, collection: str) -> int:
        self._check_open()
        check_collection(collection)
        return await self._count(collection)

    # writes

    async def put(self, collection: str, key: str, doc: Document, *, expected_version: int | None = None) -> int:
        """Store `doc` under `key` and return its new version.

        expected_version None: unconditional upsert; 0: create only; n: only if still at version n.
        Raises VersionConflict (expected vs actual) or DuplicateValue (unique index)."""
        self._check_open()
        op = check_op(Put(collection, key, doc, expected_version))
        return await self._put(op)  # type: ignore[arg-type]

    async def delete(self, collection: str, key: str, *, expected_version: int | None = None) -> bool:
        """Remove `key`; True if a document was removed. With expected_version, a document at another
        version (or a missing one when expecting n >= 1) raises VersionConflict."""
        self._check_open()
        op = check_op(Delete(collection, key, expected_version))
        return await self._delete(op)  # type: ignore[arg-type]

    async def bulk_write(self, ops: Iterable[WriteOp]) -> BulkResult:
        """Apply Put/Delete ops, possibly across collections, in order; later ops see earlier ones.

        Version checks all pass or nothing is written (VersionConflict names the first failing op).
        Whether a unique-index failure or a crash midway can leave a prefix applied depends on the
        backend: see `bulk_is_atomic`. This is how a service writes its state *and* its stream
        checkpoint together - put the checkpoint last."""
        self._check_open()
        checked = [check_op(op, index) for index, op in enumerate(ops)]
        if not checked:
            return BulkResult((), 0)
        return await self._bulk_write(checked)

    async def bulk_is_atomic(self) -> bool:
        """True when a bulk_write is all-or-nothing on this backend, whatever fails midway."""
        self._check_open()
        return await self._bulk_is_atomic()

    # schema

    async def ensure_index(self, collection: str, field: str, *, unique: bool = False) -> None:
        """Declare an equality index on a top-level field (idempotent). Existing documents are indexed.

        unique=True rejects a second document with the same value (DuplicateValue); creating it over
        existing duplicates raises Conflict. Redeclaring with the other `unique` raises
        FailedPrecondition: drop the collection (or migrate) first."""
        self._check_open()
        check_collection(collection)
        check_field(field)
        if not isinstance(unique, bool):
            raise InvalidArgument("unique", f"must be a bool, got {unique!r}")
        await self._ensure_index(collection, field, unique)

    async def drop_collection(self, collection: str) -> None:
        """Remove every document of the collection and its index declarations."""
        self._check_open()
        check_collection(collection)
        await self._drop_collection(collection)

    async def erase(self) -> bool:
        """Make what was deleted unreadable in the store's own files, as far as the backend can: call
        it after a deletion that must not leave the person's data behind (a privacy deletion) once
        that deletion is committed. True when nothing deleted is left in them.

        SQLite: deleted content is zeroed as it is deleted (``secure_delete``), and this truncates the
        write-ahead log, which still holds page images from before the deletion (False when readers
        kept it from finishing: the store's next writes finish it). Memory: nothing to do.
        MongoDB: nothing the adapter can do - deleted documents are gone from the collections and their
        indexes (WiredTiger reuses the space), but the oplog keeps the deleting and the earlier writes
        for its retention window, and backups keep them for theirs; size ``oplogSizeMB`` /
        ``oplogMinRetentionHours`` and the backup retention to the erasure period you promise, and
        encrypt both at rest."""
        self._check_open()
        return await self._erase()

    # lifecycle

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _erase(self) -> bool:
        return True  # memory and MongoDB: see `erase`

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"the {self.backend} store is closed; open a new one with open_store()")

    # adapter hooks: arguments are already checked

    async def _get(self, collection: str, key: str) -> Record | None:
        return (await self._get_many(collection, [key])).get(key)

    @abc.abstractmethod
    async def _get_many(self, collection: str, keys: list[str]) -> dict[str, Record]: ...

    @abc.abstractmethod
    async def _find(
        self, collection: str, field: str, value: Scalar, limit: int, after: str | None = None
    ) -> list[Record]: ...

    @abc.abstractmethod
    async def _scan(self, collection: str, keys: KeyRange, limit: int) -> Page: ...

    @abc.abstractmethod
    async def _count(self, collection: str) -> int: ...

    async def _put(self, op: Put) -> int:
        return (await self._bulk_write([op])).versions[0]

    async def _delete(self, op: Delete) -> bool:
        return (await self._bulk_write([op])).deleted == 1

    @abc.abstractmethod
    async def _bulk_write(self, ops: list[WriteOp]) -> BulkResult: ...

    @abc.abstractmethod
    async def _bulk_is_atomic(self) -> bool: ...

    @abc.abstractmethod
    async def _ensure_index(self, collection: str, field: str, unique: bool) -> None: ...

    @abc.abstractmethod
    async def _drop_collection(self, collection: str) -> None: ...

    @abc.abstractmethod
    async def _close(self) -> None: ...
