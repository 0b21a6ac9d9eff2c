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
"""

from __future__ import annotations

import abc
import base64
import binascii
import math
import re
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from math import isfinite
from types import TracebackType
from typing import Any, Literal, NamedTuple, Self, TypeAlias

import orjson

from cdp_kit.errors import Conflict, FailedPrecondition, InvalidArgument

Document: TypeAlias = dict[str, Any]
Scalar: TypeAlias = str | int | float | bool

MAX_KEY_CHARS = 1024
MAX_DEPTH = 64
# A JSON size limit that keeps documents comfortably inside MongoDB's 16 MiB BSON limit; hot state that
# grows past this belongs in more than one document.
MAX_DOCUMENT_BYTES = 8 * 1024 * 1024
MAX_FIND_LIMIT = 10_000
MAX_SCAN_LIMIT = 10_000
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_COLLECTION_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_CURSOR_PREFIX = "k1."


@dataclass(frozen=True, slots=True)
class Record:
    """One stored document. `doc` is the caller's own copy: changing it changes nothing stored."""

    key: str
    version: int
    doc: Document


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a key-ordered scan; pass `next_cursor` back for the next page (None: no more)."""

    records: list[Record]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class Put:
    collection: str
    key: str
    doc: Document
    expected_version: int | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    collection: str
    key: str
    expected_version: int | None = None


WriteOp: TypeAlias = Put | Delete


@dataclass(frozen=True, slots=True)
class BulkResult:
    """`versions[i]` is the version op i left its key at (0 after a Delete); `deleted` counts the
    Deletes that removed a document."""

    versions: tuple[int, ...]
    deleted: int


class VersionConflict(Conflict):
    """A write's `expected_version` did not match: someone else wrote first."""

    reason = "version_conflict"

    def __init__(self, collection: str, key: str, expected: int, actual: int, *, op_index: int | None = None) -> None:
        wanted = "expected it not to exist" if expected == 0 else f"expected version {expected}"
        found = "it does not exist" if actual == 0 else f"it is at version {actual}"
        where = f"ops[{op_index}]: " if op_index is not None else ""
        # Keys stay out of messages (here and in every storage error): they are often identifier
        # values ("email:ada@example.com") and messages end up in logs. The key is on the exception.
        super().__init__(f"{where}{collection}: a write {wanted} but {found}; re-read it and retry")
        self.collection = collection
        self.key = key
        self.expected = expected
        self.actual = actual
        self.op_index = op_index


class DuplicateValue(Conflict):
    """A write would give a uniquely indexed field a value another document already holds."""

    reason = "duplicate_value"

    def __init__(self, collection: str, field: str, key: str, value: Any, *, op_index: int | None = None) -> None:
        # The value stays out of the message: unique fields are typically identifiers (emails, phone
        # numbers) and messages end up in logs. It is on the exception for callers that need it.
        where = f"ops[{op_index}]: " if op_index is not None else ""
        super().__init__(
            f"{where}{collection}: field {field!r} has a unique index and another document already holds this value"
        )
        self.collection = collection
        self.field = field
        self.key = key
        self.value = value
        self.op_index = op_index


# --- validation shared by every adapter -------------------------------------------------------------


def check_collection(collection: object) -> str:
    if not isinstance(collection, str) or not _COLLECTION_RE.fullmatch(collection):
        raise InvalidArgument(
            "collection",
            f"{collection!r} is not a collection name: use 1-100 of A-Z a-z 0-9 _ . - "
            f"starting with a letter, digit or _",
        )
    if collection.startswith("system."):
        raise InvalidArgument("collection", f"{collection!r}: names starting with 'system.' are reserved")
    if len(_CHECKED_COLLECTIONS) < _CHECKED_COLLECTIONS_MAX and type(collection) is str:
        _CHECKED_COLLECTIONS.add(collection)
    return collection


# Names that passed check_collection: a service writes the same few collections all the time, so
# check_op looks them up instead of matching the pattern again for every op. Bounded, in case a caller
# makes up names (past the bound, names are simply checked every time).
_CHECKED_COLLECTIONS: set[str] = set()
_CHECKED_COLLECTIONS_MAX = 10_000


def check_key(collection: str, key: object, *, field: str = "key") -> str:
    if not isinstance(key, str):
        raise InvalidArgument(field, f"keys are strings, got {type(key).__name__} (collection {collection!r})")
    if not key or len(key) > MAX_KEY_CHARS:
        raise InvalidArgument(
            field, f"keys are 1-{MAX_KEY_CHARS} characters, got {len(key)} (collection {collection!r})"
        )
    if "\x00" in key:
        raise InvalidArgument(field, f"the key contains a NUL character (collection {collection!r})")
    if not key.isascii():
        _check_unicode(key, lambda: InvalidArgument(field, f"the key is not valid Unicode (collection {collection!r})"))
    return key


def check_field(field: object) -> str:
    if not isinstance(field, str) or not _FIELD_RE.fullmatch(field):
        raise InvalidArgument(
            "field",
            f"{field!r} is not an indexable field name: use a top-level identifier ([A-Za-z_][A-Za-z0-9_]*)",
        )
    return field


def check_expected_version(expected: object, *, field: str = "expected_version") -> int | None:
    if expected is None:
        return None
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
        raise InvalidArgument(field, f"must be None, 0 (create) or a version >= 1, got {expected!r}")
    return expected


def check_limit(limit: object, maximum: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= maximum:
        raise InvalidArgument("limit", f"must be an integer from 1 to {maximum}, got {limit!r}")
    return limit


def check_find_value(field: str, value: object) -> Scalar:
    if isinstance(value, str):
        _check_unicode(value, lambda: InvalidArgument("value", f"the value for {field!r} is not valid Unicode"))
        return value
    if isinstance(value, (bool, int)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise InvalidArgument("value", f"find on {field!r} takes a string, number or boolean, got {type(value).__name__}")


class _BadValue(Exception):
    """Raised deep inside a document walk; each level adds its path segment on the way out, so the
    happy path never builds a path string."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        self.path: list[str] = []


def check_document(collection: str, key: str, doc: object, *, field: str = "doc") -> Document:
    """Raise InvalidArgument naming the offending path (e.g. ``doc.address.lines[2]``) unless `doc` is
    a portable document."""
    if not isinstance(doc, dict):
        raise InvalidArgument(field, f"documents are dicts, got {type(doc).__name__} (collection {collection!r})")
    try:
        if not _plain_dict(doc, 1):
            _check_dict(doc, 1)
    except _BadValue as bad:
        path = field + "".join(reversed(bad.path))
        raise InvalidArgument(path, f"{bad.problem} (collection {collection!r})") from None
    return doc


def _check_unicode(text: str, error: Any) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise error() from None


# The fast path. Every document written is walked before it is stored, so the common document - string
# keys that are ASCII without '$' or NUL; values that are str, finite float, 64-bit int, bool, None, or
# dicts and lists of those - is recognised with as little Python per value as possible: the keys of a
# dict are checked together, as one joined string, and a dict or list whose values are all strings (or
# all ints) is checked in C. It only says True or False: True when the document is certainly storable,
# False on anything else (including a '$' inside a name, a subclass, a non-ASCII name), and then the
# exact walk below (`_check_dict`) decides and names what is wrong, as it always did.


def _plain_dict(value: dict, depth: int) -> bool:
    if depth > MAX_DEPTH:
        return False
    try:
        names = "".join(value)
    except TypeError:  # a key that is not a string
        return False
    if not names.isascii() or "$" in names or "\x00" in names:
        return False
    return _plain_values(value.values(), depth, depth + 1)


def _plain_list(value: list, depth: int) -> bool:
    if depth + 1 > MAX_DEPTH:
        return False
    return _plain_values(value, depth + 1, depth + 2)


def _plain_values(values: Any, list_depth: int, dict_depth: int) -> bool:
    """`list_depth`/`dict_depth`: the depth `_check_list`/`_check_dict` would be given for a list/dict
    among these values."""
    kinds = set(map(type, values))
    if kinds == _STR:
        text = "".join(values)
        return text.isascii() or _valid_text(text)
    if kinds == _INT:
        return min(values) >= INT64_MIN and max(values) <= INT64_MAX
    for item in values:
        kind = type(item)
        if kind is str:
            if not item.isascii() and not _valid_text(item):
                return False
        elif kind is float:
            if not isfinite(item):
                return False
        elif kind is int:
            if not INT64_MIN <= item <= INT64_MAX:
                return False
        elif item is None or kind is bool:
            pass
        elif kind is dict:
            if not _plain_dict(item, dict_depth):
                return False
        elif kind is list:
            if not _plain_list(item, list_depth):
                return False
        else:
            return False
    return True


_STR = {str}
_INT = {int}


def _valid_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_dict(value: dict, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _BadValue(f"nests deeper than {MAX_DEPTH} levels")
    # Every value of every document written comes through here: the plain cases (an ASCII key, a str,
    # float, None, bool or int) are checked inline, without a call per value; anything else goes to
    # `_check_name` / `_check_value`, which decide exactly as before.
    for name, item in value.items():
        try:
            if type(name) is not str or not name.isascii() or name.startswith("$") or "\x00" in name:
                _check_name(name)
            kind = type(item)
            if kind is str:
                if not item.isascii():
                    _check_unicode(item, _bad_text)
            elif kind is float:
                if not isfinite(item):
                    raise _BadValue(f"is {item!r}; only finite numbers are stored")
            elif kind is dict:
                _check_dict(item, depth + 1)
            elif item is None or kind is bool:
                pass
            elif kind is int:
                if not INT64_MIN <= item <= INT64_MAX:
                    raise _BadValue("is an integer outside the signed 64-bit range; store it as a string")
            else:
                _check_value(item, depth)
        except _BadValue as bad:
            bad.path.append(f".{name}" if isinstance(name, str) and name.isidentifier() else f"[{name!r}]")
            raise


def _check_name(name: object) -> None:
    if not isinstance(name, str):
        raise _BadValue(f"has a {type(name).__name__} key {name!r}; keys are strings")
    if name.startswith("$") or "\x00" in name:
        raise _BadValue("is a field name starting with '$' or containing NUL (MongoDB reserves these)")
    if not name.isascii():
        _check_unicode(name, lambda: _BadValue("is a field name that is not valid Unicode"))


def _check_value(value: object, depth: int) -> None:
    kind = type(value)
    # Exact types first: this runs for every value of every document written.
    if kind is str:
        if not value.isascii():  # type: ignore[union-attr]
            _check_unicode(value, _bad_text)  # type: ignore[arg-type]
    elif value is None or kind is bool:
        return
    elif kind is int:
        if not INT64_MIN <= value <= INT64_MAX:  # type: ignore[operator]
            raise _BadValue("is an integer outside the signed 64-bit range; store it as a string")
    elif kind is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise _BadValue(f"is {value!r}; only finite numbers are stored")
    elif kind is dict:
        _check_dict(value, depth + 1)  # type: ignore[arg-type]
    elif kind is list:
        _check_list(value, depth)  # type: ignore[arg-type]
    # Subclasses (str enums, IntEnum, numpy.float64, OrderedDict) are stored as their base type.
    elif isinstance(value, bool):
        return
    elif isinstance(value, str):
        _check_unicode(value, _bad_text)
    elif isinstance(value, int):
        _check_value(int(value), depth)
    elif isinstance(value, float):
        _check_value(float(value), depth)
    elif isinstance(value, dict):
        _check_dict(value, depth + 1)
    elif isinstance(value, list):
        _check_list(value, depth)
    else:
        hint = "; store datetimes as ISO-8601 strings or epoch numbers" if hasattr(value, "isoformat") else ""
        raise _BadValue(f"is a {type(value).__name__}; documents hold None, bool, int, float, str, list, dict{hint}")


def _check_list(value: list, depth: int) -> None:
    if depth + 1 > MAX_DEPTH:
        raise _BadValue(f"nests deeper than {MAX_DEPTH} levels")
    for index, item in enumerate(value):
        try:
            kind = type(item)  # the plain cases inline, as in `_check_dict`
            if kind is str:
                if not item.isascii():
                    _check_unicode(item, _bad_text)
            elif kind is float:
                if not isfinite(item):
                    raise _BadValue(f"is {item!r}; only finite numbers are stored")
            elif item is None or kind is bool:
                pass
            elif kind is int:
                if not INT64_MIN <= item <= INT64_MAX:
                    raise _BadValue("is an integer outside the signed 64-bit range; store it as a string")
            else:
                _check_value(item, depth + 1)
        except _BadValue as bad:
            bad.path.append(f"[{index}]")
            raise


def _bad_text() -> _BadValue:
    return _BadValue("is a string that is not valid Unicode (a lone surrogate)")


def _json_default(value: object) -> object:
    # orjson handles str/int/dict/list subclasses itself but not float subclasses (numpy.float64).
    if isinstance(value, float):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not storable")


def encode_document(op: Put, op_index: int | None = None) -> bytes:
    """A checked document as JSON - the SQLite column format and the memory adapter's private copy -
    refused when it is over MAX_DOCUMENT_BYTES."""
    blob = orjson.dumps(op.doc, default=_json_default)
    if len(blob) > MAX_DOCUMENT_BYTES:
        where = f"ops[{op_index}]." if op_index is not None else ""
        raise InvalidArgument(
            f"{where}doc",
            f"a document of {op.collection!r} is {len(blob)} bytes as JSON, over the {MAX_DOCUMENT_BYTES} "
            f"limit; split it into several documents",
        )
    return blob


def check_op(op: object, index: int | None = None) -> WriteOp:
    """`op` if it is a Put or Delete of a valid collection, key, expected_version and document; else
    InvalidArgument naming the field (``ops[<index>].<field>`` in a bulk write)."""
    # Every op written comes through here. The common op - a collection already checked, an ASCII key,
    # a plain document (see _plain_dict) - is recognised without building any field name; everything
    # else is checked, and named, by _check_op.
    kind = type(op)
    if kind is Put or kind is Delete:
        collection, key, expected = op.collection, op.key, op.expected_version  # type: ignore[union-attr]
        if (
            type(collection) is str
            and collection in _CHECKED_COLLECTIONS
            and type(key) is str
            and 0 < len(key) <= MAX_KEY_CHARS
            and key.isascii()
            and "\x00" not in key
            and (expected is None or (type(expected) is int and expected >= 0))
            and (kind is Delete or (type(op.doc) is dict and _plain_dict(op.doc, 1)))  # type: ignore[union-attr]
        ):
            return op  # type: ignore[return-value]
    return _check_op(op, index)


def _check_op(op: object, index: int | None) -> WriteOp:
    where = f"ops[{index}]." if index is not None else ""
    if not isinstance(op, (Put, Delete)):
        raise InvalidArgument(where.rstrip(".") or "op", f"expected Put or Delete, got {type(op).__name__}")
    check_collection(op.collection)
    check_key(op.collection, op.key, field=f"{where}key")
    check_expected_version(op.expected_version, field=f"{where}expected_version")
    if isinstance(op, Put):
        check_document(op.collection, op.key, op.doc, field=f"{where}doc")
    return op


# --- indexed values -----------------------------------------------------------------------------------

IndexToken: TypeAlias = tuple[Literal["s", "n", "b"], Scalar]


def index_token(value: object) -> IndexToken | None:
    """What an indexed value is matched by: its kind plus the value (so True != 1 but 1 == 1.0).
    None when the value is not indexed (null, absent, or - for documents written before the index was
    declared - a list or dict)."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, float)):
        return ("n", value)
    if isinstance(value, str):
        return ("s", value)
    return None


def check_indexed_fields(op: Put, fields: Iterable[str], op_index: int | None = None) -> None:
    """Indexed fields hold scalars: a list would mean "match any element" on MongoDB and nothing on
    SQLite, so it is refused rather than behaving differently per backend."""
    for name in fields:
        value = op.doc.get(name)
        if isinstance(value, (list, dict)):
            where = f"ops[{op_index}]." if op_index is not None else ""
            raise InvalidArgument(
                f"{where}doc.{name}",
                f"{name!r} is indexed in {op.collection!r}, so it holds a string, number, boolean or null; "
                f"got {type(value).__name__} (collection {op.collection!r})",
            )


# --- scans ----------------------------------------------------------------------------------------------


def encode_cursor(last_key: str) -> str:
    return _CURSOR_PREFIX + base64.urlsafe_b64encode(last_key.encode("utf-8")).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: object) -> str:
    if isinstance(cursor, str) and cursor.startswith(_CURSOR_PREFIX):
        body = cursor[len(_CURSOR_PREFIX) :]
        try:
            key = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            pass
        else:
            if key:
                return key
    raise InvalidArgument("cursor", "not a cursor returned by scan; start again with cursor=None")


def prefix_end(prefix: str) -> str | None:
    """The smallest string above every string that starts with `prefix`, so a prefix scan is the key
    range [prefix, end) - an index range, not a filter. None: nothing bounds it (all U+10FFFF)."""
    head = prefix
    while head:
        last = ord(head[-1])
        head = head[:-1]
        if last < 0x10FFFF:
            following = last + 1
            if 0xD800 <= following <= 0xDFFF:  # keys never hold surrogates; skip the block
                following = 0xE000
            return head + chr(following)
    return None


@dataclass(frozen=True, slots=True)
class KeyRange:
    """The keys one scan page may return: above `after` (exclusive) or from `start` (inclusive), below
    `end` (exclusive); None means unbounded."""

    after: str | None
    start: str | None
    end: str | None

    def contains(self, key: str) -> bool:
        if self.after is not None and key <= self.after:
            return False
        if self.start is not None and key < self.start:
            return False
        return self.end is None or key < self.end


def scan_range(cursor: str | None, prefix: str | None) -> KeyRange:
    after = decode_cursor(cursor) if cursor is not None else None
    if not prefix:
        return KeyRange(after, None, None)
    if after is not None and after >= prefix:
        return KeyRange(after, None, prefix_end(prefix))
    return KeyRange(None, prefix, prefix_end(prefix))


def make_page(records: list[Record], limit: int) -> Page:
    """`records` holds up to limit+1 rows: the extra one only says another page exists."""
    if len(records) > limit:
        del records[limit:]
        return Page(records, encode_cursor(records[-1].key))
    return Page(records, None)


# --- bulk planning ----------------------------------------------------------------------------------------


class Step(NamedTuple):
    """What one op does to its key: the version before (0 = absent) and after (0 = deleted). A tuple:
    one is made per op written, and a frozen dataclass costs several times as much to make."""

    op: WriteOp
    index: int
    before: int
    after: int


def plan_bulk(ops: Sequence[WriteOp], current: Mapping[tuple[str, str], int]) -> list[Step]:
    """Walk `ops` in order over the current versions of their keys (missing = absent) and return each
    op's step, or raise VersionConflict for the first op whose expected_version does not hold. Later
    ops see earlier ones: Put, Put on one key yields versions n+1, n+2."""
    versions = dict(current)
    steps = []
    for index, op in enumerate(ops):
        ident = (op.collection, op.key)
        before = versions.get(ident, 0)
        if op.expected_version is not None and op.expected_version != before:
            raise VersionConflict(
                op.collection,
                op.key,
                op.expected_version,
                before,
                op_index=index if len(ops) > 1 else None,
            )
        after = before + 1 if isinstance(op, Put) else 0
        versions[ident] = after
        steps.append(Step(op, index, before, after))
    return steps


def bulk_result(steps: Sequence[Step]) -> BulkResult:
    deleted = sum(1 for step in steps if isinstance(step.op, Delete) and step.before > 0)
    return BulkResult(tuple(step.after for step in steps), deleted)


def keys_by_collection(ops: Iterable[WriteOp]) -> dict[str, list[str]]:
    grouped: dict[str, dict[str, None]] = {}
    for op in ops:
        grouped.setdefault(op.collection, {})[op.key] = None
    return {collection: list(keys) for collection, keys in grouped.items()}


# --- the port ---------------------------------------------------------------------------------------------


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

    async def find(self, collection: str, field: str, value: Scalar, *, limit: int = 100) -> list[Record]:
        """Documents whose top-level `field` equals `value`, ordered by key, at most `limit`.

        The field must have been declared with `ensure_index` (a lookup, never a scan): otherwise this
        raises InvalidArgument naming the field."""
        self._check_open()
        check_collection(collection)
        check_field(field)
        check_find_value(field, value)
        check_limit(limit, MAX_FIND_LIMIT)
        return await self._find(collection, field, value, limit)

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
    async def _find(self, collection: str, field: str, value: Scalar, limit: int) -> list[Record]: ...

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


def undeclared_field(collection: str, field: str) -> InvalidArgument:
    return InvalidArgument(
        "field",
        f"{field!r} is not indexed in {collection!r}: declare it at start-up with "
        f"ensure_index({collection!r}, {field!r}) so find stays an index lookup",
    )


def index_mismatch(collection: str, field: str, existing_unique: bool) -> FailedPrecondition:
    return FailedPrecondition(
        f"{collection}.{field} is already indexed with unique={existing_unique}; "
        f"an index cannot change kind in place - drop the collection or migrate it to a new one"
    )


def duplicates_block_unique_index(collection: str, field: str) -> Conflict:
    return Conflict(
        f"cannot make {collection}.{field} unique: existing documents share a value; resolve the duplicates first",
        reason="duplicate_value",
    )
