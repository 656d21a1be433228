"""Confidence intervals and paired comparisons over items.

Every metric is a ratio of per-item sums, sum(numerator) / sum(denominator) (denominator 1 for
plain means; bytes for bits-per-byte; turns for tool-call accuracy), optionally passed through
`exp` (perplexity). The bootstrap resamples items, so items with several turns or tokens count
as one unit, which is what makes the interval honest for correlated sub-scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TRANSFORMS = {"identity": lambda x: x, "exp": np.exp}


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float


def ratio(numerators: np.ndarray, denominators: np.ndarray, transform: str = "identity") -> float:
    total = denominators.sum()
    return float(TRANSFORMS[transform](numerators.sum() / total)) if total else float("nan")


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _resampled_ratios(num: np.ndarray, den: np.ndarray, idx: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return num[idx].sum(axis=1) / den[idx].sum(axis=1)


def bootstrap_interval(numerators, denominators, transform: str = "identity", confidence: float = 0.95,
                       resamples: int = 1000, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of sum(num)/sum(den) over items (resampled with replacement)."""
    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    value = ratio(num, den, transform)
    if len(num) < 2:
        return Interval(value, value, value)
    stats = _resampled_ratios(num, den, _resample_indices(len(num), resamples, seed))
    stats = TRANSFORMS[transform](stats[np.isfinite(stats)])
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return Interval(value, float(low), float(high))


@dataclass(frozen=True)
class Comparison:
    metric: str
    a: float
    b: float
    difference: Interval  # b - a with its paired-bootstrap interval
    p_value: float
    test: str  # "mcnemar" (binary per-item scores) or "paired_bootstrap"
    significant: bool
    items: int

    def summary(self) -> str:
        verdict = "a real difference" if self.significant else "not distinguishable from noise"
        return (f"{self.metric}: {self.a:.4f} -> {self.b:.4f} (diff {self.difference.value:+.4f}, 95% CI "
                f"[{self.difference.low:+.4f}, {self.difference.high:+.4f}], {self.test} p={self.p_value:.3g}, "
                f"{self.items} paired items): {verdict}")


def mcnemar_exact(a_correct: np.ndarray, b_correct: np.ndarray) -> float:
    """Two-sided exact McNemar p-value: a binomial test on the discordant pairs."""
    only_a = int(np.sum(a_correct & ~b_correct))
    only_b = int(np.sum(~a_correct & b_correct))
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_comparison(metric: str, num_a, den_a, num_b, den_b, transform: str = "identity",
                      alpha: float = 0.05, resamples: int = 1000, seed: int = 0) -> Comparison:
    """Compare two systems on the same items (arrays aligned by item). Binary per-item scores
    use the exact McNemar test; other metrics a paired bootstrap (both systems resampled with the
    same item indices), whose two-sided p-value is twice the smaller tail of the difference."""
    num_a, den_a, num_b, den_b = (np.asarray(x, dtype=np.float64) for x in (num_a, den_a, num_b, den_b))
    a, b = ratio(num_a, den_a, transform), ratio(num_b, den_b, transform)
    idx = _resample_indices(len(num_a), resamples, seed)
    fa = TRANSFORMS[transform](_resampled_ratios(num_a, den_a, idx))
    fb = TRANSFORMS[transform](_resampled_ratios(num_b, den_b, idx))
    diffs = (fb - fa)[np.isfinite(fb - fa)]
    low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2]) if len(diffs) else (float("nan"),) * 2
    binary = (np.all(den_a == 1) and np.all(den_b == 1)
              and np.all(np.isin(num_a, (0, 1))) and np.all(np.isin(num_b, (0, 1))))
    if binary:
        p, test = mcnemar_exact(num_a == 1, num_b == 1), "mcnemar"
    else:
        tail = min(np.mean(diffs <= 0), np.mean(diffs >= 0)) if len(diffs) else 1.0
        p, test = float(min(1.0, 2 * tail)), "paired_bootstrap"
    return Comparison(metric, a, b, Interval(b - a, float(low), float(high)), p, test, p < alpha, len(num_a))
