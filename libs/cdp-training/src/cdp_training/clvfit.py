"""CLV on real transactions: BG/NBD + Gamma-Gamma fitted to a customer base's own purchases, with the
diagnostics of Fader, Hardie & Lee (2005), and the predictions over a horizon.

`analyse(tx, ...)` does what a data scientist does with the paper in hand:
1. splits the data at the calibration end (default: halfway between the first and the last day) and fits
   both models on the calibration period (`bgnbd.fit_bgnbd`, `bgnbd.fit_gamma_gamma`: guarded, each with its
   optimiser report: converged or not, parameters at a bound);
2. judges the fit on the holdout period: predicted vs actual repeat transactions in total, and by the
   number of repeat transactions in calibration (0, 1, ..., `censor`+: the paper's conditional-expectations
   table), E[Y(t) | x, t_x, T] against what each group did; Gamma-Gamma's expected transaction value against
   the mean value of the holdout transactions of the customers who had some; and the cumulative tracking
   per period: actual repeat transactions of the calibration cohort against the model's
   sum_i E[X(t - s_i)] (s_i: customer i's first purchase), through calibration and holdout;
3. refits on everything up to the end and predicts, per customer, P(alive), expected transactions and
   value over the horizon, and CLV = expected transactions x expected value (undiscounted).

Gamma-Gamma reads the mean value of repeat transactions in calibration (`transactions.summarise`), fitted
on customers with at least one. Everything is in the chosen time unit (weeks or days): the parameters
alpha (BG/NBD) are per that unit, and the horizon and holdout are counted in it.

The output is data (`analyse` returns a JSON-able dict) and a text rendering of it (`render`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from cdp_kit.errors import InvalidArgument
from cdp_training.bgnbd import BgNbd, FitReport, GammaGamma, fit_bgnbd, fit_gamma_gamma
from cdp_training.transactions import Summary, Transactions, day_to_iso, parse_day, summarise

UNITS = {"days": 1.0, "weeks": 7.0}
DEFAULT_HORIZON_DAYS = 365.0
DEFAULT_CENSOR = 7  # the paper groups customers with 7 or more calibration repeat transactions
TRACKING_LINES = 80  # the text rendering thins the tracking table to about this many rows


@dataclass(frozen=True, slots=True)
class Fitted:
    bgnbd: BgNbd
    bgnbd_report: FitReport
    gamma_gamma: GammaGamma | None  # None: no values, or no customer with a repeat transaction of value > 0
    gamma_gamma_report: FitReport | None
    seconds: float

    @property
    def warnings(self) -> list[str]:
        return [*self.bgnbd_report.warnings, *(self.gamma_gamma_report.warnings if self.gamma_gamma_report else [])]

    def as_dict(self) -> dict[str, Any]:
        return {
            "bgnbd": self.bgnbd_report.as_dict(),
            "gamma_gamma": self.gamma_gamma_report.as_dict() if self.gamma_gamma_report else None,
            "fit_seconds": round(self.seconds, 4),
        }


def fit(summary: Summary, *, with_values: bool = True) -> Fitted:
    """Both models on the calibration summaries (raises `bgnbd.FitRejected` on a meaningless fit)."""
    started = time.perf_counter()
    bgnbd, bgnbd_report = fit_bgnbd(summary.x, summary.t_x, summary.T)
    spend = spend_report = None
    if with_values and np.any((summary.x > 0) & (summary.m > 0)):
        spend, spend_report = fit_gamma_gamma(summary.x, summary.m)
    return Fitted(bgnbd, bgnbd_report, spend, spend_report, time.perf_counter() - started)


def by_frequency(model: BgNbd, summary: Summary, censor: int = DEFAULT_CENSOR) -> list[dict[str, Any]]:
    """The paper's conditional-expectations table: per number of calibration repeat transactions (the last
    group: `censor` or more), customers, and mean holdout repeat transactions actual and predicted."""
    predicted = model.expected(summary.holdout_length, summary.x, summary.t_x, summary.T)
    group = np.minimum(summary.x, censor).astype(int)
    rows = []
    for k in range(censor + 1):
        members = group == k
        n = int(members.sum())
        rows.append(
            {
                "x": f"{k}+" if k == censor else str(k),
                "customers": n,
                "actual_mean": round(float(summary.x_holdout[members].mean()), 4) if n else None,
                "predicted_mean": round(float(predicted[members].mean()), 4) if n else None,
            }
        )
    return rows


def tracking(model: BgNbd, summary: Summary) -> list[dict[str, Any]]:
    """Cumulative repeat transactions of the calibration cohort per period (of one time unit, from the day of
    the earliest first purchase), actual and predicted (sum_i E[X(t - s_i)]), through the holdout end."""
    unit = summary.unit_days
    start = int(summary.first_day.min())
    periods = int(np.ceil((summary.holdout_end - start + 1) / unit))
    ends = np.arange(1, periods + 1) * unit  # days after `start` at each period's end
    offsets = (summary.first_day - start).astype(np.float64)  # s_i, in days
    # (the actual counts need the transactions themselves, not the summary: `tracking_actual` adds them)
    predicted = np.zeros(periods)
    firsts, counts = np.unique(offsets, return_counts=True)  # customers starting on one day share E[X(t - s)]
    for s, n in zip(firsts, counts, strict=True):
        elapsed = (ends - s) / unit
        predicted += n * model.expected_new(np.maximum(elapsed, 0.0))
    return [
        {
            "period": k + 1,
            "ends": day_to_iso(start + int(np.ceil(ends[k])) - 1),
            "phase": "calibration" if start + ends[k] - 1 <= summary.calibration_end else "holdout",
            "predicted_cumulative": round(float(predicted[k]), 3),
        }
        for k in range(periods)
    ]


def tracking_actual(tx: Transactions, summary: Summary, rows: list[dict[str, Any]]) -> None:
    """Adds `actual_cumulative` to the `tracking` rows: repeat transactions of the cohort up to each period end."""
    index = {c: i for i, c in enumerate(tx.customers)}
    cohort = np.zeros(len(tx.customers), dtype=bool)
    cohort[[index[c] for c in summary.customers]] = True
    first = np.full(len(tx.customers), np.iinfo(np.int64).max)
    np.minimum.at(first, tx.customer, tx.day)
    start = int(summary.first_day.min())
    repeat = cohort[tx.customer] & (tx.day > first[tx.customer]) & (tx.day <= summary.holdout_end)
    period = np.floor((tx.day[repeat] - start) / summary.unit_days).astype(int)  # 0-based period of each
    per_period = np.bincount(period, minlength=len(rows))[: len(rows)]
    cumulative = np.cumsum(per_period)
    for row, actual in zip(rows, cumulative, strict=True):
        row["actual_cumulative"] = int(actual)


def holdout_totals(fitted: Fitted, summary: Summary) -> dict[str, Any]:
    model = fitted.bgnbd
    predicted = model.expected(summary.holdout_length, summary.x, summary.t_x, summary.T)
    actual = summary.x_holdout
    in_sample = model.expected_new(summary.T)
    out: dict[str, Any] = {
        "holdout_length": round(summary.holdout_length, 4),
        "predicted_transactions": round(float(predicted.sum()), 2),
        "actual_transactions": int(actual.sum()),
        "predicted_over_actual": round(float(predicted.sum() / actual.sum()), 4) if actual.sum() else None,
        "mean_absolute_error_per_customer": round(float(np.mean(np.abs(predicted - actual))), 4),
        "correlation": round(float(np.corrcoef(predicted, actual)[0, 1]), 4)
        if actual.std() and predicted.std()
        else None,
        # the fit in sample: the model's repeat transactions over each customer's calibration time
        "calibration_predicted_transactions": round(float(in_sample.sum()), 2),
        "calibration_actual_transactions": int(summary.x.sum()),
    }
    if fitted.gamma_gamma is not None:
        buyers = (summary.x > 0) & (summary.x_holdout > 0)
        if buyers.any():
            expected_value = fitted.gamma_gamma.expected(summary.x[buyers], summary.m[buyers])
            actual_value = summary.value_holdout[buyers] / summary.x_holdout[buyers]
            out["transaction_value"] = {
                "customers": int(buyers.sum()),
                "predicted_mean": round(float(expected_value.mean()), 4),
                "actual_mean": round(float(actual_value.mean()), 4),
                "predicted_over_actual": round(float(expected_value.mean() / actual_value.mean()), 4)
                if actual_value.mean()
                else None,
            }
    return out


@dataclass(frozen=True, slots=True)
class Predictions:
    customers: list[str]
    p_alive: np.ndarray
    expected_transactions: np.ndarray
    expected_value: np.ndarray | None
    clv: np.ndarray | None

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for i, customer in enumerate(self.customers):
            row = {
                "customer_id": customer,
                "p_alive": float(self.p_alive[i]),
                "expected_transactions": float(self.expected_transactions[i]),
            }
            if self.clv is not None and self.expected_value is not None:
                row["expected_value"] = float(self.expected_value[i])
                row["clv"] = float(self.clv[i])
            out.append(row)
        return out


def predict(fitted: Fitted, summary: Summary, horizon: float) -> Predictions:
    """Per customer, over `horizon` units after the calibration end of `summary`."""
    model = fitted.bgnbd
    expected = model.expected(horizon, summary.x, summary.t_x, summary.T)
    alive = model.p_alive(summary.x, summary.t_x, summary.T)
    value = clv = None
    if fitted.gamma_gamma is not None:
        value = fitted.gamma_gamma.expected(summary.x, summary.m)
        clv = expected * value
    return Predictions(summary.customers, alive, expected, value, clv)


def _day(value: str | int | None, field: str) -> int | None:
    if value is None or isinstance(value, int):
        return value
    return parse_day(value, field)


def analyse(
    tx: Transactions,
    *,
    unit: str = "weeks",
    calibration_end: str | int | None = None,
    end: str | int | None = None,
    horizon: float | None = None,
    censor: int = DEFAULT_CENSOR,
) -> tuple[dict[str, Any], Predictions]:
    """The report (see the module docstring) and the per-customer predictions. Dates are ISO strings or days
    since 1970-01-01; `horizon` is in `unit`s (default: 365 days)."""
    if unit not in UNITS:
        raise InvalidArgument("unit", f"{unit!r} is not one of {', '.join(UNITS)}")
    unit_days = UNITS[unit]
    if horizon is None:
        horizon = DEFAULT_HORIZON_DAYS / unit_days
    if not (np.isfinite(horizon) and horizon > 0):
        raise InvalidArgument("horizon", f"{horizon!r} must be a positive number of {unit}")
    if censor < 1:
        raise InvalidArgument("censor", f"{censor!r} must be at least 1")
    first, last = int(tx.day.min()), int(tx.day.max())
    end_day = _day(end, "end")
    end_day = last if end_day is None else end_day
    cal_day = _day(calibration_end, "calibration_end")
    cal_day = first + (end_day - first) // 2 if cal_day is None else cal_day
    if cal_day > end_day:
        raise InvalidArgument(
            "calibration_end", f"{day_to_iso(cal_day)} is after the end of the data {day_to_iso(end_day)}"
        )
    warnings: list[str] = []
    report: dict[str, Any] = {
        "data": tx.describe(),
        "unit": unit,
        "same_day_orders": "merged into one transaction per customer and day, values summed (Fader & Hardie's "
        "CDNOW convention)",
    }
    calibration = summarise(tx, calibration_end=cal_day, holdout_end=end_day, unit_days=unit_days)
    report["calibration"] = calibration.describe()
    if calibration.holdout_end > calibration.calibration_end:
        calibrated = fit(calibration, with_values=tx.value is not None)
        warnings += [f"calibration fit: {w}" for w in calibrated.warnings]
        rows = tracking(calibrated.bgnbd, calibration)
        tracking_actual(tx, calibration, rows)
        report["calibration_fit"] = calibrated.as_dict()
        report["holdout"] = holdout_totals(calibrated, calibration)
        report["by_frequency"] = by_frequency(calibrated.bgnbd, calibration, censor)
        report["tracking"] = rows
    final_summary = summarise(tx, calibration_end=end_day, holdout_end=end_day, unit_days=unit_days)
    final = fit(final_summary, with_values=tx.value is not None)
    warnings += [f"final fit: {w}" for w in final.warnings]
    predictions = predict(final, final_summary, horizon)
    report["final_fit"] = {
        **final.as_dict(),
        "data_until": day_to_iso(end_day),
        "customers": len(final_summary.customers),
    }
    totals: dict[str, Any] = {
        "horizon": horizon,
        "from": day_to_iso(end_day),
        "customers": len(predictions.customers),
        "expected_transactions": round(float(predictions.expected_transactions.sum()), 2),
        "mean_p_alive": round(float(predictions.p_alive.mean()), 4),
    }
    if predictions.clv is not None:
        totals["clv_total"] = round(float(predictions.clv.sum()), 2)
        totals["clv_mean"] = round(float(predictions.clv.mean()), 4)
        totals["discounting"] = "none"
    report["predictions"] = totals
    report["warnings"] = warnings
    return report, predictions


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    text = [[str(h) for h in header]] + [
        ["-" if v is None else f"{v:,.3f}" if isinstance(v, float) else str(v) for v in r] for r in rows
    ]
    widths = [max(len(r[i]) for r in text) for i in range(len(header))]
    return ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in text]


def _parameters(fit_report: dict[str, Any] | None) -> str:
    if fit_report is None:
        return "not fitted (no transaction values)"
    params = ", ".join(f"{k}={v:.4g}" for k, v in fit_report["parameters"].items())
    state = "converged" if fit_report["converged"] else "NOT CONVERGED"
    bounds = "".join(f"; {k} AT {side.upper()} BOUND" for k, side in fit_report["at_bound"].items())
    return f"{params}  ({state}{bounds}; {fit_report['customers']} customers)"


def render(report: dict[str, Any]) -> str:
    """The report as text tables: what a person reads in a terminal."""
    data, unit = report["data"], report["unit"]
    lines = [
        f"{data['source']}: {data['orders']:,} orders -> {data['transactions']:,} transactions "
        f"({data['same_day_orders_merged']:,} same-day orders merged), {data['customers']:,} customers, "
        f"{data['first_day']} .. {data['last_day']}; time unit: {unit}",
    ]
    cal = report["calibration"]
    lines.append(
        f"calibration up to {cal['calibration_end']} ({cal['customers']:,} customers), holdout to {cal['holdout_end']} "
        f"({cal['holdout_length']:g} {unit})"
    )
    if "calibration_fit" in report:
        fitted, hold = report["calibration_fit"], report["holdout"]
        lines += [
            "",
            "calibration fit",
            f"  BG/NBD       {_parameters(fitted['bgnbd'])}",
            f"  Gamma-Gamma  {_parameters(fitted['gamma_gamma'])}",
            "",
            f"holdout: predicted {hold['predicted_transactions']:,.1f} repeat transactions, actual "
            f"{hold['actual_transactions']:,} (predicted/actual {hold['predicted_over_actual']})",
        ]
        if "transaction_value" in hold:
            value = hold["transaction_value"]
            lines.append(
                f"holdout transaction value: predicted mean {value['predicted_mean']:,.2f}, actual "
                f"{value['actual_mean']:,.2f} ({value['customers']:,} customers buying in both periods)"
            )
        lines += ["", "holdout repeat transactions per customer by calibration repeat transactions"]
        lines += [
            "  " + line
            for line in _table(
                ["x", "customers", "actual", "predicted"],
                [[r["x"], r["customers"], r["actual_mean"], r["predicted_mean"]] for r in report["by_frequency"]],
            )
        ]
        rows = report["tracking"]
        step = -(-len(rows) // TRACKING_LINES)  # a terminal's worth of rows; the JSON has every period
        last_calibration = max((r["period"] for r in rows if r["phase"] == "calibration"), default=0)
        shown = [r for r in rows if r["period"] % step == 0 or r["period"] in (1, last_calibration, len(rows))]
        every = f"every {step} {unit}" if step > 1 else f"per {unit[:-1]}"
        lines += ["", f"cumulative repeat transactions of the calibration customers, {every}"]
        lines += [
            "  " + line
            for line in _table(
                ["period", "ends", "phase", "actual", "predicted"],
                [
                    [r["period"], r["ends"], r["phase"], r["actual_cumulative"], r["predicted_cumulative"]]
                    for r in shown
                ],
            )
        ]
    final, totals = report["final_fit"], report["predictions"]
    lines += [
        "",
        f"final fit on everything to {final['data_until']}",
        f"  BG/NBD       {_parameters(final['bgnbd'])}",
        f"  Gamma-Gamma  {_parameters(final['gamma_gamma'])}",
        f"next {totals['horizon']:g} {unit}: {totals['expected_transactions']:,.1f} transactions expected from "
        f"{totals['customers']:,} customers (mean P(alive) {totals['mean_p_alive']:.3f})"
        + (
            f"; CLV {totals['clv_total']:,.2f} in all, {totals['clv_mean']:,.2f} per customer (undiscounted)"
            if "clv_total" in totals
            else ""
        ),
    ]
    for warning in report["warnings"]:
        lines.append(f"WARNING {warning}")
    return "\n".join(lines)
