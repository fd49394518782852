"""`emolens read`: token-level emotion readout of a text, a chat, or a reply as it is generated."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from emolens.cli._common import (
    add_bank_option,
    add_model_option,
    add_sampling_options,
    add_variant_option,
    emotion_list,
    load_bank_for,
    load_model_from,
    sampling_from,
)
from emolens.errors import EmolensError
from emolens.figures import check_output

if TYPE_CHECKING:
    import torch

    from emolens.bank import EmotionBank
    from emolens.generation import Sampling
    from emolens.models import LoadedModel
    from emolens.readout import Readout, Segment


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "read",
        help="read emotions token by token in a text, a chat or a live reply",
        description="Read the bank's emotion vectors at every token. Give TEXT, --chat, "
        "--generate, or --file with --out to score a whole data set in batches.",
    )
    parser.add_argument("text", nargs="?", help="plain text to read")
    parser.add_argument(
        "--chat",
        metavar="FILE",
        help="a JSON list of {role, content} messages, or a shipped transcript name "
        "(e.g. coding_agent)",
    )
    parser.add_argument("--generate", metavar="PROMPT", help="generate a reply and read it live")
    parser.add_argument(
        "--file",
        metavar="JSONL",
        help='texts to score, one per line: a JSON string, {"text": ...} or {"messages": [...]}, '
        'each with an optional "id"',
    )
    parser.add_argument("--out", metavar="JSONL", help="with --file: scores, one line per input")
    parser.add_argument(
        "--pool", default="mean", help="with --file: mean (default), last or reply_start"
    )
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="with --file")
    add_model_option(parser)
    add_bank_option(parser)
    parser.add_argument("--layer", type=int, default=None, help="layer (default: the bank's)")
    add_variant_option(parser)
    parser.add_argument(
        "--baseline",
        default="centre",
        metavar="centre|neutral|none|JSONL",
        help="subtract from each emotion's projection that of the bank's centre, the mean "
        "training story (the default: the best on the cross-genre validation texts, and how "
        "held-out stories are scored), each emotion's mean reading over the shipped neutral "
        "dialogues (computed once, then cached), the mean reading of your reference texts (a "
        "JSONL file in the --file format), or nothing (none: raw projections)",
    )
    parser.add_argument("--emotions", metavar="A,B,C", help="only these emotions")
    parser.add_argument("--top", type=int, default=3, metavar="K", help="emotions shown (3)")
    parser.add_argument(
        "--per", choices=("sentence", "token"), default="sentence", help="terminal view"
    )
    parser.add_argument("--smooth", type=int, default=1, metavar="W", help="moving average")
    parser.add_argument("--html", metavar="PATH", help="write a token heatmap (HTML)")
    parser.add_argument("--plot", metavar="PATH", help="write the per-turn trajectory (PNG)")
    parser.add_argument("--json", action="store_true", help="print the readout as JSON")
    add_sampling_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from emolens.chat import load_chat
    from emolens.readout import read

    given = [
        name for name in ("text", "chat", "generate", "file") if getattr(args, name) is not None
    ]
    if len(given) != 1:
        raise EmolensError(
            "give exactly one of TEXT, --chat FILE, --generate PROMPT or --file JSONL"
        )
    if (args.file is None) != (args.out is None):
        raise EmolensError("--file and --out go together")
    for name in ("top", "smooth", "batch_size"):
        if getattr(args, name) < 1:
            raise EmolensError(
                f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}"
            )
    sampling = sampling_from(args) if args.generate is not None else None
    messages = load_chat(args.chat) if args.chat else None
    items = _read_items(args.file) if args.file else None
    if args.baseline == "none":
        args.baseline = None
    named = (None, "neutral", "centre")
    reference = _read_items(args.baseline) if args.baseline not in named else None
    if args.text is not None and not args.text.strip():
        raise EmolensError("nothing to read: the text is empty or only whitespace")
    check_output(args.html)
    check_output(args.plot, image=True)
    check_output(args.out)
    lm = load_model_from(args)
    bank = load_bank_for(args, lm)
    emotions = emotion_list(args.emotions, bank.emotions)
    baseline = _baseline(args, lm, bank, reference)
    if items is not None:
        _score_file(args, lm, bank, items, emotions, baseline)
        return
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    if args.generate is not None:
        messages = [{"role": "user", "content": args.generate}]
        assert sampling is not None
        reply = _stream(args, lm, bank, messages, emotions, colour, sampling, baseline)
        if not (args.json or args.html or args.plot):
            return
        messages.append({"role": "assistant", "content": reply})
    readout = read(lm, bank, messages or args.text, layer=args.layer, variant=args.variant,
                   baseline=baseline)  # fmt: skip
    readout = readout.smooth(args.smooth)
    view = readout.select(emotions) if emotions else readout
    if args.json:
        print(json.dumps(view.to_dict()))
    elif args.generate is None:
        _print_view(view, args.top, args.per, colour)
    if args.html:
        from emolens.atomic import write_text
        from emolens.display import heatmap_html

        write_text(args.html, heatmap_html(readout, emotions))
        print(f"emolens: wrote {args.html}", file=sys.stderr)
    if args.plot:
        from emolens.display import plot_trajectory

        plot_trajectory(readout, args.plot, emotions)
        print(f"emolens: wrote {args.plot}", file=sys.stderr)


def _baseline(
    args: argparse.Namespace, lm: LoadedModel, bank: EmotionBank, reference: list | None
) -> str | torch.Tensor | None:
    """What --baseline subtracts: "centre", "neutral", the mean reading of the reference texts,
    or None."""
    from emolens.calibration import baseline

    if reference is None:
        return args.baseline
    return baseline(lm, bank, [item for _, item in reference], layer=args.layer,
                    variant=args.variant, pool=args.pool if args.file else "mean",
                    batch_size=args.batch_size)  # fmt: skip


def _read_items(path: str) -> list[tuple[object, str | list[dict]]]:
    """(id, text or messages) of every line of a --file; bad lines are errors at file:line."""
    from emolens.chat import check_messages
    from emolens.jsonl import read_jsonl

    items: list[tuple[object, str | list[dict]]] = []
    for number, value in read_jsonl(path):
        if isinstance(value, dict):
            ident, text, messages = value.get("id"), value.get("text"), value.get("messages")
        else:
            ident, text, messages = None, value, None
        if messages is not None:
            try:
                items.append((ident, check_messages(messages)))
            except EmolensError as error:
                raise EmolensError(f"{path}:{number}: field 'messages': {error}") from None
        elif isinstance(text, str) and text.strip():
            items.append((ident, text))
        else:
            raise EmolensError(
                f"{path}:{number}: field 'text': expected a non-empty string, or 'messages'"
            )
    if not items:
        raise EmolensError(f"{path}: no texts to read")
    return items


def _score_file(
    args: argparse.Namespace,
    lm: LoadedModel,
    bank: EmotionBank,
    items: list,
    emotions: list[str],
    baseline: str | torch.Tensor | None,
) -> None:
    """Score every item of --file into --out, resuming after the lines already there."""
    from emolens.jsonl import AppendLog, recover
    from emolens.readout import read_many, resolve_layer

    layer = resolve_layer(lm, bank, args.layer)
    settings = {"layer": layer, "pool": args.pool, "variant": args.variant,
                "baseline": args.baseline}  # fmt: skip
    done = set()
    for number, row in recover(args.out):
        if not isinstance(row, dict) or any(row.get(k) != v for k, v in settings.items()):
            raise EmolensError(
                f"{args.out}:{number}: written with other settings than {settings}; "
                "give another --out"
            )
        done.add(row.get("index"))
    todo = [i for i in range(len(items)) if i not in done]
    names = emotions or bank.emotions
    index = [bank.emotion_index(name) for name in names]
    chunk = 64 * args.batch_size  # lines are written (and synced) after each chunk
    with AppendLog(args.out) as log:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            scores = read_many(lm, bank, [items[i][1] for i in part], layer=layer,
                               variant=args.variant, pool=args.pool, batch_size=args.batch_size,
                               baseline=baseline, progress=len(todo) > chunk)  # fmt: skip
            log.write(
                {"index": i, "id": items[i][0], **settings,
                 "scores": {n: round(float(v), 5) for n, v in zip(names, row[index].tolist(), strict=True)}}
                for i, row in zip(part, scores, strict=True)
            )  # fmt: skip
    print(f"emolens: scored {len(todo)} texts ({len(done)} already in {args.out})", file=sys.stderr)


def _stream(
    args: argparse.Namespace,
    lm: LoadedModel,
    bank: EmotionBank,
    messages: list[dict],
    emotions: list[str],
    colour: bool,
    sampling: Sampling,
    baseline: str | torch.Tensor | None,
) -> str:
    """Generate and print the reply as it comes, with its readout; return the reply text."""
    from dataclasses import asdict

    import torch

    from emolens.readout import ends_sentence, generate, resolve_layer

    names = emotions or bank.emotions
    index = torch.tensor([bank.emotion_index(name) for name in names])
    quiet = args.json
    layer = resolve_layer(lm, bank, args.layer)
    if not quiet:
        print(_paint(f"[assistant, layer {layer}]", "1", colour))
    pieces: list[str] = []
    pending: list[torch.Tensor] = []
    for token in generate(
        lm,
        bank,
        messages,
        layer=args.layer,
        variant=args.variant,
        baseline=baseline,
        **asdict(sampling),
    ):
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
    items: list[tuple[int, str, Segment | None]] = [
        (s.start, "segment", s) for s in readout.segments()
    ]
    items += [(index, "reply", None) for index in readout.reply_starts]
    current = None
    relative = ", relative to the baseline" if readout.baseline is not None else ""
    print(_paint(f"[layer {readout.layer}, {readout.variant}{relative}]", "2", colour))
    for position, _, segment in sorted(items, key=lambda item: item[0]):
        if segment is None:  # a reply start
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
    from emolens.readout import top_emotions

    return "  ".join(
        f"{name} {_paint(f'{value:+.2f}', '32' if value >= 0 else '31', colour)}"
        for name, value in top_emotions(values, list(names), k)
    )


def _paint(text: str, code: str, colour: bool) -> str:
    return f"\033[{code}m{text}\033[0m" if colour else text
