"""Uncertainty for experiment summaries: pure functions, no I/O.

Rates get Wilson score intervals; means and other statistics get percentile bootstrap
intervals with a fixed seed (so a summary recomputed from the same results is identical);
correlations get Fisher-z intervals.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

Z95 = 1.959963984540054  # the 97.5th percentile of the standard normal


@dataclass(frozen=True)
class Estimate:
    """A value with a 95% interval; `n` observations behind it. None where undefined."""

    value: float | None
    low: float | None
    high: float | None
    n: int

    def to_json(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}


def wilson(successes: int, n: int, z: float = Z95) -> Estimate:
    """The rate successes/n with its Wilson score interval (undefined when n is 0)."""
    if n == 0:
        return Estimate(None, None, None, 0)
    rate = successes / n
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Estimate(rate, max(0.0, centre - half), min(1.0, centre + half), n)


def bootstrap(
    values: ArrayLike,
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> Estimate:
    """`statistic` of `values` with a percentile bootstrap 95% interval."""
    data = np.asarray(values, dtype=np.float64)
    if len(data) == 0:
        return Estimate(None, None, None, 0)
    value = float(statistic(data))
    if len(data) == 1:
        return Estimate(value, None, None, 1)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(data), size=(resamples, len(data)))
    stats = np.array([statistic(data[row]) for row in draws])
    low, high = np.percentile(stats, [2.5, 97.5])
    return Estimate(value, float(low), float(high), len(data))


def correlation(x: ArrayLike, y: ArrayLike) -> Estimate:
    """Pearson r with its Fisher-z 95% interval (undefined for fewer than 4 points or a
    constant input)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(a)
    if n < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return Estimate(None, None, None, n)
    r = float(np.corrcoef(a, b)[0, 1])
    if n < 4 or abs(r) >= 1:
        return Estimate(r, None, None, n)
    z, half = math.atanh(r), Z95 / math.sqrt(n - 3)
    return Estimate(r, math.tanh(z - half), math.tanh(z + half), n)
