"""Evaluation metrics: Pass@k with the unbiased estimator of Chen et al. 2021, and Avg@k.

With n samples of a problem of which c are correct, the probability that at least one of k samples
drawn without replacement from those n is correct is ``1 - C(n-c, k) / C(n, k)``. The binomials
overflow floats for large n, so it is computed as the product ``prod_{i=n-c+1}^{n} (1 - k/i)``
(the form of the paper's reference code). With n = k, as in the paper's Pass@8 from 8 samples, it
is simply "any of the k is correct".

A sample counts as correct when its reward is > 0 (the same rule as a mixed group's "success").
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k of one problem from n samples with c correct (0 <= c <= n, 1 <= k <= n)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def correct_count(rewards: Sequence[float]) -> int:
    return sum(1 for r in rewards if r > 0)


def mean_pass_at_k(rewards_per_problem: Sequence[Sequence[float]], k: int) -> float:
    """Pass@k over a dataset: the mean of each problem's unbiased estimate (n = its sample count)."""
    if not rewards_per_problem:
        raise ValueError("no problems")
    return sum(pass_at_k(len(r), correct_count(r), k) for r in rewards_per_problem) / len(rewards_per_problem)


def avg_at_k(rewards_per_problem: Sequence[Sequence[float]]) -> float:
    """Avg@k: the fraction of correct samples per problem, averaged over problems."""
    if not rewards_per_problem or any(len(r) == 0 for r in rewards_per_problem):
        raise ValueError("every problem needs at least one sample")
    return sum(correct_count(r) / len(r) for r in rewards_per_problem) / len(rewards_per_problem)


def wilson(successes: int, n: int, level: float = 0.95) -> dict:
    """A rate with its Wilson score interval (sound at rates near 0 or 1, where the normal one is not)."""
    if n == 0:
        return {"rate": None, "ci_low": None, "ci_high": None, "n": 0, "successes": 0}
    z = {0.95: 1.959964, 0.99: 2.575829}.get(level) or 1.959964
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"rate": p, "ci_low": max(0.0, centre - half), "ci_high": min(1.0, centre + half), "n": n,
            "successes": successes}


def newcombe_difference(a: dict, b: dict) -> dict:
    """rate(a) - rate(b) of two independent Wilson rates with Newcombe's hybrid score interval (his method 10),
    which keeps the Wilson interval's good behaviour near 0 and 1."""
    if not a["n"] or not b["n"]:
        return {"difference": None, "ci_low": None, "ci_high": None}
    d = a["rate"] - b["rate"]
    low = d - math.sqrt((a["rate"] - a["ci_low"]) ** 2 + (b["ci_high"] - b["rate"]) ** 2)
    high = d + math.sqrt((a["ci_high"] - a["rate"]) ** 2 + (b["rate"] - b["ci_low"]) ** 2)
    return {"difference": d, "ci_low": low, "ci_high": high}
