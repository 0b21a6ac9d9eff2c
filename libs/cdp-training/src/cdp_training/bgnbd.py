"""BG/NBD (Fader, Hardie & Lee 2005, "Counting your customers the easy way") and Gamma-Gamma (Fader,
Hardie & Lee 2005, "RFM and CLV: using iso-value curves for customer base analysis").

Time is in weeks. Per customer: x = repeat purchases (orders after the first), t_x = time of the last
purchase and T = age, both counted from the first purchase.

Repeat purchases are purchase occasions, counted at most one per OCCASION_DAYS of the span from the first
to the last order (`repeat_occasions`): the model's Poisson process describes how often a customer comes
back, and several orders placed minutes apart (a split basket, a gift spree) are one visit, not evidence
of a rate of many a week. Read as a rate, three orders in the first seconds of a customer's life gave 24
expected orders in the next year (BG/NBD's posterior rate (r + x) / (alpha + T) is largest at T = 0). The
profile carries the order count and the first and last order times, not the days with an order, so the
cap is an upper bound on the occasions; it changes only orders packed closer than a day apart on average.
Fits, the served graph and the figures all read orders this way.

BG/NBD: while alive a customer buys at rate lambda ~ Gamma(r, alpha); after each repeat purchase they drop out with
probability p ~ Beta(a, b). Gamma-Gamma: each order's value is Gamma(p, nu) with nu ~ Gamma(q, gamma) per
customer, independent of the purchase process.

This module holds the likelihoods (closed form, gammaln only), the maximum-likelihood fits, the reference
formulas (scipy's hyp2f1) that the ONNX graph is checked against, and samplers from both generative
processes for parameter-recovery checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import gammaln, hyp2f1


@dataclass(frozen=True, slots=True)
class BgNbd:
    r: float
    alpha: float
    a: float
    b: float

    def as_dict(self) -> dict[str, float]:
        return {"r": self.r, "alpha": self.alpha, "a": self.a, "b": self.b}

    @staticmethod
    def log_likelihood(params: np.ndarray, x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
        """Per-customer log-likelihood (Fader, Hardie & Lee 2005, eq. 6), `params` = (r, alpha, a, b)."""
        r, alpha, a, b = params
        ln_a1 = gammaln(r + x) - gammaln(r) + r * np.log(alpha)
        ln_a2 = gammaln(a + b) + gammaln(b + x) - gammaln(b) - gammaln(a + b + x)
        ln_a3 = -(r + x) * np.log(alpha + T)
        repeat = x > 0
        ln_a4 = np.where(
            repeat, np.log(a) - np.log(np.where(repeat, b + x - 1, 1.0)) - (r + x) * np.log(alpha + t_x), -np.inf
        )
        return ln_a1 + ln_a2 + np.logaddexp(ln_a3, ln_a4)

    @classmethod
    def fit(cls, x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> BgNbd:
        """Maximum likelihood over log-parameters (L-BFGS-B from (1, 1, 1, 1)); deterministic."""
        x, t_x, T = (np.asarray(v, dtype=np.float64) for v in (x, t_x, T))
        # customers with the same summary share one term: fewer gammaln calls per step
        keys, counts = np.unique(np.stack([x, t_x, T], axis=1), axis=0, return_counts=True)
        kx, kt, kT = keys.T
        total = float(counts.sum())

        def objective(log_params: np.ndarray) -> float:
            ll = cls.log_likelihood(np.exp(log_params), kx, kt, kT)
            return -float(np.dot(counts, ll)) / total

        result = minimize(objective, np.zeros(4), method="L-BFGS-B", bounds=[(-9.0, 9.0)] * 4)
        r, alpha, a, b = np.exp(result.x)
        return cls(float(r), float(alpha), float(a), float(b))

    def p_alive(self, x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
        """P(still a customer at T | x, t_x, T); 1 without repeat purchases (dropout follows a purchase)."""
        x = np.asarray(x, dtype=np.float64)
        repeat = x > 0
        ratio = np.exp((self.r + x) * (np.log(self.alpha + T) - np.log(self.alpha + t_x)))
        odds = np.where(repeat, self.a / np.where(repeat, self.b + x - 1, 1.0) * ratio, 0.0)
        return 1.0 / (1.0 + odds)

    def expected(self, t: float, x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
        """E[purchases in (T, T + t] | x, t_x, T] (eq. 10), with scipy's hyp2f1."""
        x = np.asarray(x, dtype=np.float64)
        r, alpha, a, b = self.r, self.alpha, self.a, self.b
        z = t / (alpha + T + t)
        head = (a + b + x - 1) / (a - 1)
        tail = ((alpha + T) / (alpha + T + t)) ** (r + x) * hyp2f1(r + x, b + x, a + b + x - 1, z)
        return head * (1 - tail) * self.p_alive(x, t_x, T)

    def sample(self, T: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(x, t_x) of customers observed for T weeks after their first purchase, drawn from the model."""
        n = len(T)
        lam = rng.gamma(self.r, 1 / self.alpha, n)
        p = rng.beta(self.a, self.b, n)
        x = np.zeros(n)
        t_x = np.zeros(n)
        now = np.zeros(n)
        active = np.ones(n, dtype=bool)
        while active.any():
            idx = np.flatnonzero(active)
            now[idx] += rng.exponential(1.0, idx.size) / lam[idx]
            bought = now[idx] <= T[idx]
            buyers = idx[bought]
            x[buyers] += 1
            t_x[buyers] = now[buyers]
            active[idx[~bought]] = False
            active[buyers[rng.random(buyers.size) < p[buyers]]] = False  # dropped out after this purchase
        return x, t_x


@dataclass(frozen=True, slots=True)
class GammaGamma:
    p: float
    q: float
    gamma: float

    def as_dict(self) -> dict[str, float]:
        return {"p": self.p, "q": self.q, "gamma": self.gamma}

    @staticmethod
    def log_likelihood(params: np.ndarray, x: np.ndarray, m: np.ndarray) -> np.ndarray:
        """Log density of the mean order value m over x >= 1 orders (Fader, Hardie & Lee 2005, eq. 3)."""
        p, q, gamma = params
        px = p * x
        return (
            gammaln(px + q)
            - gammaln(px)
            - gammaln(q)
            + q * np.log(gamma)
            + (px - 1) * np.log(m)
            + px * np.log(x)
            - (px + q) * np.log(gamma + m * x)
        )

    @classmethod
    def fit(cls, x: np.ndarray, m: np.ndarray) -> GammaGamma:
        x = np.asarray(x, dtype=np.float64)
        m = np.asarray(m, dtype=np.float64)
        keep = (x >= 1) & (m > 0)
        x, m = x[keep], m[keep]

        def objective(log_params: np.ndarray) -> float:
            return -float(np.mean(cls.log_likelihood(np.exp(log_params), x, m)))

        start = np.log([1.0, 2.0, max(float(np.mean(m)), 1.0)])
        result = minimize(objective, start, method="L-BFGS-B", bounds=[(-9.0, 12.0)] * 3)
        p, q, gamma = np.exp(result.x)
        return cls(float(p), float(q), float(gamma))

    def expected(self, x: np.ndarray, m: np.ndarray) -> np.ndarray:
        """E[order value | x orders averaging m] (eq. 5); the population mean p gamma / (q - 1) for x = 0."""
        x = np.asarray(x, dtype=np.float64)
        return self.p * (self.gamma + np.asarray(m) * x) / (self.p * x + self.q - 1)

    def sample(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Mean order value over x >= 1 orders per customer, drawn from the model."""
        nu = rng.gamma(self.q, 1 / self.gamma, len(x))
        return rng.gamma(self.p * x, 1 / nu) / x  # a sum of x Gamma(p, nu) values is Gamma(p x, nu)


OCCASION_DAYS = 1.0  # repeat orders closer together than this count as one purchase occasion


def repeat_occasions(orders: np.ndarray, span_days: np.ndarray, occasion_days: float = OCCASION_DAYS) -> np.ndarray:
    """x: the orders after the first, at most one per whole `occasion_days` between the first and last order."""
    orders = np.asarray(orders, dtype=np.float64)
    span = np.maximum(np.asarray(span_days, dtype=np.float64), 0)
    return np.minimum(np.maximum(orders - 1, 0), np.floor(span / occasion_days))


def summaries(
    orders: np.ndarray,
    days_since_first: np.ndarray,
    days_since_last: np.ndarray,
    occasion_days: float = OCCASION_DAYS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, t_x, T) in weeks from profile features; customers without orders give x = t_x = T = 0."""
    orders = np.asarray(orders, dtype=np.float64)
    days_since_first = np.asarray(days_since_first, dtype=np.float64)
    has = orders > 0
    span_days = np.where(has, np.clip(days_since_first - days_since_last, 0, None), 0)
    x = repeat_occasions(orders, span_days, occasion_days)
    T = np.where(has, np.maximum(days_since_first, 0), 0) / 7
    return x, np.minimum(span_days / 7, T), T


def series_terms(model: BgNbd, terms: int) -> tuple[np.ndarray, np.ndarray]:
    """The input-independent parts of the series the ONNX graph sums, per term index j < `terms`:
    log|(P + j)(Q + j) / (j + 1)| and the sign of term j, with P = a + b - 1 - r and Q = a - 1.

    By Euler's transformation 2F1(A, B; C; z) = (1 - z)^(C-A-B) 2F1(C-A, C-B; C; z), and with A = r + x,
    B = b + x, C = a + b + x - 1 the new parameters C - A = P and C - B = Q do not depend on x: the terms
    shrink by about z from the start however many purchases x counts (the plain series first grows to a
    peak near j = x z / (1 - z), hundreds of terms out for frequent buyers)."""
    p, q = model.a + model.b - 1 - model.r, model.a - 1
    j = np.arange(terms, dtype=np.float64)
    with np.errstate(divide="ignore"):  # a zero factor ends the series: log 0 = -inf, exp(-inf) = 0
        ln_factor = np.log(np.abs(p + j)) + np.log(np.abs(q + j)) - np.log1p(j)
    negative = (p + j < 0).astype(np.int64) + (q + j < 0).astype(np.int64)
    sign = 1.0 - 2.0 * (np.concatenate([[0], np.cumsum(negative)[:-1]]) % 2)
    return ln_factor, sign


def scaled_hyp2f1(x: np.ndarray, T: np.ndarray, t: float, model: BgNbd, terms: int) -> np.ndarray:
    """((alpha+T)/(alpha+T+t))^(r+x) · 2F1(r+x, b+x; a+b+x-1; z), z = t/(alpha+T+t), as the ONNX graph computes it:
    (1-z)^(a-1) · Σ_k sign_k exp(Σ_{j<k} [ln_factor_j - ln(C+j) + ln z]) over `terms` terms."""
    x = np.asarray(x, dtype=np.float64)[:, None]
    T = np.asarray(T, dtype=np.float64)[:, None]
    ln_factor, sign = series_terms(model, terms)
    c = model.a + model.b + x - 1
    ln_z = np.log(t) - np.log(model.alpha + T + t)
    ln_one_minus_z = np.log(model.alpha + T) - np.log(model.alpha + T + t)
    steps = ln_factor[None, :] - np.log(c + np.arange(terms)[None, :]) + ln_z
    ln_terms = np.concatenate([np.zeros_like(T), np.cumsum(steps[:, :-1], axis=1)], axis=1)
    return (sign[None, :] * np.exp(ln_terms + (model.a - 1) * ln_one_minus_z)).sum(axis=1)


def scaled_hyp2f1_exact(x: np.ndarray, T: np.ndarray, t: float, model: BgNbd) -> np.ndarray:
    """The same product with scipy's hyp2f1 (the reference)."""
    x = np.asarray(x, dtype=np.float64)
    T = np.asarray(T, dtype=np.float64)
    a_, b_, c_ = model.r + x, model.b + x, model.a + model.b + x - 1
    z = t / (model.alpha + T + t)
    with np.errstate(invalid="ignore", over="ignore"):  # scipy gives up far out (inf * 0): callers drop those
        return ((model.alpha + T) / (model.alpha + T + t)) ** a_ * hyp2f1(a_, b_, c_, z)


def terms_needed(
    model: BgNbd, t: float, x_max: float, T_max: float, *, tolerance: float = 1e-7, candidates: tuple[int, ...] = ()
) -> tuple[int, float]:
    """The fewest series terms (of `candidates`) whose relative error against scipy's hyp2f1 stays below
    `tolerance` over x = 0..x_max repeat purchases and T = 0..T_max weeks; and that error."""
    xs, Ts = np.meshgrid(np.arange(0, int(x_max) + 1, dtype=np.float64), np.linspace(0, T_max, 61))
    xs, Ts = xs.ravel(), Ts.ravel()
    exact = scaled_hyp2f1_exact(xs, Ts, t, model)
    ok = np.isfinite(exact) & (np.abs(exact) > 0)
    error = np.inf
    for terms in candidates or (50, 100, 150, 200, 300, 400, 600, 800):
        series = scaled_hyp2f1(xs[ok], Ts[ok], t, model, terms)
        error = float(np.max(np.abs(series - exact[ok]) / np.abs(exact[ok])))
        if error < tolerance:
            return terms, error
    raise ValueError(f"no series length reaches {tolerance} on x <= {x_max}, T <= {T_max} (error {error})")
