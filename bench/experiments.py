"""Throughput of the preference study: choices scored by emolens against the same forward
passes without emolens around them.

emolens' side is `choice_logits` (length-bucketed batches, left padding, the prompts' shared
start computed once and its KV cache reused). The baseline is a bare forward of the full
prompts in batches of the same size, asking for the last position's logits only. Both score
the same ordered pairs of the shipped activities on the embedded model; each side's time is
the fastest of --rounds runs (machines here are noisy).

Last line: preferences_vs_forward=R (pairs per second through emolens / bare; goal R >= 0.8).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

from emolens.capture import pad, plan_batches
from emolens.experiments.preferences import choice_logits, choice_prompt, load_activities
from emolens.models import load_model

sys.path.insert(0, str(Path(__file__).parent))
from _common import fastest  # noqa: E402


@torch.inference_mode()
def bare(lm, prompts: list[list[int]], batch_size: int) -> None:
    for batch in plan_batches(prompts, batch_size):
        ids, mask = pad([prompts[i] for i in batch], lm.pad_id, "left")
        lm.model(input_ids=ids, attention_mask=mask, **lm.keep_logits(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    lm = load_model()
    activities = load_activities()
    pairs = list(itertools.permutations(activities, 2))[:: max(1, 4032 // args.pairs)][: args.pairs]
    prompts = [choice_prompt(lm, a["text"], b["text"])[0] for a, b in pairs]
    tokens = sum(map(len, prompts))
    choice_logits(lm, prompts[:32], batch_size=args.batch_size)  # warm-up
    ours = fastest(args.rounds, lambda: choice_logits(lm, prompts, batch_size=args.batch_size))
    theirs = fastest(args.rounds, lambda: bare(lm, prompts, args.batch_size))
    print(f"{lm.name}: {len(prompts)} choice prompts, {tokens / len(prompts):.0f} tokens each, "
          f"batch {args.batch_size}")  # fmt: skip
    print(f"emolens {len(prompts) / ours:.1f} pairs/s, bare forward {len(prompts) / theirs:.1f} pairs/s; "
          f"all 4,032 ordered pairs: {4032 / (len(prompts) / ours):.0f} s")  # fmt: skip
    print(f"preferences_vs_forward={theirs / ours:.3f}")


if __name__ == "__main__":
    main()
