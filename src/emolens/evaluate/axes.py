"""What the main axes of the emotion vectors encode (METHOD.md 4, geometry): no model, no I/O.

For the top principal components of the unit vectors: the variance each explains, the r of
each with the valence and arousal ratings (and with other norms), the emotions at its two
ends, and a leave-one-out linear fit of valence and arousal from the top components (so a
reader sees whether valence is represented even when it is not the main axis). The
split-half check estimates the components from two disjoint halves of the stories and
compares them: a component that is a property of the model and the emotions reappears; one
made by the particular stories does not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from emolens.evaluate.geometry import cosine_matrix, pearson, unit_rows, upper


@dataclass(frozen=True)
class Component:
    """One principal component: its share of the variance, r with the ratings, its ends."""

    index: int
    variance: float
    valence_r: float | None
    arousal_r: float | None
    norms_valence_r: float | None
    norms_arousal_r: float | None
    low: tuple[str, ...]
    high: tuple[str, ...]


@dataclass(frozen=True)
class Axes:
    """The top components, the leave-one-out fit of the ratings from them, and (when the
    per-story activations are available) the split-half reliability."""

    components: tuple[Component, ...]
    fit_valence_r: float | None
    fit_arousal_r: float | None
    rated: int
    split_half: SplitHalf | None

    def to_json(self) -> dict:
        return {
            "components": [
                vars(c) | {"low": list(c.low), "high": list(c.high)} for c in self.components
            ],
            "fit_valence_r": self.fit_valence_r,
            "fit_arousal_r": self.fit_arousal_r,
            "rated": self.rated,
            "split_half": vars(self.split_half)
            | {"component_cosine": list(self.split_half.component_cosine)}
            if self.split_half
            else None,
        }


@dataclass(frozen=True)
class SplitHalf:
    """Components from two disjoint halves of the stories: |cos| of each of the top three
    components between halves, r of the emotions' PC1 scores, and r of the two similarity
    structures (upper triangles of the cosine matrices)."""

    component_cosine: tuple[float, ...]
    pc1_scores_r: float | None
    similarity_r: float | None
    stories: int


def components(vectors: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores [emotions, k], directions [k, width] and explained variance ratios [k] of the
    PCA of the unit vectors (centred)."""
    units = unit_rows(vectors)
    centred = units - units.mean(0)
    left, singular, right = np.linalg.svd(centred, full_matrices=False)
    k = min(k, len(singular))
    variance = singular**2 / max(float((singular**2).sum()), 1e-300)
    return left[:, :k] * singular[:k], right[:k], variance[:k]


def loo_fit_r(scores: np.ndarray, target: np.ndarray) -> float | None:
    """r of leave-one-out predictions of `target` from a linear fit on `scores` (with an
    intercept) against `target` itself."""
    n = len(target)
    if n < scores.shape[1] + 3:
        return None
    design = np.column_stack([np.ones(n), scores])
    predictions = np.empty(n)
    for i in range(n):
        keep = np.arange(n) != i
        coef, *_ = np.linalg.lstsq(design[keep], target[keep], rcond=None)
        predictions[i] = design[i] @ coef
    return pearson(predictions, target)


def evaluate_axes(
    vectors: np.ndarray,
    emotions: Sequence[str],
    ratings: Mapping[str, tuple[float, float]],
    *,
    norms: Mapping[str, tuple[float, float]] | None = None,
    k: int = 10,
    ends: int = 5,
    halves: tuple[np.ndarray, np.ndarray] | None = None,
    stories: int = 0,
) -> Axes:
    """The axes of `vectors` [emotions, width]; `halves` are the emotion vectors estimated
    from each half of the stories (`stories` in all), for the split-half check."""
    emotions = list(emotions)
    scores, _, variance = components(vectors, k)
    rated = [i for i, e in enumerate(emotions) if e.lower() in ratings]
    valence = np.array([ratings[emotions[i].lower()][0] for i in rated])
    arousal = np.array([ratings[emotions[i].lower()][1] for i in rated])
    normed = [i for i, e in enumerate(emotions) if norms and e.lower() in norms]
    found = []
    for c in range(scores.shape[1]):
        column = scores[:, c]
        order = np.argsort(column)
        found.append(Component(
            index=c + 1,
            variance=float(variance[c]),
            valence_r=pearson(column[rated], valence),
            arousal_r=pearson(column[rated], arousal),
            norms_valence_r=pearson(column[normed], [norms[emotions[i].lower()][0] for i in normed]) if norms else None,
            norms_arousal_r=pearson(column[normed], [norms[emotions[i].lower()][1] for i in normed]) if norms else None,
            low=tuple(emotions[i] for i in order[:ends]),
            high=tuple(emotions[i] for i in order[::-1][:ends]),
        ))  # fmt: skip
    split = split_half(*halves, stories) if halves is not None else None
    return Axes(
        components=tuple(found),
        fit_valence_r=loo_fit_r(scores[rated], valence),
        fit_arousal_r=loo_fit_r(scores[rated], arousal),
        rated=len(rated),
        split_half=split,
    )


def split_half(first: np.ndarray, second: np.ndarray, stories: int) -> SplitHalf:
    """Compare the top three components and the similarity structure of two estimates of the
    same emotion vectors."""
    a_scores, a_dirs, _ = components(first, 3)
    b_scores, b_dirs, _ = components(second, 3)
    cosines = tuple(float(abs(a_dirs[c] @ b_dirs[c])) for c in range(min(len(a_dirs), len(b_dirs))))
    r = pearson(a_scores[:, 0], b_scores[:, 0])
    return SplitHalf(
        component_cosine=cosines,
        pc1_scores_r=None if r is None else abs(r),
        similarity_r=pearson(upper(cosine_matrix(first)), upper(cosine_matrix(second))),
        stories=stories,
    )
