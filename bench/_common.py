"""Shared bits of the benchmarks: texts of a given token length and a wall-clock timer."""

from __future__ import annotations

import time
from contextlib import contextmanager

from emolens.corpus import load


def texts_of_tokens(lm, count: int, tokens: int = 200) -> list[str]:
    """`count` texts of about `tokens` tokens, cut from the shipped stories."""
    stories = [r.text for r in load().stories()]
    texts = []
    for i in range(count):
        joined = " ".join(stories[(2 * i + k) % len(stories)] for k in range(3))
        ids = lm.tokenizer(joined)["input_ids"][:tokens]
        texts.append(lm.tokenizer.decode(ids))
    return texts


@contextmanager
def timer(results: dict, key: str):
    start = time.perf_counter()
    yield
    results[key] = time.perf_counter() - start
