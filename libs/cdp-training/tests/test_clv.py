"""BG/NBD and Gamma-Gamma: the fits recover known parameters, and the ONNX graph that serves them agrees
with scipy (hyp2f1, gammaln) to 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import beta, gamma, hyp2f1

from cdp_training.bgnbd import (
    BgNbd,
    GammaGamma,
    scaled_hyp2f1,
    scaled_hyp2f1_exact,
    summaries,
    terms_needed,
)
from cdp_training.graphs import clv_graph, reference_clv, run
from cdp_training.models import RECOVERY_BGNBD, RECOVERY_GAMMA_GAMMA, parameter_recovery

RECOVERY_TOLERANCE = 0.10  # relative error per parameter, 20,000 simulated customers
HORIZON_WEEKS = 365 / 7
# fitted on a simulated population: a < 1 and a small alpha, the hardest case for the series
SHIPPED_LIKE = BgNbd(r=0.57, alpha=2.5, a=0.46, b=4.4)


def test_parameter_recovery():
    recovery = parameter_recovery(seed=1, customers=20_000)
    for name, error in {**recovery["bgnbd_relative_error"], **recovery["gamma_gamma_relative_error"]}.items():
        assert error < RECOVERY_TOLERANCE, (name, error, recovery)


def test_log_likelihood_is_the_papers_formula():
    r, alpha, a, b = 0.8, 3.0, 1.2, 2.5
    for x, t_x, T in [(0, 0.0, 30.0), (1, 5.0, 30.0), (4, 20.5, 39.0)]:
        # Fader, Hardie & Lee (2005), eq. 6, written out with beta and gamma functions
        a1 = gamma(r + x) * alpha**r / gamma(r)
        a2 = beta(a, b + x) / beta(a, b)
        a3 = (alpha + T) ** -(r + x)
        a4 = (beta(a + 1, b + x - 1) / beta(a, b + x)) * (alpha + t_x) ** -(r + x) if x > 0 else 0.0
        expected = np.log(a1 * a2 * (a3 + a4))
        got = BgNbd.log_likelihood(np.array([r, alpha, a, b]), np.array([x]), np.array([t_x]), np.array([T]))[0]
        assert got == pytest.approx(expected, rel=1e-10)
    p, q, g = 6.0, 3.5, 15.0
    x, m = 3.0, 40.0
    # Gamma-Gamma density of the mean of x values (eq. 3)
    density = (
        gamma(p * x + q)
        / (gamma(p * x) * gamma(q))
        * g**q
        * m ** (p * x - 1)
        * x ** (p * x)
        / (g + m * x) ** (p * x + q)
    )
    got = GammaGamma.log_likelihood(np.array([p, q, g]), np.array([x]), np.array([m]))[0]
    assert got == pytest.approx(np.log(density), rel=1e-10)


@pytest.mark.parametrize("model", [RECOVERY_BGNBD, SHIPPED_LIKE, BgNbd(2.0, 10.0, 3.0, 1.0)])
def test_the_series_matches_hyp2f1_on_the_realistic_range(model):
    terms, error = terms_needed(model, HORIZON_WEEKS, x_max=200, T_max=130, tolerance=1e-6)
    assert error < 1e-6 and terms <= 400
    rng = np.random.default_rng(0)
    x = rng.integers(0, 200, 500).astype(float)
    T = rng.uniform(0, 130, 500)
    exact = scaled_hyp2f1_exact(x, T, HORIZON_WEEKS, model)
    series = scaled_hyp2f1(x, T, HORIZON_WEEKS, model, terms)
    assert np.max(np.abs(series - exact) / np.abs(exact)) < 1e-4
    # and the product is ((alpha+T)/(alpha+T+t))^(r+x) 2F1 itself
    z = HORIZON_WEEKS / (model.alpha + T[:3] + HORIZON_WEEKS)
    direct = (1 - z) ** (model.r + x[:3]) * hyp2f1(model.r + x[:3], model.b + x[:3], model.a + model.b + x[:3] - 1, z)
    assert np.allclose(series[:3], direct, rtol=1e-8)


def test_orders_less_than_a_day_apart_are_one_purchase_occasion():
    # (orders, days since the first order, days since the last): a burst in the first seconds, a burst
    # within hours a week ago, orders spread over a week, a burst two and a half days wide, one order
    orders = np.array([3, 4, 3, 6, 1])
    first = np.array([5 / 86_400, 7.0, 7.0, 3.0, 30.0])
    last = np.array([1 / 86_400, 6.8, 0.0, 0.5, 30.0])
    x, t_x, T = summaries(orders, first, last)
    assert x.tolist() == [0, 0, 2, 2, 0]  # at most one repeat occasion per whole day of the span
    assert np.allclose(t_x * 7, first - last) and np.allclose(T * 7, first)  # recency and age as they were
    # a model fitted to bursty customers' occasions serves them as the customer of their age with one order
    model = SHIPPED_LIKE
    burst, single = model.expected(HORIZON_WEEKS, x[:1], t_x[:1], T[:1]), model.expected(HORIZON_WEEKS, 0, 0, T[:1])
    assert burst == pytest.approx(single)


def _grid() -> np.ndarray:
    rows = []
    for orders in (0, 1, 2, 3, 5, 8, 13, 21, 40, 80):
        for first in (0.0, 3.0, 30.0, 120.0, 365.0, 540.0, 800.0):
            for share in (0.0, 0.5, 1.0):  # last order at first order, halfway, now
                for aov in (0.0, 12.5, 80.0):
                    rows.append([orders, first, first * (1 - share), aov, first + 10.0])
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("model", [RECOVERY_BGNBD, SHIPPED_LIKE])
def test_the_onnx_graph_agrees_with_the_reference(model):
    spend = RECOVERY_GAMMA_GAMMA
    terms, _ = terms_needed(model, HORIZON_WEEKS, x_max=160, T_max=130, tolerance=1e-7)
    graph = clv_graph(model, spend, input_name="features", horizon_days=365, terms=terms)
    rows = _grid()
    got = run(graph, rows)
    expected = reference_clv(model, spend, rows.astype(np.float64), 365)
    for name, values in expected.items():
        assert np.all(np.isfinite(got[name])), name
        error = np.abs(got[name] - values) / np.maximum(1.0, np.abs(values))
        assert error.max() < 1e-4, (name, error.max())
    no_order = rows[:, 0] == 0
    assert np.all(got["p_alive"][no_order] == 1.0)  # dropout follows a purchase in BG/NBD
    mean_spend = spend.p * spend.gamma / (spend.q - 1)
    assert np.allclose(got["expected_order_value"][no_order], mean_spend, rtol=1e-6)
    # more recent buyers are more likely alive; five orders placed at once are one purchase occasion, a
    # customer without a repeat occasion, whom BG/NBD holds alive (dropout follows a repeat purchase)
    buyers = rows[(rows[:, 0] == 5) & (rows[:, 1] == 365) & (rows[:, 3] == 80)]
    alive = run(graph, buyers)["p_alive"]
    assert alive[1] < alive[2]  # last order halfway, just now
    assert alive[0] == 1.0  # all five at the first order
