"""`emolens build`: corpus -> emotion bank, with progress, checkpoints and resume."""

from __future__ import annotations

import argparse

from emolens.cli._common import add_model_option, load_model_from


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("build", help="build the emotion vectors of a model")
    add_model_option(parser)
    parser.add_argument("--corpus", default="default", help="corpus file or directory")
    parser.add_argument("--out", default=None, help="output directory (default: the cache)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="block indices")
    parser.add_argument("--offset", type=int, default=50, help="first story token averaged")
    parser.add_argument("--variance", type=float, default=0.5, help="neutral variance removed")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--checkpoint-every", type=int, default=25, help="batches between saves")
    parser.add_argument("--force", action="store_true", help="rebuild even if a bank matches")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from emolens.build import build

    lm = load_model_from(args)
    bank = build(
        lm,
        args.corpus,
        layers=args.layers,
        out=args.out,
        offset=args.offset,
        variance=args.variance,
        batch_size=args.batch_size,
        checkpoint_every=args.checkpoint_every,
        force=args.force,
    )
    print(describe(bank))


def describe(bank) -> str:  # noqa: ANN001
    """What a build produced: where, how fast, and the held-out table."""
    from emolens.build import accuracy_table

    meta = bank.meta
    lines = [
        f"bank: {len(bank.emotions)} emotions x {len(bank.layers)} layers {bank.layers}, "
        f"width {bank.width}; default layer {bank.default_layer}, best {meta.get('best_layer')}",
        f"built in {meta['build']['seconds']} s ({meta['build']['tokens_per_second']} tokens/s)"
        + (", resumed" if meta["build"]["resumed"] else ""),
    ]
    if "heldout" in meta:
        lines.append(accuracy_table(meta["heldout"]))
    return "\n".join(lines)
