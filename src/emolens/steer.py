"""Steering: add vectors to the residual stream through removable forward hooks (METHOD.md 5).

`steer(lm, bank, {"calm": 0.05})` adds `strength * bank.norm_at(layer) * unit_vector` to the
output of decoder block `layer` while the context is active; `steer_vectors` adds arbitrary
vectors. Neither replaces a module: a forward pre-hook on the module that runs the decoder
blocks works out which positions of the current forward pass are steered, and a forward hook
on each steered block adds the vector there.

Positions are counted per row over real tokens: position 0 is the row's first non-padding
token (so left padding shifts nothing), padding is never steered, and in cached decoding the
new token's position is the cache length plus its index. "prompt" means the tokens of the
first forward pass of a sequence (the prefill), "response" every token fed after it (the
decoding steps); a forward without a KV cache is all prompt.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from emolens.bank import EmotionBank
from emolens.capture import block_output, check_layers
from emolens.errors import EmolensError
from emolens.models import LoadedModel

MODES = ("all", "prompt", "response")
RANDOM_PREFIX = "random:"

Span = tuple[int, int]
Positions = str | Sequence[Span] | Sequence[Sequence[Span]]


def random_direction(width: int, seed: int) -> torch.Tensor:
    """A seeded random unit vector of `width` (the matched-norm control direction)."""
    generator = torch.Generator().manual_seed(int(seed))
    vector = torch.randn(width, generator=generator, dtype=torch.float64)
    return (vector / vector.norm()).float()


def direction(
    bank: EmotionBank, name: str, layer: int | None = None, variant: str = "denoised"
) -> torch.Tensor:
    """The unit vector steered for `name` at `layer`: the bank's emotion vector, or for
    "random:SEED" a seeded random direction of the bank's width (the same at every layer)."""
    if name.startswith(RANDOM_PREFIX):
        seed = name[len(RANDOM_PREFIX) :]
        if not seed.lstrip("-").isdigit():
            raise EmolensError(f"'{name}': a random direction is named random:SEED (an integer)")
        return random_direction(bank.width, int(seed))
    return bank.vector(name, layer, variant)


def emotion_vectors(
    lm: LoadedModel,
    bank: EmotionBank,
    emotions: Mapping[str, float],
    layers: int | Sequence[int] | None = None,
    variant: str = "denoised",
) -> dict[int, torch.Tensor]:
    """The vector added at each layer: sum of `strength * bank.norm_at(layer) * unit_vector`.

    `layers` is None (the bank's default layer), one block index or several.
    """
    if bank.width != lm.width:
        raise EmolensError(f"bank vectors have width {bank.width}; {lm.name} has {lm.width}")
    if bank.model:
        bank.check_against(lm)
    if layers is None:
        layers = [bank.default_layer]
    elif isinstance(layers, int):
        layers = [layers]
    layers = check_layers(lm, list(layers))
    for name, strength in emotions.items():
        if not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise EmolensError(f"steering strength of '{name}' must be a finite number")
    vectors = {}
    for layer in layers:
        norm = bank.norm_at(layer)
        total = torch.zeros(bank.width)
        for name, strength in emotions.items():
            total += float(strength) * norm * direction(bank, name, layer, variant).float()
        vectors[layer] = total
    return vectors


def parse_strengths(specs: Sequence[str], default: float | None = None) -> dict[str, float]:
    """Parse "calm=0.05"-style items into {emotion: strength}; a bare name gets `default`
    (an error when `default` is None). A name given twice adds up."""
    strengths: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        name = name.strip()
        if not name:
            raise EmolensError(f"'{spec}': expected EMOTION=STRENGTH, e.g. calm=0.05")
        if not sep:
            if default is None:
                raise EmolensError(f"'{spec}': give a strength, e.g. {name}=0.05")
            strength = default
        else:
            try:
                strength = float(value)
            except ValueError:
                raise EmolensError(f"'{spec}': strength '{value}' is not a number") from None
        if not math.isfinite(strength):
            raise EmolensError(f"'{spec}': strength must be finite")
        strengths[name] = strengths.get(name, 0.0) + strength
    return strengths


class _Plan:
    """Which positions a steering context touches, validated once."""

    def __init__(self, positions: Positions) -> None:
        self.mode, self.starts, self.ends, self.per_row = "spans", None, None, False
        if isinstance(positions, str):
            if positions not in MODES:
                raise EmolensError(
                    f"positions '{positions}' must be one of {', '.join(MODES)} or token spans"
                )
            self.mode = positions
            return
        rows = list(positions)
        self.per_row = bool(rows) and not _is_span(rows[0])
        table = [list(row) for row in rows] if self.per_row else [rows]
        for r, row in enumerate(table):
            for span in row:
                if not _is_span(span) or span[0] < 0 or span[1] < span[0]:
                    where = f"row {r}: " if self.per_row else ""
                    raise EmolensError(
                        f"{where}bad span {span!r}: spans are (start, end) pairs with "
                        "0 <= start <= end (end exclusive)"
                    )
        width = max([len(row) for row in table] + [1])
        starts = torch.zeros(len(table), width, dtype=torch.long)
        ends = torch.zeros(len(table), width, dtype=torch.long)
        for r, row in enumerate(table):
            for s, (start, end) in enumerate(row):
                starts[r, s], ends[r, s] = start, end
        self.starts, self.ends = starts, ends


def _is_span(item: Any) -> bool:
    return (
        isinstance(item, (tuple, list))
        and len(item) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in item)
    )


class _Tracker:
    """A forward pre-hook on the module running the decoder blocks: for each forward pass it
    records which of the new positions are steered (`mask` [batch, new, 1], None for all)."""

    def __init__(self, plan: _Plan, owner: nn.Module) -> None:
        self.plan = plan
        self.names = list(inspect.signature(owner.forward).parameters)
        self.active = True
        self.mask: torch.Tensor | None = None
        self.prompt: torch.Tensor | None = None  # real prompt tokens per row

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = dict(zip(self.names, args, strict=False))
        bound.update(kwargs)
        tokens = bound.get("input_ids")
        if tokens is None:
            tokens = bound.get("inputs_embeds")
        if tokens is None:
            return
        batch, new = int(tokens.shape[0]), int(tokens.shape[1])
        past = _cache_length(bound.get("cache", bound.get("past_key_values")))
        attention = bound.get("attention_mask")
        if self.plan.mode == "all":
            known = _is_2d(attention) and attention.shape[-1] == past + new
            steered = attention[:, past:].bool() if known else None
            self.active = steered is None or bool(steered.any())
            self.mask = None if steered is None or bool(steered.all()) else steered[..., None]
            return
        index, valid = _positions(attention, batch, new, past, tokens.device)
        if self.plan.mode in ("prompt", "response"):
            if past == 0:
                self.prompt = valid.sum(1)
            elif self.prompt is None or self.prompt.shape[0] != batch:
                self.prompt = index[:, 0].clone()  # prefill unseen: everything from here on
            before = index < self.prompt.to(index.device)[:, None]
            steered = valid & (before if self.plan.mode == "prompt" else ~before)
        else:
            steered = valid & self._in_spans(index, batch)
        self.active = bool(steered.any())
        self.mask = None if bool(steered.all()) else steered[..., None]

    def _in_spans(self, index: torch.Tensor, batch: int) -> torch.Tensor:
        starts, ends = self.plan.starts.to(index.device), self.plan.ends.to(index.device)
        if self.plan.per_row and starts.shape[0] != batch:
            raise EmolensError(
                f"steering spans are given for {starts.shape[0]} rows, the batch has {batch}"
            )
        position = index[:, :, None]
        return ((position >= starts[:, None, :]) & (position < ends[:, None, :])).any(-1)


def _is_2d(attention: Any) -> bool:
    return isinstance(attention, torch.Tensor) and attention.dim() == 2


def _cache_length(cache: Any) -> int:
    """Positions already in a KV cache (0 without one)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])  # legacy tuple cache
    return 0


def _positions(
    attention: Any, batch: int, new: int, past: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real-token index [batch, new] of each new position, and whether it is a real token."""
    if _is_2d(attention) and attention.shape[-1] == past + new:
        real = attention.to(device).bool()
        index = real.long().cumsum(-1)[:, past:] - 1
        return index, real[:, past:]
    index = torch.arange(past, past + new, device=device).expand(batch, new)
    return index, torch.ones(batch, new, dtype=torch.bool, device=device)


def _adder(vector: torch.Tensor, tracker: _Tracker, layer: int):  # noqa: ANN202
    cached = {"vector": vector}

    def hook(module, args, output):  # noqa: ANN001, ANN202
        if not tracker.active:
            return None
        hidden = block_output(output)
        delta = cached["vector"]
        if delta.device != hidden.device or delta.dtype != hidden.dtype:
            delta = cached["vector"] = delta.to(hidden.device, hidden.dtype)
        if delta.dim() == 2:
            if delta.shape[0] != hidden.shape[0]:
                raise EmolensError(
                    f"layer {layer}: steering has one vector per row for {delta.shape[0]} rows, "
                    f"the batch has {hidden.shape[0]}"
                )
            delta = delta[:, None, :]
        if tracker.mask is not None:
            delta = delta * tracker.mask.to(hidden.device, hidden.dtype)
        steered = hidden + delta
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    return hook


def blocks_owner(lm: LoadedModel) -> nn.Module:
    """The module whose forward runs the decoder blocks (it receives the 2D attention mask)."""
    parent, _, _ = lm.layers_path.rpartition(".")
    return lm.model.get_submodule(parent) if parent else lm.model


@contextmanager
def steer_vectors(
    lm: LoadedModel,
    vectors: Mapping[int, torch.Tensor],
    positions: Positions = "all",
) -> Iterator[dict[int, torch.Tensor]]:
    """Add `vectors[layer]` to the output of decoder block `layer` while active.

    A vector is [width] (every row) or [batch, width] (one per row). `positions` is "all",
    "prompt", "response", a list of (start, end) spans over real-token positions, or one
    such list per batch row. Hooks are removed on exit, also after an exception. Yields
    the vectors as used.
    """
    layers = check_layers(lm, list(vectors)) if vectors else []
    prepared = {}
    for layer in layers:
        vector = torch.as_tensor(vectors[layer])
        if vector.dim() not in (1, 2) or vector.shape[-1] != lm.width:
            raise EmolensError(
                f"layer {layer}: a steering vector must be [{lm.width}] or [batch, {lm.width}], "
                f"not {list(vector.shape)}"
            )
        if not bool(torch.isfinite(vector).all()):
            raise EmolensError(f"layer {layer}: the steering vector has non-finite values")
        prepared[layer] = vector.detach()
    plan = _Plan(positions)
    owner = blocks_owner(lm)
    tracker = _Tracker(plan, owner)
    handles = [owner.register_forward_pre_hook(tracker, with_kwargs=True)]
    try:
        for layer in layers:
            hook = _adder(prepared[layer], tracker, layer)
            handles.append(lm.layers[layer].register_forward_hook(hook, prepend=True))
        yield prepared
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def steer(
    lm: LoadedModel,
    bank: EmotionBank,
    emotions: Mapping[str, float],
    layers: int | Sequence[int] | None = None,
    positions: Positions = "all",
    variant: str = "denoised",
) -> Iterator[dict[int, torch.Tensor]]:
    """Steer toward emotions: `{"calm": 0.05, "desperate": -0.05}` adds, at each layer,
    `strength * bank.norm_at(layer) * unit_vector` summed over emotions.

    `layers`: None (the bank's default layer), one index or several, each with its own norm.
    A name "random:SEED" is a seeded random unit direction of matched norm (a control).
    Nested contexts add up. Yields the vector added per layer.
    """
    vectors = emotion_vectors(lm, bank, emotions, layers, variant)
    with steer_vectors(lm, vectors, positions) as used:
        yield used
