"""One forward pass that captures chosen decoder-block outputs and stops after the deepest."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from emolens.errors import EmolensError
from emolens.models import LoadedModel


class _StopForward(Exception):
    """Raised by the hook on the deepest captured block: nothing past it runs."""


def block_output(output: torch.Tensor | tuple) -> torch.Tensor:
    """The residual stream from a decoder block's output (a tensor, or a tuple in older models)."""
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def hooked(lm: LoadedModel, layers: Sequence[int], stop: bool = True) -> Iterator[dict]:
    """Collect the output of each block in `layers` into the yielded dict while active.

    With `stop`, the deepest block raises `_StopForward` so the rest of the model never runs.
    """
    store: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def make_hook(index: int):  # noqa: ANN202
        def hook(module, args, output):  # noqa: ANN001, ANN202
            store[index] = block_output(output)
            if stop and index == deepest:
                raise _StopForward

        return hook

    handles = [lm.layers[i].register_forward_hook(make_hook(i)) for i in sorted(set(layers))]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def check_layers(lm: LoadedModel, layers: Sequence[int]) -> list[int]:
    """Sorted unique layer indices, each a valid block index of `lm`."""
    if not layers:
        raise EmolensError("no layers requested")
    bad = [layer for layer in layers if not 0 <= layer < lm.depth]
    if bad:
        raise EmolensError(f"layers {bad} out of range: {lm.name} has blocks 0-{lm.depth - 1}")
    return sorted(set(int(layer) for layer in layers))


@torch.inference_mode()
def residuals(
    lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """Block outputs [batch, tokens, width] at `layers`; no block past the deepest runs.

    Position ids follow the attention mask, so left- and right-padded rows match unpadded ones.
    """
    device = lm.device
    attention_mask = attention_mask.to(device)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with hooked(lm, layers) as store:
        try:
            lm.model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            )
        except _StopForward:
            pass
    return {layer: store[layer] for layer in layers}


def special_ids(tokenizer) -> torch.Tensor:  # noqa: ANN001
    """Ids of every special token (added with special=True, or named special)."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return torch.tensor(sorted(ids), dtype=torch.long)


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
        """Masked mean over pooled tokens, [batch, layers, width] in float32 (0 where empty)."""
        mask = self.pool_mask.to(next(iter(self.residuals.values())).device, torch.float32)
        sums = torch.stack([mask[:, None, :] @ r.float() for r in self.residuals.values()], 1)
        return (sums[:, :, 0] / mask.sum(1).clamp(min=1)[:, None, None]).cpu()

    def tokens(self, layer: int) -> torch.Tensor:
        """The pooled tokens' residuals at `layer`, [n, width]."""
        return self.residuals[layer][self.pool_mask.to(self.residuals[layer].device)]


def tokenize(lm: LoadedModel, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of every text, refusing empty input and texts beyond the context."""
    if len(texts) == 0:
        raise EmolensError("no texts to capture")
    ids = lm.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    limit = lm.context_limit
    for i, row in enumerate(ids):
        if not row:
            raise EmolensError(f"text {i} is empty")
        if limit and len(row) > limit:
            raise EmolensError(f"text {i} has {len(row)} tokens; {lm.name} reads at most {limit}")
    return ids


def plan_batches(ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Text indices grouped into batches of similar length, longest first (deterministic)."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def capture(
    lm: LoadedModel,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    offset: int = 50,
    batch_size: int = 4,
    padding_side: str = "right",
    done: Sequence[int] = (),
    progress: bool | str = False,
) -> Iterator[Captured]:
    """Capture `layers` for `texts` in length-bucketed batches, longest first.

    `done` lists batch numbers (of `plan_batches`) to skip, so a resumed run repeats the
    uninterrupted run's batches exactly. `progress` shows a token bar (a string names it).
    """
    layers = check_layers(lm, layers)
    ids = tokenize(lm, texts)
    specials = special_ids(lm.tokenizer)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
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
            input_ids, attention_mask = _pad([ids[i] for i in batch], pad, padding_side)
            position = attention_mask.cumsum(-1) - 1
            pool_mask = (
                attention_mask.bool() & (position >= offset) & ~torch.isin(input_ids, specials)
            )
            captured = residuals(lm, input_ids, attention_mask, layers)
            yield Captured(number, batch, input_ids, attention_mask, pool_mask, captured)
            bar.update(int(attention_mask.sum()))


def _pad(rows: list[list[int]], pad: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row)
        attention_mask[i, span] = 1
    return input_ids, attention_mask
