"""Transactions for the CLV models (BG/NBD, Gamma-Gamma): read from a transaction export (CSV or Parquet)
or from the platform's own orders (Order Completed events in the profile store), merged to one
transaction per customer and calendar day, and summarised per customer for a calibration / holdout split.

Same-day orders are one transaction, their values summed: the convention of Fader, Hardie & Lee's CDNOW
analyses (their summary of the CDNOW sample, 2,357 customers, is reproduced exactly this way from its raw
rows, 6,919 orders on 6,696 customer-days; see the tests). BG/NBD describes how often a customer comes back,
and a split basket or a second order an hour later is the same visit. Days are calendar days: a date as
written, a timestamp with a time zone in UTC, a naive timestamp as written; the platform's event times are
read in UTC.

A customer's summary (`summarise`), in a time unit of `unit_days` days, with day d's transaction at time d:
- x: repeat transactions (merged days after the first) up to and including the calibration end;
- t_x: time from the first transaction to the last one in calibration; T: from the first to the
  calibration end (so T = 38.86 weeks for a CDNOW customer whose first order was on 1997-01-01 and a
  calibration ending 1997-09-30);
- m: the mean value of the repeat transactions in calibration (the first is left out, as in Fader, Hardie
  & Lee 2005, "RFM and CLV": a first order's value often differs in kind), 0 without one;
- x_holdout, value_holdout: transactions and their value after the calibration end, up to the holdout end.
Customers whose first transaction comes after the calibration end have no summary (they are counted).

Errors name the column and the row (never the customer id: exports hold personal data), and say what to
write instead. Values must be finite and >= 0: returns and refunds are netted or dropped before, not here.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cdp_kit.errors import FailedPrecondition, InvalidArgument

DAY_SECONDS = 86_400.0
EPOCH = dt.date(1970, 1, 1).toordinal()
ORDER_EVENT = "Order Completed"
ORDER_VALUE_PROPERTY = "total"
FORMATS = ("csv", "parquet")


@dataclass(frozen=True, slots=True)
class Transactions:
    """Purchases, one per customer and calendar day (see the module docstring), sorted by customer, day."""

    customers: list[str]  # sorted, unique
    customer: np.ndarray  # int64 index into `customers`, per transaction
    day: np.ndarray  # int64 days since 1970-01-01
    value: np.ndarray | None  # float64, the day's orders summed; None when the source has no values
    rows: int  # orders read
    source: str

    @property
    def merged(self) -> int:
        """Orders folded into another order of the same customer and day."""
        return self.rows - len(self.day)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "orders": self.rows,
            "transactions": len(self.day),
            "same_day_orders_merged": self.merged,
            "customers": len(self.customers),
            "first_day": day_to_iso(int(self.day.min())) if len(self.day) else None,
            "last_day": day_to_iso(int(self.day.max())) if len(self.day) else None,
            "has_values": self.value is not None,
        }


def day_to_iso(day: int) -> str:
    return dt.date.fromordinal(day + EPOCH).isoformat()


def parse_day(text: str, field: str, date_format: str | None = None) -> int:
    """An ISO 8601 date or time (2024-03-01, 20240301, 2024-03-01T10:00:00Z) or one in `date_format`
    (strptime), as days since 1970-01-01."""
    text = text.strip()
    try:
        if date_format:
            return _day_of(dt.datetime.strptime(text, date_format))
        if len(text) <= 10:
            return dt.date.fromisoformat(text).toordinal() - EPOCH
        return _day_of(dt.datetime.fromisoformat(text))
    except ValueError:
        expected = f"a date in the format {date_format!r}" if date_format else "an ISO 8601 date or time (2024-03-01)"
        raise InvalidArgument(field, f"{text!r} is not {expected}; give the format with --date-format") from None


def _day_of(moment: dt.datetime) -> int:
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC)
    return moment.date().toordinal() - EPOCH


def merge_same_day(
    customer_ids: Sequence[str], days: np.ndarray, values: np.ndarray | None, *, source: str
) -> Transactions:
    """One transaction per customer and day, values summed (see the module docstring)."""
    rows = len(customer_ids)
    if rows == 0:
        raise FailedPrecondition(f"{source} holds no transactions")
    customers, index = np.unique(np.asarray(customer_ids, dtype=object).astype(str), return_inverse=True)
    days = np.asarray(days, dtype=np.int64)
    keys = np.stack([index.astype(np.int64), days], axis=1)
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    merged_value = None
    if values is not None:
        merged_value = np.zeros(len(unique), dtype=np.float64)
        np.add.at(merged_value, inverse.ravel(), np.asarray(values, dtype=np.float64))
    return Transactions(customers.tolist(), unique[:, 0], unique[:, 1], merged_value, rows, source)


def _value(raw: Any, field: str) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise InvalidArgument(field, f"{raw!r} is not a number (write 12.5, no currency sign)") from None
    if not np.isfinite(value) or value < 0:
        raise InvalidArgument(field, f"{raw!r} must be a finite amount >= 0 (net or drop returns before fitting)")
    return value


def read_transactions(
    path: str | Path,
    *,
    customer_column: str = "customer_id",
    date_column: str = "date",
    value_column: str | None = "value",
    date_format: str | None = None,
    file_format: str | None = None,
) -> Transactions:
    """A transaction export, one order a row: who, when and (unless `value_column` is None) how much.
    `file_format` is csv or parquet (default: from the suffix; .parquet/.pq are Parquet, else CSV)."""
    path = Path(path)
    if file_format is None:
        file_format = "parquet" if path.suffix.lower() in (".parquet", ".pq") else "csv"
    if file_format not in FORMATS:
        raise InvalidArgument("format", f"{file_format!r} is not one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise InvalidArgument("transactions", f"{str(path)!r} is not a file")
    columns = [customer_column, date_column, *([value_column] if value_column else [])]
    if file_format == "csv":
        ids, days, values = _read_csv(path, columns, date_format)
    else:
        ids, days, values = _read_parquet(path, columns, date_format)
    return merge_same_day(ids, np.asarray(days), None if value_column is None else np.asarray(values), source=path.name)


def _missing(columns: Sequence[str], present: Sequence[str], path: Path) -> None:
    for column in columns:
        if column not in present:
            raise InvalidArgument(
                column,
                f"no such column in {path.name} (it has: {', '.join(present) or 'none'}); name the right one with "
                "--customer-column / --date-column / --value-column",
            )


def _read_csv(path: Path, columns: list[str], date_format: str | None) -> tuple[list[str], list[int], list[float]]:
    customer_column, date_column = columns[0], columns[1]
    value_column = columns[2] if len(columns) > 2 else None
    ids: list[str] = []
    days: list[int] = []
    values: list[float] = []
    parsed: dict[str, int] = {}  # exports repeat dates: parse each once
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        _missing(columns, reader.fieldnames or [], path)
        for row in reader:
            where = f"line {reader.line_num}"
            customer = row[customer_column]
            if customer is None or not customer.strip():
                raise InvalidArgument(f"{customer_column} ({where})", "is empty: every order needs its customer")
            text = row[date_column]
            if text is None or not text.strip():
                raise InvalidArgument(f"{date_column} ({where})", "is empty: every order needs its date")
            day = parsed.get(text)
            if day is None:
                day = parsed[text] = parse_day(text, f"{date_column} ({where})", date_format)
            ids.append(customer.strip())
            days.append(day)
            if value_column is not None:
                values.append(_value(row[value_column], f"{value_column} ({where})"))
    return ids, days, values


def _read_parquet(path: Path, columns: list[str], date_format: str | None) -> tuple[list[str], list[int], list[float]]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise InvalidArgument("transactions", f"{path.name} is not a Parquet file ({error})") from None
    _missing(columns, schema.names, path)
    table = pq.read_table(path, columns=columns)
    customer_column, date_column = columns[0], columns[1]
    value_column = columns[2] if len(columns) > 2 else None
    for column in columns:
        nulls = table.column(column).null_count
        if nulls:
            first = int(pc.index(pc.is_null(table.column(column)), True).as_py())
            raise InvalidArgument(f"{column} (row {first + 1})", f"is empty ({nulls} empty in all)")
    ids = [str(v) for v in table.column(customer_column).to_pylist()]
    for i, customer in enumerate(ids):
        if not customer.strip():
            raise InvalidArgument(f"{customer_column} (row {i + 1})", "is empty: every order needs its customer")
    dates = table.column(date_column)
    kind = dates.type
    if pa.types.is_date(kind):
        days = pc.cast(dates, pa.date32()).cast(pa.int32()).to_numpy().astype(np.int64).tolist()
    elif pa.types.is_timestamp(kind):
        moments = dates if kind.tz is None else pc.cast(dates, pa.timestamp(kind.unit, "UTC"))
        days = [(m.date().toordinal() - EPOCH) for m in moments.to_pylist()]
    else:
        parsed: dict[str, int] = {}
        days = []
        for i, raw in enumerate(dates.to_pylist()):
            text = str(raw)
            day = parsed.get(text)
            if day is None:
                day = parsed[text] = parse_day(text, f"{date_column} (row {i + 1})", date_format)
            days.append(day)
    values: list[float] = []
    if value_column is not None:
        values = [
            _value(v, f"{value_column} (row {i + 1})") for i, v in enumerate(table.column(value_column).to_pylist())
        ]
    return ids, days, values


def orders_from_profiles(
    profiles: Iterable[Any], *, event: str = ORDER_EVENT, value_property: str | None = ORDER_VALUE_PROPERTY
) -> Transactions:
    """The platform's orders: every `event` on each live profile's timeline (`pointintime.StoredProfile`s,
    merged persons' histories joined), its value from `value_property` (a missing or non-numeric value
    counts as 0: the order happened). Days are UTC calendar days."""
    ids: list[str] = []
    days: list[int] = []
    values: list[float] = []
    for stored in profiles:
        for entry in stored.timeline:
            if entry.name != event:
                continue
            ids.append(stored.person_id)
            days.append(int(np.floor(entry.at / DAY_SECONDS)))
            if value_property is not None:
                amount = entry.properties.get(value_property)
                number = isinstance(amount, int | float) and not isinstance(amount, bool) and np.isfinite(amount)
                values.append(max(float(amount), 0.0) if number else 0.0)
    if not ids:
        raise FailedPrecondition(f"the profile store holds no {event!r} events: nothing to fit CLV on")
    return merge_same_day(
        ids, np.asarray(days), None if value_property is None else np.asarray(values), source="profile store"
    )


@dataclass(frozen=True, slots=True)
class Summary:
    """Per customer (first transaction at or before the calibration end), in units of `unit_days` days."""

    customers: list[str]
    first_day: np.ndarray  # int64
    x: np.ndarray
    t_x: np.ndarray
    T: np.ndarray
    m: np.ndarray  # mean value of the repeat transactions in calibration; 0 without one (or without values)
    x_holdout: np.ndarray
    value_holdout: np.ndarray
    unit_days: float
    calibration_end: int  # day, included in calibration
    holdout_end: int  # day, included in the holdout; == calibration_end: no holdout
    born_after_calibration: int  # customers left out: their first transaction is after the calibration end

    @property
    def holdout_length(self) -> float:
        return (self.holdout_end - self.calibration_end) / self.unit_days

    def describe(self) -> dict[str, Any]:
        return {
            "unit_days": self.unit_days,
            "calibration_end": day_to_iso(self.calibration_end),
            "holdout_end": day_to_iso(self.holdout_end),
            "holdout_length": round(self.holdout_length, 4),
            "customers": len(self.customers),
            "customers_with_repeat": int(np.sum(self.x > 0)),
            "repeat_transactions_calibration": int(self.x.sum()),
            "repeat_transactions_holdout": int(self.x_holdout.sum()),
            "customers_after_calibration_left_out": self.born_after_calibration,
        }


def summarise(tx: Transactions, *, calibration_end: int, holdout_end: int, unit_days: float) -> Summary:
    """Each customer's (x, t_x, T, m) up to `calibration_end` and what they did after it up to `holdout_end`
    (days since 1970-01-01, both included; see the module docstring)."""
    if unit_days <= 0:
        raise InvalidArgument("unit", f"a time unit must be a positive number of days, not {unit_days!r}")
    if holdout_end < calibration_end:
        raise InvalidArgument(
            "end",
            f"the end of the data ({day_to_iso(holdout_end)}) is before the calibration end "
            f"({day_to_iso(calibration_end)})",
        )
    n = len(tx.customers)
    first = np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(first, tx.customer, tx.day)
    cohort = first <= calibration_end
    if not cohort.any():
        raise FailedPrecondition(
            f"no customer bought on or before the calibration end {day_to_iso(calibration_end)}: nothing to fit"
        )
    in_cal = tx.day <= calibration_end
    in_hold = (tx.day > calibration_end) & (tx.day <= holdout_end)
    count_cal = np.bincount(tx.customer[in_cal], minlength=n)
    last_cal = np.full(n, np.iinfo(np.int64).min)
    np.maximum.at(last_cal, tx.customer[in_cal], tx.day[in_cal])
    x = np.maximum(count_cal - 1, 0).astype(np.float64)
    values = tx.value if tx.value is not None else np.zeros(len(tx.day))
    repeat = in_cal & (tx.day > first[tx.customer])  # a customer's first day is their one non-repeat
    repeat_value = np.bincount(tx.customer[repeat], weights=values[repeat], minlength=n)
    m = np.divide(repeat_value, x, out=np.zeros(n), where=x > 0)
    x_holdout = np.bincount(tx.customer[in_hold], minlength=n).astype(np.float64)
    value_holdout = np.bincount(tx.customer[in_hold], weights=values[in_hold], minlength=n)
    keep = np.flatnonzero(cohort)
    first_kept = first[keep]
    return Summary(
        customers=[tx.customers[i] for i in keep],
        first_day=first_kept,
        x=x[keep],
        t_x=(last_cal[keep] - first_kept) / unit_days,
        T=(calibration_end - first_kept) / unit_days,
        m=m[keep],
        x_holdout=x_holdout[keep],
        value_holdout=value_holdout[keep],
        unit_days=float(unit_days),
        calibration_end=int(calibration_end),
        holdout_end=int(holdout_end),
        born_after_calibration=int(n - keep.size),
    )
