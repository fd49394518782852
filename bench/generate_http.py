"""Corpus generation over HTTP: `emolens corpus generate --backend openai` against `emolens
serve`, at concurrency 1 and --concurrency.

A server subprocess (the embedded model, --threads torch threads) is started on a free
localhost port; the same --pairs emotion x topic prompts (one story each, --tokens new tokens
at most, the same seeds) are then sent through `OpenAIBackend` one at a time and
--concurrency at a time, each into a fresh output file. Stories per second counts every story
asked for (a reply cut off by the token limit is one story, screened out afterwards).

Last line: stories_per_s_c1=S1 stories_per_s_cK=SK concurrency_gain=SK/S1
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve import _bank, _wait  # noqa: E402

from emolens.backends import OpenAIBackend  # noqa: E402
from emolens.concepts import emotions  # noqa: E402
from emolens.corpus_generation import generate  # noqa: E402
from emolens.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="emotion x topic prompts")
    parser.add_argument("--tokens", type=int, default=48, help="most new tokens per reply")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    args = parser.parse_args()
    lm = load_model()
    scratch = Path(tempfile.mkdtemp(prefix="emolens-bench-generate-"))
    bank_path, kind = _bank(lm, None, scratch)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, "-m", "emolens.cli", "serve", "--bank", str(bank_path),
               "--port", str(port)]  # fmt: skip
    log = open(scratch / "server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    try:
        url = _wait(server, port, scratch / "server.log") + "/v1"
        print(f"{lm.name} served with {args.threads} thread(s), {kind}; {args.pairs} prompts "
              f"of one story, at most {args.tokens} new tokens each")  # fmt: skip
        rates = {}
        for concurrency in (1, args.concurrency):
            backend = OpenAIBackend(lm.name, base_url=url, concurrency=concurrency)
            start = time.perf_counter()
            tally = generate(backend, scratch / f"c{concurrency}.jsonl", topics="0",
                             emotions=emotions()[: args.pairs], per_topic=1,
                             max_new_tokens=args.tokens, batch_size=args.pairs,
                             progress=False)  # fmt: skip
            rates[concurrency] = tally.pairs / (time.perf_counter() - start)
            print(f"concurrency {concurrency}: {rates[concurrency]:.3f} stories/s "
                  f"({tally.parsed} parsed, {tally.kept} kept)")  # fmt: skip
        high = args.concurrency
        print(f"stories_per_s_c1={rates[1]:.3f} stories_per_s_c{high}={rates[high]:.3f} "
              f"concurrency_gain={rates[high] / rates[1]:.2f}")  # fmt: skip
    finally:
        server.terminate()
        server.wait(30)
        log.close()


if __name__ == "__main__":
    main()
