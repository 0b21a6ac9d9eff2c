"""Records as columns of integer codes: every distinct normalised value is stored once, so comparisons
and blocking work on small integer arrays and compare each distinct pair of values only once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from cdp_kit.errors import InvalidArgument

from .normalise import Normaliser, UnparseableValue

MISSING = -1


@dataclass
class Column:
    """One field: the distinct normalised values and, per record, the index of its value (-1 = missing)."""

    values: list[str]
    codes: np.ndarray  # int32, one per record
    index: dict[str, int]
    derived: dict[str, object] = field(default_factory=dict)  # per-value caches (parsed dates, numbers)

    @classmethod
    def from_values(cls, normalised: Sequence[str | None]) -> Column:
        index: dict[str, int] = {}
        codes = np.empty(len(normalised), dtype=np.int32)
        for row, value in enumerate(normalised):
            codes[row] = MISSING if value is None else index.setdefault(value, len(index))
        return cls(values=list(index), codes=codes, index=index)

    def codes_of(self, values: Sequence[str]) -> np.ndarray:
        """Codes of foreign values in this column's numbering; values it does not hold get -2."""
        return np.fromiter((self.index.get(value, -2) for value in values), dtype=np.int32, count=len(values))


@dataclass
class RecordTable:
    ids: list
    columns: dict[str, Column]
    sources: np.ndarray | None = None  # link_only: a code per record's source; pairs must differ in it

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_records(
        cls, records: Sequence[Mapping], normalisers: Mapping[str, Normaliser], *, unique_ids: bool = True
    ) -> RecordTable:
        ids = []
        for position, record in enumerate(records):
            if not isinstance(record, Mapping):
                raise InvalidArgument(f"records[{position}]", f"must be a dict of fields, got {type(record).__name__}")
            record_id = record.get("id")
            if record_id is None or record_id == "":
                raise InvalidArgument(f"records[{position}].id", "every record needs a non-empty 'id'")
            ids.append(record_id)
        if unique_ids and len(set(ids)) != len(ids):
            seen: set = set()
            for position, record_id in enumerate(ids):
                if record_id in seen:
                    raise InvalidArgument(f"records[{position}].id", f"duplicate id {record_id!r}; ids must be unique")
                seen.add(record_id)
        columns = {
            name: Column.from_values(_normalise_all([record.get(name) for record in records], normalise, name))
            for name, normalise in normalisers.items()
        }
        return cls(ids=ids, columns=columns)


def _normalise_all(raw_values: list, normalise: Normaliser, name: str) -> list[str | None]:
    """Normalise each distinct raw value once: names, cities and dates repeat a lot. A value that does not
    parse is refused with the record's position and the field, never dropped."""
    cache: dict = {}
    result = []
    for position, raw in enumerate(raw_values):
        try:
            try:
                value = cache[raw]
            except KeyError:
                value = cache[raw] = normalise(raw)
            except TypeError:  # an unhashable raw value: normalise it uncached
                value = normalise(raw)
        except UnparseableValue as error:
            raise InvalidArgument(f"records[{position}].{name}", str(error)) from None
        result.append(value)
    return result
