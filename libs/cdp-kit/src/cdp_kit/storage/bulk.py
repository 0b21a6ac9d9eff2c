"""Planning a bulk write against the versions stored now: each op's step (or the conflict it meets), the
result the steps make, and the keys a bulk write touches per collection."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from operator import itemgetter
from typing import NamedTuple

from cdp_kit.storage.model import BulkResult, Put, VersionConflict, WriteOp


class Step(NamedTuple):
    """What one op does to its key: the version before (0 = absent) and after (0 = deleted). A tuple:
    one is made per op written, and a frozen dataclass costs several times as much to make."""

    op: WriteOp
    index: int
    before: int
    after: int


def plan_bulk(ops: Sequence[WriteOp], current: Mapping[str, Mapping[str, int]]) -> list[Step]:
    """Walk `ops` in order over the current versions of their keys (``current[collection][key]``,
    missing = absent) and return each op's step, or raise VersionConflict for the first op whose
    expected_version does not hold. Later ops see earlier ones: Put, Put on one key yields versions n+1,
    n+2."""
    # Every op written comes through here: versions are looked up per collection (no (collection, key)
    # tuple per op) and each Step is made with tuple.__new__ (a NamedTuple's own __new__ is a Python call).
    versions = {collection: dict(keyed) for collection, keyed in current.items()}
    steps = []
    append = steps.append
    new = tuple.__new__
    for index, op in enumerate(ops):
        keyed = versions.get(op.collection)
        if keyed is None:
            keyed = versions[op.collection] = {}
        key = op.key
        before = keyed.get(key, 0)
        expected = op.expected_version
        if expected is not None and expected != before:
            raise VersionConflict(
                op.collection,
                key,
                expected,
                before,
                op_index=index if len(ops) > 1 else None,
            )
        after = keyed[key] = before + 1 if isinstance(op, Put) else 0
        append(new(Step, (op, index, before, after)))
    return steps


def bulk_result(steps: Sequence[Step]) -> BulkResult:
    versions = tuple(map(_AFTER, steps))
    # after is 0 only for a Delete: look at those alone (most batches have none or a few)
    deleted = sum(1 for step in steps if not step.after and step.before) if 0 in versions else 0
    return BulkResult(versions, deleted)


_AFTER = itemgetter(3)


def keys_by_collection(ops: Iterable[WriteOp]) -> dict[str, list[str]]:
    grouped: dict[str, dict[str, None]] = {}
    for op in ops:
        keys = grouped.get(op.collection)
        if keys is None:
            keys = grouped[op.collection] = {}
        keys[op.key] = None
    return {collection: list(keys) for collection, keys in grouped.items()}
