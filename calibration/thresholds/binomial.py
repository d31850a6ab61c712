"""Binomial tail arithmetic for operating points: exact, NumPy only (no SciPy on the edge).

Everything a stated-confidence threshold needs reduces to the binomial CDF: the rank of
the order statistic that bounds a rate (``allowed_exceedances``), the fewest parts that
can support a target (``min_parts``), and Clopper-Pearson intervals for a measured rate.
"""

from __future__ import annotations

import functools
import math

import numpy as np

_BISECT_STEPS = 60  # 2**-60 of the unit interval: far below any rate a line can measure


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space so that n in the thousands stays exact."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lf = _log_factorials(1 << n.bit_length())
    i = np.arange(k + 1)
    terms = lf[n] - lf[i] - lf[n - i] + i * math.log(p) + (n - i) * math.log1p(-p)
    top = float(terms.max())
    return min(1.0, math.exp(top) * float(np.exp(terms - top).sum()))


@functools.lru_cache(maxsize=8)
def _log_factorials(size: int) -> np.ndarray:
    """log(0!) .. log((size - 1)!); sizes are powers of two so a few tables serve every n."""
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, size, dtype=np.float64)))])


def _alpha(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    return 1.0 - confidence


def allowed_exceedances(n: int, p: float, confidence: float) -> int | None:
    """Largest j with P(Binomial(n, p) <= j) <= 1 - confidence; None when even j = 0 fails.

    Among n good scores, at most j may lie above the threshold: the threshold is the
    (n - j)-th smallest score. Its true exceedance rate is above p exactly when fewer than
    n - j of n uniforms fall below 1 - p, i.e. when Binomial(n, p) <= j, which this j makes
    at most 1 - confidence likely.
    """
    alpha = _alpha(confidence)
    if not 0.0 < p < 1.0:
        raise ValueError(f"target rate must lie strictly between 0 and 1, got {p}")
    pmf = (1.0 - p) ** n  # P(Binomial = 0)
    cdf, j = pmf, 0
    if cdf > alpha:
        return None
    while j + 1 < n:
        pmf *= (n - j) / (j + 1) * p / (1.0 - p)
        if cdf + pmf > alpha:
            break
        cdf += pmf
        j += 1
    return j


def min_parts(p: float, confidence: float) -> int:
    """Fewest parts n for which ``allowed_exceedances(n, p, confidence)`` exists: (1 - p)^n <= alpha."""
    alpha = _alpha(confidence)
    n = max(1, math.ceil(math.log(alpha) / math.log1p(-p)))
    # The closed form can be one off in floating point; settle it on the defining inequality.
    while n > 1 and (1.0 - p) ** (n - 1) <= alpha:
        n -= 1
    while (1.0 - p) ** n > alpha:
        n += 1
    return n


def upper_bound(x: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper limit: the smallest p with P(Binomial(n, p) <= x) <= alpha."""
    alpha = _alpha(confidence)
    if x >= n:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2.0
        if binom_cdf(x, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def lower_bound(x: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson lower limit: the largest p with P(Binomial(n, p) >= x) <= alpha."""
    alpha = _alpha(confidence)
    if x <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2.0
        if 1.0 - binom_cdf(x - 1, n, mid) <= alpha:
            lo = mid
        else:
            hi = mid
    return lo


def clopper_pearson(x: int, n: int, confidence: float) -> tuple[float, float]:
    """Two-sided exact interval for x successes in n trials (each tail (1 - confidence) / 2)."""
    if n <= 0:
        return 0.0, 1.0
    one_sided = 1.0 - _alpha(confidence) / 2.0
    return lower_bound(x, n, one_sided), upper_bound(x, n, one_sided)
