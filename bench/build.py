"""Build throughput against a bare forward pass truncated at the deepest layer, same tokens.

Last line: build_vs_forward=R rss_mb=M
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import run_truncated  # noqa: E402

from emolens.build import build, default_layers  # noqa: E402
from emolens.capture import tokenize  # noqa: E402
from emolens.concepts import emotions  # noqa: E402
from emolens.corpus import Corpus, dialogue_messages, load  # noqa: E402
from emolens.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--emotions", type=int, default=40, help="how many of the 171 to build")
    args = parser.parse_args()
    lm = load_model()
    chosen = set(emotions()[: args.emotions])
    records = load().records
    corpus = Corpus([r for r in records if r.kind == "neutral" or r.emotion in chosen])
    texts = [r.text for r in corpus.stories("train")] + [r.text for r in corpus.stories("heldout")]
    texts += [
        lm.format_chat(dialogue_messages(r.text), add_generation_prompt=False)
        for r in corpus.neutral()
    ]
    layers = default_layers(lm.depth)
    n_tokens = sum(len(ids) for ids in tokenize(lm, texts))
    print(f"{len(texts)} texts, {n_tokens} tokens, layers {layers}")
    run_truncated(lm, texts[:8], max(layers))  # warm-up
    start = time.perf_counter()
    run_truncated(lm, texts, max(layers))
    forward = n_tokens / (time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        build(lm, corpus, out=out, force=True, progress=False)
        built = n_tokens / (time.perf_counter() - start)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"tokens/s: build {built:.0f} (capture, pooling, covariance, held-out check, saving), "
          f"truncated forward {forward:.0f}")  # fmt: skip
    print(f"build_vs_forward={built / forward:.3f} rss_mb={rss:.0f}")


if __name__ == "__main__":
    main()
