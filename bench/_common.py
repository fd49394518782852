"""Shared bits of the benchmarks: texts of a given token length and a wall-clock timer."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from emolens.capture import plan_batches, tokenize
from emolens.corpus import load


def texts_of_tokens(lm, count: int, tokens: int | tuple[int, int] = 200) -> list[str]:
    """`count` texts of about `tokens` tokens (or of lengths spread over a (low, high) range),
    cut from the shipped stories."""
    stories = [r.text for r in load().stories()]
    low, high = (tokens, tokens) if isinstance(tokens, int) else tokens
    texts = []
    for i in range(count):
        joined = " ".join(stories[(2 * i + k) % len(stories)] for k in range(3))
        ids = lm.tokenizer(joined)["input_ids"][: low + (i * 7919) % (high - low + 1)]
        texts.append(lm.tokenizer.decode(ids))
    return texts


@contextmanager
def timer(results: dict, key: str):
    start = time.perf_counter()
    yield
    results[key] = time.perf_counter() - start


@torch.inference_mode()
def run_truncated(lm, texts, layer, batch_size: int = 4):
    """A bare forward pass through blocks 0..layer only (the physical limit), same batches."""
    full = lm.layers
    parent = lm.model.get_submodule(lm.layers_path.rsplit(".", 1)[0])
    name = lm.layers_path.rsplit(".", 1)[1]
    ids = tokenize(lm, texts)
    setattr(parent, name, torch.nn.ModuleList(list(full)[: layer + 1]))
    try:
        for batch in plan_batches(ids, batch_size):
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            lm.model.model(input_ids=input_ids, attention_mask=mask, use_cache=False)
    finally:
        setattr(parent, name, full)


def fastest(rounds: int, run) -> float:
    """The fastest of `rounds` timed runs of `run()` (the least disturbed on a shared machine)."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)
