"""Word-embedding baseline (METHOD.md 4, the authors' caveat): vectors from the emotion words
alone, run through the same checks as the bank, to show what the residual vectors add.

Each emotion's vector is the mean of the model's input embeddings of the tokens of
" word", centred over all the bank's emotions. The baseline is an EmotionBank with that
vector at every layer and the real bank's centre and norms, so held-out accuracy,
scenarios and intensity score it exactly as they score the bank: only the directions differ.
"""

from __future__ import annotations

import torch

from emolens.bank import EmotionBank
from emolens.errors import EmolensError
from emolens.models import LoadedModel


@torch.inference_mode()
def word_vectors(lm: LoadedModel, emotions: list[str]) -> torch.Tensor:
    """Mean input embedding of the tokens of " word" per emotion, centred over the emotions,
    [emotions, width] in float32."""
    table = lm.model.get_input_embeddings()
    if table is None:
        raise EmolensError(f"{lm.name}: no input embeddings to build the word baseline from")
    rows = []
    for name in emotions:
        ids = lm.tokenizer(" " + name, add_special_tokens=False)["input_ids"]
        if not ids:
            raise EmolensError(f"{lm.name}: the tokenizer gives no tokens for '{name}'")
        rows.append(table(torch.tensor(ids, device=lm.device)).float().mean(0).cpu())
    vectors = torch.stack(rows)
    return vectors - vectors.mean(0)


def baseline_bank(lm: LoadedModel, bank: EmotionBank) -> EmotionBank:
    """The word baseline as a bank shaped like `bank` (same emotions, layers, centre, norms)."""
    if bank.width != lm.width:
        raise EmolensError(f"bank vectors have width {bank.width}; {lm.name} has {lm.width}")
    vectors = word_vectors(lm, bank.emotions)
    stacked = vectors[None].expand(len(bank.layers), -1, -1).contiguous()
    return EmotionBank(
        emotions=list(bank.emotions),
        layers=list(bank.layers),
        vectors={"raw": stacked, "denoised": stacked.clone()},
        mean_norm=bank.mean_norm.clone(),
        center=bank.center.clone(),
        model=dict(bank.model),
        meta={"default_layer": bank.default_layer, "kind": "word-embedding baseline"},
    )
