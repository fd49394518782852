"""Options shared by several subcommands, declared once."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from emolens.errors import EmolensError

if TYPE_CHECKING:
    from emolens.bank import EmotionBank
    from emolens.distributed import RayWorkers
    from emolens.generation import Sampling
    from emolens.models import LoadedModel


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        metavar="SPEC",
        help="a local directory, a .gguf file or a hub id (default: the embedded SmolLM2-135M)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or auto (several GPUs)")


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    """--ray [ADDRESS] and --workers N: run the work on Ray workers (`emolens.distributed`)."""
    parser.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        default=None,
        metavar="ADDRESS",
        help="run on Ray workers: the cluster at ADDRESS, or (auto) the one started here by "
        "`ray start --head`, else a local one (needs pip install 'emolens[ray]')",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="Ray workers (default: one per GPU of the cluster, else one per CPU)",
    )


def check_ray(args: argparse.Namespace) -> None:
    """With --ray, fail now (not after loading the model) if Ray is not installed."""
    if args.ray is not None:
        from emolens.distributed import require_ray

        require_ray()


@contextmanager
def ray_workers_from(args: argparse.Namespace, lm: LoadedModel) -> Iterator[RayWorkers | None]:
    """Ray workers loading the model of --model in the driver's dtype while the block runs,
    or None without --ray."""
    if args.ray is None:
        if args.workers is not None:
            raise EmolensError("--workers needs --ray")
        yield None
        return
    from emolens.distributed import RayWorkers

    dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    with RayWorkers(args.model, address=args.ray, workers=args.workers, dtype=dtype) as workers:
        yield workers


def add_bank_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bank", default=None, metavar="PATH", help="bank file (default: the model's cached build)"
    )


def finite(text: str) -> float:
    """An argparse type: a finite float."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


def add_sampling_options(parser: argparse.ArgumentParser, max_new_tokens: int = 64) -> None:
    """--max-new-tokens, --temperature, --top-p and --seed (the fields of `Sampling`)."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N")
    group.add_argument("--temperature", type=finite, default=0.0, help="0: greedy (default)")
    group.add_argument("--top-p", type=finite, default=1.0, help="nucleus sampling (default 1)")
    group.add_argument("--seed", type=int, default=None)


def sampling_from(args: argparse.Namespace) -> Sampling:
    from emolens.generation import Sampling

    return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)


def add_variant_option(parser: argparse.ArgumentParser) -> None:
    """--variant: which of the bank's vectors to use."""
    parser.add_argument(
        "--variant",
        choices=("denoised", "raw", "probe"),
        default="denoised",
        help="probe: logistic-regression directions (banks built with --probes)",
    )


def add_steering_options(parser: argparse.ArgumentParser) -> None:
    """--layer, --positions, --variant and --allow-strong."""
    from emolens.steer import MODES

    parser.add_argument("--layer", type=int, default=None, help="block to read and steer")
    parser.add_argument("--positions", choices=MODES, default="all", help="tokens steered")
    add_variant_option(parser)
    parser.add_argument(
        "--allow-strong", action="store_true", help="allow strengths beyond +-1 (gibberish)"
    )


def emotion_list(spec: str | None, known: list[str]) -> list[str]:
    """Names from a comma list, each known; None gives []; an empty list is an error."""
    if spec is None:
        return []
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise EmolensError("--emotions is empty: give a comma list such as calm,afraid")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise EmolensError(f"unknown emotions {unknown}; the bank has {len(known)} emotions")
    return list(dict.fromkeys(names))


def load_model_from(args: argparse.Namespace) -> LoadedModel:
    from emolens.models import load_model

    return load_model(args.model, device=args.device)


def load_bank_for(args: argparse.Namespace, lm: LoadedModel) -> EmotionBank:
    """The bank named by --bank, or the model's default build; checked against the model."""
    from emolens.bank import EmotionBank, default_bank_path

    bank = EmotionBank.load(args.bank or default_bank_path(lm.fingerprint))
    bank.check_model(lm)
    return bank
