"""Cost of reading: batched `read_many` against a loop of `read` and a bare truncated forward,
and the live readout of `generate` against the same cached decoding without it.

Batched reading: 500 texts of 20-60 tokens cut from the shipped stories, mean-pooled scores
at the bank's layer. `read_many` runs them in length-bucketed padded batches; the loop calls
`read` once per text (timed on the first --loop texts, as texts per second); the truncated
forward runs blocks 0..layer only on the same batches, with nothing around it.

Live readout: both sides generate the same tokens greedily from the same prompt on the
embedded model. To be fair on a shared, noisy machine the two run in lockstep on two copies
of the model: one step of one, one step of the other, the order swapped at every step. Each
step's time is its minimum over the rounds (other processes only ever add time).

Last line: read_many_vs_loop=R1 read_many_vs_truncated_forward=R2 read_overhead=R3
(targets R1 >= 4, R2 >= 0.8, R3 <= 0.05).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from emolens.bank import EmotionBank, default_bank_path, random_bank
from emolens.chat import render
from emolens.generation import pick
from emolens.models import load_model, wrap_model
from emolens.readout import generate, read, read_many

sys.path.insert(0, str(Path(__file__).parent))
from _common import fastest, run_truncated, texts_of_tokens  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
EMOTIONS = Path(__file__).parents[1] / "src/emolens/data/emotions.txt"


@torch.inference_mode()
def plain_generate(lm, ids: list[int], max_new_tokens: int) -> Iterator[int]:
    """The decoding loop without the readout: same prefill, cache and stopping."""
    options, cache = lm.keep_logits(1), lm.cache_keyword
    out = lm.model(input_ids=torch.tensor([ids], device=lm.device), use_cache=True, **options)
    for step in range(max_new_tokens):
        token = pick(out.logits[0, -1], 0.0, 1.0, None)
        if token in lm.eos_ids:
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


def batched(lm, bank, args) -> tuple[float, float]:
    texts = texts_of_tokens(lm, args.texts, (20, 60))
    layer = bank.default_layer
    tokens = sum(len(lm.tokenizer(t)["input_ids"]) for t in texts)
    head = texts[: args.loop]
    looped = torch.stack([read(lm, bank, t).projection[1:].mean(0) for t in head])  # warm-up
    many = read_many(lm, bank, texts, batch_size=args.batch_size)
    error = float((many[: args.loop] - looped).abs().max())
    loop_s = fastest(args.rounds, lambda: [read(lm, bank, t) for t in head]) / len(head)
    many_s = fastest(args.rounds, lambda: read_many(lm, bank, texts, batch_size=args.batch_size))
    bare_s = fastest(args.rounds, lambda: run_truncated(lm, texts, layer, args.batch_size))
    print(
        f"{len(texts)} texts, {tokens} tokens, layer {layer}, batch {args.batch_size}: "
        f"read_many {len(texts) / many_s:.1f} texts/s ({tokens / many_s:.0f} tok/s), "
        f"read loop {1 / loop_s:.1f} texts/s, truncated forward {tokens / bare_s:.0f} tok/s; "
        f"max |read_many - read| {error:.2e}"
    )
    return loop_s * len(texts) / many_s, bare_s / many_s


def live(lm, bank, args) -> float:
    twin = wrap_model(copy.deepcopy(lm.model), lm.tokenizer, lm.name, lm.layers_path)
    messages = [{"role": "user", "content": PROMPT}]
    ids = render(lm, messages, add_generation_prompt=True).ids
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
    best = {name: sum(map(min, zip(*values, strict=True))) for name, values in rounds.items()}
    for name, seconds in best.items():
        totals = [sum(values) for values in rounds[name]]
        print(
            f"generate {name:>7} readout: sum of per-step minima {seconds:.3f}s "
            f"({len(produced['with']) / seconds:.1f} tokens/s), "
            f"median round {statistics.median(totals):.3f}s"
        )
    return best["with"] / best["without"] - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=500)
    parser.add_argument("--loop", type=int, default=100, help="texts timed through read()")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48, help="generated tokens")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    lm = load_model()
    path = default_bank_path(lm.fingerprint)
    if path.is_file():
        bank, kind = EmotionBank.load(path), f"bank {path}"
    else:
        bank = random_bank(EMOTIONS.read_text().splitlines(), list(range(lm.depth)), lm.width)
        bank.default_layer = lm.default_layer()
        kind = "random bank (no built bank found)"
    print(f"{lm.name}, {kind}, layer {bank.default_layer}")
    versus_loop, versus_forward = batched(lm, bank, args)
    overhead = live(lm, bank, args)
    print(
        f"read_many_vs_loop={versus_loop:.2f} read_many_vs_truncated_forward={versus_forward:.3f} "
        f"read_overhead={overhead:.4f}"
    )


if __name__ == "__main__":
    main()
