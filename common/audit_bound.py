"""Empirical ε lower bounds from membership guesses on canaries.

One run (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training
Run", NeurIPS 2023, arXiv:2305.08846): m canaries are each included in the
training data independently with probability 1/2; an auditor guesses
"included" for r of them (abstaining on the rest) and gets v right. If the
training is (ε, δ)-DP, the number of correct guesses is dominated by
Binomial(r, e^ε / (1 + e^ε)) up to a δ term (their Theorem 5.2), which gives
the p-value :func:`one_run_p_value` (their Algorithm 2, as in Google's
``jax_privacy.auditing._one_run_p_value``); :func:`one_run_epsilon` is the
largest ε that p-value rejects at ``significance``.

Repeated runs: :func:`clopper_pearson_epsilon` pools the guesses of
independent runs and takes the one-sided Clopper–Pearson lower confidence
bound p on the guess accuracy; ε ≥ log(p / (1 - p)) holds for pure ε-DP
(an approximation under (ε, δ) that ignores δ; reported as such).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, special, stats

from common.errors import MedkdError


class AuditBoundError(MedkdError, ValueError):
    """Invalid counts or parameters for an audit bound; the message names them."""


def _check(m: int, r: int, v: int, delta: float) -> None:
    if not (isinstance(m, int | np.integer) and isinstance(r, int | np.integer) and isinstance(v, int | np.integer)):
        raise AuditBoundError(f"m, r and v must be integers, got {m!r}, {r!r}, {v!r}")
    if not 0 <= v <= r <= m:
        raise AuditBoundError(f"need 0 <= v (correct) <= r (guesses) <= m (canaries), got v={v}, r={r}, m={m}")
    if not 0 <= delta <= 1:
        raise AuditBoundError(f"delta must be in [0, 1], got {delta}")


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] under the null hypothesis "the training is (ε, δ)-DP".

    Steinke, Nasr & Jagielski (2023), Algorithm 2: β = P[Binomial(r, q) ≥ v]
    with q = e^ε / (1 + e^ε), plus 2 m δ times the largest average
    P[v > Binomial(r, q) ≥ v - i] / i over i = 1..v.
    """
    _check(m, r, v, delta)
    if epsilon < 0:
        raise AuditBoundError(f"epsilon must be >= 0, got {epsilon}")
    q = special.expit(epsilon)
    beta = float(stats.binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(beta, 1.0)
    i = np.arange(1, v + 1)
    tail = stats.binom.sf(v - i - 1, r, q) - beta
    alpha = float(np.max(tail / i, initial=0.0))
    return min(beta + alpha * delta * 2 * m, 1.0)


def one_run_epsilon(m: int, r: int, v: int, *, delta: float, significance: float = 0.05) -> float:
    """The largest ε that ``v`` correct of ``r`` guesses on ``m`` canaries rejects at ``significance`` (0 if none).

    With confidence 1 - ``significance``, the training is not (ε', δ)-DP for
    any ε' below the returned value.
    """
    _check(m, r, v, delta)
    if not 0 < significance < 1:
        raise AuditBoundError(f"significance must be in (0, 1), got {significance}")

    def margin(eps: float) -> float:  # > 0 where the claim (ε, δ) is rejected
        return significance - one_run_p_value(m, r, v, eps, delta)

    if margin(0.0) <= 0:
        return 0.0
    low, high = 0.0, 1.0
    while margin(high) > 0:
        low, high = high, high * 2
        if high > 1e4:
            return math.inf
    return float(optimize.brentq(margin, low, high, xtol=1e-9))


def clopper_pearson_epsilon(r: int, v: int, *, significance: float = 0.05) -> float:
    """ε ≥ log(p / (1 - p)), p the one-sided Clopper–Pearson lower bound on the accuracy of ``v`` of ``r`` guesses.

    Valid for pure ε-DP when the guesses come from independent runs; 0 when
    the accuracy bound is not above 1/2.
    """
    if not 0 <= v <= r or r == 0:
        raise AuditBoundError(f"need 0 <= v <= r and r > 0, got v={v}, r={r}")
    if v == 0:
        return 0.0
    p = float(stats.beta.ppf(significance, v, r - v + 1))
    return max(0.0, math.log(p / (1 - p))) if p < 1 else math.inf


def abstaining_guesses(scores: np.ndarray, included: np.ndarray, *, k_plus: int,
                       k_minus: int) -> tuple[int, int]:
    """(guesses, correct) of the guesser that says "in" for the ``k_plus`` highest scores, "out" for the ``k_minus``
    lowest and abstains on the rest. ``scores``, ``included``: (m,); ties broken by position (stable sort)."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise AuditBoundError(f"scores and included must be (m,) arrays of one length, got {scores.shape} and "
                              f"{included.shape}")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > scores.size:
        raise AuditBoundError(f"need k_plus, k_minus >= 0 and k_plus + k_minus <= m={scores.size}, got {k_plus}, "
                              f"{k_minus}")
    order = np.argsort(-scores, kind="stable")
    top, bottom = order[:k_plus], order[scores.size - k_minus:] if k_minus else order[:0]
    correct = int(included[top].sum()) + int((~included[bottom]).sum())
    return k_plus + k_minus, correct
