"""What the storage port stores and writes, and the errors every adapter raises alike: `Record`, `Page`,
the write ops `Put` and `Delete`, `BulkResult`, `VersionConflict`, `DuplicateValue`, the index errors, and
the contract's limits. The contract itself is `port`'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

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
