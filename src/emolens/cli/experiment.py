"""`emolens experiment NAME`: run a behavioural study with steering sweeps, or re-summarise it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from emolens.cli._common import (
    add_bank_option,
    add_model_option,
    add_ray_options,
    check_ray,
    load_bank_for,
    load_model_from,
    ray_workers_from,
)


def register(commands: argparse._SubParsersAction) -> None:
    from emolens.experiments import STUDIES, study

    parser = commands.add_parser(
        "experiment",
        help="run a behavioural experiment (preferences, ...) with steering sweeps",
        description="Run a study: every trial is one JSON line in OUT/results.jsonl (resumable: "
        "a re-run skips finished trials); the summary (summary.json, PNG figures, page.html) is "
        "rewritten at the end. --summary RESULTS re-summarises a results file without a model.",
    )
    studies = parser.add_subparsers(dest="study", required=True, metavar="NAME")
    for name in STUDIES:
        cls = study(name)
        sub = studies.add_parser(name, help=cls.description, description=cls.description)
        add_model_option(sub)
        add_bank_option(sub)
        sub.add_argument("--out", default=None, metavar="DIR",
                         help=f"results folder (default: emolens-experiments/{name})")  # fmt: skip
        sub.add_argument("--steer", action="append", default=[], metavar="EMOTION=S1,S2,...",
                         help="a sweep, e.g. desperate=-0.1,-0.05,0,0.05,0.1 (repeatable; "
                         "random:SEED=... for matched-norm random directions)")  # fmt: skip
        sub.add_argument("--sweep", default=None, metavar="FILE",
                         help="conditions from a TOML or JSON file")  # fmt: skip
        sub.add_argument("--layers", type=int, nargs="+", default=None, help="steered blocks")
        sub.add_argument("--positions", default=None, help="steered tokens (study default)")
        sub.add_argument("--samples", type=int, default=1, help="trials per item and condition")
        sub.add_argument("--batch-size", type=int, default=8, metavar="N")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--limit", type=int, default=None, metavar="N", help="first N items only")
        sub.add_argument("--allow-strong", action="store_true",
                         help="allow strengths beyond +-1")  # fmt: skip
        sub.add_argument("--summary", default=None, metavar="RESULTS",
                         help="only re-summarise this results.jsonl")  # fmt: skip
        add_ray_options(sub)
        cls.add_arguments(sub)
        sub.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from emolens.errors import EmolensError
    from emolens.experiments import study
    from emolens.experiments.runner import run_experiment, summarize_file

    for name in ("samples", "batch_size"):
        if getattr(args, name) < 1:
            raise EmolensError(f"--{name.replace('_', '-')} must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise EmolensError("--limit must be at least 1")
    cls = study(args.study)
    experiment = cls.from_args(args)
    if args.summary:
        summary = summarize_file(experiment, args.summary, args.out)
        print(experiment.headline(summary))
        return
    out = Path(args.out or Path("emolens-experiments") / args.study)
    check_ray(args)  # before the model loads
    lm = load_model_from(args)
    bank = load_bank_for(args, lm)
    conditions = experiment.conditions(args, bank, lm)
    with ray_workers_from(args, lm) as workers:
        summary = run_experiment(experiment, lm, bank, out, conditions, samples=args.samples,
                                 batch_size=args.batch_size, seed=args.seed,
                                 executor=workers.trials if workers else None)  # fmt: skip
    print(experiment.headline(summary))
    print(f"results: {out / 'results.jsonl'}\npage: {out / 'page.html'}", file=sys.stderr)
