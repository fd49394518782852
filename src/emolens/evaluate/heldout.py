"""Held-out accuracy (METHOD.md 4): classify held-out stories by their pooled activations.

A story's centred pooled activation is projected on every unit vector (`readout.score` with
`centre=True`); it is correct at top-k when its own emotion is among the k highest. The
showcase column classifies the showcase stories among the showcase emotions only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from emolens import concepts
from emolens.bank import EmotionBank
from emolens.readout import score


@dataclass(frozen=True)
class Accuracy:
    """Top-1 and top-5 among all the bank's emotions, and top-1 among the showcase ones
    (None when no showcase story is held out)."""

    top1: float
    top5: float
    showcase_top1: float | None


@dataclass(frozen=True)
class HeldoutTable:
    """Accuracy per layer and variant over `n` held-out stories (`n_showcase` of them for the
    `n_showcase_emotions` showcase emotions), classified among `n_emotions`."""

    n: int
    n_showcase: int
    n_emotions: int
    n_showcase_emotions: int
    layers: dict[int, dict[str, Accuracy]]

    @property
    def best_layer(self) -> int:
        """The layer with the best denoised top-1 (then top-5)."""
        return max(self.layers, key=lambda k: (self.layers[k]["denoised"].top1,
                                               self.layers[k]["denoised"].top5))  # fmt: skip

    def to_json(self) -> dict:
        return {
            "n": self.n,
            "n_showcase": self.n_showcase,
            "n_emotions": self.n_emotions,
            "n_showcase_emotions": self.n_showcase_emotions,
            "layers": {
                str(layer): {variant: vars(acc) for variant, acc in row.items()}
                for layer, row in self.layers.items()
            },
        }

    @classmethod
    def from_json(cls, data: dict) -> HeldoutTable:
        return cls(
            n=int(data["n"]),
            n_showcase=int(data["n_showcase"]),
            n_emotions=int(data.get("n_emotions", 171)),
            n_showcase_emotions=int(data.get("n_showcase_emotions", 12)),
            layers={
                int(layer): {variant: Accuracy(**acc) for variant, acc in row.items()}
                for layer, row in data["layers"].items()
            },
        )

    def text(self) -> str:
        """The table as text, one line per layer, one column pair per variant."""
        k, s = self.n_emotions, self.n_showcase_emotions
        variants = [
            v for v in ("raw", "denoised", "probe") if v in next(iter(self.layers.values()))
        ]
        heads = "".join(f"{v:>9}" for v in variants)
        lines = [
            f"held-out stories: {self.n} ({k}-way), {self.n_showcase} ({s}-way showcase)",
            f"layer {f'{k}-way top-1':^{9 * len(variants)}}  {f'{k}-way top-5':^{9 * len(variants)}}"
            f"  {f'{s}-way top-1':^{9 * len(variants)}}",
            f"      {heads}  {heads}  {heads}",
        ]
        for layer, row in self.layers.items():
            cells = [[f"{row[v].top1:9.1%}" for v in variants],
                     [f"{row[v].top5:9.1%}" for v in variants],
                     [_pct(row[v].showcase_top1) for v in variants]]  # fmt: skip
            lines.append(f"{layer:>5} " + "  ".join("".join(c) for c in cells))
        return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "      n/a" if value is None else f"{value:9.1%}"


def classify(bank: EmotionBank, pooled: torch.Tensor, layer: int, variant: str) -> torch.Tensor:
    """Scores [texts, emotions] of pooled activations [texts, bank layers, width]."""
    return score(pooled[:, bank.layer_index(layer)], bank, layer, variant, centre=True)


def accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Share of rows whose label is among the top-k scores."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return float((top == labels[:, None]).any(1).float().mean())


def heldout_accuracy(bank: EmotionBank, path: str | os.PathLike) -> HeldoutTable:
    """Accuracy of `bank` on the pooled held-out stories saved by the build at `path`."""
    data = load_file(str(path))
    pooled, labels = data["pooled"], data["labels"]
    shown = [bank.emotions.index(e) for e in concepts.showcase() if e in bank.emotions]
    keep = torch.isin(labels, torch.tensor(shown))
    relabel = {old: new for new, old in enumerate(shown)}
    showcase_labels = torch.tensor([relabel[int(x)] for x in labels[keep]], dtype=torch.long)
    layers = {}
    for layer in bank.layers:
        row = {}
        for variant in sorted(bank.vectors, key=("raw", "denoised", "probe").index):
            scores = classify(bank, pooled, layer, variant)
            row[variant] = Accuracy(
                top1=accuracy(scores, labels, 1),
                top5=accuracy(scores, labels, 5),
                showcase_top1=accuracy(scores[keep][:, shown], showcase_labels, 1)
                if bool(keep.any())
                else None,
            )
        layers[layer] = row
    return HeldoutTable(len(labels), int(keep.sum()), len(bank.emotions), len(shown), layers)
