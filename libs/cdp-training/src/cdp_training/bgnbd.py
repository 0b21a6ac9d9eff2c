"""BG/NBD (Fader, Hardie & Lee 2005, "Counting your customers the easy way") and Gamma-Gamma (Fader,
Hardie & Lee 2005, "RFM and CLV: using iso-value curves for customer base analysis").

Time is in weeks for the served model (`summaries` of profile features; `cdp_training.clvfit` also fits in
days). Per customer: x = repeat purchases (orders after the first), t_x = time of the last purchase and
T = age, both counted from the first purchase.

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
processes for parameter-recovery checks. The formulas hold in any time unit (alpha is per that unit).

A fit is guarded (`fit_bgnbd`, `fit_gamma_gamma`, and `BgNbd.fit` / `GammaGamma.fit` on top of them): it is
rejected with `FitRejected` when its parameters make predictions meaningless (`BgNbd.check`,
`GammaGamma.check`: Gamma-Gamma q <= 1 gives a negative or infinite expected order value; BG/NBD a = 1 or
a + b <= 1 leaves the expected purchases undefined), and its `FitReport` says whether the optimiser
converged and which parameters stopped at a bound of the search box (`BGNBD_LOG_BOUNDS`, `GAMMA_GAMMA_LOG_BOUNDS`): such a parameter is not an
estimate, only a direction (a -> 0: nobody drops out; alpha at the top: rates too small to tell apart).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import gammaln, hyp2f1

from cdp_kit.errors import FailedPrecondition, InvalidArgument

# The search box of each fit, in log-parameter space (exp(-9) ~ 1.2e-4, exp(9) ~ 8,100, exp(12) ~ 163,000)
BGNBD_LOG_BOUNDS = (-9.0, 9.0)
GAMMA_GAMMA_LOG_BOUNDS = (-9.0, 12.0)
# a log-parameter this close to its bound (a factor 1.5) stopped there: the search heads out of the box, and
# the likelihood is so flat there that L-BFGS-B often stops just short of the bound itself - how short
# depends on the last bits of the machine's log/exp (a test fit within 1.28x of the bound on earlier
# machines stopped at 1.29x on a newer one with the same data), so the margin is wider than one run needs
BOUND_TOLERANCE = 0.405
MAX_ITERATIONS = 15_000  # scipy's own default for L-BFGS-B
# L-BFGS-B's stopping tests, tighter than scipy's defaults (ftol 2.2e-9, gtol 1e-5). At those the CDNOW fit
# stopped 4e-5 (relative) short of the optimum, a = 0.792955 against 0.792922, and where in that margin it
# stopped followed the last bits of the CPU's floating point: the printed a read 0.7929 on one machine and
# 0.793 on another. With these it reaches the optimum to about 1e-8, two iterations more (15 against 13).
FTOL, GTOL = 1e-12, 1e-8
A_NEAR_ONE = 1e-6  # |a - 1| below this: (a + b - 1) / (a - 1) in E[X(t)] is 0/0 in floating point


class FitRejected(FailedPrecondition):
    """The fitted parameters make the model's predictions meaningless; the message says which and why."""

    reason = "fit_rejected"


@dataclass(frozen=True, slots=True)
class FitReport:
    """How a maximum-likelihood fit ended: the optimiser's own verdict and the parameters it left at a bound."""

    model: str
    parameters: dict[str, float]
    converged: bool
    message: str
    iterations: int
    log_likelihood: float  # summed over the customers fitted
    customers: int
    bounds: dict[str, tuple[float, float]]  # per parameter, in the parameter's own scale
    at_bound: dict[str, str] = field(default_factory=dict)  # parameter -> "lower" | "upper", only those at one

    @property
    def warnings(self) -> list[str]:
        out = []
        if not self.converged:
            out.append(
                f"{self.model}: the optimiser did not converge ({self.message}); the parameters are not an optimum"
            )
        for name, side in self.at_bound.items():
            lo, hi = self.bounds[name]
            out.append(
                f"{self.model}: {name} = {self.parameters[name]:.6g} stopped at the {side} bound of its search range "
                f"[{lo:.3g}, {hi:.3g}]: the data push it further, so it is a direction, not an estimate"
            )
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "parameters": self.parameters,
            "converged": self.converged,
            "message": self.message,
            "iterations": self.iterations,
            "log_likelihood": self.log_likelihood,
            "customers": self.customers,
            "bounds": {k: list(v) for k, v in self.bounds.items()},
            "at_bound": self.at_bound,
            "warnings": self.warnings,
        }


def _minimise(
    name: str,
    names: tuple[str, ...],
    objective: Callable[[np.ndarray], float],
    start: np.ndarray,
    log_bounds: tuple[float, float],
    customers: int,
    max_iterations: int,
) -> FitReport:
    """L-BFGS-B over log-parameters; `objective` is the mean negative log-likelihood per customer."""
    lo, hi = log_bounds
    options = {"maxiter": max_iterations, "ftol": FTOL, "gtol": GTOL}
    result = minimize(objective, start, method="L-BFGS-B", bounds=[log_bounds] * len(names), options=options)
    values = np.exp(result.x)
    at_bound = {}
    for key, log_value in zip(names, result.x, strict=True):
        if log_value - lo < BOUND_TOLERANCE:
            at_bound[key] = "lower"
        elif hi - log_value < BOUND_TOLERANCE:
            at_bound[key] = "upper"
    return FitReport(
        model=name,
        parameters={k: float(v) for k, v in zip(names, values, strict=True)},
        converged=bool(result.success),
        message=str(result.message),
        iterations=int(result.nit),
        log_likelihood=-float(result.fun) * customers,
        customers=customers,
        bounds={k: (float(np.exp(lo)), float(np.exp(hi))) for k in names},
        at_bound=at_bound,
    )


def _finite_nonnegative(name: str, values: np.ndarray) -> None:
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        raise InvalidArgument(
            name, f"{int(bad.sum())} value(s) are negative or not finite (first at row {int(np.argmax(bad))})"
        )


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
        """Maximum likelihood (`fit_bgnbd`); raises `FitRejected` on parameters that predict nothing."""
        return fit_bgnbd(x, t_x, T)[0]

    def check(self) -> BgNbd:
        """Raise `FitRejected` unless E[X(t)] and E[Y(t) | x, t_x, T] are defined: every parameter finite and
        positive, a != 1 (the factor (a + b - 1) / (a - 1)) and a + b > 1 (the hypergeometric function's
        c = a + b + x - 1 must be positive for x = 0)."""
        values = self.as_dict()
        bad = [k for k, v in values.items() if not (np.isfinite(v) and v > 0)]
        if bad:
            raise FitRejected(
                f"BG/NBD parameter(s) {', '.join(f'{k}={values[k]!r}' for k in bad)} must be finite and > 0"
            )
        if abs(self.a - 1) < A_NEAR_ONE:
            raise FitRejected(
                f"BG/NBD a={self.a!r} is 1 to within {A_NEAR_ONE}: the expected purchases (a + b - 1) / (a - 1) · (...) "
                "are 0/0 in floating point; refit on more or other customers"
            )
        if self.a + self.b <= 1:
            raise FitRejected(
                f"BG/NBD a + b = {self.a + self.b!r} <= 1: the expected purchases need a + b > 1 (the hypergeometric "
                "function is undefined otherwise); refit on more or other customers"
            )
        return self

    def expected_new(self, t: np.ndarray | float) -> np.ndarray:
        """E[X(t)]: purchases in the first t after a customer's first one (eq. 7): E[Y(t) | x = 0, T = 0]."""
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        zero = np.zeros_like(t)
        return np.where(t > 0, self.expected(np.maximum(t, 1e-300), zero, zero, zero), 0.0)  # type: ignore[arg-type]

    def p_alive(self, x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
        """P(still a customer at T | x, t_x, T); 1 without repeat purchases (dropout follows a purchase)."""
        x = np.asarray(x, dtype=np.float64)
        repeat = x > 0
        ratio = np.exp((self.r + x) * (np.log(self.alpha + T) - np.log(self.alpha + t_x)))
        odds = np.where(repeat, self.a / np.where(repeat, self.b + x - 1, 1.0) * ratio, 0.0)
        return 1.0 / (1.0 + odds)

    def expected(self, t: float, x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
        """E[purchases in (T, T + t] | x, t_x, T] (eq. 10), with scipy's hyp2f1.

        The product ((alpha+T)/(alpha+T+t))^(r+x) 2F1(r+x, b+x; a+b+x-1; z) is taken in Euler's form
        (1-z)^(a-1) 2F1(a+b-1-r, a-1; a+b+x-1; z) (see `series_terms`): the same number, but scipy's plain
        form overflows past a few hundred repeat purchases (inf · 0), which real exports have. Where the
        Euler form is not finite (integer parameters far out) the plain form is used."""
        x = np.asarray(x, dtype=np.float64)
        T = np.asarray(T, dtype=np.float64)
        r, alpha, a, b = self.r, self.alpha, self.a, self.b
        z = t / (alpha + T + t)
        head = (a + b + x - 1) / (a - 1)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            tail = (1 - z) ** (a - 1) * hyp2f1(a + b - 1 - r, a - 1, a + b + x - 1, z)
            plain = ((alpha + T) / (alpha + T + t)) ** (r + x) * hyp2f1(r + x, b + x, a + b + x - 1, z)
        tail = np.where(np.isfinite(tail), tail, plain)
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
        """Maximum likelihood (`fit_gamma_gamma`); raises `FitRejected` when q <= 1."""
        return fit_gamma_gamma(x, m)[0]

    def check(self) -> GammaGamma:
        """Raise `FitRejected` unless E[order value] is defined and positive for every customer: p, gamma > 0
        and q > 1 (the population mean p gamma / (q - 1) and, for few orders, p x + q - 1 > 0)."""
        values = self.as_dict()
        bad = [k for k, v in values.items() if not (np.isfinite(v) and v > 0)]
        if bad:
            raise FitRejected(
                f"Gamma-Gamma parameter(s) {', '.join(f'{k}={values[k]!r}' for k in bad)} must be finite and > 0"
            )
        if self.q <= 1:
            raise FitRejected(
                f"Gamma-Gamma q={self.q!r} <= 1: the expected order value p (gamma + m x) / (p x + q - 1) is negative "
                "or infinite for customers with few orders (and the population mean p gamma / (q - 1) does not "
                "exist): the spend is too heavy-tailed for the model. Look for outliers (a wholesale order, a "
                "currency error) or fit on more customers"
            )
        return self

    def expected(self, x: np.ndarray, m: np.ndarray) -> np.ndarray:
        """E[order value | x orders averaging m] (eq. 5); the population mean p gamma / (q - 1) for x = 0."""
        x = np.asarray(x, dtype=np.float64)
        return self.p * (self.gamma + np.asarray(m) * x) / (self.p * x + self.q - 1)

    def sample(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Mean order value over x >= 1 orders per customer, drawn from the model."""
        nu = rng.gamma(self.q, 1 / self.gamma, len(x))
        return rng.gamma(self.p * x, 1 / nu) / x  # a sum of x Gamma(p, nu) values is Gamma(p x, nu)


def fit_bgnbd(
    x: np.ndarray, t_x: np.ndarray, T: np.ndarray, *, check: bool = True, max_iterations: int = MAX_ITERATIONS
) -> tuple[BgNbd, FitReport]:
    """Maximum likelihood over log-parameters (L-BFGS-B from (1, 1, 1, 1) within `BGNBD_LOG_BOUNDS`);
    deterministic. x repeat purchases, t_x and T in one time unit; raises `FitRejected` (`BgNbd.check`)
    unless `check` is False."""
    x, t_x, T = (np.asarray(v, dtype=np.float64) for v in (x, t_x, T))
    for name, values in (("x", x), ("t_x", t_x), ("T", T)):
        _finite_nonnegative(name, values)
    if not len(x):
        raise FailedPrecondition("no customers to fit BG/NBD on")
    if not np.any(x > 0):
        # the dropout parameters a, b are read off repeat purchases only: without one they stay where the
        # search started, and the fit would look like an answer
        raise FailedPrecondition(f"none of the {len(x)} customers made a repeat purchase: BG/NBD cannot be fitted")
    # customers with the same summary share one term: fewer gammaln calls per step
    keys, counts = np.unique(np.stack([x, t_x, T], axis=1), axis=0, return_counts=True)
    kx, kt, kT = keys.T
    total = float(counts.sum())

    def objective(log_params: np.ndarray) -> float:
        ll = BgNbd.log_likelihood(np.exp(log_params), kx, kt, kT)
        return -float(np.dot(counts, ll)) / total

    report = _minimise(
        "BG/NBD", ("r", "alpha", "a", "b"), objective, np.zeros(4), BGNBD_LOG_BOUNDS, len(x), max_iterations
    )
    model = BgNbd(**report.parameters)
    return (model.check() if check else model), report


def fit_gamma_gamma(
    x: np.ndarray, m: np.ndarray, *, check: bool = True, max_iterations: int = MAX_ITERATIONS
) -> tuple[GammaGamma, FitReport]:
    """Maximum likelihood over customers with x >= 1 transactions of mean value m > 0 (the others say
    nothing about spend); L-BFGS-B within `GAMMA_GAMMA_LOG_BOUNDS` from (1, 2, mean m). Raises
    `FitRejected` when q <= 1 (`GammaGamma.check`) unless `check` is False."""
    x = np.asarray(x, dtype=np.float64)
    m = np.asarray(m, dtype=np.float64)
    _finite_nonnegative("x", x)
    _finite_nonnegative("m", m)
    keep = (x >= 1) & (m > 0)
    x, m = x[keep], m[keep]
    if not len(x):
        raise FailedPrecondition("no customer with a transaction of positive value to fit Gamma-Gamma on")

    def objective(log_params: np.ndarray) -> float:
        return -float(np.mean(GammaGamma.log_likelihood(np.exp(log_params), x, m)))

    start = np.log([1.0, 2.0, max(float(np.mean(m)), 1.0)])
    report = _minimise(
        "Gamma-Gamma", ("p", "q", "gamma"), objective, start, GAMMA_GAMMA_LOG_BOUNDS, len(x), max_iterations
    )
    model = GammaGamma(**report.parameters)
    return (model.check() if check else model), report


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
