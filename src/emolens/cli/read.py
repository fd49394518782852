"""`emolens read`: token-level emotion readout of a text, a chat, or a reply as it is generated."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from emolens.cli._common import add_bank_option, add_model_option, load_bank_for, load_model_from
from emolens.errors import EmolensError

if TYPE_CHECKING:
    import torch

    from emolens.bank import EmotionBank
    from emolens.models import LoadedModel
    from emolens.read import Readout


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "read",
        help="read emotions token by token in a text, a chat or a live reply",
        description="Read the bank's emotion vectors at every token. Give TEXT, --chat or "
        "--generate.",
    )
    parser.add_argument("text", nargs="?", help="plain text to read")
    parser.add_argument(
        "--chat",
        metavar="FILE",
        help="a JSON list of {role, content} messages, or a shipped transcript name "
        "(e.g. coding_agent)",
    )
    parser.add_argument("--generate", metavar="PROMPT", help="generate a reply and read it live")
    add_model_option(parser)
    add_bank_option(parser)
    parser.add_argument("--layer", type=int, default=None, help="layer (default: the bank's)")
    parser.add_argument("--variant", choices=("denoised", "raw"), default="denoised")
    parser.add_argument("--emotions", metavar="A,B,C", help="only these emotions")
    parser.add_argument("--top", type=int, default=3, metavar="K", help="emotions shown (3)")
    parser.add_argument(
        "--per", choices=("sentence", "token"), default="sentence", help="terminal view"
    )
    parser.add_argument("--smooth", type=int, default=1, metavar="W", help="moving average")
    parser.add_argument("--html", metavar="PATH", help="write a token heatmap (HTML)")
    parser.add_argument("--plot", metavar="PATH", help="write the per-turn trajectory (PNG)")
    parser.add_argument("--json", action="store_true", help="print the readout as JSON")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from emolens.read import load_chat, read

    given = [name for name in ("text", "chat", "generate") if getattr(args, name) is not None]
    if len(given) != 1:
        raise EmolensError("give exactly one of TEXT, --chat FILE or --generate PROMPT")
    if args.top < 1:
        raise EmolensError(f"--top must be at least 1, not {args.top}")
    messages = load_chat(args.chat) if args.chat else None
    lm = load_model_from(args)
    bank = load_bank_for(args, lm)
    emotions = _emotions(args.emotions, bank.emotions)
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    if args.generate is not None:
        messages = [{"role": "user", "content": args.generate}]
        reply = _stream(args, lm, bank, messages, emotions, colour)
        if not (args.json or args.html or args.plot):
            return
        messages.append({"role": "assistant", "content": reply})
    readout = read(lm, bank, messages or args.text, layer=args.layer, variant=args.variant)
    readout = readout.smooth(args.smooth)
    view = readout.select(emotions) if emotions else readout
    if args.json:
        print(json.dumps(view.to_dict()))
    elif args.generate is None:
        _print_view(view, args.top, args.per, colour)
    if args.html:
        from emolens.read import heatmap_html

        with open(args.html, "w", encoding="utf-8") as handle:
            handle.write(heatmap_html(readout, emotions))
        print(f"emolens: wrote {args.html}", file=sys.stderr)
    if args.plot:
        from emolens.read import plot_trajectory

        plot_trajectory(readout, args.plot, emotions)
        print(f"emolens: wrote {args.plot}", file=sys.stderr)


def _emotions(spec: str | None, known: list[str]) -> list[str]:
    if not spec:
        return []
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise EmolensError(f"unknown emotions {unknown}; the bank has {len(known)} emotions")
    return names


def _stream(
    args: argparse.Namespace,
    lm: LoadedModel,
    bank: EmotionBank,
    messages: list[dict],
    emotions: list[str],
    colour: bool,
) -> str:
    """Generate and print the reply as it comes, with its readout; return the reply text."""
    import torch

    from emolens.read import ends_sentence, generate, resolve_layer

    names = emotions or bank.emotions
    index = torch.tensor([bank.emotion_index(name) for name in names])
    quiet = args.json
    layer = resolve_layer(lm, bank, args.layer)
    if not quiet:
        print(_paint(f"[assistant, layer {layer}]", "1", colour))
    pieces, pending = [], []
    for token in generate(
        lm, bank, messages, max_new_tokens=args.max_new_tokens, layer=args.layer,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, variant=args.variant,
    ):  # fmt: skip
        pieces.append(token.text)
        if quiet:
            continue
        if args.per == "token":
            print(f"  {token.text!r:<16} {_scores(token.scores[index], names, args.top, colour)}")
            continue
        if pending and ends_sentence(pieces[-2], token.text):
            _print_pending(pending, pieces[-2], names, args.top, colour)
            pending = []
        print(token.text, end="", flush=True)
        pending.append(token.scores[index])
    if pending and not quiet and args.per == "sentence":
        _print_pending(pending, pieces[-1], names, args.top, colour)
    return "".join(pieces)


def _print_pending(
    pending: list[torch.Tensor], last: str, names: Sequence[str], k: int, colour: bool
) -> None:
    """Close the streamed sentence with its mean readout on a line of its own."""
    import torch

    scores = _scores(torch.stack(pending).mean(0), names, k, colour)
    print(("" if last.endswith("\n") else "\n") + "    " + scores, flush=True)


def _print_view(readout: Readout, k: int, per: str, colour: bool) -> None:
    """Per sentence (or token) of each turn: the text and its top emotions."""
    items = [(s.start, "segment", s) for s in readout.segments()]
    items += [(index, "reply", None) for index in readout.reply_starts]
    current = None
    print(_paint(f"[layer {readout.layer}, {readout.variant}]", "2", colour))
    for position, kind, segment in sorted(items, key=lambda item: item[0]):
        if kind == "reply":
            scores = _scores(readout.projection[position], readout.emotions, k, colour)
            print(f"  {_paint('> assistant reply starts', '2', colour)}  {scores}")
            continue
        if segment.turn != current and segment.role != "text":
            print(_paint(f"[{segment.role} {segment.turn}]", "1", colour))
        current = segment.turn
        if per == "sentence":
            start, end = readout.offsets[segment.start][0], readout.offsets[segment.end - 1][1]
            text = " ".join(readout.text[start:end].split())
            text = text if len(text) <= 72 else text[:71] + "…"
            scores = _scores(readout.segment_mean(segment), readout.emotions, k, colour)
            print(f"  {text}\n      {scores}")
            continue
        for i in range(segment.start, segment.end):
            if readout.roles[i] != "template":
                scores = _scores(readout.projection[i], readout.emotions, k, colour)
                print(f"  {readout.tokens[i]!r:<16} {scores}")


def _scores(values: torch.Tensor, names: Sequence[str], k: int, colour: bool) -> str:
    from emolens.read import top_emotions

    return "  ".join(
        f"{name} {_paint(f'{value:+.2f}', '32' if value >= 0 else '31', colour)}"
        for name, value in top_emotions(values, list(names), k)
    )


def _paint(text: str, code: str, colour: bool) -> str:
    return f"\033[{code}m{text}\033[0m" if colour else text
