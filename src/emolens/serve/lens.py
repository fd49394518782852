"""What the server reads from a reply: per-token scores of the requested emotions, per-reply
means, and the reply's place on the bank's PCA map. Plain maths on tensors; no I/O.

Scores are projections (`emolens.readout.score`) at the read layer; "scaled" values are the
same divided by the guard's reference scale (`emolens.guard`, clipped here to [-1, 1] for
display). The map puts every emotion at its first two principal components (sign-aligned with
valence and arousal); a reply sits at the mean of the points of its five strongest emotions
(by mean scaled reading), weighted by those readings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from emolens.bank import EmotionBank
from emolens.readout import score, top_emotions

MAP_TOP = 5
DIGITS = 5


@dataclass(frozen=True)
class Reading:
    """What a request reads: named emotions (by index) and, with `top` > 0, the top-K."""

    names: tuple[str, ...]
    indices: tuple[int, ...]
    top: int = 0


class Lens:
    """The bank at one layer and variant, with its reference scale and PCA map."""

    def __init__(self, bank: EmotionBank, layer: int, variant: str, scale: torch.Tensor) -> None:
        self.bank, self.layer, self.variant = bank, layer, variant
        self.emotions = list(bank.emotions)
        self.scale = scale.float().cpu()
        self.map = emotion_map(bank, layer, variant)

    def project(self, states: torch.Tensor) -> torch.Tensor:
        """Projections [rows, emotions] of residuals [rows, width] (on the CPU, float32)."""
        return score(states, self.bank, self.layer, self.variant).float().cpu()

    def token(self, projection: torch.Tensor, reading: Reading) -> dict:
        """One token's readout [emotions] as JSON-ready data for `reading`."""
        scaled = (projection / self.scale).clamp(-1, 1)
        out: dict = {}
        if reading.names:
            out["scores"] = _named(projection, reading)
            out["scaled"] = _named(scaled, reading)
        if reading.top:
            out["top"] = self._top(projection, scaled, reading.top)
        return out

    def summary(self, total: torch.Tensor, count: int, reading: Reading) -> dict:
        """Per-reply means from the sum [emotions] of `count` token projections."""
        mean = (total / max(count, 1)).float()
        scaled = (mean / self.scale).clamp(-1, 1)
        out: dict = {"layer": self.layer, "variant": self.variant, "count": count}
        if reading.names:
            out["means"] = _named(mean, reading)
            out["scaled_means"] = _named(scaled, reading)
        if reading.top:
            out["top"] = self._top(mean, scaled, reading.top)
        out["map"] = self.position(scaled) if count else None
        return out

    def position(self, scaled: torch.Tensor) -> list[float]:
        """The reply's point on the map: the reading-weighted mean of the points of its
        strongest (positive) emotions; the origin when none is positive."""
        values, index = scaled.topk(min(MAP_TOP, len(self.emotions)))
        weights = values.clamp(min=0).numpy().astype(np.float64)
        if weights.sum() <= 0:
            return [0.0, 0.0]
        points = np.array([self.map[self.emotions[i]] for i in index.tolist()])
        return [round(float(v), DIGITS) for v in weights @ points / weights.sum()]

    def _top(self, projection: torch.Tensor, scaled: torch.Tensor, k: int) -> list[list]:
        return [
            [name, round(value, DIGITS), round(float(scaled[self.emotions.index(name)]), DIGITS)]
            for name, value in top_emotions(projection, self.emotions, k)
        ]


def emotion_map(bank: EmotionBank, layer: int, variant: str) -> dict[str, list[float]]:
    """{emotion: [PC1, PC2]} of the bank's unit vectors at `layer`, PC1 oriented with
    valence and PC2 with arousal where ratings exist."""
    from emolens.concepts import ratings
    from emolens.evaluate.geometry import align_signs, pca

    vectors = bank.matrix(layer, variant).double().numpy()
    if len(bank.emotions) < 2:
        return {name: [0.0, 0.0] for name in bank.emotions}
    scores, _ = pca(vectors, k=2)
    scores, _ = align_signs(scores, bank.emotions, ratings())
    scores = np.pad(scores, ((0, 0), (0, 2 - scores.shape[1])))
    peak = max(float(np.abs(scores).max()), 1e-12)
    return {
        name: [round(float(x) / peak, DIGITS) for x in scores[i]]
        for i, name in enumerate(bank.emotions)
    }


def _named(values: torch.Tensor, reading: Reading) -> dict[str, float]:
    picked: Sequence[float] = values[list(reading.indices)].tolist()
    return {name: round(v, DIGITS) for name, v in zip(reading.names, picked, strict=True)}
