"""SQLite adapter: the embedded default (`make up`, a laptop) - no database server to run.

Layout. One table holds every collection: ``documents(collection, key, version, doc)`` with
``UNIQUE(collection, key)``, the document as JSON text (orjson). One table rather than one per collection
keeps DDL off the write path and lets a bulk write span collections with the same two statements. A
declared index is a *partial expression index* per (collection, field)::

    CREATE INDEX "ix:<collection>:<field>" ON documents(<kind>, json_extract(doc, '$.<field>')[, key])
        WHERE collection = '<collection>'

where <kind> is 's'/'n'/'b' for string/number/boolean (NULL otherwise), so True never matches 1, 1 matches
1.0, and null/absent/list values are simply not in the index (nor collide in a unique one). SQLite
maintains these itself; `find` repeats the same expressions with the collection as a literal so the
planner picks the index (a test checks the query plan). Declarations live in ``indexes``.

Threads, not aiosqlite. Two connections, each owned by its own single-thread executor: a *writer* and a
*reader* (WAL lets the reader run beside the writer, so a large bulk write does not stall `get`). Every
store call is one function run on one of those threads - a whole transaction (BEGIN IMMEDIATE, read
versions, executemany, COMMIT) is one hop, where aiosqlite would make one hop per statement and need an
asyncio lock to keep concurrent tasks' statements out of each other's transactions. The writer's queue is
that lock: writes from many tasks are serialised in arrival order, and BEGIN IMMEDIATE makes them safe
against another process writing the same file (it waits up to `busy_timeout`, then Unavailable).

Durability. WAL with ``synchronous=NORMAL`` by default: a commit survives the process being killed at any
moment (the guarantee the platform's effectively-once design relies on - services ack stream messages
after commit). Only an OS crash or power loss can drop the last commits, and since a service's state and
its stream checkpoint commit together, they roll back together and the service replays from the older
checkpoint. ``synchronous=FULL`` (``sqlite:///path.db?synchronous=full``) also survives power loss, at
an fsync per commit.

Checkpoints (copying the log into the database file) are SQLite's own by default: inside the commit that
crosses 1000 pages (~4 MB) of log (`_AUTOCHECKPOINT_PAGES`, SQLite's default: 4000 cost commits ~20 %
less CPU in-process, but the whole pipeline's event -> action p99 at 1,000/s grew from 64-74 to 92-94
ms). ``background_checkpoints=True`` runs them on a thread of their own instead (see
`cdp_kit.storage.sqlite_wal`): a commit then pays for one only when the log has passed `wal_max_bytes`
(64 MiB by default; a reader holding a snapshot open keeps checkpoints from copying), when it truncates
the log itself, waiting for readers up to busy_timeout, so the -wal file stays under that bound plus one
transaction unless a reader never ends its read transaction; counted in `wal_checkpoints`. It is not the
default because the whole platform measured worse with it: in the pipeline benchmark at 1,000 events/s
(30 s, 10,000 people, quiet machine, runs interleaved) event -> action p99 was 570-721 ms with it on in
every service against 245-312 ms with it off on the same commit (and 244-368 ms before it existed), p50
83-232 ms against 67-75 ms - one store's commits got cheaper (bench_store_commit: p99 5 ms against 10 ms)
while seven stores each checkpointing and syncing every second cost every service's commits more.

Erasure. A privacy deletion must leave no bytes of the person in the files, not just no live row. The
writer runs with ``secure_delete=ON``: SQLite zeroes the content it deletes (rows, index entries, freed
pages) in the page images it writes. That is not all: content SQLite *moved* while it was live (a
page rebalanced, a row grown) can leave its old bytes in the unused gap of a page, which no deletion
touches - a fresh-clone CI run found a deleted person's name there. So `erase()` first rebuilds the file
from the live rows (VACUUM) when it is at most 256 MB; above that the rebuild would stall the writer too
long, and such gaps are reused only as pages fill (the chart runs MongoDB in production). The page
images written *before* the deletion stay in the WAL
until it is reset, so `erase()` checkpoints with TRUNCATE: every page goes to the main file and the WAL
is cut to nothing. A reader in the middle of a read transaction keeps TRUNCATE from finishing; the
checkpoint waits for it (busy_timeout) and is retried a few times (after a background checkpoint in
progress: one checkpoint runs at a time), and `erase()` says False if readers
never let go. The store then owes the erase: every later write tries the truncation again, without
waiting for readers, until it succeeds - the person's page images do not wait for the next deletion.

Failures an operator must fix. A store that cannot write (disk full, an I/O error, a read-only
volume) answers every call with Unavailable (the consumers then wait and retry, dead-lettering nothing)
and logs it once, naming the file and SQLite's error (``SQLITE_FULL`` …), again every minute while it
lasts and once more when it writes again: the callers' own logs name only the exception's type. The
service's gRPC health `cdp.storage` reads NOT_SERVING meanwhile (`cdp_kit.storage.health`). A file
that is not a SQLite database, or a damaged one, stops start-up naming the file and what to do; damage
inside a page that only a later statement reaches answers that call, and every call that reaches it, the
same way (`DamagedStore`: FAILED_PRECONDITION to a caller, an outage to a stream consumer, which holds its
messages), logged at ERROR and shown by `cdp.storage` until the store is closed
(`cdp_kit.storage.sqlite_faults`).

Bulk writes are all-or-nothing in one transaction: version checks run against versions read inside the
transaction before anything is written; a unique-index violation rolls everything back and is then
pinpointed by replaying the ops one by one in a transaction that is rolled back too. A put of a key no
other op of the write names is not read first while its collection's unread puts have all held lately:
one without an expected version (or expecting none) is taken for a new key (timeline entries, outbox
records) and inserted only if absent; one expecting version n updates the key's row only if it is still
at n (the version check in the UPDATE itself). If one of them changes no row (or a unique index or a
version check fails), the transaction is rolled back and made again the usual way, every key read, and
that collection's puts are read first for the next 256 writes. That saves a version read per such put.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson

from cdp_kit.errors import FailedPrecondition, InvalidArgument
from cdp_kit.storage.port import (
    BulkResult,
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
    encode_document,
    index_mismatch,
    index_token,
    make_page,
    plan_bulk,
    undeclared_field,
)
from cdp_kit.storage.sqlite_faults import Faults, mapped
from cdp_kit.storage.sqlite_wal import (
    DEFAULT_INTERVAL_SECONDS,
    DEFAULT_LIMIT_BYTES,
    DEFAULT_THRESHOLD_BYTES,
    Checkpointer,
    WalCheckpoints,
)

T = TypeVar("T")
log = logging.getLogger("cdp.storage")

SCHEMA_VERSION = 1
# Keys looked up per statement (one JSON array each: see _KEYS_IN).
_CHUNK = 500
_ERASE_ATTEMPTS = 5
# Compiled statements each connection keeps (sqlite3's default is 128): two key lookups per collection,
# plus the few fixed statements.
_STATEMENT_CACHE = 512
# SQLite's own checkpoints (the default, see "Checkpoints" above) run in the commit that passes this many
# pages of log: SQLite's default. 4000 saved ~20 % of commit CPU in-process (a round copies each page once
# and pays its fsyncs once), but a checkpointing commit then takes ~10 ms, and in the whole pipeline
# (bench_pipeline, 1,000/s, two runs each, quiet machine) event -> action p99 was 92-94 ms against 64-74.
_AUTOCHECKPOINT_PAGES = 1000
# An erase rebuilds a store file up to this size (VACUUM): see "Erasure" above.
_ERASE_REBUILD_MAX_BYTES = 256 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    collection TEXT NOT NULL,
    key        TEXT NOT NULL,
    version    INTEGER NOT NULL,
    doc        TEXT NOT NULL,
    UNIQUE (collection, key)
);
CREATE TABLE IF NOT EXISTS indexes (
    collection TEXT NOT NULL,
    field      TEXT NOT NULL,
    is_unique  INTEGER NOT NULL,
    PRIMARY KEY (collection, field)
) WITHOUT ROWID;
"""
_UPSERT = (
    "INSERT INTO documents (collection, key, version, doc) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (collection, key) DO UPDATE SET version = excluded.version, doc = excluded.doc"
)
_DELETE = "DELETE FROM documents WHERE collection = ? AND key = ?"
# A put of a key not read first, taken for absent (see SqliteStore._fresh_candidates): inserted only if
# it is not stored; the rows the statement changed tell whether every key was new.
_INSERT_NEW = (
    "INSERT INTO documents (collection, key, version, doc) VALUES (?, ?, ?, ?) ON CONFLICT (collection, key) DO NOTHING"
)
# A collection whose put found its key stored has its puts read first for this many bulk writes.
_STALE_WRITES = 256
# A put of a key not read first, taken to be at the version the op expects: updates the row only if it is
# still at that version. The collection is a literal (see _KEYS_IN), one statement text per collection.
_UPDATES_IF: dict[str, str] = {}


def _update_if(collection: str) -> str:
    statement = _UPDATES_IF.get(collection)
    if statement is None:
        statement = _UPDATES_IF[collection] = (
            f"UPDATE documents SET version = ?, doc = ? WHERE collection = '{collection}' AND key = ? AND version = ?"
        )
    return statement


# A key the transaction has read is written through its rowid: one table lookup instead of an index
# lookup, plus (for a put) the failed insert an upsert tries first. Its collection and key stay as they
# are, so no index of the key is touched.
_UPDATE_ROW = "UPDATE documents SET version = ?, doc = ? WHERE rowid = ?"
_DELETE_ROW = "DELETE FROM documents WHERE rowid = ?"
_FIRST, _SECOND, _THIRD = itemgetter(0), itemgetter(1), itemgetter(2)
_UNIQUE_FAILED = re.compile(r"UNIQUE constraint failed: index 'ix:([^:']+):([^:']+)'")


def _index_name(collection: str, field: str) -> str:
    # Collection and field names are validated to [A-Za-z0-9_.-] / identifiers: safe to quote inline.
    return f'"ix:{collection}:{field}"'


def _index_expressions(field: str) -> tuple[str, str]:
    path = f"'$.{field}'"
    kind = (
        f"CASE json_type(doc, {path}) WHEN 'text' THEN 's' WHEN 'integer' THEN 'n' WHEN 'real' THEN 'n' "
        f"WHEN 'true' THEN 'b' WHEN 'false' THEN 'b' END"
    )
    return kind, f"json_extract(doc, {path})"


def _chunks(items: Sequence[T], size: int = _CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# A lookup of keys names its collection as a literal (names are validated to [A-Za-z0-9_.-], so safe to
# quote inline) and binds its keys as one JSON array, read by json_each. A bound collection made SQLite
# compile the statement again on every run: with a partial index declared, the plan of
# `collection = ? AND key IN (...)` depends on the bound value, so binding one expires the statement
# (sqlite3_stmt_status REPREPARE counted one per run). With the literal the compiled statement is reused,
# and one array keeps a collection's lookups to one statement text, which stays in the connection's
# statement cache (_STATEMENT_CACHE). (Before, an IN list of placeholders padded with NULLs to the next
# power of two did that: the padding cost a tenth more per key than the array.)
_KEYS_IN = "key IN (SELECT value FROM json_each(?))"


def _key_array(keys: Sequence[str]) -> tuple[str]:
    """The parameter of _KEYS_IN: `keys` as a JSON array."""
    return (orjson.dumps(list(keys)).decode("utf-8"),)


class SqliteStore(Store):
    backend = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["normal", "full"] = "normal",
        busy_timeout: float = 5.0,
        background_checkpoints: bool = False,
        wal_checkpoint_bytes: int = DEFAULT_THRESHOLD_BYTES,
        wal_max_bytes: int = DEFAULT_LIMIT_BYTES,
        wal_checkpoint_interval: float = DEFAULT_INTERVAL_SECONDS,
    ) -> None:
        if str(path) in ("", ":memory:") or str(path).startswith("file:"):
            raise InvalidArgument("path", f"{str(path)!r}: give a file path (use memory:// for a store in memory)")
        if synchronous.lower() not in ("normal", "full"):
            raise InvalidArgument("synchronous", f"must be 'normal' or 'full', got {synchronous!r}")
        if not 0 < wal_checkpoint_bytes < wal_max_bytes:
            raise InvalidArgument(
                "wal_checkpoint_bytes",
                f"must be positive and below wal_max_bytes ({wal_max_bytes}), got {wal_checkpoint_bytes}",
            )
        if not wal_checkpoint_interval > 0:
            raise InvalidArgument(
                "wal_checkpoint_interval", f"must be a positive number of seconds, got {wal_checkpoint_interval}"
            )
        self.path = Path(path)
        self._synchronous = synchronous.upper()
        self._busy_timeout = busy_timeout
        self._erase_owed = False  # an erase readers kept from finishing (writer thread only)
        # Writer thread only: bulk writes so far, and per collection the write count up to which its
        # puts are read first (see _fresh_candidates).
        self._writes = 0
        self._stale: dict[str, int] = {}
        self._faults = Faults(self.path)  # failures the operator must fix (event loop only)
        # collection -> field -> unique. Replaced wholesale (never mutated) and only on the writer thread,
        # so the event loop always sees a consistent mapping.
        self._indexes: dict[str, dict[str, bool]] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._checkpointer = (
            Checkpointer(
                self.path,
                threshold=wal_checkpoint_bytes,
                limit=wal_max_bytes,
                interval=wal_checkpoint_interval,
                busy_timeout=busy_timeout,
            )
            if background_checkpoints
            else None
        )
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cdp-sqlite-writer")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cdp-sqlite-reader")
        try:
            # Opened here, synchronously, so a bad path or a database from a newer release fails at
            # start-up rather than on the first request.
            self._wconn = self._writer.submit(self._open_writer).result()
            self._rconn = self._reader.submit(self._open_reader).result()
            if self._checkpointer is not None:
                self._checkpointer.start()
        except BaseException as exc:
            self._writer.shutdown()
            self._reader.shutdown()
            if isinstance(exc, sqlite3.Error):
                error = mapped(self.path, exc, self._busy_timeout)
                if error is exc:
                    raise
                raise error from exc
            raise

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    @property
    def wal_checkpoints(self) -> WalCheckpoints:
        """The checkpoints run so far (all zero with ``background_checkpoints=False``)."""
        return self._checkpointer.counts if self._checkpointer is not None else WalCheckpoints()

    # --- connections (each runs on its own thread) ---

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; the writer says BEGIN IMMEDIATE itself and the
        # reader's statements each see the latest commit.
        return sqlite3.connect(
            self.path, isolation_level=None, timeout=self._busy_timeout, cached_statements=_STATEMENT_CACHE
        )

    def _open_writer(self) -> sqlite3.Connection:
        conn = self._connect()
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise FailedPrecondition(
                    f"sqlite store {self.path}: cannot switch to WAL (journal_mode={mode}); use a local file system"
                )
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            # Deleted content is overwritten with zeros, so erasure does not depend on pages being reused.
            conn.execute("PRAGMA secure_delete=ON")
            if self._checkpointer is not None:
                for setting in self._checkpointer.writer_settings():
                    conn.execute(setting)
            else:
                conn.execute(f"PRAGMA wal_autocheckpoint={_AUTOCHECKPOINT_PAGES}")
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found > SCHEMA_VERSION:
                raise FailedPrecondition(
                    f"sqlite store {self.path} has schema version {found}, newer than this release "
                    f"understands ({SCHEMA_VERSION}); upgrade cdp"
                )
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
            self._indexes = self._load_indexes(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_reader(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.execute("PRAGMA query_only=ON")
        return conn

    @staticmethod
    def _load_indexes(conn: sqlite3.Connection) -> dict[str, dict[str, bool]]:
        declared: dict[str, dict[str, bool]] = {}
        for collection, field, unique in conn.execute("SELECT collection, field, is_unique FROM indexes"):
            declared.setdefault(collection, {})[field] = bool(unique)
        return declared

    async def _run(self, executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        try:
            result = await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        except sqlite3.Error as exc:  # a damaged page is a DatabaseError; a full disk an OperationalError
            error = mapped(self.path, exc, self._busy_timeout)
            if error is not exc:
                self._faults.failed(exc)
                raise error from exc
            raise
        if executor is self._writer:
            self._faults.wrote()
        return result

    @staticmethod
    def _record(row: tuple[str, int, str]) -> Record:
        return Record(row[0], row[1], orjson.loads(row[2]))

    # --- reads (reader thread) ---

    async def _get(self, collection: str, key: str) -> Record | None:
        return await self._run(self._reader, self._get_sync, collection, key)

    def _get_sync(self, collection: str, key: str) -> Record | None:
        row = self._rconn.execute(
            "SELECT key, version, doc FROM documents WHERE collection = ? AND key = ?", (collection, key)
        ).fetchone()
        return None if row is None else self._record(row)

    async def _get_many(self, collection: str, keys: list[str]) -> dict[str, Record]:
        return await self._run(self._reader, self._get_many_sync, collection, keys)

    def _get_many_sync(self, collection: str, keys: list[str]) -> dict[str, Record]:
        conn = self._rconn
        snapshot = len(keys) > _CHUNK
        if snapshot:  # one read transaction, so every chunk sees the same commit
            conn.execute("BEGIN")
        try:
            found = {}
            for chunk in _chunks(keys):
                rows = conn.execute(
                    f"SELECT key, version, doc FROM documents WHERE collection = '{collection}' AND {_KEYS_IN}",
                    _key_array(chunk),
                )
                for row in rows:
                    found[row[0]] = self._record(row)
            return found
        finally:
            if snapshot:
                conn.execute("COMMIT")

    async def _find(
        self, collection: str, field: str, value: Scalar, limit: int, after: str | None = None
    ) -> list[Record]:
        if field not in self._indexes.get(collection, {}):
            # Another process may have declared it since we loaded the declarations.
            await self._run(self._writer, self._reload_indexes)
            if field not in self._indexes.get(collection, {}):
                raise undeclared_field(collection, field)
        return await self._run(self._reader, self._find_sync, collection, field, value, limit, after)

    def _find_sync(
        self, collection: str, field: str, value: Scalar, limit: int, after: str | None = None
    ) -> list[Record]:
        kind, extracted = _index_expressions(field)
        token = index_token(value)
        assert token is not None
        rows = self._rconn.execute(
            f"SELECT key, version, doc FROM documents WHERE collection = '{collection}' "
            f"AND {kind} = ? AND {extracted} = ? AND key > ? ORDER BY key LIMIT ?",
            (token[0], token[1], after if after is not None else "", limit),
        )
        return [self._record(row) for row in rows]

    def find_query_plan(self, collection: str, field: str) -> str:
        """How SQLite runs `find` on this field (for tests and for anyone wondering)."""
        kind, extracted = _index_expressions(field)

        def explain() -> str:
            rows = self._rconn.execute(
                f"EXPLAIN QUERY PLAN SELECT key, version, doc FROM documents WHERE collection = '{collection}' "
                f"AND {kind} = ? AND {extracted} = ? ORDER BY key LIMIT ?",
                ("s", "x", 1),
            )
            return "\n".join(str(row[-1]) for row in rows)

        return self._reader.submit(explain).result()

    async def _scan(self, collection: str, keys: KeyRange, limit: int) -> Page:
        return await self._run(self._reader, self._scan_sync, collection, keys, limit)

    def _scan_sync(self, collection: str, keys: KeyRange, limit: int) -> Page:
        clauses: list[str] = [f"collection = '{collection}'"]  # a literal: see _KEYS_IN
        params: list[str] = []
        for clause, bound in (("key > ?", keys.after), ("key >= ?", keys.start), ("key < ?", keys.end)):
            if bound is not None:
                clauses.append(clause)
                params.append(bound)
        rows = self._rconn.execute(
            f"SELECT key, version, doc FROM documents WHERE {' AND '.join(clauses)} ORDER BY key LIMIT ?",
            (*params, limit + 1),
        )
        return make_page([self._record(row) for row in rows], limit)

    async def _count(self, collection: str) -> int:
        return await self._run(self._reader, self._count_sync, collection)

    def _count_sync(self, collection: str) -> int:
        return self._rconn.execute(f"SELECT count(*) FROM documents WHERE collection = '{collection}'").fetchone()[0]

    # --- writes (writer thread) ---

    async def _bulk_write(self, ops: list[WriteOp]) -> BulkResult:
        return await self._run(self._writer, self._write_sync, ops)

    async def _bulk_is_atomic(self) -> bool:
        return True

    def _write_sync(self, ops: list[WriteOp]) -> BulkResult:
        many = len(ops) > 1
        encoded: dict[int, str] = {}
        indexes = self._indexes
        for index, op in enumerate(ops):  # before BEGIN: no lock is held while Python encodes
            if isinstance(op, Put):
                fields = indexes.get(op.collection)
                if fields:
                    check_indexed_fields(op, fields, index if many else None)
                encoded[index] = encode_document(op, index if many else None).decode("utf-8")
        self._writes += 1
        named, fresh = self._fresh_candidates(ops)
        steps = None
        if fresh:
            steps = self._transaction(ops, named, encoded, many, fresh)
        if steps is None:  # no key is taken for new, or one taken for new was stored after all
            steps = self._transaction(ops, named, encoded, many, None)
        assert steps is not None
        self._after_commit()
        return bulk_result(steps)

    def _fresh_candidates(
        self, ops: list[WriteOp]
    ) -> tuple[dict[str, dict[str, None]], dict[str, dict[str, int]] | None]:
        """The keys `ops` name per collection (in order, once each), and the keys of `ops` written without
        reading their versions first, per collection, each with the version it is taken to be at (0:
        absent): a Put whose key no other op of `ops` names, of a collection whose unread puts have all
        held lately. One without an expected version (or expecting none) is taken for new - most are
        (timeline entries, outbox records); one expecting version n is taken to be at n - it is unless
        someone else wrote first. One that does not hold sends the whole write down the usual path."""
        stale = self._stale
        writes = self._writes
        fresh: dict[str, dict[str, int]] = {}
        named: dict[str, dict[str, None]] = {}
        repeated: list[tuple[str, str]] = []  # keys named more than once: never taken for new
        for op in ops:
            collection = op.collection
            seen = named.get(collection)
            if seen is None:
                seen = named[collection] = {}
            key = op.key
            if key in seen:
                repeated.append((collection, key))
            else:
                seen[key] = None
            if type(op) is Put and stale.get(collection, 0) <= writes:
                keys = fresh.get(collection)
                if keys is None:
                    keys = fresh[collection] = {}
                keys[key] = op.expected_version or 0
        for collection, key in repeated:
            keys = fresh.get(collection)
            if keys is not None:
                keys.pop(key, None)
        return named, {collection: keys for collection, keys in fresh.items() if keys} or None

    def _transaction(
        self,
        ops: list[WriteOp],
        named: dict[str, dict[str, None]],
        encoded: dict[int, str],
        many: bool,
        fresh: dict[str, dict[str, int]] | None,
    ) -> list[Step] | None:
        """Write `ops` in one transaction and return their steps. With `fresh` (see _fresh_candidates)
        those keys are written without a version read: None, and nothing written, when one of them was
        not at the version it was taken to be at (or when a unique index refused a row or a version
        check failed, which is then told apart on the usual path, where every key is read)."""
        conn = self._wconn
        conn.execute("BEGIN IMMEDIATE")
        try:
            versions, rowids = self._read_versions(named, fresh)
            try:
                steps = plan_bulk(ops, versions)
            except VersionConflict:
                if fresh is None:
                    raise
                # a key taken for new may be the first op that fails: the usual path names the right one
                conn.execute("ROLLBACK")
                return None
            try:
                missed = self._execute(steps, encoded, rowids, fresh)
            except sqlite3.IntegrityError as exc:
                conn.execute("ROLLBACK")
                if fresh is not None:
                    return None
                raise self._locate_unique_violation(exc, steps, encoded, many) from None
            if missed:
                conn.execute("ROLLBACK")
                for collection in missed:  # its puts are read first for a while
                    self._stale[collection] = self._writes + _STALE_WRITES
                return None
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return steps

    def _after_commit(self) -> None:
        if self._erase_owed:
            self._finish_erase()
        if self._checkpointer is not None:
            self._checkpointer.after_commit(self._wconn)

    def _read_versions(
        self, named: dict[str, dict[str, None]], fresh: dict[str, dict[str, int]] | None = None
    ) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
        """The version and the rowid of every key `named` (per collection) stored now (absent: not stored),
        but for the `fresh` keys, which are not read: taken to be at their version there (0: absent, which
        plan_bulk reads the same as a key not in the mapping)."""
        versions = {}
        rowids = {}
        execute = self._wconn.execute
        for collection, seen in named.items():
            where: dict[str, int] = {}
            skipped = fresh.get(collection) if fresh else None
            if skipped:
                # both made in C: the keys to read (in no particular order: each lands in a mapping) and
                # the versions the unread keys are taken to be at
                keys: Sequence[str] = list(seen.keys() - skipped.keys())
                found = dict(skipped)
            else:
                keys = list(seen)
                found = {}
            for chunk in _chunks(keys):
                rows = execute(
                    f"SELECT key, version, rowid FROM documents WHERE collection = '{collection}' AND {_KEYS_IN}",
                    _key_array(chunk),
                ).fetchall()
                # both mappings made in C, without a Python step per row
                found.update(zip(map(_FIRST, rows), map(_SECOND, rows), strict=True))
                where.update(zip(map(_FIRST, rows), map(_THIRD, rows), strict=True))
            versions[collection] = found
            rowids[collection] = where
        return versions, rowids

    def _execute(
        self,
        steps: Sequence[Step],
        encoded: dict[int, str],
        rowids: dict[str, dict[str, int]] | None = None,
        fresh: dict[str, dict[str, int]] | None = None,
    ) -> set[str]:
        """Run the steps in order, as few executemany calls as the order allows (one per run of the same
        statement): a write-behind batch of thousands of puts plus its checkpoint is two calls.

        `rowids`: where the keys read in this transaction are stored. A put or delete of such a key goes
        to its row directly (an update by rowid leaves the rowid as it is); every other put is an upsert
        by key. A deleted key leaves `rowids`: a later put of it in the same batch inserts a new row.

        `fresh`: keys not read, taken to be at a version; their puts insert only if the key is not stored
        (version 0), or update only the row of the key at that version. The collections of such puts that
        changed no row are returned (then the caller rolls back)."""
        statement: str | None = None
        rows: list[tuple] = []
        append = rows.append
        rowids = rowids or {}
        fresh = fresh or {}
        missed: set[str] = set()
        # A run of unread puts (_INSERT_NEW, _update_if) is one collection's and is checked: when it
        # changed fewer rows than it has, that collection alone is demoted.
        run: str | None = None
        checked = False
        check = False
        for op, index, before, after in steps:
            collection = op.collection
            where = rowids.get(collection)
            if after:  # a Put (a Delete leaves 0)
                rowid = where.get(op.key) if where else None
                if rowid is not None:
                    wanted, row = _UPDATE_ROW, (after, encoded[index], rowid)
                else:
                    keys = fresh.get(collection)
                    if not keys or op.key not in keys:
                        wanted, row = _UPSERT, (collection, op.key, after, encoded[index])
                    elif before:
                        wanted, row = _update_if(collection), (after, encoded[index], op.key, before)
                        check = True
                    else:
                        wanted, row = _INSERT_NEW, (collection, op.key, after, encoded[index])
                        check = True
            elif before:
                rowid = where.pop(op.key, None) if where else None
                if rowid is None:
                    wanted, row = _DELETE, (collection, op.key)
                else:
                    wanted, row = _DELETE_ROW, (rowid,)
            else:
                continue  # deleting an absent key
            if wanted is not statement or (check and collection != run):
                if rows:
                    self._run_rows(statement, rows, run if checked else None, missed)  # type: ignore[arg-type]
                    rows = []
                    append = rows.append
                statement = wanted
                run = collection
                checked = check
            check = False
            append(row)
        if rows:
            self._run_rows(statement, rows, run if checked else None, missed)  # type: ignore[arg-type]
        return missed

    def _run_rows(self, statement: str, rows: list[tuple], checked: str | None, missed: set[str]) -> None:
        """executemany; `checked`: the collection of a run of unread puts, each of which must change a row."""
        changed = self._wconn.executemany(statement, rows).rowcount
        if checked is not None and changed != len(rows):  # a key was not at the version it was taken to be at
            missed.add(checked)

    def _locate_unique_violation(
        self, exc: sqlite3.IntegrityError, steps: Sequence[Step], encoded: dict[int, str], many: bool
    ) -> Exception:
        match = _UNIQUE_FAILED.search(str(exc))
        if match is None:
            return exc
        conn = self._wconn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for step in steps:
                try:
                    self._execute([step], encoded)
                except sqlite3.IntegrityError:
                    op = step.op
                    assert isinstance(op, Put)
                    field = match.group(2)
                    return DuplicateValue(
                        op.collection, field, op.key, op.doc.get(field), op_index=step.index if many else None
                    )
        finally:
            conn.execute("ROLLBACK")
        return exc

    async def _ensure_index(self, collection: str, field: str, unique: bool) -> None:
        await self._run(self._writer, self._ensure_index_sync, collection, field, unique)

    def _ensure_index_sync(self, collection: str, field: str, unique: bool) -> None:
        conn = self._wconn
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(
                "SELECT is_unique FROM indexes WHERE collection = ? AND field = ?", (collection, field)
            ).fetchone()
            if row is not None:
                if bool(row[0]) != unique:
                    raise index_mismatch(collection, field, bool(row[0]))
            else:
                kind, extracted = _index_expressions(field)
                # A non-unique index also carries the key, so find's ORDER BY key LIMIT n reads n entries
                # in order instead of sorting every match.
                columns = f"{kind}, {extracted}" if unique else f"{kind}, {extracted}, key"
                try:
                    conn.execute(
                        f"CREATE {'UNIQUE ' if unique else ''}INDEX {_index_name(collection, field)} "
                        f"ON documents ({columns}) WHERE collection = '{collection}'"
                    )
                except sqlite3.IntegrityError:
                    raise duplicates_block_unique_index(collection, field) from None
                conn.execute(
                    "INSERT INTO indexes (collection, field, is_unique) VALUES (?, ?, ?)",
                    (collection, field, int(unique)),
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._indexes = self._load_indexes(conn)
        self._after_commit()

    def _reload_indexes(self) -> None:
        self._indexes = self._load_indexes(self._wconn)

    async def _drop_collection(self, collection: str) -> None:
        await self._run(self._writer, self._drop_sync, collection)

    def _drop_sync(self, collection: str) -> None:
        conn = self._wconn
        conn.execute("BEGIN IMMEDIATE")
        try:
            fields = [row[0] for row in conn.execute("SELECT field FROM indexes WHERE collection = ?", (collection,))]
            for field in fields:
                conn.execute(f"DROP INDEX IF EXISTS {_index_name(collection, field)}")
            conn.execute("DELETE FROM indexes WHERE collection = ?", (collection,))
            conn.execute("DELETE FROM documents WHERE collection = ?", (collection,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._indexes = self._load_indexes(conn)
        self._after_commit()

    async def _erase(self) -> bool:
        return await self._run(self._writer, self._erase_sync)

    def _erase_sync(self) -> bool:
        with self._checkpoint_lock():
            return self._erase_locked()

    def _checkpoint_lock(self) -> AbstractContextManager[object]:
        return self._checkpointer.lock if self._checkpointer is not None else nullcontext()

    def _erase_locked(self) -> bool:
        if self.path.stat().st_size <= _ERASE_REBUILD_MAX_BYTES:
            try:
                # Rebuilt from the live rows only: no freed or moved cell of anyone survives in a page gap.
                self._wconn.execute("VACUUM")
            except sqlite3.OperationalError as exc:  # busy: the truncation below still runs
                log.warning("sqlite store %s: rebuild after an erase failed (%s)", self.path, type(exc).__name__)
        for attempt in range(_ERASE_ATTEMPTS):
            if attempt:
                time.sleep(0.05 * attempt)
            # (busy, WAL frames, frames checkpointed); busy=1: a reader kept the checkpoint from finishing
            # even after waiting busy_timeout for it.
            busy, _, _ = self._wconn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy:
                self._erase_owed = False
                return True
        self._erase_owed = True
        log.warning("sqlite store %s: readers kept the WAL from being truncated; the next write tries again", self.path)
        return False

    def _finish_erase(self) -> None:
        """The owed truncation, after a write: tried once, without waiting for readers (a write must not
        stall behind them); a reader still there leaves it owed for the next write."""
        conn = self._wconn
        conn.execute("PRAGMA busy_timeout=0")
        try:
            with self._checkpoint_lock():  # waits for a background round in progress, not for readers
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.OperationalError:
            busy = 1
        finally:
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout * 1000)}")
        if not busy:
            self._erase_owed = False
            log.info("sqlite store %s: the write-ahead log an erase left behind is truncated now", self.path)

    def _close_writer(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self._wconn.close()

    async def _close(self) -> None:
        loop = asyncio.get_running_loop()
        # Queued behind any in-flight work, so pending writes finish (and commit) first; the checkpointer
        # goes before the writer, so the last connections to close are the writer's and reader's as ever.
        await loop.run_in_executor(self._writer, self._close_writer)
        await loop.run_in_executor(self._reader, self._rconn.close)
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)
        self._faults.closed()
