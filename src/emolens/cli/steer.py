"""`emolens steer`: a reply with and without steering, and how much of the emotion each carries."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

from emolens.cli._common import add_bank_option, add_model_option, load_bank_for, load_model_from
from emolens.steer import MODES, RANDOM_PREFIX

if TYPE_CHECKING:
    from emolens.bank import EmotionBank
    from emolens.models import LoadedModel


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "steer",
        help="compare a reply with and without steering toward emotions",
        description="Generate a reply to PROMPT (through the chat template) twice, unsteered "
        "and steered, with the same seed and settings. Each reply's readout is the mean "
        "projection of its tokens on the steered emotions, read by the unsteered model.",
    )
    parser.add_argument("prompt", help="the user message")
    parser.add_argument(
        "--emotion",
        action="append",
        required=True,
        metavar="NAME=S",
        help="emotion and strength (a fraction of the layer's mean residual norm), e.g. "
        "calm=0.05; repeat for several; random:SEED=S steers a matched-norm random direction",
    )
    parser.add_argument("--layer", type=int, default=None, help="block to steer and read")
    parser.add_argument("--positions", choices=MODES, default="all", help="tokens steered")
    parser.add_argument("--variant", choices=("denoised", "raw"), default="denoised")
    add_model_option(parser)
    add_bank_option(parser)
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from emolens.steer import emotion_vectors, parse_strengths

    strengths = parse_strengths(args.emotion)
    lm = load_model_from(args)
    bank = load_bank_for(args, lm)
    layer = next(iter(emotion_vectors(lm, bank, strengths, args.layer, args.variant)))
    messages = [{"role": "user", "content": args.prompt}]
    result = {
        "prompt": args.prompt,
        "layer": layer,
        "positions": args.positions,
        "steering": strengths,
    }
    for name, steering in (("unsteered", {}), ("steered", strengths)):
        ids, text = reply(lm, bank, messages, steering, args)
        result[name] = {"text": text, "readout": readout(lm, bank, messages, ids, strengths, args)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    shown = ", ".join(f"{name}={value:+g}" for name, value in strengths.items())
    titles = {
        "unsteered": "[unsteered]",
        "steered": f"[steered: {shown} at layer {layer}, positions {args.positions}]",
    }
    base = result["unsteered"]["readout"]
    for name, title in titles.items():
        print(title)
        print(result[name]["text"].strip())
        scores = [
            f"{emotion} {value:+.2f}"
            + (f" ({value - base[emotion]:+.2f})" if name == "steered" else "")
            for emotion, value in result[name]["readout"].items()
        ]
        if scores:
            print(f"    readout (mean over the reply, layer {layer}): {'  '.join(scores)}")
        print()


def reply(
    lm: LoadedModel,
    bank: EmotionBank,
    messages: list[dict],
    strengths: Mapping[str, float],
    args: argparse.Namespace,
) -> tuple[list[int], str]:
    """Generate one reply (steered by `strengths` if any): its token ids and text."""
    from contextlib import nullcontext

    from emolens.read import generate
    from emolens.steer import steer

    context = (
        steer(lm, bank, strengths, args.layer, args.positions, args.variant)
        if strengths
        else nullcontext()
    )
    with context:
        tokens = list(
            generate(
                lm, bank, messages, max_new_tokens=args.max_new_tokens, layer=args.layer,
                temperature=args.temperature, seed=args.seed, variant=args.variant,
            )
        )  # fmt: skip
    return [t.id for t in tokens], "".join(t.text for t in tokens)


def readout(
    lm: LoadedModel,
    bank: EmotionBank,
    messages: list[dict],
    reply_ids: list[int],
    strengths: Mapping[str, float],
    args: argparse.Namespace,
) -> dict[str, float]:
    """Mean projection of the reply's tokens on each steered bank emotion, read without
    steering (the emotion the text carries, not the vector that was added)."""
    from emolens.read import project, render

    names = [name for name in strengths if not name.startswith(RANDOM_PREFIX)]
    if not names or not reply_ids:
        return {name: 0.0 for name in names}
    prompt = render(lm, messages, add_generation_prompt=True).ids
    projection, _ = project(lm, bank, prompt + reply_ids, layer=args.layer, variant=args.variant)
    mean = projection[len(prompt) :].mean(0)
    return {name: round(float(mean[bank.emotion_index(name)]), 4) for name in names}
