"""MongoDB adapter over PyMongo's async API (`pymongo.AsyncMongoClient`): the production store.

Motor reached end of life on 2026-05-14; its maintainers' successor is PyMongo's async API, used here.
Needs MongoDB 5.0 or newer (nested field names containing dots are stored as-is).

Layout. One MongoDB collection per cdp collection; a document is ``{_id: key, v: version, d: doc}``. A
declared index is a real MongoDB index named ``d.<field>`` on ``d.<field>``; a unique one is partial on
``{d.<field>: {$type: [string, number, bool]}}`` so that null and absent values never collide, as on the
other backends. `find` adds ``$type`` to its equality so True never matches 1 (BSON already keeps them
apart; the test double needs it) and arrays are not matched element-wise.

Single writes are one round trip each: an unconditional put is ``find_one_and_update`` with ``$inc`` on
the version (upsert), a create is ``insert_one`` (duplicate ``_id`` -> VersionConflict), a conditional put
is ``replace_one`` filtered on the expected version, a conditional delete ``delete_one`` likewise.

Bulk writes. The versions of every key are read first and the whole batch is checked against them
(so a VersionConflict writes nothing on any topology); then each run of consecutive ops on one collection
is one ordered ``bulk_write`` whose filters pin the version just read.

- Replica set or sharded cluster (detected once with ``hello``): all of that runs inside a session
  transaction via ``with_transaction`` (which retries transient errors) - all-or-nothing.
- Standalone server (no transactions): weaker. A unique-index violation, a writer slipping in between
  the read and the write, or a crash or network failure midway leaves the ops *before* the failure
  applied, in op order. Put the stream checkpoint last, so a partial batch only ever means "replay from
  the older checkpoint" - which services tolerate because every effect is idempotent on the event id.
  `bulk_is_atomic()` says which case applies; run a replica set (even of one member) in production.

Connection-level failures (server selection timeout, AutoReconnect, network timeouts, a transaction that
stayed transient) become `Unavailable`, so the gRPC layer answers UNAVAILABLE with a retry hint.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

from bson.codec_options import CodecOptions, TypeDecoder, TypeRegistry
from bson.int64 import Int64
from pymongo import ASCENDING, DeleteOne, InsertOne, ReplaceOne, ReturnDocument
from pymongo.errors import (
    BulkWriteError,
    ConfigurationError,
    ConnectionFailure,
    DocumentTooLarge,
    DuplicateKeyError,
    ExecutionTimeout,
    OperationFailure,
    WTimeoutError,
)

from cdp_kit.errors import Conflict, InvalidArgument, Unavailable
from cdp_kit.storage.port import (
    BulkResult,
    Delete,
    DuplicateValue,
    KeyRange,
    Page,
    Put,
    Record,
    Scalar,
    Step,
    Store,
    VersionConflict,
    WriteOp,
    bulk_result,
    check_indexed_fields,
    duplicates_block_unique_index,
    index_mismatch,
    index_token,
    keys_by_collection,
    make_page,
    plan_bulk,
    undeclared_field,
)

_SCALAR_TYPES = ("string", "number", "bool")
_BSON_TYPE = MappingProxyType({"s": "string", "n": "number", "b": "bool"})
_CHUNK = 1000
_INDEX_OPTIONS_CONFLICT = (85, 86)  # IndexOptionsConflict, IndexKeySpecsConflict
_INDEX_NAME = re.compile(r"index: (\S+)")


class _PlainInt(TypeDecoder):
    """BSON int64 decodes to bson.Int64 by default; the port promises plain JSON-like values."""

    bson_type = Int64

    def transform_bson(self, value: Any) -> int:
        return int(value)


_CODEC_OPTIONS: CodecOptions = CodecOptions(type_registry=TypeRegistry([_PlainInt()]))


@contextmanager
def _translate(action: str, collection: str | None = None) -> Iterator[None]:
    where = f"{action} {collection}" if collection else action
    try:
        yield
    except (ConnectionFailure, ExecutionTimeout, WTimeoutError) as exc:
        raise Unavailable(f"mongodb {where}: {_first_line(exc)}; retry", retry_after=1.0) from exc
    except DocumentTooLarge as exc:
        raise InvalidArgument("doc", f"mongodb {where}: {exc}; split the document") from exc
    except OperationFailure as exc:
        if exc.has_error_label("TransientTransactionError"):
            raise Unavailable(
                f"mongodb {where}: transaction kept failing: {_first_line(exc)}", retry_after=1.0
            ) from exc
        raise


def _first_line(exc: Exception) -> str:
    # Server-selection errors append the whole topology description; the first clause is the reason.
    return str(exc).split(", Timeout:")[0][:300]


def _record(raw: Mapping[str, Any]) -> Record:
    return Record(raw["_id"], raw["v"], raw["d"])


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _runs(steps: Sequence[Step]) -> Iterator[list[Step]]:
    """Consecutive steps on the same collection: each becomes one ordered bulk_write."""
    run: list[Step] = []
    for step in steps:
        if run and run[-1].op.collection != step.op.collection:
            yield run
            run = []
        run.append(step)
    if run:
        yield run


def _request(step: Step) -> InsertOne | ReplaceOne | DeleteOne | None:
    op = step.op
    if isinstance(op, Put):
        if step.before == 0:
            return InsertOne({"_id": op.key, "v": step.after, "d": op.doc})
        return ReplaceOne({"_id": op.key, "v": step.before}, {"v": step.after, "d": op.doc})
    if step.before == 0:
        return None  # deleting an absent key
    return DeleteOne({"_id": op.key, "v": step.before})


class MongoStore(Store):
    """`client` is a `pymongo.AsyncMongoClient` (or the test double in cdp_testing.mongo_double).

    `transactions`: None detects support from the server; tests may force it."""

    backend = "mongodb"

    def __init__(
        self,
        client: Any,
        database: str = "cdp",
        *,
        owns_client: bool = False,
        transactions: bool | None = None,
    ) -> None:
        self._client = client
        self._db = client.get_database(database, codec_options=_CODEC_OPTIONS)
        self.database = database
        self._owns_client = owns_client
        self._transactions = transactions
        # collection -> field -> unique, as last read from the server; replaced wholesale, never mutated.
        self._indexes: dict[str, dict[str, bool]] = {}

    @classmethod
    def from_url(cls, url: str) -> MongoStore:
        """A store on a new AsyncMongoClient (no I/O yet); the database is the URL path, default "cdp"."""
        from pymongo import AsyncMongoClient

        try:
            client: Any = AsyncMongoClient(url)
            database = client.get_default_database("cdp").name
        except (ConfigurationError, ValueError, TypeError) as exc:
            # The message, never the URL: it may carry a password.
            raise InvalidArgument("CDP_STORE_URL", f"not a usable MongoDB URL: {exc}") from None
        return cls(client, database, owns_client=True)

    def __repr__(self) -> str:
        return f"MongoStore(database={self.database!r})"

    # --- index declarations ---

    async def _declared(self, collection: str) -> dict[str, bool]:
        declared = self._indexes.get(collection)
        if declared is None:
            declared = await self._load_declared(collection)
        return declared

    async def _load_declared(self, collection: str) -> dict[str, bool]:
        info = await self._db[collection].index_information()
        declared = {}
        for spec in info.values():
            key = list(spec.get("key") or ())
            if len(key) == 1 and str(key[0][0]).startswith("d."):
                declared[key[0][0][2:]] = bool(spec.get("unique", False))
        self._indexes = {**self._indexes, collection: declared}
        return declared

    async def _duplicate_field(
        self,
        details: Mapping[str, Any],
        collection: str,
        key: str,
        doc: Mapping[str, Any],
        *,
        inserting: bool,
    ) -> str | None:
        """The unique field a duplicate-key error is about; None when it is the key (`_id`) itself."""
        pattern = details.get("keyPattern")
        if isinstance(pattern, Mapping) and pattern:
            name = str(next(iter(pattern)))
            return None if name == "_id" else name.removeprefix("d.")
        match = _INDEX_NAME.search(str(details.get("errmsg", "")))
        if match and (match.group(1) == "_id_" or match.group(1).startswith("d.")):
            return None if match.group(1) == "_id_" else match.group(1)[2:]
        # No keyPattern and no index name in the message (the test double, very old servers): ask. An
        # insert checks the key first, as the server checks the _id index before the others.
        if inserting and await self._version(collection, key):
            return None
        for field, unique in (await self._declared(collection)).items():
            token = index_token(doc.get(field))
            if unique and token is not None:
                holder = await self._db[collection].find_one(
                    {f"d.{field}": self._match(token), "_id": {"$ne": key}}, {"_id": True}
                )
                if holder is not None:
                    return field
        return None

    @staticmethod
    def _match(token: tuple[str, Scalar]) -> dict[str, Any]:
        return {"$eq": token[1], "$type": _BSON_TYPE[token[0]], "$not": {"$type": "array"}}

    async def _version(self, collection: str, key: str) -> int:
        raw = await self._db[collection].find_one({"_id": key}, {"v": True})
        return 0 if raw is None else raw["v"]

    # --- reads ---

    async def _get(self, collection: str, key: str) -> Record | None:
        with _translate("get", collection):
            raw = await self._db[collection].find_one({"_id": key})
        return None if raw is None else _record(raw)

    async def _get_many(self, collection: str, keys: list[str]) -> dict[str, Record]:
        found = {}
        with _translate("get_many", collection):
            for chunk in _chunks(keys):
                async for raw in self._db[collection].find({"_id": {"$in": list(chunk)}}):
                    found[raw["_id"]] = _record(raw)
        return found

    async def _find(
        self, collection: str, field: str, value: Scalar, limit: int, after: str | None = None
    ) -> list[Record]:
        with _translate("find", collection):
            declared = await self._declared(collection)
            if field not in declared:
                declared = await self._load_declared(collection)  # declared elsewhere since we looked?
                if field not in declared:
                    raise undeclared_field(collection, field)
            token = index_token(value)
            assert token is not None
            query: dict[str, Any] = {f"d.{field}": self._match(token)}
            if declared[field]:
                # Repeat the partial filter so the planner can prove the partial index applies.
                query = {"$and": [{f"d.{field}": {"$type": list(_SCALAR_TYPES)}}, query]}
            if after is not None:
                query = {"$and": [query, {"_id": {"$gt": after}}]}
            cursor = self._db[collection].find(query).sort("_id", ASCENDING).limit(limit)
            return [_record(raw) async for raw in cursor]

    async def _scan(self, collection: str, keys: KeyRange, limit: int) -> Page:
        bounds = {}
        for operator, bound in (("$gt", keys.after), ("$gte", keys.start), ("$lt", keys.end)):
            if bound is not None:
                bounds[operator] = bound
        with _translate("scan", collection):
            cursor = self._db[collection].find({"_id": bounds} if bounds else {})
            raws = await cursor.sort("_id", ASCENDING).limit(limit + 1).to_list(None)
        return make_page([_record(raw) for raw in raws], limit)

    async def _count(self, collection: str) -> int:
        with _translate("count", collection):
            return await self._db[collection].count_documents({})

    # --- single writes ---

    async def _put(self, op: Put) -> int:
        coll = self._db[op.collection]
        with _translate("put", op.collection):
            check_indexed_fields(op, await self._declared(op.collection))
            if op.expected_version is None:
                return await self._upsert(op)
            try:
                if op.expected_version == 0:
                    await coll.insert_one({"_id": op.key, "v": 1, "d": op.doc})
                    return 1
                replaced = await coll.replace_one(
                    {"_id": op.key, "v": op.expected_version}, {"v": op.expected_version + 1, "d": op.doc}
                )
            except DuplicateKeyError as exc:
                raise await self._duplicate(
                    exc.details or {"errmsg": str(exc)},
                    op,
                    op.expected_version,
                    inserting=op.expected_version == 0,
                ) from None
            if replaced.matched_count == 1:
                return op.expected_version + 1
            raise VersionConflict(
                op.collection, op.key, op.expected_version, await self._version(op.collection, op.key)
            )

    async def _upsert(self, op: Put) -> int:
        coll = self._db[op.collection]
        for _attempt in range(3):
            try:
                raw = await coll.find_one_and_update(
                    {"_id": op.key},
                    {"$set": {"d": op.doc}, "$inc": {"v": 1}},
                    projection={"v": True},
                    upsert=True,
                    return_document=ReturnDocument.AFTER,
                )
                return raw["v"]
            except DuplicateKeyError as exc:
                # An upsert may have been inserting or updating: only a key race is worth another go.
                failure = await self._duplicate(exc.details or {"errmsg": str(exc)}, op, None, inserting=False)
                if isinstance(failure, DuplicateValue):
                    raise failure from None
                # Two upserts raced to create the key and this one lost: go again as an update.
        raise Conflict(f"{op.collection}: kept losing the race to create a document; retry")

    async def _duplicate(
        self,
        details: Mapping[str, Any],
        op: Put,
        expected: int | None,
        *,
        inserting: bool,
        op_index: int | None = None,
    ) -> Conflict:
        field = await self._duplicate_field(details, op.collection, op.key, op.doc, inserting=inserting)
        if field is not None:
            return DuplicateValue(op.collection, field, op.key, op.doc.get(field), op_index=op_index)
        actual = await self._version(op.collection, op.key)
        return VersionConflict(
            op.collection, op.key, expected if expected is not None else 0, actual, op_index=op_index
        )

    async def _delete(self, op: Delete) -> bool:
        with _translate("delete", op.collection):
            query: dict[str, Any] = {"_id": op.key}
            if op.expected_version:
                query["v"] = op.expected_version
            if op.expected_version == 0:
                # "delete only if absent": nothing to delete either way, but a present key is a conflict.
                actual = await self._version(op.collection, op.key)
                if actual:
                    raise VersionConflict(op.collection, op.key, 0, actual)
                return False
            deleted = (await self._db[op.collection].delete_one(query)).deleted_count
            if deleted or op.expected_version is None:
                return bool(deleted)
            raise VersionConflict(
                op.collection, op.key, op.expected_version, await self._version(op.collection, op.key)
            )

    # --- bulk writes ---

    async def _bulk_is_atomic(self) -> bool:
        if self._transactions is None:
            with _translate("hello"):
                hello = await self._client.admin.command("hello")
            replicated = "setName" in hello or hello.get("msg") == "isdbgrid"
            # Wire version 9 = MongoDB 4.4: collections may be created inside a transaction.
            self._transactions = bool(
                replicated and hello.get("maxWireVersion", 0) >= 9 and "logicalSessionTimeoutMinutes" in hello
            )
        return self._transactions

    async def _bulk_write(self, ops: list[WriteOp]) -> BulkResult:
        many = len(ops) > 1
        with _translate("bulk_write"):
            for index, op in enumerate(ops):
                if isinstance(op, Put):
                    check_indexed_fields(op, await self._declared(op.collection), index if many else None)
            if await self._bulk_is_atomic():
                async with self._client.start_session() as session:
                    return await session.with_transaction(lambda s: self._bulk_once(ops, s))
            return await self._bulk_once(ops, None)

    async def _bulk_once(self, ops: list[WriteOp], session: Any) -> BulkResult:
        many = len(ops) > 1
        current: dict[str, dict[str, int]] = {}
        for collection, keys in keys_by_collection(ops).items():
            found = current[collection] = {}
            for chunk in _chunks(keys):
                cursor = self._db[collection].find({"_id": {"$in": list(chunk)}}, {"v": True}, session=session)
                async for raw in cursor:
                    found[raw["_id"]] = raw["v"]
        steps = plan_bulk(ops, current)
        for run in _runs(steps):
            collection = run[0].op.collection
            sent = [(step, request) for step in run if (request := _request(step)) is not None]
            if not sent:
                continue
            try:
                result = await self._db[collection].bulk_write(
                    [request for _, request in sent], ordered=True, session=session
                )
            except BulkWriteError as exc:
                raise await self._bulk_failure(exc, [step for step, _ in sent], many) from None
            replaced = sum(1 for step, _ in sent if isinstance(step.op, Put) and step.before)
            deleted = sum(1 for step, _ in sent if isinstance(step.op, Delete))
            if result.matched_count != replaced or result.deleted_count != deleted:
                raise await self._overtaken(collection, [step for step, _ in sent], many)
        return bulk_result(steps)

    async def _bulk_failure(self, exc: BulkWriteError, sent: list[Step], many: bool) -> Exception:
        errors = (exc.details or {}).get("writeErrors") or []
        if not errors or errors[0].get("code") != 11000:
            return exc
        step = sent[errors[0]["index"]]
        assert isinstance(step.op, Put)  # only inserts and replaces can collide
        return await self._duplicate(
            errors[0], step.op, step.before, inserting=step.before == 0, op_index=step.index if many else None
        )

    async def _overtaken(self, collection: str, sent: list[Step], many: bool) -> Exception:
        """Another writer changed a key between our version read and our version-pinned write, so that
        write matched nothing: name the first one that did not land."""
        last = {step.op.key: step for step in sent}
        for step in sent:
            if last[step.op.key] is not step or (isinstance(step.op, Put) and not step.before):
                continue  # superseded within the run, or an insert (a lost insert raises instead)
            raw = await self._db[collection].find_one({"_id": step.op.key})
            if isinstance(step.op, Put):
                landed = raw is not None and raw["v"] == step.after and raw["d"] == step.op.doc
            else:
                landed = raw is None
            if not landed:
                actual = 0 if raw is None else raw["v"]
                return VersionConflict(
                    collection, step.op.key, step.before, actual, op_index=step.index if many else None
                )
        return Conflict(f"{collection}: a document changed while this bulk write ran; re-read and retry")

    # --- schema ---

    async def _ensure_index(self, collection: str, field: str, unique: bool) -> None:
        with _translate("ensure_index", collection):
            declared = await self._load_declared(collection)
            if field in declared:
                if declared[field] != unique:
                    raise index_mismatch(collection, field, declared[field])
                return
            options: dict[str, Any] = {"name": f"d.{field}"}
            if unique:
                options.update(unique=True, partialFilterExpression={f"d.{field}": {"$type": list(_SCALAR_TYPES)}})
            try:
                await self._db[collection].create_index([(f"d.{field}", ASCENDING)], **options)
            except DuplicateKeyError:
                raise duplicates_block_unique_index(collection, field) from None
            except OperationFailure as exc:
                if exc.code not in _INDEX_OPTIONS_CONFLICT:
                    raise
                declared = await self._load_declared(collection)  # someone else created it differently
                raise index_mismatch(collection, field, declared.get(field, not unique)) from None
            await self._load_declared(collection)

    async def _drop_collection(self, collection: str) -> None:
        with _translate("drop_collection", collection):
            await self._db.drop_collection(collection)
        self._indexes = {name: fields for name, fields in self._indexes.items() if name != collection}

    async def _close(self) -> None:
        if self._owns_client:
            await self._client.close()
