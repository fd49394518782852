"""Logit lens (METHOD.md 4): which tokens an emotion vector promotes and suppresses.

Each unit vector is rescaled to RMS 1, passed through the model's final norm (minus the
norm of zero, which removes a LayerNorm bias; for RMSNorm this is just its weight scaling)
and then through the unembedding matrix: one [emotions, width] x [width, vocab] matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from emolens.capture import special_ids
from emolens.models import LoadedModel

FINAL_NORMS = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f", "final_norm")


@dataclass(frozen=True)
class LensTokens:
    """The tokens a vector promotes (`top`, highest logit first) and suppresses (`bottom`,
    lowest first), each as (text, logit)."""

    top: list[tuple[str, float]]
    bottom: list[tuple[str, float]]


@dataclass(frozen=True)
class LogitLens:
    """The top and bottom `k` tokens of every emotion's vector; `norm` is the final norm
    applied first (None if the model has none) and `note` says how the logits were made."""

    norm: str | None
    note: str
    k: int
    emotions: dict[str, LensTokens]

    def to_json(self) -> dict:
        return {
            "norm": self.norm,
            "note": self.note,
            "k": self.k,
            "emotions": {
                name: {"top": [list(p) for p in t.top], "bottom": [list(p) for p in t.bottom]}
                for name, t in self.emotions.items()
            },
        }


def final_norm(lm: LoadedModel) -> tuple[str | None, nn.Module | None]:
    """The norm applied after the decoder blocks: a sibling of the block list named like
    FINAL_NORMS (e.g. model.norm, transformer.ln_f); (None, None) if there is none."""
    owner_path = lm.layers_path.rpartition(".")[0]
    owner = lm.model.get_submodule(owner_path) if owner_path else lm.model
    for name in FINAL_NORMS:
        module = getattr(owner, name, None)
        if isinstance(module, nn.Module):
            return (f"{owner_path}.{name}" if owner_path else name), module
    return None, None


@torch.inference_mode()
def logit_lens(lm: LoadedModel, units: torch.Tensor, emotions: list[str], k: int = 10) -> LogitLens:
    """Top and bottom `k` tokens (text, logit) of every vector in `units` [emotions, width];
    special tokens are left out."""
    head = lm.model.get_output_embeddings()
    weight = head.weight.float()
    device = weight.device
    name, norm = final_norm(lm)
    directions = units.float().to(device) * math.sqrt(units.shape[-1])
    if norm is not None:
        directions = (
            norm(directions.to(_dtype(norm))).float()
            - norm(torch.zeros_like(directions[:1]).to(_dtype(norm))).float()
        )
    logits = directions @ weight.T
    special = [int(i) for i in special_ids(lm.tokenizer) if i < logits.shape[1]]
    top_logits, bottom_logits = logits.clone(), logits.clone()
    top_logits[:, special], bottom_logits[:, special] = -math.inf, math.inf
    k = min(k, logits.shape[1] - len(special))
    top = top_logits.topk(k, dim=1)
    bottom = bottom_logits.topk(k, dim=1, largest=False)

    def pairs(values: torch.Tensor, ids: torch.Tensor) -> list[tuple[str, float]]:
        return [
            (lm.tokenizer.decode([int(i)]), round(float(v), 4))
            for v, i in zip(values, ids, strict=True)
        ]

    note = (
        f"unit vector at RMS 1 through {name} (minus {name} of zero), then the unembedding"
        if name
        else "no final norm found after the decoder blocks: unit vector straight into the "
        "unembedding"
    )
    return LogitLens(
        norm=name,
        note=note,
        k=k,
        emotions={
            emotion: LensTokens(
                top=pairs(top.values[e], top.indices[e]),
                bottom=pairs(bottom.values[e], bottom.indices[e]),
            )
            for e, emotion in enumerate(emotions)
        },
    )


def _dtype(module: nn.Module) -> torch.dtype:
    parameter = next(module.parameters(), None)
    return parameter.dtype if parameter is not None else torch.float32
