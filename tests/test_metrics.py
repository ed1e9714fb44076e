"""Pass@k (Chen et al. 2021, unbiased) and Avg@k against hand-computed values and brute-force enumeration."""

import itertools
import math
from fractions import Fraction

import pytest

from mel_core.study.metrics import avg_at_k, mean_pass_at_k, pass_at_k


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 0, 1, 0.0),
    (5, 5, 3, 1.0),
    (10, 3, 1, 0.3),            # Pass@1 is the fraction correct
    (4, 2, 2, 5 / 6),           # 1 - C(2,2)/C(4,2) = 1 - 1/6
    (8, 1, 8, 1.0),             # n = k: any correct sample is a pass
    (8, 0, 8, 0.0),
    (6, 2, 3, 1 - 4 / 20),      # 1 - C(4,3)/C(6,3)
    (1000, 1, 100, 0.1),        # 1 - C(999,100)/C(1000,100) = 1 - 900/1000
])
def test_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_matches_brute_force_enumeration_of_k_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            samples = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                hit = sum(1 for s in subsets if any(samples[i] for i in s))
                assert pass_at_k(n, c, k) == pytest.approx(hit / len(subsets), abs=1e-12), (n, c, k)


def test_stable_where_the_binomials_overflow_floats():
    n, c, k = 2000, 7, 500  # C(2000, 500) ~ 1e486: a float division of binomials is inf/inf
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9)


def test_rejects_impossible_arguments():
    for n, c, k in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_dataset_level_avg_and_pass():
    rewards = [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert avg_at_k(rewards) == pytest.approx((0.25 + 1 + 0) / 3)
    assert mean_pass_at_k(rewards, 4) == pytest.approx((1 + 1 + 0) / 3)
    assert mean_pass_at_k(rewards, 2) == pytest.approx((0.5 + 1 + 0) / 3)  # 1 - C(3,2)/C(4,2) = 1/2
    assert mean_pass_at_k(rewards, 1) == pytest.approx(avg_at_k(rewards))
    with pytest.raises(ValueError):
        avg_at_k([[1], []])
