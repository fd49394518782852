"""`emolens build`: corpus -> emotion bank, with progress, checkpoints and resume."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from emolens.cli._common import (
    add_model_option,
    add_ray_options,
    check_ray,
    finite,
    load_model_from,
    ray_workers_from,
)

if TYPE_CHECKING:
    from emolens.bank import EmotionBank


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "build",
        help="build the emotion vectors of a model",
        description="Build a bank from a corpus. Without --out, the default build (shipped "
        "corpus, default recipe) goes to the model's cache folder, and any other build to a "
        "folder of its own (printed at the end), so no build replaces another.",
    )
    add_model_option(parser)
    parser.add_argument("--corpus", default="default", help="corpus file or directory")
    parser.add_argument("--out", default=None, help="output directory (default: the cache)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="block indices")
    parser.add_argument("--offset", type=int, default=50, help="first story token averaged")
    parser.add_argument("--variance", type=finite, default=0.5, help="neutral variance removed")
    parser.add_argument("--genres", action="store_true",
                        help="also pool the train split of the other genres (messages, comments, "
                        "dialogue lines, diaries) into the emotion means")  # fmt: skip
    parser.add_argument("--probes", action="store_true",
                        help="also fit logistic-regression probes (variant 'probe')")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--checkpoint-every", type=int, default=25,
                        help="batches between saves (with --ray: per shard)")  # fmt: skip
    parser.add_argument(
        "--force", action="store_true", help="rebuild, replacing the bank in --out (if any)"
    )
    add_ray_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from emolens.build import Recipe, build
    from emolens.corpus import load
    from emolens.errors import EmolensError

    recipe = Recipe(layers=tuple(args.layers) if args.layers else None, offset=args.offset,
                    variance=args.variance, batch_size=args.batch_size, genres=args.genres,
                    probes=args.probes)  # fmt: skip
    if args.checkpoint_every < 1:
        raise EmolensError(f"--checkpoint-every must be at least 1, not {args.checkpoint_every}")
    corpus = args.corpus if args.corpus == "default" else load(args.corpus)
    check_ray(args)  # before the model loads
    lm = load_model_from(args)
    with ray_workers_from(args, lm) as workers:
        bank = build(lm, corpus, recipe, out=args.out, checkpoint_every=args.checkpoint_every,
                     force=args.force, executor=workers.build if workers else None)  # fmt: skip
    print(describe(bank))
    if corpus != "default" or args.out is not None:
        print(f"read or report it with --bank {bank.meta['build']['path']}")


def describe(bank: EmotionBank) -> str:
    """What a build produced: where, how fast, and the held-out table."""
    from emolens.evaluate.heldout import HeldoutTable

    meta = bank.meta
    lines = [
        f"bank: {len(bank.emotions)} emotions x {len(bank.layers)} layers {bank.layers}, "
        f"width {bank.width}; default layer {bank.default_layer}, best {meta.get('best_layer')}",
        f"built in {meta['build']['seconds']} s ({meta['build']['tokens_per_second']} tokens/s)"
        + (", resumed" if meta["build"]["resumed"] else "")
        + f"; saved in {meta['build']['path']}",
    ]
    if "heldout" in meta:
        lines.append(HeldoutTable.from_json(meta["heldout"]).text())
    return "\n".join(lines)
