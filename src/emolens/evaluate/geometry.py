"""Geometry of a set of emotion vectors (METHOD.md 4): similarity, PCA, ratings, clusters, RSA.

Plain numpy/scipy on [emotions, width] arrays; no model, no I/O. Undefined statistics (a
correlation over fewer than three words or of a constant) are None, never NaN.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike

PCS = ("PC1", "PC2", "PC3")
# Each PC is flipped so that its correlation with this rating is positive.
ALIGN = {"PC1": "valence", "PC2": "arousal", "PC3": "valence"}


@dataclass(frozen=True)
class PcRatings:
    """Pearson r of one principal component with valence and with arousal."""

    valence: float | None
    arousal: float | None


@dataclass(frozen=True)
class RatingFit:
    """r of each PC ("PC1"...) with ratings, over the `n` emotions (`words`) that have one."""

    n: int
    words: list[str]
    r: dict[str, PcRatings]

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Cluster:
    """A k-means cluster, named after its member closest to the centroid (members closest
    first)."""

    label: str
    size: int
    members: list[str]


@dataclass(frozen=True)
class Geometry:
    """One set of vectors: PCA (variance explained by up to 10 components, sign-aligned
    scores on up to 3, which PCs were flipped), the PCs' r with ratings and with optional
    human `norms`, k-means clusters, and the cosine similarity with its clustered order."""

    n: int
    variance_explained: list[float]
    flipped: dict[str, bool]
    coordinates: dict[str, list[float]]
    ratings: RatingFit
    clusters: list[Cluster]
    order: list[str]
    similarity: list[list[float]]
    norms: RatingFit | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LayerSimilarity:
    """Pearson r between the similarity structures of every pair of `layers` (None where a
    structure is constant)."""

    layers: list[int]
    r: list[list[float | None]]


@dataclass(frozen=True)
class BankGeometry:
    """The bank's vectors and the word baseline at one layer, the bank's similarity structure
    across layers, and the r of the bank's similarity structure with the words'."""

    vectors: Geometry
    baseline: Geometry
    rsa: LayerSimilarity
    baseline_similarity_r: float | None
    ratings_source: str
    norms_source: str | None
    k: int
    seed: int

    def to_json(self) -> dict:
        data = asdict(self)
        data["kmeans"] = {"k": data.pop("k"), "seed": data.pop("seed")}
        return data


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float64)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """Cosine similarity of every pair of rows, [n, n]."""
    units = unit_rows(vectors)
    return np.clip(units @ units.T, -1.0, 1.0)


def cluster_order(similarity: np.ndarray) -> list[int]:
    """Row order that puts similar rows together (average-linkage clustering on 1 - cosine)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    if len(similarity) < 3:
        return list(range(len(similarity)))
    distance = np.clip(1.0 - similarity, 0.0, None)
    np.fill_diagonal(distance, 0.0)
    tree = linkage(squareform((distance + distance.T) / 2, checks=False), method="average")
    return [int(i) for i in leaves_list(tree)]


def pca(vectors: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the rows on the first `k` principal components [n, k] (unit rows, centred)
    and the variance explained by every component."""
    units = unit_rows(vectors)
    centred = units - units.mean(0)
    left, singular, _ = np.linalg.svd(centred, full_matrices=False)
    scores = left[:, :k] * singular[:k]
    variance = singular**2
    return scores, variance / max(float(variance.sum()), 1e-300)


def pearson(x: ArrayLike, y: ArrayLike) -> float | None:
    """Pearson r, or None when undefined (fewer than 3 points, or a constant input)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def rating_correlations(
    scores: np.ndarray, emotions: Sequence[str], ratings: Mapping[str, tuple[float, float]]
) -> RatingFit:
    """r of each PC with valence and arousal over the emotions that have a rating."""
    keep = [i for i, name in enumerate(emotions) if name.lower() in ratings]
    rated = [ratings[emotions[i].lower()] for i in keep]
    table = {}
    for p, pc in enumerate(PCS[: scores.shape[1]]):
        column = scores[keep, p]
        table[pc] = PcRatings(
            valence=pearson(column, [v for v, _ in rated]),
            arousal=pearson(column, [a for _, a in rated]),
        )
    return RatingFit(n=len(keep), words=[emotions[i] for i in keep], r=table)


def align_signs(
    scores: np.ndarray, emotions: Sequence[str], ratings: Mapping[str, tuple[float, float]]
) -> tuple[np.ndarray, list[bool]]:
    """Flip PCs (their sign is arbitrary) so that each correlates positively with the rating
    named in ALIGN; returns the scores and which PCs were flipped."""
    table = rating_correlations(scores, emotions, ratings).r
    flipped = [bool((getattr(table[pc], ALIGN[pc]) or 0.0) < 0) for pc in PCS[: scores.shape[1]]]
    signs = np.where(flipped, -1.0, 1.0)
    return scores * signs, flipped


def kmeans(
    vectors: np.ndarray, emotions: Sequence[str], k: int = 10, seed: int = 0
) -> list[Cluster]:
    """Non-empty k-means clusters of the unit vectors (scipy kmeans2, k-means++ start, fixed
    seed), largest first."""
    from scipy.cluster.vq import kmeans2

    units = unit_rows(vectors)
    k = max(1, min(k, len(units)))
    seeding = {"rng": seed} if "rng" in inspect.signature(kmeans2).parameters else {"seed": seed}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an empty cluster is dropped below
        centroids, labels = kmeans2(units, k, minit="++", **seeding)
    clusters = []
    for c in range(len(centroids)):
        members = np.flatnonzero(labels == c)
        if len(members) == 0:
            continue
        closeness = units[members] @ unit_rows(centroids[c : c + 1])[0]
        ranked = [emotions[int(members[i])] for i in np.argsort(-closeness)]
        clusters.append(Cluster(label=ranked[0], size=len(ranked), members=ranked))
    return sorted(clusters, key=lambda cluster: -cluster.size)


def upper(matrix: np.ndarray) -> np.ndarray:
    """The strict upper triangle of a square matrix, flattened."""
    return matrix[np.triu_indices(len(matrix), k=1)]


def rsa(similarities: Sequence[np.ndarray]) -> np.ndarray:
    """Pearson r between the upper triangles of every pair of similarity matrices, [m, m]
    (NaN where a matrix is constant)."""
    triangles = np.stack([upper(s) for s in similarities])
    if triangles.shape[1] < 2:
        return np.ones((len(similarities), len(similarities)))
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant structure gives NaN
        return np.atleast_2d(np.corrcoef(triangles))  # one matrix: corrcoef gives a scalar


def geometry(
    vectors: np.ndarray,
    emotions: Sequence[str],
    ratings: Mapping[str, tuple[float, float]],
    *,
    norms: Mapping[str, tuple[float, float]] | None = None,
    k: int = 10,
    seed: int = 0,
) -> Geometry:
    """Similarity (clustered order), PCA (sign-aligned to `ratings`), the PCs' correlations
    with `ratings` and with `norms` (other words' human ratings; the same orientation),
    and k-means clusters."""
    emotions = list(emotions)
    similarity = cosine_matrix(vectors)
    order = cluster_order(similarity)
    scores, explained = pca(vectors, k=min(3, len(emotions)))
    scores, flipped = align_signs(scores, emotions, ratings)
    return Geometry(
        n=len(emotions),
        variance_explained=[float(v) for v in explained[:10]],
        flipped=dict(zip(PCS, flipped, strict=False)),
        coordinates={e: [float(v) for v in scores[i]] for i, e in enumerate(emotions)},
        ratings=rating_correlations(scores, emotions, ratings),
        clusters=kmeans(vectors, emotions, k=k, seed=seed),
        order=[emotions[i] for i in order],
        similarity=[[round(float(v), 4) for v in row] for row in similarity],
        norms=rating_correlations(scores, emotions, norms) if norms is not None else None,
    )


def bank_geometry(
    stack: np.ndarray,
    words: np.ndarray,
    layers: Sequence[int],
    layer: int,
    emotions: Sequence[str],
    ratings: Mapping[str, tuple[float, float]],
    *,
    ratings_source: str,
    norms: Mapping[str, tuple[float, float]] | None = None,
    norms_source: str | None = None,
    k: int = 10,
    seed: int = 0,
) -> BankGeometry:
    """Geometry of the vectors `stack` [layers, emotions, width] at `layer` and of the word
    baseline `words` [emotions, width], the similarity structure across `layers` (RSA), and
    how much of it the words share."""
    index = list(layers).index(layer)
    similarity = [cosine_matrix(vectors) for vectors in stack]
    return BankGeometry(
        vectors=geometry(stack[index], emotions, ratings, norms=norms, k=k, seed=seed),
        baseline=geometry(words, emotions, ratings, norms=norms, k=k, seed=seed),
        rsa=LayerSimilarity(
            layers=[int(x) for x in layers],
            r=[[_rounded(v) for v in row] for row in rsa(similarity)],
        ),
        baseline_similarity_r=pearson(upper(similarity[index]), upper(cosine_matrix(words))),
        ratings_source=ratings_source,
        norms_source=norms_source,
        k=k,
        seed=seed,
    )


def _rounded(value: float) -> float | None:
    value = float(value)
    return round(value, 4) if math.isfinite(value) else None
