"""The one-run ε lower bound (Steinke, Nasr & Jagielski 2023) against closed forms and a maintained implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.audit_bound import (AuditBoundError, abstaining_guesses, clopper_pearson_epsilon, one_run_epsilon,
                                one_run_p_value)

# (m, r, v, delta) -> ε at 95% confidence, as computed by Google's jax_privacy 2.0.0
# (jax_privacy/auditing.py: _epsilon_one_run(0.0, m, r, v, 0.05, delta); its brentq xtol is 1e-6).
JAX_PRIVACY = [
    (1000, 100, 100, 1e-5, 3.465376229385333),
    (1000, 100, 90, 1e-5, 1.6261436787042223),
    (1000, 200, 150, 1e-5, 0.8199728373996844),
    (500, 100, 80, 1e-5, 0.9568599242798269),
    (1000, 500, 300, 0.0, 0.25168496202741125),
    (10000, 1000, 700, 1e-5, 0.7292531300505262),
    (200, 40, 40, 1e-5, 2.548240431916748),
]


@pytest.mark.parametrize(("m", "r", "v", "delta", "expected"), JAX_PRIVACY)
def test_matches_jax_privacy(m: int, r: int, v: int, delta: float, expected: float) -> None:
    assert one_run_epsilon(m, r, v, delta=delta, significance=0.05) == pytest.approx(expected, abs=2e-6)


def test_perfect_guesses_without_delta_match_the_closed_form() -> None:
    # δ = 0, all r guesses right: p-value q^r = 0.05, so q = 0.05^(1/r) and ε = log(q / (1 - q)).
    q = 0.05 ** (1 / 100)
    assert one_run_epsilon(1000, 100, 100, delta=0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-8)
    assert math.log(q / (1 - q)) == pytest.approx(3.49297, abs=1e-5)


def test_p_value_without_delta_is_the_binomial_tail() -> None:
    # ε = 0: each guess is a fair coin; P[Binomial(10, 1/2) >= 9] = 11/1024
    assert one_run_p_value(100, 10, 9, 0.0, 0.0) == pytest.approx(11 / 1024, rel=1e-12)


def test_chance_level_guessing_gives_no_bound() -> None:
    assert one_run_epsilon(1000, 200, 100, delta=1e-5) == 0.0


def test_delta_only_loosens_the_bound() -> None:
    assert one_run_epsilon(1000, 100, 95, delta=1e-3) < one_run_epsilon(1000, 100, 95, delta=1e-5) \
        < one_run_epsilon(1000, 100, 95, delta=0.0)


def test_clopper_pearson_pooled_runs() -> None:
    # 90 of 100 right: the one-sided 95% lower bound on the accuracy is 0.836282 (beta.ppf(0.05, 90, 11))
    assert clopper_pearson_epsilon(100, 90) == pytest.approx(math.log(0.836282 / (1 - 0.836282)), abs=1e-5)
    assert clopper_pearson_epsilon(100, 50) == 0.0


def test_abstaining_guesser_counts() -> None:
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5, 0.7])
    included = np.array([True, False, False, False, True, True])
    # top 2: positions 0 (in, right) and 2 (out, wrong); bottom 2: positions 1 and 3 (both out, right)
    assert abstaining_guesses(scores, included, k_plus=2, k_minus=2) == (4, 3)
    assert abstaining_guesses(scores, included, k_plus=3, k_minus=0) == (3, 2)


@pytest.mark.parametrize(("m", "r", "v"), [(10, 11, 1), (10, 5, 6), (10, 5, -1)])
def test_bad_counts_are_named(m: int, r: int, v: int) -> None:
    with pytest.raises(AuditBoundError, match="need 0 <= v"):
        one_run_epsilon(m, r, v, delta=1e-5)
