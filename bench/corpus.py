"""`emolens corpus check` on a large noisy corpus and on three smaller ones.

The large corpus is the shipped one repeated to --records lines, each copy with a few random
word edits (fixed seed) and shuffled: a corpus of near-duplicate groups. The others: the
shipped corpus itself, 2,000 identical lines, and the shipped corpus with one 40-word preamble
before every text (common 5-grams that make no text a near-duplicate). Every check runs as
`python -m emolens.cli corpus check` in a child process, timed, with its peak memory.

Last line: check_rate=R (records per second on the large corpus) peak_mb=M
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from emolens.concepts import DATA
from emolens.corpus import DEFAULT_FILES


def noisy_copies(rows: list[dict], count: int, seed: int = 0) -> list[dict]:
    """`count` rows: the given ones first, then copies with 1-3 word edits each, shuffled."""
    rng = random.Random(seed)
    out = list(rows)
    while len(out) < count:
        row = dict(rows[len(out) % len(rows)])
        tokens = row["text"].split(" ")
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(tokens))
            edit = rng.choice(("swap", "repeat", "drop"))
            if edit == "swap" and at + 1 < len(tokens):
                tokens[at], tokens[at + 1] = tokens[at + 1], tokens[at]
            elif edit == "repeat":
                tokens.insert(at, tokens[at])
            elif len(tokens) > 1:
                del tokens[at]
        row["text"] = " ".join(tokens)
        row["id"] = f"{row['id']}-copy{len(out)}"
        out.append(row)
    rng.shuffle(out)
    return out


def timed_check(path: Path, timeout: float) -> tuple[float | None, str]:
    """Seconds `emolens corpus check PATH` took (None past `timeout`), and its last line."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "emolens.cli", "corpus", "check", str(path)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None, f"(stopped after {timeout:.0f} s)"
    seconds = time.perf_counter() - start
    return seconds, (done.stdout.strip().splitlines() or [done.stderr.strip()])[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per check")
    args = parser.parse_args()
    shipped = [json.loads(line) for name in DEFAULT_FILES for line in open(DATA / name)]
    with tempfile.TemporaryDirectory() as folder:
        big, same = Path(folder) / "big.jsonl", Path(folder) / "same.jsonl"
        big.write_text("".join(json.dumps(r) + "\n" for r in noisy_copies(shipped, args.records)))
        same.write_text((json.dumps(shipped[0]) + "\n") * 2000)
        preamble = " ".join(shipped[-1]["text"].split()[:40])
        common = Path(folder) / "preamble.jsonl"
        common.write_text(
            "".join(json.dumps(r | {"text": f"{preamble} {r['text']}"}) + "\n" for r in shipped)
        )
        results = {}
        cases = [("shipped", "default"), ("identical_2000", same), ("preamble", common)]
        for name, path in [*cases, ("large", big)]:
            seconds, last = timed_check(path, args.timeout)
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            results[name] = seconds
            shown = "timeout" if seconds is None else f"{seconds:.1f} s"
            print(f"{name:<15} {shown:>9}   peak so far {peak:.0f} MB   {last}")
    rate = args.records / results["large"] if results["large"] else 0.0
    print(f"check_rate={rate:.0f} peak_mb={peak:.0f} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
