"""`emolens serve` throughput against in-process generation, measured in one run.

A server subprocess (the embedded model unless --model) is started on a free localhost port;
the same greedy generations are then timed, in alternating rounds:
  direct   the generation in this process (one `Decoder` row, no readout), in the main thread
           and in a worker thread like the server's decoding thread; the faster of the two
           counts (on a crowded machine torch's threads behave very differently in each)
  serve    one streamed request through the server (the official `openai` client)
  read     the same request reading ["calm", "desperate", "top:5"] with a guard that never fires
           (serve and read run twice per round, in A-B-B-A order)
  clients  --clients concurrent streamed requests (different prompts), total tokens/s
The fastest round of each is kept (the least disturbed on a shared machine). Last line:
serve_vs_direct=R1 concurrent_gain=R2 readout_overhead=R3 with R1 = serve / direct tokens/s
(goal >= 0.85), R2 = clients / serve total tokens/s (goal >= 3 with 8 clients on 2 cores) and
R3 = 1 - read / serve tokens/s (goal <= 0.05).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import openai
import torch

from emolens.bank import default_bank_path, random_bank
from emolens.chat import render
from emolens.concepts import emotions
from emolens.generation import Sampling, decode
from emolens.models import load_model

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Write a long story about a girl who trains a dragon in the mountains.",
    "Describe, in detail, a day in the life of a baker in a small village.",
    "Write a long letter from a sailor to his family about his voyage.",
    "Tell a long story about two friends who get lost in a forest at night.",
    "Write a detailed travel diary of a trip across a desert.",
    "Write a long fairy tale about a fox and a crow.",
    "Describe a busy train station in winter, with many small stories.",
]
EXTENSION = {"read": ["calm", "desperate", "top:5"],
             "guard": {"when": "desperate", "above": 1000, "window": 8}}  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--bank", default=None, help="bank file (default: the model's build, "
                        "else a random bank of the same shape)")  # fmt: skip
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads here and in the server (default: torch's choice)")  # fmt: skip
    args = parser.parse_args()
    environment = dict(os.environ)
    if args.threads:
        torch.set_num_threads(args.threads)
        environment["OMP_NUM_THREADS"] = str(args.threads)
    torch.manual_seed(0)
    lm = load_model(args.model)
    scratch = Path(tempfile.mkdtemp(prefix="emolens-bench-serve-"))
    bank_path, kind = _bank(lm, args.bank, scratch)
    port = free_port()
    command = [sys.executable, "-m", "emolens.cli", "serve", "--bank", str(bank_path),
               "--port", str(port), "--max-concurrent", str(max(32, args.clients))]  # fmt: skip
    if args.model:
        command += ["--model", args.model]
    log = open(scratch / "server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    try:
        url = _wait(server, port, scratch / "server.log")
        print(f"{lm.name}, {kind}, {args.tokens} new tokens, {args.clients} clients, "
              f"{torch.get_num_threads()} torch threads, {args.rounds} rounds")  # fmt: skip
        best: dict[str, float] = {}
        for round_ in range(args.rounds):
            one = [PROMPTS[0]]
            many = [PROMPTS[i % len(PROMPTS)] for i in range(args.clients)]
            measured = {
                "direct": _direct(lm, PROMPTS[0], args.tokens),
                "direct_thread": _in_thread(_direct, lm, PROMPTS[0], args.tokens),
                # serve and read in A-B-B-A order, so that a drift in load hits both alike
                "serve": _served(url, lm.name, one, args.tokens, None),
                "read": _served(url, lm.name, one, args.tokens, EXTENSION),
            }
            measured["read"] = max(measured["read"], _served(url, lm.name, one, args.tokens,
                                                             EXTENSION))  # fmt: skip
            measured["serve"] = max(
                measured["serve"], _served(url, lm.name, one, args.tokens, None)
            )
            measured["clients"] = _served(url, lm.name, many, args.tokens, None)
            print(
                f"round {round_ + 1}: "
                + "  ".join(f"{k} {v:.1f} tok/s" for k, v in measured.items())
            )
            for key, value in measured.items():
                best[key] = max(best.get(key, 0.0), value)
        print("best:     " + "  ".join(f"{k} {v:.1f} tok/s" for k, v in best.items()))
        direct = max(best["direct"], best["direct_thread"])
        print(f"serve_vs_direct={best['serve'] / direct:.3f} "
              f"concurrent_gain={best['clients'] / best['serve']:.3f} "
              f"readout_overhead={1 - best['read'] / best['serve']:.3f}")  # fmt: skip
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def _bank(lm, path: str | None, scratch: Path) -> tuple[Path, str]:
    if path:
        return Path(path), f"bank {path}"
    built = default_bank_path(lm.fingerprint)
    if built.is_file():
        return built, f"bank {built}"
    bank = random_bank(emotions(), list(range(lm.depth)), lm.width, norm=170.0)
    bank.default_layer = lm.default_layer()
    bank.model = dict(lm.fingerprint)
    return bank.save(scratch / "random-bank.safetensors"), "random bank (no built bank found)"


def _wait(server: subprocess.Popen, port: int, log: Path) -> str:
    url = f"http://127.0.0.1:{port}"
    while True:
        if server.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return url
        except OSError:
            time.sleep(0.5)


def _direct(lm, prompt: str, tokens: int) -> float:
    ids = render(lm, [{"role": "user", "content": prompt}], add_generation_prompt=True).ids
    start = time.perf_counter()
    generation = decode(lm, [ids], Sampling(tokens))[0]
    return len(generation.tokens) / (time.perf_counter() - start)


def _in_thread(function, *args) -> float:
    result: list[float] = []
    worker = threading.Thread(target=lambda: result.append(function(*args)))
    worker.start()
    worker.join()
    return result[0]


def _served(url: str, model: str, prompts: list[str], tokens: int, extension: dict | None) -> float:
    counts = [0] * len(prompts)
    ready = threading.Barrier(len(prompts) + 1)

    def one(i: int) -> None:
        api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        extra = {"extra_body": {"emolens": extension}} if extension else {}
        ready.wait()
        stream = api.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompts[i]}], max_tokens=tokens,
            temperature=0, stream=True, stream_options={"include_usage": True}, **extra,
        )  # fmt: skip
        for chunk in stream:
            if chunk.usage is not None:
                counts[i] = chunk.usage.completion_tokens

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    ready.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
