"""Blocking: only records that share a key become candidate pairs, so matching never compares all n² pairs.

A rule is a "+"-joined list of fields, each optionally sliced like a Python string:
"first_name[0:1]+last_name[0:3]+zip" makes records with the same first initial, surname prefix and zip
candidates. "{first_name,last_name}" is the two values as an unordered pair, so a record whose names were
entered the other way round shares the key. A record missing any part of a rule has no key for it. Candidates are the union over rules,
each pair once, never a record with itself. Keys are grouped by sorting integer codes, so the cost grows
with the number of pairs produced, not with n².
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .records import Column, RecordTable

_PART = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\[\s*(-?\d*)\s*:\s*(-?\d*)\s*\])?\s*$")
_UNORDERED = re.compile(r"^\s*\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\s*$")
_PAIR_SEPARATOR = "\x1e"


@dataclass(frozen=True)
class KeyPart:
    field: str
    start: int | None = None
    stop: int | None = None
    other: str | None = None  # {field,other}: both values, in either order

    @property
    def sliced(self) -> bool:
        return self.start is not None or self.stop is not None


@dataclass(frozen=True)
class BlockingRule:
    text: str
    parts: tuple[KeyPart, ...]

    @classmethod
    def parse(cls, text: object) -> BlockingRule:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"must be a rule like 'email' or 'first_name[0:1]+last_name', got {text!r}")
        parts = []
        for raw_part in text.split("+"):
            unordered = _UNORDERED.match(raw_part)
            if unordered is not None:
                parts.append(KeyPart(unordered.group(1), other=unordered.group(2)))
                continue
            match = _PART.match(raw_part)
            if match is None:
                raise ValueError(
                    f"cannot parse {raw_part.strip()!r} in {text!r}; "
                    "expected field or field[start:stop] (integers), joined by '+'"
                )
            name, start, stop = match.groups()
            parts.append(KeyPart(name, _bound(start), _bound(stop)))
        fields = [name for part in parts for name in (part.field, part.other) if name]
        if "id" in fields:
            raise ValueError("cannot block on 'id': every id is unique")
        if len(set(fields)) != len(fields):
            raise ValueError(f"a field appears twice in {text!r}")
        return cls(text=text.strip(), parts=tuple(parts))

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(name for part in self.parts for name in (part.field, part.other) if name)


def _bound(text: str | None) -> int | None:
    return int(text) if text else None


def unordered_piece(value: str, other: str) -> str:
    """The key piece of an unordered pair of values: the same whichever field holds which."""
    return _PAIR_SEPARATOR.join(sorted((value, other)))


def _unordered_codes(table: RecordTable, part: KeyPart) -> np.ndarray:
    first, second = table.columns[part.field], table.columns[part.other]
    index: dict[str, int] = {}
    codes = np.full(len(table), -1, dtype=np.int64)
    for row, (a, b) in enumerate(zip(first.codes.tolist(), second.codes.tolist(), strict=True)):
        if a >= 0 and b >= 0:
            piece = unordered_piece(first.values[a], second.values[b])
            codes[row] = index.setdefault(piece, len(index))
    return codes


def _part_codes(column: Column, part: KeyPart) -> np.ndarray:
    """Per record, the code of the (sliced) value; -1 when missing or when the slice is empty."""
    if not part.sliced:
        return column.codes
    index: dict[str, int] = {}
    sliced_codes = np.array(
        [
            index.setdefault(piece, len(index)) if (piece := value[part.start : part.stop]) else -1
            for value in column.values
        ]
        + [-1],  # position -1 serves records whose value is missing
        dtype=np.int64,
    )
    return sliced_codes[column.codes]


def rule_keys(table: RecordTable, rule: BlockingRule) -> np.ndarray:
    """One int64 key per record (equal keys = same block); -1 for records the rule cannot key."""
    keys: np.ndarray | None = None
    for part in rule.parts:
        if part.other:
            codes = _unordered_codes(table, part)
        else:
            codes = _part_codes(table.columns[part.field], part).astype(np.int64)
        if keys is None:
            keys = codes
            continue
        combined = np.where((keys >= 0) & (codes >= 0), keys * (int(codes.max(initial=0)) + 1) + codes, -1)
        # Renumber densely after every part so multi-part keys never overflow int64.
        valid = combined >= 0
        keys = np.full(len(combined), -1, dtype=np.int64)
        keys[valid] = np.unique(combined[valid], return_inverse=True)[1]
    assert keys is not None
    return keys


def _pairs_within_blocks(keys: np.ndarray, max_block_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """All pairs of rows with equal keys (-1 excluded) as (low row, high row), and how many blocks were
    skipped for exceeding max_block_size."""
    rows = np.flatnonzero(keys >= 0)
    if rows.size < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64), 0
    order = rows[np.argsort(keys[rows], kind="stable")]
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    oversized = int((sizes > max_block_size).sum())
    keep = (sizes >= 2) & (sizes <= max_block_size)
    # Every position p in a block [s, s+g) pairs with the positions after it: p+1 .. s+g-1.
    in_kept_block = np.repeat(keep, sizes)
    positions = np.flatnonzero(in_kept_block)
    block_end = np.repeat(starts + sizes, sizes)[in_kept_block]
    partners = block_end - positions - 1
    first = np.repeat(positions, partners)
    offsets = np.arange(first.size) - np.repeat(np.cumsum(partners) - partners, partners)
    second = first + 1 + offsets
    a, b = order[first], order[second]
    return np.minimum(a, b), np.maximum(a, b), oversized


@dataclass(frozen=True)
class CandidatePairs:
    left: np.ndarray  # int64 row positions, left < right, sorted, unique
    right: np.ndarray
    oversized_blocks: int

    def __len__(self) -> int:
        return len(self.left)


def candidate_pairs(table: RecordTable, rules: tuple[BlockingRule, ...], max_block_size: int) -> CandidatePairs:
    """The union of every rule's pairs, deduplicated."""
    n = len(table)
    encoded: list[np.ndarray] = []
    oversized = 0
    for rule in rules:
        low, high, skipped = _pairs_within_blocks(rule_keys(table, rule), max_block_size)
        oversized += skipped
        encoded.append(low * n + high)
    unique = np.unique(np.concatenate(encoded)) if encoded else np.empty(0, np.int64)
    return CandidatePairs(left=unique // max(n, 1), right=unique % max(n, 1), oversized_blocks=oversized)
