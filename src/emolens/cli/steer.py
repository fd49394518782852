"""`emolens steer`: a reply with and without steering, and how much of the emotion each carries."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from emolens.cli._common import (
    add_bank_option,
    add_model_option,
    add_sampling_options,
    add_steering_options,
    load_bank_for,
    load_model_from,
    sampling_from,
)
from emolens.steer import RANDOM_PREFIX

if TYPE_CHECKING:
    from emolens.bank import EmotionBank
    from emolens.models import LoadedModel


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "steer",
        help="compare a reply with and without steering toward emotions",
        description="Generate a reply to PROMPT (through the chat template) twice in one batch, "
        "unsteered and steered, with the same seed and settings. Each reply's readout is the "
        "mean projection of its tokens on the steered emotions, read by the unsteered model.",
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
    add_steering_options(parser)
    add_model_option(parser)
    add_bank_option(parser)
    add_sampling_options(parser)
    parser.set_defaults(seed=0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from emolens.generation import decode
    from emolens.steer import parse_strengths

    strengths = parse_strengths(args.emotion, allow_strong=args.allow_strong)
    sampling = sampling_from(args)
    lm = load_model_from(args)
    bank = load_bank_for(args, lm)
    vector = bank.steering(strengths, args.layer, variant=args.variant,
                           allow_strong=args.allow_strong)  # fmt: skip
    (layer,) = vector.layers
    messages = [{"role": "user", "content": args.prompt}]
    prompt = lm.encode_chat(messages, add_generation_prompt=True)
    plain, steered = decode(lm, [prompt, prompt], sampling, steering=[None, vector],
                            mode=args.positions)  # fmt: skip
    result = {"prompt": args.prompt, "layer": layer, "positions": args.positions,
              "steering": strengths}  # fmt: skip
    for name, generation in (("unsteered", plain), ("steered", steered)):
        result[name] = {
            "text": generation.text,
            "readout": readout(lm, bank, prompt, generation.tokens, strengths, layer, args.variant),
        }
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


def readout(
    lm: LoadedModel,
    bank: EmotionBank,
    prompt: list[int],
    reply: list[int],
    strengths: dict[str, float],
    layer: int,
    variant: str,
) -> dict[str, float]:
    """Mean projection of the reply's tokens on each steered bank emotion, read without
    steering (the emotion the text carries, not the vector that was added)."""
    import torch

    from emolens.capture import residuals
    from emolens.readout import score

    names = [name for name in strengths if not name.startswith(RANDOM_PREFIX)]
    if not names or not reply:
        return {name: 0.0 for name in names}
    ids = torch.tensor([prompt + reply])
    states = residuals(lm, ids, torch.ones_like(ids), [layer])[layer][0, len(prompt) :]
    mean = score(states, bank, layer, variant).mean(0).cpu()
    return {name: round(float(mean[bank.emotion_index(name)]), 4) for name in names}
