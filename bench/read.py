"""Cost of the live readout: emolens.read.generate vs the same KV-cache loop without it.

Both generate the same tokens greedily from the same prompt on the embedded model
(prefill once, then one token per step with the cache). To be fair on a shared, noisy
machine the two run in lockstep on two copies of the model: one step of one, one step of
the other, the order swapped at every step, so that both see the same disturbances. Each
step's time is its minimum over the rounds (other processes only ever add time), and the
sums of those minima are compared.
Last line: read_overhead=R with R = time_with_readout / time_without - 1 (target <= 0.05).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from emolens.read import cache_keyword, eos_ids, generate, logits_options, pick, render

from emolens.bank import EmotionBank, default_bank_path, random_bank
from emolens.models import wrap_model

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
EMOTIONS = Path(__file__).parents[1] / "src/emolens/data/emotions.txt"


@torch.inference_mode()
def plain_generate(lm, ids: list[int], max_new_tokens: int) -> Iterator[int]:
    """emolens.read.generate's loop without the readout: same prefill, cache and stopping."""
    options, cache, eos = logits_options(lm), cache_keyword(lm), eos_ids(lm)
    out = lm.model(input_ids=torch.tensor([ids], device=lm.device), use_cache=True, **options)
    for step in range(max_new_tokens):
        token = pick(out.logits[0, -1], 0.0, 1.0, None)
        if token in eos:
            return
        if step + 1 < max_new_tokens:
            out = lm.model(
                input_ids=torch.tensor([[token]], device=lm.device),
                use_cache=True,
                **options,
                **{cache: getattr(out, cache)},
            )
        yield token


def lockstep(runs: dict[str, Iterator]) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Advance the iterators one item each in turn (order swapped every step) until all end;
    return the seconds each step took and what each produced."""
    steps: dict[str, list[float]] = {name: [] for name in runs}
    produced: dict[str, list[int]] = {name: [] for name in runs}
    live, step = list(runs), 0
    while live:
        for name in live if step % 2 == 0 else live[::-1]:
            start = time.perf_counter()
            item = next(runs[name], None)
            steps[name].append(time.perf_counter() - start)
            if item is None:
                live.remove(name)
            else:
                produced[name].append(item if isinstance(item, int) else item.id)
        step += 1
    return steps, produced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from emolens.models import load_model

    lm = load_model()
    twin = wrap_model(copy.deepcopy(lm.model), lm.tokenizer, lm.name, lm.layers_path)
    path = default_bank_path(lm.fingerprint)
    if path.is_file():
        bank, kind = EmotionBank.load(path), f"bank {path}"
    else:
        bank = random_bank(EMOTIONS.read_text().splitlines(), list(range(lm.depth)), lm.width)
        bank.default_layer = lm.default_layer()
        kind = "random bank (no built bank found)"
    messages = [{"role": "user", "content": PROMPT}]
    ids = render(lm, messages, add_generation_prompt=True).ids
    print(f"{lm.name}, {kind}, layer {bank.default_layer}, prompt {len(ids)} tokens")
    rounds: dict[str, list[list[float]]] = {"without": [], "with": []}
    for round_ in range(args.rounds + 1):
        steps, produced = lockstep(
            {
                "without": plain_generate(twin, ids, args.tokens),
                "with": generate(lm, bank, messages, max_new_tokens=args.tokens),
            }
        )
        if produced["with"] != produced["without"]:
            raise SystemExit("the readout changed the generated tokens")
        if round_ == 0:
            continue  # warm-up
        for name, seconds in steps.items():
            rounds[name].append(seconds)
        print(
            f"round {round_}: without {sum(steps['without']):.3f}s  "
            f"with {sum(steps['with']):.3f}s  ({len(produced['with'])} tokens)"
        )
    best = {name: sum(map(min, zip(*values, strict=True))) for name, values in rounds.items()}
    for name, seconds in best.items():
        totals = [sum(values) for values in rounds[name]]
        print(
            f"{name:>7} readout: sum of per-step minima {seconds:.3f}s "
            f"({len(produced['with']) / seconds:.1f} tokens/s), "
            f"median round {statistics.median(totals):.3f}s"
        )
    print(f"read_overhead={best['with'] / best['without'] - 1:.4f}")


if __name__ == "__main__":
    main()
