"""Options shared by several subcommands."""

from __future__ import annotations

import argparse


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        metavar="SPEC",
        help="a local directory, a .gguf file or a hub id (default: the embedded SmolLM2-135M)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or auto (several GPUs)")


def add_bank_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bank", default=None, metavar="PATH", help="bank file (default: the model's cached build)"
    )


def load_model_from(args: argparse.Namespace):  # noqa: ANN201
    from emolens.models import load_model

    return load_model(args.model, device=args.device)


def load_bank_for(args: argparse.Namespace, lm):  # noqa: ANN001, ANN201
    """The bank named by --bank, or the model's default build; checked against the model."""
    from emolens.bank import EmotionBank, default_bank_path

    bank = EmotionBank.load(args.bank or default_bank_path(lm.fingerprint))
    bank.check_against(lm)
    return bank
