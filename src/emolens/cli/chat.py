"""`emolens chat`: a terminal chat that shows the live emotion readout of every reply."""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from typing import TYPE_CHECKING

from emolens.cli._common import add_bank_option, add_model_option, load_bank_for, load_model_from
from emolens.errors import EmolensError
from emolens.steer import MODES

if TYPE_CHECKING:
    from emolens.bank import EmotionBank
    from emolens.models import LoadedModel

HELP = (
    "commands: /steer NAME=S [NAME=S ...] (set strengths; /steer alone shows them), "
    "/unsteer, /top N, /reset (forget the conversation), /quit (or end of input)"
)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "chat",
        help="chat with a model and watch its emotion readout (with optional steering)",
        description="A terminal chat. After each reply, the top emotions of its mean live "
        "readout are shown. " + HELP + ".",
    )
    add_model_option(parser)
    add_bank_option(parser)
    parser.add_argument("--layer", type=int, default=None, help="read and steer layer")
    parser.add_argument("--positions", choices=MODES, default="all", help="tokens steered")
    parser.add_argument("--variant", choices=("denoised", "raw"), default="denoised")
    parser.add_argument("--system", default=None, help="a system prompt")
    parser.add_argument("--top", type=int, default=3, metavar="K", help="emotions shown (3)")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    lm = load_model_from(args)
    bank = load_bank_for(args, lm)
    session = Session(lm, bank, args)
    print(f"emolens chat with {lm.name} (layer {session.layer}). {HELP}.", flush=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            break
        if not line.strip():
            continue
        try:
            if line.strip().startswith("/"):
                if not session.command(line.strip()):
                    break
            else:
                session.say(line)
        except EmolensError as error:
            print(f"emolens: {error}", flush=True)


class Session:
    """The conversation, the steering in force and the display settings."""

    def __init__(self, lm: LoadedModel, bank: EmotionBank, args: argparse.Namespace) -> None:
        from emolens.read import resolve_layer

        if args.top < 1:
            raise EmolensError(f"--top must be at least 1, not {args.top}")
        self.lm, self.bank, self.args = lm, bank, args
        self.layer = resolve_layer(lm, bank, args.layer)
        self.top = args.top
        self.strengths: dict[str, float] = {}
        self.messages: list[dict] = []
        self._reset()

    def _reset(self) -> None:
        system = self.args.system
        self.messages = [{"role": "system", "content": system}] if system else []

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        from emolens.steer import emotion_vectors, parse_strengths

        name, *rest = line.split()
        if name in ("/quit", "/exit"):
            return False
        if name == "/steer":
            if rest:
                update = parse_strengths(rest)
                wanted = {**self.strengths, **update}
                emotion_vectors(self.lm, self.bank, wanted, self.layer, self.args.variant)
                self.strengths = {k: v for k, v in wanted.items() if v != 0}
            print(f"steering: {self._describe()}", flush=True)
        elif name == "/unsteer":
            self.strengths = {}
            print("steering: none", flush=True)
        elif name == "/top":
            if len(rest) != 1 or not rest[0].isdigit() or int(rest[0]) < 1:
                raise EmolensError("usage: /top N (a positive whole number)")
            self.top = int(rest[0])
            print(f"showing the top {self.top} emotions", flush=True)
        elif name == "/reset":
            self._reset()
            print("conversation cleared", flush=True)
        else:
            print(HELP, flush=True)
        return True

    def say(self, text: str) -> None:
        """Send a user message, stream the reply and print its mean readout."""
        import torch

        from emolens.read import generate, top_emotions
        from emolens.steer import steer

        self.messages.append({"role": "user", "content": text})
        context = (
            steer(
                self.lm, self.bank, self.strengths, self.layer, self.args.positions,
                self.args.variant,
            )
            if self.strengths
            else nullcontext()
        )  # fmt: skip
        pieces, scores = [], []
        try:
            print("model> ", end="", flush=True)
            with context:
                for token in generate(
                    self.lm, self.bank, self.messages, max_new_tokens=self.args.max_new_tokens,
                    layer=self.layer, temperature=self.args.temperature, seed=self.args.seed,
                    variant=self.args.variant,
                ):  # fmt: skip
                    print(token.text, end="", flush=True)
                    pieces.append(token.text)
                    scores.append(token.scores)
        except BaseException:
            self.messages.pop()
            print()
            raise
        print()
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        if not scores:
            print("    (empty reply)", flush=True)
            return
        mean = torch.stack(scores).mean(0)
        shown = "  ".join(
            f"{name} {value:+.2f}"
            for name, value in top_emotions(mean, self.bank.emotions, self.top)
        )
        note = f"; includes steering {self._describe()}" if self.strengths else ""
        print(f"    [{shown}]  mean over the reply, layer {self.layer}{note}", flush=True)

    def _describe(self) -> str:
        if not self.strengths:
            return "none"
        return ", ".join(f"{name}={value:+g}" for name, value in self.strengths.items())
