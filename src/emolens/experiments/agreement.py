"""Agreement between two raters (a judge and the rules): Cohen's kappa, plain or weighted."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

from emolens.errors import EmolensError

WEIGHTS = (None, "linear", "quadratic")


def cohen_kappa(
    first: Sequence[Hashable | None],
    second: Sequence[Hashable | None],
    *,
    weights: str | None = None,
    categories: Sequence[Hashable] | None = None,
) -> float:
    """Cohen's kappa between two raters over the same items.

    Pairs where either rating is None (unparsable, unscorable) are left out. `weights`
    "linear" or "quadratic" gives the weighted kappa for ordinal scores, with distances taken
    between positions in `categories` (default: the sorted distinct ratings). Returns nan when
    chance agreement is total (both raters gave one and the same category to every item).
    """
    if len(first) != len(second):
        raise EmolensError(f"cohen_kappa: {len(first)} ratings against {len(second)}")
    if weights not in WEIGHTS:
        raise EmolensError(f"cohen_kappa: weights must be one of {WEIGHTS}, not {weights!r}")
    pairs = [(a, b) for a, b in zip(first, second, strict=True) if a is not None and b is not None]
    if not pairs:
        raise EmolensError("cohen_kappa: no item has both ratings")
    if categories is None:
        categories = sorted({value for pair in pairs for value in pair}, key=_order)
    index = {category: position for position, category in enumerate(categories)}
    missing = {value for pair in pairs for value in pair if value not in index}
    if missing:
        raise EmolensError(f"cohen_kappa: ratings {sorted(map(repr, missing))} not in categories")

    k, n = len(categories), len(pairs)
    observed = [[0.0] * k for _ in range(k)]
    for a, b in pairs:
        observed[index[a]][index[b]] += 1 / n
    rows = [sum(row) for row in observed]
    cols = [sum(observed[i][j] for i in range(k)) for j in range(k)]
    span = max(k - 1, 1)

    def disagreement(i: int, j: int) -> float:
        if weights is None:
            return float(i != j)
        distance = abs(i - j) / span
        return distance if weights == "linear" else distance**2

    seen = sum(disagreement(i, j) * observed[i][j] for i in range(k) for j in range(k))
    chance = sum(disagreement(i, j) * rows[i] * cols[j] for i in range(k) for j in range(k))
    if chance == 0:
        return math.nan
    return 1 - seen / chance


def _order(value: Hashable) -> tuple[int, object]:
    """Numbers before strings, each in natural order, so mixed ratings still sort."""
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))
