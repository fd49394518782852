"""`emolens export`: steering vectors as a llama.cpp control vector (GGUF) or plain arrays."""

from __future__ import annotations

import argparse
import sys

from emolens.cli._common import (
    add_bank_option,
    add_model_option,
    finite,
    load_bank_for,
    load_model_from,
)
from emolens.vector_io import FORMATS


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export",
        help="export emotion steering vectors (llama.cpp control vector, npz, safetensors)",
        description="Write strength * scale * mean_norm(layer) * unit_vector per layer. In a "
        "llama.cpp GGUF, direction.N is added to the output of block N (0-based, N >= 1): "
        "load it with `--control-vector FILE` or `--control-vector-scaled FILE S`. A bare "
        "emotion has strength 1.0, so S is then the emolens strength (e.g. 0.1).",
    )
    parser.add_argument("out", help="output file (.gguf, .npz or .safetensors)")
    parser.add_argument("--format", choices=FORMATS, default=None, help="default: from OUT")
    parser.add_argument(
        "--emotion",
        action="append",
        required=True,
        metavar="NAME[=S]",
        help="an emotion, with a strength (default 1.0); repeat for several",
    )
    parser.add_argument("--scale", type=finite, default=1.0, help="multiplies every strength")
    parser.add_argument(
        "--layers",
        type=_layers,
        action="extend",
        default=None,
        metavar="L[,L...]",
        help="blocks to export, e.g. 15,18 (repeatable; default: the bank's layer)",
    )
    parser.add_argument("--variant", choices=("denoised", "raw"), default="denoised")
    parser.add_argument(
        "--allow-strong", action="store_true", help="allow strengths beyond +-1 (gibberish)"
    )
    add_model_option(parser)
    add_bank_option(parser)
    parser.set_defaults(run=run)


def _layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a comma-separated list of layers"
        ) from None


def run(args: argparse.Namespace) -> None:
    from emolens.figures import check_output
    from emolens.steer import parse_strengths

    check_output(args.out)
    strengths = parse_strengths(args.emotion, default=1.0, allow_strong=True)
    scaled = {name: value * args.scale for name, value in strengths.items()}
    lm = load_model_from(args)
    bank = load_bank_for(args, lm)
    vector = bank.steering(scaled, args.layers, variant=args.variant,
                           allow_strong=args.allow_strong)  # fmt: skip
    path = vector.save(args.out, args.format)
    emotions = ", ".join(f"{name}={value:+g}" for name, value in vector.strengths.items())
    layers = ", ".join(str(layer) for layer in vector.layers)
    print(f"emolens: wrote {path} ({emotions} at layers {layers})", file=sys.stderr)
