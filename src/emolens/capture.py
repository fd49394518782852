"""The one hook primitive, and the forward pass that captures block outputs and stops early.

Everything that touches the residual stream goes through `add_hooks` (or its context-manager
form `hooks`): residual capture and the batched corpus pass here, the streaming readout of the
decoding loop, and steering. A hook function receives the output of a decoder block (the
residual stream, [batch, tokens, width]) and may return a tensor that replaces it. With
`stop_after`, the forward pass ends after that block: `run` catches the stop, so no block past
it (and no language-model head) runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from emolens.errors import EmolensError
from emolens.models import LoadedModel

LayerFn = Callable[[torch.Tensor], "torch.Tensor | None"]


class StopForward(Exception):
    """Raised after the block named by `stop_after`: nothing past it runs (caught by `run`)."""


def block_output(output: torch.Tensor | tuple) -> torch.Tensor:
    """The residual stream from a decoder block's output (a tensor, or a tuple in older models)."""
    return output[0] if isinstance(output, tuple) else output


def blocks_owner(lm: LoadedModel) -> nn.Module:
    """The module whose forward runs the decoder blocks (it receives the 2D attention mask)."""
    parent, _, _ = lm.layers_path.rpartition(".")
    return lm.model.get_submodule(parent) if parent else lm.model


class HookHandle:
    """Hooks registered by `add_hooks`; `stop_after` may change between forward passes."""

    def __init__(self, stop_after: int | None) -> None:
        self.stop_after = stop_after
        self._handles: list[Any] = []

    def remove(self) -> None:
        """Unregister every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def add_hooks(
    lm: LoadedModel,
    fns: Mapping[int, LayerFn],
    *,
    stop_after: int | None = None,
    before: Callable[[dict[str, Any]], None] | None = None,
    first: bool = False,
) -> HookHandle:
    """Register `fns[layer](residual)` on the output of each block; a returned tensor replaces
    the residual. `stop_after` ends the forward pass after that block; the handle's attribute
    may later be set to None or to another layer of `fns`. `before(arguments)` sees the named arguments of each forward of the
    blocks' owner (input ids, attention mask, cache) before any block runs. `first` puts the
    hooks ahead of those already registered (steering adds before anything reads)."""
    layers = set(fns) | ({stop_after} if stop_after is not None else set())
    check_layers(lm, list(layers) or [0])
    handle = HookHandle(stop_after)

    def make(layer: int):  # noqa: ANN202
        fn = fns.get(layer)

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            result = None
            if fn is not None:
                hidden = fn(block_output(output))
                if hidden is not None:
                    result = (hidden, *output[1:]) if isinstance(output, tuple) else hidden
            if handle.stop_after == layer:
                raise StopForward
            return result

        return hook

    if before is not None:
        owner = blocks_owner(lm)
        names = list(inspect.signature(owner.forward).parameters)

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            bound = dict(zip(names, args, strict=False))
            bound.update(kwargs)
            before(bound)

        handle._handles.append(
            owner.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=first)
        )
    for layer in sorted(layers):
        handle._handles.append(lm.layers[layer].register_forward_hook(make(layer), prepend=first))
    return handle


@contextmanager
def hooks(lm: LoadedModel, fns: Mapping[int, LayerFn], **options: Any) -> Iterator[HookHandle]:
    """`add_hooks` as a context manager: the hooks are removed on exit, also after an error."""
    handle = add_hooks(lm, fns, **options)
    try:
        yield handle
    finally:
        handle.remove()


def run(lm: LoadedModel, **inputs: Any) -> Any:
    """`lm.model(**inputs)`, or None when a hook stopped the pass early."""
    try:
        return lm.model(**inputs)
    except StopForward:
        return None


def check_layers(lm: LoadedModel, layers: Sequence[int]) -> list[int]:
    """Sorted unique layer indices, each a valid block index of `lm`."""
    if not layers:
        raise EmolensError("no layers requested")
    bad = [layer for layer in layers if not 0 <= layer < lm.depth]
    if bad:
        raise EmolensError(f"layers {bad} out of range: {lm.name} has blocks 0-{lm.depth - 1}")
    return sorted(set(int(layer) for layer in layers))


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, so left padding shifts nothing."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def residuals(
    lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """Block outputs [batch, tokens, width] at `layers`; no block past the deepest runs.

    Position ids follow the attention mask, so left- and right-padded rows match unpadded ones.
    """
    layers = check_layers(lm, layers)
    store: dict[int, torch.Tensor] = {}
    fns = {
        layer: (lambda hidden, layer=layer: store.__setitem__(layer, hidden)) for layer in layers
    }
    mask = attention_mask.to(lm.device)
    with hooks(lm, fns, stop_after=max(layers)):
        run(lm, input_ids=input_ids.to(lm.device), attention_mask=mask,
            position_ids=positions_from_mask(mask), use_cache=False)  # fmt: skip
    return {layer: store[layer] for layer in layers}


def special_ids(tokenizer: Any) -> torch.Tensor:
    """Ids of every special token (added with special=True, or named special)."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return torch.tensor(sorted(ids), dtype=torch.long)


def pad(
    rows: Sequence[Sequence[int]], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids as one [batch, longest] tensor and its attention mask."""
    if side not in ("left", "right"):
        raise EmolensError(f"padding side must be 'left' or 'right', not {side!r}")
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[i, span] = torch.tensor(list(row), dtype=torch.long)
        attention_mask[i, span] = 1
    return input_ids, attention_mask


@dataclass
class Captured:
    """One batch: its number, which texts, their tokens, the pooling mask and the residuals."""

    number: int
    indices: list[int]
    input_ids: torch.Tensor  # [batch, tokens]
    attention_mask: torch.Tensor  # [batch, tokens]
    pool_mask: torch.Tensor  # [batch, tokens]: real, non-special tokens at or after the offset
    residuals: dict[int, torch.Tensor]  # layer -> [batch, tokens, width]

    @property
    def counts(self) -> torch.Tensor:
        """Pooled tokens per text."""
        return self.pool_mask.sum(1)

    def pooled(self) -> torch.Tensor:
        """Masked mean over pooled tokens, [batch, layers, width] in float32 (0 where empty);
        each layer is pooled on its block's device, the result gathered on the CPU."""
        mask = self.pool_mask.float()
        sums = torch.stack([(mask.to(r.device)[:, None, :] @ r.float())[:, 0].cpu()
                            for r in self.residuals.values()], 1)  # fmt: skip
        return sums / mask.sum(1).clamp(min=1)[:, None, None]

    def tokens(self, layer: int) -> torch.Tensor:
        """The pooled tokens' residuals at `layer`, [n, width]."""
        return self.residuals[layer][self.pool_mask.to(self.residuals[layer].device)]


def tokenize(lm: LoadedModel, texts: Sequence[str | Sequence[int]]) -> list[list[int]]:
    """Token ids of every text (token-id lists pass through), refusing empty input and texts
    beyond the context."""
    if len(texts) == 0:
        raise EmolensError("no texts to capture")
    strings = [i for i, text in enumerate(texts) if isinstance(text, str)]
    ids = [list(text) if not isinstance(text, str) else [] for text in texts]
    if strings:
        encoded = lm.tokenizer([texts[i] for i in strings], add_special_tokens=True)["input_ids"]
        for i, row in zip(strings, encoded, strict=True):
            ids[i] = list(row)
    limit = lm.context_limit
    for i, row in enumerate(ids):
        if not row:
            raise EmolensError(f"text {i} is empty")
        if limit and len(row) > limit:
            raise EmolensError(f"text {i} has {len(row)} tokens; {lm.name} reads at most {limit}")
    return ids


def plan_batches(ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Text indices grouped into batches of similar length, longest first (deterministic)."""
    if batch_size < 1:
        raise EmolensError(f"batch size must be at least 1, not {batch_size}")
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def capture(
    lm: LoadedModel,
    texts: Sequence[str | Sequence[int]],
    layers: Sequence[int],
    *,
    offset: int = 50,
    batch_size: int = 4,
    padding_side: str = "right",
    done: Sequence[int] = (),
    progress: bool | str = False,
) -> Iterator[Captured]:
    """Capture `layers` for `texts` (strings, or token-id lists) in length-bucketed batches,
    longest first.

    `done` lists batch numbers (of `plan_batches`) to skip, so a resumed run repeats the
    uninterrupted run's batches exactly. `progress` shows a token bar (a string names it).
    """
    layers = check_layers(lm, layers)
    ids = tokenize(lm, texts)
    specials = special_ids(lm.tokenizer)
    skipped = set(done)
    plan = [(n, batch) for n, batch in enumerate(plan_batches(ids, batch_size)) if n not in skipped]
    bar = tqdm(
        total=sum(len(ids[i]) for _, batch in plan for i in batch),
        unit="tok",
        unit_scale=True,
        desc=progress if isinstance(progress, str) else "capture",
        disable=not progress,
        dynamic_ncols=True,
    )
    with bar:
        for number, batch in plan:
            input_ids, attention_mask = pad([ids[i] for i in batch], lm.pad_id, padding_side)
            position = attention_mask.cumsum(-1) - 1
            pool_mask = (
                attention_mask.bool() & (position >= offset) & ~torch.isin(input_ids, specials)
            )
            captured = residuals(lm, input_ids, attention_mask, layers)
            yield Captured(number, batch, input_ids, attention_mask, pool_mask, captured)
            bar.update(int(attention_mask.sum()))
