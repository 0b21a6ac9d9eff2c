"""A population as columns, for the vectorised evaluator.

Each (field, sub-path) is one `Column` with typed views of the same values, so a test is a vector
operation on the view its literal needs:

    present   bool     the value is there (not missing, not null, not a non-finite number)
    number    float64  the value if it is a number (bools are not), else NaN
    codes     int32    index into `vocabulary` if the value is a string, else -1 (dictionary encoding: string
                       tests run once per distinct string, then gather with `mask[codes]`)
    bools     int8     1 / 0 for true / false, -1 for anything else
    time      float64  epoch seconds (numbers, ms by size, or ISO-8601 strings), else NaN
    lists     the rows holding lists, and those lists (only `contains` reads them, in Python)

Views come from the same functions the per-profile evaluator uses (`values`), applied once per row (or per
distinct string). `from_records` builds each view on first use; `from_arrays` builds them all up front, so
evaluation is vector work only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from functools import cached_property
from typing import Any

import numpy as np

from cdp_lang.percentiles import PercentileSpec, percentile_of
from cdp_lang.values import (
    MILLISECONDS_ABOVE,
    epoch_of_text,
    is_list,
    number,
    present,
)

_VIEWS = ("present", "number", "missing_number", "codes", "vocabulary", "bools", "time", "lists")


class Column:
    """One field (and sub-path) of every row, in typed views built on first use."""

    def __init__(self, size: int, values: Sequence[Any] | None = None) -> None:
        self.size = size
        self._values = values  # raw values, None = missing; None for a column made from typed arrays
        self._masks: dict[Hashable, np.ndarray] = {}

    @classmethod
    def absent(cls, size: int) -> Column:
        column = cls(size)
        views = column.__dict__
        views["present"] = np.zeros(size, dtype=bool)
        views["number"] = np.full(size, np.nan)
        views["codes"] = np.full(size, -1, dtype=np.int32)
        views["vocabulary"] = []
        views["bools"] = np.full(size, -1, dtype=np.int8)
        views["lists"] = (np.zeros(0, dtype=np.intp), [])
        return column

    @classmethod
    def from_array(cls, array: np.ndarray) -> Column:
        """A column from one array (bool, int, float with NaN = missing, str, or object with None = missing),
        every view built now."""
        if array.dtype.kind in "biufU":
            column = cls._typed(array)
        else:
            values = array.tolist()
            # The usual object array is text with gaps: encode it in one pass; anything else goes value by value.
            text_only = set(map(type, values)) <= {str, type(None)}
            column = cls._strings(values) if text_only else cls(len(values), values)
        for view in _VIEWS:
            getattr(column, view)
        return column

    @classmethod
    def _typed(cls, array: np.ndarray) -> Column:
        size = len(array)
        column = cls.absent(size)
        views = column.__dict__
        kind = array.dtype.kind
        if kind == "b":
            views["bools"] = array.astype(np.int8)
            views["present"] = np.ones(size, dtype=bool)
        elif kind == "U":
            vocabulary, codes = np.unique(array, return_inverse=True)
            views["vocabulary"] = vocabulary.tolist()
            views["codes"] = codes.astype(np.int32).reshape(size)
            views["present"] = np.ones(size, dtype=bool)
        else:
            numbers = array.astype(np.float64)
            numbers[~np.isfinite(numbers)] = np.nan
            views["number"] = numbers
            views["present"] = ~np.isnan(numbers)
        return column

    @classmethod
    def _strings(cls, values: list[str | None]) -> Column:
        size = len(values)
        column = cls.absent(size)
        # dict.fromkeys and map run in C: the vocabulary in first-seen order, then one lookup per row.
        vocabulary = [text for text in dict.fromkeys(values) if text is not None]
        code_of: dict[str | None, int] = {text: code for code, text in enumerate(vocabulary)}
        code_of[None] = -1
        codes = np.fromiter(map(code_of.__getitem__, values), dtype=np.int32, count=size)
        column.__dict__.update(codes=codes, vocabulary=vocabulary, present=codes >= 0)
        return column

    @property
    def values(self) -> Sequence[Any]:
        if self._values is None:
            raise AssertionError("views of a typed column are built up front")
        return self._values

    @cached_property
    def present(self) -> np.ndarray:
        return np.fromiter((present(value) for value in self.values), dtype=bool, count=self.size)

    @cached_property
    def number(self) -> np.ndarray:
        return np.fromiter(
            (math.nan if (found := number(value)) is None else found for value in self.values),
            dtype=np.float64,
            count=self.size,
        )

    @cached_property
    def missing_number(self) -> np.ndarray:
        return np.isnan(self.number)

    @cached_property
    def vocabulary(self) -> list[str]:
        self._encode()
        return self.__dict__["vocabulary"]

    @cached_property
    def codes(self) -> np.ndarray:
        self._encode()
        return self.__dict__["codes"]

    def _encode(self) -> None:
        index: dict[str, int] = {}
        codes = [index.setdefault(value, len(index)) if isinstance(value, str) else -1 for value in self.values]
        self.__dict__["codes"] = np.array(codes, dtype=np.int32).reshape(self.size)
        self.__dict__["vocabulary"] = list(index)

    @cached_property
    def index(self) -> dict[str, int]:
        return {text: code for code, text in enumerate(self.vocabulary)}

    @cached_property
    def bools(self) -> np.ndarray:
        return np.fromiter(
            ((1 if value else 0) if isinstance(value, bool) else -1 for value in self.values),
            dtype=np.int8,
            count=self.size,
        )

    @cached_property
    def time(self) -> np.ndarray:
        numbers = self.number
        seconds = np.where(np.abs(numbers) > MILLISECONDS_ABOVE, numbers / 1000.0, numbers)
        if self.vocabulary:
            epochs = [epoch_of_text(text) for text in self.vocabulary]
            by_code = np.array([math.nan if e is None else e for e in epochs] + [math.nan], dtype=np.float64)
            strings = self.codes >= 0
            seconds[strings] = by_code[self.codes[strings]]
        return seconds

    @cached_property
    def lists(self) -> tuple[np.ndarray, list[Any]]:
        rows = [i for i, value in enumerate(self.values) if is_list(value)]
        return np.array(rows, dtype=np.intp), [self.values[i] for i in rows]

    def string_mask(self, key: Hashable, keep: Callable[[str], bool]) -> np.ndarray:
        """Rows whose value is a string that `keep` accepts; `keep` runs once per distinct string."""
        if not self.vocabulary:
            return np.zeros(self.size, dtype=bool)
        by_code = self._masks.get(key)
        if by_code is None:
            # One entry per string, plus False at the end for code -1 (not a string).
            by_code = np.array([keep(text) for text in self.vocabulary] + [False], dtype=bool)
            self._masks[key] = by_code
        return by_code[self.codes]


class Columns:
    """The population the vectorised evaluator reads: `size` rows, a `Column` per (field, sub-path).

    `percentiles` (key -> value) are the population percentiles a definition compares with, given when these
    rows are a chunk of a larger population; without them each is computed from these rows (`percentiles`)."""

    def __init__(
        self,
        size: int,
        fields: Callable[[str], Column | None],
        percentiles: Mapping[str, float | None] | None = None,
    ) -> None:
        self.size = size
        self._fields = fields  # field key -> its column (None: no such field)
        self._columns: dict[tuple[str, tuple[str, ...]], Column] = {}
        self._percentiles: dict[str, float | None] = dict(percentiles) if percentiles is not None else {}
        self._given = percentiles is not None

    @classmethod
    def from_records(
        cls, records: Sequence[Mapping[str, Any]], percentiles: Mapping[str, float | None] | None = None
    ) -> Columns:
        """Columns over records (flat field key -> JSON value), each built on first use and kept."""
        rows = list(records)
        return cls(len(rows), lambda field: Column(len(rows), [record.get(field) for record in rows]), percentiles)

    def percentile(self, spec: PercentileSpec) -> float | None:
        """The population percentile `spec` names: given, or computed once from these rows."""
        if spec.key not in self._percentiles:
            self._percentiles[spec.key] = (
                None if self._given else percentile_of(self.column(spec.field, spec.sub).number, spec.percent)
            )
        return self._percentiles[spec.key]

    @classmethod
    def from_arrays(cls, size: int, arrays: Mapping[str, np.ndarray | list[Any]]) -> Columns:
        """Columns over one array per field key: float (NaN = missing), int, bool, str, or object (None = missing).

        Every view is built here; a list is read value by value, like records are.
        """
        columns: dict[str, Column] = {}
        for field, array in arrays.items():
            if len(array) != size:
                raise ValueError(f"array {field!r} has {len(array)} rows, expected {size}")
            if isinstance(array, np.ndarray):
                columns[field] = Column.from_array(array)
            else:
                columns[field] = Column(size, list(array))
                for view in _VIEWS:
                    getattr(columns[field], view)
        return cls(size, columns.get)

    def column(self, field: str, sub: tuple[str, ...] = ()) -> Column:
        key = (field, sub)
        column = self._columns.get(key)
        if column is None:
            if not sub:
                column = self._fields(field) or self._absent
            else:
                parent = self.column(field, sub[:-1])
                if parent._values is None:
                    column = self._absent  # typed values (numbers, strings, bools) have no keys to step into
                else:
                    step = sub[-1]
                    column = Column(self.size, [v.get(step) if isinstance(v, dict) else None for v in parent.values])
            self._columns[key] = column
        return column

    @cached_property
    def _absent(self) -> Column:
        return Column.absent(self.size)
