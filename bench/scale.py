"""A Ray build against a single-process build with the same total threads, same corpus slice.

The embedded model builds the default recipe on the shipped stories of --emotions emotions
and --neutral neutral dialogues: in this process with --workers torch threads ("single"), and
on a local Ray cluster of --workers CPU workers with one thread each ("ray"; started and
loaded before any clock starts, as the single process's model is). Both checkpoint every
--shard batches (the Ray build's shard size). Throughput is every token read over the wall
time of the whole build (capture, merging, checkpoints, held-out check, saving). The builds
run in A-B-B-A order, --rounds times; the fastest of each kind counts (the least disturbed on
a shared machine). A last single-process build at one thread is printed for reference
(torch's threads can lose much more than a core's share when other jobs crowd the cores).

Last line: ray_vs_single=R ray_bank_max_diff=D, with R the Ray / single tokens per second
(goal >= 0.85) and D the largest difference between the two banks' vectors and norms (goal
<= 1e-6).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray
import torch

from emolens.build import build
from emolens.concepts import emotions
from emolens.corpus import Corpus, load
from emolens.distributed import RayWorkers
from emolens.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--emotions", type=int, default=6, help="how many of the 171 to build")
    parser.add_argument("--neutral", type=int, default=30, help="neutral dialogues")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (= single threads)")
    parser.add_argument("--shard", type=int, default=8, help="batches per shard and checkpoint")
    parser.add_argument("--rounds", type=int, default=1, help="A-B-B-A rounds")
    args = parser.parse_args()
    lm = load_model()
    chosen = set(emotions()[: args.emotions])
    records = load().records
    stories = [r for r in records if r.kind == "story" and r.emotion in chosen]
    corpus = Corpus(stories + [r for r in records if r.kind == "neutral"][: args.neutral])
    print(f"{len(stories)} stories of {args.emotions} emotions, {args.neutral} neutral dialogues")
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    workers = RayWorkers(workers=args.workers, threads=1, dtype="float32", progress=False)
    workers.start()
    print(f"{args.workers} Ray workers started and loaded in {time.perf_counter() - started:.1f} s")
    banks, rates = {}, {"single": 0.0, "ray": 0.0}
    with tempfile.TemporaryDirectory() as scratch, workers:
        for round_ in range(args.rounds):
            for name in ("single", "ray", "ray", "single"):
                torch.set_num_threads(args.workers if name == "single" else 1)  # ray: driver
                bank = build(lm, corpus, out=Path(scratch) / f"{name}-{round_}", progress=False,
                             checkpoint_every=args.shard, force=True,
                             executor=workers.build if name == "ray" else None)  # fmt: skip
                rate = bank.meta["build"]["tokens_per_second"]
                print(f"{name}: {bank.meta['build']['tokens']} tokens in "
                      f"{bank.meta['build']['seconds']} s, {rate:.0f} tokens/s")  # fmt: skip
                banks[name], rates[name] = bank, max(rates[name], rate)
        torch.set_num_threads(1)  # a reference: one process with one worker's threads
        alone = build(lm, corpus, out=Path(scratch) / "one-thread", progress=False,
                      checkpoint_every=args.shard)  # fmt: skip
        print(f"single at 1 thread (reference): {alone.meta['build']['tokens_per_second']:.0f} "
              "tokens/s")  # fmt: skip
    single, spread = banks["single"], banks["ray"]
    diff = max(float((spread.vectors[k] - single.vectors[k]).abs().max()) for k in single.vectors)
    diff = max(diff, float((spread.mean_norm - single.mean_norm).abs().max()))
    ray.shutdown()
    print(f"ray_vs_single={rates['ray'] / rates['single']:.3f} ray_bank_max_diff={diff:.2e}")


if __name__ == "__main__":
    main()
