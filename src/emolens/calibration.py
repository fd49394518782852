"""Readings relative to a reference: what an emotion reads on text that carries none.

A projection on an emotion vector has an offset that depends on the emotion and on the kind
of position read, not on the text's emotion. `read`, `read_many` and `generate` subtract a
reference reading per emotion when given `baseline=`:
- "centre": the projection of the bank's centre (the mean training story), which is how
  held-out stories are classified. `emolens read` uses it by default: on the embedded
  model's cross-genre validation texts (half not used to choose) it lifted top-1 among 36
  emotions from 10.3% to 17.0% (chance 2.8%), more than any pooling or variant did;
- "neutral": each emotion's mean reading over the shipped neutral dialogues, read the same
  way (layer, variant, pooling): 14.3% there, and the best top-5 among 171 (16.4% against
  13.3%); computed once per (model, bank, layer, variant, pooling) and kept in the cache
  folder;
- a tensor: e.g. the mean reading of the user's own reference texts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch
from safetensors.torch import load_file, save_file

from emolens.atomic import atomic_path
from emolens.bank import EmotionBank
from emolens.corpus import dialogue_messages
from emolens.corpus import load as load_corpus
from emolens.errors import EmolensError
from emolens.models import LoadedModel, cache_dir

_CACHE: dict[tuple, torch.Tensor] = {}


def neutral_items(limit: int | None = None) -> list[list[dict]]:
    """The shipped neutral dialogues as conversations (the first `limit` of them)."""
    records = load_corpus().neutral()[:limit]
    return [dialogue_messages(r.text) for r in records]


def baseline(
    lm: LoadedModel,
    bank: EmotionBank,
    items: Sequence[str | Sequence[dict]],
    *,
    layer: int | None = None,
    variant: str = "denoised",
    pool: str = "mean",
    batch_size: int = 8,
) -> torch.Tensor:
    """Each emotion's mean reading [emotions] over reference `items` (texts or
    conversations), pooled with `pool` as `read_many` pools."""
    from emolens.readout import read_many

    if not items:
        raise EmolensError("a baseline needs at least one reference text")
    scores = read_many(lm, bank, items, layer=layer, variant=variant, pool=pool,
                       batch_size=batch_size)  # fmt: skip
    assert isinstance(scores, torch.Tensor)  # pooled readings
    return scores.mean(0)


def neutral_baseline(
    lm: LoadedModel,
    bank: EmotionBank,
    *,
    layer: int | None = None,
    variant: str = "denoised",
    pool: str = "mean",
    limit: int | None = 100,
) -> torch.Tensor:
    """The baseline over the shipped neutral dialogues (the first `limit`), computed once per
    model, bank, layer, variant and pooling, and kept in memory and in the cache folder."""
    from emolens.readout import resolve_layer

    layer = resolve_layer(lm, bank, layer)
    key = (lm.fingerprint.get("weights"), bank.digest(), layer, variant, pool, limit)
    if key not in _CACHE:
        name = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]
        path = cache_dir() / "baselines" / f"{name}.safetensors"
        stored = load_file(str(path)).get("baseline") if path.is_file() else None
        if stored is None or tuple(stored.shape) != (len(bank.emotions),):
            stored = baseline(lm, bank, neutral_items(limit), layer=layer, variant=variant,
                              pool=pool)  # fmt: skip
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as staging:
                save_file({"baseline": stored.float().contiguous()}, str(staging),
                          metadata={"key": json.dumps(key)})  # fmt: skip
        _CACHE[key] = stored
    return _CACHE[key]


def resolve_baseline(
    lm: LoadedModel, bank: EmotionBank, baseline: str | torch.Tensor | None, layer: int,
    variant: str, pool: str = "mean",
) -> torch.Tensor | None:  # fmt: skip
    """The offset [emotions] to subtract: None, "neutral" (the shipped neutral dialogues,
    read with the same pooling), "centre" (the bank's centre, the mean training story, as
    the held-out classification uses it) or a given tensor."""
    if baseline is None:
        return None
    if isinstance(baseline, str):
        if baseline == "centre":
            from emolens.readout import score

            return score(bank.center[bank.layer_index(layer)], bank, layer, variant).cpu()
        if baseline != "neutral":
            raise EmolensError(
                f"unknown baseline {baseline!r}: give 'neutral', 'centre' or a tensor"
            )
        return neutral_baseline(lm, bank, layer=layer, variant=variant, pool=pool)
    offset = torch.as_tensor(baseline, dtype=torch.float32).cpu()
    if tuple(offset.shape) != (len(bank.emotions),) or not bool(torch.isfinite(offset).all()):
        raise EmolensError(
            f"a baseline must be {len(bank.emotions)} finite numbers, one per emotion"
        )
    return offset
