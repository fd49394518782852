"""Ratings from pairwise choices: Elo and Bradley-Terry, on the Elo scale. Pure numpy.

A game is (a, b, score) with `score` the share of the point that `a` won (1 for a win, 0 for
a loss; fractions allowed). Elo runs the classic sequential update (K = 32) over the games in
many random orders at once (vectorised over orders) and averages them; its interval comes
from runs over games resampled with replacement. Bradley-Terry is the maximum-likelihood fit
of P(a beats b) = 1 / (1 + 10^((R_b - R_a) / 400)) by minorise-maximise iterations. Both are
centred on 1500.
"""

from __future__ import annotations

import numpy as np

BASE = 1500.0
SCALE = 400.0 / np.log(10.0)  # Elo points per unit of log-strength


def _sequential(
    order: np.ndarray, a: np.ndarray, b: np.ndarray, score: np.ndarray, players: int, k: float
) -> np.ndarray:
    """Elo ratings [runs, players] after playing, in run r, the games order[r] in sequence."""
    runs = np.arange(order.shape[0])
    ratings = np.full((order.shape[0], players), BASE)
    for step in range(order.shape[1]):
        game = order[:, step]
        x, y = a[game], b[game]
        expected = 1.0 / (1.0 + 10.0 ** ((ratings[runs, y] - ratings[runs, x]) / 400.0))
        delta = k * (score[game] - expected)
        ratings[runs, x] += delta
        ratings[runs, y] -= delta
    return ratings - ratings.mean(1, keepdims=True) + BASE


def _games(a: object, b: object, score: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    score = np.asarray(score, dtype=np.float64)
    if not len(a) == len(b) == len(score) or bool((a == b).any()):
        raise ValueError("games need matching a, b, score arrays and a != b")
    return a, b, score


def elo(
    a: object, b: object, score: object, players: int, *, k: float = 32.0, orders: int = 50,
    seed: int = 0,
) -> np.ndarray:  # fmt: skip
    """Sequential Elo ratings [players], averaged over `orders` random game orders."""
    a, b, score = _games(a, b, score)
    rng = np.random.default_rng(seed)
    order = np.stack([rng.permutation(len(a)) for _ in range(orders)])
    return _sequential(order, a, b, score, players, k).mean(0)


def elo_interval(
    a: object, b: object, score: object, players: int, *, k: float = 32.0,
    resamples: int = 200, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """2.5th and 97.5th percentile Elo ratings [players] over runs on games resampled with
    replacement (each in a random order)."""
    a, b, score = _games(a, b, score)
    rng = np.random.default_rng(seed)
    order = rng.integers(0, len(a), size=(resamples, len(a)))
    low, high = np.percentile(_sequential(order, a, b, score, players, k), [2.5, 97.5], axis=0)
    return low, high


def bradley_terry(
    a: object, b: object, score: object, players: int, *, iterations: int = 1000,
    prior: float = 0.5,
) -> np.ndarray:  # fmt: skip
    """Maximum-likelihood Bradley-Terry ratings [players] on the Elo scale. `prior` adds that
    many virtual wins in twice as many games against a player of average strength, so that a
    player who won (or lost) everything still gets a finite rating."""
    a, b, score = _games(a, b, score)
    wins = np.bincount(a, score, players) + np.bincount(b, 1 - score, players) + prior
    strength = np.ones(players)
    for _ in range(iterations):
        pair = 1.0 / (strength[a] + strength[b])
        denominator = np.bincount(a, pair, players) + np.bincount(b, pair, players)
        updated = wins / (denominator + 2 * prior / (strength + 1.0))
        updated /= np.exp(np.log(updated).mean())
        converged = np.allclose(updated, strength, rtol=1e-9, atol=0)
        strength = updated
        if converged:
            break
    ratings = SCALE * np.log(strength)
    return ratings - ratings.mean() + BASE
