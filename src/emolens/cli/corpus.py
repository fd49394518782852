"""`emolens corpus check|generate`: validate a corpus, or have a model write one."""

from __future__ import annotations

import argparse

from emolens.cli._common import add_model_option, load_model_from


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("corpus", help="validate or generate an emotion corpus")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser("check", help="validate a corpus and print a summary")
    check.add_argument("path", nargs="?", default=None, help="file or directory (default: shipped)")
    check.add_argument(
        "--max-problems",
        type=int,
        default=50,
        metavar="N",
        help="print at most N problems, then their count (0: all; default 50)",
    )
    check.set_defaults(run=run_check)

    generate = actions.add_parser(
        "generate",
        help="have a model write emotion stories (append-only, resumable)",
        description="Write stories per emotion x topic with the study's recipe, drop leaks, "
        "bad lengths and near-duplicates, and append the rest to --out. Finished pairs are "
        "listed in OUT.done; a re-run skips them.",
    )
    add_model_option(generate)
    generate.add_argument("--out", required=True, metavar="PATH", help="output JSONL (appended)")
    generate.add_argument(
        "--emotions", default=None, metavar="LIST", help="comma list (default: all 171)"
    )
    generate.add_argument(
        "--topics",
        default=None,
        metavar="LIST",
        help="comma list of topic indices or names (default: all)",
    )
    generate.add_argument(
        "--heldout-topics",
        default=None,
        metavar="LIST",
        help="topics whose stories go to the heldout split",
    )
    generate.add_argument(
        "--per-topic", type=int, default=4, metavar="N", help="stories per prompt"
    )
    generate.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        metavar="N",
        help="per reply (default: 200 per story)",
    )
    generate.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="N",
        help="prompts per batch (default: 4 locally, 4 x --concurrency over HTTP)",
    )
    remote = generate.add_argument_group(
        "OpenAI-compatible backend (vLLM, llama.cpp, emolens serve, a hosted API)"
    )
    remote.add_argument(
        "--backend",
        choices=("local", "openai"),
        default="local",
        help="local: --model runs here (default); openai: --model names the model served at "
        "--base-url",
    )
    remote.add_argument("--base-url", default=None, metavar="URL", help="e.g. http://host:8000/v1")
    remote.add_argument(
        "--api-key", default=None, help="API key (default: $OPENAI_API_KEY, else none)"
    )
    remote.add_argument(
        "--concurrency", type=int, default=8, metavar="K", help="requests in flight (8)"
    )
    remote.add_argument(
        "--timeout", type=float, default=120.0, metavar="S", help="seconds per request (120)"
    )
    remote.add_argument(
        "--retries",
        type=int,
        default=5,
        metavar="N",
        help="retries of a failed request, with exponential backoff (5)",
    )
    generate.set_defaults(run=run_generate)


def run_check(args: argparse.Namespace) -> int:
    from emolens.corpus import build_warnings, check, summary

    records, problems = check(args.path)
    print(summary(records))
    shown = problems[: args.max_problems] if args.max_problems > 0 else problems
    for problem in shown:
        print(problem)
    if len(shown) < len(problems):
        print(f"... and {len(problems) - len(shown)} more problem(s) (--max-problems 0 lists all)")
    for warning in build_warnings(records):
        print(f"warning: {warning}")
    print(f"{len(records)} records, {len(problems)} problem(s)")
    return 1 if problems else 0


def run_generate(args: argparse.Namespace) -> int:
    from emolens.backends import Backend, LocalBackend, OpenAIBackend
    from emolens.corpus_generation import generate, pick_emotions, pick_topics
    from emolens.errors import EmolensError

    # parsed before the model loads, so a typo fails at once
    emotions, topics = pick_emotions(args.emotions), pick_topics(args.topics)
    heldout = pick_topics(args.heldout_topics) if args.heldout_topics else []
    backend: Backend
    if args.backend == "openai":
        if not args.base_url or not args.model:
            raise EmolensError("--backend openai needs --base-url URL and --model NAME")
        backend = OpenAIBackend(args.model, base_url=args.base_url, api_key=args.api_key,
                                concurrency=args.concurrency, timeout=args.timeout,
                                retries=args.retries)  # fmt: skip
        batch_size = 4 * args.concurrency if args.batch_size is None else args.batch_size
    else:
        if args.base_url:
            raise EmolensError("--base-url needs --backend openai")
        batch_size = 4 if args.batch_size is None else args.batch_size
        backend = LocalBackend(load_model_from(args))
    tally = generate(
        backend,
        args.out,
        emotions=emotions,
        topics=topics,
        heldout_topics=heldout,
        per_topic=args.per_topic,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        batch_size=batch_size,
    )
    print(f"model: {backend.name}, output: {args.out}")
    print(tally.summary())
    return 0
