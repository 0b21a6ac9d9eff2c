"""An async test double of the slice of PyMongo's async API that `cdp_kit.storage.mongo.MongoStore` calls
(AsyncMongoClient, AsyncDatabase, AsyncCollection, AsyncCursor, AsyncClientSession), over mongomock's
synchronous in-memory engine. No MongoDB server can be installed on the build machines; with this double
the *real* adapter code runs the storage contract suite. Test-only code.

    store = MongoStore(AsyncMongoDouble(), "cdp_test")                       # a standalone server
    store = MongoStore(AsyncMongoDouble(replica_set=True), "cdp_test")       # transactions too

Faithful where it matters to the adapter:
- every call yields to the event loop once (as a round trip would), then runs atomically, like one server
  operation, so concurrent tasks interleave realistically;
- documents go through a real BSON encode/decode on the way in and out: values come back as fresh copies
  with PyMongo's types, and what BSON cannot hold fails as it would against a server (DocumentTooLarge
  over 16 MiB, InvalidDocument for unencodable values);
- `bulk_write` is ordered, stops at the first write error and raises BulkWriteError carrying that op's
  index (mongomock's own bulk_write does not accept PyMongo 4.x operations);
- ``$type`` with a list of types (filters and partial indexes) is rewritten into the equivalent ``$or``,
  which mongomock can evaluate;
- ``hello`` answers as a standalone server, or with ``replica_set=True`` as a replica-set primary whose
  sessions run ``with_transaction``: the transaction's writes are undone if the callback raises. Without
  it, passing a session fails as a standalone server would - so by default the adapter's non-transactional
  fallback is what runs.

Not emulated - know this before trusting a green test:
- transaction *isolation*: other tasks see a transaction's writes before it commits; there are no write
  conflicts and so no transient-error retries. Only all-or-nothing on abort is emulated, and only for
  writes whose filter names ``_id`` (all the adapter issues);
- duplicate-key errors carry no keyPattern, keyValue or index name (mongomock's do not), so the adapter's
  fallback diagnosis runs; real servers take the keyPattern path;
- BSON comparison rules: mongomock compares with Python equality, so a unique index treats True and 1 as
  the same value (find does not: the adapter adds ``$type``);
- network failures and timeouts, write concerns, read preferences, causal consistency, and everything the
  adapter does not call (which raises AttributeError rather than pretending).

Bulk operations are read through PyMongo's internal ``_add_to_bulk`` visitor, the same hook PyMongo's own
collections and mongomock use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import bson
import mongomock
from pymongo import ReturnDocument
from pymongo.errors import BulkWriteError, DocumentTooLarge, OperationFailure, WriteError
from pymongo.results import BulkWriteResult

MAX_BSON_SIZE = 16 * 1024 * 1024


def _through_bson(document: Mapping[str, Any], codec_options: Any = None) -> dict[str, Any]:
    encoded = bson.encode(document)
    if len(encoded) > MAX_BSON_SIZE:
        raise DocumentTooLarge(
            f"BSON document too large ({len(encoded)} bytes) - the connected server supports "
            f"BSON document sizes up to {MAX_BSON_SIZE} bytes."
        )
    return bson.decode(encoded, codec_options=codec_options) if codec_options else bson.decode(encoded)


def _portable(query: Any) -> Any:
    """Rewrite ``{f: {$type: [a, b]}}`` into ``{$or: [{f: {$type: a}}, {f: {$type: b}}]}`` (mongomock
    only understands a single type), recursing through $and/$or/$nor."""
    if not isinstance(query, Mapping):
        return query
    clauses: list[dict[str, Any]] = []
    rewritten: dict[str, Any] = {}
    for name, condition in query.items():
        if name in ("$and", "$or", "$nor"):
            rewritten[name] = [_portable(part) for part in condition]
        elif isinstance(condition, Mapping) and isinstance(condition.get("$type"), list):
            rest = {op: value for op, value in condition.items() if op != "$type"}
            clauses.append({"$or": [{name: {"$type": kind}} for kind in condition["$type"]]})
            if rest:
                rewritten[name] = rest
        else:
            rewritten[name] = condition
    if not clauses:
        return rewritten
    if "$and" in rewritten:
        clauses = [*rewritten.pop("$and"), *clauses]
    return {**rewritten, "$and": clauses}


@dataclass
class _Transaction:
    # (collection, _id, document before the transaction first touched it, or None if absent)
    undo: list[tuple[Any, Any, dict[str, Any] | None]] = field(default_factory=list)
    touched: set[tuple[str, Any]] = field(default_factory=set)

    def remember(self, collection: Any, ident: Any, *, inserted: bool = False) -> None:
        """Call before a write to `ident` - or, with inserted=True, after an insert succeeded (there was
        nothing before it, and mongomock's _id lookups are linear scans worth skipping)."""
        if (collection.full_name, ident) not in self.touched:
            self.touched.add((collection.full_name, ident))
            before = None if inserted else collection.find_one({"_id": ident})
            self.undo.append((collection, ident, before))

    def roll_back(self) -> None:
        for collection, ident, before in reversed(self.undo):
            if before is None:
                collection.delete_one({"_id": ident})
            else:
                collection.replace_one({"_id": ident}, before, upsert=True)
        self.undo.clear()


class AsyncSessionDouble:
    def __init__(self, client: AsyncMongoDouble) -> None:
        self.client = client
        self._transaction: _Transaction | None = None

    @property
    def in_transaction(self) -> bool:
        return self._transaction is not None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.end_session()

    async def end_session(self) -> None:
        if self._transaction is not None:
            self._transaction.roll_back()
            self._transaction = None

    async def with_transaction(self, callback: Any, **_options: Any) -> Any:
        if not self.client.replica_set:
            raise OperationFailure("Transaction numbers are only allowed on a replica set member or mongos", 20)
        transaction = self._transaction = _Transaction()
        try:
            return await callback(self)
        except BaseException:
            transaction.roll_back()
            raise
        finally:
            self._transaction = None  # committed, or rolled back just above


class AsyncCursorDouble:
    def __init__(self, collection: AsyncCollectionDouble, query: Any, projection: Any, session: Any) -> None:
        self._collection = collection
        self._query = query
        self._projection = projection
        self._session = session
        self._sort: list[tuple[str, int]] = []
        self._limit = 0
        self._buffer: list[dict[str, Any]] | None = None

    def sort(self, key: str, direction: int = 1) -> AsyncCursorDouble:
        self._sort.append((key, direction))
        return self

    def limit(self, count: int) -> AsyncCursorDouble:
        self._limit = count
        return self

    async def _fetch(self) -> list[dict[str, Any]]:
        if self._buffer is None:
            await self._collection._round_trip(self._session)
            cursor = self._collection._backend.find(_portable(self._query), self._projection)
            if self._sort:
                cursor = cursor.sort(self._sort)
            if self._limit:
                cursor = cursor.limit(self._limit)
            self._buffer = [self._collection._out(doc) for doc in cursor]
        return self._buffer

    async def to_list(self, length: int | None = None) -> list[dict[str, Any]]:
        docs = await self._fetch()
        taken, self._buffer = (docs, []) if length is None else (docs[:length], docs[length:])
        return taken

    def __aiter__(self) -> AsyncCursorDouble:
        return self

    async def __anext__(self) -> dict[str, Any]:
        docs = await self._fetch()
        if not docs:
            raise StopAsyncIteration
        return docs.pop(0)


class _BulkRecorder:
    """Receives PyMongo write models through their ``_add_to_bulk`` visitor."""

    def __init__(self) -> None:
        self.requests: list[tuple[Any, ...]] = []

    def add_insert(self, document: Any) -> None:
        self.requests.append(("insert", document))

    def add_replace(self, selector: Any, replacement: Any, upsert: bool = False, **_: Any) -> None:
        self.requests.append(("replace", selector, replacement, upsert))

    def add_update(self, selector: Any, update: Any, multi: bool = False, upsert: bool = False, **_: Any) -> None:
        if multi:
            raise NotImplementedError("the Mongo double does not do UpdateMany in bulk")
        self.requests.append(("update", selector, update, upsert))

    def add_delete(self, selector: Any, limit: int, **_: Any) -> None:
        if limit != 1:
            raise NotImplementedError("the Mongo double does not do DeleteMany in bulk")
        self.requests.append(("delete", selector))


class AsyncCollectionDouble:
    def __init__(self, database: AsyncDatabaseDouble, backend: Any) -> None:
        self.database = database
        self._backend = backend
        self.name: str = backend.name

    def _out(self, document: Mapping[str, Any]) -> dict[str, Any]:
        return _through_bson(document, self.database.codec_options)

    async def _round_trip(self, session: AsyncSessionDouble | None) -> _Transaction | None:
        await asyncio.sleep(0)
        if session is None:
            return None
        if not self.database.client.replica_set:
            raise OperationFailure("Transaction numbers are only allowed on a replica set member or mongos", 20)
        return session._transaction

    def _remember(
        self, transaction: _Transaction | None, selector: Mapping[str, Any], *, inserted: bool = False
    ) -> None:
        if transaction is None:
            return
        ident = selector.get("_id")
        if ident is None or isinstance(ident, Mapping):
            raise NotImplementedError("the Mongo double only undoes transactional writes that name one _id")
        transaction.remember(self._backend, ident, inserted=inserted)

    # reads

    async def find_one(self, query: Any = None, projection: Any = None, *, session: Any = None) -> Any:
        await self._round_trip(session)
        found = self._backend.find_one(_portable(query or {}), projection)
        return None if found is None else self._out(found)

    def find(self, query: Any = None, projection: Any = None, *, session: Any = None) -> AsyncCursorDouble:
        return AsyncCursorDouble(self, query or {}, projection, session)

    async def count_documents(self, query: Any, *, session: Any = None) -> int:
        await self._round_trip(session)
        return self._backend.count_documents(_portable(query))

    async def index_information(self, *, session: Any = None) -> dict[str, Any]:
        await self._round_trip(session)
        return self._backend.index_information()

    # writes

    async def insert_one(self, document: Any, *, session: Any = None) -> Any:
        transaction = await self._round_trip(session)
        document = _through_bson(document)
        result = self._backend.insert_one(document)
        self._remember(transaction, document, inserted=True)
        return result

    async def replace_one(self, selector: Any, replacement: Any, upsert: bool = False, *, session: Any = None) -> Any:
        transaction = await self._round_trip(session)
        self._remember(transaction, selector)
        return self._backend.replace_one(_portable(selector), _through_bson(replacement), upsert=upsert)

    async def update_one(self, selector: Any, update: Any, upsert: bool = False, *, session: Any = None) -> Any:
        transaction = await self._round_trip(session)
        self._remember(transaction, selector)
        return self._backend.update_one(_portable(selector), _through_bson(update), upsert=upsert)

    async def find_one_and_update(
        self,
        selector: Any,
        update: Any,
        projection: Any = None,
        *,
        upsert: bool = False,
        return_document: bool = ReturnDocument.BEFORE,
        session: Any = None,
    ) -> Any:
        transaction = await self._round_trip(session)
        self._remember(transaction, selector)
        found = self._backend.find_one_and_update(
            _portable(selector),
            _through_bson(update),
            projection=projection,
            upsert=upsert,
            return_document=return_document,
        )
        return None if found is None else self._out(found)

    async def delete_one(self, selector: Any, *, session: Any = None) -> Any:
        transaction = await self._round_trip(session)
        self._remember(transaction, selector)
        return self._backend.delete_one(_portable(selector))

    async def bulk_write(self, requests: Sequence[Any], ordered: bool = True, *, session: Any = None) -> Any:
        if not ordered:
            raise NotImplementedError("the Mongo double only does ordered bulk writes")
        transaction = await self._round_trip(session)
        recorder = _BulkRecorder()
        for request in requests:
            request._add_to_bulk(recorder)
        counts = {"nInserted": 0, "nMatched": 0, "nModified": 0, "nRemoved": 0, "nUpserted": 0}
        upserted: list[dict[str, Any]] = []
        for index, (kind, *args) in enumerate(recorder.requests):
            try:
                if kind == "insert":
                    document = _through_bson(args[0])
                    self._backend.insert_one(document)
                    self._remember(transaction, document, inserted=True)
                    counts["nInserted"] += 1
                    continue
                self._remember(transaction, args[0])
                if kind == "delete":
                    counts["nRemoved"] += self._backend.delete_one(_portable(args[0])).deleted_count
                    continue
                write = self._backend.replace_one if kind == "replace" else self._backend.update_one
                result = write(_portable(args[0]), _through_bson(args[1]), upsert=args[2])
                counts["nMatched"] += result.matched_count
                counts["nModified"] += result.modified_count
                if result.upserted_id is not None:
                    counts["nUpserted"] += 1
                    upserted.append({"index": index, "_id": result.upserted_id})
            except WriteError as exc:
                raise BulkWriteError(
                    {
                        **counts,
                        "upserted": upserted,
                        "writeErrors": [{"index": index, "code": exc.code, "errmsg": str(exc)}],
                        "writeConcernErrors": [],
                    }
                ) from None
        return BulkWriteResult({**counts, "upserted": upserted, "writeErrors": [], "writeConcernErrors": []}, True)

    async def create_index(self, keys: Any, *, session: Any = None, **options: Any) -> str:
        await self._round_trip(session)
        if "partialFilterExpression" in options:
            options["partialFilterExpression"] = _portable(options["partialFilterExpression"])
        return self._backend.create_index(keys, **options)

    async def drop(self, *, session: Any = None) -> None:
        await self._round_trip(session)
        self._backend.drop()


class AsyncDatabaseDouble:
    def __init__(self, client: AsyncMongoDouble, backend: Any, codec_options: Any = None) -> None:
        self.client = client
        self._backend = backend
        self.name: str = backend.name
        self.codec_options = codec_options

    def __getitem__(self, name: str) -> AsyncCollectionDouble:
        return self.get_collection(name)

    def get_collection(self, name: str) -> AsyncCollectionDouble:
        return AsyncCollectionDouble(self, self._backend[name])

    async def drop_collection(self, name: str, *, session: Any = None) -> None:
        await asyncio.sleep(0)
        self._backend.drop_collection(name)

    async def list_collection_names(self, *, session: Any = None) -> list[str]:
        await asyncio.sleep(0)
        return self._backend.list_collection_names()

    async def command(self, name: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        await asyncio.sleep(0)
        if name == "ping":
            return {"ok": 1.0}
        if name in ("hello", "isMaster", "ismaster"):
            return self.client.hello()
        raise NotImplementedError(f"the Mongo double does not answer the {name!r} command")


class AsyncMongoDouble:
    """Stands in for `pymongo.AsyncMongoClient`. Two doubles built over the same `backend`
    (a `mongomock.MongoClient`) see the same data, like two clients of one server."""

    def __init__(self, *, replica_set: bool = False, backend: Any = None) -> None:
        self.replica_set = replica_set
        self.backend = backend if backend is not None else mongomock.MongoClient()
        self.admin = AsyncDatabaseDouble(self, self.backend["admin"])
        self.closed = False

    def __getitem__(self, name: str) -> AsyncDatabaseDouble:
        return self.get_database(name)

    def get_database(self, name: str, *, codec_options: Any = None) -> AsyncDatabaseDouble:
        """`codec_options` apply to what is read back (type_registry decoders included)."""
        return AsyncDatabaseDouble(self, self.backend[name], codec_options)

    def hello(self) -> dict[str, Any]:
        reply: dict[str, Any] = {
            "isWritablePrimary": True,
            "maxWireVersion": 21,
            "maxBsonObjectSize": MAX_BSON_SIZE,
            "logicalSessionTimeoutMinutes": 30,
            "ok": 1.0,
        }
        if self.replica_set:
            reply.update(setName="rs0", hosts=["double:27017"])
        return reply

    def start_session(self, **_options: Any) -> AsyncSessionDouble:
        return AsyncSessionDouble(self)

    async def drop_database(self, name: str) -> None:
        await asyncio.sleep(0)
        self.backend.drop_database(name)

    async def close(self) -> None:
        self.closed = True
