"""Cost of steering: greedy `model.generate` throughput with a steering context vs without.

Same prompt (through the chat template), greedy, the same number of new tokens on both sides
(end-of-sequence is suppressed so a steered reply cannot stop early). Runs alternate; the
fastest run of each side is compared (the least disturbed by other processes on a shared
machine). Uses the model's built bank, or a random bank of the same shape if there is none.
Last line: steer_overhead=R with R = throughput_with / throughput_without (target >= 0.97).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from emolens.bank import EmotionBank, default_bank_path, random_bank
from emolens.concepts import emotions
from emolens.models import load_model
from emolens.steer import steer

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--emotion", default="calm")
    parser.add_argument("--strength", type=float, default=0.05)
    parser.add_argument("--positions", default="all", choices=("all", "prompt", "response"))
    args = parser.parse_args()
    torch.manual_seed(0)
    lm = load_model()
    path = default_bank_path(lm.fingerprint)
    if path.is_file():
        bank, kind = EmotionBank.load(path), f"bank {path}"
    else:
        bank = random_bank(emotions(), list(range(lm.depth)), lm.width, norm=170.0)
        bank.default_layer = lm.default_layer()
        kind = "random bank (no built bank found)"
    text = lm.format_chat([{"role": "user", "content": PROMPT}])
    inputs = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(lm.device)
    options = dict(
        max_new_tokens=args.tokens,
        min_new_tokens=args.tokens,
        do_sample=False,
        pad_token_id=lm.tokenizer.pad_token_id or lm.tokenizer.eos_token_id,
    )
    steering = {args.emotion: args.strength}
    print(
        f"{lm.name}, {kind}, layer {bank.default_layer}, {steering}, positions {args.positions}, "
        f"prompt {inputs['input_ids'].shape[1]} tokens, {args.tokens} new tokens"
    )

    @torch.inference_mode()
    def without() -> torch.Tensor:
        return lm.model.generate(**inputs, **options)

    @torch.inference_mode()
    def with_steering() -> torch.Tensor:
        with steer(lm, bank, steering, positions=args.positions):
            return lm.model.generate(**inputs, **options)

    plain, steered = without(), with_steering()  # warm-up
    if torch.equal(plain, steered):
        print("note: steering did not change the greedy reply at this strength")
    times: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(args.rounds):
        for name, run in (("without", without), ("with", with_steering)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(
            f"{name:>7} steering: min {min(values):.3f}s  median {statistics.median(values):.3f}s"
            f"  ({args.tokens / min(values):.1f} tokens/s)"
        )
    median = statistics.median(times["without"]) / statistics.median(times["with"])
    print(f"median-based ratio {median:.4f}")
    print(f"steer_overhead={min(times['without']) / min(times['with']):.4f}")


if __name__ == "__main__":
    main()
