"""Capture throughput against a truncated forward pass and the common naive approach.

Last line: capture_vs_truncated_forward=R1 capture_vs_naive=R2 rss_growth_10x=R3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from emolens.capture import capture, tokenize
from emolens.models import load_model

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from _common import run_truncated, texts_of_tokens, timer  # noqa: E402


def run_capture(lm, texts, layer):
    for batch in capture(lm, texts, [layer], batch_size=4):
        batch.pooled()


@torch.inference_mode()
def run_naive(lm, texts, layer):
    """The common peer approach: one text at a time, all hidden states and logits, copied out."""
    for text in texts:
        ids = lm.tokenizer(text, return_tensors="pt")
        out = lm.model(**ids, output_hidden_states=True)
        copied = [h[0].clone().numpy() for h in out.hidden_states]
        copied[layer + 1][50:].mean(0)


def rss_child(n_texts: int, layer: int) -> None:
    lm = load_model()
    run_capture(lm, texts_of_tokens(lm, n_texts), layer)
    print(json.dumps({"rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def peak_rss(n_texts: int, layer: int) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(n_texts), "--layer", str(layer)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_kb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", type=int, default=200)
    parser.add_argument("--naive-texts", type=int, default=40)
    parser.add_argument("--rss-texts", type=int, default=20)
    parser.add_argument("--layer", type=int, default=20)
    parser.add_argument("--rss-child", type=int, default=None)
    args = parser.parse_args()
    if args.rss_child is not None:
        return rss_child(args.rss_child, args.layer)
    lm = load_model()
    texts = texts_of_tokens(lm, args.texts)
    n_tokens = sum(len(t) for t in tokenize(lm, texts))
    naive_tokens = sum(len(t) for t in tokenize(lm, texts[: args.naive_texts]))
    print(f"{len(texts)} texts, {n_tokens} tokens; naive baseline on {args.naive_texts} texts")
    ratios = {}
    for layer in (lm.depth // 3, args.layer):
        t = {}
        run_capture(lm, texts[:8], layer)  # warm-up
        with timer(t, "truncated"):
            run_truncated(lm, texts, layer)
        with timer(t, "capture"):
            run_capture(lm, texts, layer)
        with timer(t, "naive"):
            run_naive(lm, texts[: args.naive_texts], layer)
        speed = {k: (naive_tokens if k == "naive" else n_tokens) / v for k, v in t.items()}
        ratios[layer] = (speed["capture"] / speed["truncated"], speed["capture"] / speed["naive"])
        print(
            f"layer {layer}: tokens/s capture {speed['capture']:.0f}, truncated forward "
            f"{speed['truncated']:.0f}, naive {speed['naive']:.0f}; "
            f"capture_vs_truncated_forward={ratios[layer][0]:.3f} capture_vs_naive={ratios[layer][1]:.2f}"
        )
    small, large = peak_rss(args.rss_texts, args.layer), peak_rss(10 * args.rss_texts, args.layer)
    print(
        f"peak RSS: {small / 1024:.0f} MB with {args.rss_texts} texts, {large / 1024:.0f} MB with 10x"
    )
    r1, r2 = ratios[args.layer]
    print(
        f"capture_vs_truncated_forward={r1:.3f} capture_vs_naive={r2:.2f} rss_growth_10x={large / small:.3f}"
    )


if __name__ == "__main__":
    main()
