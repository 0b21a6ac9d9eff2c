"""The Fellegi-Sunter model: m and u probabilities per comparison level, weights and their estimation.

m = P(level | same person), u = P(level | different people). A pair's match weight is Σ log2(m/u) over
its comparisons (a missing value contributes 0); with λ, the probability that two records drawn at
random are the same person, the Bayes factor 2^weight turns into a match probability. Blocking only
chooses which pairs get scored: a pair's probability does not depend on the rule that found it, and
the weight of the field a rule blocks on counts like any other (so a rule on a common field cannot
make strangers who share it look alike; see `expectation_maximisation`).

u starts from random record pairs (almost all non-matches), the exact-agreement level computed from
value frequencies, which is exact and cheap. For identity fields (first name, date of birth) that is
also u among candidate non-matches. Shareable fields (address, landline, surname: what a household has
in common) agree far more often among candidate non-matches than among random pairs, and together, so
their u is learned by expectation-maximisation with m and λ over the comparison vectors of the
candidate pairs (see `expectation_maximisation`). All of it is numpy over an int8 matrix (pairs x
comparisons) collapsed to its distinct rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .records import Column

NULL_LEVEL = 0
EXACT_LEVEL = 1
# One pseudo-pair per level keeps every m and u away from 0 (a weight of minus infinity would let a
# single unlucky typo veto a match no matter what else agrees).
PSEUDO_COUNT = 1.0


@dataclass
class EmOutcome:
    m: list[np.ndarray]
    u: list[np.ndarray]  # both non-match classes merged per level: for showing a level's evidence
    u_strangers: list[np.ndarray]
    u_look_alikes: list[np.ndarray]
    # How the two non-match classes mix among all pairs (see `NonMatchMixture`).
    mixture: NonMatchMixture
    match_share: float  # among the candidate pairs
    random_match_probability: float  # λ for two records drawn at random: the prior that scoring uses
    iterations: int
    converged: bool


@dataclass(frozen=True)
class NonMatchMixture:
    """A non-match pair's likelihood among all pairs: strangers x Π u_strangers + look_alikes x Π
    u_look_alikes. Look-alikes (housemates) agree on their shared fields together, which per-field u
    cannot say, so a pair's Bayes factor is taken over its whole comparison vector (`pair_log2_bayes_factors`)."""

    strangers: float
    look_alikes: float


def level_weights(m: np.ndarray, u: np.ndarray) -> np.ndarray:
    """log2(m/u) per level, 0 for the null level: each level's own evidence, what a pair agreeing at that
    level and nowhere else gains. Exact agreement never counts against a match (it can only look so where
    the data is thin or housemates share the value more often than duplicates keep it)."""
    weights = np.log2(m / u)
    weights[NULL_LEVEL] = 0.0
    weights[EXACT_LEVEL] = max(weights[EXACT_LEVEL], 0.0)
    return weights


def pair_log2_bayes_factors(
    matrix: np.ndarray,
    m: list[np.ndarray],
    u_strangers: list[np.ndarray],
    u_look_alikes: list[np.ndarray],
    mixture: NonMatchMixture,
    stranger_adjustment: np.ndarray | None = None,
) -> np.ndarray:
    """log2 P(y | match) / P(y | non-match) per row of the comparison matrix (the pair's match weight).

    stranger_adjustment (log2, per row) replaces a level's u among strangers by a value's own: for term
    frequencies, the share of records holding the value both sides agree on."""
    log_m = np.zeros(matrix.shape[0])
    log_strangers = np.full(matrix.shape[0], np.log2(mixture.strangers))
    log_look_alikes = np.full(matrix.shape[0], np.log2(max(mixture.look_alikes, 1e-300)))
    for k in range(matrix.shape[1]):
        levels = matrix[:, k]
        log_m += np.log2(m[k])[levels]
        log_strangers += np.log2(u_strangers[k])[levels]
        log_look_alikes += np.log2(u_look_alikes[k])[levels]
    if stranger_adjustment is not None:
        log_strangers += stranger_adjustment
    return log_m - np.logaddexp2(log_strangers, log_look_alikes)


def exact_agreement_rate(column: Column) -> float:
    """P(two random records with a value have the same value) = Σ c(c-1) / (N(N-1)) over value counts."""
    counts = np.bincount(column.codes[column.codes >= 0]).astype(np.float64)
    total = counts.sum()
    if total < 2:
        return 0.0
    return float((counts * (counts - 1)).sum() / (total * (total - 1)))


def estimate_u(random_matrix: np.ndarray, level_counts: list[int], exact_rates: list[float | None]) -> list[np.ndarray]:
    """u per comparison from the levels of random pairs; exact_rates (when given) fix the exact level.

    Missing values do not count: u, like m, is conditional on both values being present.
    """
    estimates = []
    for k, levels in enumerate(level_counts):
        observed = np.bincount(random_matrix[:, k], minlength=levels).astype(np.float64)
        observed[NULL_LEVEL] = 0.0
        u = np.ones(levels)
        smoothed = observed[EXACT_LEVEL:] + PSEUDO_COUNT
        u[EXACT_LEVEL:] = smoothed / smoothed.sum()
        exact = exact_rates[k]
        if exact is not None:
            # Frequencies give the exact level precisely; the sample shares out the rest.
            exact = min(max(exact, 1.0 / max(random_matrix.shape[0], 1)), 0.5)
            rest = observed[EXACT_LEVEL + 1 :] + PSEUDO_COUNT
            u[EXACT_LEVEL] = exact
            u[EXACT_LEVEL + 1 :] = (1.0 - exact) * rest / rest.sum()
        estimates.append(u)
    return estimates


def initial_m(levels: int) -> np.ndarray:
    """A starting point that says "matches mostly agree": the exact level gets the most mass, each weaker
    level a third of the one before, "else" 5%."""
    m = np.ones(levels)
    agreeing = levels - 2  # exact and the graded levels
    shares = np.array([3.0**-i for i in range(agreeing)])
    m[EXACT_LEVEL : levels - 1] = 0.95 * shares / shares.sum()
    m[levels - 1] = 0.05
    return m


def encode_patterns(matrix: np.ndarray, level_counts: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct comparison vectors, how often each occurs, and each row's pattern index."""
    code = np.zeros(matrix.shape[0], dtype=np.int64)
    for k, levels in enumerate(level_counts):
        code = code * levels + matrix[:, k]
    _, first_row, inverse, counts = np.unique(code, return_index=True, return_inverse=True, return_counts=True)
    return matrix[first_row], counts.astype(np.float64), inverse


def _log_likelihoods(patterns: np.ndarray, probabilities: list[np.ndarray]) -> np.ndarray:
    """Σ_k log p_k(level) per pattern; the null level (probability 1 in both classes) adds nothing."""
    total = np.zeros(patterns.shape[0])
    for k, p_k in enumerate(probabilities):
        total += np.log(p_k)[patterns[:, k]]
    return total


def _level_distribution(levels_of_pattern: np.ndarray, weights: np.ndarray, levels: int) -> np.ndarray:
    """Smoothed share of the (weighted) pairs at each non-null level; index 0 (null) is set to 1."""
    at_level = np.bincount(levels_of_pattern, weights=weights, minlength=levels)
    smoothed = at_level[EXACT_LEVEL:] + PSEUDO_COUNT
    distribution = np.ones(levels)
    distribution[EXACT_LEVEL:] = smoothed / smoothed.sum()
    return distribution


def expectation_maximisation(
    matrix: np.ndarray,
    level_counts: list[int],
    random_pair_u: list[np.ndarray],
    *,
    shareable: list[bool],
    max_iterations: int,
    tolerance: float,
    all_pairs: float,
    match_share: float = 0.5,
    learn_match_share: bool = True,
) -> EmOutcome:
    """Fit m, u and λ (the share of matches) to the comparison vectors of the candidate pairs.

    The candidates' non-matches come in two kinds that the fields tell apart: strangers who happen to
    collide on a blocking key, and look-alikes who share an address, a landline, a surname. So the
    mixture has one match class and two non-match classes. In both non-match classes identity fields
    keep their random-pair u (different people's first names and birth dates agree only by chance); the
    u of shareable fields is learned, starting at random-pair u for strangers and at "mostly agree"
    for look-alikes. Pinning the identity fields is what keeps the classes meaning "same person" and
    "different people" (with every u free, EM would rather split clean duplicates from noisy ones).
    The two non-match classes are then merged into one u per level, so the weights stay additive.

    Strangers are random pairs that happen to pass the blocking rules, so their u is random-pair u for
    every field and their likelihood among the candidates is u(y) / P(pass | stranger): a rule on a common
    field (a birthday) fills the candidates with strangers who agree on it, and without that factor EM
    could only explain them as matches. Blocking exists to keep every match (and look-alikes share the
    keys too), so the strangers outside the candidates are all the pairs but the candidates' matches and
    look-alikes, and P(pass | stranger) is the candidate strangers over all strangers. The same counts give
    λ for two random records (splink likewise reverses its blocking rule's effect on λ). `all_pairs` is
    n(n-1)/2, the pairs blocking chose from.
    """
    patterns, counts, _ = encode_patterns(matrix, level_counts)
    candidates = float(counts.sum())
    all_pairs = max(float(all_pairs), candidates)

    def all_strangers(class_shares: np.ndarray) -> float:
        return max(all_pairs - candidates * (class_shares[0] + class_shares[2]), 1.0)

    def stranger_pass_rate(class_shares: np.ndarray) -> float:
        return min(max(candidates * class_shares[1] / all_strangers(class_shares), 1e-300), 1.0)

    m = [initial_m(levels) for levels in level_counts]
    strangers = [u_k.copy() for u_k in random_pair_u]
    look_alikes = [
        initial_m(levels) if shared else u_k.copy()
        for u_k, shared, levels in zip(random_pair_u, shareable, level_counts, strict=True)
    ]
    shares = np.array([match_share, (1 - match_share) / 2, (1 - match_share) / 2])
    iterations, converged = 0, False
    while iterations < max_iterations and not converged:
        iterations += 1
        # E-step: responsibility of each class for each distinct comparison vector.
        log_joint = np.log(shares)[:, None] + np.vstack(
            [
                _log_likelihoods(patterns, m),
                _log_likelihoods(patterns, strangers) - np.log(stranger_pass_rate(shares)),
                _log_likelihoods(patterns, look_alikes),
            ]
        )
        log_joint -= log_joint.max(axis=0)
        responsibility = np.exp(log_joint)
        responsibility /= responsibility.sum(axis=0)
        expected = counts * responsibility  # expected pairs per class and pattern
        # M-step: level distributions per class (u of identity fields stays fixed), then class shares.
        new_m = [_level_distribution(patterns[:, k], expected[0], levels) for k, levels in enumerate(level_counts)]
        new_strangers = strangers  # random pairs that passed blocking: described by random-pair u alone
        new_look_alikes = [
            _level_distribution(patterns[:, k], expected[2], levels) if shareable[k] else random_pair_u[k]
            for k, levels in enumerate(level_counts)
        ]
        new_shares = np.maximum(expected.sum(axis=1) / counts.sum(), 1e-9)
        if not learn_match_share:
            new_shares[1:] *= (1 - match_share) / new_shares[1:].sum()
            new_shares[0] = match_share
        new_shares /= new_shares.sum()
        change = max(
            float(np.abs(new_shares - shares).max()),
            *(
                float(np.abs(a - b).max())
                for a, b in zip(new_m + new_strangers + new_look_alikes, m + strangers + look_alikes, strict=True)
            ),
        )
        m, strangers, look_alikes, shares = new_m, new_strangers, new_look_alikes, new_shares
        converged = change < tolerance
    non_match_share = shares[1] + shares[2]
    u = [(shares[1] * a + shares[2] * b) / non_match_share for a, b in zip(strangers, look_alikes, strict=True)]
    share = float(shares[0])
    strangers_total, look_alikes_total = all_strangers(shares), candidates * float(shares[2])
    mixture = NonMatchMixture(
        strangers=strangers_total / (strangers_total + look_alikes_total),
        look_alikes=look_alikes_total / (strangers_total + look_alikes_total),
    )
    return EmOutcome(
        m=m,
        u=u,
        u_strangers=strangers,
        u_look_alikes=look_alikes,
        mixture=mixture,
        match_share=share,
        random_match_probability=candidates * share / all_pairs,
        iterations=iterations,
        converged=converged,
    )


def match_probability(weights: np.ndarray, prior: float) -> np.ndarray:
    """P(match | weights) from the Bayes factor 2^weight and the prior λ."""
    log2_odds = np.log2(prior / (1 - prior)) + weights
    return 1.0 / (1.0 + np.exp2(-np.clip(log2_odds, -1000, 1000)))
