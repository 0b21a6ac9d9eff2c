"""The checks every adapter makes before it stores anything, so that each refuses the same input with the
same error (`port`'s docstring lists what is portable): collection names, keys, fields, limits, documents
(a fast path for the common document, then an exact walk naming what is wrong), write ops, and the values
an indexed field may hold.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from math import isfinite
from typing import Any, Literal, TypeAlias

import orjson

from cdp_kit.errors import InvalidArgument
from cdp_kit.storage.model import (
    INT64_MAX,
    INT64_MIN,
    MAX_DEPTH,
    MAX_DOCUMENT_BYTES,
    MAX_KEY_CHARS,
    Delete,
    Document,
    Put,
    Scalar,
    WriteOp,
)

_COLLECTION_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


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


def _plain_values(values: Any, list_depth: int, dict_depth: int) -> bool:
    """`list_depth`/`dict_depth`: the depth `_check_list`/`_check_dict` would be given for a list/dict
    among these values."""
    if len(values) > _FEW:  # a few values are checked one by one faster than their kinds are collected
        kinds = set(map(type, values))
        if kinds == _STR:
            text = "".join(values)
            return text.isascii() or _valid_text(text)
        if kinds == _INT:
            return min(values) >= INT64_MIN and max(values) <= INT64_MAX
    # The kinds by how often documents hold them (records are mostly strings, times and absent values),
    # and a nested dict or list checked here rather than in a call of its own: documents are mostly
    # small dicts and lists, where the call was much of the cost.
    for item in values:
        kind = type(item)
        if kind is str:
            if not item.isascii() and not _valid_text(item):
                return False
        elif kind is float:
            if not isfinite(item):
                return False
        elif item is None:
            pass
        elif kind is dict:
            # `_plain_dict` inline
            if dict_depth > MAX_DEPTH:
                return False
            try:
                names = "".join(item)
            except TypeError:  # a key that is not a string
                return False
            if not names.isascii() or "$" in names or "\x00" in names:
                return False
            if item and not _plain_values(item.values(), dict_depth, dict_depth + 1):
                return False
        elif kind is list:
            # `_plain_list` inline; a long list of strings (ids, names) is checked in one go above
            if list_depth + 1 > MAX_DEPTH:
                return False
            if item and not _plain_values(item, list_depth + 1, list_depth + 2):
                return False
        elif kind is int:
            if not INT64_MIN <= item <= INT64_MAX:
                return False
        elif kind is not bool:
            return False
    return True


_FEW = 6
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
