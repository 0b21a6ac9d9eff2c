"""Planning a bulk write against the versions stored now: each op's step (or the conflict it meets), the
result the steps make, and the keys a bulk write touches per collection."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from cdp_kit.storage.model import BulkResult, Delete, Put, VersionConflict, WriteOp


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
