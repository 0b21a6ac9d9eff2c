"""CLV on real transactions: exports and the platform's orders read into one transaction per customer and
day, bad rows named, and fits that predict nothing refused or flagged."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.special import hyp2f1

from cdp_kit.errors import FailedPrecondition, InvalidArgument
from cdp_kit.storage import MemoryStore, open_store
from cdp_profile.domain import ProfileEvent
from cdp_training.__main__ import main
from cdp_training.bgnbd import BgNbd, FitRejected, GammaGamma, fit_bgnbd, fit_gamma_gamma
from cdp_training.clvfit import analyse
from cdp_training.graphs import clv_graph
from cdp_training.platformdata import write_people
from cdp_training.pointintime import read_profiles
from cdp_training.transactions import orders_from_profiles, parse_day, read_transactions, summarise

DAY = 86_400.0

EXPORT = """order_id,client,when,amount
1,ada,2024-01-03,20.00
2,ada,2024-01-03T18:30:00+01:00,5.50
3,bob,2024-01-05,12.00
4,ada,2024-02-01,30.00
5,ada,2024-01-03T23:30:00-02:00,1.00
6,bob,2024-03-01,8.00
7,cy,2024-03-02,40.00
"""


def write(tmp_path, text: str, name: str = "orders.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_orders_of_one_customer_on_one_day_are_one_transaction(tmp_path):
    tx = read_transactions(write(tmp_path, EXPORT), customer_column="client", date_column="when", value_column="amount")
    # ada's 2024-01-03 orders are one transaction of 25.50; 23:30 at UTC-2 is already 2024-01-04 in UTC
    assert tx.rows == 7 and tx.merged == 1 and tx.customers == ["ada", "bob", "cy"]
    ada = tx.customer == 0
    days = [dt.date(1970, 1, 1) + dt.timedelta(days=int(d)) for d in tx.day[ada]]
    assert [d.isoformat() for d in days] == ["2024-01-03", "2024-01-04", "2024-02-01"]
    assert tx.value[ada].tolist() == [25.5, 1.0, 30.0]
    summary = summarise(
        tx, calibration_end=parse_day("2024-02-15", "end"), holdout_end=parse_day("2024-03-31", "end"), unit_days=7
    )
    assert summary.customers == ["ada", "bob"]  # cy's first order is after the calibration end
    assert summary.born_after_calibration == 1
    assert summary.x.tolist() == [2, 0] and summary.x_holdout.tolist() == [0, 1]
    assert summary.t_x[0] == pytest.approx(29 / 7) and summary.T[0] == pytest.approx(43 / 7)
    assert summary.m[0] == pytest.approx(15.5)  # the mean of the repeat transactions: the first is left out


def test_a_parquet_export_reads_as_the_csv_does(tmp_path):
    csv_tx = read_transactions(
        write(tmp_path, EXPORT), customer_column="client", date_column="when", value_column="amount"
    )
    ids = ["ada", "ada", "bob", "ada", "ada", "bob", "cy"]
    amounts = [20.0, 5.5, 12.0, 30.0, 1.0, 8.0, 40.0]
    utc = [
        dt.datetime(2024, 1, 3, 12, tzinfo=dt.UTC),
        dt.datetime(2024, 1, 3, 17, 30, tzinfo=dt.UTC),
        dt.datetime(2024, 1, 5, tzinfo=dt.UTC),
        dt.datetime(2024, 2, 1, tzinfo=dt.UTC),
        dt.datetime(2024, 1, 4, 1, 30, tzinfo=dt.UTC),
        dt.datetime(2024, 3, 1, tzinfo=dt.UTC),
        dt.datetime(2024, 3, 2, tzinfo=dt.UTC),
    ]
    for name, dates in {
        "timestamps.parquet": pa.array(utc, pa.timestamp("us", "UTC")),
        "dates.parquet": pa.array([m.date() for m in utc], pa.date32()),
        "strings.parquet": pa.array([m.date().isoformat() for m in utc]),
    }.items():
        path = tmp_path / name
        pq.write_table(pa.table({"client": ids, "when": dates, "amount": amounts}), path)
        tx = read_transactions(path, customer_column="client", date_column="when", value_column="amount")
        assert tx.customers == csv_tx.customers, name
        assert tx.day.tolist() == csv_tx.day.tolist() and tx.value.tolist() == csv_tx.value.tolist(), name


@pytest.mark.parametrize(
    ("text", "kwargs", "field", "says"),
    [
        (EXPORT, {"customer_column": "customer"}, "customer", "no such column in orders.csv (it has: order_id, client"),
        (EXPORT, {"value_column": "price"}, "price", "no such column"),
        ("client,when,amount\nada,2024-01-03,1\nbob,03/01/2024,2\n", {}, "when (line 3)", "not an ISO 8601 date"),
        ("client,when,amount\nada,2024-01-03,1\n,2024-01-04,2\n", {}, "client (line 3)", "is empty"),
        ("client,when,amount\nada,2024-01-03,-4\n", {}, "amount (line 2)", "net or drop returns"),
        ("client,when,amount\nada,2024-01-03,EUR 4\n", {}, "amount (line 2)", "not a number"),
    ],
)
def test_a_bad_export_is_refused_naming_the_column_and_the_line(tmp_path, text, kwargs, field, says):
    args = {"customer_column": "client", "date_column": "when", "value_column": "amount", **kwargs}
    with pytest.raises(InvalidArgument) as caught:
        read_transactions(write(tmp_path, text), **args)
    assert caught.value.field == field and says in caught.value.description
    assert "ada" not in str(caught.value) and "bob" not in str(caught.value)  # no customer ids in errors


def test_dates_in_another_format_read_with_the_format_given(tmp_path):
    path = write(tmp_path, "client,when\nada,03/01/2024\nada,05/01/2024\n")
    tx = read_transactions(
        path, customer_column="client", date_column="when", value_column=None, date_format="%d/%m/%Y"
    )
    assert tx.value is None and (tx.day[1] - tx.day[0]) == 2


def test_a_null_in_a_parquet_export_is_refused_naming_the_row(tmp_path):
    path = tmp_path / "orders.parquet"
    pq.write_table(
        pa.table({"customer_id": ["a", None], "date": ["2024-01-01", "2024-01-02"], "value": [1.0, 2.0]}), path
    )
    with pytest.raises(InvalidArgument) as caught:
        read_transactions(path)
    assert caught.value.field == "customer_id (row 2)"


async def test_the_platforms_orders_are_read_from_the_profile_store():
    start = 1_704_067_200.0  # 2024-01-01 00:00 UTC

    def order(n: str, at: float, total=None) -> ProfileEvent:
        properties = {} if total is None else {"total": total}
        return ProfileEvent(n, "track", "Order Completed", at, "web", properties=properties)

    people = {
        "p1": [
            order("e1", start + 10 * 3600, 10.0),
            order("e2", start + 11 * 3600, 15.0),  # same day: one transaction of 25
            ProfileEvent("e3", "track", "Product Viewed", start + 2 * DAY, "web"),
            order("e4", start + 9 * DAY, 30.0),
        ],
        "p2": [order("e5", start + DAY), order("e6", start + 3 * DAY, "n/a")],  # no value: the order counts, as 0
        "p3": [ProfileEvent("e7", "page", "Home", start, "web")],
    }
    store = MemoryStore()
    await write_people(store, people, [])
    tx = orders_from_profiles(await read_profiles(store))
    assert tx.source == "profile store" and tx.customers == ["p1", "p2"]
    assert tx.rows == 5 and tx.merged == 1
    assert tx.value.tolist() == [25.0, 30.0, 0.0, 0.0]
    assert (tx.day - tx.day.min()).tolist() == [0, 9, 1, 3]
    with pytest.raises(FailedPrecondition, match="no 'Purchase' events"):
        orders_from_profiles(await read_profiles(store), event="Purchase")


def test_gamma_gamma_with_q_at_most_one_is_refused():
    # spend so heavy-tailed (q = 0.8 drawn) that the fitted q is below 1: E[value] = p (gamma + m x) /
    # (p x + q - 1) would be negative for a customer with no repeat order
    rng = np.random.default_rng(3)
    x = rng.integers(1, 6, 3000).astype(float)
    m = GammaGamma(6.0, 0.8, 15.0).sample(x, rng)
    with pytest.raises(FitRejected, match=r"Gamma-Gamma q=0\.\d+ <= 1: the expected order value"):
        GammaGamma.fit(x, m)
    model, report = fit_gamma_gamma(x, m, check=False)  # the figures stay readable for a look
    assert model.q < 1 and report.converged
    with pytest.raises(FitRejected):
        GammaGamma(6.0, 1.0, 15.0).check()


def test_no_served_graph_is_built_from_parameters_that_predict_nothing():
    fine = BgNbd(0.243, 4.414, 0.793, 2.426)
    with pytest.raises(FitRejected, match=r"q=0\.9 <= 1"):
        clv_graph(fine, GammaGamma(6.0, 0.9, 15.0), input_name="features", horizon_days=365, terms=50)
    with pytest.raises(FitRejected, match=r"a=1\.0 is 1"):
        clv_graph(
            BgNbd(0.5, 4.0, 1.0, 2.0), GammaGamma(6.0, 3.7, 15.0), input_name="features", horizon_days=365, terms=50
        )


@pytest.mark.parametrize(
    ("model", "says"),
    [
        (BgNbd(0.5, 4.0, 1.0, 2.0), "a=1.0 is 1 to within"),
        (BgNbd(0.5, 4.0, 0.3, 0.5), "a + b = 0.8 <= 1"),
        (BgNbd(0.5, float("nan"), 0.8, 2.0), "alpha=nan must be finite and > 0"),
    ],
)
def test_bgnbd_parameters_that_leave_the_expectation_undefined_are_refused(model, says):
    with pytest.raises(FitRejected, match=says.replace("+", r"\+")):
        model.check()


def test_the_fit_reports_a_parameter_at_its_bound_and_an_optimiser_that_stopped_early():
    rng = np.random.default_rng(5)
    T = rng.uniform(20, 60, 2000)
    x, t_x = BgNbd(0.75, 4.0, 0.8, 2.5).sample(T, rng)
    _, report = fit_bgnbd(x, t_x, T, max_iterations=2)
    assert not report.converged and "did not converge" in report.warnings[0]
    # nobody drops out (each repeat purchase is followed by more at the same rate): a heads to 0
    x_loyal, t_loyal = BgNbd(0.75, 4.0, 1e-9, 1e3).sample(T, rng)
    _model, report = fit_bgnbd(x_loyal, t_loyal, T)
    assert report.converged
    assert report.at_bound.get("a") == "lower", report.as_dict()
    assert any("a = " in w and "lower bound" in w for w in report.warnings)
    with pytest.raises(FailedPrecondition, match="made a repeat purchase"):
        fit_bgnbd(np.zeros(10), np.zeros(10), T[:10])


def test_expected_purchases_stay_finite_for_frequent_buyers():
    # scipy's plain 2F1(r+x, b+x; a+b+x-1; z) overflows for many repeat purchases over a short life (here a
    # reseller's 2,000 in 39 weeks: inf * 0 = nan); Euler's form of the same product does not
    model = BgNbd(0.243, 4.414, 0.793, 2.426)
    x = np.array([0.0, 5.0, 400.0, 2000.0])
    T = np.full(4, 39.0)
    expected = model.expected(52.0, x, T, T)  # each bought last just now
    assert np.all(np.isfinite(expected)) and np.all(np.diff(expected) > 0)
    r, alpha, a, b = 0.243, 4.414, 0.793, 2.426
    z = 52.0 / (alpha + 39.0 + 52.0)
    plain = (
        (a + b + x[:3] - 1)
        / (a - 1)
        * (1 - (1 - z) ** (r + x[:3]) * hyp2f1(r + x[:3], b + x[:3], a + b + x[:3] - 1, z))
    )
    assert np.allclose(expected[:3], plain * model.p_alive(x[:3], T[:3], T[:3]), rtol=1e-9)


def test_the_command_refuses_a_meaningless_fit_with_a_clear_error(tmp_path, capsys):
    rng = np.random.default_rng(11)
    rows = ["customer_id,date,value"]
    for customer in range(400):
        days = np.cumsum(rng.integers(1, 40, 4))
        value = float(rng.pareto(0.6) * 10 + 0.01)  # heavy tail, q < 1
        rows += [
            f"c{customer},{dt.date(2024, 1, 1) + dt.timedelta(days=int(d))},{value * rng.uniform(0.5, 2):.2f}"
            for d in days
        ]
    path = write(tmp_path, "\n".join(rows) + "\n")
    assert main(["clv", "--transactions", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Gamma-Gamma q=") and "<= 1" in err
    # BG/NBD alone still fits and predicts
    assert main(["clv", "--transactions", str(path), "--no-value", "--unit", "days", "--horizon", "90"]) == 0
    assert "next 90 days" in capsys.readouterr().out


def test_the_command_names_a_missing_column(tmp_path, capsys):
    path = write(tmp_path, EXPORT)
    assert main(["clv", "--transactions", str(path), "--customer-column", "client"]) == 2
    assert "error: when" not in (err := capsys.readouterr().err) and err.startswith("error: date: no such column")


def test_the_split_defaults_to_halfway_and_days_work_as_the_unit(tmp_path):
    rng = np.random.default_rng(2)
    T = rng.uniform(100, 300, 1500)
    model = BgNbd(0.75, 4.0 * 7, 0.8, 2.5)  # alpha per day
    x, t_x = model.sample(T, rng)
    rows = ["customer_id,date,value"]
    start = dt.date(2023, 1, 1)
    for i in range(len(T)):
        first = start + dt.timedelta(days=int(300 - T[i]))
        rows.append(f"c{i},{first},10")
        # repeat purchases spread uniformly up to t_x (one at t_x), whole days apart
        extra = [*np.sort(rng.uniform(0, t_x[i], int(x[i]) - 1)).tolist(), t_x[i]] if x[i] else []
        rows += [f"c{i},{first + dt.timedelta(days=int(np.ceil(t)))},12" for t in extra]
    path = write(tmp_path, "\n".join(rows) + "\n")
    tx = read_transactions(path)
    report, _ = analyse(tx, unit="days")
    first, last = dt.date.fromisoformat(report["data"]["first_day"]), dt.date.fromisoformat(report["data"]["last_day"])
    assert report["calibration"]["calibration_end"] == (first + (last - first) // 2).isoformat()
    assert report["predictions"]["horizon"] == 365
    assert report["final_fit"]["bgnbd"]["parameters"]["alpha"] > 7  # per day, not per week


def test_the_command_fits_the_platforms_own_orders_from_the_profile_store(tmp_path, capsys):
    rng = np.random.default_rng(8)
    start = 1_704_067_200.0  # 2024-01-01 00:00 UTC
    ages = rng.uniform(60, 200, 300)  # days before the end (day 200) of each customer's first order
    x, t_x = BgNbd(0.8, 20.0, 0.7, 2.5).sample(ages, rng)  # per day
    people: dict[str, list[ProfileEvent]] = {}
    for i in range(len(ages)):
        first = start + float(200 - ages[i]) * DAY + 3600
        # the first order, x - 1 repeat orders before t_x and the last at t_x (days after the first)
        repeats = [*sorted(rng.uniform(0, t_x[i], int(x[i]) - 1)), t_x[i]] if x[i] else []
        times = [first, *(first + float(t) * DAY for t in repeats)]
        events = [
            ProfileEvent(f"o{i}-{k}", "track", "Order Completed", at, "web", properties={"total": 20.0 + k})
            for k, at in enumerate(times)
        ]
        events.append(ProfileEvent(f"v{i}", "page", "Home", first - DAY, "web"))
        people[f"person-{i}"] = events

    async def fill(url: str) -> None:
        async with open_store(url) as store:
            await write_people(store, people, [])

    url = f"sqlite:///{tmp_path}/profiles.db"
    asyncio.run(fill(url))
    out = tmp_path / "report.json"
    assert main(["clv", "--store", url, "--unit", "days", "--horizon", "30", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("profile store: ") and "customers" in text and "next 30 days" in text
    report = json.loads(out.read_text())
    assert report["data"]["customers"] == 300 and report["unit"] == "days"
    assert report["calibration_fit"]["bgnbd"]["converged"]
    first, last = (dt.date.fromisoformat(report["data"][k]) for k in ("first_day", "last_day"))
    assert len(report["tracking"]) == (last - first).days + 1  # one row per day
